"""Talk to dflash-serve with the official openai client, as to any OpenAI-compatible server.

    dflash-serve --model exports/smollm2-135m &          # http://127.0.0.1:8000/v1
    python samples/openai_client.py "Why is the sky blue?"
"""
import argparse
import os

from openai import OpenAI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--max-tokens", type=int, default=200)
    args = p.parse_args()
    # dflash-serve checks a key only when started with --api-key (or DFLASH_API_KEY); pass the same one here.
    client = OpenAI(base_url=args.base_url, api_key=os.environ.get("DFLASH_API_KEY", "not-needed"))
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": args.prompt}],
                                            max_tokens=args.max_tokens, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            print(f"\n[{chunk.usage.completion_tokens} tokens]")
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": args.prompt}],
                                           max_tokens=args.max_tokens)
    stats = reply.model_extra["dflash"]  # dflash-serve's speculative stats ride along with each response
    print(f"[non-streamed: tau {stats['tau']}, {stats['decode_tokens_per_s']} tok/s]")


if __name__ == "__main__":
    main()
