"""The upstream client: h11 over asyncio streams with keep-alive pooling per origin."""

import asyncio
import contextlib
import ssl
import time
import urllib.parse
import zlib
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator, Protocol

import h11

from ..errors import ProxyError, StreamStopped
from ..http.sse import _deadline
from ..util import DEFAULT_MAX_RESPONSE_BYTES, MAX_HEADER_BYTES

INFLATE_STEP_BYTES = 64 * 1024          # decompressed bytes produced per zlib call: a bomb grows by steps
POOL_MAX_IDLE_PER_ORIGIN = 256          # idle keep-alive connections kept per upstream origin: above the
                                        # usual concurrency, or every burst closes some and reconnects
POOL_IDLE_SECONDS = 50.0                # providers close idle connections after ~60 s; stay below
LATE_READ_TURNS = 32                    # event-loop turns a stopped read still takes in what arrives


def _raise_upstream_timeout(seconds: float):
    raise ProxyError(504, "upstream_timeout", f"the upstream did not answer within {seconds:g} s; "
                                              "retry later or raise the policy's timeout")


class _UpstreamConnection:
    """One keep-alive connection to an upstream origin, driven by an h11 client state machine."""
    __slots__ = ("origin", "reader", "writer", "h11", "idle_since", "late_turns")

    def __init__(self, origin, reader, writer):
        self.origin, self.reader, self.writer = origin, reader, writer
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.idle_since = 0.0
        self.late_turns = 0   # event-loop turns taken after a read_until() deadline

    async def next_event(self, timeout: float, stop_at: float | None = None):
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            if stop_at is None:
                async with _deadline(timeout):
                    data = await self.reader.read(65536)
            else:
                data = await self._arrived(min(stop_at, time.monotonic() + timeout))
            self.h11.receive_data(data)

    async def _arrived(self, stop_at: float) -> bytes:
        """The next bytes when reading stops at `stop_at` (time.monotonic()): waited for until
        then; after it, only bytes that have already arrived — the reader's buffer, and what the
        kernel holds, taken in by letting the event loop turn (at most LATE_READ_TURNS times) —
        so that a timer firing on a busy loop cannot throw away what the upstream already sent.
        StreamStopped once nothing more has arrived."""
        left = stop_at - time.monotonic()
        if left > 0:
            with contextlib.suppress(TimeoutError):
                async with _deadline(left):
                    return await self.reader.read(65536)
        for _ in range(2):  # a loop turn resumes this task before it reads the sockets found ready
            if _stream_buffered(self.reader) or self.late_turns >= LATE_READ_TURNS:
                break
            self.late_turns += 1
            await asyncio.sleep(0)
        if _stream_buffered(self.reader):
            return await self.reader.read(65536)  # returns at once: the bytes are there
        raise StreamStopped("the read stopped at its deadline")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


_REDACTED_BYTES = b"[REDACTED]"   # what replaces the injected key in upstream answers


def _partial_suffix(data: bytes, secret: bytes) -> int:
    """Length of the longest tail of `data` that is a proper prefix of `secret` (0 if none)."""
    first = secret[:1]
    i = data.find(first, max(0, len(data) - len(secret) + 1))
    while i != -1:
        if secret.startswith(data[i:]):
            return len(data) - i
        i = data.find(first, i + 1)
    return 0


class _Redactor:
    """Replaces the injected key in a byte stream with [REDACTED], also when the upstream splits it
    across chunks: the tail of a chunk that could begin the key waits for the next chunk. Only
    such a tail waits, so an SSE event (which ends in a newline) is never held back."""
    __slots__ = ("secret", "_tail")

    def __init__(self, secret: bytes):
        self.secret, self._tail = secret, b""

    def feed(self, data: bytes) -> bytes:
        if self._tail:
            data = self._tail + data
        data = data.replace(self.secret, _REDACTED_BYTES)
        keep = _partial_suffix(data, self.secret)
        self._tail = data[len(data) - keep:] if keep else b""
        return data[:len(data) - keep] if keep else data

    def flush(self) -> bytes:
        tail, self._tail = self._tail, b""
        return tail


def _stream_buffered(reader: asyncio.StreamReader) -> bool:
    """Whether bytes wait unread in the stream. StreamReader has no public way to ask; its buffer
    is `_buffer` in every CPython since 3.4 (and under uvloop, which reuses the class)."""
    return bool(getattr(reader, "_buffer", b""))


