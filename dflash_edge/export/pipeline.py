"""dflash-export, step by step: resolve, load, trace, share weights, validate, write the folder.

The folder is built under a temporary name next to the output and renamed into place only once the
manifest is written, so an interrupted export never leaves a folder a runtime would accept.
"""
from __future__ import annotations

import errno
import glob
import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..errors import UserError
from ..manifest import MANIFEST_NAME, write_manifest
from .devices import apply_preset
from .drafter import (DRAFT_VOCAB_FILE, DrafterConfig, default_tap_layer_ids, drafter_parameter_shapes, load_drafter,
                      read_draft_vocab, read_drafter_config)
from .budget import Shape, check_fits, estimate
from .modeling import DecoderSpec, load_target_from_hf
from .quantize import QUANTIZE, ROUNDS_ACTIVATIONS
from .sources import load_hf, open_weights, read_hf, resolve_drafter, resolve_model, streams
from .validate import validate_target
from .validate_layers import FIRST_LAYERS, check_drafter_first_layer, check_first_layers, check_structure

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 2e-2}
# ONNX Runtime's CPU provider has no bf16 kernels: a bf16 graph is for CUDA and TensorRT, and is checked here
# through the same trace at fp32.
RUNS_ON_CPU = ("fp32", "fp16")
# Streamed exports of targets up to this size are validated whole, in memory (about 12 bytes a parameter);
# larger ones on their first layers (validate_layers.py). --validate overrides.
FULL_VALIDATION_MAX_PARAMS = 400e6
VALIDATIONS = ("auto", "full", "layers")
# A quantized graph against the fp32 module is reported, not judged: on random inputs the rounding error
# says little (SmolLM2 int4: 80-150 % of the largest output, yet fluent replies), so only a non-finite
# output fails. The trace itself is checked at fp32 before quantizing.
QUANT_TOLERANCE = float("inf")
# Graph variants: "ort" for ONNX Runtime's CPU and CUDA providers (int8 and int4 as the contrib MatMulNBits,
# int8-tokens as MatMulInteger); "tensorrt" with standard ONNX ops only (int4 as block-quantized
# DequantizeLinear), which TensorRT takes whole instead of leaving contrib ops to other providers.
VARIANTS = ("ort", "tensorrt")


class ValidationFailed(Exception):
    """The exported graphs disagree with PyTorch beyond tolerance."""


class Progress:
    def __init__(self, total: int, log=print):
        self.total, self.step, self.log, self.t = total, 0, log, time.perf_counter()

    def __call__(self, what: str) -> None:
        now = time.perf_counter()
        if self.step:
            self.log(f"      done in {now - self.t:.1f} s")
        self.step += 1
        self.t = now
        self.log(f"[{self.step}/{self.total}] {what}")

    def finish(self) -> None:
        self.log(f"      done in {time.perf_counter() - self.t:.1f} s")


def parse_layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UserError(f"--layers takes comma-separated layer ids like 1,8,15,22,29; got {text!r}") from None
    if not ids:
        raise UserError("--layers is empty")
    return ids


def check_fit(c: DrafterConfig, config, tap_ids: list[int]) -> None:
    """Refuse a drafter built for another target, naming the mismatch."""
    problems = []
    if c.hidden_size != config.hidden_size:
        problems.append(f"hidden size {c.hidden_size} vs the target's {config.hidden_size}")
    if c.vocab_size != config.vocab_size:
        problems.append(f"vocab {c.vocab_size} vs the target's {config.vocab_size}")
    if not 0 <= c.mask_token_id < config.vocab_size:
        problems.append(f"mask token id {c.mask_token_id} outside the target's vocab ({config.vocab_size})")
    bad = [i for i in c.target_layer_ids if not 0 <= i < config.num_hidden_layers]
    if bad:
        problems.append(f"tap layer ids {bad} outside the target's {config.num_hidden_layers} layers")
    if c.block_size < 2:
        problems.append(f"block size {c.block_size} (needs at least 2)")
    if tap_ids != c.target_layer_ids:
        problems.append(f"--layers {tap_ids} differs from the drafter's target_layer_ids {c.target_layer_ids}")
    if problems:
        raise UserError("the drafter does not fit this target: " + "; ".join(problems))


