"""Helpers for the remote-sync tests: a `tokenomics remote` subprocess, a scriptable (and, when
asked, hostile) stand-in for the token server, HTTP calls and bounded waits."""
import http.server
import json
import select
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

from conftest import TOKENOMICS, base_env, free_port

from tokenomics.store import hash_key_check, hash_token

HASH_KEY = "remote-sync-test-hash-key-0123456789"
REMOTE_KEY = "rk-central-0123456789abcdef"
SIGNING_KEY = "push-signing-key-0123456789abcdef"
PUSH_SECRET = "push-shared-secret-0123"
MOCK = {"provider": "mock"}


def until(predicate, timeout: float, step: float = 0.05) -> float:
    """Seconds until predicate() is true; AssertionError after `timeout`."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(step)


def call(method: str, url: str, body=None, key: str | None = REMOTE_KEY, headers: dict | None = None,
         raw: bytes | None = None, timeout: float = 5.0) -> tuple[int, dict | str]:
    """(status, JSON or text) of one request; never follows a redirect."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    if body is not None and raw is None:
        req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def ask(proxy_url: str, token: str) -> int:
    """Status of a governed chat completion with `token` on the mock provider."""
    status, _ = call("POST", proxy_url + "/v1/chat/completions",
                     {"model": "mock-1", "messages": [{"role": "user", "content": "hello"}]}, key=token)
    return status


class RemoteProcess:
    """`tokenomics remote` in a subprocess on a free loopback port."""

    def __init__(self, directory, cwd, key: str | None = REMOTE_KEY, args: list | None = None,
                 port: int | None = None, host: str = "127.0.0.1"):
        self.dir, self.cwd = directory, cwd
        self.port = port or free_port()
        self.host = host
        self.args = list(args or [])
        self.env = base_env(directory, TOKENOMICS_HASH_KEY=HASH_KEY, TOKENOMICS_REMOTE_KEY=key)
        self.scheme = "https" if "--tls" in self.args else "http"
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        self.proc = None
        self.lines: list[str] = []

    def command(self) -> list:
        return [*TOKENOMICS, "remote", "--addr", f"{self.host}:{self.port}", "--dir", str(self.dir), *self.args]

    def start(self, timeout: float = 15.0) -> "RemoteProcess":
        self.proc = subprocess.Popen(self.command(), cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            if "listening on" in line:
                threading.Thread(target=self._drain, daemon=True).start()
                return self
        self.proc.kill()
        raise AssertionError("remote did not become ready:\n" + "".join(self.lines) + (self.proc.stderr.read() or ""))

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError("remote did not stop on SIGTERM")

    def create(self, policy=None, **fields) -> dict:
        status, body = call("POST", self.url + "/api/v1/tokens", {"policy": policy or MOCK, **fields})
        assert status == 201, body
        return body


def entry(token: str, policy=None, **extra) -> dict:
    """A token list entry as the server sends it, hashed with the shared hash key."""
    return {"hash": hash_token(HASH_KEY.encode(), token), "policy": policy or MOCK, "label": "",
            "created_at": "2026-01-01T00:00:00Z", "expires_at": None, **extra}


def document(*entries) -> dict:
    return {"tokens": list(entries), "hash_key_check": hash_key_check(HASH_KEY.encode())}


class StubRemote:
    """A stand-in token server on loopback: answers GET /api/v1/tokens with whatever `answer`
    says (a document, raw bytes, a status, a redirect), counts the pulls and records pushes'
    registrations. Bounded: every wait has a deadline; stop() joins the thread."""

    def __init__(self):
        self.answer = (200, document())          # (status, dict | bytes, extra headers)
        self.pulls = 0
        self.requests: list[tuple[str, str, dict]] = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status, payload, headers=()):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                stub.requests.append(("GET", self.path, dict(self.headers)))
                if self.path == "/api/v1/tokens":
                    stub.pulls += 1
                    status, payload, *headers = stub.answer
                    self._send(status, payload, headers[0] if headers else ())
                else:
                    self._send(404, {"error": {"message": "no"}})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                stub.requests.append(("POST", self.path, {**dict(self.headers), "_body": body}))
                self._send(201, {"id": "cl_1", "url": "x"})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def wait_pulls(self, n: int, timeout: float = 10.0) -> None:
        """Wait until `n` more pulls than now were answered."""
        target = self.pulls + n
        until(lambda: self.pulls >= target, timeout)


def remote_config(url: str, sync: int = 1, **more) -> dict:
    remote = {"url": url, "api_key_env": "TEST_REMOTE_KEY", "sync": sync}
    remote.update(more)
    return {"remote": remote}


def proxy_env(**extra) -> dict:
    return {"TOKENOMICS_HASH_KEY": HASH_KEY, "TEST_REMOTE_KEY": REMOTE_KEY, **extra}
