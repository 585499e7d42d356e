"""Records: git context, the session ledger (journal, summary, crash recovery), the `ledger`
readers and tables, and conversation memory logs."""
import asyncio
import calendar
import gzip
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import tokenomics
import tokenomics.records.ledger
from tokenomics.errors import RuntimeFailure, UsageError
from tokenomics.records.ledger import Ledger, RequestRecord, git_context, load_sessions
from tokenomics.records.ledger_report import find_session, parse_when, render_session, render_sessions, render_summary, summarize
from tokenomics.records.memory import MemoryWriter


def utc(*args) -> float:
    return float(calendar.timegm(datetime(*args, tzinfo=timezone.utc).timetuple()))


T0 = utc(2026, 11, 27, 12, 0, 0)
HASH_A = "a" * 64
HASH_B = "b1" * 32
COUNTS = ("input_tokens", "output_tokens", "cached_input_tokens", "cache_creation_tokens",
          "reasoning_tokens", "retry_count")


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def rec(ts: float, model="gpt-4o-mini", provider="openai", token=HASH_A, inp=100, out=20, cost=0.00123,
        status=200, error="", retries=0, **extra) -> RequestRecord:
    fields = dict(timestamp=ts, request_id=f"tkn_{int(ts * 1000):x}{model}", token_hash=token, model=model,
                  provider=provider, endpoint="/v1/chat/completions", input_tokens=inp, output_tokens=out,
                  cached_input_tokens=extra.pop("cached", 0), cache_creation_tokens=0, reasoning_tokens=0,
                  cost_usd=cost, duration_ms=123.4, status_code=status, stream=False, error=error,
                  upstream_id="chatcmpl-1", upstream_request_id="req_1", retry_count=retries,
                  fallback_model="", rule_matches=[], metadata={"team": "core"}, provider_meta={})
    fields.update(extra)
    return RequestRecord(**fields)


def journal_lines(ledger: Ledger) -> list[dict]:
    with open(ledger.journal_path, "rb") as fh:
        return [json.loads(line) for line in fh]


