"""Several proxy processes on one port: the supervisor behind `serve --workers N` (SPEC §12).

The supervisor is the process `serve` started (its pid is the one in `{dir}/tokenomics.pid`).
It takes the data dir's lock, binds every listener's port itself with SO_REUSEPORT (so a port
in use is refused once, before anything forks, and the port stays ours while workers come and
go), then forks N workers. Each worker is a whole `Proxy` with its own listening socket on that
port (SO_REUSEPORT: the kernel spreads new connections over them), its own ledger session and
its own event dispatcher; the kernel keeps the supervisor's sockets out of the accept queue
because they never listen. The supervisor prints nothing itself: `on_ready` is called once,
when every worker has said it is listening.

What the workers share, and how:
- Budgets, usage counters, reservations, rate-limit windows and parallel slots live in Redis
  (`session.backend: redis`, which N > 1 requires): every verdict is one server-side script,
  so N workers enforce one limit. Usage durability is Redis's too, so no worker opens the
  data dir's usage journal (`{dir}/usage.journal` belongs to the in-process backend); several
  writers can never interleave in it.
- Tokens: each worker reads `tokens.json` and reloads it when it changes, as one proxy does.
- Records: one ledger session per worker (`sessions/<date>_<id>.jsonl` and `.json`); the
  ledger commands read them all. `/stats` and `/metrics` describe the worker that answered.
- The data-dir lock: the supervisor holds it and its workers inherit that same open file,
  so they serve under it while a second, unrelated proxy on the dir is still refused.

Lifecycle: a worker that dies is forked again after a delay that doubles with each death in
a row of a worker that had not run RESTART_STABLE_AFTER seconds (so a crash loop idles
instead of spinning). SIGTERM or SIGINT to the supervisor sends SIGTERM to every worker, each
finishes its in-flight requests within the grace period and writes its ledger session; the
supervisor then exits 0. Workers die with the supervisor even when it is killed outright:
PR_SET_PDEATHSIG on Linux, and everywhere a lifeline pipe whose end of file stops them.
"""

import asyncio
import contextlib
import dataclasses
import json
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Callable

from .config import Config
from .errors import RuntimeFailure, TokenomicsError, UsageError
from .util import log


RESTART_DELAY_FIRST = 0.25     # seconds before the first restart of a worker that died
RESTART_DELAY_MAX = 30.0       # seconds: the ceiling of the doubling, so a crash loop costs ~nothing
RESTART_STABLE_AFTER = 10.0    # seconds a worker must have run for its death to start a fresh count
READY_TIMEOUT = 30.0           # seconds all workers get to listen at start (Proxy start is ~0.3 s)
STOP_MARGIN = 5.0              # seconds past the grace period before a stopping worker is killed
POLL_INTERVAL = 0.5            # seconds: upper bound of a loop turn; signals and pipes wake it sooner
_STATUS_LINE_MAX = 64 * 1024   # bytes: a worker's status line (URLs or one error message)
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1          # linux/prctl.h


def restart_delay(failures: int) -> float:
    """Seconds to wait before restarting a worker after `failures` quick deaths in a row."""
    if failures <= 1:
        return RESTART_DELAY_FIRST
    return min(RESTART_DELAY_MAX, RESTART_DELAY_FIRST * 2 ** min(failures - 1, 32))


def _exit_description(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(sig).name}"
        return f"killed by signal {sig}"
    return f"exited with code {os.WEXITSTATUS(status)}"


def _listener_ports(config: Config) -> list[tuple[str, int]]:
    """(name of the config field, port) of each listener the workers will open."""
    server = config.server
    ports = [("http_port", server.http_port)] if server.http_port else []
    if server.https_port and server.tls.enabled:
        ports.append(("https_port", server.https_port))
    return ports


