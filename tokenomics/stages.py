"""Streams as chains of stages: the one event type a relayed stream is made of, the
`StreamStage` protocol every step of it follows, `Chain` that runs them in order, and the
writing of events back to SSE bytes.

A relayed stream is SSE parse → observe usage → translate → guard → SSE write. Each stage
takes a list of events and returns the events it can pass on now (`feed`), and at the end of
the stream the events it still holds (`finish`). A stage never sees sockets or chunk
boundaries: feeding it a stream in any partition gives the same events as feeding it whole,
which is what makes each one testable by feeding it a list."""

import json
from dataclasses import dataclass
from typing import Any, Iterable, Protocol


@dataclass(slots=True)
class SSEEvent:
    """One event of a stream. Between the parser and the writer: its exact upstream bytes in
    `raw` (None once a stage changed it or made it: it is then written anew from `payload`),
    its `event:` name, its joined `data:` lines and `payload`, the data decoded (a dict for a
    JSON object, else the data string). Before the parser and after the writer an event is
    wire bytes: only `raw` is set (see `wire`)."""
    raw: bytes | None
    event: str | None = None
    data: str = ""
    payload: Any = None

    def json(self) -> Any:
        return json.loads(self.data)


def wire(chunk: bytes) -> SSEEvent:
    """Bytes as they travel, not yet (or no longer) framed as an event."""
    return SSEEvent(chunk)


_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))   # json.dumps builds an encoder per call


def sse_bytes(data: dict | str, event: str | None = None) -> bytes:
    """One event in SSE framing, its JSON compact."""
    payload = data if isinstance(data, str) else _COMPACT_JSON.encode(data)
    return (f"event: {event}\n" if event else "").encode() + b"data: " + payload.encode("utf-8") + b"\n\n"


class StreamStage(Protocol):
    """One step of a relayed stream. `feed` takes events and returns those that can go on now;
    `finish` (once, at the end) returns what the stage still held. Fed the same events in any
    partition, a stage returns the same events in total."""

    def feed(self, events: list[SSEEvent]) -> list[SSEEvent]: ...

    def finish(self) -> list[SSEEvent]: ...


class Chain:
    """Stages in order, as one stage: each stage's output is the next one's input. `finish`
    finishes them in order, passing what each still held through the stages after it."""
    __slots__ = ("stages",)

    def __init__(self, stages: Iterable["StreamStage | None"]):
        self.stages = tuple(stage for stage in stages if stage is not None)

    def feed(self, events: list[SSEEvent]) -> list[SSEEvent]:
        return self._through(events, 0)

    def finish(self) -> list[SSEEvent]:
        out = []
        for i, stage in enumerate(self.stages):
            out += self._through(stage.finish(), i + 1)
        return out

    def _through(self, events: list[SSEEvent], start: int) -> list[SSEEvent]:
        for stage in self.stages[start:]:
            if not events:
                break
            events = stage.feed(events)
        return events


class SSEWrite:
    """The last stage: events back to wire bytes, an unchanged event as its exact upstream
    bytes. Keeps the last sequence number written (`sequence_field`, for dialects that number
    their events), so an error event ending the stream can follow it."""
    __slots__ = ("sequence_field", "last_sequence")

    def __init__(self, sequence_field: str | None = None):
        self.sequence_field = sequence_field
        self.last_sequence = 0

    def feed(self, events: list[SSEEvent]) -> list[SSEEvent]:
        out = []
        seq = self.sequence_field
        for ev in events:
            payload = ev.payload
            if seq is not None and isinstance(payload, dict) and seq in payload:
                self.last_sequence = payload[seq]
            if ev.raw is not None:
                out.append(ev.raw)
            elif payload or isinstance(payload, dict):
                out.append(sse_bytes(payload, ev.event))
        return [wire(b"".join(out))] if out else []

    def finish(self) -> list[SSEEvent]:
        return []