def git(cwd, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=cwd,
                   check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    git(root, "checkout", "-q", "-b", "feature/ledger")
    (root / "a.txt").write_text("a\n")
    git(root, "add", "a.txt")
    git(root, "commit", "-q", "-m", "first")
    return root


def head(root, short=True) -> str:
    args = ["git", "rev-parse"] + (["--short"] if short else []) + ["HEAD"]
    return subprocess.run(args, cwd=root, capture_output=True, text=True, check=True).stdout.strip()


# --- git context ---------------------------------------------------------------------------------

def test_git_context_in_a_repo_and_a_subdirectory(repo):
    sub = repo / "src" / "deep"
    sub.mkdir(parents=True)
    for where in (repo, sub):
        ctx = git_context(str(where))
        assert ctx == {"branch": "feature/ledger", "commit": head(repo), "repo_root": str(repo.resolve())}
    assert 4 <= len(ctx["commit"]) < 40


def test_git_context_unborn_and_detached(tmp_path, monkeypatch, repo):
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    git(fresh, "init", "-q")
    git(fresh, "checkout", "-q", "-b", "trunk")
    assert git_context(str(fresh)) == {"branch": "trunk", "commit": "", "repo_root": str(fresh.resolve())}
    git(repo, "checkout", "-q", "--detach")
    assert git_context(str(repo)) == {"branch": "HEAD", "commit": head(repo), "repo_root": str(repo.resolve())}


def test_git_context_outside_a_repo_missing_dir_and_without_git(tmp_path, monkeypatch, repo):
    empty = {"branch": "", "commit": "", "repo_root": ""}
    outside = tmp_path / "plain"
    outside.mkdir()
    assert git_context(str(outside)) == empty
    assert git_context(str(tmp_path / "does-not-exist")) == empty
    nogit = tmp_path / "nogit-bin"
    nogit.mkdir()
    monkeypatch.setenv("PATH", str(nogit))
    assert git_context(str(repo)) == empty


def test_git_context_gives_up_on_a_hung_git(tmp_path, monkeypatch, repo):
    bindir = tmp_path / "slowbin"
    bindir.mkdir()
    fake = bindir / "git"
    fake.write_text("#!/bin/sh\nsleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setattr(tokenomics.records.ledger, "GIT_TIMEOUT", 0.3)
    started = time.monotonic()
    assert git_context(str(repo)) == {"branch": "", "commit": "", "repo_root": ""}
    assert time.monotonic() - started < 5


# --- the session ledger ---------------------------------------------------------------------------

def test_journal_summary_and_rollups(tmp_path, repo):
    data = tmp_path / "data"
    clock = Clock()
    ledger = Ledger(str(data), session_id="0a1b2c3d", cwd=str(repo), clock=clock)
    assert ledger.journal_path == str(data / "sessions" / "2026-11-27_0a1b2c3d.jsonl")
    assert mode(data / "sessions") == 0o700 and mode(ledger.journal_path) == 0o600
    records = [
        rec(T0 + 1, inp=100, out=20, cost=0.001, cached=40, retries=1),
        rec(T0 + 2, model="claude-sonnet-4-5", provider="anthropic", token=HASH_B, inp=300, out=50, cost=0.0105),
        rec(T0 + 3, inp=10, out=0, cost=0.0, status=403, error="rule_violation",
            rule_matches=[{"rule": "no-secrets", "type": "regex", "action": "fail", "scope": "input", "count": 1,
                           "value": "sk-LEAKED-SECRET"}]),
        rec(T0 + 4, token=HASH_B, inp=0, out=0, cost=0.0, status=429, error="budget_exceeded"),
    ]
    for r in records:
        ledger.record(r)
    ledger.flush()
    (repo / "b.txt").write_text("b\n")  # a commit made during the session
    git(repo, "add", "b.txt")
    git(repo, "commit", "-q", "-m", "second")
    clock.t = T0 + 10
    summary = ledger.close()

    lines = journal_lines(ledger)
    assert lines[0]["type"] == "session" and lines[0]["session_id"] == "0a1b2c3d"
    assert lines[0]["git"]["branch"] == "feature/ledger"
    rows = lines[1:]
    assert [r["type"] for r in rows] == ["request"] * 4
    assert [r["token_hash"] for r in rows] == [HASH_A[:16], HASH_B[:16], HASH_A[:16], HASH_B[:16]]
    raw = Path(ledger.journal_path).read_text()
    assert HASH_A not in raw and "sk-LEAKED-SECRET" not in raw
    assert rows[2]["rule_matches"] == [{"rule": "no-secrets", "type": "regex", "action": "fail",
                                        "scope": "input", "count": 1}]
    assert rows[0]["timestamp"] == "2026-11-27T12:00:01.000Z"
    assert set(rows[0]) - {"type"} >= {
        "timestamp", "request_id", "token_hash", "model", "provider", "endpoint", "input_tokens",
        "output_tokens", "cost_usd", "duration_ms", "status_code", "stream", "error", "upstream_id",
        "upstream_request_id", "retry_count", "fallback_model", "rule_matches", "metadata", "provider_meta"}

    on_disk = json.loads(Path(ledger.summary_path).read_text())
    assert mode(ledger.summary_path) == 0o600
    assert {k: v for k, v in on_disk.items() if k != "requests"} == summary
    assert on_disk["requests"] == [{k: v for k, v in r.items() if k != "type"} for r in rows]
    assert summary["session_id"] == "0a1b2c3d"
    assert summary["started_at"] == "2026-11-27T12:00:00.000Z" and summary["ended_at"] == "2026-11-27T12:00:10.000Z"
    assert summary["duration_ms"] == 10_000
    first_commit = lines[0]["git"]["commit_start"]
    assert summary["git"] == {"branch": "feature/ledger", "commit_start": first_commit,
                              "commit_end": head(repo), "repo_root": str(repo.resolve())}
    assert first_commit != head(repo)

    t = summary["totals"]
    for name in COUNTS:
        assert t[name] == sum(getattr(r, name) for r in records), name
    assert t["request_count"] == 4
    assert t["total_tokens"] == sum(r.input_tokens + r.output_tokens for r in records)
    assert t["cost_usd"] == pytest.approx(0.0115)
    # a budget refusal is not a rate limit (§9)
    assert (t["error_count"], t["rule_violation_count"], t["rate_limit_count"], t["budget_exceeded_count"]) == \
        (2, 1, 0, 1)

    assert set(summary["by_model"]) == {"gpt-4o-mini", "claude-sonnet-4-5"}
    assert summary["by_model"]["gpt-4o-mini"]["request_count"] == 3
    assert summary["by_model"]["gpt-4o-mini"]["input_tokens"] == 110
    assert summary["by_provider"]["anthropic"]["cost_usd"] == pytest.approx(0.0105)
    tok_b = summary["by_token"][HASH_B[:16]]
    assert tok_b["models_used"] == ["claude-sonnet-4-5", "gpt-4o-mini"]
    assert (tok_b["first_seen"], tok_b["last_seen"]) == ("2026-11-27T12:00:02.000Z", "2026-11-27T12:00:04.000Z")
    assert tok_b["budget_exceeded_count"] == 1 and tok_b["rate_limit_count"] == 0 and tok_b["request_count"] == 2
    for table in ("by_model", "by_provider", "by_token"):
        assert sum(e["request_count"] for e in summary[table].values()) == 4
        assert sum(e["cost_usd"] for e in summary[table].values()) == pytest.approx(t["cost_usd"])
    assert ledger.close() is summary  # idempotent


def test_records_wait_for_flush(tmp_path):
    ledger = Ledger(str(tmp_path), clock=Clock())
    assert len(ledger.session_id) == 8 and int(ledger.session_id, 16) >= 0
    assert [r["type"] for r in journal_lines(ledger)] == ["session"]  # the header is durable at once
    ledger.record(rec(T0 + 1))
    ledger.record(rec(T0 + 2))
    assert len(journal_lines(ledger)) == 1  # nothing written by record()
    ledger.flush()
    assert [r["type"] for r in journal_lines(ledger)] == ["session", "request", "request"]
    ledger.flush()  # nothing pending: no duplicate lines
    assert len(journal_lines(ledger)) == 3
    ledger.close()


def test_flusher_writes_in_the_background_and_flushes_on_cancel(tmp_path):
    ledger = Ledger(str(tmp_path), clock=Clock(), flush_interval=0.02)

    async def scenario():
        task = asyncio.create_task(ledger.run_flusher())
        ledger.record(rec(T0 + 1))
        for _ in range(500):  # bounded: 5 s at most
            if len(journal_lines(ledger)) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(journal_lines(ledger)) == 2
        ledger.record(rec(T0 + 2))
        ledger.record(rec(T0 + 3))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert len(journal_lines(ledger)) == 4  # the final flush on cancel wrote the last two
    assert ledger.close()["totals"]["request_count"] == 3


def test_failed_journal_writes_are_retried_and_logged_once(tmp_path, caplog):
    ledger = Ledger(str(tmp_path), clock=Clock())
    real_fd = ledger._fd
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        ledger._fd = full  # every write fails with ENOSPC
        ledger.record(rec(T0 + 1))
        with caplog.at_level(logging.ERROR, logger="tokenomics"):
            ledger.flush()
            ledger.record(rec(T0 + 2))
            ledger.flush()
        assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
        assert "journal" in caplog.text
    finally:
        ledger._fd = real_fd
        os.close(full)
    ledger.flush()
    rows = journal_lines(ledger)
    assert [r["timestamp"] for r in rows[1:]] == ["2026-11-27T12:00:01.000Z", "2026-11-27T12:00:02.000Z"]
    ledger.close()


def test_open_failure_is_a_clear_runtime_failure(tmp_path):
    (tmp_path / "sessions").write_text("not a directory")
    with pytest.raises(RuntimeFailure, match="session journal"):
        Ledger(str(tmp_path))
    with pytest.raises(UsageError):
        Ledger(str(tmp_path / "x"), session_id="nothex!!")


def test_crash_journal_alone_rebuilds_the_session(tmp_path, repo):
    ledger = Ledger(str(tmp_path), session_id="deadbeef", cwd=str(repo), clock=Clock())
    ledger.record(rec(T0 + 5, inp=7, out=3, cost=0.5))
    ledger.record(rec(T0 + 65, model="gpt-4.1", inp=11, out=2, cost=0.25, status=500, error="upstream_error"))
    ledger.flush()
    with open(ledger.journal_path, "ab") as fh:  # the process died mid-write
        fh.write(b'{"type":"request","timestamp":"2026-11-27T12:02:00.000Z","input_tok')
    # no close(): no summary file
    assert not os.path.exists(ledger.summary_path)
    (session,) = load_sessions(str(tmp_path))
    assert session["session_id"] == "deadbeef" and session["closed"] is False
    assert session["started_at"] == "2026-11-27T12:00:00.000Z"
    assert session["ended_at"] == "2026-11-27T12:01:05.000Z" and session["duration_ms"] == 65_000
    assert session["git"] == {"branch": "feature/ledger", "commit_start": head(repo), "commit_end": "",
                              "repo_root": str(repo.resolve())}
    assert session["totals"]["request_count"] == 2
    assert session["totals"]["input_tokens"] == 18 and session["totals"]["total_tokens"] == 23
    assert session["totals"]["cost_usd"] == pytest.approx(0.75)
    assert session["totals"]["error_count"] == 1
    assert set(session["by_model"]) == {"gpt-4o-mini", "gpt-4.1"}
    assert [r["input_tokens"] for r in session["requests"]] == [7, 11]
    assert "type" not in session["requests"][0]


KILL_CHILD = textwrap.dedent("""
    import asyncio, sys, time
    import tokenomics
    import tokenomics.records.ledger

    async def main():
        ledger = tokenomics.records.ledger.Ledger(sys.argv[1], session_id="c0ffee00", cwd=sys.argv[1], flush_interval=0.2)
        asyncio.create_task(ledger.run_flusher())
        n = 0
        while True:
            now = time.time()
            ledger.record(tokenomics.records.ledger.RequestRecord(now, str(n), "f" * 64, "m", "p", "/v1/chat/completions"))
            sys.stdout.write(f"{n} {now}\\n")  # the acknowledgement
            sys.stdout.flush()
            n += 1
            await asyncio.sleep(0.002)

    asyncio.run(main())
""")


def test_kill_9_loses_at_most_the_flush_interval(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(tokenomics.__file__)))
    proc = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                            env=env, text=True)
    try:
        acks = []
        for line in proc.stdout:  # bounded by the count below
            acks.append(line.split())
            if len(acks) >= 400:  # ~1 s of traffic, several flushes
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        acks += [line.split() for line in proc.stdout.read().splitlines() if len(line.split()) == 2]
    finally:
        if proc.poll() is None:
            proc.kill()
    (session,) = load_sessions(str(tmp_path))
    ids = [int(r["request_id"]) for r in session["requests"]]
    assert ids == list(range(len(ids)))  # a gap-free prefix of what was acknowledged
    assert len(ids) >= 100
    sent = {int(n): float(t) for n, t in acks}
    lost = [sent[n] for n in sent if n >= len(ids)]
    if lost:  # the unflushed tail spans at most one interval plus one write+fsync
        window = max(sent.values()) - min(lost)
        assert window <= 0.2 + 0.3, window


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["m1", "m2", ""]), st.sampled_from(["openai", "anthropic"]),
                          st.sampled_from([HASH_A, HASH_B]), st.integers(0, 10**6), st.integers(0, 10**5),
                          st.floats(0, 5, allow_nan=False), st.sampled_from([200, 400, 403, 429, 502]),
                          st.integers(0, 3)),
                max_size=25))
