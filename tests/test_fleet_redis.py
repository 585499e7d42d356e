"""Two proxy processes sharing limits through a real Redis (SPEC §12): one budget, one rate
limit, one max_parallel across both; a kill -9'ed holder's slot comes back; Redis stopping
fails closed with 503 state_unavailable and traffic recovers when it is back."""
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import openai
import pytest
import redis
import yaml

from conftest import CLI, ProxyProcess, base_env, free_port
from test_proxy import oa, raw

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 10}
LEASE = 10.0  # RedisState's slot lease: a dead holder's slot must come back within it


class RestartableRedis:
    """redis-server on a fixed loopback port with an fsync'ed append-only file, so that a stop
    and a start keep the data (the conftest fixture's server keeps nothing)."""

    def __init__(self, directory):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            if os.environ.get("CI"):
                pytest.fail("redis-server is not installed; .ci/run must install it")
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.dir, self.port, self.proc = str(directory), free_port(), None

    def start(self):
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                                      "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                                      "--daemonize", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        self.proc.kill()
        pytest.fail("redis-server did not start")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def fleet(tmp_path, stub):
    """start(tokens...) -> (proxy_a, proxy_b, redis): two `serve` processes, own data dirs with
    the same tokens.json and hash key, one Redis."""
    server = RestartableRedis(tmp_path)
    server.start()
    dirs = [tmp_path / "a", tmp_path / "b"]
    work = tmp_path / "work"
    for d in (*dirs, work):
        d.mkdir()
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump({"session": {"backend": "redis", "redis": {"addr": f"127.0.0.1:{server.port}"}},
                                      "server": {"grace_period": 1}, "ledger": {"enabled": False}}))
    cli = CLI(dirs[0], work)
    proxies = []

    def start(policies):
        tokens = [cli.token(p) for p in policies]
        for name in ("tokens.json", "hash.key"):
            shutil.copy2(dirs[0] / name, dirs[1] / name)
        for d in dirs:
            proxy = ProxyProcess(CLI(d, work), ["--upstream-url", stub.url, "--config", str(config)], base_env(d))
            proxies.append(proxy)
            proxy.start()
        return tokens, proxies[0], proxies[1], server

    yield start
    for proxy in proxies:
        try:
            proxy.stop()
        except AssertionError:
            pass
    server.stop()


def call(proxy, token):
    """Tokens used, or the error code."""
    try:
        return oa(proxy, token).chat.completions.create(**BODY).usage.total_tokens
    except openai.APIStatusError as exc:
        return exc.body["code"]


def test_one_budget_across_two_proxies(fleet, stub):
    rounds = 20
    tokens, a, b, _ = fleet([{"max_tokens": 130}] * rounds)
    worst = -10**9
    for round_, token in enumerate(tokens):
        stub.script(delay=0.3, times=20)
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            used = list(pool.map(lambda i: call(a if i % 2 else b, token), range(20)))
        stub.reset()
        ok = [u for u in used if isinstance(u, int)]
        assert all(u == "budget_exceeded" for u in used if not isinstance(u, int)), used
        worst = max(worst, sum(ok) - 130)
        assert sum(ok) <= 130, f"round {round_}: overshoot {sum(ok) - 130}"
        assert 3 <= len(ok) <= 6, used
    print(f"worst overshoot over {rounds} rounds: {worst}")


def test_one_rate_limit_across_two_proxies(fleet):
    (token,), a, b, _ = fleet([{"rate_limit": {"rules": [{"requests": 6, "window": "1m"}]}}])
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda i: call(a if i % 2 else b, token), range(12)))
    assert sum(isinstance(r, int) for r in results) == 6, results
    assert results.count("rate_limited") == 6, results
    status, headers, _ = raw(b, "POST", "/v1/chat/completions", BODY, {"authorization": f"Bearer {token}"})
    assert status == 429 and 1 <= int(headers["retry-after"]) <= 60


def test_max_parallel_across_two_proxies_and_a_killed_holders_slot_returns(fleet, stub):
    (token,), a, b, _ = fleet([{"rate_limit": {"max_parallel": 1}}])
    stub.script(hang=True)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    holder = pool.submit(call, a, token)
    stub.wait_for(lambda: len(stub.requests) == 1, timeout=10)
    assert call(b, token) == "rate_limited"
    assert call(a, token) == "rate_limited"
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(5)
    killed = time.monotonic()
    deadline = killed + LEASE + 5
    while time.monotonic() < deadline:
        if isinstance(call(b, token), int):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the killed proxy's parallel slot never came back")
    returned = time.monotonic() - killed
    print(f"slot returned {returned:.2f}s after kill -9")
    assert returned <= LEASE + 1
    with pytest.raises(openai.APIConnectionError):  # the killed proxy's client: a broken connection
        holder.result(15)
    pool.shutdown()


def test_redis_down_fails_closed_and_recovers(fleet, stub):
    (token,), a, b, server = fleet([{"max_tokens": 10**7}])
    stub.event_delay = 0.0
    results = []
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            results += pool.map(lambda i: call(a if i % 2 else b, token), range(16))
        stub.script(delay=0.5, times=8)
        in_flight = [pool.submit(call, a if i % 2 else b, token) for i in range(8)]
        stub.wait_for(lambda: stub.pending_scripts == 0, timeout=10)  # all 8 reached the stub
        server.stop()
        results += [f.result(20) for f in in_flight]
        down = list(pool.map(lambda i: call(a if i % 2 else b, token), range(8)))
    assert all(isinstance(r, int) for r in results), results  # admitted before the stop: answered
    assert down == ["state_unavailable"] * 8, down
    status, headers, body = raw(a, "POST", "/v1/chat/completions", BODY, {"authorization": f"Bearer {token}"})
    assert status == 503 and json.loads(body)["error"]["code"] == "state_unavailable"
    assert headers["retry-after"] == "1"
    assert a.proc.poll() is None and b.proc.poll() is None
    server.start()
    back = time.monotonic()
    deadline = back + 15
    while time.monotonic() < deadline:
        if all(isinstance(call(p, token), int) for p in (a, b)):
            break
        time.sleep(0.05)
    else:
        pytest.fail("traffic did not recover after Redis came back")
    recovery = time.monotonic() - back
    print(f"recovered {recovery:.2f}s after Redis restarted")
    assert recovery < 5
    client = redis.Redis(port=server.port)
    deadline = time.monotonic() + 10  # settlements queued during the outage are written on reconnect
    used = 0
    while time.monotonic() < deadline:
        used = sum(int(client.hget(k, "used") or 0) for k in client.scan_iter("tokenomics:b:*:tokens:total"))
        if used >= sum(results):
            break
        time.sleep(0.05)
    assert used >= sum(results), (used, sum(results))  # no settled usage was lost
    client.close()
    for proxy in (a, b):
        assert proxy.stderr.count("cannot reach Redis") == 1, proxy.stderr
        assert proxy.stderr.count("reachable again") == 1, proxy.stderr
