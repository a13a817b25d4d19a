"""A streaming terminal chat on an exported folder, with the Python API.

    python samples/chat_cli.py exports/smollm2-135m [--temperature 0.7]

Type a message and press Enter; the reply streams as it is decoded. Ctrl-C while a reply streams stops
that reply; Ctrl-C (or Ctrl-D) at the prompt quits. /reset forgets the conversation.
"""
import argparse
import sys

from dflash_edge.errors import UserError
from dflash_edge.runtime import load


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a folder written by dflash-export")
    p.add_argument("--system", default="You are a helpful assistant.")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0)
    args = p.parse_args()
    try:
        model = load(args.model)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    history = [{"role": "system", "content": args.system}]
    while True:
        try:
            text = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if text == "/reset":
            history = history[:1]
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        stream = model.stream(history, args.max_new_tokens, temperature=args.temperature)
        try:
            for piece in stream:
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            stream.cancel()
        result = stream.result()
        s = result.stats
        print(f"\n[{s.new_tokens} tokens, {s.decode_tokens_per_s:.1f} tok/s, tau {s.tau:.2f}, {s.finish_reason}]")
        history.append({"role": "assistant", "content": result.text})


if __name__ == "__main__":
    sys.exit(main())