def test_summary_and_rebuilt_journal_agree(items):
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(tmp, session_id="12345678", cwd=tmp, clock=Clock())
        for i, (model, provider, token, inp, out, cost, status, retries) in enumerate(items):
            ledger.record(rec(T0 + i, model=model, provider=provider, token=token, inp=inp, out=out,
                              cost=cost, status=status, retries=retries))
        summary = ledger.close()
        os.unlink(ledger.summary_path)
        (rebuilt,) = load_sessions(tmp)
        for key in ("totals", "by_model", "by_provider", "by_token"):
            assert rebuilt[key] == summary[key]
        assert summary["totals"]["input_tokens"] == sum(item[3] for item in items)
        assert summary["totals"]["cost_usd"] == pytest.approx(sum(round(item[5], 9) for item in items))
        assert summary["totals"]["error_count"] == sum(item[6] >= 400 for item in items)
        if any(item[0] == "" for item in items):
            assert "(none)" in summary["by_model"]


# --- reading: sessions, summary, show --------------------------------------------------------------

def make_sessions(data: Path, repo: Path):
    """Three sessions: two closed on two branches a day apart, one left open (crashed)."""
    a = Ledger(str(data), session_id="aaaa1111", cwd=str(repo), clock=Clock(T0))
    a.record(rec(T0 + 10, inp=100, out=10, cost=0.01))
    a.record(rec(T0 + 20, model="gpt-4.1", inp=200, out=20, cost=0.02))
    a.close()
    git(repo, "checkout", "-q", "-b", "other")
    b = Ledger(str(data), session_id="aaaa2222", cwd=str(repo), clock=Clock(T0 + 86400))
    b.record(rec(T0 + 86400 + 5, inp=1000, out=100, cost=0.1, token=HASH_B))
    b.close()
    c = Ledger(str(data), session_id="bbbb3333", cwd=str(repo), clock=Clock(T0 + 2 * 86400))
    c.record(rec(T0 + 2 * 86400 + 5, inp=3, out=4, cost=0.0004))
    c.flush()
    return a, b, c


