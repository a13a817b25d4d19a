"""dflash-export: trace a target LLM (and optionally its DFlash drafter) into an ONNX folder."""
from __future__ import annotations

import argparse
import sys

from ..errors import UserError, run_cli


def parse_args(argv):
    p = argparse.ArgumentParser(prog="dflash-export", description=__doc__)
    p.add_argument("--model", default="smollm2-135m",
                   help="a Hugging Face folder, a .gguf file, or an alias: smollm2-135m (default, embedded), "
                        "llama3.1-8b, qwen3-4b, qwen3-8b (from the local Hugging Face cache)")
    p.add_argument("--output", default=None, help="folder to write (default: exports/<model>)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="default fp32 (or the --device preset's). ONNX Runtime's CPU provider runs fp32 (and "
                        "int8-tokens or int4 weights) fast; fp16 and bf16 are for CUDA and TensorRT (bf16 "
                        "streams from a safetensors folder and is validated through its fp32 twin)")
    p.add_argument("--layers", default=None,
                   help="tap layer ids, comma-separated (default: the drafter's, else z-lab's rule)")
    p.add_argument("--drafter", default=None,
                   help="a z-lab format drafter folder, or 'auto' for the alias's z-lab drafter")
    p.add_argument("--no-drafter", action="store_true",
                   help="export the target alone, even when a drafter ships for it")
    p.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                   help="score only the N most frequent tokens in the drafter's LM head (from its "
                        "draft_vocab.json; default: all of that file; 0: the whole vocabulary)")
    p.add_argument("--quantize", choices=["int8", "int8-tokens", "int4"], default=None,
                   help="quantize the target's weights: int8 or int4 (MatMulNBits; with --variant tensorrt, int4 "
                        "as block-quantized DequantizeLinear), or int8-tokens (per-token int8 products: a verify "
                        "costs much less than int8's, so DFlash pays more on CPUs; a little further from fp32)")
    p.add_argument("--variant", choices=["ort", "tensorrt"], default=None,
                   help="ort (default): for ONNX Runtime's CPU and CUDA providers; tensorrt: standard ONNX "
                        "ops only, checked, so TensorRT builds the whole graph")
    p.add_argument("--device", choices=["jetson-orin", "nvidia-gpu"], default=None,
                   help="a preset: jetson-orin = --variant tensorrt, fp16, int4 weights for targets over "
                        "2B parameters (explicit options win)")
    p.add_argument("--validate", choices=["auto", "full", "layers"], default="auto",
                   help="full: the whole model against PyTorch, in memory (about 12 bytes a parameter); layers: "
                        "its first layers against PyTorch and the whole graph's structure (streamed exports); "
                        "auto (default): full up to 400M parameters")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from .pipeline import ValidationFailed, export

    try:
        if args.no_drafter and args.drafter:
            raise UserError("--no-drafter and --drafter contradict each other; pass one")
        drafter = "" if args.no_drafter else args.drafter
        out = export(args.model, args.output, args.dtype, args.layers, drafter, args.force,
                     draft_vocab=args.draft_vocab, quantize=args.quantize, variant=args.variant,
                     device=args.device, validate=args.validate)
    except ValidationFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    print(f'try it: dflash-generate --model {out} "Write a Python function that reverses a list."')
    return 0


def entry() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
