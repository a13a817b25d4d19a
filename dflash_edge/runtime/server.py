"""dflash-serve: an OpenAI-compatible HTTP server over one exported folder (standard library only).

POST /v1/chat/completions and /v1/completions (streaming with server-sent events, or not), GET /v1/models
and /health. Requests are decoded one at a time (the model's lock queues the rest), each with its own
state; a client that disconnects mid-stream cancels its generation. Every response carries the usage
counts and, under "dflash", the speculative stats. Bad requests get a 4xx with an OpenAI-style error
body. Binds 127.0.0.1 unless told otherwise; SIGTERM and Ctrl-C shut it down cleanly.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..errors import UserError, run_cli
from .api import DFlashModel, Result
from .sampling import Sampling

MAX_BODY = 1 << 20  # bytes; a request body above this is refused (413)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def _field(body: dict, name: str, kind, default=None, check=None):
    value = body.get(name, default)
    if value is None:
        return default
    # bool is an int in Python; JSON true is not a number here.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise BadRequest(f"'{name}' must be {getattr(kind, '__name__', 'a number')}", name)
    if check and not check(value):
        raise BadRequest(f"'{name}' is out of range: {value!r}", name)
    return value


class Request:
    """A chat or text completion request, checked against the model before any decoding starts."""

    def __init__(self, server: "Server", body: dict, chat: bool):
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        model = server.model
        self.chat, self.stream = chat, _field(body, "stream", bool, False)
        options = body.get("stream_options") or {}
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True
        if _field(body, "n", int, 1) != 1:
            raise BadRequest("only n = 1 is supported", "n")
        limit = model.model.max_context
        self.max_tokens = _field(body, "max_completion_tokens", int, None) or _field(body, "max_tokens", int, 256)
        if not 1 <= self.max_tokens < limit:
            raise BadRequest(f"max_tokens must be between 1 and {limit - 1}, got {self.max_tokens}", "max_tokens")
        self.sampling = Sampling(
            temperature=float(_field(body, "temperature", (int, float), 0.0)),
            top_p=float(_field(body, "top_p", (int, float), 1.0)),
            top_k=_field(body, "top_k", int, 0),
            seed=_field(body, "seed", int, None))
        try:
            self.sampling.check()
        except UserError as e:
            raise BadRequest(str(e)) from None
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise BadRequest("'messages' must be a non-empty list", "messages")
            for m in messages:
                if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                    raise BadRequest("each message needs a string 'role' and a string 'content'", "messages")
            self.prompt = [{"role": m["role"], "content": m["content"]} for m in messages]
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise BadRequest("'prompt' must be a string", "prompt")
            self.prompt = prompt
        try:
            self.ids = model.prompt_ids(self.prompt, raw=not chat)
        except UserError as e:
            raise BadRequest(str(e), "messages" if chat else "prompt") from None
        if len(self.ids) + self.max_tokens > limit:
            raise BadRequest(f"the prompt has {len(self.ids)} tokens and max_tokens is {self.max_tokens}: more than "
                             f"the model's context of {limit}", "messages" if chat else "prompt",
                             code="context_length_exceeded")

    def run(self, server: "Server", on_text=None, cancel: threading.Event | None = None) -> Result:
        s = self.sampling
        return server.model.generate(self.prompt, self.max_tokens, raw=not self.chat, on_text=on_text,
                                     cancel=cancel, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                     seed=s.seed)


def usage(result: Result) -> dict:
    n = result.stats.new_tokens
    return {"prompt_tokens": result.stats.prompt_tokens, "completion_tokens": n,
            "total_tokens": result.stats.prompt_tokens + n}


def speculative(result: Result) -> dict:
    d = result.stats.as_dict()
    return {k: d[k] for k in ("tau", "rounds", "block_size", "block_histogram", "acceptance_histogram",
                              "lookup_rounds", "lookup_tokens", "decode_tokens_per_s", "ttft_s")}


def finish_reason(result: Result) -> str:
    return "length" if result.stats.finish_reason == "length" else "stop"


class Handler(BaseHTTPRequestHandler):
    server: "Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # one line per request, on stderr, unless --quiet
        if not self.server.quiet:
            sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    def send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, e: BadRequest) -> None:
        self.send_json(e.status, {"error": {"message": str(e), "type": "invalid_request_error", "param": e.param,
                                            "code": e.code}})

    def do_GET(self):
        if self.path == "/health":
            self.send_json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [
                {"id": self.server.model_id, "object": "model", "created": self.server.started, "owned_by": "dflash-edge"}]})
        else:
            self.send_error_json(BadRequest(f"no route {self.path}", status=404))

    def do_POST(self):
        routes = {"/v1/chat/completions": True, "/v1/completions": False}
        if self.path not in routes:
            self.send_error_json(BadRequest(f"no route {self.path}", status=404))
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.send_error_json(BadRequest("a Content-Length header is required", status=411))
            return
        if length > MAX_BODY:
            self.send_error_json(BadRequest(f"the body is {length} bytes; the limit is {MAX_BODY}", status=413))
            self.close_connection = True
            return
        try:
            body = json.loads(self.rfile.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            self.send_error_json(BadRequest(f"the body is not valid JSON: {e}"))
            return
        try:
            request = Request(self.server, body, chat=routes[self.path])
        except BadRequest as e:
            self.send_error_json(e)
            return
        if request.stream:
            self.stream(request)
            return
        try:
            result = request.run(self.server)
        except Exception as e:  # a failure inside the runtime: the client gets a 500, the server lives on
            self.send_json(500, {"error": {"message": f"generation failed: {e}", "type": "server_error",
                                           "param": None, "code": None}})
            return
        self.send_json(200, self.completion(request, result))

    def completion(self, request: Request, result: Result) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": result.text},
                   "finish_reason": finish_reason(result), "logprobs": None} if request.chat else
                  {"index": 0, "text": result.text, "finish_reason": finish_reason(result), "logprobs": None})
        return {"id": f"{'chatcmpl' if request.chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if request.chat else "text_completion",
                "created": int(time.time()), "model": self.server.model_id, "choices": [choice],
                "usage": usage(result), "dflash": speculative(result)}

    def stream(self, request: Request) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        ident = f"{'chatcmpl' if request.chat else 'cmpl'}-{uuid.uuid4().hex}"
        created, cancel = int(time.time()), threading.Event()

        def event(payload) -> None:
            try:
                self.wfile.write(f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode())
                self.wfile.flush()
            except OSError:  # the client went away: stop decoding for it
                cancel.set()

        def chunk(delta_or_text, finish=None, extra=None) -> dict:
            if request.chat:
                choice = {"index": 0, "delta": delta_or_text, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta_or_text, "finish_reason": finish, "logprobs": None}
            return {"id": ident, "object": "chat.completion.chunk" if request.chat else "text_completion",
                    "created": created, "model": self.server.model_id, "choices": [choice], **(extra or {})}

        if request.chat:
            event(chunk({"role": "assistant", "content": ""}))
        result = request.run(self.server, cancel=cancel,
                             on_text=lambda piece: piece and event(chunk({"content": piece} if request.chat else piece)))
        if cancel.is_set():
            return
        event(chunk({} if request.chat else "", finish_reason(result), {"dflash": speculative(result)}))
        if request.include_usage:
            event({"id": ident, "object": "chat.completion.chunk" if request.chat else "text_completion",
                   "created": created, "model": self.server.model_id, "choices": [], "usage": usage(result)})
        event("[DONE]")


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, model: DFlashModel, model_id: str, quiet: bool = False):
        super().__init__(address, Handler)
        self.model, self.model_id, self.quiet = model, model_id, quiet
        self.started = int(time.time())


def parse_args(argv):
    p = argparse.ArgumentParser(prog="dflash-serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a folder written by dflash-export")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-id", default=None, help="the name clients use (default: the folder's name)")
    p.add_argument("--provider", default="cpu", help="cpu, cuda or tensorrt (default: cpu)")
    p.add_argument("--fallback", nargs="?", const="cpu", choices=["cpu"], default=None,
                   help="--fallback cpu: run on CPU if the provider is unavailable or fails to start")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no per-request log lines")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0..65535, got {args.port}")
    model = DFlashModel(args.model, args.provider, bool(args.fallback), args.threads)
    model_id = args.model_id or Path(args.model).resolve().name
    try:
        server = Server((args.host, args.port), model, model_id, args.quiet)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None

    def stop(signum, frame):  # serve_forever runs on this thread: shut it down from another one
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    host, port = server.server_address[:2]
    print(f"serving {model_id} on http://{host}:{port}/v1 (DFlash {'on' if model.model.has_drafter else 'off'})",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    print("stopped", file=sys.stderr)
    return 0


def entry() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