class UpstreamResponse:
    """Status and headers of an upstream answer; the body is pulled with `read` or `chunks`.
    The connection goes back to the pool only after the body was read to the end.

    Hygiene on the way in: `secret` (the key the proxy injected) is replaced by [REDACTED] in
    the headers and the body; the body is decompressed in bounded steps and may not exceed
    `max_bytes` after decompression (502 `upstream_response_too_large`)."""

    def __init__(self, status: int, headers: list, conn: "_UpstreamConnection | None", pool: "UpstreamClient | None",
                 timeout: float, body: bytes | list | None = None, secret: str = "",
                 max_bytes: int = DEFAULT_MAX_RESPONSE_BYTES):
        self._secret = secret.encode("latin-1", "replace") if secret else b""
        if self._secret and headers and isinstance(headers[0][0], bytes):
            headers = [(k, v.replace(self._secret, _REDACTED_BYTES)) for k, v in headers]
        self.status, self.headers, self._conn, self._pool, self._timeout = status, headers, conn, pool, timeout
        self._static = body
        self._stop_at: float | None = None
        self.max_bytes = max_bytes
        self.decode = True
        self.header_map = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers} \
            if headers and isinstance(headers[0][0], bytes) else {k.lower(): v for k, v in headers}

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._static is not None:
            for piece in (self._static if isinstance(self._static, list) else [self._static]):
                yield piece
            return
        conn, done, size = self._conn, False, 0
        decoder = _decoder_for(self.header_map.get("content-encoding", "")) if self.decode else None
        redactor = _Redactor(self._secret) if self._secret else None
        try:
            while True:
                try:
                    event = await conn.next_event(self._timeout, self._stop_at)
                except TimeoutError:
                    _raise_upstream_timeout(self._timeout)
                except (OSError, h11.RemoteProtocolError) as exc:
                    raise ProxyError(502, "upstream_unreachable",
                                     f"the upstream connection broke mid-response ({type(exc).__name__})") from None
                if type(event) is h11.Data:
                    pieces = _inflate(decoder, bytes(event.data)) if decoder is not None else (bytes(event.data),)
                elif type(event) is h11.EndOfMessage:
                    done = True
                    pieces = (_inflate_tail(decoder),) if decoder is not None else ()
                else:
                    raise ProxyError(502, "upstream_unreachable", "the upstream closed the connection mid-response")
                for data in pieces:
                    size += len(data)
                    if size > self.max_bytes:
                        raise ProxyError(502, "upstream_response_too_large",
                                         f"the upstream's answer is over {self.max_bytes} bytes (after "
                                         "decompression); it was dropped (server.max_response_bytes)")
                    if redactor is not None:
                        data = redactor.feed(data)
                    if data:
                        yield data
                if done:
                    if redactor is not None and (tail := redactor.flush()):
                        yield tail
                    return
        finally:
            self._conn = None
            if done and self._pool is not None:
                self._pool.release(conn)
            else:
                conn.close()

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self.chunks()])

    def read_until(self, seconds: float) -> None:
        """Read the body for at most `seconds` more, then only what has already arrived, and end
        it with StreamStopped (for a stream nobody relays any more: what it has sent still counts)."""
        self._stop_at = time.monotonic() + seconds
        if self._conn is not None:
            self._conn.late_turns = 0  # a pooled connection may have been stopped before

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def decoded(self) -> bool:
        return self.decode and bool(self.header_map.get("content-encoding")) and self._static is None


def _decoder_for(encoding: str):
    encoding = encoding.strip().lower()
    if encoding == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj()
    return None


def _inflate(decoder, data: bytes) -> Iterator[bytes]:
    """Decompress in steps of at most INFLATE_STEP_BYTES, so that a 1,000:1 bomb is counted
    against the response limit as it grows instead of being inflated whole in one call."""
    try:
        out = decoder.decompress(data, INFLATE_STEP_BYTES)
        while True:
            if out:
                yield out
            if not decoder.unconsumed_tail and len(out) < INFLATE_STEP_BYTES:
                return
            out = decoder.decompress(decoder.unconsumed_tail, INFLATE_STEP_BYTES)
    except zlib.error:
        raise ProxyError(502, "upstream_unreachable", "the upstream sent a body that does not decompress "
                                                      "(content-encoding does not match the bytes)") from None


def _inflate_tail(decoder) -> bytes:
    try:
        return decoder.flush(INFLATE_STEP_BYTES)
    except zlib.error:
        return b""


@dataclass(slots=True, frozen=True)
class UpstreamCall:
    """One request for an upstream, as the pipeline has it. `address` builds the network
    parts (url, headers with the key, the key itself, insecure TLS) only for an upstream that
    goes on the network: reading the key is an error when it is missing, and the in-process
    mock needs none. `dialect` and `parsed` are None for passthrough."""
    method: str
    path: str
    body: bytes
    timeout: float
    request_id: str
    dialect: Any
    parsed: dict | None
    address: Callable[[], tuple[str, list, str, bool]]


class Upstream(Protocol):
    """Where the pipeline's requests go: the pooled h11 client or the in-process mock.
    Chosen once per base URL scheme, never by testing the URL on the hot path."""
    speaks_every_dialect: bool   # True: no chat <-> messages translation is needed
    serves_passthrough: bool     # False: passthrough paths are a 404 before anything is sent

    async def send(self, call: UpstreamCall) -> "UpstreamResponse": ...

    def close(self) -> None: ...