def test_load_sessions_mixes_summaries_and_journals(tmp_path, repo):
    data = tmp_path / "data"
    assert load_sessions(str(data)) == []
    make_sessions(data, repo)
    (data / "sessions" / ".tmp-junk").write_text("{")
    (data / "sessions" / "notes.txt").write_text("hello")
    sessions = load_sessions(str(data))
    assert [s["session_id"] for s in sessions] == ["aaaa1111", "aaaa2222", "bbbb3333"]
    assert [s["closed"] for s in sessions] == [True, True, False]
    assert [s["git"]["branch"] for s in sessions] == ["feature/ledger", "other", "other"]
    assert [s["totals"]["request_count"] for s in sessions] == [2, 1, 1]


def test_load_sessions_reads_in_the_carried_lines_a_crash_kept_from_the_files_once(tmp_path):
    """After a crash some answered requests' lines may be only in the usage journal, which
    carried them: the readers add those a journal or a summary lacks, each once (the log may
    carry a line again, or carry lines the file holds), with the totals recomputed."""
    data = str(tmp_path)
    closed = Ledger(data, "0000000a", cwd=data, clock=Clock())
    closed.record(rec(T0 + 1))
    closed.record(rec(T0 + 2, model="m2", inp=7))
    with closed.handing_over() as item_a:
        pass
    closed.close()
    summary = json.loads(Path(closed.summary_path).read_text())
    summary["requests"] = summary["requests"][:1]   # built from a file the last line never reached
    summary["totals"].update(request_count=1, input_tokens=100)
    Path(closed.summary_path).write_text(json.dumps(summary))
    crashed = Ledger(data, "0000000b", cwd=data, clock=Clock(T0 + 10))
    crashed.record(rec(T0 + 11))
    crashed.record(rec(T0 + 12, inp=5))
    with crashed.handing_over() as item_b:
        pass
    lines = Path(crashed.journal_path).read_bytes().splitlines(keepends=True)
    Path(crashed.journal_path).write_bytes(b"".join(lines[:2]))   # killed before the last line's write
    assert [s["totals"]["request_count"] for s in load_sessions(data)] == [1, 1]
    sessions = load_sessions(data, [item_a, item_b, item_b, ["../x.jsonl", 0, "{}"], "junk"])
    by_id = {s["session_id"]: s for s in sessions}
    assert [r["request_id"] for r in by_id["0000000a"]["requests"]] == [rec(T0 + 1).request_id,
                                                                       rec(T0 + 2, model="m2").request_id]
    assert by_id["0000000a"]["closed"] is True and by_id["0000000a"]["ended_at"] == summary["ended_at"]
    assert by_id["0000000a"]["totals"]["request_count"] == 2
    assert by_id["0000000a"]["totals"]["input_tokens"] == 107
    assert set(by_id["0000000a"]["by_model"]) == {"gpt-4o-mini", "m2"}
    assert [r["request_id"] for r in by_id["0000000b"]["requests"]] == [rec(T0 + 11).request_id,
                                                                       rec(T0 + 12).request_id]
    assert by_id["0000000b"]["totals"]["input_tokens"] == 105 and by_id["0000000b"]["closed"] is False
    crashed.close()


