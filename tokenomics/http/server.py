"""The asyncio + h11 server, requests and responses, and error bodies in each dialect."""

import asyncio
import contextlib
import errno
import http
import json
import math
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import h11

from ..dialects import dialect_family
from ..errors import ProxyError
from ..http.sse import _deadline
from ..util import DEFAULT_MAX_BODY_BYTES, DEFAULT_WRITE_TIMEOUT, HEADER_TIMEOUT, MAX_HEADER_BYTES, log


FD_HEADROOM = 128                       # descriptors kept back from the client-connection cap: listeners,


                                        # journal, ledger, logs, idle upstream pool
OVERLOAD_LOG_INTERVAL = 1.0             # seconds between "connection limit reached" log lines


OVERLOAD_RECLAIM_IDLE = 1.0             # an idle connection this old may be closed to make room; a younger


                                        # one may have its first request in flight
OVERLOAD_LINGER = 1.0                   # seconds a refused connection may drain before it is closed


OVERLOAD_MAX_LINGERING = 128            # refused connections draining that long at once (within the


                                        # descriptors the cap leaves); beyond, OVERLOAD_BRIEF_LINGER
OVERLOAD_BRIEF_LINGER = 0.05            # enough to read a request already sent, so that closing does not


IDLE_TIMEOUT = 75.0                     # keep-alive connections idle longer than this are closed


BODY_TIMEOUT = 60.0                     # seconds to receive a whole request body


@dataclass(slots=True)
class Request:
    """A parsed client request, body included (bodies are bounded by server.max_body_bytes)."""
    method: str
    path: str
    query: str
    raw_headers: list           # [(name bytes as sent, value bytes)]
    headers: dict               # lower-case name -> value (repeated names joined with ", ")
    body: bytes = b""
    client: str = ""


@dataclass(slots=True)
class Response:
    """An answer: `body` whole, or `stream` chunk by chunk; with a stream, `body` holds what of
    it is already at hand, sent in one write with the status line and headers."""
    status: int
    headers: list = field(default_factory=list)     # [(str, str)]
    body: bytes = b""
    stream: "AsyncIterator[bytes] | None" = None


def json_response(status: int, payload: Any, headers: list | None = None) -> Response:
    return Response(status, [("content-type", "application/json")] + (headers or []),
                    json.dumps(payload, separators=(",", ":")).encode("utf-8"))


_OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                       404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
                       413: "invalid_request_error", 429: "rate_limit_error"}


_ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                          404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
                          413: "request_too_large", 429: "rate_limit_error"}


def error_body(family: str, status: int, code: str, message: str) -> dict:
    if family == "anthropic":
        return {"type": "error", "error": {"type": _ANTHROPIC_ERROR_TYPES.get(status, "api_error"),
                                           "message": message, "code": code}}
    return {"error": {"message": message, "type": _OPENAI_ERROR_TYPES.get(status, "server_error"),
                      "code": code, "param": None}}


def error_response(family: str, err: ProxyError) -> Response:
    headers = [("x-tokenomics-error-code", err.code)] + [(k, str(v)) for k, v in err.headers.items()]
    return json_response(err.status, error_body(family, err.status, err.code, err.message), headers)


_REASONS = {s.value: s.phrase.encode("ascii") for s in http.HTTPStatus}


class _ClientGone(Exception):
    """The client closed its connection; nothing more can be sent."""