def stop_ids(hf_model, tokenizer, chat: dict | None, generation=None) -> list[int]:
    """The model's end-of-turn ids: generation config eos, plus the token closing an assistant turn.
    hf_model: a transformers model, or its config when `generation` (its generation config) is given.

    The tokenizer's own eos is not trusted: SmolLM2's GGUF reports <|im_start|> there.
    """
    ids = set()
    configs = (generation, hf_model) if generation is not None else (hf_model.generation_config, hf_model.config)
    for cfg in configs:
        eos = getattr(cfg, "eos_token_id", None)
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
            break
    if chat:
        closing = tokenizer(chat["assistant"][1], add_special_tokens=False).input_ids
        if closing and closing[0] in tokenizer.all_special_ids:
            ids.add(closing[0])
    return sorted(ids)


def derive_chat(tokenizer, family: str, log) -> dict | None:
    from .chat_format import derive

    if not getattr(tokenizer, "chat_template", None):
        log("      note: no chat template; dflash-generate will need --raw")
        return None
    # The released Qwen3 DFlash drafters were trained with thinking off.
    kwargs = {"enable_thinking": False} if family == "qwen3" else {}
    try:
        return derive(tokenizer, kwargs)
    except Exception as e:
        log(f"      note: chat template not representable without Jinja ({e}); use --raw prompts")
        return None


