"""dflash-serve: an OpenAI-compatible HTTP server over one exported folder (standard library only).

POST /v1/chat/completions and /v1/completions (streaming with server-sent events, or not), GET /v1/models
and /health. Requests are decoded one at a time, in arrival order, each with its own state; a bounded
number wait (more get a 503 with Retry-After). A client that disconnects, streamed or not, cancels its
generation. Every response carries the usage counts and, under "dflash", the speculative stats. Bad
requests get a 4xx with an OpenAI-style error body. Binds 127.0.0.1 unless told otherwise, and then
answers only requests addressed to a loopback name and not sent by a web page of another site;
--api-key (or DFLASH_API_KEY) requires a bearer key. SIGTERM and Ctrl-C shut it down cleanly.
"""
from __future__ import annotations

import argparse
import collections
import functools
import hmac
import ipaddress
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import UserError, run_cli
from ..manifest import inside
from .api import DFlashModel, Generation, Result
from .chat import encode_chat, render_chat
from .generate import generate
from .sampling import Sampling
from .tokenizer import StreamDecoder

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
        # A bare holder of .model (the request-parser tests) gets the default settings.
        settings = getattr(server, "settings", None) or Settings()
        model = server.model
        self.chat, self.stream = chat, _field(body, "stream", bool, False)
        options = body.get("stream_options") or {}
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True
        if _field(body, "n", int, 1) != 1:
            raise BadRequest("only n = 1 is supported", "n")
        limit = model.model.max_context
        cap = min(settings.max_tokens_cap, limit - 1)
        # `is None`, not `or`: max_completion_tokens 0 is a bad value, not a missing one.
        self.max_tokens = _field(body, "max_completion_tokens", int, None)
        if self.max_tokens is None:
            self.max_tokens = _field(body, "max_tokens", int, min(256, cap))
        if not 1 <= self.max_tokens <= cap:
            raise BadRequest(f"max_tokens must be between 1 and {cap} (the server's cap), got {self.max_tokens}",
                             "max_tokens")
        self.sampling = Sampling(
            temperature=float(_field(body, "temperature", (int, float), 0.0)),
            top_p=float(_field(body, "top_p", (int, float), 1.0)),
            top_k=_field(body, "top_k", int, 0),
            seed=_field(body, "seed", int, None))
        try:
            self.sampling.check()
        except UserError as e:
            raise BadRequest(str(e)) from None
        where = "messages" if chat else "prompt"
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise BadRequest("'messages' must be a non-empty list", "messages")
            for m in messages:
                if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                    raise BadRequest("each message needs a string 'role' and a string 'content'", "messages")
            self.prompt = [{"role": m["role"], "content": m["content"]} for m in messages]
            text = "".join(m["content"] for m in messages)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise BadRequest("'prompt' must be a string", "prompt")
            self.prompt = text = prompt
        # No tokenizer makes fewer than one token of 32 characters: longer text cannot fit, so it is refused
        # before tokenizing it costs anything (a 1 MB body is about 500k tokens).
        if len(text) > 32 * limit:
            raise BadRequest(f"the prompt has {len(text)} characters: more than the model's context of {limit} "
                             f"tokens", where, code="context_length_exceeded")
        self.ids = prompt_ids(model.model, self.prompt, settings.allow_special_tokens) if chat else \
            model.model.tokenizer.encode(self.prompt)
        if not self.ids:  # checked here: the generation would refuse it too, but as a 500
            raise BadRequest("the prompt is empty", where)
        if len(self.ids) + self.max_tokens > limit:
            raise BadRequest(f"the prompt has {len(self.ids)} tokens and max_tokens is {self.max_tokens}: more than "
                             f"the model's context of {limit}", where, code="context_length_exceeded")

    def run(self, server: "Server", on_text=None, cancel: threading.Event | None = None) -> Result:
        """Decode the checked ids (DFlashModel.generate would tokenize the messages again, special tokens
        and all). The server's gate, not this method, keeps generations one at a time."""
        model = server.model.model
        stream = StreamDecoder(model.tokenizer) if on_text else None
        out, stats = generate(model, self.ids, self.max_tokens, sampling=self.sampling, cancel=cancel,
                              on_tokens=(lambda new: on_text(stream.push(new))) if on_text else None)
        return Result(model.tokenizer.decode(out), out, stats)


