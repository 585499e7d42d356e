"""The live feed: events the proxy emits, fanned out to Server-Sent-Events subscribers, each with
a bounded queue of its own (a slow browser tab loses its oldest events, never slows a request)."""

import asyncio
import collections
import json
import threading
from typing import Any, AsyncIterator


FEED_QUEUE_SIZE = 256           # events held per subscriber; a tab that stops reading drops the oldest


MAX_SUBSCRIBERS = 32            # open feeds at once: a few tabs per operator, never a descriptor sink


HEARTBEAT_INTERVAL = 15.0       # seconds between SSE comments, so idle proxies and tabs keep the stream


def fed(type_: str) -> bool:
    """The events the feed shows: finished requests and guardrail actions."""
    return type_ == "request.completed" or type_.startswith("rule.")


class _Subscriber:
    __slots__ = ("queue", "wake", "loop", "dropped")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.queue: collections.deque = collections.deque(maxlen=FEED_QUEUE_SIZE)
        self.wake = asyncio.Event()
        self.loop = loop
        self.dropped = 0


class EventHub:
    """Takes the place of the records' dispatcher: every event goes on to `downstream` (the
    webhook dispatcher, when there is one) and, when the feed shows it, to each subscriber."""

    def __init__(self, downstream: Any = None):
        self.downstream = downstream
        self._subscribers: set[_Subscriber] = set()
        self._lock = threading.Lock()
        self._closed = False

    def emit(self, event: dict) -> None:
        if self.downstream is not None:
            self.downstream.emit(event)
        if not self._subscribers or not fed(event.get("type", "")):
            return
        with self._lock:
            subscribers = list(self._subscribers)
        for sub in subscribers:
            if len(sub.queue) == sub.queue.maxlen:
                sub.dropped += 1
            sub.queue.append(event)
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is sub.loop:
                sub.wake.set()
            else:
                sub.loop.call_soon_threadsafe(sub.wake.set)

    @property
    def listening(self) -> bool:
        """Whether an event emitted now goes anywhere (a webhook dispatcher or an open feed):
        when not, the records skip building it."""
        return self.downstream is not None or bool(self._subscribers)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def subscribe(self) -> "AsyncIterator[bytes] | None":
        """An SSE byte stream of fed events, or None when MAX_SUBSCRIBERS are already open."""
        with self._lock:
            if self._closed or len(self._subscribers) >= MAX_SUBSCRIBERS:
                return None
            sub = _Subscriber(asyncio.get_running_loop())
            self._subscribers.add(sub)
        return self._stream(sub)

    async def _stream(self, sub: _Subscriber) -> AsyncIterator[bytes]:
        try:
            yield b"retry: 3000\n: connected\n\n"
            while not self._closed:
                if not sub.queue:
                    sub.wake.clear()
                    try:
                        await asyncio.wait_for(sub.wake.wait(), HEARTBEAT_INTERVAL)
                    except TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                out = []
                while sub.queue:
                    event = sub.queue.popleft()
                    out.append(b"event: %s\nid: %s\ndata: %s\n\n" % (
                        event["type"].encode(), str(event.get("id", "")).encode(),
                        json.dumps(event, separators=(",", ":"), default=str).encode()))
                if out:
                    yield b"".join(out)
        finally:
            with self._lock:
                self._subscribers.discard(sub)

    def close(self) -> None:
        """End every feed (graceful shutdown must not wait for open tabs)."""
        with self._lock:
            self._closed = True
            subscribers = list(self._subscribers)
        for sub in subscribers:
            sub.loop.call_soon_threadsafe(sub.wake.set)