def test_summarize_with_filters(tmp_path, repo):
    data = tmp_path / "data"
    make_sessions(data, repo)
    sessions = load_sessions(str(data))
    everything = summarize(sessions)
    assert everything["sessions"] == 3
    assert everything["totals"]["request_count"] == 4
    assert everything["totals"]["input_tokens"] == 1303
    assert everything["totals"]["cost_usd"] == pytest.approx(0.1304)
    assert set(everything["by_branch"]) == {"feature/ledger", "other"}
    assert everything["by_branch"]["other"]["input_tokens"] == 1003
    assert everything["by_token"][HASH_B[:16]]["cost_usd"] == pytest.approx(0.1)
    assert everything["filters"] == {"since": None, "until": None, "branch": None, "token": None, "label": None}

    on_other = summarize(sessions, branch="other")
    assert (on_other["sessions"], on_other["totals"]["request_count"]) == (2, 2)
    assert set(on_other["by_branch"]) == {"other"}
    assert summarize(sessions, branch="nope")["totals"]["request_count"] == 0

    # since/until cut by request time, not session: only the second request of session a
    window = summarize(sessions, since=T0 + 15, until=T0 + 86400)
    assert window["totals"]["request_count"] == 1
    assert set(window["by_model"]) == {"gpt-4.1"}
    assert window["sessions"] == 1
    assert window["filters"]["since"] == "2026-11-27T12:00:15.000Z"
    day2 = summarize(sessions, since=T0 + 86400)
    assert day2["totals"]["request_count"] == 2 and day2["sessions"] == 2