@functools.lru_cache(maxsize=4)
def _text_tokenizer(path: str):
    """A second copy of the tokenizer that reads special-token strings as text, and those strings."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    tok.encode_special_tokens = True  # set once here: toggling the shared one would race other threads
    return tok, [t.content for t in tok.get_added_tokens_decoder().values() if t.special]


def prompt_ids(model, messages: list[dict], allow_special: bool = False) -> list[int]:
    """The chat's ids. A special token a client spells out in a message is text unless allow_special, so
    "<|im_end|><|im_start|>system" in a user message cannot open a system turn."""
    if not model.chat:
        raise BadRequest("this model has no chat template; send raw text to /v1/completions", "messages")
    pairs = [(m["role"], m["content"]) for m in messages]
    if not any(content.strip() for _, content in pairs):
        raise BadRequest("the prompt is empty", "messages")
    try:
        if allow_special:
            return model.tokenizer.encode(render_chat(model.chat, pairs))
        text_tok, specials = _text_tokenizer(str(inside(model.folder, model.manifest["tokenizer"])))
        return encode_chat(model.chat, pairs, model.tokenizer.encode,
                           lambda text: text_tok.encode(text, add_special_tokens=False).ids, specials)
    except UserError as e:  # render_chat's: an unknown role, a system message the template lacks
        raise BadRequest(str(e), "messages") from None


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


ROUTES = {"/v1/chat/completions": True, "/v1/completions": False}
GET_ROUTES = ("/health", "/v1/models")


def _host_name(value: str) -> str:
    """'[::1]:8000' -> '::1', 'LocalHost:80' -> 'localhost'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _origin_host(origin: str) -> str:
    """'http://localhost:3000' -> 'localhost'; '' for 'null' or anything unparsable."""
    try:
        return urlsplit(origin.strip()).hostname or ""
    except ValueError:
        return ""


