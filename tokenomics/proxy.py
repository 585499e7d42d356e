"""Assembly and lifecycle: store, catalog, client, pipeline and listeners; runs until a signal."""

import asyncio
import contextlib
import fcntl
import os
import signal
import threading
from typing import Callable

from . import __version__
from .config import Config, validate_webhooks
from .errors import RuntimeFailure, UsageError
from .http.client import UpstreamClient
from .http.server import HTTPServer, default_max_connections
from .limits.journal import UsageJournal
from .limits.redis_state import HAVE_REDIS, MISSING_REDIS, RedisState
from .guard.rules import defer_detector, load_deferred_detector
from .limits.state import MemoryState, State
from .pipeline import Pipeline
from .providers import Catalog
from .records.events import WebhookDispatcher
from .records.fanout import Records
from .records.ledger import Ledger, restore_carried
from .records.logs import LogOptions, RequestLogger
from .router import Route, Router
from .store import TokenStore, ensure_data_dir
from .sync import PushReceiver, RemoteSync, remote_api_key
from .tls import server_tls_context
from .util import log


try:  # optional: faster event loop
    import uvloop as _uvloop
    HAVE_UVLOOP = True
except ImportError:
    _uvloop = None
    HAVE_UVLOOP = False


MEMORY_TRIM_INTERVAL = 30.0   # seconds between returning freed heap to the OS (~1 ms each)
STARTUP_TRIM_DELAY = 1.0      # seconds after start: the collection takes ~10 ms, after the listeners open
GC_YOUNG_THRESHOLD = 10_000   # net container allocations between young collections in a serving process


def _release_startup_memory() -> None:
    """Compiling this module from source (script, zipapp, no bytecode cache) leaves ~20 MB of
    freed heap that glibc keeps; hand it back so a long-running proxy stays small."""
    import gc
    gc.collect()
    _trim_heap()


def _tune_gc() -> None:
    """The cyclic collector in a process that serves: the objects that exist once started
    (config, compiled rules, detector tables) are frozen, so a full collection no longer walks
    them (40-100 ms each on this heap, a pause every request in flight waits out), and young
    collections wait for GC_YOUNG_THRESHOLD net allocations rather than 700: with 64 requests
    in flight the live request objects alone passed 700, so every few requests a collection
    walked them and promoted them, only for refcounting to free them a moment later (64
    connections, typical policy, ~8,000 requests: ~400 collections, 140 ms of CPU -> none).
    Garbage cycles are still collected, a threshold's worth at a time."""
    import gc
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def _trim_heap() -> None:
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)


async def _trim_heap_periodically(tune_gc: bool = False) -> None:
    """Bursts of concurrent requests leave freed heap that glibc keeps; give it back now and
    then so the resident size follows the load down (SPEC §14: memory flat over a long run).
    `tune_gc`: the process only serves (see _tune_gc), set once start-up's garbage is gone."""
    await asyncio.sleep(STARTUP_TRIM_DELAY)
    _release_startup_memory()
    if tune_gc:
        _tune_gc()
    while True:
        await asyncio.sleep(MEMORY_TRIM_INTERVAL)
        _trim_heap()


