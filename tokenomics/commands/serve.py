"""`tokenomics serve`, `start`, `stop`, `status` and `remote`: the proxy's lifecycle, and the pid
and state files by which the other commands find a running proxy."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
import time
from typing import TYPE_CHECKING

from ..errors import RuntimeFailure, TokenomicsError
from . import err, http_get, load, out, print_json, serve_overrides, worker_count

if TYPE_CHECKING:
    from ..config import Config


def cmd_serve(args) -> int:
    from ..proxy import check_available
    config = load(args, serve_overrides(args))
    workers = worker_count(args, config)
    check_available(config, workers)

    def announce(urls):
        _write_run_files(config, urls, workers)  # before the ready lines: `start` waits for those
        for url in urls:
            err(f"tokenomics listening on {url}")

    announcing: list = []

    def ready(urls):
        # In a thread: the files take a few ms of disk each, and the proxy already answers.
        thread = threading.Thread(target=announce, args=(urls,), name="tokenomics-announce", daemon=True)
        announcing.append(thread)
        thread.start()

    if workers > 1:
        from ..workers import Supervisor
        try:
            return Supervisor(config, workers, on_ready=announce).run()
        finally:
            _remove_run_files(config)
    from ..proxy import Proxy, _serve_until_signal, run_async
    proxy = Proxy(config)
    try:
        run_async(_serve_until_signal(proxy, ready))
    finally:
        for thread in announcing:   # its files must not appear after they are removed
            thread.join()
        _remove_run_files(config)
    return 0


def cmd_remote(args) -> int:
    from ..proxy import run_async
    from ..remote import parse_addr, remote_key, serve_remote
    host, port = parse_addr(args.addr)
    config = load(args)
    key = remote_key(os.environ, args.api_key_env, host)
    run_async(serve_remote(config, host, port, key, tls=args.tls,
                           ready=lambda url: err(f"tokenomics remote listening on {url}")))
    return 0


def _pid_path(config: Config) -> str:
    return os.path.join(config.dir, "tokenomics.pid")


def _state_path(config: Config) -> str:
    """What the CLI needs beyond the pid (start time, command line, URLs), kept apart so the pid
    file holds the pid alone, as `kill $(cat ...)` and service managers expect."""
    return os.path.join(config.dir, "tokenomics.state.json")


def _self_command() -> list[str]:
    """How to start this same program again (source file, installed module or zipapp). It is
    imported rather than run as a script: Python keeps a script's whole syntax tree (~20 MB for
    this module) alive while it runs, an imported module's is freed after compiling."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(__file__):  # inside the zipapp: its __main__ imports the package
        return [sys.executable, os.path.dirname(package)]
    return [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv.pop(1)); "
            "from tokenomics.cli import main; sys.exit(main())", os.path.dirname(package)]


def _process_start(pid: int) -> str | None:
    """The kernel's start time of a process (field 22 of /proc/PID/stat), or None off Linux.
    Recorded by `serve` so a recycled pid is never mistaken for our proxy."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _process_cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [part.decode("utf-8", "surrogateescape") for part in fh.read().split(b"\0")[:-1]]
    except OSError:
        return None


def _process_alive(pid: int, started: str | None = None) -> bool:
    """Whether pid runs (a zombie nobody reaped yet does not), and started at `started` if given."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return False
    if started is None:
        return True
    current = _process_start(pid)
    return current is None or current == started


def proxy_alive(info: dict | None) -> bool:
    """True only for a process verified to be this data dir's proxy: the state file written by
    its `serve` names the same pid, and the kernel's start time and command line of that pid
    are the ones recorded, so a stale, recycled or foreign pid never passes."""
    if not info or not info.get("state") or info["pid"] <= 1 or info["pid"] == os.getpid():
        return False
    state, pid = info["state"], info["pid"]
    if state.get("pid") != pid or not state.get("proc_start") or not isinstance(state.get("cmdline"), list):
        return False
    if not _process_alive(pid) or _process_start(pid) != state["proc_start"]:
        return False
    return _process_cmdline(pid) == state["cmdline"] and "serve" in state["cmdline"]