def test_find_session_prefix_rules(tmp_path, repo):
    data = tmp_path / "data"
    make_sessions(data, repo)
    sessions = load_sessions(str(data))
    assert find_session(sessions, "aaaa1")["session_id"] == "aaaa1111"
    assert find_session(sessions, "BBBB")["session_id"] == "bbbb3333"
    assert find_session(sessions, "2026-11-28_aaaa")["session_id"] == "aaaa2222"
    with pytest.raises(RuntimeFailure, match="2 sessions"):
        find_session(sessions, "aaaa")
    with pytest.raises(RuntimeFailure, match="no session"):
        find_session(sessions, "cccc")
    with pytest.raises(UsageError, match="at least 4"):
        find_session(sessions, "aaa")


def test_parse_when():
    now = T0
    assert parse_when("7d", now) == now - 7 * 86400
    assert parse_when("90m", now) == now - 5400
    assert parse_when("2026-11-01", now) == utc(2026, 11, 1)
    assert parse_when("2026-11-01", now, end_of_day=True) == utc(2026, 11, 2)
    assert parse_when("2026-11-01T08:30:00Z", now) == utc(2026, 11, 1, 8, 30)
    assert parse_when("2026-11-01T10:30:00+02:00", now) == utc(2026, 11, 1, 8, 30)
    with pytest.raises(UsageError, match="--since: 'yesterday' is not a time"):
        parse_when("yesterday", now, flag="--since")


