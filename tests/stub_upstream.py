"""A scriptable fake LLM provider for end-to-end tests of the tokenomics proxy.

`StubUpstream` is a small HTTP/1.1 server (stdlib only, independent of tokenomics) that answers
the OpenAI Chat Completions / Responses / Completions / Embeddings / Models endpoints and the
Anthropic Messages / count_tokens endpoints in their documented wire formats, streams SSE with
chunked transfer-encoding one event per chunk, records every request, and can be scripted to
fail, stall, hang or cut a stream short.

    with StubUpstream() as stub:
        stub.script(status=503)                   # next request gets a 503, then defaults again
        stub.set_stream_chunks(["ali", "ce@", "exa", "mple.com"])
        ...  # point the proxy at stub.url
        assert stub.last.json["model"] == "gpt-4o-mini"

Usage figures are deterministic: input tokens = ceil(len(request body bytes) / 4) (at least 1),
output tokens = number of whitespace-separated words in the reply text (at least 1).
Every response carries `x-request-id: req_stub_<n>` (n counts requests from 1); Anthropic
paths also carry `request-id` with the same value, as the real API does.

Everything is bounded: hangs and delays wait on the stop event, `stop()` shuts every open
connection down and joins with timeouts, `wait_for()` polls with a deadline.
"""
from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
import http.server
import json
import math
import re
import select
import socket
import struct
import sys
import threading
import time
from typing import Any, Callable, Iterable

__all__ = ["StubUpstream", "Recorded", "DEFAULT_REPLY"]

DEFAULT_REPLY = "Hello from stub, nice to meet you."

# Seconds a connection may sit idle (keep-alive, or a client not reading) before its thread gives up.
_CONNECTION_IDLE_TIMEOUT = 30.0
# Seconds between checks of the stop event / client liveness while delaying or hanging.
_POLL = 0.02
# Seconds stop() waits for the accept loop and for handler threads, each.
_STOP_JOIN_TIMEOUT = 3.0
_EMBEDDING_DIMS = 8

_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
    500: "api_error", 503: "overloaded_error", 529: "overloaded_error",
}
_OPENAI_ERROR_TYPES = {
    400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"), 429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None), 503: ("server_error", None),
}
_WORD_PIECES = re.compile(r"\S+\s*|\s+")


@dataclasses.dataclass(frozen=True)
class Recorded:
    """One request as the stub received it (body already de-chunked)."""
    method: str
    path: str            # without the query string
    query: str           # raw query string, '' if none
    headers: dict        # lower-case name -> value (repeated headers joined with ", ")
    body: bytes
    json: Any            # parsed body, or None when empty / not JSON


@dataclasses.dataclass
class _Script:
    status: int
    body: Any
    headers: dict
    delay: float
    hang: bool
    stream_events: list | None
    event_delay: float
    reply_text: str | None
    close_mid_stream: bool
    path: str | None
    method: str | None
    trailing: bytes = b""     # sent right after a Content-Length body, on a connection kept open
    no_usage: bool = False

    def matches(self, method: str, path: str) -> bool:
        return ((self.path is None or self.path == path)
                and (self.method is None or self.method.upper() == method))


class _ClientGone(Exception):
    """The client closed or reset the connection while we were answering."""


class _Stopping(Exception):
    """The stub is stopping: abandon the request without answering."""


def _split_pieces(text: str) -> list[str]:
    """Split a reply into word-sized stream pieces ("Hello ", "from ", "stub")."""
    pieces = _WORD_PIECES.findall(text)
    return pieces or [text]


def _count_words(text: str) -> int:
    return max(1, len(text.split()))