class _ClientProtocol(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol, which also tells when the client goes away (end of its data,
    or the connection lost): the handler of a request then in progress is cancelled from here,
    so no task has to sit in a read beside every request to find out."""

    def __init__(self, reader: asyncio.StreamReader, connected: Callable, loop):
        super().__init__(reader, connected, loop=loop)
        self.gone = False            # the client has closed its side (or the connection is lost)
        self.waiting: "asyncio.Task | None" = None   # the connection task while it awaits a handler
        self.cancelled = False       # `waiting` was cancelled because the client left

    def _client_left(self) -> None:
        self.gone = True
        task, self.waiting = self.waiting, None
        if task is not None:
            self.cancelled = True
            task.cancel()

    def eof_received(self):
        keep_open = super().eof_received()
        self._client_left()
        return keep_open

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        self._client_left()


def _uncancel(task: asyncio.Task) -> int:
    """Withdraw one cancellation request of `task`; the number still pending (3.10: none kept)."""
    uncancel = getattr(task, "uncancel", None)
    return uncancel() if uncancel is not None else 0


def _fd_limit() -> int:
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 4096
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def default_max_connections() -> int:
    """The client-connection cap when server.max_connections is 0: half of what the
    file-descriptor limit leaves after FD_HEADROOM, since a busy client connection holds an
    upstream connection too. Past the cap new connections get a 503 instead of starving the
    process of descriptors (accept failing, nobody served, a traceback per attempt)."""
    return max(8, (_fd_limit() - FD_HEADROOM) // 2)


def _accept_backlog(max_connections: int) -> int:
    """asyncio accepts up to `backlog` connections in one go, before any of them is looked at:
    that burst must fit in the descriptors the cap and the refused-but-draining leave free."""
    spare = _fd_limit() - FD_HEADROOM - max_connections - OVERLOAD_MAX_LINGERING
    return max(16, min(1024, spare // 2))


def _overloaded_response(family: str) -> bytes:
    """The whole 503 sent to a connection over the cap, without h11: no request is parsed (only
    its request line is peeked at, for the dialect of its path)."""
    body = json.dumps(error_body(family, 503, "overloaded", "the proxy is at its connection limit "
                                 "(server.max_connections); retry in a moment"), separators=(",", ":")).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            b"x-tokenomics-error-code: overloaded\r\nretry-after: 1\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body))


class HTTPServer:
    """asyncio + h11 server: keep-alive, bounded header and body reads, one handler call per
    request, graceful shutdown that lets in-flight requests finish.

    Load: at most `max_connections` client connections; one more gets a 503 `overloaded` and is
    closed, and the longest-idle keep-alive connection is closed to make room (a client
    reconnects at no cost), so a flood of idle connections cannot lock everyone out. A client
    that leaves a response unread for `write_timeout` seconds is cut."""

    def __init__(self, handler: Callable[[Request], Any], max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 header_timeout: float = HEADER_TIMEOUT, idle_timeout: float = IDLE_TIMEOUT,
                 max_connections: int = 1024, write_timeout: float = DEFAULT_WRITE_TIMEOUT):
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.write_timeout = write_timeout
        self._servers: list[asyncio.base_events.Server] = []
        self._open: set[asyncio.Task] = set()
        self._busy: set[asyncio.Task] = set()
        self._idle: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self._idle_since: dict[asyncio.Task, float] = {}  # insertion order: longest idle first
        self._lingering = 0
        self._refused = 0               # refused since the last log line
        self._refused_logged_at = -math.inf
        self._fd_logged_at = -math.inf
        self._closing = False

    async def listen(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None,
                     reuse_port: bool = False):
        loop = asyncio.get_running_loop()
        if loop.get_exception_handler() is None:
            loop.set_exception_handler(self._loop_exception)

        def protocol() -> _ClientProtocol:   # asyncio.start_server's, with the departure hook
            return _ClientProtocol(asyncio.StreamReader(limit=1 << 20, loop=loop), self._connection, loop)
        server = await loop.create_server(protocol, host, port, ssl=ssl_context,
                                          backlog=_accept_backlog(self.max_connections), reuse_address=True,
                                          reuse_port=reuse_port or None)
        self._servers.append(server)
        return server

    async def _read_request(self, conn: h11.Connection, reader, writer) -> Request | None:
        """Next request on the connection, or None when the client closed it cleanly."""
        loop = asyncio.get_running_loop()
        deadline = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if deadline is None and conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                    wait = self.idle_timeout
                else:
                    if deadline is None:
                        deadline = loop.time() + self.header_timeout
                    wait = deadline - loop.time()
                    if wait <= 0:
                        raise ProxyError(408, "request_timeout", "the request headers took too long to arrive")
                try:
                    async with _deadline(wait):
                        data = await reader.read(65536)
                except TimeoutError:
                    if deadline is None:
                        return None  # idle keep-alive connection
                    raise ProxyError(408, "request_timeout", "the request headers took too long to arrive") \
                        from None
                conn.receive_data(data)
                if data and deadline is None:
                    deadline = loop.time() + self.header_timeout
                continue
            if type(event) is h11.Request:
                break
            if type(event) is h11.ConnectionClosed or event is h11.PAUSED:
                return None
            raise h11.RemoteProtocolError("unexpected event before the request", 400)
        raw_headers = event.headers.raw_items()
        headers: dict[str, str] = {}
        for name, value in raw_headers:     # a list: iterating h11's Headers goes item by item in Python
            key = name.lower().decode("latin-1")
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        target = event.target.decode("latin-1")
        path, _, query = target.partition("?")
        request = Request(event.method.decode("ascii"), path, query, raw_headers, headers)
        if "transfer-encoding" in headers and "content-length" in headers:
            # Request smuggling: a server on the way could frame the body by the other header.
            err = ProxyError(400, "invalid_request", "the request has both Content-Length and Transfer-Encoding; "
                                                     "send one of them")
            err.path = path  # (the connection is closed after this answer, as after any framing error)
            raise err
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            err = ProxyError(413, "request_too_large", f"the request body is over the {self.max_body_bytes} "
                                                       "byte limit; send less (server.max_body_bytes)")
            err.path = path
            raise err
        if conn.client_is_waiting_for_100_continue:
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        body, size = [], 0
        body_deadline = loop.time() + BODY_TIMEOUT
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    async with _deadline(max(0.0, body_deadline - loop.time())):
                        data = await reader.read(65536)
                except TimeoutError:
                    raise ProxyError(408, "request_timeout", "the request body took too long to arrive") from None
                conn.receive_data(data)
                continue
            if type(event) is h11.Data:
                size += len(event.data)
                if size > self.max_body_bytes:
                    err = ProxyError(413, "request_too_large", f"the request body is over the "
                                                               f"{self.max_body_bytes} byte limit; send less")
                    err.path = path
                    raise err
                body.append(event.data)
            elif type(event) is h11.EndOfMessage:
                break
            else:
                raise h11.RemoteProtocolError("connection closed mid-body", 400)
        request.body = b"".join(body)
        return request

    def _loop_exception(self, loop, context: dict) -> None:
        """Out of descriptors, asyncio reports every failed accept with a traceback; one line per
        OVERLOAD_LOG_INTERVAL says it all. Anything else goes to asyncio's own handler."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            now = time.monotonic()
            if now - self._fd_logged_at >= OVERLOAD_LOG_INTERVAL:
                self._fd_logged_at = now
                log.warning("out of file descriptors (%s); new connections wait; lower server.max_connections "
                            "or raise the limit (ulimit -n)", exc.strerror or exc)
            return
        loop.default_exception_handler(context)

    async def _refuse(self, reader, writer) -> None:
        """503 to a connection over the cap; logged at most once per OVERLOAD_LOG_INTERVAL."""
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged_at >= OVERLOAD_LOG_INTERVAL:
            log.warning("connection limit reached (server.max_connections = %d): refused %d connection(s) "
                        "with 503 overloaded; raise server.max_connections or the file-descriptor limit "
                        "(ulimit -n)", self.max_connections, self._refused)
            self._refused, self._refused_logged_at = 0, now
        for task, since in self._idle_since.items():  # the longest-idle first
            if now - since >= OVERLOAD_RECLAIM_IDLE and task in self._idle:
                with contextlib.suppress(Exception):
                    self._idle.pop(task).close()
                del self._idle_since[task]
            break
        long = self._lingering < OVERLOAD_MAX_LINGERING
        self._lingering += long
        loop = asyncio.get_running_loop()
        end = loop.time() + (OVERLOAD_LINGER if long else OVERLOAD_BRIEF_LINGER)
        try:
            head = b""
            with contextlib.suppress(Exception):
                async with _deadline(end - loop.time()):
                    while b"\n" not in head and len(head) < 8192:
                        piece = await reader.read(8192)
                        if not piece:
                            break
                        head += piece
            target = head.split(b"\n", 1)[0].split(b" ")
            path = target[1].decode("latin-1").partition("?")[0] if len(target) > 1 else ""
            with contextlib.suppress(Exception):
                writer.write(_overloaded_response(dialect_family(path)))
                writer.write_eof()
                await self._linger(reader, max(0.0, end - loop.time()))
        finally:
            self._lingering -= long
            with contextlib.suppress(Exception):
                writer.close()

    def _not_idle(self, task) -> None:
        self._idle.pop(task, None)
        self._idle_since.pop(task, None)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        task = asyncio.current_task()
        if len(self._open) >= self.max_connections:
            with contextlib.suppress(asyncio.CancelledError):  # shutdown while a refusal lingers
                await self._refuse(reader, writer)
            return
        self._open.add(task)
        peer = writer.get_extra_info("peername")
        client = peer[0] if isinstance(peer, tuple) else "local"
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        try:
            while not self._closing:
                self._idle[task], self._idle_since[task] = writer, time.monotonic()
                try:
                    request = await self._read_request(conn, reader, writer)
                except h11.RemoteProtocolError as exc:
                    self._not_idle(task)
                    status = exc.error_status_hint if 400 <= exc.error_status_hint < 500 else 400
                    await self._send_error(conn, writer, ProxyError(
                        status, "invalid_request", "malformed HTTP request; check the request line and headers"))
                    await self._linger(reader)
                    break
                except ProxyError as exc:
                    self._not_idle(task)
                    await self._send_error(conn, writer, exc, family=dialect_family(
                        getattr(exc, "path", "") or ""))
                    await self._linger(reader)
                    break
                self._not_idle(task)
                if request is None:
                    break
                request.client = client
                self._busy.add(task)
                try:
                    keep = await self._respond(conn, reader, writer, request)
                finally:
                    self._busy.discard(task)
                if not keep or conn.our_state is h11.MUST_CLOSE or self._closing:
                    break
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, _ClientGone):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:  # the connection dies, the server lives
            log.exception("connection handler failed")
        finally:
            self._not_idle(task)
            self._busy.discard(task)
            self._open.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    @staticmethod
    async def _linger(reader, seconds: float = 1.0) -> None:
        """Read and drop what the client is still sending (bounded), so closing the socket does
        not reset the connection before the client has read our error response."""
        with contextlib.suppress(Exception):
            async with _deadline(seconds):
                for _ in range(256):
                    if not await reader.read(65536):
                        break

    async def _send_error(self, conn, writer, err: ProxyError, family: str = "openai") -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        resp = error_response(family, err)
        with contextlib.suppress(Exception):
            await self._write(conn, writer, resp, head_only=False)

    async def _respond(self, conn, reader, writer, request: Request) -> bool:
        """Run the handler, cancelled if the client goes away meanwhile (the protocol tells:
        no task reads beside it); write the response. False: the connection is done."""
        task = asyncio.current_task()
        proto = writer.transport.get_protocol()
        if not isinstance(proto, _ClientProtocol):   # not a connection of listen(): nobody tells
            proto = _ClientProtocol(reader, None, asyncio.get_running_loop())
        proto.cancelled = False
        proto.waiting = task
        if proto.gone:   # left before its request was read: the handler stops at its first wait
            asyncio.get_running_loop().call_soon(proto._client_left)
        try:
            response = await self.handler(request)
        except asyncio.CancelledError:
            if proto.cancelled and not _uncancel(task):
                return False  # the client left: its handler was cancelled, not this connection
            raise
        finally:
            proto.waiting = None
        if proto.cancelled:   # the handler answered although cancelled: the client is gone all the same
            _uncancel(task)
            return False
        await self._write(conn, writer, response, head_only=request.method == "HEAD", gone=proto)
        return not proto.gone

    async def _write(self, conn, writer, response: Response, head_only: bool,
                     gone: "_ClientProtocol | None" = None) -> None:
        headers = [(k, v) for k, v in response.headers if k.lower() not in ("content-length", "transfer-encoding",
                                                                            "connection")]
        if self._closing:
            headers.append(("connection", "close"))
        if response.stream is None:
            headers.append(("content-length", str(len(response.body))))
            out = conn.send(h11.Response(status_code=response.status, headers=headers,
                                         reason=_REASONS.get(response.status, b"")))
            if not head_only and response.body:
                out += conn.send(h11.Data(data=response.body))
            out += conn.send(h11.EndOfMessage())
            writer.write(out)
            await self._drain(writer)
            return
        stream = response.stream
        try:
            out = conn.send(h11.Response(status_code=response.status, headers=headers,
                                         reason=_REASONS.get(response.status, b"")))
            if response.body and not head_only:   # the first bytes leave with the head: one write
                out += conn.send(h11.Data(data=response.body))
            writer.write(out)
            await self._drain(writer)
            try:
                async for chunk in stream:
                    if gone is not None and gone.gone:
                        raise _ClientGone()
                    if chunk:
                        writer.write(conn.send(h11.Data(data=chunk)))
                        await self._drain(writer)
            except ProxyError as err:
                # The status line is out: the only honest signal left is a body cut short.
                log.warning("response to the client cut short: %s (%s)", err.message, err.code)
                raise _ClientGone() from None
            writer.write(conn.send(h11.EndOfMessage()))
            await self._drain(writer)
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def _drain(self, writer) -> None:
        """Wait for the client to take what was written, at most `write_timeout` seconds: a
        client that stops reading must not hold its upstream (and a connection slot) forever.
        Nothing to wait for (the usual case: the socket took it all at once) costs no timer."""
        transport = writer.transport
        if not transport.get_write_buffer_size() and not transport.is_closing():
            return
        try:
            async with _deadline(self.write_timeout):
                await writer.drain()
        except TimeoutError:
            log.info("client stopped reading for %g s (server.write_timeout); connection closed",
                     self.write_timeout)
            writer.transport.abort()
            raise _ClientGone() from None

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, close idle connections, give in-flight requests `grace` seconds."""
        self._closing = True
        for server in self._servers:
            server.close()
        for writer in list(self._idle.values()):
            with contextlib.suppress(Exception):
                writer.close()
        loop = asyncio.get_running_loop()
        end = loop.time() + grace
        while self._busy and loop.time() < end:
            await asyncio.wait(set(self._busy), timeout=min(0.05, max(0.0, end - loop.time())))
        for task in list(self._busy) + list(self._idle):
            task.cancel()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)


_OUTPUT_META_KEYS = frozenset({"type", "role", "id", "object", "status", "index", "finish_reason", "stop_reason",
                               "stop_sequence", "logprobs", "annotations", "system_fingerprint", "service_tier",
                               "model", "created", "created_at", "usage", "signature", "encrypted_content"})


_OUTPUT_WALK_DEPTH = 16  # answers nest a handful of levels; deeper is not model output worth a walk


def output_bytes(value: Any, depth: int = 0) -> int:
    """UTF-8 bytes of model output in `value` (an answer's choices / content / output, or a
    stream event's delta): every string leaf except the protocol's own labels and ids. Generic
    on purpose: text, tool-call arguments, reasoning and refusals are all output the upstream
    produced and charged for, whichever dialect or part type carries them. Bytes rather than
    characters, so that bytes / 4 stays near the token count for CJK text too."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode("utf-8", "replace"))
    if depth >= _OUTPUT_WALK_DEPTH:
        return 0
    if isinstance(value, dict):
        return sum(output_bytes(v, depth + 1) for k, v in value.items() if k not in _OUTPUT_META_KEYS)
    if isinstance(value, list):
        return sum(output_bytes(v, depth + 1) for v in value)
    return 0


def event_output_bytes(payload: dict) -> int:
    """UTF-8 bytes of model output in one upstream stream event: chat and completions
    `choices[].delta` / `choices[].text`, Anthropic and Responses `delta`."""
    total = output_bytes(payload.get("delta"))
    for choice in payload.get("choices") or ():
        if isinstance(choice, dict):
            total += output_bytes(choice.get("delta")) + output_bytes(choice.get("text"))
    return total


def answer_output_bytes(answer: dict) -> int:
    """UTF-8 bytes of model output in a whole (non-stream) answer of any dialect."""
    return sum(output_bytes(answer.get(k)) for k in ("choices", "content", "output"))