def test_render_tables_show_the_numbers(tmp_path, repo):
    data = tmp_path / "data"
    make_sessions(data, repo)
    sessions = load_sessions(str(data))
    listing = render_sessions(sessions)
    lines = listing.splitlines()
    assert lines[0].split()[:2] == ["SESSION", "STARTED"]
    row = next(line for line in lines if line.startswith("aaaa2222"))
    assert "other" in row and "1100" in row and "0.1000" in row and "closed" in row
    assert "bbbb3333" in listing and "open" in listing
    assert render_sessions([]).strip() == "no sessions recorded yet"

    text = render_summary(summarize(sessions, branch="other"))
    assert "branch other" in text and "2 session(s)" in text
    assert "0.1004" in text  # cost, 4 decimals
    # an unlabelled token is named by a 12-char hash prefix; a labelled one by its label
    assert HASH_B[:12] in text and HASH_B[:13] not in text and "MODEL" in text and "BRANCH" in text
    assert "team-b" in render_summary(summarize(sessions, branch="other"), {HASH_B[:16]: "team-b"})
    model_row = next(line for line in text.splitlines() if line.startswith("gpt-4o-mini"))
    assert model_row.split() == ["gpt-4o-mini", "2", "1003", "104", "0", "0", "0", "0", "0.1004"]

    shown = render_session(find_session(sessions, "aaaa1"))
    assert "Session aaaa1111 (closed)" in shown and "feature/ledger" in shown
    assert "0.0300" in shown and "0.0100" in shown and "0.0200" in shown
    assert "2026-11-27 12:00:20" in shown
    assert "open" in render_session(find_session(sessions, "bbbb"))


# --- conversation memory --------------------------------------------------------------------------

def read(path) -> str:
    return Path(path).read_text(encoding="utf-8")


def test_memory_pattern_with_subdirectories(tmp_path):
    w = MemoryWriter(str(tmp_path), {"enabled": True, "file_path": "logs",
                                     "file_name": "{date}/{token_hash}/chat.md", "redis": False})
    w.append(HASH_A, "gpt-4o-mini", [("user", "hello"), ("assistant", "hi there")], T0)
    path = tmp_path / "logs" / "2026-11-27" / HASH_A[:16] / "chat.md"
    assert read(path) == (f"## 2026-11-27T12:00:00Z | {HASH_A[:16]} | user | gpt-4o-mini\n\nhello\n\n"
                          f"## 2026-11-27T12:00:00Z | {HASH_A[:16]} | assistant | gpt-4o-mini\n\nhi there\n\n")
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    w.append(HASH_A, "gpt-4o-mini", [("user", "again")], T0 + 60)
    assert read(path).count("## ") == 3
    w.append(HASH_B, "m", [("user", "x")], T0 + 86400)
    assert (tmp_path / "logs" / "2026-11-28" / HASH_B[:16] / "chat.md").exists()
    assert HASH_A not in read(path)  # only the prefix


