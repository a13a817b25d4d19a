"""Acceptance length of a drafter on whole prompt sets, fast, by replaying greedy DFlash rounds in torch.

At temperature 0 the rounds of the DFlash loop are fully determined by the target's greedy reply: a round
that starts at position p drafts from the features of positions < p and the token at p, accepts the
drafts that equal the reply, and the next round starts after the bonus token. So one batched greedy
generation plus one forward pass over each reply gives tau for every block size without running the
loop token by token. runtime/generate.py is the loop this replays; dflash-bench measures the same tau
(and the speed) with the exported graphs on a subset.

    python -m dflash_edge.train.acceptance --target smollm2-135m --drafter DIR --dataset humaneval mtbench
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from ..errors import UserError, run_cli


@torch.no_grad()
def replay_rounds(drafter, features: torch.Tensor, tokens: list[int], prompt_len: int, block: int,
                  max_new_tokens: int, stops: set[int], vocab_ids: torch.Tensor | None = None) -> Counter:
    """Tokens committed per round (as GenerationStats.acceptance) for one greedy reply.

    vocab_ids: with a reduced head attached (its rows in this order), the token id of each row."""
    s = len(tokens)
    context = drafter.context_kv(features[None], torch.arange(s)[None])
    reply_end = s  # the reply is tokens[prompt_len:], already cut at max_new_tokens and the stop token
    counts: Counter = Counter()
    out = 1                  # the first reply token comes from prefill
    start = prompt_len       # position of the token the target has not seen yet
    if tokens[prompt_len] in stops:
        return counts
    while out < max_new_tokens and start + 1 < reply_end:
        b = min(block, max_new_tokens - out + 1)
        ids = torch.tensor([tokens[start]] + [drafter.config.mask_token_id] * (b - 1))[None]
        ctx = [c[:, :, :start] for c in context]
        hidden = drafter.block_hidden(drafter.embed(ids), torch.arange(start, start + b)[None], ctx)
        drafts = drafter.logits(hidden[:, 1:]).argmax(-1)[0]
        drafts = (drafts if vocab_ids is None else vocab_ids[drafts]).tolist()
        accepted = 0
        while (accepted < len(drafts) and start + 1 + accepted < reply_end
               and drafts[accepted] == tokens[start + 1 + accepted]):
            accepted += 1
        new = min(accepted + 1, reply_end - start - 1, max_new_tokens - out)
        counts[new] += 1
        out += new
        start += accepted + 1
    return counts


def tau_of(counts: Counter) -> float:
    rounds = sum(counts.values())
    return sum(k * v for k, v in counts.items()) / rounds if rounds else 0.0


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m dflash_edge.train.acceptance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--drafter", required=True, help="z-lab checkpoint folder")
    p.add_argument("--dataset", nargs="+", default=["humaneval", "mtbench"])
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--block-size", type=int, nargs="+", default=[16, 8])
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--draft-vocab", type=int, default=None,
                   help="rows of the LM head the drafter scores, as dflash-export: its draft_vocab.json by "
                        "default (what the exported drafter does), 0 for the whole head")
    p.add_argument("--batch", type=int, default=32, help="greedy generation batch")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--replies", default=None,
                   help="folder that keeps the target's greedy replies (one per target): later runs, with "
                        "other drafters, reuse them instead of generating again")
    p.add_argument("--json", default=None)
    p.add_argument("--debug", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..bench.cli import load_dataset
    from ..export.drafter import load_drafter
    from ..export.modeling import load_target_from_hf
    from ..export.pipeline import derive_chat, pick_draft_vocab, stop_ids
    from ..export.sources import load_hf, resolve_model
    from .data import chat_prompts, regenerate
    from .features import compute_features

    source = resolve_model(args.target)
    hf, tokenizer, family = load_hf(source)
    drafter = load_drafter(args.drafter).float().eval()
    if drafter.config.hidden_size != hf.config.hidden_size:
        raise UserError(f"{args.drafter} was trained for hidden size {drafter.config.hidden_size}, "
                        f"the target has {hf.config.hidden_size}")
    drafter.attach_target(hf.get_input_embeddings().weight.float(), hf.get_output_embeddings().weight.float())
    vocab_ids = pick_draft_vocab(Path(args.drafter), drafter.config.vocab_size, args.draft_vocab,
                                 lambda m: print(m.strip(), file=sys.stderr))
    if vocab_ids is not None:
        # The rows the exported drafter keeps, gathered once: the replay then drafts as it does.
        vocab_ids = torch.tensor(vocab_ids)
        drafter.attach_target(drafter.embed_weight, drafter.head_weight[vocab_ids])
    taps = drafter.config.target_layer_ids
    target = load_target_from_hf(hf, taps, qk_norm=family == "qwen3").eval().fuse_attention()
    chat = derive_chat(tokenizer, family, lambda *a: None)
    stops = set(stop_ids(hf, tokenizer, chat))
    template_kwargs = {"enable_thinking": False} if family == "qwen3" else {}
    report = {"target": source.describe(), "drafter": str(args.drafter), "max_new_tokens": args.max_new_tokens,
              "draft_vocab": None if vocab_ids is None else len(vocab_ids), "datasets": {}}
    for name in args.dataset:
        prompts = load_dataset(name)[: args.limit]
        ids = chat_prompts(tokenizer, [[{"role": "user", "content": p}] for p in prompts], template_kwargs)
        t0 = time.perf_counter()
        kept = None
        if args.replies:
            try:
                Path(args.replies).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"--replies {args.replies}: {e.strerror}") from None
            kept = Path(args.replies) / f"{Path(name).stem}.{args.max_new_tokens}.jsonl"
        seqs = regenerate(target, ids, args.max_new_tokens, args.batch, "cpu", stops,
                          log=lambda m: print(m, file=sys.stderr), partial=kept)
        with tempfile.TemporaryDirectory() as tmp:
            store = compute_features(target, seqs, Path(tmp), "cpu", log=lambda m: None)
            per_block = {}
            for block in args.block_size:
                totals, taus = Counter(), []
                for i, (seq, p) in enumerate(zip(seqs, ids)):
                    counts = replay_rounds(drafter, store[i], seq.tokens, len(p), block, args.max_new_tokens,
                                           stops, vocab_ids)
                    totals += counts
                    if counts:
                        taus.append(tau_of(counts))
                per_block[str(block)] = {"tau_mean": statistics.mean(taus), "tau_pooled": tau_of(totals),
                                         "acceptance_histogram": {str(k): totals[k] for k in sorted(totals)}}
                print(f"{name}: block {block}: tau {per_block[str(block)]['tau_mean']:.3f} (mean of "
                      f"{len(taus)} prompts), pooled {tau_of(totals):.3f}", flush=True)
            del store
        report["datasets"][name] = {"prompts": len(prompts), "reply_tokens": sum(sum(s.loss_mask) for s in seqs),
                                    "seconds": round(time.perf_counter() - t0, 1), "blocks": per_block}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def entry() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
