"""dflash-train: train a DFlash drafter for a target, on CPU or CUDA, into a z-lab-format checkpoint.

Stages, each cached in the work folder so an interrupted run resumes where it stopped:
  1. sequences: the target answers every prompt (batched); optional plain text is chopped into pieces
  2. features: the frozen target's tap features for every sequence
  3. training: the DFlash objective (state.pt holds the optimizer and step)
  4. the checkpoint: config.json + model.safetensors, ready for dflash-export --drafter
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import UserError, run_cli


def parse_args(argv):
    p = argparse.ArgumentParser(prog="dflash-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="smollm2-135m", help="alias, Hugging Face folder or .gguf (as dflash-export)")
    p.add_argument("--data", default=None, help="jsonl: a \"prompt\" or a \"messages\" list per line, answered "
                                                "by the target in this run")
    p.add_argument("--shards", nargs="+", default=[],
                   help="shard folders of replies the target wrote before (python -m dflash_edge.train.regenerate)")
    p.add_argument("--shard-tokens", type=int, default=None,
                   help="use shard sequences in a random order (--seed) up to this many tokens: a different part "
                        "of the data each run, when a feature pass over all of it would take too long")
    p.add_argument("--init", default=None,
                   help="start from this drafter checkpoint (a z-lab folder, e.g. the shipped one) instead of random "
                        "weights; its layers, block size, mask token and taps are kept")
    p.add_argument("--taps", type=int, nargs="+", default=None,
                   help="target layers the drafter reads (default: z-lab's rule, 5 layers over 1 .. L-3)")
    p.add_argument("--text", nargs="*", default=[], help="plain text files or folders to add (no generation)")
    p.add_argument("--text-tokens", type=int, default=0, help="at most this many plain-text tokens")
    p.add_argument("--output", required=True, help="checkpoint folder to write")
    p.add_argument("--work", default=None, help="cache folder (default: OUTPUT.work)")
    p.add_argument("--draft-layers", type=int, default=1)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--mask-token-id", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=256, help="reply length when regenerating")
    p.add_argument("--regen-batch", type=int, default=64,
                   help="replies generated together (64 is fastest on a 2-core CPU; 128 is no faster)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 regenerates greedily")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--seq-len", type=int, default=512, help="plain-text piece length")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--minutes", type=float, default=None, help="stop training after this many minutes")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--anchors", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=100, help="held-out evaluation and checkpoint interval")
    p.add_argument("--gamma", type=float, default=None, help="loss decay (default: 7 for block 16)")
    p.add_argument("--draft-vocab", type=int, default=None,
                   help="train the softmax over only the K most frequent response tokens (faster on CPU; the "
                        "checkpoint still uses the target's full LM head)")
    p.add_argument("--negatives", type=int, default=4096,
                   help="with --draft-vocab: tokens from outside it sampled into every softmax, so that they do not "
                        "win the argmax at inference, where the full LM head is used")
    p.add_argument("--labels", choices=["text", "target"], default="text",
                   help="what a draft row learns: the sequence's next token (text), or the target's own greedy "
                        "choice there (target: plain text then teaches the target's behaviour, and rows past "
                        "the text's first departure from it are left out)")
    p.add_argument("--soft-targets", type=int, default=0, metavar="K",
                   help="cache the target's K likeliest tokens after every position in the feature pass and train "
                        "each row on that distribution too (--soft-weight of the loss)")
    p.add_argument("--soft-weight", type=float, default=0.5, help="with --soft-targets: the soft term's share")
    p.add_argument("--dpace", type=float, default=None, metavar="ALPHA",
                   help="D-PACE row weights (confidence-propagated, floor ALPHA, e.g. 0.1-0.2) in place of the "
                        "exp(-(k-1)/gamma) decay; --gamma then only sets which rows are computed (weight >= 1%%)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="bf16: the frozen target runs in bf16 and the drafter trains under bf16 autocast (fp32 "
                        "master weights); 2-3x faster on CPUs with AVX512-BF16 or AMX, about 2.5x slower on CPUs "
                        "without them. Default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true")
    return p.parse_args(argv)


def text_files(paths: list[str]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in (".py", ".md", ".rst", ".txt") and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"--text {p} does not exist")
    return files


def slow_bf16_warning(device: str) -> str | None:
    """A CPU without bf16 instructions (AVX512-BF16 or AMX) emulates bf16 matmuls, slower than fp32:
    regeneration on a 2-core AVX2 EPYC ran 34 tok/s in bf16 against 89 in fp32."""
    import torch
    if device != "cpu":
        return None
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not all(probes) or any(probe() for probe in probes):
        return None
    return (f"warning: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no bf16 instructions "
            "(AVX512-BF16 or AMX), so --precision bf16 runs emulated and about 2.5x slower than fp32 here; "
            "drop --precision bf16")


def check_init(config, target_config, args) -> None:
    """--init must fit the target; options that would change its shape must not be given."""
    if config.hidden_size != target_config.hidden_size or config.vocab_size != target_config.vocab_size:
        raise UserError(f"--init {args.init} was made for a target with hidden size {config.hidden_size} and vocab "
                        f"{config.vocab_size}, not {target_config.hidden_size} / {target_config.vocab_size}")
    if args.taps and list(args.taps) != list(config.target_layer_ids):
        raise UserError(f"--init {args.init} reads taps {list(config.target_layer_ids)}; drop --taps")


def forget_stale_caches(work: Path, inputs: dict) -> None:
    """Sequences, features and training state cached for other inputs (more shards since, other taps) are
    made again: the cache folder belongs to one set of inputs."""
    record = work / "inputs.json"
    if not record.is_file():
        return
    try:
        if json.loads(record.read_text()) == inputs:
            return
    except (OSError, ValueError):
        pass  # a torn or unreadable record vouches for nothing: the caches are made again
    print(f"      the inputs changed since {work} was filled: its sequences, features and training state are "
          f"made again")
    for name in ("sequences.jsonl", "features.json", "features.f16", "greedy.i32", "inputs.json", "state.pt"):
        (work / name).unlink(missing_ok=True)


def to_bf16(module) -> None:
    """Parameters only: rotary inverse frequencies stay fp32 (bf16 angles drift by radians at positions in
    the hundreds)."""
    import torch
    for param in module.parameters():
        param.data = param.data.to(torch.bfloat16)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.block_size < 2:
        raise UserError("--block-size must be at least 2")
    for name in ("steps", "draft_layers", "batch", "anchors", "max_new_tokens", "regen_batch"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if args.soft_targets < 0 or not 0 <= args.soft_weight <= 1:
        raise UserError("--soft-targets must be 0 or more and --soft-weight within [0, 1]")
    if args.dpace is not None and not 0 <= args.dpace < 1:
        raise UserError(f"--dpace takes an alpha in [0, 1), got {args.dpace}")
    if not args.data and not args.shards:
        raise UserError("give --data (prompts to answer now) or --shards (replies written before), or both")
    if args.shard_tokens is not None and args.shard_tokens < 1:
        raise UserError(f"--shard-tokens must be at least 1, got {args.shard_tokens}")
    from .data import read_prompts
    from .shards import shard_entries

    # Every input is read before anything is written.
    conversations = read_prompts(Path(args.data))[: args.limit] if args.data else []
    shard_folders = [Path(f) for f in args.shards]
    entries = shard_entries(shard_folders)
    from ..export.drafter import load_drafter
    from ..export.sources import load_hf, resolve_model
    source = resolve_model(args.target)
    init = load_drafter(args.init) if args.init else None
    output = Path(args.output)
    work = Path(args.work or f"{output}.work")
    from .trainer import is_checkpoint
    if output.exists() and not is_checkpoint(output):
        # Only a drafter checkpoint is ever replaced (the one an earlier run wrote), never another folder.
        raise UserError(f"--output {output} exists and is not a drafter checkpoint; name a new folder")
    try:
        work.mkdir(parents=True, exist_ok=True)
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {work} or {output}: {e.strerror}") from None
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: this torch sees no CUDA device")
    from ..export.drafter import config_for_target, default_tap_layer_ids, random_drafter, write_draft_vocab
    from ..export.modeling import load_target_from_hf
    from ..export.pipeline import derive_chat, stop_ids
    from .data import (chat_prompts, label_counts, load_sequences, regenerate, save_sequences, shard_sequences,
                       text_sequences)
    from .features import FeatureStore, compute_features
    from .objective import default_gamma
    from .trainer import (TrainConfig, feature_scale, fold_feature_scale, train, unfold_feature_scale,
                          write_checkpoint)

    t_start = time.perf_counter()
    hf, tokenizer, family = load_hf(source)
    if not 0 <= args.mask_token_id < hf.config.vocab_size:
        raise UserError(f"--mask-token-id {args.mask_token_id} is outside the vocab ({hf.config.vocab_size})")
    if init is not None:
        check_init(init.config, hf.config, args)
    layers = hf.config.num_hidden_layers
    taps = list(init.config.target_layer_ids if init is not None else args.taps or default_tap_layer_ids(layers))
    if not taps or any(not 0 <= t < layers for t in taps):
        raise UserError(f"--taps must name layers 0 .. {layers - 1} of the target, got {taps}")
    shard_seqs = shard_sequences(shard_folders, hf.config.vocab_size, args.shard_tokens, args.seed)
    template_kwargs = {"enable_thinking": False} if family == "qwen3" else {}
    target = load_target_from_hf(hf, taps, qk_norm=family == "qwen3").to(args.device).fuse_attention()
    precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    if precision == "bf16":
        if warning := slow_bf16_warning(args.device):
            print(warning, file=sys.stderr)
        to_bf16(target)

    inputs = {"target": source.describe(), "data": args.data, "limit": args.limit,
              "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
              "text": args.text, "text_tokens": args.text_tokens, "seq_len": args.seq_len,
              "shards": sorted(e["sha256"] for e in entries), "shard_tokens": args.shard_tokens,
              "seed": args.seed if shard_folders else None, "taps": taps}
    forget_stale_caches(work, inputs)
    seq_file = work / "sequences.jsonl"
    if seq_file.is_file():
        seqs = load_sequences(seq_file)
        print(f"[1/4] {len(seqs)} cached sequences in {seq_file}")
    else:
        seqs = []
        if conversations:
            print(f"[1/4] regenerating {len(conversations)} replies with the target (batch {args.regen_batch})")
            chat = derive_chat(tokenizer, family, print)
            stops = set(stop_ids(hf, tokenizer, chat))
            prompts = chat_prompts(tokenizer, conversations, template_kwargs)
            seqs = regenerate(target, prompts, args.max_new_tokens, args.regen_batch, args.device, stops,
                              args.temperature, partial=work / "sequences.partial.jsonl")
        if shard_seqs:
            print(f"[1/4] {len(shard_seqs)} replies from {len(shard_folders)} shard folder(s)")
            seqs += shard_seqs
        if args.text:
            seqs += text_sequences(tokenizer, text_files(args.text), args.seq_len, args.text_tokens)
        save_sequences(seq_file, seqs)
        write_text_atomic(work / "inputs.json", json.dumps(inputs, indent=1) + "\n")
    n_tokens = sum(len(s.tokens) for s in seqs)
    n_supervised = sum(sum(s.loss_mask) for s in seqs)
    print(f"      {len(seqs)} sequences, {n_tokens} tokens, {n_supervised} supervised")

    store = FeatureStore(work) if FeatureStore.exists(work) else None
    if store is not None and (store.has_greedy or args.labels == "text") and store.top_k >= args.soft_targets:
        print(f"[2/4] cached features in {work}")
    else:
        if store is not None:
            print(f"[2/4] the cached features in {work} lack the target's choices or its top "
                  f"{args.soft_targets}; computing them again")
        print(f"[2/4] computing tap features {taps} with the frozen target")
        store = compute_features(target, seqs, work, args.device, top_k=args.soft_targets)
    del target

    if init is not None:
        drafter = init.to(args.device)
    else:
        config = config_for_target(hf.config, num_layers=args.draft_layers, block_size=args.block_size,
                                   mask_token_id=args.mask_token_id, tap_layer_ids=taps)
        drafter = random_drafter(config, seed=args.seed).to(args.device)
    embed = hf.get_input_embeddings().weight.to(args.device)
    head = hf.get_output_embeddings().weight.to(args.device)
    drafter.attach_target(embed, head)
    vocab_subset = ranked = None
    if args.draft_vocab:
        counts = label_counts(seqs, hf.config.vocab_size, store if args.labels == "target" else None)
        ranked = counts.topk(min(args.draft_vocab, hf.config.vocab_size)).indices  # most frequent first
        vocab_subset = ranked.sort().values.to(args.device)
        covered = counts[ranked].sum().item() / max(1, counts.sum().item())
        print(f"      draft vocabulary: {vocab_subset.numel()} tokens cover {covered:.1%} of the labels")
    cfg = TrainConfig(steps=args.steps, minutes=args.minutes, lr=args.lr, batch=args.batch, anchors=args.anchors,
                      gamma=args.gamma or default_gamma(drafter.config.block_size), seed=args.seed, device=args.device,
                      eval_every=args.eval_every, save_every=args.eval_every,
                      bf16=precision == "bf16", negatives=args.negatives, labels=args.labels,
                      soft_weight=args.soft_weight if args.soft_targets else 0.0, dpace_alpha=args.dpace)
    dc = drafter.config
    print(f"[3/4] training a {dc.num_hidden_layers}-layer drafter{' from ' + args.init if init else ''}, block "
          f"{dc.block_size}, {cfg.anchors} anchors per sequence, {cfg.steps} steps on {args.device} ({precision})")
    scale = feature_scale(store)
    if init is not None:
        unfold_feature_scale(drafter, scale)
    result = train(drafter, store, seqs, work, cfg, vocab_subset, feature_scale=scale.to(args.device))
    print(f"[4/4] writing {output}")
    drafter = drafter.cpu().float()
    fold_feature_scale(drafter, scale)
    write_checkpoint(drafter, output)
    if ranked is not None:
        # The exporter can then score only these rows of the LM head (dflash-export --draft-vocab).
        write_draft_vocab(output, ranked.tolist(), covered)
    report = {
        "target": source.describe(), "command": "dflash-train " + " ".join(argv or sys.argv[1:]),
        "sequences": len(seqs), "tokens": n_tokens, "supervised_tokens": n_supervised,
        "steps": result["step"], "minutes": round((time.perf_counter() - t_start) / 60, 1),
        "final": {k: result.get(k) for k in ("loss", "tau_estimate")}, "history": result["history"],
    }
    write_text_atomic(output / "training_report.json", json.dumps(report, indent=1) + "\n")
    print(f"done: loss {result.get('loss', float('nan')):.3f}, held-out tau estimate "
          f"{result.get('tau_estimate', float('nan')):.2f}")
    print(f"export it: dflash-export --model {args.target} --drafter {output}")
    return 0


def entry() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
