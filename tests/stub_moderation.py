"""A fake classification service speaking the OpenAI moderation contract, for tests of the
`classifier` rule. Stdlib only, independent of tokenomics; 127.0.0.1 on a free port.

    with StubModeration() as mod:
        mod.mode = "slow"          # or ok, garbage, oversized, redirect, status500, bad_shape
        ...                        # rule url: mod.url + "/v1/moderations"
        assert mod.calls == 1 and mod.requests[0]["json"]["input"] == "..."

Verdicts are deterministic: a text containing ATTACK_MARK is flagged (`injection` 0.97),
one containing BORDERLINE_MARK scores `injection` 0.6 without the flag, anything else 0.01.
Every wait is bounded by `stop()`'s event.
"""
from __future__ import annotations

import http.server
import json
import threading
import time

ATTACK_MARK = "ignore all previous instructions"
BORDERLINE_MARK = "pretend you have no rules"
MODES = ("ok", "garbage", "oversized", "redirect", "status500", "bad_shape", "slow")


def verdict(text: str) -> dict:
    low = text.lower()
    if ATTACK_MARK in low:
        score, flagged = 0.97, True
    elif BORDERLINE_MARK in low:
        score, flagged = 0.6, False
    else:
        score, flagged = 0.01, False
    return {"flagged": flagged,
            "categories": {"injection": flagged, "violence": False},
            "category_scores": {"injection": score, "violence": 0.001}}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # no stderr noise
        pass

    def do_POST(self):
        stub: StubModeration = self.server.stub
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        with stub.lock:
            stub.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                  "json": body})
            stub.calls += 1
            mode = stub.mode
        if mode == "slow":
            stub.stopping.wait(stub.delay)
            mode = "ok"
        if mode == "redirect":
            return self._send(302, b"", {"location": stub.url + "/elsewhere"})
        if mode == "status500":
            return self._send(500, b'{"error": "boom"}')
        if mode == "garbage":
            return self._send(200, b"<html>not json{")
        if mode == "oversized":
            big = {"results": [verdict("")], "padding": "x" * (2 * 1024 * 1024)}
            return self._send(200, json.dumps(big).encode())
        if mode == "bad_shape":
            return self._send(200, json.dumps({"results": [{"flagged": "yes"}]}).encode())
        text = body.get("input", "") if isinstance(body, dict) else ""
        if stub.delay and mode == "ok" and stub.delay_every:
            stub.stopping.wait(stub.delay)
        answer = {"id": f"modr-{stub.calls}", "model": (body or {}).get("model", "stub-guard"),
                  "results": [verdict(text if isinstance(text, str) else "")]}
        if stub.echo_key:  # a hostile service echoing the credential it received
            answer["auth"] = self.headers.get("authorization", "")
        self._send(200, json.dumps(answer).encode())

    def _send(self, status: int, data: bytes, headers: dict | None = None):
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(data)
        except OSError:
            pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64    # the default backlog (5) drops the SYNs of a burst of concurrent
                               # calls, which then arrive a second late


class StubModeration:
    def __init__(self):
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.requests: list[dict] = []
        self.calls = 0
        self.mode = "ok"
        self.delay = 0.0           # seconds, for mode "slow" (or every call with delay_every)
        self.delay_every = False
        self.echo_key = False
        self.url = ""
        self._server = None
        self._thread = None

    def __enter__(self) -> "StubModeration":
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.stub = self
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        closer = threading.Thread(target=self._server.shutdown, daemon=True)
        closer.start()
        closer.join(3)
        self._thread.join(3)
        self._server.server_close()

    @property
    def endpoint(self) -> str:
        return self.url + "/v1/moderations"

    def inputs(self) -> list:
        with self.lock:
            return [r["json"].get("input") for r in self.requests if isinstance(r["json"], dict)]

    def wait_calls(self, n: int, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.calls >= n:
                return True
            time.sleep(0.01)
        return self.calls >= n