def reserve_port(host: str, port: int) -> tuple[int, list[socket.socket]]:
    """Bind (without listening) one SO_REUSEPORT socket per address of `host` on `port`, port 0
    picking a free one; returns the port and the sockets. While they are open the port is ours
    (another user cannot join a reuse-port group) and workers bind beside them."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise UsageError("--workers: this system has no SO_REUSEPORT, which several workers on one port "
                         "need; serve with one worker")
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise RuntimeFailure(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    addresses = list(dict.fromkeys((family, addr[:2]) for family, _, _, _, addr in infos))
    sockets: list[socket.socket] = []
    try:
        for family, addr in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio binds each family
            sock.bind((addr[0], port) + ((0, 0) if family == socket.AF_INET6 else ()))
            port = sock.getsockname()[1]  # port 0: the others take the port the first one got
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise RuntimeFailure(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return port, sockets


@dataclass(frozen=True, slots=True)
class WorkerLink:
    """What a worker process holds of its supervisor: the data-dir lock it serves under, the
    pipe it reports on (one JSON line: {"ready": urls} or {"error": message, "code": exit code})
    and the lifeline (end of file: the supervisor is gone, stop). A worker starts with SIGTERM
    and SIGINT blocked; `ready()` unblocks them, so call it once those signals stop it well."""
    slot: int
    lock_fd: int
    status_fd: int
    lifeline_fd: int

    def report(self, **message) -> None:
        line = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        with contextlib.suppress(OSError):
            os.write(self.status_fd, line[:_STATUS_LINE_MAX])

    def ready(self, urls: list[str]) -> None:
        self.report(ready=urls)
        # A stop signal that arrived since the fork is delivered now, to handlers that stop well.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def serve_worker(config: Config, link: WorkerLink) -> int:
    """A worker's whole life: one Proxy serving on the shared port until SIGTERM (or the
    lifeline ends), then a graceful stop that writes its ledger session. Returns the exit code."""
    from .proxy import Proxy, _serve_until_signal, run_async  # proxy imports nothing of this module

    def ready(urls: list[str]) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(link.lifeline_fd, _lifeline_readable, loop, link.lifeline_fd)
        link.ready(urls)  # the loop's signal handlers are in place: SIGTERM now stops gracefully

    try:
        proxy = Proxy(config, data_dir_lock=link.lock_fd, reuse_port=True)
        run_async(_serve_until_signal(proxy, ready))
    except TokenomicsError as exc:
        code = 2 if isinstance(exc, UsageError) else 1
        link.report(error=str(exc), code=code)
        return code
    return 0


def _lifeline_readable(loop, fd: int) -> None:
    try:
        data = os.read(fd, 64)
    except BlockingIOError:
        return
    except OSError:
        data = b""
    if not data:  # the supervisor is gone: stop as if it had sent SIGTERM
        loop.remove_reader(fd)
        os.kill(os.getpid(), signal.SIGTERM)


def _set_parent_death_signal() -> None:
    """Ask Linux to send SIGTERM when the supervisor dies (a no-op elsewhere; the lifeline
    pipe covers that case too)."""
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


@dataclass(slots=True)
class _Worker:
    slot: int
    pid: int = 0
    status_fd: int = -1
    buffer: bytes = b""
    started: float = 0.0
    ready: bool = False
    failures: int = 0             # quick deaths in a row
    restart_at: float | None = None


class Supervisor:
    """Runs N workers (see the module docstring). `worker_main(config, link) -> exit code` is
    what a forked worker runs; `on_ready(urls)` is called once, when all of them listen."""

    def __init__(self, config: Config, workers: int, on_ready: Callable[[list[str]], None] | None = None,
                 worker_main: Callable[[Config, WorkerLink], int] = serve_worker):
        if workers < 1:
            raise UsageError(f"--workers: {workers} is not a number of processes; give 1 or more")
        self.config = config
        self.count = workers
        self.on_ready = on_ready
        self.worker_main = worker_main
        self.urls: list[str] = []
        self._workers = [_Worker(slot) for slot in range(workers)]
        self._sockets: list[socket.socket] = []
        self._lock_fd = -1
        self._pid = 0
        self._wake_r = self._wake_w = -1
        self._lifeline_r = self._lifeline_w = -1
        self._stopping = False
        self._announced = False
        self._failure: TokenomicsError | None = None

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self._workers if w.pid]

    # --- the supervisor process ----------------------------------------------------------------

    def run(self) -> int:
        """Start the workers, supervise them until SIGTERM/SIGINT, stop them; returns 0 after a
        graceful stop. A start that fails raises the first worker's error (UsageError: exit 2)."""
        from .proxy import _lock_data_dir
        self._pid = os.getpid()
        self._prepare()
        self._lock_fd = _lock_data_dir(self.config.dir)
        previous = {}
        try:
            self._wake_r, self._wake_w = os.pipe()
            self._lifeline_r, self._lifeline_w = os.pipe()
            for fd in (self._wake_r, self._wake_w):
                os.set_blocking(fd, False)
            self._reserve_ports()
            previous = {sig: signal.signal(sig, self._on_signal) for sig in (*_STOP_SIGNALS, signal.SIGCHLD)}
            signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
            for worker in self._workers:
                self._spawn(worker)
            self._supervise()
        finally:
            self._stop_all()
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(-1)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._close_fds()
        if self._failure is not None:
            raise self._failure
        return 0

    def _prepare(self) -> None:
        """What every worker would otherwise race to do on a fresh data dir, done once here:
        generate the hash key and the TLS certificates (or settle that HTTPS is off)."""
        from .store import ensure_data_dir, load_hash_key
        from .tls import server_tls_context
        ensure_data_dir(self.config.dir)
        load_hash_key(self.config)
        server = self.config.server
        if server.https_port and server.tls.enabled and server_tls_context(self.config) is None:
            self.config = dataclasses.replace(self.config, server=dataclasses.replace(server, https_port=0))
        if not _listener_ports(self.config):
            raise UsageError("--port: both listeners are disabled; give --port or --https-port a port number")

    def _reserve_ports(self) -> None:
        server = self.config.server
        chosen = {}
        for field, port in _listener_ports(self.config):
            chosen[field], sockets = reserve_port(server.host, port)
            self._sockets.extend(sockets)
        self.config = dataclasses.replace(self.config, server=dataclasses.replace(server, **chosen))

    def _on_signal(self, signum, _frame) -> None:
        if signum in _STOP_SIGNALS:
            self._stopping = True
        # SIGCHLD: nothing to do here; the wakeup fd ends the loop's wait and it reaps

    def _supervise(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._stopping and self._failure is None:
            now = time.monotonic()
            due = [w.restart_at for w in self._workers if w.restart_at is not None]
            timeout = max(0.0, min([POLL_INTERVAL, *(t - now for t in due)]))
            fds = [self._wake_r] + [w.status_fd for w in self._workers if w.status_fd >= 0]
            try:
                readable, _, _ = select.select(fds, [], [], timeout)
            except InterruptedError:
                readable = []
            if self._wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 4096):
                        pass
            for worker in self._workers:
                if worker.status_fd in readable:
                    self._read_status(worker)
            self._reap()
            now = time.monotonic()
            for worker in self._workers:
                if worker.restart_at is not None and now >= worker.restart_at and not self._stopping:
                    self._spawn(worker)
            if not self._announced:
                if all(w.ready for w in self._workers):
                    self._announced = True
                    if self.on_ready is not None:
                        self.on_ready(self.urls)
                elif now > deadline and self._failure is None:
                    self._failure = RuntimeFailure(f"--workers {self.count}: the workers did not become ready "
                                                   f"within {READY_TIMEOUT:.0f} s")

    def _spawn(self, worker: _Worker) -> None:
        worker.restart_at = None
        status_r, status_w = os.pipe()
        # Stop signals stay blocked in the child until its event loop handles them (WorkerLink).
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            os.close(status_r)
            os.close(status_w)
            log.error("cannot start worker %d: %s; trying again", worker.slot, exc.strerror or exc)
            self._schedule_restart(worker, quick=True)
            return
        if pid == 0:
            self._become_worker(worker, status_r, status_w)  # never returns
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        os.close(status_w)
        os.set_blocking(status_r, False)
        worker.pid, worker.status_fd, worker.buffer = pid, status_r, b""
        worker.started, worker.ready = time.monotonic(), False

    def _read_status(self, worker: _Worker) -> None:
        try:
            data = os.read(worker.status_fd, _STATUS_LINE_MAX)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the worker closed its end: it exited (or is about to); _reap handles it
            os.close(worker.status_fd)
            worker.status_fd = -1
            return
        worker.buffer = (worker.buffer + data)[-_STATUS_LINE_MAX:]
        while b"\n" in worker.buffer:
            line, worker.buffer = worker.buffer.split(b"\n", 1)
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if not isinstance(message, dict):
                continue
            if isinstance(message.get("ready"), list):
                worker.ready = True
                if not self.urls:
                    self.urls = [str(url) for url in message["ready"]]
                if self._announced:
                    log.info("worker %d (pid %d) is serving again", worker.slot, worker.pid)
            elif isinstance(message.get("error"), str):
                text = message["error"]
                if not self._announced and self._failure is None:
                    self._failure = (UsageError if message.get("code") == 2 else RuntimeFailure)(text)
                elif self._announced:
                    log.error("worker %d (pid %d) could not start: %s", worker.slot, worker.pid, text)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = next((w for w in self._workers if w.pid == pid), None)
            if worker is None:
                continue
            if worker.status_fd >= 0:
                self._read_status(worker)  # an error line written just before exiting
                if worker.status_fd >= 0:
                    os.close(worker.status_fd)
                    worker.status_fd = -1
            lived = time.monotonic() - worker.started
            was_ready, worker.pid, worker.ready = worker.ready, 0, False
            if self._stopping:
                continue
            if not self._announced:
                if self._failure is None:
                    self._failure = RuntimeFailure(f"--workers {self.count}: worker {worker.slot} "
                                                   f"{_exit_description(status)} before it was ready")
                continue
            delay = self._schedule_restart(worker, quick=not was_ready or lived < RESTART_STABLE_AFTER)
            log.warning("worker %d (pid %d) %s; starting a new one in %.2f s", worker.slot, pid,
                        _exit_description(status), delay)

    def _schedule_restart(self, worker: _Worker, quick: bool) -> float:
        worker.failures = worker.failures + 1 if quick else 1
        delay = restart_delay(worker.failures)
        worker.restart_at = time.monotonic() + delay
        return delay

    def _stop_all(self) -> None:
        """SIGTERM every worker, wait for them up to the grace period (+ margin), then SIGKILL
        what is left. Ignores further stop signals: stopping is already under way."""
        self._stopping = True
        for worker in self._workers:
            worker.restart_at = None
            if worker.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.server.grace_period + STOP_MARGIN
        while self.pids and time.monotonic() < deadline:
            self._reap()
            if self.pids and self._wake_r >= 0:
                with contextlib.suppress(InterruptedError):
                    select.select([self._wake_r], [], [], min(0.1, max(0.0, deadline - time.monotonic())))
                with contextlib.suppress(BlockingIOError, OSError):
                    while os.read(self._wake_r, 4096):
                        pass
            elif self.pids:
                time.sleep(0.05)
        for worker in self._workers:
            if worker.pid:
                log.error("worker %d (pid %d) did not stop within the grace period; killing it",
                          worker.slot, worker.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(worker.pid, 0)
                worker.pid = 0

    def _close_fds(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        for worker in self._workers:
            if worker.status_fd >= 0:
                os.close(worker.status_fd)
                worker.status_fd = -1
        for name in ("_wake_r", "_wake_w", "_lifeline_r", "_lifeline_w", "_lock_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)

    # --- the worker process, right after fork ----------------------------------------------------

    def _become_worker(self, worker: _Worker, status_r: int, status_w: int) -> None:
        code = 1
        try:
            _set_parent_death_signal()
            if os.getppid() != self._pid:  # the supervisor died before the death signal was set
                os._exit(0)
            for sig in (signal.SIGTERM, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.set_wakeup_fd(-1)
            # Only the supervisor may hold these: the lifeline's write end (or its end of file
            # would never come), the other workers' status pipes, the reserved sockets.
            parent_fds = [status_r, self._wake_r, self._wake_w, self._lifeline_w]
            parent_fds += [w.status_fd for w in self._workers if w.status_fd >= 0]
            for fd in parent_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            for sock in self._sockets:
                sock.close()
            os.set_blocking(self._lifeline_r, False)
            link = WorkerLink(worker.slot, self._lock_fd, status_w, self._lifeline_r)
            code = self.worker_main(self.config, link)
        except KeyboardInterrupt:
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # noqa: BLE001 - a worker must end in os._exit, never unwind
            with contextlib.suppress(Exception):
                log.error("worker %d failed: internal error (%s)", worker.slot, type(exc).__name__)
            code = 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)