class UpstreamClient:
    """Outbound HTTP/1.1 with h11 over asyncio streams, keep-alive pooling per origin and
    verified TLS by default (`insecure` per provider for self-hosted endpoints)."""
    speaks_every_dialect = False
    serves_passthrough = True

    def __init__(self, max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES):
        self.max_response_bytes = max_response_bytes
        self._idle: dict[tuple, list[_UpstreamConnection]] = {}
        self._ssl_verified: ssl.SSLContext | None = None
        self._ssl_insecure: ssl.SSLContext | None = None

    def _ssl(self, insecure: bool) -> ssl.SSLContext:
        if insecure:
            if self._ssl_insecure is None:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                self._ssl_insecure = ctx
            return self._ssl_insecure
        if self._ssl_verified is None:
            self._ssl_verified = ssl.create_default_context()
        return self._ssl_verified

    async def _connect(self, origin, timeout: float) -> _UpstreamConnection:
        scheme, host, port, insecure = origin
        try:
            async with _deadline(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=self._ssl(insecure) if scheme == "https" else None,
                    server_hostname=host if scheme == "https" else None, limit=1 << 20)
        except TimeoutError:
            _raise_upstream_timeout(timeout)
        except (OSError, ssl.SSLError) as exc:
            raise ProxyError(502, "upstream_unreachable",
                             f"cannot connect to the upstream {host}:{port} ({type(exc).__name__}: "
                             f"{exc.strerror or exc})" if isinstance(exc, OSError) and exc.strerror else
                             f"cannot connect to the upstream {host}:{port} ({type(exc).__name__})") from None
        return _UpstreamConnection(origin, reader, writer)

    def _take_idle(self, origin) -> _UpstreamConnection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            # Bytes that arrived while the connection sat idle answer no request of ours: a
            # connection that has them would hand them to the next request as its answer.
            if now - conn.idle_since < POOL_IDLE_SECONDS and not conn.reader.at_eof() \
                    and not conn.writer.is_closing() and not _stream_buffered(conn.reader) \
                    and not conn.h11.trailing_data[0]:
                return conn
            conn.close()
        return None

    def release(self, conn: _UpstreamConnection) -> None:
        """Pool a connection only after a cleanly framed, fully read exchange with nothing left
        over: bytes past the end of an answer (a wrong Content-Length, a body after a 204, a
        second response) would be read as the answer to another client's request."""
        leftover, closed = conn.h11.trailing_data
        if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE and not leftover \
                and not closed and not _stream_buffered(conn.reader):
            try:
                conn.h11.start_next_cycle()
            except h11.LocalProtocolError:
                conn.close()
                return
            idle = self._idle.setdefault(conn.origin, [])
            if len(idle) < POOL_MAX_IDLE_PER_ORIGIN:
                conn.idle_since = time.monotonic()
                idle.append(conn)
                return
        conn.close()

    async def request(self, method: str, url: str, headers: list, body: bytes, timeout: float,
                      insecure: bool = False, secret: str = "") -> UpstreamResponse:
        """One exchange; `secret` is the key injected in `headers`, redacted from the answer.
        A redirect is never returned: following it would re-send the body elsewhere, and
        relaying it would make the client's SDK do so."""
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme
        port = parts.port or (443 if scheme == "https" else 80)
        origin = (scheme, parts.hostname, port, insecure)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        for attempt in range(2):
            conn = self._take_idle(origin)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(origin, timeout)
            try:
                out = conn.h11.send(h11.Request(method=method, target=target, headers=headers))
                if body:
                    out += conn.h11.send(h11.Data(data=body))
                out += conn.h11.send(h11.EndOfMessage())
                conn.writer.write(out)
                while True:
                    event = await conn.next_event(timeout)
                    if type(event) is h11.InformationalResponse:
                        continue
                    break
                if type(event) is not h11.Response:
                    raise ConnectionResetError("connection closed before a response")
            except TimeoutError:
                conn.close()
                _raise_upstream_timeout(timeout)
            except (OSError, h11.RemoteProtocolError, h11.LocalProtocolError) as exc:
                conn.close()
                if reused and attempt == 0:
                    continue  # a stale keep-alive connection: the request never reached the upstream
                raise ProxyError(502, "upstream_unreachable", f"the upstream closed the connection "
                                                              f"without answering ({type(exc).__name__}: {exc})") from None
            except BaseException:
                conn.close()
                raise
            if 300 <= event.status_code < 400:
                conn.close()
                raise ProxyError(502, "upstream_redirect",
                                 f"the upstream answered with a redirect ({event.status_code}); the proxy does not "
                                 "follow or relay redirects, so nothing was re-sent; check the provider's base "
                                 "URL (upstream_url)")
            return UpstreamResponse(event.status_code, list(event.headers), conn, self, timeout, secret=secret,
                                    max_bytes=self.max_response_bytes)
        raise AssertionError("unreachable")

    async def send(self, call: UpstreamCall) -> UpstreamResponse:
        url, headers, secret, insecure = call.address()
        return await self.request(call.method, url, headers, call.body, call.timeout, insecure=insecure,
                                  secret=secret)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