def check_options(dtype: str, variant: str, quantize: str | None, validate: str = "auto") -> None:
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be fp32, fp16 or bf16, got {dtype!r}")
    if validate not in VALIDATIONS:
        raise UserError(f"--validate must be one of {', '.join(VALIDATIONS)}, got {validate!r}")
    if quantize and dtype == "bf16":
        raise UserError("--quantize starts from fp32 (ONNX Runtime) or fp16 (TensorRT) weights; drop --dtype bf16")
    if variant not in VARIANTS:
        raise UserError(f"--variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if quantize is not None and quantize not in QUANTIZE:
        raise UserError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    if quantize and dtype != "fp32" and variant == "ort":
        raise UserError("--quantize for ONNX Runtime's providers starts from fp32 weights; drop --dtype fp16 "
                        "(--variant tensorrt takes fp16)")
    if quantize in ROUNDS_ACTIVATIONS and variant == "tensorrt":
        raise UserError("--variant tensorrt quantizes to int4 only (block-quantized weights); use --quantize int4")


def export(model: str, output: str | None, dtype: str | None = None, layers: str | None = None,
           drafter: str | None = None, force: bool = False, log=print, draft_vocab: int | None = None,
           quantize: str | None = None, variant: str | None = None, device: str | None = None,
           validate: str = "auto") -> Path:
    """draft_vocab: rows of the LM head the drafter scores: None = its draft_vocab.json if it has one,
    0 = the whole head, N = the N most frequent of its draft_vocab.json. quantize: int8, int8-tokens or
    int4 weights in the target graph (export/quantize.py). variant: one of VARIANTS (default ort). device:
    a preset (export/devices.py) that fills in dtype, variant and quantize where they are not given.
    validate: auto, full (the whole model against PyTorch, in memory) or layers (the first layers,
    validate_layers.py); auto is full up to FULL_VALIDATION_MAX_PARAMS."""
    check_options(*apply_preset(device, dtype, variant, quantize, target_params=0)[:3], validate)  # before loading
    source = resolve_model(model)
    if drafter is None and source.shipped_drafter is not None:
        drafter = str(source.shipped_drafter)
        log(f"using the drafter shipped for {model} ({drafter}); --no-drafter exports the target alone")
    drafter_path = resolve_drafter(drafter, source) if drafter else None
    drafter_config = read_drafter_config(drafter_path) if drafter_path else None
    if draft_vocab and not drafter_config:
        raise UserError("--draft-vocab needs a drafter")
    tap_ids = parse_layers(layers)
    out = Path(output or Path("exports") / Path(model).stem).expanduser().resolve()
    restore_killed_replacement(out, log)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    if out.exists():
        check_replaceable(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to {out.parent}: {e.strerror}") from None
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"cannot write to {out.parent}")

    config, tokenizer, family, generation = read_hf(source, log)
    shape = Shape.of(config)
    dtype, variant, quantize, note = apply_preset(device, dtype, variant, quantize, target_params=shape.params())
    check_options(dtype, variant, quantize, validate)
    if note:
        log(f"      {note}")
    # int8-tokens moves activation outliers into the weights from a calibration run of the whole model.
    streamed = streams(source) and quantize != "int8-tokens"
    if not streamed and dtype == "bf16":
        raise UserError("--dtype bf16 streams the weights from a safetensors folder or a GGUF file; "
                        f"{source.describe()} is not one" + (" (int8-tokens loads the whole model)" if quantize else ""))
    if validate == "auto":
        validate = "full" if not streamed or shape.params() <= FULL_VALIDATION_MAX_PARAMS else "layers"
    elif validate == "layers" and not streamed:
        raise UserError("--validate layers needs a streamed export (a safetensors folder or a GGUF file, "
                        "not int8-tokens)")
    if dtype not in RUNS_ON_CPU:
        validate = "layers"
        log(f"      note: {dtype} graphs run on CUDA and TensorRT; ONNX Runtime's CPU provider has no {dtype} "
            f"kernels (fp32, int8-tokens and int4 run fast there), so the trace is validated at fp32")
    drafter_shapes = drafter_parameter_shapes(drafter_config) if drafter_config else {}
    drafter_params = sum(math.prod(s) for s in drafter_shapes.values())
    # Drafters stream too; one is validated whole in memory when small and when the CPU runs the dtype,
    # else on its first layer.
    drafter_check = "full" if drafter_params <= FULL_VALIDATION_MAX_PARAMS and dtype in RUNS_ON_CPU else "layer"
    first_layer = sum(math.prod(s) for name, s in drafter_shapes.items()
                      if not name.startswith("layers.") or name.startswith("layers.0."))
    need = estimate(shape, dtype, quantize, streamed, FIRST_LAYERS if validate == "layers" else 0, drafter_params,
                    drafter_params if drafter_check == "full" else first_layer)
    check_fits(need, out, "--quantize int4 or safetensors weights (streamed) lower it" if not streamed else
               "--validate layers lowers it" if validate == "full" else "export on a machine with more memory")
    if tap_ids is None:
        tap_ids = drafter_config.target_layer_ids if drafter_config else default_tap_layer_ids(
            config.num_hidden_layers)
    bad = [i for i in tap_ids if not 0 <= i < config.num_hidden_layers]
    if bad:
        raise UserError(f"--layers {bad} outside the target's {config.num_hidden_layers} layers (0-based)")
    vocab_ids = None
    if drafter_config:
        check_fit(drafter_config, config, tap_ids)
        vocab_ids = pick_draft_vocab(drafter_path, config.vocab_size, draft_vocab, log)
    chat = derive_chat(tokenizer, family, log)
    stops = stop_ids(config, tokenizer, chat, generation)

    remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    steps = Progress((4 if streamed else 5) + (1 if drafter_config else 0), log)
    try:
        options = Options(dtype, quantize, variant, validate, streamed, tap_ids, vocab_ids, drafter_path, drafter_check)
        manifest = _build(tmp, source, config, tokenizer, generation, family, drafter_config, chat, stops, options,
                          steps, log)
        steps.finish()
        write_manifest(tmp, manifest)
        if out.exists():
            check_replaceable(out)  # again: the folder may have been filled while the export ran
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise UserError(f"the disk under {out.parent} filled up during the export (it needs about "
                            f"{need.disk / 1e9:.1f} GB); nothing was written") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_replaceable(out: Path) -> None:
    """--force replaces an earlier export, or an empty folder; anything else is refused, since replacing
    deletes it (a mistyped --output could name a home folder)."""
    if not out.is_dir():
        raise UserError(f"{out} is not a folder; --force replaces only an earlier export")
    if (out / MANIFEST_NAME).is_file():
        return
    if any(out.iterdir()):
        raise UserError(f"{out} is not a dflash-edge export (no {MANIFEST_NAME}) and not empty; --force "
                        "replaces only an earlier export, so nothing was deleted: choose another --output")


def _dead(pid_text: str) -> bool:
    """Whether the process named in a temporary folder's name is gone (not a number: not ours)."""
    if not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # another user's live process
    return False


def restore_killed_replacement(out: Path, log) -> None:
    """Put back the export a killed --force left aside: replacing renames `out` to .NAME.old-PID, then the
    new folder into place, so a kill between the two leaves no `out`, only the old one under its aside
    name. Only a folder whose process is gone and that holds a manifest is touched."""
    if out.exists():
        return
    aside = [p for p in out.parent.glob(f".{glob.escape(out.name)}.old-*")
             if _dead(p.name.rsplit("-", 1)[-1]) and (p / MANIFEST_NAME).is_file()]
    if not aside:
        return
    # Several can exist (one killed after its second rename leaves its old folder beside a whole `out`,
    # which a later kill can then set aside too); a rename sets ctime, so the newest ctime is the last.
    latest = max(aside, key=lambda p: p.stat().st_ctime)
    try:
        latest.rename(out)
    except OSError as e:
        raise UserError(f"{out} is missing and an interrupted export left it as {latest}, which cannot be "
                        f"renamed back ({e.strerror}); rename it yourself") from None
    log(f"      restored {out} from {latest.name}, which an interrupted export had set aside")


def remove_stale_partials(out: Path) -> None:
    """Delete what killed exports to `out` left behind (their process is gone): unfinished folders, and
    an earlier export set aside by a --force whose new folder is already in place (deleting it was the
    last thing that export had left to do; restore_killed_replacement has run, so `out` holds one)."""
    for stale in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
        if _dead(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    if (out / MANIFEST_NAME).is_file():
        for aside in out.parent.glob(f".{glob.escape(out.name)}.old-*"):
            if _dead(aside.name.rsplit("-", 1)[-1]):
                shutil.rmtree(aside, ignore_errors=True)


def pick_draft_vocab(drafter_path: Path, vocab_size: int, wanted: int | None, log) -> list[int] | None:
    ranked = read_draft_vocab(drafter_path, vocab_size)
    if wanted == 0 or (wanted is None and ranked is None):
        return None
    if ranked is None:
        raise UserError(f"--draft-vocab {wanted}: {drafter_path} has no {DRAFT_VOCAB_FILE} "
                        f"(dflash-train --draft-vocab writes one); pass --draft-vocab 0 for the whole LM head")
    if wanted is not None and wanted > len(ranked):
        raise UserError(f"--draft-vocab {wanted} exceeds the {len(ranked)} tokens of {drafter_path / DRAFT_VOCAB_FILE}")
    ids = ranked[:wanted] if wanted else ranked
    log(f"      the drafter scores {len(ids)} of {vocab_size} tokens ({DRAFT_VOCAB_FILE}; --draft-vocab 0 for all)")
    return ids


@dataclass
class Options:
    dtype: str
    quantize: str | None
    variant: str
    validate: str             # full or layers
    streamed: bool
    tap_ids: list[int]
    vocab_ids: list[int] | None
    drafter_path: Path | None = None
    drafter_validate: str = "full"  # full (loaded whole) or layer (its first layer, validate_layers.py)


def _build(tmp: Path, source, config, tokenizer, generation, family: str, drafter_config, chat, stops,
           o: Options, steps, log) -> dict:
    from . import trace
    from .shared import share_weights
    from .streaming_drafter import export_drafter_streamed
    from .validate import Report, check_standard_ops, validate_drafter

    report = Report(TOLERANCE[o.dtype])
    if o.streamed:
        target_io, target = _stream_target(tmp, source, config, family, o, report, steps, log)
    else:
        target_io, target = _trace_target(tmp, source, config, tokenizer, family, o, report, steps, log)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    graphs = ["target.onnx"]
    # What the drafter's block graph reads of the target's (a reduced draft vocabulary has its own head rows).
    shared_names = ["embed_tokens.weight"] + ([] if tied or o.vocab_ids else ["lm_head.weight"])
    drafter_entry = weights = None
    if drafter_config:
        c = drafter_config
        steps(f"tracing the drafter without weights, streaming them ({c.num_hidden_layers} layers, "
              f"block {c.block_size})")
        weights = _drafter_weights(o.drafter_path, open_weights(source, config, family), target, tied)
        with _bar("drafter weights") as progress:
            io = export_drafter_streamed(c, weights, DTYPES[o.dtype], tmp, o.vocab_ids, progress)
        graphs.append("drafter_block.onnx")
        drafter_entry = {
            "block_size": c.block_size, "mask_token_id": c.mask_token_id,
            "target_layer_ids": c.target_layer_ids, "num_layers": c.num_hidden_layers,
            "num_kv_heads": c.num_key_value_heads, "head_dim": c.head_dim,
            "context_graph": "drafter_context.onnx", "block_graph": "drafter_block.onnx",
            "io": io, "config": "drafter/config.json",
            "draft_vocab_size": len(o.vocab_ids) if o.vocab_ids else config.vocab_size,
        }
        (tmp / "drafter").mkdir()
        (tmp / "drafter" / "config.json").write_text(json.dumps(c.to_dict(), indent=2) + "\n")

    steps("sharing the embedding and LM head between graphs")
    # Only the drafter's graph names them so: the target's trace calls them target.embed_tokens.weight
    # (BufferedTarget's attribute) and keeps its own copy, which a decode step reads 5 % faster than the
    # shared, memory-mapped one (SmolLM2 on 2 AVX2 cores, side by side in both orders).
    shared = share_weights(tmp, graphs, shared_names) if drafter_config else None

    spec = DecoderSpec.from_hf_config(config, qk_norm=family == "qwen3")
    manifest = {
        "target": {
            "architecture": family, "source": source.describe(), "hub_repo": source.hub_repo,
            "dtype": o.dtype, "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "num_layers": config.num_hidden_layers, "num_kv_heads": spec.num_kv_heads,
            "head_dim": spec.head_dim, "max_context": int(config.max_position_embeddings),
            "tap_layer_ids": o.tap_ids, "graph": "target.onnx", "quantization": o.quantize, **target_io,
        },
        "variant": o.variant,
        "shared_weights": shared,
        "drafter": drafter_entry,
        "tokenizer": "tokenizer.json",
        "chat": chat,
        "stop_token_ids": stops,
    }

    rows = drafter_config.block_size if drafter_config else 16  # the largest verify the runtime runs
    if o.validate == "full":
        steps("validating the graphs against PyTorch (random inputs)")
        if o.quantize:
            validate_target(tmp, manifest, target, report, label=f"target ({o.quantize})",
                            tolerance=QUANT_TOLERANCE, verify_rows=rows)
        else:
            validate_target(tmp, manifest, target, report, verify_rows=rows)
    else:
        steps(f"validating the first {FIRST_LAYERS} layers against PyTorch and the whole graph's structure")
        check_dtype = o.dtype if o.dtype in RUNS_ON_CPU else "fp32"
        check_first_layers(config, open_weights(source, config, family), family, DTYPES[check_dtype],
                           f"first {FIRST_LAYERS} layers ({check_dtype})", o.quantize in ROUNDS_ACTIVATIONS,
                           report, verify_rows=rows)
        check_structure(tmp / "target.onnx", report, "target")
    if drafter_config and o.drafter_validate == "full":
        embed, head = _vocab_matrices(open_weights(source, config, family), target, tied, DTYPES[o.dtype])
        validate_drafter(tmp, manifest, load_drafter(o.drafter_path).to(DTYPES[o.dtype]), embed, head, report,
                         vocab_ids=o.vocab_ids)
    elif drafter_config:
        check_dtype = o.dtype if o.dtype in RUNS_ON_CPU else "fp32"
        check_drafter_first_layer(drafter_config, weights, DTYPES[check_dtype], report)
        for graph in ("drafter_context", "drafter_block"):
            check_structure(tmp / f"{graph}.onnx", report, graph)
    del target, weights
    if o.variant == "tensorrt":
        check_standard_ops(tmp, [manifest["target"]["graph"]] + (
            [drafter_entry["context_graph"], drafter_entry["block_graph"]] if drafter_entry else []), report)
    for line in report.lines():
        log(line)
    if not report.ok:
        raise ValidationFailed("the exported graphs disagree with PyTorch beyond tolerance (see above)")

    steps("writing tokenizer, configs and manifest")
    tokenizer.save_pretrained(tmp)
    if not (tmp / "tokenizer.json").is_file():
        raise UserError(f"{source.describe()} has no fast tokenizer (tokenizer.json); the runtime needs one")
    config.save_pretrained(tmp)
    generation.eos_token_id = stops if len(stops) > 1 else stops[0]
    generation.save_pretrained(tmp)
    import onnx
    import onnxruntime
    import transformers
    manifest["export"] = {
        "dflash_edge": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "opset": trace.OPSET,
        "exporter": "torch.onnx.export(dynamo=True)" + (", weights streamed" if o.streamed else ""),
        "validation": report.as_dict(),
        "validated": ("the whole model against PyTorch on random inputs" if o.validate == "full" else
                      f"the first {FIRST_LAYERS} layers against PyTorch; the whole graph's structure") + (
            "" if not drafter_config else "; the drafter whole" if o.drafter_validate == "full" else
            "; the drafter's first layer and both its graphs' structure"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return manifest


def _trace_target(tmp: Path, source, config, tokenizer, family: str, o: Options, report, steps, log):
    """The target loaded whole through transformers and traced with its weights (GGUF sources, int8-tokens)."""
    from . import trace
    from .validate import check_module

    steps("loading the target with transformers")
    hf_model, _, _ = load_hf(source, lambda *a: None)
    target = load_target_from_hf(hf_model, o.tap_ids, qk_norm=(family == "qwen3"))
    check_module(target, hf_model, report)
    target = target.to(DTYPES[o.dtype])
    if o.quantize == "int8-tokens":
        from .smoothing import ALPHA, calibration_texts, input_peaks, smooth

        texts = calibration_texts(tokenizer)
        smooth(target, input_peaks(hf_model, tokenizer, texts))
        log(f"      moved activation outliers into the weights for int8-tokens (alpha {ALPHA}, {len(texts)} "
            f"calibration texts)")
    del hf_model
    steps(f"tracing target.onnx ({config.num_hidden_layers} layers, {o.dtype}, taps {o.tap_ids})")
    # int8 kinds round activations, so a verify's rows must equal single steps exactly.
    target_io = trace.export_target(target, tmp / "target.onnx", exact_rows=o.quantize in ROUNDS_ACTIVATIONS)
    if o.quantize:
        # Check the trace itself at full precision first; the quantized graph is then held to its own bound.
        validate_target(tmp, {"target": {"graph": "target.onnx", **target_io}}, target, report,
                        label=f"target ({o.dtype})")
        from .quantize import quantize_target
        n = quantize_target(tmp / "target.onnx", o.quantize, standard_ops=o.variant == "tensorrt")
        _log_quantized(n, o, log)
    return target_io, target


def _stream_target(tmp: Path, source, config, family: str, o: Options, report, steps, log):
    """The target traced without weights, its weights streamed from the checkpoint (streaming.py). Returns
    the module too when the whole model is to be validated in memory."""
    from .streaming import export_target_streamed

    steps(f"tracing target.onnx without weights, streaming them ({config.num_hidden_layers} layers, {o.dtype}, "
          f"taps {o.tap_ids})")
    with _bar("weights") as progress:
        target_io = export_target_streamed(config, source.path, o.tap_ids, family == "qwen3", DTYPES[o.dtype],
                                           tmp / "target.onnx", exact_rows=o.quantize in ROUNDS_ACTIVATIONS,
                                           quantize=o.quantize, standard_ops=o.variant == "tensorrt",
                                           source=open_weights(source, config, family), progress=progress)
    n = target_io.pop("quantized")
    if o.quantize:
        _log_quantized(n, o, log)
    if o.validate != "full":
        return target_io, None
    from .validate import check_module

    hf_model, _, _ = load_hf(source, lambda *a: None)
    target = load_target_from_hf(hf_model, o.tap_ids, qk_norm=(family == "qwen3"))
    check_module(target, hf_model, report)
    del hf_model
    if o.quantize:
        # The quantized graph is reported, not judged (QUANT_TOLERANCE); the same trace unquantized is held
        # to the export dtype's tolerance on the first layers.
        check_first_layers(config, open_weights(source, config, family), family, DTYPES[o.dtype],
                           f"first {FIRST_LAYERS} layers ({o.dtype})",
                           o.quantize in ROUNDS_ACTIVATIONS, report, verify_rows=16)
    return target_io, target.to(DTYPES[o.dtype])


def _drafter_weights(drafter_path: Path, target_weights, target, tied: bool):
    """The drafter's checkpoint, and the target's vocabulary matrices: the module's when it was loaded,
    else read from the target's checkpoint (target_weights, sources.open_weights)."""
    from .streaming import SafetensorsSource, TensorSource
    from .streaming_drafter import EMBED, HEAD, DrafterWeights

    if target is not None:
        target_weights = TensorSource({EMBED: target.embed_tokens.weight, HEAD: target.head_weight()})
    return DrafterWeights(SafetensorsSource(drafter_path), target_weights, tied, label=str(drafter_path))


@contextmanager
def _bar(what: str):
    """A tqdm bar for a streamed write; yields the progress callback (done, total)."""
    from tqdm import tqdm

    with tqdm(desc=f"      {what}", unit=" tensors", disable=None, leave=False) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
        yield progress


def _vocab_matrices(weights, target, tied: bool, dtype: torch.dtype):
    """The embedding and LM head for the drafter's check: the module's, or read from the checkpoint."""
    if target is not None:
        return target.embed_tokens.weight, target.head_weight()
    embed = weights.get("model.embed_tokens.weight").to(dtype)
    return embed, embed if tied else weights.get("lm_head.weight").to(dtype)


def _log_quantized(n: int, o: Options, log) -> None:
    if o.quantize == "int8-tokens":
        how = "per-token int8 MatMulInteger, LM head included; embedding and attention stay"
    else:
        how = ("block-quantized DequantizeLinear" if o.variant == "tensorrt" else "MatMulNBits") + \
            "; embedding, LM head and attention stay"
    log(f"      quantized {n} weight products to {o.quantize} ({how} {o.dtype})")
