"""Shared fixtures: the CLI as a subprocess, a stub upstream, and real `tokenomics serve` processes."""
import json
import os
import select
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(data_dir: Path, **extra) -> dict:
    """A clean environment: no provider keys or tokenomics settings leak in from the machine."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TOKENOMICS_", "OPENAI_", "ANTHROPIC_"))}
    env.update({"TOKENOMICS_DIR": str(data_dir), "OPENAI_API_KEY": OPENAI_KEY,
                "ANTHROPIC_API_KEY": ANTHROPIC_KEY, "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    env.update({k: v for k, v in extra.items() if v is not None})
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
    return env


class CLI:
    """Runs `python -m tokenomics ...` with a given data dir and environment."""

    def __init__(self, data_dir: Path, cwd: Path, env: dict | None = None):
        self.data_dir, self.cwd = data_dir, cwd
        self.env = env or base_env(data_dir)

    def __call__(self, *args, env: dict | None = None, input: str | None = None, timeout: float = 60,
                 check: bool = False) -> subprocess.CompletedProcess:
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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            line = self.proc.stderr.readline()
            if not line:
                break
            self.stderr_lines.append(line)
            if "listening on" in line:
                self._drainer = threading.Thread(target=self._drain, daemon=True)
                self._drainer.start()
                return self
        self.proc.kill()
        raise AssertionError("proxy did not become ready:\n" + "".join(self.stderr_lines)
                             + (self.proc.stderr.read() or ""))

    def _drain(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

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
def start_proxy(cli):
    """Factory: start_proxy(upstream_url=..., config=dict|None, env=dict|None, args=[...])."""
    started = []

    def start(upstream_url: str | None = None, config: dict | None = None, env: dict | None = None,
              args: list | None = None) -> ProxyProcess:
        extra = list(args or [])
        if upstream_url:
            extra += ["--upstream-url", upstream_url]
        if config is not None:
            path = cli.cwd / "config.yaml"
            import yaml
            path.write_text(yaml.safe_dump(config))
            extra += ["--config", str(path)]
        proxy = ProxyProcess(cli, extra, base_env(cli.data_dir, **(env or {})))
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
