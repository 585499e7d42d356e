"""RedisState against a real redis-server: the same verdicts as MemoryState, keys under the
prefix with expiry, scripts reloaded after SCRIPT FLUSH, leases of dead holders expiring,
unsettled reservations charged in full, fail closed while Redis is down."""
import calendar
import json
import socket
import time
from datetime import datetime, timezone

import pytest
import redis
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from tokenomics.config import RedisConfig
from tokenomics.limits.decide import BudgetLine, RateRule, Refusal
from tokenomics.limits.redis_state import RedisState, shown_addr
from tokenomics.limits.state import MemoryState

T0 = float(calendar.timegm(datetime(2026, 11, 27, 12, tzinfo=timezone.utc).timetuple()))


@pytest.fixture
def rcfg(redis_server):
    client = redis.Redis(port=redis_server)
    client.flushall()
    client.close()
    return RedisConfig(addr=f"127.0.0.1:{redis_server}", prefix="t:")


@pytest.fixture
def state(rcfg):
    s = RedisState(rcfg)
    yield s
    s.close()


def raw_client(cfg):
    return redis.Redis(port=int(cfg.addr.rpartition(":")[2]))


def verdict(out):
    return None if out is None else (out.code, out.retry_after, out.message, out.event)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(strategy=st.sampled_from(["sliding", "fixed", "bucket"]), kind=st.sampled_from(["requests", "tokens"]),
       limit=st.integers(1, 6), window=st.sampled_from([0.3, 1.0, 2.5, 60.0]),
       steps=st.lists(st.tuples(st.floats(0, 20, allow_nan=False), st.integers(0, 8)), min_size=1, max_size=40))
def test_rate_verdicts_equal_the_in_process_ones(state, strategy, kind, limit, window, steps):
    """Same sequence, same answers, Retry-After included: the scripts implement decide's rules."""
    raw_client(state.config).flushall()
    mem, rule, t = MemoryState(), RateRule(kind, limit, window, strategy), T0
    for gap, w in steps:
        t += gap
        assert verdict(state.admit("k", (rule,), t, tokens=w)) == verdict(mem.admit("k", (rule,), t, tokens=w))


def test_several_rules_all_or_nothing_and_longest_wait(state):
    loose, tight = RateRule("requests", 10, 60.0, "sliding"), RateRule("requests", 1, 60.0, "fixed")
    assert state.admit("k", (tight,), T0) is None
    for _ in range(5):
        assert state.admit("k", (loose, tight), T0 + 1).code == "rate_limited"
    for _ in range(10):
        assert state.admit("k", (loose,), T0 + 1) is None
    a, b = RateRule("requests", 1, 10.0, "sliding"), RateRule("requests", 1, 100.0, "sliding")
    assert state.admit("j", (a, b), T0) is None
    assert state.admit("j", (a, b), T0).retry_after == 100


def test_budget_messages_and_grants_equal_the_in_process_ones(state):
    mem = MemoryState()
    daily = BudgetLine("h1", "tokens", "daily", 1000)
    usd = BudgetLine("h1", "usd", "daily", 0.5)
    for s in (state, mem):
        r1, g1 = s.reserve([daily], 600, 0.0, T0, min_tokens=101)
        r2, g2 = s.reserve([daily], 600, 0.0, T0, min_tokens=101)
        assert (g1, g2) == (600, 400)
    assert verdict(state.reserve([daily], 600, 0.0, T0, min_tokens=101)) == \
        verdict(mem.reserve([daily], 600, 0.0, T0, min_tokens=101))
    res, g = state.reserve([usd], 10, 0.3, T0)
    assert state.usage(usd, T0) == (0.0, 0.3)
    state.settle(res, 10, 0.25, T0)
    state.settle(res, 10, 0.25, T0)  # exactly once
    state.release(res)
    assert state.usage(usd, T0) == (0.25, 0.0)
    assert "daily USD budget has $0.2500 left" in state.reserve([usd], 10, 0.3, T0).message