@pytest.mark.parametrize("pattern", ["../escape.md", "a/../../escape.md", "/etc/passwd", "{token_hash}/..",
                                     "{secret}.md", "dir/", "~/x.md"])
def test_memory_pattern_cannot_leave_its_directory(tmp_path, pattern):
    with pytest.raises(UsageError, match="file_name"):
        MemoryWriter(str(tmp_path), {"enabled": True, "file_path": "logs", "file_name": pattern})


def test_memory_single_file_and_defaults(tmp_path):
    single = MemoryWriter(str(tmp_path), {"file_path": "conv.md"})  # enabled when configured at all
    single.append(HASH_A, "m", [("user", "one")], T0)
    assert "| user | m" in read(tmp_path / "conv.md")
    absolute = tmp_path / "abs" / "dir"
    MemoryWriter(str(tmp_path), {"enabled": True, "file_path": str(absolute)}).append(HASH_A, "m", [("user", "x")], T0)
    assert (absolute / "memory.md").exists()
    MemoryWriter(str(tmp_path), {"enabled": True}).append(HASH_A, "m", [("user", "x")], T0)
    assert (tmp_path / "memory" / "memory.md").exists()
    off = MemoryWriter(str(tmp_path / "off"), {"enabled": False, "file_path": "x.md"})
    off.append(HASH_A, "m", [("user", "x")], T0)
    MemoryWriter(str(tmp_path / "off"), {}).append(HASH_A, "m", [("user", "x")], T0)
    assert not (tmp_path / "off").exists()


def test_memory_rotation_and_gzip(tmp_path):
    limit = 0.0005  # MiB: 524 bytes
    w = MemoryWriter(str(tmp_path), {"enabled": True, "file_path": "mem", "max_size_mb": limit,
                                     "compress_old": True})
    body = "x" * 200
    for i in range(7):
        w.append(HASH_A, "m", [("user", f"{i}:{body}")], T0 + i // 3)  # several rotations per second
    files = sorted(os.listdir(tmp_path / "mem"))
    rotated = [f for f in files if f != "memory.md"]
    assert rotated and all(f.endswith(".md.gz") for f in rotated)
    assert rotated[0].startswith("memory.20261127T120000")
    assert len(set(rotated)) == len(rotated) == len(files) - 1
    texts = [gzip.decompress((tmp_path / "mem" / f).read_bytes()).decode() for f in rotated]
    current = read(tmp_path / "mem" / "memory.md")
    assert os.path.getsize(tmp_path / "mem" / "memory.md") <= limit * 1024 * 1024
    for t in texts:
        assert len(t.encode()) <= limit * 1024 * 1024
    joined = "".join(texts) + current
    assert [line.split(":")[0] for line in joined.splitlines() if line.endswith(body)] == [str(i) for i in range(7)]
    for f in files:
        assert mode(tmp_path / "mem" / f) == 0o600


def test_memory_rotation_without_gzip(tmp_path):
    w = MemoryWriter(str(tmp_path), {"enabled": True, "file_path": "notes.md", "max_size_mb": 0.0002})
    for i in range(3):
        w.append(HASH_A, "m", [("user", "y" * 150)], T0 + i)
    names = sorted(os.listdir(tmp_path))
    assert names == ["notes.20261127T120001.md", "notes.20261127T120002.md", "notes.md"]  # named when rotated


def test_failing_memory_writer_logs_once_and_never_raises(tmp_path, caplog):
    (tmp_path / "blocked").write_text("a file where the directory should be")
    w = MemoryWriter(str(tmp_path), {"enabled": True, "file_path": "blocked/sub", "file_name": "{token_hash}.md"})
    with caplog.at_level(logging.ERROR, logger="tokenomics"):
        for i in range(3):
            w.append(HASH_A, "m", [("user", "secret conversation text")], T0 + i)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "memory log" in errors[0].getMessage()
    assert "secret conversation text" not in caplog.text
