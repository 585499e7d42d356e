"""Server-sent events: an incremental parser, the stream stage that parses, and deadlines."""

import asyncio
import contextlib
import json
import re
import sys

from ..errors import ProxyError
from ..stages import SSEEvent
from ..util import MiB


                                        # answers (embeddings of 2,048 inputs) are ~30 MB
MAX_SSE_EVENT_BYTES = 1 * MiB           # one streamed event: real ones are < 64 KiB; a bigger one is a


if sys.version_info >= (3, 11):
    _deadline = asyncio.timeout
else:  # pragma: no cover - Python 3.10
    @contextlib.asynccontextmanager
    async def _deadline(seconds):
        task = asyncio.current_task()
        fired = False

        def fire():
            nonlocal fired
            fired = True
            task.cancel()
        handle = asyncio.get_running_loop().call_later(seconds, fire) if seconds is not None else None
        try:
            yield
        except asyncio.CancelledError:
            if fired:
                raise TimeoutError from None
            raise
        finally:
            if handle is not None:
                handle.cancel()


_SSE_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class SSEParser:
    """Incremental SSE framing: feed bytes in any chunking, get whole events out.

    Linear in the bytes fed, however they are chunked: the buffer grows in place and each feed
    searches only the new bytes (plus the 3 before them, where a boundary may have started).
    An event over `max_event_bytes` is a 502 `upstream_response_too_large`."""

    def __init__(self, max_event_bytes: int = MAX_SSE_EVENT_BYTES):
        self._buf = bytearray()
        self._scanned = 0          # bytes of _buf already searched for a boundary
        self.max_event_bytes = max_event_bytes

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buf = self._buf
        buf += chunk
        events, start = [], 0
        pos = max(0, self._scanned - 3)  # the longest boundary is 4 bytes
        while True:
            m = _SSE_BOUNDARY.search(buf, pos)
            if m is None:
                break
            if m.end() - start > self.max_event_bytes:
                self._too_large()
            events.append(self._parse(bytes(buf[start:m.end()])))
            start = pos = m.end()
        if start:
            del buf[:start]
        self._scanned = len(buf)
        if len(buf) > self.max_event_bytes:
            self._too_large()
        return events

    def flush(self) -> list[SSEEvent]:
        rest = bytes(self._buf)
        self._buf, self._scanned = bytearray(), 0
        return [self._parse(rest)] if rest.strip() else []

    def _too_large(self):
        self._buf, self._scanned = bytearray(), 0
        raise ProxyError(502, "upstream_response_too_large",
                         f"the upstream sent a stream event over {self.max_event_bytes // MiB} MiB; the stream "
                         "was ended (events are bounded to protect the proxy); check the provider")

    @staticmethod
    def _parse(raw: bytes) -> SSEEvent:
        name, data = None, []
        for line in raw.decode("utf-8", "replace").splitlines():
            if line.startswith("data:"):
                data.append(line[6:] if line.startswith("data: ") else line[5:])
            elif line.startswith("event:"):
                name = line[6:].strip()
        return SSEEvent(raw, name, "\n".join(data))


class SSEParse:
    """The first stream stage: wire bytes (events with only `raw`) in any chunking -> SSE
    events, each with its data decoded (a JSON object as a dict, anything else as the string)."""
    __slots__ = ("_parser",)

    def __init__(self, max_event_bytes: int = MAX_SSE_EVENT_BYTES):
        self._parser = SSEParser(max_event_bytes)

    def feed(self, events: list[SSEEvent]) -> list[SSEEvent]:
        out = []
        for chunk in events:
            out += self._parser.feed(chunk.raw)
        return self._decoded(out)

    def finish(self) -> list[SSEEvent]:
        return self._decoded(self._parser.flush())

    @staticmethod
    def _decoded(events: list[SSEEvent]) -> list[SSEEvent]:
        for ev in events:
            data = ev.data
            ev.payload = json.loads(data) if data[:1] == "{" else data
        return events