def test_window_rollover_and_key_expiry(state):
    daily = BudgetLine("h2", "tokens", "daily", 100)
    res, _ = state.reserve([daily], 100, 0.0, T0)
    state.settle(res, 100, 0.0, T0)
    assert state.reserve([daily], 1, 0.0, T0).code == "budget_exceeded"
    tomorrow = T0 + 86400
    res, g = state.reserve([daily], 100, 0.0, tomorrow)
    assert g == 100
    client = raw_client(state.config)
    keys = {k.decode() for k in client.keys("*")}
    assert keys and all(k.startswith("t:") for k in keys), keys
    ttl = client.pttl("t:b:h2:tokens:daily")
    assert 0 < ttl <= 3 * 86400 * 1000  # bounded: a period after the window ends
    total = BudgetLine("h2", "tokens", "total", 10**6)
    res2, _ = state.reserve([total], 10, 0.0, T0)
    assert client.pttl("t:b:h2:tokens:total") == -1  # a lifetime counter is kept
    state.admit("h2", (RateRule("requests", 5, 60.0, "sliding"),), T0)
    rl = [k for k in client.keys("t:rl:*")]
    assert rl and all(0 < client.pttl(k) <= 61_000 for k in rl)
    state.release(res)
    state.release(res2)
    assert client.zcard("t:leases") == 0


def test_scripts_come_back_after_script_flush(state):
    """EVALSHA of a script Redis has forgotten (restart, SCRIPT FLUSH) loads it again."""
    rule = RateRule("requests", 2, 60.0, "sliding")
    assert state.admit("k", (rule,), T0) is None
    raw_client(state.config).script_flush()
    assert state.admit("k", (rule,), T0) is None
    assert state.admit("k", (rule,), T0).code == "rate_limited"


def test_a_flush_between_reload_and_retry_is_not_an_outage(state):
    """Redis forgets the scripts again right after they were reloaded (a flush racing the retry):
    every verb still gets its answer, and Redis is never taken for down."""
    raw, evalsha = raw_client(state.config), state.client.evalsha

    def forgetful_evalsha(*args):
        raw.script_flush()
        return evalsha(*args)

    state.client.evalsha = forgetful_evalsha
    rule = RateRule("requests", 1, 60.0, "sliding")
    line = BudgetLine("f1", "tokens", "total", 1000)
    assert state.admit("k", (rule,), T0) is None
    assert state.admit("k", (rule,), T0).code == "rate_limited"
    assert state.enter("p", 1) is None
    res, grant = state.reserve([line], 100, 0.0, T0)
    state.settle(res, 40, 0.0, T0)
    assert state.usage(line, T0) == (40, 0)
    assert state.available
    raw.close()


def test_two_states_share_one_parallel_limit_and_a_dead_holders_slot_expires(rcfg):
    a, b = RedisState(rcfg, lease_seconds=1.0), RedisState(rcfg, lease_seconds=1.0)
    try:
        assert a.enter("k", 1) is None
        assert b.enter("k", 1).code == "rate_limited"
        a.leave("k")
        assert b.enter("k", 1) is None
        time.sleep(1.5)  # b renews its lease: still held beyond the lease length
        assert a.enter("k", 1).code == "rate_limited"
        b._stop.set()  # b "dies": nobody renews its lease any more
        b._wake.set()
        b._thread.join(5)
        deadline = time.monotonic() + 5
        while a.enter("k", 1) is not None:
            assert time.monotonic() < deadline, "the dead holder's slot never came back"
            time.sleep(0.05)
    finally:
        a.close()
        b.close()