def read_pid(config: Config) -> dict | None:
    """{"pid", "state", "url"} from the pid file and the state file beside it (state None when
    it is missing or unreadable), or None without a pid file. A pid file that does not hold a
    pid gives pid 0 and "bad": nothing is ever signalled for it."""
    try:
        with open(_pid_path(config), encoding="utf-8") as fh:
            text = fh.read().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RuntimeFailure(f"cannot read the pid file {_pid_path(config)}: {exc.strerror or exc}") from None
    if not text.isdigit():
        return {"pid": 0, "state": None, "url": None, "bad": True}
    state = None
    with contextlib.suppress(OSError, ValueError):
        with open(_state_path(config), encoding="utf-8") as fh:
            state = json.load(fh)
    state = state if isinstance(state, dict) else None
    return {"pid": int(text), "state": state, "url": (state or {}).get("url")}


def _write_run_files(config: Config, urls: list[str], workers: int = 1) -> None:
    """Written by `serve` itself once it listens (a foreground serve counts as running too); with
    several workers by their supervisor, whose pid alone is in the pid file."""
    from ..util import utc_iso, write_private
    pid = os.getpid()
    url = next((u for u in urls if u.startswith("http://")), urls[0] if urls else None)
    state = {"pid": pid, "proc_start": _process_start(pid), "cmdline": _process_cmdline(pid),
             "dir": config.dir, "started_at": utc_iso(time.time()), "url": url, "urls": urls,
             "workers": workers, "backend": config.session.backend}
    # Between the listeners opening and the first answer: no fsyncs (4 of them took 20-40 ms of
    # the start on a small VM's disk) for files that mean nothing once the machine is down.
    write_private(_state_path(config), json.dumps(state, indent=2).encode(), durable=False)
    write_private(_pid_path(config), f"{pid}\n".encode(), durable=False)