def _lock_data_dir(directory: str) -> int:
    """One proxy per data dir: its budgets and usage journal live in this process's memory, so a
    second proxy on the same dir could not enforce them. The lock dies with the process (and
    with the workers of a supervisor, which inherit this same open file and serve under it)."""
    fd = os.open(os.path.join(ensure_data_dir(directory), "proxy.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeFailure(f"another tokenomics proxy is serving the data dir {directory} (a `serve` or "
                             "`start` that `tokenomics status` shows, or the proxy of a `tokenomics run` still "
                             "running); point clients at it (`tokenomics run --proxy-url URL`) or give this "
                             "proxy its own --dir") from None
    return fd


def check_available(config: Config, workers: int = 1) -> None:
    """Refuse, before anything starts, what the configuration or flags ask for but this version
    cannot do: nothing accepted may be silently ignored (SPEC §12)."""
    if workers < 1:
        raise UsageError(f"--workers: {workers} is not a number of processes; give 1 or more")
    if workers > 1 and config.session.backend == "memory":
        raise UsageError(f"--workers {workers}: with session.backend: memory each worker would keep its own "
                         "budgets and rate limits; configure session.backend: redis (with session.redis.addr) "
                         "so that all workers share them, or serve with one worker")
    if config.remote.url:
        remote_api_key(config, os.environ)  # a missing key is refused before anything starts


def build_state(config: Config) -> "tuple[State, UsageJournal | None]":
    """The limits state `session.backend` names: in-process counters made durable by the usage
    journal in the data dir, or Redis shared by every proxy that uses it (durable there)."""
    if config.session.backend == "redis":
        if not HAVE_REDIS:
            raise UsageError(f"config: {MISSING_REDIS}")
        return RedisState(config.session.redis), None
    state = MemoryState()
    journal = UsageJournal(os.path.join(config.dir, "usage.journal"))

    def restore(carried: list) -> bool:
        try:
            restored = restore_carried(config.dir, carried)
        except RuntimeFailure as exc:   # nothing is lost: the usage journal keeps them (no compaction)
            log.error("ledger: %s; the usage journal keeps those requests, and is not compacted until a "
                      "start can restore them", exc)
            return False
        if restored:
            log.warning("ledger: %d answered requests were missing from their session journal after the "
                        "proxy last stopped; restored them from the usage journal", restored)
        return True
    journal.replay(state, restore)
    return state, journal


class Proxy:
    """A running proxy: the collaborators built from config and the listeners serving them."""

    def __init__(self, config: Config, environ=None, admin: bool | None = None,
                 data_dir_lock: int | None = None, reuse_port: bool = False):
        """`admin`: serve the admin UI (default: `admin.enabled`; `run` passes --admin);
        `data_dir_lock`: an fd already holding the data dir's lock (a worker serves under its
        supervisor's); `reuse_port`: listen with SO_REUSEPORT beside the other workers."""
        check_available(config)
        defer_detector()   # the detector loads once the listeners are open (start), not before
        self.config = config
        self.environ = os.environ if environ is None else environ
        self._lock_fd = _lock_data_dir(config.dir) if data_dir_lock is None else data_dir_lock
        self.reuse_port = reuse_port
        self.catalog = Catalog(config, self.environ)
        self.store = TokenStore(config, self.catalog, self.environ)
        self.client = UpstreamClient(max_response_bytes=config.server.max_response_bytes)
        self.state, self.journal = build_state(config)
        if self.journal is not None and self.journal.charged_in_flight[0]:
            log.warning("usage journal: %d requests were in flight when the proxy last stopped without "
                        "settling them; charged their full reservations (%d tokens in all)",
                        *self.journal.charged_in_flight)
        self.ledger = Ledger(config.dir, cwd=os.getcwd()) if config.ledger.enabled else None
        webhooks = validate_webhooks(config.events.webhooks)
        self.dispatcher = WebhookDispatcher(webhooks) if webhooks else None
        options = LogOptions.from_config(config.logging, config.dir)
        self.records = Records(self.ledger, None if options.disable_request else RequestLogger(options),
                               self.dispatcher)
        self.records.data_dir = config.dir
        self.records.redis = config.session.redis
        self.records.environ = self.environ
        self.records.key_envs = frozenset(p.api_key_env for p in self.catalog.all() if p.api_key_env)
        if self.ledger is not None:
            self.records.session_id = self.ledger.session_id
        if self.dispatcher is not None:
            self.dispatcher.on_drop = self.records.metrics.inc_dropped_events
        self.sync = RemoteSync(config, self.store, self.environ) if config.remote.url else None
        self.push = PushReceiver(config.remote.webhook, self.sync.poke) \
            if self.sync is not None and config.remote.webhook.enabled else None
        self.pipeline = Pipeline(config, self.store, self.catalog, self.client, self.state, self.journal,
                                 self.environ, records=self.records)
        self._tasks: list[asyncio.Task] = []
        self.admin = None
        if config.admin.enabled if admin is None else (admin and config.admin.enabled):
            from .admin.api import AdminApp  # only a proxy that serves the page loads it
            from .admin.feed import EventHub
            hub = EventHub(self.dispatcher)   # webhooks still get every event; the live feed its share
            self.records.dispatcher = hub
            self.admin = AdminApp(self.pipeline, hub)
        self.router = Router(self.pipeline, self.admin)
        if self.push is not None:
            self.router.add(Route(self.push.path, self.push, ("POST",)))
        self.server = HTTPServer(self.router, max_body_bytes=config.server.max_body_bytes,
                                 header_timeout=config.server.header_timeout,
                                 max_connections=config.server.max_connections or default_max_connections(),
                                 write_timeout=config.server.write_timeout)
        self.urls: list[str] = []
        self.serving_process = False   # True: this process does nothing but serve (serve, a worker)

    async def start(self, ephemeral_tls: bool | None = None) -> list[str]:
        """Open the configured listeners, or with `ephemeral_tls` set one listener on a free
        loopback port (HTTPS when true) for `run` and `demo`."""
        cfg = self.config.server
        loop = asyncio.get_running_loop()
        if self.ledger is not None:
            self._tasks.append(loop.create_task(self.ledger.run_flusher()))
        if self.dispatcher is not None:
            self._tasks.append(loop.create_task(self.dispatcher.run()))
        self._tasks.append(loop.create_task(_trim_heap_periodically(self.serving_process)))
        if self.sync is not None:
            await self.sync.start()
            self._tasks.append(loop.create_task(self.sync.run()))
        self.records.emit("server.start", {"version": __version__,
                                           "session_id": self.ledger.session_id if self.ledger else ""})
        if ephemeral_tls is not None:
            context = server_tls_context(self.config) if ephemeral_tls else None
            if ephemeral_tls and context is None:
                raise UsageError("--tls: HTTPS needs the TLS extra: pip install 'tokenomics[tls]'")
            self.urls.append(await self._listen("127.0.0.1", 0, context))
            load_deferred_detector()
            return self.urls
        if not cfg.http_port and (not cfg.https_port or not cfg.tls.enabled):
            raise UsageError("--port: both listeners are disabled; give --port or --https-port a port number")
        if cfg.http_port:
            self.urls.append(await self._listen(cfg.host, cfg.http_port, None))
        if cfg.https_port and cfg.tls.enabled:
            context = server_tls_context(self.config)
            if context is not None:
                self.urls.append(await self._listen(cfg.host, cfg.https_port, context))
        load_deferred_detector()
        return self.urls

    async def _listen(self, host: str, port: int, context) -> str:
        try:
            server = await self.server.listen(host, port, context, reuse_port=self.reuse_port)
        except OSError as exc:
            raise RuntimeFailure(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        bound = server.sockets[0].getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        return f"{'https' if context else 'http'}://{shown}:{bound}"

    async def stop(self) -> None:
        if self.admin is not None:
            self.admin.hub.close()  # open live feeds end now, not after the grace period
        await self.server.shutdown(self.config.server.grace_period)
        self.client.close()
        if self.sync is not None:
            self.sync.close()
        if self.dispatcher is not None:
            await self.dispatcher.close(timeout=5.0)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            if self.ledger is not None:
                self.ledger.close()
            if self.journal is not None:
                self.journal.commit(self.state, compact=False)
                # The log may carry answered requests' ledger lines the ledger could not write (a
                # full disk): then it keeps them for the next start to restore.
                if self.ledger is None or self.ledger.sync():
                    self.journal.compact(self.state)
                self.journal.close()
            self.state.close()
        finally:
            # Last, and even when a final write failed (this process writes nothing more): a proxy
            # that takes the data dir then must find the journal as this one leaves it, not have its
            # own lines truncated by this one's compaction.
            os.close(self._lock_fd)


async def _serve_until_signal(proxy: Proxy, ready: Callable[[list[str]], None] | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    proxy.serving_process = True
    urls = await proxy.start()
    if ready is not None:
        ready(urls)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await proxy.stop()


class BackgroundProxy:
    """A proxy on its own event loop in a thread: for `run` and `demo`, which keep the main
    thread for the wrapped command or the walkthrough."""

    def __init__(self, proxy: Proxy):
        self.proxy = proxy
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tokenomics-proxy", daemon=True)
        self.urls: list[str] = []

    def start(self, tls: bool = False) -> list[str]:
        self.thread.start()
        self.urls = asyncio.run_coroutine_threadsafe(self.proxy.start(ephemeral_tls=tls), self.loop).result(30)
        return self.urls

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.proxy.stop(), self.loop).result(
                self.proxy.config.server.grace_period + 10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


def run_async(coro):
    if HAVE_UVLOOP:
        return _uvloop.run(coro)
    return asyncio.run(coro)
