"""dflash-generate: one reply from an exported folder, streamed, with its speed and acceptance."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import UserError, run_cli


def parse_args(argv):
    p = argparse.ArgumentParser(prog="dflash-generate", description=__doc__)
    p.add_argument("prompt", help="the user message ('-' reads it from standard input)")
    p.add_argument("--model", required=True, help="a folder written by dflash-export")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--block-size", type=int, default=None,
                   help="tokens per draft/verify round (default: chosen each round, up to the drafter's "
                        "trained size, from measured costs and acceptance)")
    p.add_argument("--no-draft", action="store_true", help="plain decoding, even if the folder has a drafter")
    p.add_argument("--no-lookup", action="store_true",
                   help="draft with the drafter only: no drafts copied from earlier in the context (the "
                        "per-round choice uses both by default)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 (default) decodes greedily; above it the reply is sampled, still losslessly")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens "
                                                            "whose probabilities add up to this")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=None, help="seed for a reproducible sample")
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--provider", default="cpu", help="cpu, cuda or tensorrt (default: cpu)")
    p.add_argument("--fallback", nargs="?", const="cpu", choices=["cpu"], default=None,
                   help="--fallback cpu: run on CPU if the provider is unavailable or fails to start")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    p.add_argument("--compare", action="store_true",
                   help="then decode the same prompt plainly and report the speed-up and whether the outputs match")
    p.add_argument("--profile", action="store_true",
                   help="print where a round's time goes (draft, verify, host) and the block sizes used")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def read_prompt(arg: str) -> str:
    if arg == "-":
        data = sys.stdin.buffer.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError("the prompt on standard input is not valid UTF-8") from None
    else:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError("the prompt is not valid UTF-8") from None
        text = arg
    if not text.strip():
        raise UserError("the prompt is empty")
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    text = read_prompt(args.prompt)
    if args.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    from .api import DFlashModel

    model = DFlashModel(args.model, args.provider, bool(args.fallback), args.threads, use_drafter=not args.no_draft)
    if args.max_new_tokens >= model.model.max_context:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} exceeds the model's context "
                        f"({model.model.max_context})")
    block = 1 if args.no_draft else args.block_size
    if block is not None:
        model.model.check_block_size(block)
    # Speculative: the drafter's drafts, or (with the per-round choice) ones copied by prompt lookup.
    drafting = block != 1 and (model.model.has_drafter or (block is None and not args.no_lookup))
    if args.compare and not drafting:
        raise UserError("--compare needs drafts: a folder exported with a drafter or prompt lookup, without "
                        "--no-draft or --block-size 1")
    printer = None if args.json else (lambda piece: print(piece, end="", flush=True))
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if args.compare and args.temperature > 0 and args.seed is None:
        sampling["seed"] = 0  # the same draw for both runs, so their outputs can be compared
    result = model.generate(text, args.max_new_tokens, block, system=args.system, raw=args.raw, on_text=printer,
                            lookup=not args.no_lookup, **sampling)
    stats = result.stats
    plain = None
    if args.compare:
        del model  # one model in memory at a time; the plain one runs without the drafter sessions
        plain = DFlashModel(args.model, args.provider, bool(args.fallback), args.threads, use_drafter=False)
        # Warm the fresh session first, as DFlash's start-up cost measurement warmed its own: a session's
        # first calls are slower, and timing them would flatter DFlash.
        plain.generate(text, 2, 1, system=args.system, raw=args.raw, **sampling)
        plain = plain.generate(text, args.max_new_tokens, 1, system=args.system, raw=args.raw, **sampling)
    if args.json:
        out = {"text": result.text, "token_ids": result.token_ids, **stats.as_dict()}
        if plain:
            out["plain"] = {"identical": plain.token_ids == result.token_ids, **plain.stats.as_dict()}
        print(json.dumps(out))
        return 1 if plain and plain.token_ids != result.token_ids else 0
    spec = f", tau {stats.tau:.2f} at block {block or 'auto'}" if drafting else ""
    if stats.lookup_rounds:
        rounds = f"{stats.lookup_rounds} round{'s' * (stats.lookup_rounds > 1)}"
        spec += f" ({stats.lookup_tokens} of the tokens from {rounds} of prompt lookup)"
    print(f"\n[{stats.new_tokens} tokens, {stats.decode_tokens_per_s:.1f} tok/s decode, "
          f"first token {stats.ttft_s * 1000:.0f} ms{spec}, {stats.finish_reason}]", file=sys.stderr)
    if args.profile:
        print(profile(stats), file=sys.stderr)
    if plain:
        speed = plain.stats.decode_tokens_per_s
        ratio = stats.decode_tokens_per_s / speed if speed else float("nan")
        same = "identical output" if plain.token_ids == result.token_ids else "OUTPUT DIFFERS"
        print(f"[plain decoding: {speed:.1f} tok/s; DFlash is {ratio:.2f}x plain, {same}]", file=sys.stderr)
        if plain.token_ids != result.token_ids:
            return 1
    return 0


def profile(stats) -> str:
    """Mean time per round in each part, and the block sizes the rounds used."""
    rounds = max(1, stats.rounds)
    host = max(0.0, stats.decode_s - stats.draft_s - stats.verify_s)
    parts = ", ".join(f"{name} {1000 * t / rounds:.1f} ms ({t / stats.decode_s:.0%})"
                      for name, t in (("draft", stats.draft_s), ("verify", stats.verify_s), ("host", host))
                      ) if stats.decode_s else "no decode rounds"
    blocks = stats.blocks or {stats.block_size: stats.rounds}
    used = ", ".join(f"{b}: {n}" for b, n in sorted(blocks.items()))
    return f"[profile: {stats.rounds} rounds; per round {parts}; rounds per block size {{{used}}}]"


def entry() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
