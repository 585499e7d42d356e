"""The SSE relay as a transformer over events: output guard, usage observation, error events."""

import json
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, TYPE_CHECKING

from .dialects import Dialect
from .errors import ProxyError
from .http.server import error_body, event_output_bytes
from .http.sse import SSEEvent, SSEParser, _sse
from .limits.prices import Usage

if TYPE_CHECKING:  # names used in annotations only
    from .records.exchange import Exchange


def stream_error_event(dialect: Dialect, err: ProxyError, sequence: int | None = None) -> bytes:
    """The event that ends a stream with an error, in the stream's own dialect."""
    event, payload = dialect.stream_error(err, error_body(dialect.family, err.status, err.code, err.message),
                                          sequence or 0)
    return _sse(payload, event)


class StreamRelay:
    """Turns upstream bytes into the bytes the client receives, one SSE event at a time.

    `translator` (optional) maps each upstream event to events of the client's dialect;
    `channel` builds a text transformer (feed/finish) per output channel when output rules or
    anonymization apply; `full_text` rewrites events that repeat a whole text. Usage is observed
    into the exchange; the usage chunk the proxy asked for is removed when the client did not."""

    def __init__(self, dialect: Dialect, ex: "Exchange", channel: Callable[[], Any] | None = None,
                 full_text: Callable[[str], str] | None = None, strip_usage: bool = False,
                 translator: Any = None, meta_dialect: Dialect | None = None,
                 log_text: Callable[[str], str] | None = None,
                 end_check: Callable[[str], Awaitable[None]] | None = None):
        self.dialect, self.ex = dialect, ex
        self.log_text = log_text or (lambda text: text)
        self.meta_dialect = meta_dialect or dialect
        self.channel, self.full_text, self.strip_usage = channel, full_text, strip_usage
        self.translator = translator
        self.channels: dict = {}
        self.parser = SSEParser()
        self.usage = Usage()
        self.seq_shift = 0
        self.last_seq = 0
        self.sent_any = False
        self.released_text = False
        self.complete = False   # the upstream's stream ended and every event passed through
        self.output_bytes = 0   # model output received from the upstream, relayed or not
        # The model's own text, kept for the conversation log and for `end_check` (output classifier
        # rules, which judge the whole text once the upstream's stream has ended).
        self.end_check = end_check
        self.collected: list | None = [] if ex.memory is not None or end_check is not None else None

    async def run(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        # While output rules apply, events are held until the first text passes them, so that a
        # rule failing on the first text is still a plain 403 (nothing was sent yet).
        # With `end_check`, each chunk's events wait for the next chunk: the stream's terminal event
        # ([DONE], message_stop, response.completed) is still held when the check runs, so a refusal
        # ends the stream with an error event that SDKs read, not after the stream was closed.
        pending = lag = b""
        try:
            async for chunk in chunks:
                out = self.feed(chunk)
                if out:
                    if self.channel is not None and not self.released_text:
                        pending += out
                        continue
                    if self.end_check is not None:
                        out, lag = lag, out
                    if pending or out:
                        self.sent_any = True
                        yield pending + out
                        pending = b""
            if self.end_check is not None:
                await self.end_check("".join(self.collected))
            tail = pending + lag + self.finish()
            self.complete = True
            if tail:
                self.sent_any = True
                yield tail
        except ProxyError as err:
            self.ex.status, self.ex.error = err.status, err.code
            if not self.sent_any:
                raise  # nothing reached the client: the pipeline answers with a plain error
            yield stream_error_event(self.dialect, err, self.last_seq + 1)
        finally:
            if self.translator is not None:
                self.usage = self.translator.usage
            self.ex.usage = self.usage
            if self.collected is not None and self.ex.memory is not None:
                self.ex.memory_entries.append(("assistant", self.log_text("".join(self.collected))))
            if self.usage.total_tokens:
                self.ex.provider_meta.update(usage_meta(self.usage))

    def feed(self, chunk: bytes) -> bytes:
        return b"".join(self._upstream_event(ev) for ev in self.parser.feed(chunk))

    def finish(self) -> bytes:
        out = b"".join(self._upstream_event(ev) for ev in self.parser.flush())
        if self.translator is not None:
            out += b"".join(self._event(name, payload, None) for name, payload in
                            self._translated(self.translator.finish()))
        return out + self._flush(list(self.channels), None, None)

    def _translated(self, items: list) -> Iterator[tuple[str | None, Any]]:
        for item in items:
            yield item if isinstance(item, tuple) else (None, item)

    def _upstream_event(self, ev: SSEEvent) -> bytes:
        data = ev.data
        if self.translator is None:
            if not data or data[0] != "{":
                return self._event(ev.event, data, ev.raw)
            payload = json.loads(data)
            self._observe(payload)
            return self._event(ev.event, payload, ev.raw)
        payload = json.loads(data) if data and data[0] == "{" else data
        if isinstance(payload, dict):
            self._observe(payload)
        if not payload:
            return b""
        return b"".join(self._event(name, out, None) for name, out in
                        self._translated(self.translator.feed(ev.event, payload)))

    def _observe(self, payload: dict) -> None:
        """Served model, finish reason, the upstream's completion id and the amount of output,
        from the upstream's events."""
        if isinstance(payload, dict):
            self.output_bytes += event_output_bytes(payload)
        meta = self.meta_dialect.response_meta(payload)
        if meta:
            self.ex.provider_meta.update(meta)
        if not self.ex.upstream_id:
            holder = payload.get("message") or payload.get("response") or payload
            if isinstance(holder, dict) and isinstance(holder.get("id"), str):
                self.ex.upstream_id = holder["id"]

    def _closed_channels(self, ends: list) -> list:
        """The open channels an event closes: each end itself, and for a tuple end every
        channel it is a prefix of (a choice's content, refusal and tool-call arguments)."""
        out = []
        for ch in self.channels:
            for end in ends:
                if ch == end or (isinstance(end, tuple) and isinstance(ch, tuple) and ch[:len(end)] == end):
                    out.append(ch)
                    break
        return out

    def _flush(self, channels: list, payload: dict | None, event: str | None) -> bytes:
        out = []
        for ch in channels:
            guard = self.channels.pop(ch, None)
            text = guard.finish() if guard is not None else ""
            if text:
                name, extra = self.dialect.tail_event(ch, text, payload or {}, event)
                seq = self.dialect.sequence_field
                if seq is not None and seq in (payload or {}):
                    extra[seq] = payload[seq] + self.seq_shift
                    self.seq_shift += 1
                out.append(_sse(extra, name))
        return b"".join(out)

    def _event(self, name: str | None, payload: Any, raw: bytes | None) -> bytes:
        """One event of the client's dialect; `raw` is its exact upstream bytes when it has them."""
        if not isinstance(payload, dict):
            tail = self._flush(list(self.channels), None, None)
            if raw is None:
                return tail + (_sse(payload, name) if payload else b"")
            return tail + raw
        dialect = self.dialect
        if self.translator is None:
            self.usage = dialect.stream_usage(name, payload, self.usage)
        changed, out = raw is None, b""
        if self.collected is not None:  # the model's own text, before guards rewrite it
            self.collected.extend(holder[key] for _, holder, key in dialect.stream_deltas(name, payload))
        if self.channel is not None or self.full_text is not None:
            ends = dialect.stream_ends(name, payload)
            if ends:
                out = self._flush(self._closed_channels(ends), payload, name)
            for ch, holder, key in dialect.stream_deltas(name, payload):
                guard = self.channels.get(ch)
                if guard is None:
                    guard = self.channels[ch] = self.channel()
                holder[key] = released = guard.feed(holder[key])
                self.released_text = self.released_text or bool(released)
                changed = True
            if self.full_text is not None:
                for holder, key in dialect.stream_full_texts(name, payload):
                    holder[key] = self.full_text(holder[key])
                    changed = True
        if self.strip_usage:
            stripped = dialect.strip_stream_usage(payload)
            if stripped is None:
                return out
            changed |= stripped
        seq = dialect.sequence_field
        if seq is not None and seq in payload:
            if self.seq_shift:
                payload[seq] += self.seq_shift
                changed = True
            self.last_seq = payload[seq]
        return out + (_sse(payload, name) if changed else raw)


def usage_meta(usage: "Usage") -> dict:
    return {"cached_input_tokens": usage.cached_input_tokens, "cache_creation_tokens": usage.cache_creation_tokens,
            "reasoning_tokens": usage.reasoning_tokens}
