"""Shared fixtures: the CLI as a subprocess, a stub upstream, and real `tokenomics serve` processes."""
import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from stub_upstream import StubUpstream  # noqa: E402

# The CLI as users run it from a checkout: this checkout's package first on the path.
TOKENOMICS = [sys.executable, "-m", "tokenomics"]
OPENAI_KEY = "sk-upstream-openai-0123456789abcdef"
ANTHROPIC_KEY = "sk-ant-upstream-0123456789abcdef"


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (the default addopts): two workers per core. Much of the suite waits (leases
    running out, grace periods, sync intervals, proxies starting), so a worker per core leaves
    the cores idle; on 2 cores 4 workers take the suite from ~107 s to ~83 s."""
    return 2 * (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


# One TLS context for every SDK client the tests build: an SDK client otherwise loads the CA
# bundle afresh (30-50 ms, more than most requests it sends); each client keeps its own pool.
_SDK_TLS = None


def sdk_http_client(sdk):
    """`sdk.DefaultHttpxClient` (openai or anthropic: the SDK's own defaults) on the shared
    TLS context."""
    global _SDK_TLS
    if _SDK_TLS is None:
        import ssl
        _SDK_TLS = ssl.create_default_context()
    return sdk.DefaultHttpxClient(verify=_SDK_TLS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(data_dir: Path, **extra) -> dict:
    """A clean environment: no provider keys or tokenomics settings leak in from the machine."""
    # PYTHONDONTWRITEBYTECODE is dropped too: with it, each of the suite's ~250 interpreters
    # compiles the package from source again (~0.1 s of CPU each); without it, the first one
    # caches the bytecode (in the gitignored __pycache__) and the others read it.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TOKENOMICS_", "OPENAI_", "ANTHROPIC_")) and k != "PYTHONDONTWRITEBYTECODE"}
    env.update({"TOKENOMICS_DIR": str(data_dir), "OPENAI_API_KEY": OPENAI_KEY,
                "ANTHROPIC_API_KEY": ANTHROPIC_KEY, "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    env.update({k: v for k, v in extra.items() if v is not None})
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
    return env


# Commands that only read and write the data dir and print: these run `tokenomics.cli.main` in
# this process (the same code `python -m tokenomics` runs, without 0.2-0.5 s of interpreter start
# per call). Commands that serve, fork, wait on signals or run other programs (serve, run, start,
# stop, status, remote, demo, doctor) always run as a subprocess, as do calls with their own
# PYTHON* variables, and so does everything when
# TOKENOMICS_TEST_SUBPROCESS=1 (to check that both ways agree).
IN_PROCESS = frozenset({"token", "ledger", "guard", "provider", "completion", "version", "init"})


def in_process(args, env: dict) -> bool:
    if os.environ.get("TOKENOMICS_TEST_SUBPROCESS"):
        return False
    # What the interpreter itself reads (a planted sitecustomize, -X options) needs a new one.
    if {k: v for k, v in env.items() if k.startswith("PYTHON")} != _INTERPRETER_ENV:
        return False
    args = [str(a) for a in args]
    if args[:1] in (["--version"], ["--help"], ["-h"]):
        return True
    words = [a for a in args if not a.startswith("-")]
    return bool(words) and words[0] in IN_PROCESS


_INTERPRETER_ENV = {k: v for k, v in base_env(Path(".")).items() if k.startswith("PYTHON")}


def run_in_process(args: list, cwd: Path, env: dict, input: str | None) -> subprocess.CompletedProcess:
    """`python -m tokenomics ARGS` as main(ARGS) here: its own environment, working directory,
    standard streams and logging handler for the call, all restored after it."""
    import contextlib
    import io
    import traceback

    from tokenomics.cli import main
    saved_env, saved_cwd, saved_stdin = dict(os.environ), os.getcwd(), sys.stdin
    logger = logging.getLogger("tokenomics")
    saved_handlers, saved_level, saved_propagate = logger.handlers[:], logger.level, logger.propagate
    stdout, stderr = io.StringIO(), io.StringIO()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.stdin = io.TextIOWrapper(io.BytesIO((input or "").encode()), encoding="utf-8")
    logger.handlers = []
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # what the interpreter does with an exception main() let out
                traceback.print_exc()
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        sys.stdin = saved_stdin
        logger.handlers, logger.level, logger.propagate = saved_handlers, saved_level, saved_propagate
    return subprocess.CompletedProcess([*TOKENOMICS, *args], int(code or 0), stdout.getvalue(), stderr.getvalue())


class CLI:
    """Runs `python -m tokenomics ...` with a given data dir and environment."""

    def __init__(self, data_dir: Path, cwd: Path, env: dict | None = None):
        self.data_dir, self.cwd = data_dir, cwd
        self.env = env or base_env(data_dir)

    def __call__(self, *args, env: dict | None = None, input: str | None = None, timeout: float = 60,
                 check: bool = False, subprocess_only: bool = False) -> subprocess.CompletedProcess:
        if not subprocess_only and in_process(args, env or self.env):
            proc = run_in_process(list(args), cwd=self.cwd, env=env or self.env, input=input)
        else:
            proc = subprocess.run([*TOKENOMICS, *args], cwd=self.cwd, env=env or self.env,
                                  input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"tokenomics {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def token(self, policy: dict | None = None, *extra) -> str:
        proc = self("token", "create", "--policy", json.dumps(policy or {}), "--json", *extra, check=True)
        return json.loads(proc.stdout)["token"]


class ProxyProcess:
    """`tokenomics serve` in a subprocess on a free loopback port; stderr is collected."""

    def __init__(self, cli: CLI, args: list, env: dict):
        self.cli, self.args, self.env = cli, args, env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_lines: list[str] = []
        self.proc = None

    def start(self, timeout: float = 15.0) -> "ProxyProcess":
        self.proc = subprocess.Popen(
            [*TOKENOMICS, "serve", "--port", str(self.port), "--no-tls", *self.args],
            cwd=self.cli.cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # One thread reads stderr from the start (select() on the pipe under a buffered reader
        # misses a line that arrived in the same read as the one before it).
        self._ready = threading.Event()
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()
        if self._ready.wait(timeout) and any("listening on" in line for line in self.stderr_lines):
            return self
        self.proc.kill()
        self._drainer.join(5.0)
        raise AssertionError("proxy did not become ready:\n" + "".join(self.stderr_lines))

    def _drain(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line)
            if "listening on" in line:
                self._ready.set()
        self._ready.set()  # end of stderr: the process is gone

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def stop(self, sig=signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
            self._drainer.join(5)  # every line the proxy wrote is in stderr_lines
            return code
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError("proxy did not stop within the grace period")


class InProcessProxy:
    """`tokenomics serve` as the same objects in this process: the real server on a loopback port,
    on its own event loop in a thread, with the configuration and environment the subprocess would
    have (its environment is handed in, never this process's). What it logs is collected in
    `stderr_lines` in the format `serve` writes. A graceful stop is the SIGTERM path; tests that
    kill the process, read its pid or run files, or run workers use ProxyProcess."""

    def __init__(self, cli: CLI, args: list, env: dict):
        self.cli, self.args, self.env = cli, args, dict(env)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_lines: list[str] = []
        self.background = None

    def start(self, timeout: float = 15.0) -> "InProcessProxy":
        from tokenomics.cli import build_parser
        from tokenomics.commands import serve_overrides
        from tokenomics.config import load_config
        from tokenomics.proxy import BackgroundProxy, Proxy, check_available
        from tokenomics.records.logs import redacting_filter

        self._handler = None
        args = build_parser().parse_args(["serve", "--port", str(self.port), "--no-tls", *map(str, self.args)])
        cwd = os.getcwd()
        os.chdir(self.cli.cwd)  # ./config.yaml, ./.env and the ledger's git context are the cwd's
        try:
            config = load_config(args.config, args.dir, environ=self.env, overrides=serve_overrides(args))
            check_available(config, 1)
            logger = logging.getLogger("tokenomics")
            self._handler = _LinesHandler(self.stderr_lines)
            self._handler.setFormatter(logging.Formatter("tokenomics %(levelname)s: %(message)s"))
            self._handler.addFilter(redacting_filter())
            logger.addHandler(self._handler)
            logger.propagate = False
            logger.setLevel(getattr(logging, config.logging.level.upper(), logging.INFO))
            background = BackgroundProxy(Proxy(config, environ=self.env))
            background.thread.start()
            self.background = background
            urls = asyncio.run_coroutine_threadsafe(background.proxy.start(), background.loop).result(timeout)
        except Exception as exc:
            self.stop()
            raise AssertionError(f"proxy did not become ready: {exc}\n" + self.stderr) from exc
        finally:
            os.chdir(cwd)
        for url in urls:
            self.stderr_lines.append(f"tokenomics listening on {url}\n")
        return self

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def stop(self, sig=signal.SIGTERM, timeout: float = 15.0) -> int:
        import traceback
        if sig not in (signal.SIGTERM, signal.SIGINT):
            raise AssertionError(f"an in-process proxy stops gracefully only; use ProxyProcess for {sig!r}")
        if self.background is None:
            if self._handler is not None:
                logging.getLogger("tokenomics").removeHandler(self._handler)
                self._handler = None
            return 0
        background, self.background = self.background, None
        try:
            background.stop()
            return 0
        except Exception:
            self.stderr_lines.append(traceback.format_exc())
            return 1
        finally:
            if self._handler is not None:
                logging.getLogger("tokenomics").removeHandler(self._handler)


class _LinesHandler(logging.Handler):
    def __init__(self, lines: list):
        super().__init__()
        self.lines = lines

    def emit(self, record):
        self.lines.append(self.format(record) + "\n")


@pytest.fixture
def data_dir(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def cli(data_dir, tmp_path) -> CLI:
    work = tmp_path / "work"
    work.mkdir()
    return CLI(data_dir, work)


@pytest.fixture
def stub():
    with StubUpstream() as upstream:
        yield upstream


@pytest.fixture
def start_proxy(cli, request):
    """Factory: start_proxy(upstream_url=..., config=dict|None, env=dict|None, args=[...],
    subprocess=False): in this process unless `subprocess`, workers or the test's
    `subprocess_proxy` mark (a test that kills the proxy, reads its pid, run files, memory or
    standard output) ask for a real `tokenomics serve`."""
    started = []

    def start(upstream_url: str | None = None, config: dict | None = None, env: dict | None = None,
              args: list | None = None, subprocess: bool = False) -> ProxyProcess | InProcessProxy:
        extra = list(args or [])
        if upstream_url:
            extra += ["--upstream-url", upstream_url]
        if config is not None:
            path = cli.cwd / "config.yaml"
            import yaml
            path.write_text(yaml.safe_dump(config))
            extra += ["--config", str(path)]
        env = base_env(cli.data_dir, **(env or {}))
        kind = ProxyProcess if (subprocess or "--workers" in extra or request.node.get_closest_marker("subprocess_proxy")
                                or os.environ.get("TOKENOMICS_TEST_SUBPROCESS")) else InProcessProxy
        proxy = kind(cli, extra, env)
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        try:
            proxy.stop()
        except AssertionError:
            pass


@pytest.fixture
def redis_server():
    """A real redis-server on a free loopback port (Debian's package; .ci/run installs it)."""
    import shutil
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed; .ci/run must install it")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--daemonize", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    yield port
    proc.terminate()
    proc.wait(5)
