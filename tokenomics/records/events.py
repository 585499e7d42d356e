"""Events and webhooks: the event shape, filters, and a bounded background dispatcher."""

import asyncio
import base64
import hashlib
import hmac
import json
import math
import secrets
import ssl
import time
import urllib.parse
from typing import Callable

import h11

from ..config import EVENT_TYPES, Webhook, validate_webhooks
from ..util import log, rfc3339_ms


                                # image must not turn a log line into tens of megabytes
WEBHOOK_QUEUE_SIZE = 1_000      # events waiting per webhook; when full the oldest is dropped


WEBHOOK_RETRIES = 3             # retries after the first attempt (so up to 4 POSTs)


WEBHOOK_BACKOFF = 0.5           # seconds before the first retry; doubles each time (0.5, 1, 2)


WEBHOOK_CONCURRENCY = 4         # deliveries in flight per webhook: one slow POST (or its backoff)


                                # must not hold every later event back
WEBHOOK_WARN_INTERVAL = 60.0    # seconds between "webhook failing" warnings for one webhook


# --- events and webhooks -----------------------------------------------------------------------

def make_event(type_: str, data: dict, now: float) -> dict:
    """The event payload every webhook receives. Callers put the token's metadata tags in `data`."""
    if type_ not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type_!r}")
    return {"id": "evt_" + secrets.token_hex(16), "type": type_, "timestamp": rfc3339_ms(now),
            "data": data}


def event_matches(filters: list | tuple, type_: str) -> bool:
    """Webhook `events` filter: exact names, `prefix.*`, `*`; an empty list takes everything."""
    if not filters:
        return True
    for f in filters:
        if f == "*" or f == type_ or (f.endswith(".*") and type_.startswith(f[:-1])):
            return True
    return False


def _origin(url: str) -> str:
    """scheme://host:port of a webhook URL, for log messages: webhook paths and query strings
    often carry a secret (Slack, Discord), so they are never logged."""
    p = urllib.parse.urlsplit(url)
    return f"{p.scheme}://{p.hostname}" + (f":{p.port}" if p.port else "")


class _WebhookError(Exception):
    """A delivery attempt that failed in a way worth retrying."""


async def _post_once(url: str, body: bytes, headers: list, ctx: "ssl.SSLContext | None") -> int:
    """POST `body` to `url` with h11 over one fresh connection; the response status."""
    p = urllib.parse.urlsplit(url)
    host = p.hostname
    port = p.port or (443 if p.scheme == "https" else 80)
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx,
                                                   server_hostname=host if ctx else None)
    try:
        conn = h11.Connection(h11.CLIENT)
        netloc = p.netloc.rpartition("@")[2]
        hdrs = [("Host", netloc)] + headers + [("Content-Length", str(len(body))),
                                               ("Connection", "close")]
        if p.username is not None:
            creds = f"{urllib.parse.unquote(p.username)}:{urllib.parse.unquote(p.password or '')}"
            hdrs.append(("Authorization", "Basic " + base64.b64encode(creds.encode()).decode()))
        target = (p.path or "/") + (f"?{p.query}" if p.query else "")
        writer.write(conn.send(h11.Request(method="POST", target=target, headers=hdrs))
                     + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        await writer.drain()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif type(event) is h11.Response:
                return event.status_code     # the body is not needed: the connection closes
            elif type(event) is h11.ConnectionClosed:
                raise _WebhookError("connection closed before a response")
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 1.0)
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            pass


