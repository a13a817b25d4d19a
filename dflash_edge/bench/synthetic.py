"""Random targets, tokenizers and drafters built on the spot (nothing is downloaded).

The test suite's tiny models, and full-size random models with a real model's shapes for speed runs
(the GPU benchmark's Llama-3.1-8B stand-in): speed depends on the shapes, not on the weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the a cat dog sat on mat and ran to big small red blue green one two three four five "
         "def return print if else for in list sort python code hello world yes no why how what "
         "hi system user assistant You are tiny be kind").split()
CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are tiny.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_tokenizer(vocab_size: int | None = None):
    """A word-level tokenizer with a ChatML template; vocab_size pads it with made-up words (w0, w1, ...)
    to a real model's vocabulary size."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
    pieces = ["\n", " "] + WORDS + [chr(c) for c in range(33, 127)]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(specials + pieces))}
    for i in range((vocab_size or 0) - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|\s|[^\w\s]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML
    return fast


# Llama-3.1-8B-Instruct's shapes (its config.json); untied, 128k vocabulary.
LLAMA31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072)


def save_target(folder: Path, arch: str, seed: int = 0, layers: int = 6, dtype: torch.dtype = torch.float32,
                sharp: bool = True, **overrides) -> Path:
    """A random Llama (with llama3 rope scaling, tied) or Qwen3 (q/k norm, untied) target folder.

    sharp: larger weights than transformers' init, for tiny models whose greedy path must stay far from
    ties; full-size shapes keep the init, whose scale keeps fp16 activations finite."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), bos_token_id=1, pad_token_id=2)
    common.update(overrides)
    if arch == "llama":
        config = LlamaConfig(**common, tie_word_embeddings=True, rope_theta=50000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 128})
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    elif arch == "qwen3":
        # An odd number of KV heads (SmolLM2 has 3), which the exported attention splits differently.
        qwen3 = {**common, "num_attention_heads": 6, "num_key_value_heads": 3, **overrides}
        config = Qwen3Config(**qwen3, head_dim=16, tie_word_embeddings=False, rope_theta=1e6)
        model = Qwen3ForCausalLM._from_config(config, dtype=dtype)
    else:
        raise ValueError(arch)
    if sharp:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.15)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_random_drafter(folder: Path, target_folder: Path, block_size: int = 16, layers: int = 1,
                        seed: int = 0, std: float = 0.1, dtype: torch.dtype = torch.float32) -> Path:
    from transformers import AutoConfig

    from dflash_edge.export.drafter import config_for_target, random_drafter, save_drafter

    cfg = AutoConfig.from_pretrained(target_folder)
    mask = 3  # <|mask|> in make_tokenizer
    drafter = random_drafter(config_for_target(cfg, num_layers=layers, block_size=block_size,
                                               mask_token_id=mask), seed=seed, std=std)
    save_drafter(drafter, folder, dtype=dtype)
    return folder


def write_safetensors(folder: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype = torch.bfloat16,
                      seed: int = 0, shard_bytes: int = 4 * 1024**3, std: float = 0.02) -> None:
    """Random tensors of the given names and shapes as sharded *.safetensors with their index, written one
    tensor at a time: norms (1-D) near one, each different, matrices normal(0, std)."""
    import json

    size = torch.tensor([], dtype=dtype).element_size()
    shards, current, total = [], [], 0
    for name, dims in tensors:  # greedy shards of about shard_bytes
        nbytes = size * int(torch.Size(dims).numel())
        if current and sum(b for _, _, b in current) + nbytes > shard_bytes:
            shards.append(current)
            current = []
        current.append((name, dims, nbytes))
        total += nbytes
    shards.append(current)
    g = torch.Generator().manual_seed(seed)
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    code = next(k for k, t in names.items() if t == dtype)
    index = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dims, nbytes in shard:
            header[name] = {"dtype": code, "shape": list(dims), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            index[name] = file
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / file, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for name, dims, _ in shard:
                if len(dims) == 1:  # norms near one, each layer's different
                    t = 1 + 0.1 * torch.randn(dims, generator=g)
                else:
                    t = torch.randn(dims, generator=g) * std
                f.write(t.to(dtype).view(torch.uint8).numpy().data)
                del t
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": index}, indent=1))


def write_drafter_checkpoint(folder: Path, target_folder: Path, layers: int = 5, block_size: int = 16,
                             dtype: torch.dtype = torch.bfloat16, seed: int = 1) -> Path:
    """A random DFlash drafter for the target in target_folder, z-lab's shape (its width, `layers` layers:
    5 at Llama-3.1-8B's width is about 1.1 B parameters), written tensor by tensor."""
    import json

    from transformers import AutoConfig

    from ..export.drafter import config_for_target, drafter_parameter_shapes

    folder.mkdir(parents=True, exist_ok=True)
    target = AutoConfig.from_pretrained(target_folder)
    config = config_for_target(target, num_layers=layers, block_size=block_size, mask_token_id=3)  # <|mask|>
    write_safetensors(folder, list(drafter_parameter_shapes(config).items()), dtype, seed)
    cfg = config.to_dict()
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def write_checkpoint(folder: Path, shape: dict, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                     shard_bytes: int = 4 * 1024**3, std: float = 0.02) -> Path:
    """A random Llama checkpoint of any size, written tensor by tensor (never more than one in memory):
    config.json, sharded *.safetensors with their index, and a tokenizer of the shape's vocabulary.
    shape: LlamaConfig fields (vocab_size, hidden_size, intermediate_size, num_hidden_layers, heads...)."""
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(shape["vocab_size"])
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(**{"max_position_embeddings": 131072, "rope_theta": 500000.0, **shape},
                         eos_token_id=eos, bos_token_id=1, pad_token_id=2,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    tensors = [("model.embed_tokens.weight", (v, h))]
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        tensors += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                    (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                    (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                    (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i))]
    tensors.append(("model.norm.weight", (h,)))
    if not config.tie_word_embeddings:
        tensors.append(("lm_head.weight", (v, h)))
    write_safetensors(folder, tensors, dtype, seed, shard_bytes, std)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


SHAPES = {"tiny": {}, "llama3.1-8b": LLAMA31_8B}


def main(argv=None) -> int:
    """python -m dflash_edge.bench.synthetic OUT --shape tiny|llama3.1-8b: OUT/target and OUT/drafter."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m dflash_edge.bench.synthetic", description=main.__doc__)
    p.add_argument("out")
    p.add_argument("--shape", choices=list(SHAPES), default="tiny")
    p.add_argument("--layers", type=int, default=None, help="target layers (default: the shape's)")
    p.add_argument("--drafter-layers", type=int, default=1)
    p.add_argument("--block-size", type=int, default=16)
    args = p.parse_args(argv)
    out = Path(args.out)
    shape = dict(SHAPES[args.shape])
    full = bool(shape)
    layers = shape.pop("num_hidden_layers", 6)
    layers = args.layers or layers
    if full:  # a 128k-token tokenizer is not needed for speed; ids above the tiny one's are fine
        shape["max_position_embeddings"] = 8192
    save_target(out / "target", "llama", layers=layers, dtype=torch.float16 if full else torch.float32,
                sharp=not full, **shape)
    save_random_drafter(out / "drafter", out / "target", block_size=args.block_size, layers=args.drafter_layers,
                        std=0.02 if full else 0.1, dtype=torch.float16 if full else torch.float32)
    print(f"wrote {out / 'target'} ({args.shape}, {layers} layers) and {out / 'drafter'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
