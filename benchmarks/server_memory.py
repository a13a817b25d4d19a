"""Memory of a running dflash-serve around one long prompt (BENCHMARKS.md section 12).

    python benchmarks/server_memory.py FOLDER --words 7700 [--port 8731]

Starts the server on FOLDER, sends a short completion, then one whose prompt is WORDS words of plain
English (4 new tokens), then five short ones, and prints the server process's resident memory (VmRSS) and
its peak so far (VmHWM) after each step, with the long prompt's token count from the reply's usage.
"""
from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
from pathlib import Path

SERVE = Path(sys.executable).with_name("dflash-serve")


def memory_mb(pid: int) -> dict:
    fields = {}
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(("VmRSS:", "VmHWM:")):
            fields[line.split(":")[0]] = int(line.split()[1]) // 1024
    return {"rss_mb": fields["VmRSS"], "peak_mb": fields["VmHWM"]}


def complete(port: int, prompt: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 4}),
                 {"Content-Type": "application/json"})
    reply = conn.getresponse()
    body = json.loads(reply.read())
    if reply.status != 200:
        raise SystemExit(f"the server answered {reply.status}: {body['error']['message']}")
    return body["usage"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--words", type=int, default=7700, help="words in the long prompt (SmolLM2: 7,700 -> 8,153 tokens)")
    p.add_argument("--port", type=int, default=8731)
    a = p.parse_args()
    server = subprocess.Popen([str(SERVE), "--model", a.folder, "--port", str(a.port), "--quiet"],
                              stderr=subprocess.PIPE)
    try:
        for line in server.stderr:
            if b"serving" in line:
                break
        else:
            raise SystemExit("the server did not start")
        print(json.dumps({"step": "loaded", **memory_mb(server.pid)}))
        complete(a.port, "hello there")
        print(json.dumps({"step": "short prompt", **memory_mb(server.pid)}))
        words = ("the quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat " * 4000).split()
        usage = complete(a.port, " ".join(words[:a.words]))
        print(json.dumps({"step": f"{usage['prompt_tokens']}-token prompt", **memory_mb(server.pid)}))
        for _ in range(5):
            complete(a.port, "hello there")
        print(json.dumps({"step": "five short prompts after it", **memory_mb(server.pid)}))
    finally:
        server.terminate()
        server.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