class WebhookDispatcher:
    """Delivers events to the configured webhooks from bounded in-memory queues, one per webhook,
    so that a slow or dead endpoint never delays a proxied request nor another webhook.
    `emit` only enqueues (when a queue is full its oldest event is dropped and counted);
    `run` is the background delivery; `close` drains within a deadline."""

    def __init__(self, webhooks: list, *, queue_size: int = WEBHOOK_QUEUE_SIZE,
                 on_drop: Callable[[], None] | None = None, backoff: float = WEBHOOK_BACKOFF,
                 retries: int = WEBHOOK_RETRIES, concurrency: int = WEBHOOK_CONCURRENCY):
        self.webhooks = tuple(validate_webhooks(list(webhooks)))
        self.on_drop, self.backoff, self.retries = on_drop, backoff, retries
        self.concurrency = max(1, concurrency)
        self._queues = [asyncio.Queue(queue_size) for _ in self.webhooks]
        self.dropped = self.delivered = self.failed = self.attempts = 0
        self._tasks: list = []
        self._closed = False
        self._ssl: dict[bool, ssl.SSLContext] = {}
        self._warned_at: dict[int, float] = {}

    def emit(self, event: dict) -> None:
        """Queue `event` for every webhook whose filter takes it. Never blocks or awaits."""
        if self._closed:
            return
        body = None
        for hook, queue in zip(self.webhooks, self._queues):
            if not event_matches(hook.events, event["type"]):
                continue
            if body is None:
                body = json.dumps(event, separators=(",", ":"), ensure_ascii=False,
                                  default=str).encode("utf-8")
            if queue.full():
                queue.get_nowait()
                queue.task_done()
                self.dropped += 1
                if self.on_drop is not None:
                    self.on_drop()
            queue.put_nowait((event["type"], event.get("id", ""), body))

    def pending(self) -> int:
        return sum(q.qsize() for q in self._queues)

    async def run(self) -> None:
        """Deliver until cancelled or closed. Start it as a background task."""
        if self._tasks:
            return                      # already running (close() may have started it)
        self._tasks = [asyncio.ensure_future(self._worker(i))
                       for i in range(len(self.webhooks)) for _ in range(self.concurrency)]
        try:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            for task in self._tasks:
                task.cancel()

    async def close(self, timeout: float = 5.0) -> None:
        """Stop taking events, deliver what is queued within `timeout` seconds, then stop."""
        self._closed = True
        runner = None
        if not self._tasks and self.pending():
            runner = asyncio.ensure_future(self.run())
            await asyncio.sleep(0)  # let run() start its workers
        try:
            await asyncio.wait_for(asyncio.gather(*(q.join() for q in self._queues)), timeout)
        except asyncio.TimeoutError:
            pass
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1.0)
        if runner is not None:
            await asyncio.wait([runner], timeout=1.0)

    async def _worker(self, index: int) -> None:
        hook, queue = self.webhooks[index], self._queues[index]
        while True:
            type_, event_id, body = await queue.get()
            try:
                await self._deliver(index, hook, type_, event_id, body)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # pragma: no cover - a bug must not kill the worker
                log.error("webhook %s: unexpected %s", _origin(hook.url), type(exc).__name__)
            finally:
                queue.task_done()

    def _context(self, insecure: bool) -> ssl.SSLContext:
        ctx = self._ssl.get(insecure)
        if ctx is None:
            ctx = ssl.create_default_context()
            if insecure:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._ssl[insecure] = ctx
        return ctx

    async def _deliver(self, index: int, hook: Webhook, type_: str, event_id: str,
                       body: bytes) -> bool:
        headers = [("Content-Type", "application/json"), ("User-Agent", "tokenomics-webhook"),
                   ("X-Webhook-Event", type_), ("X-Webhook-Id", event_id)]
        if hook.secret:
            headers.append(("X-Webhook-Secret", hook.secret))
        if hook.signing_key:
            digest = hmac.new(hook.signing_key.encode("utf-8"), body, hashlib.sha256).hexdigest()
            headers.append(("X-Webhook-Signature", "sha256=" + digest))
        ctx = self._context(hook.insecure) if hook.url.startswith("https:") else None
        reason = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            self.attempts += 1
            try:
                status = await asyncio.wait_for(_post_once(hook.url, body, headers, ctx), hook.timeout)
            except asyncio.TimeoutError:
                reason = f"no answer within {hook.timeout:g}s"
                continue
            except (OSError, h11.ProtocolError, _WebhookError) as exc:  # ssl.SSLError is an OSError
                reason = type(exc).__name__
                continue
            if 200 <= status < 300:
                self.delivered += 1
                return True
            reason = f"HTTP {status}"
            if status != 429 and status < 500:
                break                   # the receiver refused this event: sending it again won't help
        self.failed += 1
        now = time.monotonic()
        if now - self._warned_at.get(index, -math.inf) >= WEBHOOK_WARN_INTERVAL:
            self._warned_at[index] = now
            log.warning("webhook %s: %s event not delivered (%s); %d failed so far",
                        _origin(hook.url), type_, reason, self.failed)
        return False


def deliver_once(webhooks: list, event: dict, timeout: float = 5.0) -> int:
    """Best-effort synchronous delivery for the CLI (token.* events): waits at most about
    `timeout` seconds in total, never raises; returns how many webhooks accepted the event."""
    try:
        hooks = validate_webhooks(list(webhooks))
        if not any(event_matches(h.events, event["type"]) for h in hooks):
            return 0

        async def _go() -> int:
            dispatcher = WebhookDispatcher(hooks, concurrency=1)
            dispatcher.emit(event)
            await dispatcher.close(timeout)
            return dispatcher.delivered

        return asyncio.run(_go())
    except Exception as exc:
        log.debug("webhook delivery skipped: %s", type(exc).__name__)
        return 0
