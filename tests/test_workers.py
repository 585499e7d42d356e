"""`serve --workers N` / `start --workers N` (SPEC §12): N proxy processes on one port, sharing
limits through a real Redis; restarts, graceful stops, the data-dir lock, the pid file."""
import concurrent.futures
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import openai
import pytest
import yaml

from conftest import ROOT, base_env, free_port
from test_proxy import oa, raw
from tokenomics import workers

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 10}


def redis_config(port: int, **server) -> dict:
    config = {"session": {"backend": "redis", "redis": {"addr": f"127.0.0.1:{port}"}}}
    if server:
        config["server"] = server
    return config


def children(pid: int) -> set[int]:
    """Live child processes of pid (from /proc, no tools needed); zombies do not count."""
    found = set()
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat, encoding="ascii", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            found.add(int(stat.split("/")[2]))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def sessions(data_dir: Path) -> dict[str, list]:
    """session id -> the per-request ledger lines each worker appends (not its session header)."""
    out = {}
    for path in (data_dir / "sessions").glob("*.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[path.stem.split("_")[-1]] = [row for row in rows if row.get("type", "request") == "request"]
    return out


def summaries(data_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in (data_dir / "sessions").glob("*.json")]


@pytest.fixture
def two_workers(cli, stub, start_proxy, redis_server):
    proxy = start_proxy(upstream_url=stub.url, config=redis_config(redis_server), args=["--workers", "2"])
    pids = wait_until(lambda: len(children(proxy.proc.pid)) == 2 and children(proxy.proc.pid), 10,
                      "two worker processes")
    proxy.workers = pids
    return proxy


# --- the supervisor's own arithmetic and port handling (no Redis needed) -------------------------

def test_restart_delay_doubles_up_to_a_ceiling():
    delays = [workers.restart_delay(n) for n in range(1, 40)]
    assert delays[0] == workers.RESTART_DELAY_FIRST
    assert delays[1] == 2 * delays[0] and delays[2] == 4 * delays[0]
    assert all(a <= b for a, b in zip(delays, delays[1:]))
    assert max(delays) == workers.RESTART_DELAY_MAX


def test_a_reserved_port_takes_reuse_port_listeners_but_no_one_else():
    port, reserved = workers.reserve_port("127.0.0.1", 0)
    try:
        assert port > 0
        listeners = []
        for _ in range(2):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
            listeners.append(s)
        plain = socket.socket()
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
        plain.close()
        # the reserving socket never listens, so it never swallows a connection
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                pass
        for s in listeners:
            s.close()
    finally:
        for s in reserved:
            s.close()


def test_a_port_in_use_is_refused_before_any_worker_starts(cli, redis_server):
    (cli.cwd / "config.yaml").write_text(yaml.safe_dump(redis_config(redis_server)))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = cli("serve", "--workers", "2", "--port", str(port), "--no-tls", timeout=30)
    assert proc.returncode == 1, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (cli.data_dir / "tokenomics.pid").exists()


SUPERVISED = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, sys.argv[1])
    from tokenomics.config import load_config
    from tokenomics.workers import Supervisor

    marker, mode = sys.argv[3], sys.argv[4]

    def worker(config, link):
        with open(marker, "a+") as fh:
            fh.seek(0)
            first = f"{link.slot} " not in fh.read()
            fh.write(f"{link.slot} {os.getpid()}\\n")
        link.ready(["http://127.0.0.1:%d" % config.server.http_port])
        if mode == "crash":  # the first of each slot lives until all are ready; the others die at once
            time.sleep(0.5 if first else 0)
            return 3
        while True:          # lives until a signal ends it (SIGTERM's default action)
            time.sleep(0.1)

    config = load_config(None, sys.argv[2], overrides={"server": {"http_port": int(sys.argv[5]),
                                                                  "https_port": 0}})
    sys.exit(Supervisor(config, 2, on_ready=lambda urls: print("ready", *urls, flush=True),
                        worker_main=worker).run())