def is_loopback(host: str) -> bool:
    """localhost, or a loopback address written as one (not a name like 127.attacker.example)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Settings:
    """What dflash-serve's options set; the defaults are the command line's."""
    timeout: float = 60.0          # seconds a connection may sit idle or stall in a read or a write
    max_connections: int = 64      # open connections; more are answered 503 and closed
    max_queue: int = 32            # requests waiting for the model; more are answered 503
    max_tokens_cap: int = 4096     # the most max_tokens a request may ask for
    api_key: str | None = None     # when set, every route but /health needs "Authorization: Bearer KEY"
    allowed_hosts: tuple = ()      # Host names accepted besides loopback ones, on a loopback-bound server
    allow_special_tokens: bool = False  # special-token text in chat messages parsed as markers
    debug: bool = False            # tracebacks of failed generations on stderr


class Busy(Exception):
    """The wait queue is full."""


class Gate:
    """One generation at a time; up to max_waiting more wait, served in arrival order (a Lock is not FIFO)."""

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._waiting: collections.deque = collections.deque()
        self._busy = False

    def enter(self, gone=lambda: False) -> bool:
        """Wait for the model. Raises Busy when the queue is full; False when gone() says the client left."""
        with self._cond:
            if self._busy and len(self._waiting) >= self.max_waiting:
                raise Busy
            me = object()
            self._waiting.append(me)
            while self._busy or self._waiting[0] is not me:
                self._cond.wait(0.5)
                if gone():  # a client that hung up while queued costs nothing, not even a prefill
                    self._waiting.remove(me)
                    self._cond.notify_all()
                    return False
            self._waiting.popleft()
            self._busy = True
            return True

    def leave(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()


class Handler(BaseHTTPRequestHandler):
    server: "Server"
    protocol_version = "HTTP/1.1"

    def setup(self):
        # Before StreamRequestHandler.setup, which applies it: no read or write waits longer than this, so
        # a half-sent request, an idle keep-alive or a client that stops reading frees its thread.
        self.timeout = self.server.settings.timeout
        super().setup()

    def log_message(self, fmt, *args):  # one line per request, on stderr, unless --quiet
        if not self.server.quiet:  # escaped: a request line must not write terminal control sequences
            sys.stderr.write(f"{self.address_string()} {(fmt % args).translate(self._control_char_table)}\n")

    def send_json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client left: nothing to tell it, nothing worth a traceback
            self.close_connection = True

    def send_error_json(self, e: BadRequest, headers: dict | None = None) -> None:
        # Closed after every error: a body left unread must not be parsed as the next request.
        self.close_connection = True
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        self.send_json(e.status, {"error": {"message": str(e), "type": kind, "param": e.param, "code": e.code}},
                       {"Connection": "close", **(headers or {})})

    def refused(self, auth: bool = True) -> bool:
        """Sends a 403/401 and returns True unless the request may go on.

        Browsers let any web page send requests to 127.0.0.1. A loopback server therefore accepts only a
        loopback Host (a DNS-rebinding page sends its own name) and no Origin but a loopback one (a
        cross-site page sends its own), and, with an API key, only requests that carry it."""
        settings = self.server.settings
        host = self.headers.get("Host")
        if self.server.loopback and host is not None:
            name = _host_name(host)
            if not (is_loopback(name) or name in settings.allowed_hosts):
                self.send_error_json(BadRequest("this server answers only to its loopback address "
                                                "(--allowed-host adds names)", status=403))
                return True
        origin = self.headers.get("Origin")
        if origin is not None and not is_loopback(_origin_host(origin)):
            self.send_error_json(BadRequest("cross-site requests are refused", status=403))
            return True
        if auth and settings.api_key is not None:
            got = (self.headers.get("Authorization") or "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(got, f"Bearer {settings.api_key}".encode()):
                self.send_error_json(BadRequest("a valid API key is required: Authorization: Bearer KEY",
                                                status=401), {"WWW-Authenticate": "Bearer"})
                return True
        return False

    def do_GET(self):
        if self.refused(auth=self.path != "/health"):  # a health check needs no key, as in llama-server
            return
        if self.path == "/health":
            self.send_json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [
                {"id": self.server.model_id, "object": "model", "created": self.server.started, "owned_by": "dflash-edge"}]})
        elif self.path in ROUTES:
            self.send_error_json(BadRequest("this route takes POST", status=405), {"Allow": "POST"})
        else:
            self.send_error_json(BadRequest("no such route", status=404))

    def read_body(self) -> bytes | None:
        """The body, or None after refusing it. Only a plain Content-Length of ASCII digits is taken:
        int() would also take "-1" (read to EOF, past MAX_BODY), "+5" and non-ASCII digits."""
        if "Transfer-Encoding" in self.headers:
            self.send_error_json(BadRequest("chunked bodies are not supported; send a Content-Length", status=411))
            return None
        values = {v.strip(" \t") for v in self.headers.get_all("Content-Length") or []}
        if not values:
            self.send_error_json(BadRequest("a Content-Length header is required", status=411))
            return None
        length = values.pop()
        if values or not (length.isascii() and length.isdigit()):
            self.send_error_json(BadRequest("Content-Length must be one non-negative integer"))
            return None
        if int(length) > MAX_BODY:
            self.send_error_json(BadRequest(f"the body is {length} bytes; the limit is {MAX_BODY}", status=413))
            return None
        try:
            data = self.rfile.read(int(length))
        except OSError:  # timed out half way: nobody to answer
            data = b""
        if len(data) < int(length):
            self.close_connection = True
            return None
        return data

    def client_gone(self) -> bool:
        """True once the client has closed its side: the socket reads as EOF without blocking."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def do_POST(self):
        if self.refused():
            return
        if self.path in GET_ROUTES:
            self.send_error_json(BadRequest("this route takes GET", status=405), {"Allow": "GET"})
            return
        if self.path not in ROUTES:
            self.send_error_json(BadRequest("no such route", status=404))
            return
        data = self.read_body()
        if data is None:
            return
        try:
            body = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, a 5,000-digit number, [[[[... nesting
            why = str(e) if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)) else "nested too deeply " \
                "or a number too long"
            self.send_error_json(BadRequest(f"the body is not valid JSON: {why}"))
            return
        try:
            request = Request(self.server, body, chat=ROUTES[self.path])
        except BadRequest as e:
            self.send_error_json(e)
            return
        gate = self.server.gate
        try:
            if not gate.enter(self.client_gone):
                self.close_connection = True
                return
        except Busy:
            self.send_error_json(BadRequest(f"the server is busy ({gate.max_waiting} requests are waiting); retry "
                                            f"later", status=503, code="server_busy"), {"Retry-After": "2"})
            return
        try:
            # On a worker thread: the gate is left when the generation ends, whatever the socket does, and
            # this thread is free to write pieces (or watch for a hang-up) without holding the model.
            generation = Generation(lambda on_text, cancel: self.server.run(
                request, on_text if request.stream else None, cancel), on_done=lambda result, error: gate.leave())
        except BaseException:
            gate.leave()
            raise
        if request.stream:
            self.stream(request, generation)
            return
        while True:
            try:
                result = generation.result(timeout=0.2)  # returns as soon as it ends
                break
            except TimeoutError:
                if self.client_gone():  # nobody will read the reply: stop decoding it
                    generation.cancel()
                    self.close_connection = True
                    return
            except Exception:  # a failure inside the runtime: the client gets a 500, the server lives on
                self.log_failure()
                self.send_error_json(BadRequest("generation failed; the server's log has the details", status=500))
                return
        self.send_json(200, self.completion(request, result))

    def log_failure(self) -> None:
        """The details of a failed generation go to the server's log, never to the client."""
        kind, error, _ = sys.exc_info()
        if self.server.settings.debug:
            traceback.print_exc()
        else:
            sys.stderr.write(f"generation failed: {kind.__name__}: {str(error).splitlines()[0] if str(error) else ''}\n")

    def completion(self, request: Request, result: Result) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": result.text},
                   "finish_reason": finish_reason(result), "logprobs": None} if request.chat else
                  {"index": 0, "text": result.text, "finish_reason": finish_reason(result), "logprobs": None})
        return {"id": f"{'chatcmpl' if request.chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if request.chat else "text_completion",
                "created": int(time.time()), "model": self.server.model_id, "choices": [choice],
                "usage": usage(result), "dflash": speculative(result)}

    def stream(self, request: Request, generation: Generation) -> None:
        ident = f"{'chatcmpl' if request.chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        self.close_connection = True

        def event(payload) -> None:  # raises OSError once the client is gone or stalls past the timeout
            self.wfile.write(f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode())
            self.wfile.flush()

        def chunk(delta_or_text, finish=None, extra=None) -> dict:
            if request.chat:
                choice = {"index": 0, "delta": delta_or_text, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta_or_text, "finish_reason": finish, "logprobs": None}
            return {"id": ident, "object": "chat.completion.chunk" if request.chat else "text_completion",
                    "created": created, "model": self.server.model_id, "choices": [choice], **(extra or {})}

        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            if request.chat:
                event(chunk({"role": "assistant", "content": ""}))
            try:
                for piece in generation:  # leaving this loop early (an OSError) cancels the generation
                    event(chunk({"content": piece} if request.chat else piece))
                result = generation.result()
            except OSError:
                raise
            except Exception:  # the stream is already a 200: end it with an error event and [DONE]
                self.log_failure()
                event({"error": {"message": "generation failed; the server's log has the details",
                                 "type": "server_error", "param": None, "code": None}})
                event("[DONE]")
                return
            event(chunk({} if request.chat else "", finish_reason(result), {"dflash": speculative(result)}))
            if request.include_usage:
                event({"id": ident, "object": "chat.completion.chunk" if request.chat else "text_completion",
                       "created": created, "model": self.server.model_id, "choices": [], "usage": usage(result)})
            event("[DONE]")
        except OSError:  # the client went away or stopped reading: stop decoding for it
            generation.cancel()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # On Windows SO_REUSEADDR lets a second process bind the same port and take its traffic.
    allow_reuse_address = os.name != "nt"

    def __init__(self, address, model: DFlashModel, model_id: str, quiet: bool = False,
                 settings: Settings | None = None):
        self.settings = settings or Settings()
        # socketserver's backlog is 5: while the accept loop waits for the GIL (a generation holds it), a
        # burst of clients overflowed it and got timeouts or resets instead of an answer or a 503.
        self.request_queue_size = max(self.settings.max_connections, 5)
        super().__init__(address, Handler)
        self.model, self.model_id, self.quiet = model, model_id, quiet
        self.started = int(time.time())
        self.loopback = is_loopback(str(self.server_address[0]))
        self.gate = Gate(self.settings.max_queue)
        self._connections = threading.BoundedSemaphore(self.settings.max_connections)

    def run(self, request: Request, on_text, cancel) -> Result:
        """One generation (tests replace it with a stand-in)."""
        return request.run(self, on_text, cancel)

    def process_request(self, request, client_address):
        # One thread per connection, so connections are capped: past the cap a client gets a 503 at once
        # instead of a thread (and, at the file-descriptor limit, accept() failing in a loop).
        if not self._connections.acquire(blocking=False):
            try:
                request.settimeout(1)
                body = b'{"error": {"message": "too many connections; retry later", "type": "server_error"}}'
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\nConnection: close\r\n"
                                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connections.release()
            raise

    def process_request_thread(self, request, client_address):  # ThreadingMixIn's, releasing the place
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._connections.release()  # before the close: a client that reconnects at once finds it free
            self.shutdown_request(request)


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value
    return parse


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
    d = Settings()
    p.add_argument("--api-key", default=os.environ.get("DFLASH_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: the "
                        "DFLASH_API_KEY environment variable, which, unlike this option, ps does not show)")
    p.add_argument("--max-tokens-cap", type=_positive(int), default=d.max_tokens_cap,
                   help=f"the most max_tokens a request may ask for (default {d.max_tokens_cap})")
    p.add_argument("--max-queue", type=_positive(int), default=d.max_queue,
                   help=f"requests that may wait for the model; more get a 503 with Retry-After "
                        f"(default {d.max_queue})")
    p.add_argument("--max-connections", type=_positive(int), default=d.max_connections,
                   help=f"open connections; more get a 503 (default {d.max_connections})")
    p.add_argument("--timeout", type=_positive(float), default=d.timeout,
                   help=f"seconds a connection may stall in a read or write, or sit idle (default {d.timeout:g})")
    p.add_argument("--allowed-host", action="append", default=[],
                   help="a Host name to accept besides loopback ones when bound to loopback (repeatable)")
    p.add_argument("--allow-special-tokens", action="store_true",
                   help="parse special-token text in chat messages as the tokens themselves (by default it "
                        "is plain text, so a message cannot open a turn of another role)")
    p.add_argument("--quiet", action="store_true", help="no per-request log lines")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0..65535, got {args.port}")
    model = DFlashModel(args.model, args.provider, bool(args.fallback), args.threads)
    model_id = args.model_id or Path(args.model).resolve().name
    settings = Settings(timeout=args.timeout, max_connections=args.max_connections, max_queue=args.max_queue,
                        max_tokens_cap=args.max_tokens_cap, api_key=args.api_key or None,
                        allowed_hosts=tuple(_host_name(h) for h in args.allowed_host),
                        allow_special_tokens=args.allow_special_tokens, debug=args.debug)
    try:
        server = Server((args.host, args.port), model, model_id, args.quiet, settings)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None

    def stop(signum, frame):  # serve_forever runs on this thread: shut it down from another one
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    host, port = server.server_address[:2]
    try:  # from the "serving" line on: a Ctrl-C that came right after it exited 130, "interrupted"
        print(f"serving {model_id} on http://{host}:{port}/v1 (DFlash {'on' if model.model.has_drafter else 'off'})",
              file=sys.stderr, flush=True)
        if not server.loopback and settings.api_key is None:
            print(f"warning: {host} is reachable from other machines and no --api-key (or DFLASH_API_KEY) is set: "
                  f"anyone who can reach it can use it", file=sys.stderr, flush=True)
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