def _remove_run_files(config: Config, pid: int | None = None) -> None:
    """Remove the pid and state files, but only while they name `pid` (default: this process),
    so an exiting proxy never deletes a newer one's."""
    pid = os.getpid() if pid is None else pid
    with contextlib.suppress(RuntimeFailure):
        info = read_pid(config)
        if info is not None and info["pid"] != pid:
            return
    for path in (_pid_path(config), _state_path(config)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def cmd_start(args) -> int:
    import subprocess

    from ..proxy import check_available
    from ..store import ensure_data_dir
    config = load(args, serve_overrides(args))
    check_available(config, worker_count(args, config))
    ensure_data_dir(config.dir)
    info = read_pid(config)
    if proxy_alive(info):
        err(f"tokenomics is already running (pid {info['pid']})")
        out(info.get("url") or "")
        return 0
    log_path = os.path.join(config.dir, "tokenomics.log")
    argv = _self_command() + ["--dir", config.dir] + (["--config", config.source] if config.source else []) + \
        ["serve"] + sum(([flag, str(value)] for flag, value in (
            ("--host", args.host), ("--port", args.port), ("--https-port", args.https_port),
            ("--upstream-url", args.upstream_url), ("--workers", args.workers)) if value is not None), []) + \
        (["--no-tls"] if args.no_tls else [])
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    offset = os.lseek(fd, 0, os.SEEK_END)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True)
    os.close(fd)
    deadline = time.monotonic() + 15
    urls: list[str] = []
    while time.monotonic() < deadline:
        with open(log_path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", "replace")
        urls = re.findall(r"tokenomics listening on (\S+)", text)
        if urls:
            break
        if proc.poll() is not None:
            raise RuntimeFailure(f"start: the proxy exited with code {proc.returncode}:\n{text.strip()}")
        time.sleep(0.02)
    else:
        proc.terminate()
        raise RuntimeFailure(f"start: the proxy did not become ready within 15 s; see {log_path}")
    out(next((u for u in urls if u.startswith("http://")), urls[0]))
    return 0


STOP_POLL_INTERVAL = 0.05   # seconds between checks that a signalled proxy has exited


def cmd_stop(args) -> int:
    import signal
    config = load(args)
    info = read_pid(config)
    if info is None:
        err("tokenomics is not running")
        return 0
    pid, pid_file = info["pid"], _pid_path(config)
    if info.get("bad"):
        raise RuntimeFailure(f"stop: the pid file {pid_file} does not hold a pid, so nothing was signalled; "
                             "remove it if no tokenomics proxy is running for this data dir")
    if not proxy_alive(info):
        if pid <= 1 or _process_alive(pid):
            why = ("that is the init process or no process" if pid <= 1 else
                   "it has no state file beside it" if info["state"] is None else
                   "that process is not the tokenomics proxy serving this data dir")
            err(f"tokenomics: {pid_file} names pid {pid}, but {why}; it was not signalled. If no proxy runs for "
                 f"this data dir, remove {pid_file}")
            return 1
        _remove_run_files(config, pid)
        err(f"tokenomics is not running (removed a stale pid file for pid {pid})")
        return 0
    try:
        os.kill(pid, signal.SIGTERM)
    except PermissionError:
        raise RuntimeFailure(f"stop: not permitted to signal pid {pid}; the proxy runs as another user, stop it "
                             "as that user") from None
    except ProcessLookupError:
        pass  # it exited on its own meanwhile
    deadline = time.monotonic() + config.server.grace_period + 5
    while time.monotonic() < deadline and proxy_alive(info):
        time.sleep(STOP_POLL_INTERVAL)
    if proxy_alive(info):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        err(f"tokenomics (pid {pid}) did not stop within the grace period and was killed")
        kill_deadline = time.monotonic() + 5
        while time.monotonic() < kill_deadline and proxy_alive(info):
            time.sleep(STOP_POLL_INTERVAL)
    _remove_run_files(config, pid)
    err(f"tokenomics stopped (pid {pid})")
    return 0


def cmd_status(args) -> int:
    from ..limits.redis_state import shown_addr
    from ..providers import Catalog
    from ..store import TokenStore
    from ..tls import cert_dir
    from ..util import printable
    from .provider import provider_key_presence
    config = load(args)
    catalog = Catalog(config)
    info = read_pid(config)
    running = proxy_alive(info)
    url = info.get("url") if running else None
    if running and url:
        running = http_get(url + "/health", cafile=os.path.join(cert_dir(config), "ca.crt"))[0] == 200
    unreadable = ""
    try:
        tokens = len(TokenStore(config, catalog).records())
    except TokenomicsError as exc:  # a wrong hash or encryption key: say which, as every command does
        tokens, unreadable = None, str(exc)
    workers = (info["state"].get("workers") if running else None) or (1 if running else None)
    status = {"running": running, "pid": info["pid"] if running else None, "url": url if running else None,
              "tokens": tokens, "providers": provider_key_presence(catalog),
              "backend": config.session.backend, "workers": workers}
    if args.json:
        print_json(status)
        return 0
    out(f"tokenomics is {'running' if running else 'stopped'}" +
         (f" at {printable(url)} (pid {status['pid']}, {workers} worker{'s' if workers != 1 else ''})"
          if running else ""))
    out(f"tokens: {tokens}" if tokens is not None else f"tokens: unreadable: {printable(unreadable)}")
    keys = ", ".join(f"{name} {'set' if ok else 'missing'}" for name, ok in sorted(status["providers"].items()))
    out(f"provider keys: {printable(keys)}")
    if config.session.backend == "redis":
        out(f"limits: redis at {printable(shown_addr(config.session.redis.addr))} "
             f"(prefix {printable(config.session.redis.prefix)})")
    else:
        out("limits: memory (in the proxy process, journaled in the data dir)")
    return 0