""")


def _supervised(tmp_path, mode: str) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / "spawned"
    data = tmp_path / "sup-data"
    data.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", SUPERVISED, str(ROOT), str(data), str(marker), mode,
                             str(free_port())], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=base_env(data))
    line = proc.stdout.readline()  # bounded: the supervisor gives up after READY_TIMEOUT
    if not line.startswith("ready http://127.0.0.1:"):
        proc.kill()
        raise AssertionError(f"supervisor not ready: {line!r} {proc.stderr.read()}")
    return proc, marker


def test_a_crash_loop_backs_off_instead_of_spinning(tmp_path):
    proc, marker = _supervised(tmp_path, "crash")
    try:
        time.sleep(3.0)  # the span over which restarts are counted
        spawns = marker.read_text().split("\n")[:-1]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(15)
    per_slot = [sum(1 for s in spawns if s.startswith(f"{slot} ")) for slot in (0, 1)]
    # first death at 0.5 s, then 0.25, 0.5, 1 s of backoff: four starts per slot in 3 s, not hundreds
    assert all(3 <= n <= 6 for n in per_slot), per_slot
    assert code == 0
    assert "starting a new one in" in proc.stderr.read()


def test_workers_die_with_a_killed_supervisor(tmp_path):
    proc, marker = _supervised(tmp_path, "serve")
    pids = wait_until(lambda: len(children(proc.pid)) == 2 and children(proc.pid), 10, "two workers")
    proc.kill()
    proc.wait(5)
    wait_until(lambda: not any(alive(p) for p in pids), 10, "the workers to follow the supervisor")


def test_sigterm_to_the_supervisor_stops_every_worker(tmp_path):
    proc, _ = _supervised(tmp_path, "serve")
    pids = wait_until(lambda: len(children(proc.pid)) == 2 and children(proc.pid), 10, "two workers")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert not any(alive(p) for p in pids)


def test_the_workers_serve_under_the_supervisors_lock_and_no_one_else_does(cli, tmp_path):
    proc, _ = _supervised(tmp_path, "serve")
    try:
        wait_until(lambda: len(children(proc.pid)) == 2, 10, "two workers")
        other = cli("serve", "--dir", str(tmp_path / "sup-data"), "--port", str(free_port()), "--no-tls",
                    timeout=30)
        assert other.returncode == 1
        assert "another tokenomics proxy is serving the data dir" in other.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


# --- refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["flag", "config"])
def test_several_workers_on_the_memory_backend_are_refused(cli, how):
    port = str(free_port())
    if how == "config":
        (cli.cwd / "config.yaml").write_text(yaml.safe_dump({"server": {"workers": 2}}))
    for command in ("serve", "start"):
        args = [command, "--port", port, "--no-tls"] + (["--workers", "2"] if how == "flag" else [])
        proc = cli(*args, timeout=30)
        assert proc.returncode == 2, (command, proc.stderr)
        assert "session.backend: redis" in proc.stderr and "session.redis.addr" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (cli.data_dir / "tokenomics.pid").exists()


def test_the_flag_wins_over_server_workers(cli, start_proxy, stub):
    proxy = start_proxy(upstream_url=stub.url, config={"server": {"workers": 2}}, args=["--workers", "1"])
    assert raw(proxy, "GET", "/health")[0] == 200
    assert children(proxy.proc.pid) == set()  # one process: the proxy itself, no workers


def test_server_workers_zero_is_refused(cli):
    (cli.cwd / "config.yaml").write_text(yaml.safe_dump({"server": {"workers": 0}}))
    proc = cli("serve", "--port", str(free_port()), "--no-tls", timeout=30)
    assert proc.returncode == 2 and "server.workers" in proc.stderr, proc.stderr


# --- end to end on a real Redis --------------------------------------------------------------------

def test_two_workers_share_the_port_and_each_writes_its_session(cli, stub, two_workers):
    token = cli.token({})
    for _ in range(40):  # a new connection each: the kernel spreads them over the workers
        status, headers, _ = raw(two_workers, "POST", "/v1/chat/completions", BODY,
                                 {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        assert status == 200
    lines = sessions(cli.data_dir)
    assert len(lines) == 2, lines.keys()
    assert all(len(v) > 0 for v in lines.values()), {k: len(v) for k, v in lines.items()}
    assert sum(len(v) for v in lines.values()) == 40
    assert len(stub.requests) == 40
    assert two_workers.stop() == 0
    assert not any(alive(p) for p in two_workers.workers)
    written = summaries(cli.data_dir)
    assert sorted(s["session_id"] for s in written) == sorted(lines)
    assert sum(s["totals"]["request_count"] for s in written) == 40
    assert two_workers.stderr.count("tokenomics listening on") == 1
    # counters live in Redis: no worker writes the data dir's usage journal
    assert not (cli.data_dir / "usage.journal").exists()


def test_concurrent_requests_over_two_workers_never_overrun_the_budget(cli, stub, two_workers):
    stub.event_delay = 0.0
    for round_ in range(4):
        token = cli.token({"max_tokens": 130})  # about five requests of ~25 tokens
        stub.script(delay=0.3, times=20)

        def call(_):
            client = oa(two_workers, token)  # a client (connection pool) per thread: both workers get some
            try:
                return client.chat.completions.create(**BODY).usage.total_tokens
            except openai.RateLimitError as exc:
                assert exc.body["code"] == "budget_exceeded"
                return 0

        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            used = list(pool.map(call, range(20)))
        stub.reset()
        ok = [u for u in used if u]
        assert sum(ok) <= 130, f"round {round_}: overshoot {sum(ok) - 130}"
        assert 3 <= len(ok) <= 6, used
    assert all(len(v) > 0 for v in sessions(cli.data_dir).values())


def test_a_killed_worker_is_replaced_and_the_port_keeps_answering(cli, stub, two_workers):
    token = cli.token({})
    victim = min(two_workers.workers)
    os.kill(victim, signal.SIGKILL)
    # once it is gone its socket has left the port's group (a connection queued on it at the
    # instant of the kill is reset by the kernel, as for any killed server)
    wait_until(lambda: not alive(victim), 5, "the killed worker to be gone")
    answered, resets = 0, 0
    for _ in range(40):  # the surviving worker answers meanwhile
        try:
            assert raw(two_workers, "GET", "/health")[0] == 200
            answered += 1
        except ConnectionResetError:  # seen once in many runs while the replacement starts listening
            resets += 1
    assert answered >= 38 and resets <= 2, (answered, resets)
    replaced = wait_until(lambda: (lambda c: len(c) == 2 and victim not in c and c)(children(two_workers.proc.pid)),
                          10, "a new worker")
    assert victim not in replaced and len(replaced) == 2
    assert "killed by SIGKILL" in two_workers.stderr
    for _ in range(10):
        status, _, _ = raw(two_workers, "POST", "/v1/chat/completions", BODY,
                           {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        assert status == 200
    assert two_workers.stop() == 0


def test_sigterm_lets_in_flight_requests_finish_and_writes_every_session(cli, stub, two_workers):
    token = cli.token({})
    stub.script(delay=1.0, times=6)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(raw, two_workers, "POST", "/v1/chat/completions", BODY,
                               {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}, 20)
                   for _ in range(6)]
        assert stub.wait_for(lambda: len(stub.requests) >= 6, timeout=10)
        two_workers.proc.send_signal(signal.SIGTERM)
        assert [f.result()[0] for f in futures] == [200] * 6
    assert two_workers.proc.wait(20) == 0
    assert not any(alive(p) for p in two_workers.workers)
    written = summaries(cli.data_dir)
    assert len(written) == 2
    assert sum(s["totals"]["request_count"] for s in written) == 6
    assert not (cli.data_dir / "tokenomics.pid").exists()


def test_a_second_proxy_on_the_data_dir_is_still_refused(cli, two_workers):
    proc = cli("serve", "--port", str(free_port()), "--no-tls", timeout=30)
    assert proc.returncode == 1
    assert "another tokenomics proxy is serving the data dir" in proc.stderr


def test_start_status_stop_with_two_workers(cli, stub, redis_server):
    (cli.cwd / "config.yaml").write_text(yaml.safe_dump(redis_config(redis_server)))
    port = free_port()
    started = cli("start", "--workers", "2", "--port", str(port), "--no-tls", "--upstream-url", stub.url,
                  timeout=30)
    try:
        assert started.returncode == 0, started.stderr
        assert started.stdout.strip() == f"http://127.0.0.1:{port}"
        supervisor = int((cli.data_dir / "tokenomics.pid").read_text())
        assert (cli.data_dir / "tokenomics.pid").read_text() == f"{supervisor}\n"
        pids = wait_until(lambda: len(children(supervisor)) == 2 and children(supervisor), 10, "two workers")
        status = json.loads(cli("status", "--json", check=True).stdout)
        assert status["running"] is True and status["pid"] == supervisor
        assert status["workers"] == 2 and status["backend"] == "redis"
        assert status["url"] == f"http://127.0.0.1:{port}"
        text = cli("status", check=True).stdout
        assert "2 workers" in text and "limits: redis" in text
    finally:
        stopped = cli("stop", timeout=40)
    assert stopped.returncode == 0, stopped.stderr
    assert not alive(supervisor) and not any(alive(p) for p in pids)
    assert json.loads(cli("status", "--json", check=True).stdout)["running"] is False
    assert len(summaries(cli.data_dir)) == 2