def _sse(data: Any, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def _to_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value).encode()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    stub: "StubUpstream"

    def handle_error(self, request, client_address):
        # Keep stderr quiet; tests can inspect stub.errors instead.
        self.stub._note_error(repr(sys.exc_info()[1]))


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "StubUpstream/1.0"
    sys_version = ""
    timeout = _CONNECTION_IDLE_TIMEOUT
    disable_nagle_algorithm = True  # each SSE event must leave immediately
    server: _Server

    # -- plumbing -------------------------------------------------------------------------
    def setup(self):
        super().setup()
        self.server.stub._track(self.connection, add=True)

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass
        self.server.stub._track(self.connection, add=False)

    def log_message(self, format, *args):  # no stderr noise in test output
        pass

    def do_GET(self):
        self._handle()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = bytearray()
            while True:
                size_line = self.rfile.readline(65537)
                if not size_line:
                    raise _ClientGone()
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _client_gone(self) -> bool:
        """True if the peer has closed/reset the connection (EOF pending on our side)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _pause(self, seconds: float | None) -> None:
        """Wait `seconds` (None: until stop) unless the stub stops or the client leaves."""
        stub = self.server.stub
        deadline = None if seconds is None else time.monotonic() + seconds
        while True:
            if stub._stopping.is_set():
                raise _Stopping()
            remaining = _POLL if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return
            if self._client_gone():
                raise _ClientGone()
            stub._stopping.wait(min(_POLL, remaining))

    def _reset_connection(self) -> None:
        """Abort the TCP connection with an RST (SO_LINGER 0), as a crashed upstream would."""
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass
        self.close_connection = True

    def _start_response(self, status: int, headers: dict, n: int, anthropic: bool) -> None:
        self.send_response(status)
        sent = {k.lower() for k in headers}
        if "x-request-id" not in sent:
            self.send_header("x-request-id", f"req_stub_{n}")
        if anthropic and "request-id" not in sent:
            self.send_header("request-id", f"req_stub_{n}")
        for name, value in headers.items():
            self.send_header(name, str(value))

    def _send_full(self, status: int, body: bytes, headers: dict, n: int, anthropic: bool,
                   cut: bool = False, trailing: bytes = b"") -> None:
        headers = dict(headers)
        if not any(k.lower() == "content-type" for k in headers):
            headers["content-type"] = "application/json"
        headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
        headers["content-length"] = str(len(body))
        self._start_response(status, headers, n, anthropic)
        self.end_headers()
        if self.command == "HEAD":
            return
        if cut:
            self.wfile.write(body[: len(body) // 2])
            self._reset_connection()
            return
        self.wfile.write(body + trailing)  # one write: the extra bytes arrive with the body

    def _send_stream(self, status: int, events: list, headers: dict, n: int, anthropic: bool,
                     event_delay: float, cut_after: int | None) -> None:
        """Send `events` one chunk each; `cut_after` events then an RST when set."""
        stub = self.server.stub
        headers = {k: v for k, v in headers.items()
                   if k.lower() not in ("content-length", "transfer-encoding")}
        if not any(k.lower() == "content-type" for k in headers):
            headers["content-type"] = "text/event-stream; charset=utf-8"
        headers.setdefault("cache-control", "no-cache")
        headers["transfer-encoding"] = "chunked"
        try:
            self._start_response(status, headers, n, anthropic)
            self.end_headers()
            for i, event in enumerate(events):
                if cut_after is not None and i >= cut_after:
                    self._reset_connection()
                    return
                if i and event_delay > 0:
                    self._pause(event_delay)
                elif self._client_gone():
                    raise _ClientGone()
                data = _to_bytes(event)
                if data:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    stub._sent_event(n)
            if cut_after is not None:
                self._reset_connection()
                return
            self.wfile.write(b"0\r\n\r\n")
        except (_ClientGone, OSError):
            if not stub._stopping.is_set():
                stub._count("disconnects")
            self.close_connection = True
            raise _Stopping() from None

    # -- request handling -----------------------------------------------------------------
    def _handle(self) -> None:
        stub = self.server.stub
        try:
            body = self._read_body()
        except (_ClientGone, OSError, ValueError):
            self.close_connection = True
            return
        path, _, query = self.path.partition("?")
        headers: dict = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        rec = Recorded(self.command, path, query, headers, body, parsed)
        n, script = stub._arrive(rec)
        anthropic = path.startswith("/v1/messages") or "anthropic-version" in headers
        try:
            self._answer(rec, n, script, anthropic)
        except _Stopping:
            self.close_connection = True
        except _ClientGone:
            stub._count("abandoned")
            self.close_connection = True
        except OSError:
            self.close_connection = True

    def _answer(self, rec: Recorded, n: int, script: _Script | None, anthropic: bool) -> None:
        stub = self.server.stub
        if script is None:
            script = _Script(200, None, {}, 0.0, False, None, 0.0, None, False, None, None)
        if script.delay > 0:
            self._pause(script.delay)
        if script.hang:
            self._pause(None)  # returns only by raising: stop or client gone
        if stub._stopping.is_set():
            raise _Stopping()
        headers = dict(script.headers)
        event_delay = script.event_delay if script.event_delay > 0 else stub.event_delay

        if script.stream_events is not None:
            self._send_stream(script.status, list(script.stream_events), headers, n, anthropic,
                              event_delay, len(script.stream_events) if script.close_mid_stream else None)
            return
        if script.body is not None:
            body = script.body
            if isinstance(body, (dict, list)):
                headers.setdefault("content-type", "application/json")
            elif not any(k.lower() == "content-type" for k in headers):
                text = _to_bytes(body).lstrip()
                headers["content-type"] = ("application/json" if text[:1] in (b"{", b"[")
                                           else "text/plain; charset=utf-8")
            self._send_full(script.status, _to_bytes(body), headers, n, anthropic,
                            cut=script.close_mid_stream, trailing=script.trailing)
            return
        if script.status >= 400:
            err = _error_body(script.status, anthropic, n)
            self._send_full(script.status, json.dumps(err).encode(), headers, n, anthropic,
                            cut=script.close_mid_stream)
            return

        text, pieces = stub._reply(script.reply_text)
        if stub.honor_max_tokens and isinstance(rec.json, dict):
            limit = next((v for k in ("max_completion_tokens", "max_tokens", "max_output_tokens")
                          if isinstance(v := rec.json.get(k), int) and v > 0), None)
            if limit is not None and len(pieces) > limit:
                pieces = pieces[:limit]  # one piece is one word, one output token
                text = "".join(pieces)
        answer = _default_answer(rec, n, text, pieces)
        if script.no_usage:
            answer = _without_usage(answer)
        if isinstance(answer, list):  # a stream
            cut = max(1, len(answer) // 2) if script.close_mid_stream else None
            self._send_stream(script.status, answer, headers, n, anthropic, event_delay, cut)
        else:
            self._send_full(script.status, json.dumps(answer).encode(), headers, n, anthropic,
                            cut=script.close_mid_stream, trailing=script.trailing)


# -- default answers --------------------------------------------------------------------------

def _error_body(status: int, anthropic: bool, n: int) -> dict:
    message = f"stub upstream scripted HTTP {status}"
    if anthropic:
        kind = _ANTHROPIC_ERROR_TYPES.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message},
                "request_id": f"req_stub_{n}"}
    kind, code = _OPENAI_ERROR_TYPES.get(status, ("server_error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _input_tokens(rec: Recorded) -> int:
    return max(1, math.ceil(len(rec.body) / 4))


def _default_answer(rec: Recorded, n: int, text: str, pieces: list[str]) -> dict | list:
    """The provider-shaped answer for `rec`: a dict (JSON body) or a list of SSE events."""
    req = rec.json if isinstance(rec.json, dict) else {}
    stream = req.get("stream") is True
    now = int(time.time())
    in_tok, out_tok = _input_tokens(rec), _count_words(text)
    path = rec.path.rstrip("/")
    if rec.method == "POST" and path == "/v1/chat/completions":
        return (_chat_stream if stream else _chat)(req, n, now, text, pieces, in_tok, out_tok)
    if rec.method == "POST" and path == "/v1/responses":
        return (_responses_stream if stream else _responses)(req, n, now, text, pieces, in_tok, out_tok)
    if rec.method == "POST" and path == "/v1/messages":
        return (_messages_stream if stream else _messages)(req, n, now, text, pieces, in_tok, out_tok)
    if rec.method == "POST" and path == "/v1/messages/count_tokens":
        return {"input_tokens": in_tok}
    if rec.method == "POST" and path == "/v1/completions":
        return (_completion_stream if stream else _completion)(req, n, now, text, pieces, in_tok, out_tok)
    if rec.method == "POST" and path == "/v1/embeddings":
        return _embeddings(req, in_tok)
    if rec.method == "GET" and path == "/v1/models":
        return _models(now, "anthropic-version" in rec.headers)
    return {"path": rec.path, "method": rec.method}


def _strip_usage(obj: dict) -> dict:
    obj.pop("usage", None)
    for key in ("message", "response"):
        if isinstance(obj.get(key), dict):
            obj[key].pop("usage", None)
    return obj


def _without_usage(answer: dict | list) -> dict | list | None:
    """The answer as an upstream that reports no usage at all would send it (no `usage`
    anywhere; a chat stream without its usage chunk)."""
    if isinstance(answer, dict):
        return _strip_usage(answer)
    events = []
    for raw in answer:
        head, _, data = raw.decode().rstrip("\n").rpartition("data: ")
        if not data.startswith("{"):
            events.append(raw)
            continue
        obj = _strip_usage(json.loads(data))
        if obj.get("choices") == [] or (obj.get("type") == "message_delta" and not obj.get("delta")):
            continue
        events.append(head.encode() + _sse(obj))
    return events


def _chat_usage(in_tok: int, out_tok: int) -> dict:
    return {"prompt_tokens": in_tok, "completion_tokens": out_tok, "total_tokens": in_tok + out_tok,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0}}


def _chat(req, n, now, text, pieces, in_tok, out_tok) -> dict:
    return {
        "id": f"chatcmpl-stub{n}", "object": "chat.completion", "created": now,
        "model": req.get("model", "gpt-4o-mini"),
        "choices": [{"index": 0,
                     "message": {"role": "assistant", "content": text, "refusal": None,
                                 "annotations": []},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": _chat_usage(in_tok, out_tok),
        "service_tier": "default", "system_fingerprint": "fp_stub",
    }


def _chat_stream(req, n, now, text, pieces, in_tok, out_tok) -> list:
    include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
    base = {"id": f"chatcmpl-stub{n}", "object": "chat.completion.chunk", "created": now,
            "model": req.get("model", "gpt-4o-mini"), "service_tier": "default",
            "system_fingerprint": "fp_stub"}

    def chunk(delta: dict, finish: str | None) -> bytes:
        obj = dict(base, choices=[{"index": 0, "delta": delta, "logprobs": None,
                                   "finish_reason": finish}])
        if include_usage:
            obj["usage"] = None  # documented: every chunk but the last carries usage: null
        return _sse(obj)

    events = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
    events += [chunk({"content": piece}, None) for piece in pieces]
    events.append(chunk({}, "stop"))
    if include_usage:
        events.append(_sse(dict(base, choices=[], usage=_chat_usage(in_tok, out_tok))))
    events.append(_sse("[DONE]"))
    return events


def _response_obj(req, n, now, status, output, usage) -> dict:
    return {
        "id": f"resp_stub{n}", "object": "response", "created_at": now, "status": status,
        "background": False, "completed_at": now if status == "completed" else None,
        "error": None, "incomplete_details": None, "instructions": req.get("instructions"),
        "max_output_tokens": req.get("max_output_tokens"), "max_tool_calls": None,
        "model": req.get("model", "gpt-4o-mini"), "output": output,
        "parallel_tool_calls": True, "previous_response_id": req.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None}, "service_tier": "default",
        "store": True, "temperature": 1.0, "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto", "tools": [], "top_logprobs": 0, "top_p": 1.0,
        "truncation": "disabled", "usage": usage, "user": None, "metadata": {},
    }


def _responses_usage(in_tok: int, out_tok: int) -> dict:
    return {"input_tokens": in_tok, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": out_tok, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": in_tok + out_tok}


def _output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(n: int, status: str, content: list) -> dict:
    return {"id": f"msg_stub{n}", "type": "message", "status": status, "role": "assistant",
            "content": content}


def _responses(req, n, now, text, pieces, in_tok, out_tok) -> dict:
    return _response_obj(req, n, now, "completed",
                         [_message_item(n, "completed", [_output_text(text)])],
                         _responses_usage(in_tok, out_tok))


def _responses_stream(req, n, now, text, pieces, in_tok, out_tok) -> list:
    item_id = f"msg_stub{n}"
    seq = iter(range(1 << 30))

    def ev(kind: str, **fields) -> bytes:
        return _sse({"type": kind, "sequence_number": next(seq), **fields}, event=kind)

    loc = {"item_id": item_id, "output_index": 0, "content_index": 0}
    pending = _response_obj(req, n, now, "in_progress", [], None)
    events = [ev("response.created", response=pending),
              ev("response.in_progress", response=pending),
              ev("response.output_item.added", output_index=0,
                 item=_message_item(n, "in_progress", [])),
              ev("response.content_part.added", part=_output_text(""), **loc)]
    events += [ev("response.output_text.delta", delta=piece, logprobs=[], **loc) for piece in pieces]
    events += [ev("response.output_text.done", text=text, logprobs=[], **loc),
               ev("response.content_part.done", part=_output_text(text), **loc),
               ev("response.output_item.done", output_index=0,
                  item=_message_item(n, "completed", [_output_text(text)])),
               ev("response.completed", response=_responses(req, n, now, text, pieces, in_tok, out_tok))]
    return events


def _anthropic_usage(in_tok: int, out_tok: int) -> dict:
    return {"input_tokens": in_tok, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
            "output_tokens": out_tok, "service_tier": "standard"}


def _messages(req, n, now, text, pieces, in_tok, out_tok) -> dict:
    return {"id": f"msg_stub{n}", "type": "message", "role": "assistant",
            "model": req.get("model", "claude-sonnet-4-5"),
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn", "stop_sequence": None,
            "usage": _anthropic_usage(in_tok, out_tok)}


def _messages_stream(req, n, now, text, pieces, in_tok, out_tok) -> list:
    start = dict(_messages(req, n, now, text, pieces, in_tok, 1), content=[], stop_reason=None)
    events = [_sse({"type": "message_start", "message": start}, "message_start"),
              _sse({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}, "content_block_start"),
              _sse({"type": "ping"}, "ping")]
    events += [_sse({"type": "content_block_delta", "index": 0,
                     "delta": {"type": "text_delta", "text": piece}}, "content_block_delta")
               for piece in pieces]
    events += [_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
               _sse({"type": "message_delta",
                     "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                     "usage": {"output_tokens": out_tok}}, "message_delta"),
               _sse({"type": "message_stop"}, "message_stop")]
    return events


def _completion(req, n, now, text, pieces, in_tok, out_tok) -> dict:
    return {"id": f"cmpl-stub{n}", "object": "text_completion", "created": now,
            "model": req.get("model", "gpt-3.5-turbo-instruct"),
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": in_tok, "completion_tokens": out_tok,
                      "total_tokens": in_tok + out_tok}}


def _completion_stream(req, n, now, text, pieces, in_tok, out_tok) -> list:
    full = _completion(req, n, now, text, pieces, in_tok, out_tok)
    base = {k: full[k] for k in ("id", "object", "created", "model")}
    events = [_sse(dict(base, choices=[{"text": piece, "index": 0, "logprobs": None,
                                        "finish_reason": None}])) for piece in pieces]
    events.append(_sse(dict(base, choices=[{"text": "", "index": 0, "logprobs": None,
                                            "finish_reason": "stop"}])))
    if (req.get("stream_options") or {}).get("include_usage"):
        events.append(_sse(dict(base, choices=[], usage=full["usage"])))
    events.append(_sse("[DONE]"))
    return events


def _embed(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round((b - 127.5) / 127.5, 6) for b in digest[:_EMBEDDING_DIMS]]


def _embeddings(req, in_tok) -> dict:
    inputs = req.get("input", "")
    if not isinstance(inputs, list) or (inputs and isinstance(inputs[0], int)):
        inputs = [inputs]
    data = []
    for i, item in enumerate(inputs):
        vec = _embed(item if isinstance(item, str) else json.dumps(item))
        if req.get("encoding_format") == "base64":  # the openai SDK asks for this by default
            value: Any = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        else:
            value = vec
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": req.get("model", "text-embedding-3-small"),
            "usage": {"prompt_tokens": in_tok, "total_tokens": in_tok}}


def _models(now: int, anthropic: bool) -> dict:
    if anthropic:
        ids = ["claude-sonnet-4-5", "claude-haiku-4-5"]
        return {"data": [{"type": "model", "id": i, "display_name": i,
                          "created_at": "2025-01-01T00:00:00Z", "lifecycle": "active"} for i in ids],
                "has_more": False, "first_id": ids[0], "last_id": ids[-1]}
    ids = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
    return {"object": "list",
            "data": [{"id": i, "object": "model", "created": now, "owned_by": "stub"} for i in ids]}


# -- the server -------------------------------------------------------------------------------

class StubUpstream:
    """A fake LLM provider on 127.0.0.1:<free port>, run in a background thread.

    Attributes: `url`, `requests` (list of Recorded, append-only; copy via `requests[:]`),
    `disconnects` (streams whose client left before the end), `abandoned` (requests whose client
    left while the stub was still delaying/hanging), `events_sent` (stream events written),
    `errors` (unexpected handler exceptions),
    `event_delay` (default seconds between stream events, 0).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._host, self._port = host, port
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._scripts: collections.deque[_Script] = collections.deque()
        self._conns: set = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._n = 0
        self._reply_text: str | None = None
        self._stream_chunks: list[str] | None = None
        self.requests: list[Recorded] = []
        self.disconnects = 0
        self.abandoned = 0
        self.events_sent = 0  # stream events written to clients (all requests)
        self.sent_by_request: dict[int, int] = {}  # request number (from 1) -> stream events written
        self.errors: list[str] = []
        self.event_delay = 0.0
        self.honor_max_tokens = False  # cut the reply to the request's output limit, as providers do
        self.url = ""

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "StubUpstream":
        if self._server is not None:
            raise RuntimeError("StubUpstream already started")
        server = _Server((self._host, self._port), _Handler)
        server.stub = self
        self._server = server
        host, port = server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"stub-upstream-{port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: release hangs, close every connection, join threads (bounded)."""
        server, thread = self._server, self._thread
        if server is None or self._stopping.is_set():
            return
        self._stopping.set()
        # serve_forever's loop only accepts and spawns threads, so shutdown() returns within
        # one poll interval; run it aside anyway so stop() can never block past its timeout.
        closer = threading.Thread(target=server.shutdown, daemon=True)
        closer.start()
        closer.join(_STOP_JOIN_TIMEOUT)
        if thread is not None:
            thread.join(_STOP_JOIN_TIMEOUT)
        try:
            server.server_close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + _STOP_JOIN_TIMEOUT
        while time.monotonic() < deadline:
            with self._lock:
                if not self._conns:
                    break
            time.sleep(_POLL)

    def __enter__(self) -> "StubUpstream":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- scripting --------------------------------------------------------------------------
    def script(self, status: int = 200, body: bytes | dict | list | str | None = None,
               headers: dict | None = None, delay: float = 0.0, hang: bool = False,
               stream_events: Iterable[str | bytes] | None = None, event_delay: float = 0.0,
               reply_text: str | None = None, close_mid_stream: bool = False,
               path: str | None = None, method: str | None = None, times: int = 1,
               trailing: bytes = b"", no_usage: bool = False) -> None:
        """Queue an override for the next `times` requests matching `path`/`method` (None: any).

        Precedence when answering: `stream_events` (raw SSE chunks, sent as given) > `body`
        (sent as given with `status`) > status >= 400 (a provider-shaped error body) > the
        default answer (with `reply_text` if given). `close_mid_stream` sends part of the
        answer (half the default events, all of `stream_events`, half a body) then an RST.
        `trailing` (misbehaviour) is written right after a Content-Length body, beyond its
        length, and the connection is kept open: e.g. a whole second HTTP response.
        `no_usage` sends the default answer without any usage figures (as some upstreams do).
        Other misbehaviours need no mode of their own: a redirect or a key echoed back is
        `status`/`headers`/`body`; a gzip bomb is `body` with `content-encoding: gzip`; a
        boundary-less SSE event is one `stream_events` item without a blank line.
        """
        entry = _Script(status, body, dict(headers or {}), float(delay), bool(hang),
                        None if stream_events is None else list(stream_events), float(event_delay),
                        reply_text, bool(close_mid_stream), path, method, bytes(trailing), bool(no_usage))
        with self._lock:
            for _ in range(max(1, times)):
                self._scripts.append(dataclasses.replace(entry))

    def set_reply_text(self, text: str | None) -> None:
        """Persistently set the default reply (streamed in word-sized pieces); None restores."""
        with self._lock:
            self._reply_text, self._stream_chunks = text, None

    def set_stream_chunks(self, chunks: list[str] | None) -> None:
        """Persistently stream exactly these pieces (the reply is their concatenation)."""
        with self._lock:
            self._stream_chunks = None if chunks is None else [str(c) for c in chunks]
            self._reply_text = None

    @property
    def pending_scripts(self) -> int:
        with self._lock:
            return len(self._scripts)

    # -- inspection -------------------------------------------------------------------------
    @property
    def last(self) -> Recorded | None:
        with self._lock:
            return self.requests[-1] if self.requests else None

    def clear(self) -> None:
        """Forget recorded requests and reset the counters (scripts and reply settings stay)."""
        with self._lock:
            self.requests.clear()
            self.disconnects = 0
            self.abandoned = 0
            self.events_sent = 0
            self.sent_by_request.clear()
            self.errors.clear()

    def reset(self) -> None:
        """clear(), and drop pending scripts and reply/stream settings."""
        self.clear()
        with self._lock:
            self._scripts.clear()
            self._reply_text = self._stream_chunks = None
            self.event_delay = 0.0

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0,
                 interval: float = 0.01) -> Any:
        """Poll `predicate()` until truthy (returned) or `timeout` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)

    # -- called from handler threads ----------------------------------------------------------
    def _arrive(self, rec: Recorded) -> tuple[int, _Script | None]:
        with self._lock:
            self._n += 1
            self.requests.append(rec)
            for i, entry in enumerate(self._scripts):
                if entry.matches(rec.method, rec.path):
                    del self._scripts[i]
                    return self._n, entry
            return self._n, None

    def _reply(self, override: str | None) -> tuple[str, list[str]]:
        with self._lock:
            if override is not None:
                return override, _split_pieces(override)
            if self._stream_chunks is not None:
                return "".join(self._stream_chunks), list(self._stream_chunks)
            text = self._reply_text if self._reply_text is not None else DEFAULT_REPLY
            return text, _split_pieces(text)

    def _sent_event(self, n: int) -> None:
        with self._lock:
            self.events_sent += 1
            self.sent_by_request[n] = self.sent_by_request.get(n, 0) + 1

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def _note_error(self, text: str) -> None:
        with self._lock:
            self.errors.append(text)

    def _track(self, conn, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)
