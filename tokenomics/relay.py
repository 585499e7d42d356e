"""The SSE relay: a chain of stream stages from upstream bytes to client bytes, the stage that
observes the upstream's usage, and the error event that ends a stream."""

from typing import AsyncIterator, Awaitable, Callable, TYPE_CHECKING

from .dialects import Dialect
from .errors import ProxyError
from .http.server import error_body, event_output_bytes
from .http.sse import SSEParse
from .limits.prices import Usage
from .stages import Chain, SSEEvent, SSEWrite, sse_bytes, wire

if TYPE_CHECKING:  # names used in annotations only
    from .guard.stream import GuardStage
    from .records.exchange import Exchange
    from .translate import TranslateStage


def stream_error_event(dialect: Dialect, err: ProxyError, sequence: int | None = None) -> bytes:
    """The event that ends a stream with an error, in the stream's own dialect."""
    event, payload = dialect.stream_error(err, error_body(dialect.family, err.status, err.code, err.message),
                                          sequence or 0)
    return sse_bytes(payload, event)


class ObserveStage:
    """The stream stage that reads the upstream's own events: its usage (when the stream is not
    translated; a translation counts it itself), served model, finish reason, completion id and
    the amount of output received. With `strip_usage` it also removes the usage the proxy
    asked for and the client did not (a usage-only event is dropped)."""
    __slots__ = ("dialect", "count_usage", "strip_usage", "usage", "meta", "upstream_id", "output_bytes")

    def __init__(self, dialect: Dialect, count_usage: bool = True, strip_usage: bool = False):
        self.dialect, self.count_usage, self.strip_usage = dialect, count_usage, strip_usage
        self.usage = Usage()
        self.meta: dict = {}
        self.upstream_id = ""
        self.output_bytes = 0   # model output received from the upstream, relayed or not

    def feed(self, events: list[SSEEvent]) -> list[SSEEvent]:
        out = []
        dialect = self.dialect
        for ev in events:
            payload = ev.payload
            if isinstance(payload, dict):
                self.output_bytes += event_output_bytes(payload)
                meta = dialect.response_meta(payload)
                if meta:
                    self.meta.update(meta)
                if not self.upstream_id:
                    holder = payload.get("message") or payload.get("response") or payload
                    if isinstance(holder, dict) and isinstance(holder.get("id"), str):
                        self.upstream_id = holder["id"]
                if self.count_usage:
                    self.usage = dialect.stream_usage(ev.event, payload, self.usage)
                if self.strip_usage:
                    stripped = dialect.strip_stream_usage(payload)
                    if stripped is None:
                        continue
                    if stripped:
                        ev.raw = None
            out.append(ev)
        return out

    def finish(self) -> list[SSEEvent]:
        return []


class StreamRelay:
    """Turns upstream bytes into the bytes the client receives, through a chain of stream
    stages: SSE parse → observe (usage, meta) → translate (optional) → guard (optional) → SSE
    write. The relay adds what spans the stream: holding the first events until a text has
    passed the output rules, holding the last ones for `end_check`, the error event that ends
    a stream, and filling the exchange from the stages' results."""

    def __init__(self, dialect: Dialect, ex: "Exchange", observe: ObserveStage,
                 translate: "TranslateStage | None" = None, guard: "GuardStage | None" = None,
                 log_text: Callable[[str], str] | None = None,
                 end_check: Callable[[str], Awaitable[None]] | None = None):
        self.dialect, self.ex = dialect, ex
        self.log_text = log_text or (lambda text: text)
        self.observe, self.translate, self.guard = observe, translate, guard
        self.write = SSEWrite(dialect.sequence_field)
        self.chain = Chain((SSEParse(), observe, translate, guard, self.write))
        self.usage = Usage()
        self.sent_any = False
        self.complete = False   # the upstream's stream ended and every event passed through
        # Output classifier rules judge the whole text (the guard stage collects it) once the
        # upstream's stream has ended.
        self.end_check = end_check

    @property
    def output_bytes(self) -> int:
        return self.observe.output_bytes

    async def run(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        # While output rules apply, events are held until the first text passes them, so that a
        # rule failing on the first text is still a plain 403 (nothing was sent yet).
        # With `end_check`, each chunk's events wait for the next chunk: the stream's terminal event
        # ([DONE], message_stop, response.completed) is still held when the check runs, so a refusal
        # ends the stream with an error event that SDKs read, not after the stream was closed.
        guard = self.guard
        holding = guard is not None and guard.channel is not None
        pending = lag = b""
        try:
            async for chunk in chunks:
                out = self.feed(chunk)
                if out:
                    if holding and not guard.released_text:
                        pending += out
                        continue
                    if self.end_check is not None:
                        out, lag = lag, out
                    if pending or out:
                        self.sent_any = True
                        yield pending + out
                        pending = b""
            if self.end_check is not None:
                await self.end_check("".join(guard.collected))
            tail = pending + lag + self.finish()
            self.complete = True
            if tail:
                self.sent_any = True
                yield tail
        except ProxyError as err:
            self.ex.status, self.ex.error = err.status, err.code
            if not self.sent_any:
                raise  # nothing reached the client: the pipeline answers with a plain error
            yield stream_error_event(self.dialect, err, self.write.last_sequence + 1)
        finally:
            self._fill_exchange()

    def _fill_exchange(self) -> None:
        ex, observe = self.ex, self.observe
        self.usage = self.translate.usage if self.translate is not None else observe.usage
        ex.usage = self.usage
        ex.provider_meta.update(observe.meta)
        if not ex.upstream_id:
            ex.upstream_id = observe.upstream_id
        if self.guard is not None and self.guard.collected is not None and ex.memory is not None:
            ex.memory_entries.append(("assistant", self.log_text("".join(self.guard.collected))))
        if self.usage.total_tokens:
            ex.provider_meta.update(usage_meta(self.usage))

    def feed(self, chunk: bytes) -> bytes:
        return b"".join(ev.raw for ev in self.chain.feed([wire(chunk)]))

    def finish(self) -> bytes:
        return b"".join(ev.raw for ev in self.chain.finish())


def usage_meta(usage: "Usage") -> dict:
    return {"cached_input_tokens": usage.cached_input_tokens, "cache_creation_tokens": usage.cache_creation_tokens,
            "reasoning_tokens": usage.reasoning_tokens}