def test_an_unsettled_reservation_is_charged_in_full_when_its_lease_runs_out(rcfg):
    line = BudgetLine("h3", "tokens", "total", 1000)
    crashed = RedisState(rcfg, lease_seconds=0.5)
    res, g = crashed.reserve([line], 300, 0.0, T0)
    crashed._stop.set()  # crashes: no renewal, no settlement
    crashed._wake.set()
    crashed._thread.join(5)
    crashed.client.close()
    time.sleep(0.6)
    survivor = RedisState(rcfg)  # reaps expired reservations when it starts
    try:
        deadline = time.monotonic() + 5
        # the reaper charges in Redis first and counts what it charged after the script returns
        while (survivor.usage(line, T0), survivor.charged_in_flight) != ((300, 0), (1, 300)):
            assert time.monotonic() < deadline, (survivor.usage(line, T0), survivor.charged_in_flight)
            time.sleep(0.05)
        crashed.settle(res, 10, 0.0, T0)  # a late settlement does not charge twice (nor refund)
        assert survivor.usage(line, T0) == (300, 0)
    finally:
        survivor.close()


def test_redis_down_fails_closed_then_recovers(tmp_path):
    port = _free_port()
    cfg = RedisConfig(addr=f"127.0.0.1:{port}", prefix="t:")
    state = RedisState(cfg)
    try:
        rule = RateRule("requests", 5, 60.0, "sliding")
        line = BudgetLine("h4", "tokens", "total", 100)
        for out in (state.admit("k", (rule,), T0), state.enter("k", 1), state.reserve([line], 10, 0.0, T0)):
            assert isinstance(out, Refusal) and out.code == "state_unavailable" and out.retry_after == 1
            assert "unreachable" in out.message and "session.redis" in out.message
        import shutil
        import subprocess
        proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while state.admit("k", (rule,), T0) is not None:
                assert time.monotonic() < deadline, "no recovery"
                time.sleep(0.02)
        finally:
            proc.terminate()
            proc.wait(5)
    finally:
        state.close()


def test_addresses_never_show_credentials():
    assert shown_addr("redis://:hunter2@10.0.0.1:6379/0") == "redis://10.0.0.1:6379/0"
    assert shown_addr("127.0.0.1:6379") == "127.0.0.1:6379"


def test_doctor_and_status_report_the_redis_backend(cli, rcfg):
    (cli.cwd / "config.yaml").write_text(yaml.safe_dump({"session": {"backend": "redis",
                                                                     "redis": {"addr": rcfg.addr}}}))
    out = cli("doctor", "--json")
    check = [c for c in json.loads(out.stdout)["checks"] if c["name"] == "redis"]
    assert check and check[0]["status"] == "ok", out.stdout
    status = cli("status", "--json")
    assert json.loads(status.stdout)["backend"] == "redis"
    assert "limits: redis at " + rcfg.addr in cli("status").stdout
    (cli.cwd / "config.yaml").write_text(yaml.safe_dump({"session": {"backend": "redis", "redis": {
        "addr": f"redis://:hunter2@127.0.0.1:{_free_port()}"}}}))
    out = cli("doctor")
    assert out.returncode == 1 and "FAIL  redis:" in out.stdout and "hunter2" not in out.stdout + out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_concurrent_grants_from_two_states_never_overrun(rcfg):
    """40 threads over two states (two proxies) reserve and settle in full against one cap."""
    import concurrent.futures
    a, b = RedisState(rcfg), RedisState(rcfg)
    line = BudgetLine("h5", "tokens", "total", 1000)
    try:
        def one(i):
            s = a if i % 2 else b
            out = s.reserve([line], 120, 0.0, T0, min_tokens=21)
            if isinstance(out, Refusal):
                assert out.code == "budget_exceeded"
                return 0
            res, granted = out
            s.settle(res, granted, 0.0, T0)
            return granted
        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            granted = sum(pool.map(one, range(200)))
        assert granted == a.usage(line, T0)[0] and 980 <= granted <= 1000
        assert a.usage(line, T0)[1] == 0
    finally:
        a.close()
        b.close()
