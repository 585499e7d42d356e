"""Answered requests across crashes (SPEC §7, §9): the usage journal's line carries the ledger's
request lines, so a kill -9 of a real `tokenomics serve` between the journal's fdatasync and the
ledger's write, or in the middle of that write, costs no ledger line and no budget charge, and
neither does a second restart; what the journal carries is the ledger record, never the prompt
or the token; without a usage journal the ledger fsyncs itself."""
import asyncio
import concurrent.futures
import http.client
import json
import os
import shutil
import signal
import stat
import threading
import subprocess
from pathlib import Path

import pytest
import tokenomics.config
import tokenomics.errors
import tokenomics.limits.journal
import tokenomics.http.server
import tokenomics.proxy
import tokenomics.records.ledger
from conftest import TOKENOMICS, ProxyProcess, base_env
from test_charging import BODY, DEADLINE, charged, poll
from test_proxy import raw
from test_workers import alive, children, redis_config, wait_until


def ledger_ids(data_dir: Path) -> dict[str, list]:
    """session journal file name -> the request ids of its complete request lines, in order."""
    out = {}
    for path in sorted((data_dir / "sessions").glob("*.jsonl")):
        ids = []
        for line in path.read_bytes().splitlines(keepends=True):
            if line.startswith(b'{"type":"request"') and line.endswith(b"\n"):
                ids.append(json.loads(line)["request_id"])
        out[path.name] = ids
    return out


def answer(proxy, token: str, body: dict) -> tuple[int, str]:
    status, headers, _ = raw(proxy, "POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {token}"})
    return status, headers["x-tokenomics-request-id"]


def answered_then_killed(cli, stub, start_proxy, data_dir, token: str) -> list[str]:
    """A real `serve` answers a plain request, a stream and a refusal, then dies by kill -9."""
    proxy = start_proxy(upstream_url=stub.url, subprocess=True)
    ids = []
    for body, status in ((BODY, 200), ({**BODY, "stream": True}, 200), ({**BODY, "model": 3}, 400), (BODY, 200)):
        got, rid = answer(proxy, token, body)
        assert got == status
        ids.append(rid)
    proxy.stop(signal.SIGKILL)
    return ids


# --- kill -9 between the journal's fdatasync and the ledger's write, or in the middle of it ---------

@pytest.mark.subprocess_proxy
@pytest.mark.parametrize("crash", ["last line never written", "last line torn", "nothing lost"])
def test_kill_9_around_the_ledger_write_then_two_restarts_keep_each_answer_and_charge_once(
        cli, stub, start_proxy, data_dir, crash):
    """What a kill -9 leaves in the session journal right after the usage journal's fdatasync
    (the last line not written yet), or in the middle of its write (half of it), or after it:
    the restarted proxy puts the line back once, a second restart (after another kill -9)
    and a graceful third add nothing, and the budget is charged once for each answer."""
    token = cli.token({"budget": {"tokens": {"total": 1_000_000}}})
    ids = answered_then_killed(cli, stub, start_proxy, data_dir, token)
    spent = charged(data_dir)
    assert spent > 0
    (name,) = ledger_ids(data_dir)
    path = data_dir / "sessions" / name
    assert ledger_ids(data_dir) == {name: ids}
    data = path.read_bytes()
    last = data.rstrip(b"\n").rfind(b"\n") + 1   # where the last request line starts
    if crash == "last line never written":
        path.write_bytes(data[:last])
    elif crash == "last line torn":
        path.write_bytes(data[:last + (len(data) - last) // 2])
    for restart in range(3):
        proxy = start_proxy(upstream_url=stub.url, subprocess=True)
        restored = crash != "nothing lost" and restart == 0
        assert ("restored them from the usage journal" in proxy.stderr) == restored, proxy.stderr
        assert ledger_ids(data_dir)[name] == ids   # each once, in the order answered
        assert path.read_bytes().endswith(b"}\n")  # no torn fragment left inside the file
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert charged(data_dir) == spent
        if restart < 2:
            proxy.stop(signal.SIGKILL)
        else:
            assert proxy.stop(signal.SIGTERM) == 0
    assert charged(data_dir) == spent
    sessions = tokenomics.records.ledger.load_sessions(str(data_dir))
    (crashed,) = [s for s in sessions if s["session_id"] == name.split("_")[1][:8]]
    assert [r["request_id"] for r in crashed["requests"]] == ids


@pytest.mark.subprocess_proxy
def test_a_stream_answered_before_the_kill_is_in_the_ledger_and_charged_once(cli, stub, start_proxy, data_dir):
    """A stream's ledger line rides in the usage journal's line committed before its last chunk:
    cut from the session journal by a crash, it comes back once with its whole usage."""
    token = cli.token({"budget": {"tokens": {"total": 1_000_000}}})
    proxy = start_proxy(upstream_url=stub.url, subprocess=True)
    stub.set_stream_chunks(["abcdefg "] * 40)
    status, rid = answer(proxy, token, {**BODY, "stream": True})
    assert status == 200
    proxy.stop(signal.SIGKILL)
    (name,) = ledger_ids(data_dir)
    path = data_dir / "sessions" / name
    before = [json.loads(x) for x in path.read_bytes().splitlines()][-1]
    assert before["request_id"] == rid and before["stream"] and before["output_tokens"] >= 40
    spent = charged(data_dir)
    data = path.read_bytes()
    path.write_bytes(data[:data.rstrip(b"\n").rfind(b"\n") + 1])   # the line the kill kept from the file
    for _ in range(2):
        proxy = start_proxy(upstream_url=stub.url, subprocess=True)
        proxy.stop(signal.SIGKILL)
    rows = [json.loads(x) for x in path.read_bytes().splitlines()]
    assert [r for r in rows if r["type"] == "request"] == [before]
    assert charged(data_dir) == spent


# The same instants, hit in a real `serve`: a sitecustomize planted on its path makes the N-th
# write of the session journal (one per answered request here) kill the process with SIGKILL
# right before it (the usage journal's commit has returned), half-way through it, or right after.
KILL_HOOK = """
import os, signal
import tokenomics.records.ledger as _ledger

_real, _count = _ledger.Ledger._write, [0]

def _write(self, data):
    _count[0] += 1
    if _count[0] == int(os.environ["CRASH_WRITE"]):
        how = os.environ["CRASH_HOW"]
        if how == "torn":
            os.write(self._fd, data[:len(data) // 2])
        elif how == "after":
            _real(self, data)
        os.kill(os.getpid(), signal.SIGKILL)
    return _real(self, data)

_ledger.Ledger._write = _write
"""


def serve_with_hook(stub, start_proxy, tmp_path: Path, hook_source: str, **env):
    """A real `serve` with `hook_source` as its sitecustomize (run at interpreter start)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(hook_source)
    path = os.pathsep.join([str(hook), str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])
    return start_proxy(upstream_url=stub.url, subprocess=True, env={"PYTHONPATH": path, **env})


@pytest.mark.subprocess_proxy
@pytest.mark.parametrize("how", ["before", "torn", "after"])
def test_a_serve_killed_at_its_ledger_write_is_restored_once_and_charged_once(
        cli, stub, start_proxy, data_dir, tmp_path, how):
    """SIGKILL of a real `serve` inside the group commit of its third request: after the usage
    journal's fdatasync and before, during or after the session journal's write. The client
    gets no answer; the restarted proxy's ledger holds the three requests once each, a second
    restart (after another kill -9) adds nothing, and the budget was charged exactly what the
    ledger records, once."""
    token = cli.token({"budget": {"tokens": {"total": 1_000_000}}})
    proxy = serve_with_hook(stub, start_proxy, tmp_path, KILL_HOOK, CRASH_WRITE="3", CRASH_HOW=how)
    ids = [answer(proxy, token, body)[1] for body in (BODY, {**BODY, "stream": True})]
    with pytest.raises((OSError, http.client.HTTPException)):
        answer(proxy, token, BODY)
    assert proxy.proc.wait(DEADLINE) == -signal.SIGKILL
    (name,) = ledger_ids(data_dir)
    path = data_dir / "sessions" / name
    found = ledger_ids(data_dir)[name]
    assert found[:2] == ids and len(found) == (3 if how == "after" else 2)
    assert path.read_bytes().endswith(b"\n") == (how != "torn")   # the kill did tear the line
    spent = charged(data_dir)
    for restart in range(2):
        proxy = start_proxy(upstream_url=stub.url, subprocess=True)
        rows = [json.loads(x) for x in path.read_bytes().splitlines()]
        requests = [r for r in rows if r["type"] == "request"]
        assert [r["request_id"] for r in requests][:2] == ids and len(requests) == 3
        assert len({r["request_id"] for r in requests}) == 3
        assert path.read_bytes().endswith(b"}\n")
        assert charged(data_dir) == spent == sum(r["input_tokens"] + r["output_tokens"] for r in requests)
        proxy.stop(signal.SIGKILL)


COMPACT_HOOK = """
import os, signal
import tokenomics.limits.journal as _journal

_init, _truncate, _count = _journal.UsageJournal.__init__, os.ftruncate, [0]

def _small(self, path, compact_bytes=0):
    _init(self, path, int(os.environ["COMPACT_BYTES"]))

def _ftruncate(fd, length):
    if length == 0 and os.readlink(f"/proc/self/fd/{fd}").endswith("usage.journal"):
        _count[0] += 1
        if _count[0] == int(os.environ["CRASH_COMPACTION"]):
            if os.environ["CRASH_HOW"] == "after the truncation":
                _truncate(fd, length)
            os.kill(os.getpid(), signal.SIGKILL)
    return _truncate(fd, length)

_journal.UsageJournal.__init__ = _small
os.ftruncate = _ftruncate
"""


@pytest.mark.subprocess_proxy
@pytest.mark.parametrize("how", ["after the snapshot, before the truncation", "after the truncation"])
def test_a_serve_killed_in_the_middle_of_a_compaction_keeps_each_answer_and_charge_once(
        cli, stub, start_proxy, data_dir, tmp_path, how):
    """A real `serve` whose usage journal compacts every ~2 answers (what 1 MiB does every
    ~1,200), killed by SIGKILL inside its second compaction: once the snapshot is renamed into
    place and before the log is truncated (the log's lines, carried ledger lines among them,
    are all in the snapshot's past), or right after the truncation. The session journal was
    fsync'ed before the compaction began, so the restart has each answer once in the ledger and
    charged once (the request whose commit was compacting is in the ledger and charged, though
    its answer was never sent)."""
    token = cli.token({"budget": {"tokens": {"total": 1_000_000}}})
    proxy = serve_with_hook(stub, start_proxy, tmp_path, COMPACT_HOOK, COMPACT_BYTES="1500",
                            CRASH_COMPACTION="2", CRASH_HOW=how)
    ids = []
    for n in range(20):   # bounded: the second compaction comes after ~4 answers
        try:
            status, rid = answer(proxy, token, {**BODY, "stream": n % 2 == 1})
        except (OSError, http.client.HTTPException):
            break
        assert status == 200
        ids.append(rid)
    assert proxy.proc.wait(DEADLINE) == -signal.SIGKILL
    assert len(ids) >= 3
    assert (data_dir / "usage.journal.snapshot").exists()
    for restart in range(2):
        proxy = start_proxy(upstream_url=stub.url, subprocess=True)
        (name,) = [n for n, found in ledger_ids(data_dir).items() if found[:1] == ids[:1]]
        requests = [json.loads(x) for x in (data_dir / "sessions" / name).read_bytes().splitlines()
                    if x.startswith(b'{"type":"request"')]
        # the killed commit's request: written to the ledger and charged, its answer never sent
        assert [r["request_id"] for r in requests][:len(ids)] == ids and len(requests) == len(ids) + 1
        assert len({r["request_id"] for r in requests}) == len(requests)
        assert charged(data_dir) == sum(r["input_tokens"] + r["output_tokens"] for r in requests)
        proxy.stop(signal.SIGKILL)


RESTORE_HOOK = """
import os, signal
import tokenomics.records.ledger as _ledger

_real = _ledger._write_all

def _write_all(fd, data):
    if os.readlink(f"/proc/self/fd/{fd}").endswith(os.environ["CRASH_FILE"]):   # restore_carried's write
        os.write(fd, data[:len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return _real(fd, data)

_ledger._write_all = _write_all
"""


@pytest.mark.subprocess_proxy
def test_a_restart_killed_while_it_restores_leaves_the_next_restart_to_finish_once(
        cli, stub, start_proxy, data_dir, tmp_path):
    """The first proxy dies before its third ledger write; the restart that puts the line back
    dies by SIGKILL half-way through that write (a torn restored line); the next restart cuts
    the fragment off and writes the line once."""
    token = cli.token({"budget": {"tokens": {"total": 1_000_000}}})
    proxy = serve_with_hook(stub, start_proxy, tmp_path, KILL_HOOK, CRASH_WRITE="3", CRASH_HOW="before")
    ids = [answer(proxy, token, BODY)[1] for _ in range(2)]
    with pytest.raises((OSError, http.client.HTTPException)):
        answer(proxy, token, BODY)
    assert proxy.proc.wait(DEADLINE) == -signal.SIGKILL
    (name,) = ledger_ids(data_dir)
    path = data_dir / "sessions" / name
    assert ledger_ids(data_dir)[name] == ids
    (tmp_path / "hook" / "sitecustomize.py").write_text(RESTORE_HOOK)
    dying = ProxyProcess(cli, ["--upstream-url", stub.url], base_env(data_dir, CRASH_FILE=name, PYTHONPATH=os.pathsep.join(
        [str(tmp_path / "hook"), str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])))
    with pytest.raises(AssertionError, match="did not become ready"):
        dying.start()
    assert dying.proc.wait(DEADLINE) == -signal.SIGKILL
    assert not path.read_bytes().endswith(b"\n")   # the restored line is torn
    spent = charged(data_dir)
    proxy = start_proxy(upstream_url=stub.url, subprocess=True)
    requests = [json.loads(x) for x in path.read_bytes().splitlines() if x.startswith(b'{"type":"request"')]
    assert [r["request_id"] for r in requests][:2] == ids and len(requests) == 3
    assert len({r["request_id"] for r in requests}) == 3 and path.read_bytes().endswith(b"}\n")
    assert charged(data_dir) == spent == sum(r["input_tokens"] + r["output_tokens"] for r in requests)
    assert proxy.stop() == 0


@pytest.mark.subprocess_proxy
def test_concurrent_answers_killed_at_a_random_instant_are_each_in_the_ledger_once(cli, stub, start_proxy, data_dir):
    """Eight clients at once (group commits of several requests, off the event loop), the proxy
    killed by SIGKILL while they run: every request a client got its answer for is in the
    ledger, no request is there twice, before and after two restarts."""
    token = cli.token({"budget": {"tokens": {"total": 100_000_000}}})
    proxy = start_proxy(upstream_url=stub.url, subprocess=True)
    answered: list = []
    lock = threading.Lock()

    def client(n: int) -> None:
        for i in range(200):   # bounded; the kill ends it sooner
            try:
                status, rid = answer(proxy, token, {**BODY, "stream": (n + i) % 3 == 0})
            except (OSError, http.client.HTTPException, KeyError):
                return
            assert status == 200
            with lock:
                answered.append(rid)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        clients = [pool.submit(client, n) for n in range(8)]
        assert poll(lambda: len(answered) >= 120), len(answered)
        proxy.stop(signal.SIGKILL)
        for c in clients:
            c.result(DEADLINE)
    for restart in range(3):
        found = [i for ids in ledger_ids(data_dir).values() for i in ids]
        assert len(found) == len(set(found))
        assert set(answered) <= set(found), len(set(answered) - set(found))
        if restart < 2:
            start_proxy(upstream_url=stub.url, subprocess=True).stop(signal.SIGKILL)


# --- what the journal carries: the ledger record, never the prompt or the token --------------------

def test_a_huge_prompt_is_not_carried_and_no_file_holds_the_token(cli, stub, start_proxy, data_dir):
    """A 4 MB prompt: its usage journal line carries the ledger record (about a kilobyte), not
    the prompt; no file in the data dir holds the prompt or the raw token; what the change
    writes is private (0600 files, a 0700 sessions dir)."""
    token = cli.token({"budget": {"tokens": {"total": 10_000_000}}})
    proxy = start_proxy(upstream_url=stub.url)
    marker = "zqxj-prompt-marker-"
    prompt = (marker * (4 * 1024 * 1024 // len(marker)))
    body = {**BODY, "messages": [{"role": "user", "content": prompt}]}
    status, rid = answer(proxy, token, body)
    assert status == 200
    assert answer(proxy, token, BODY)[0] == 200
    lines = (data_dir / "usage.journal").read_bytes().splitlines()
    carrying = [x for x in lines if rid.encode() in x]
    assert len(carrying) == 1 and len(carrying[0]) < 4096, [len(x) for x in carrying]
    assert proxy.stop() == 0
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert any(p.name == "usage.journal.snapshot" for p in files)
    for p in files:
        content = p.read_bytes()
        assert token.encode() not in content, p
        assert marker.encode() not in content, p
    for p in [data_dir / "usage.journal", data_dir / "usage.journal.snapshot",
              *(data_dir / "sessions").iterdir()]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert stat.S_IMODE((data_dir / "sessions").stat().st_mode) == 0o700


@pytest.mark.subprocess_proxy
def test_a_session_journal_restored_after_it_was_lost_is_private_and_holds_no_token(cli, stub, start_proxy, data_dir):
    """A crashed session's journal gone altogether (the kill came before anything of it reached
    the disk, or it was moved away): the restart rebuilds it from the usage journal, 0600, with
    the token's hash prefix only."""
    token = cli.token({"budget": {"tokens": {"total": 1_000_000}}})
    ids = answered_then_killed(cli, stub, start_proxy, data_dir, token)
    (name,) = ledger_ids(data_dir)
    (data_dir / "sessions" / name).unlink()
    proxy = start_proxy(upstream_url=stub.url, subprocess=True)
    assert ledger_ids(data_dir)[name] == ids
    path = data_dir / "sessions" / name
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token.encode() not in path.read_bytes()
    assert proxy.stop() == 0


# --- without a usage journal the ledger's own fsync makes the line durable -------------------------

def _proxy(data_dir: Path, monkeypatch, config: dict | None = None) -> "tokenomics.proxy.Proxy":
    """The objects `serve` builds over `data_dir` (its usage journal or Redis, its ledger), in
    this process and not listening: tests call its pipeline."""
    path = None
    if config is not None:
        path = data_dir / "config.yaml"
        path.write_text(json.dumps(config))   # JSON is YAML
    monkeypatch.chdir(data_dir)   # the ledger's git context is the cwd's
    loaded = tokenomics.config.load_config(str(path) if path else None, str(data_dir), environ={})
    return tokenomics.proxy.Proxy(loaded, environ={})


def _request(proxy, policy: dict) -> tokenomics.http.server.Request:
    """A chat request to the mock provider with a new token of `policy`."""
    token, _ = proxy.store.create({"provider": "mock", **policy})
    body = json.dumps({"model": "mock-1", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]})
    auth = f"Bearer {token}"
    return tokenomics.http.server.Request("POST", "/v1/chat/completions", "", [(b"authorization", auth.encode())],
                                          {"authorization": auth}, body.encode())


def _synced_paths(monkeypatch) -> list:
    """The files fsync'ed or fdatasync'ed from now on, by path, in order."""
    synced: list = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def sync(fd, real=real):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            return real(fd)
        monkeypatch.setattr(os, name, sync)
    return synced


def test_with_redis_keeping_the_counters_the_ledger_fsyncs_each_answer_itself(tmp_path, monkeypatch, redis_server):
    """session.backend: redis (what --workers needs): no usage journal to carry the ledger's
    lines, so the ledger's own fsync covers each answered request before its answer."""
    proxy = _proxy(tmp_path, monkeypatch, redis_config(redis_server))
    assert proxy.journal is None
    pipeline, ledger = proxy.pipeline, proxy.ledger
    req = _request(proxy, {"budget": {"tokens": {"total": 100000}}})
    synced = _synced_paths(monkeypatch)

    async def scenario():
        for n in range(2):
            response = await pipeline(req)
            assert response.status == 200
            rid = dict(response.headers)["x-tokenomics-request-id"]
            assert synced.count(ledger.journal_path) == n + 1                  # fsync'ed ...
            assert rid in ledger_ids(tmp_path)[os.path.basename(ledger.journal_path)]   # ... with its line

    asyncio.run(scenario())
    asyncio.run(proxy.stop())
    assert not (tmp_path / "usage.journal").exists()


# --- another process on the same data dir ----------------------------------------------------------

@pytest.mark.subprocess_proxy
def test_a_second_process_on_the_data_dir_restores_nothing_into_a_live_session(cli, stub, start_proxy, data_dir):
    """While a proxy serves, its last answered line may be in the usage journal and not yet in
    its session journal (the instant between the two writes, made to last here by cutting the
    line off). A second `serve` on the dir is refused before it replays anything, and `token
    show` reads a copy of the journal: neither writes into the live session, so the live proxy's
    own write cannot be doubled. Once the live proxy is gone, a restart puts the line back once."""
    token = cli.token({"budget": {"tokens": {"total": 1_000_000}}})
    proxy = start_proxy(upstream_url=stub.url, subprocess=True)
    ids = [answer(proxy, token, BODY)[1] for _ in range(2)]
    (name,) = ledger_ids(data_dir)
    path = data_dir / "sessions" / name
    data = path.read_bytes()
    path.write_bytes(data[:data.rstrip(b"\n").rfind(b"\n") + 1])
    before = {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file() and p.name != "proxy.lock"}
    second = subprocess.run([*TOKENOMICS, "serve", "--port", "0", "--no-tls", "--upstream-url", stub.url],
                            cwd=cli.cwd, env=base_env(data_dir), capture_output=True, text=True, timeout=DEADLINE * 3)
    assert second.returncode != 0 and "another tokenomics proxy is serving" in second.stderr, second.stderr
    shown = cli("token", "list", "--json")
    assert shown.returncode == 0, shown.stderr
    after = {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file() and p.name != "proxy.lock"}
    assert after == before
    assert ledger_ids(data_dir)[name] == ids[:1]
    proxy.stop(signal.SIGKILL)
    proxy = start_proxy(upstream_url=stub.url, subprocess=True)
    assert ledger_ids(data_dir)[name] == ids
    assert proxy.stop() == 0


@pytest.mark.subprocess_proxy
def test_workers_killed_outright_keep_every_answered_ledger_line(cli, stub, start_proxy, data_dir, redis_server):
    """--workers 2 (Redis keeps the counters; no worker opens the usage journal): each worker's
    ledger fsyncs its own lines, so a kill -9 of the supervisor and its workers keeps every
    answered request, once, and a restart adds nothing."""
    token = cli.token({"budget": {"tokens": {"total": 1_000_000}}})
    config = redis_config(redis_server)
    proxy = start_proxy(upstream_url=stub.url, config=config, args=["--workers", "2"])
    workers = wait_until(lambda: (lambda c: len(c) == 2 and c)(children(proxy.proc.pid)), 10, "two workers")
    ids = []
    for n in range(8):
        status, rid = answer(proxy, token, {**BODY, "stream": n % 2 == 1})
        assert status == 200
        ids.append(rid)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    proxy.stop(signal.SIGKILL)
    wait_until(lambda: not any(alive(p) for p in workers), 10, "the workers to be gone")
    found = sorted(i for v in ledger_ids(data_dir).values() for i in v)
    assert found == sorted(ids)
    assert not (data_dir / "usage.journal").exists()
    proxy = start_proxy(upstream_url=stub.url, config=config, args=["--workers", "2"])
    assert proxy.stop() == 0
    assert sorted(i for v in ledger_ids(data_dir).values() for i in v) == sorted(ids)


# --- what a restart must make durable before the usage journal forgets it --------------------------

def _disk_events(monkeypatch) -> list:
    """(what, path) for every fsync/fdatasync and every truncation to 0 from now on, in order."""
    events: list = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def sync(fd, real=real):
            events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
            return real(fd)
        monkeypatch.setattr(os, name, sync)
    real_truncate = os.ftruncate

    def truncate(fd, length):
        if length == 0:
            events.append(("truncate", os.readlink(f"/proc/self/fd/{fd}")))
        return real_truncate(fd, length)
    monkeypatch.setattr(os, "ftruncate", truncate)
    return events


@pytest.mark.subprocess_proxy
@pytest.mark.parametrize("forgets", ["at replay (a request was in flight)", "at the restarted proxy's first compaction"])
def test_a_restart_fsyncs_the_crashed_session_journal_before_the_usage_journal_forgets_its_lines(
        cli, stub, start_proxy, data_dir, monkeypatch, forgets):
    """The killed proxy wrote its answered ledger lines without an fsync (the usage journal's
    fdatasync covered them); after a kill -9 they are in the page cache only. The restart finds
    them all in the file, so it restores nothing; when the usage journal then truncates its log
    (the replay's compaction of an orphaned reservation, or the new proxy's first compaction,
    which fsyncs only the new session's journal), the only durable copy of those lines is gone
    while the crashed session's journal was never fsync'ed: a power loss then loses answered
    requests. The restart must fsync the files the carried lines belong to before that."""
    token = cli.token({"budget": {"tokens": {"total": 1_000_000}}})
    proxy = start_proxy(upstream_url=stub.url, subprocess=True)
    ids = [answer(proxy, token, BODY)[1] for _ in range(3)]
    if forgets.startswith("at replay"):
        stub.script(hang=True, times=1)

        def in_flight():
            try:
                return answer(proxy, token, BODY)[0]
            except (OSError, http.client.HTTPException):
                return None   # the proxy died under it
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            call = pool.submit(in_flight)
            assert stub.wait_for(lambda: len(stub.requests) == 4, timeout=DEADLINE)
            proxy.stop(signal.SIGKILL)
            assert call.result(DEADLINE) is None
    else:
        proxy.stop(signal.SIGKILL)
    (name,) = ledger_ids(data_dir)
    journal_path = str(data_dir / "usage.journal")
    assert ledger_ids(data_dir)[name] == ids   # in the file (the page cache), nothing to restore
    events = _disk_events(monkeypatch)
    restarted = _proxy(data_dir, monkeypatch)
    if not forgets.startswith("at replay"):
        restarted.journal.compact_bytes = 1   # the log is past its size: compact after this commit
        req = _request(restarted, {})
        assert asyncio.run(restarted.pipeline(req)).status == 200
    asyncio.run(restarted.stop())
    assert ("truncate", journal_path) in events, events   # the usage journal forgot the lines
    forgot = events.index(("truncate", journal_path))
    synced_first = [os.path.basename(path) for what, path in events[:forgot] if what == "sync"]
    assert name in synced_first, f"{name} was not fsync'ed before the usage journal's truncation; only {synced_first}"


# --- an answer and a background flush --------------------------------------------------------------

def test_an_answer_is_not_handed_back_while_a_background_flush_holds_its_ledger_line(tmp_path, monkeypatch):
    """The ledger's background flusher (run_flusher, in a worker thread) may take the pending
    batch, with an answered request's line in it, right after the request recorded it. With
    another request in flight and nothing for the usage journal (a token without a budget),
    GroupCommit.sync() then sees nothing pending and hands the answer back at once, while the
    line is in no file yet: a kill -9 at that instant loses an answered request. Here the
    flusher has taken the batch and is held before its write (for at most 2 s, so that a proxy
    that rightly waits for it is not held forever): the answer must not come back before the
    line is in the session journal or carried by the usage journal."""
    proxy = _proxy(tmp_path, monkeypatch)
    pipeline, ledger = proxy.pipeline, proxy.ledger
    req = _request(proxy, {})
    entered, release = threading.Event(), threading.Event()
    flushers: list = []
    real_write_all, real_record = tokenomics.records.ledger._write_all, tokenomics.records.ledger.Ledger.record

    def write_all(fd, data):
        if threading.current_thread().name == "flusher":
            entered.set()
            release.wait(2.0)
        return real_write_all(fd, data)

    def record(self, rec):
        real_record(self, rec)
        flusher = threading.Thread(target=self.flush, name="flusher")   # run_flusher's thread, now
        flusher.start()
        flushers.append(flusher)
        assert entered.wait(DEADLINE)   # it took the batch and has not written it

    monkeypatch.setattr(tokenomics.records.ledger, "_write_all", write_all)
    monkeypatch.setattr(tokenomics.records.ledger.Ledger, "record", record)

    def durable(rid: str) -> bool:
        return (rid in ledger_ids(tmp_path)[os.path.basename(ledger.journal_path)]
                or rid.encode() in (tmp_path / "usage.journal").read_bytes())

    async def scenario():
        pipeline._in_flight += 1   # another request is in flight
        try:
            response = await asyncio.wait_for(pipeline(req), DEADLINE)
            rid = dict(response.headers)["x-tokenomics-request-id"]
            return response.status, rid, durable(rid)
        finally:
            pipeline._in_flight -= 1
            release.set()

    status, rid, durable_when_answered = asyncio.run(scenario())
    for flusher in flushers:
        flusher.join(DEADLINE)
    monkeypatch.undo()
    asyncio.run(proxy.stop())
    assert status == 200 and durable(rid)
    assert durable_when_answered, "the answer came back while its ledger line was in memory only"


# --- a session journal that cannot be written ------------------------------------------------------

def _answer_in_process(proxy, req) -> str:
    response = asyncio.run(proxy.pipeline(req))
    assert response.status == 200
    return dict(response.headers)["x-tokenomics-request-id"]


def _stop_with_a_full_session_journal(tmp_path, monkeypatch):
    """One answer, then two more while the session journal refuses writes (ENOSPC, from
    /dev/full), then a graceful stop: the ledger and the three request ids, in order. The two
    last lines are in the usage journal only, carried."""
    proxy = _proxy(tmp_path, monkeypatch)
    req = _request(proxy, {"budget": {"tokens": {"total": 100000}}})
    ledger = proxy.ledger
    ids = [_answer_in_process(proxy, req)]
    real_fd, full = ledger._fd, os.open("/dev/full", os.O_WRONLY)
    ledger._fd = full   # every write of the session journal fails with ENOSPC from now on
    try:
        ids += [_answer_in_process(proxy, req) for _ in range(2)]
        assert all(rid.encode() in (tmp_path / "usage.journal").read_bytes() for rid in ids[1:])
        asyncio.run(proxy.stop())   # its close() closes /dev/full
    finally:
        os.close(real_fd)
    return ledger, ids


def test_a_graceful_stop_keeps_the_carried_lines_its_ledger_could_not_write(tmp_path, monkeypatch):
    """While the session journal refuses writes (ENOSPC here, from /dev/full), answered
    requests' lines are durable only in the usage journal's lines that carry them (and carry
    them again with every commit until written). A graceful stop then fails to write them at
    the ledger's close, and must leave the usage journal's log holding them so the next start
    restores them; Proxy.stop() compacts the journal regardless (proxy.py: journal.commit() and
    journal.compact() after ledger.close(), without GroupCommit's `ledger.sync()` check), so
    the next start finds nothing to restore and the two answers are gone from the ledger."""
    ledger, ids = _stop_with_a_full_session_journal(tmp_path, monkeypatch)
    name = os.path.basename(ledger.journal_path)
    assert ledger_ids(tmp_path)[name] == ids[:1]
    restarted = _proxy(tmp_path, monkeypatch)
    asyncio.run(restarted.stop())
    assert ledger_ids(tmp_path)[name] == ids, "answered requests lost by the graceful stop"


def test_a_failing_session_journal_does_not_make_the_usage_journal_grow_quadratically(tmp_path, monkeypatch):
    """Each commit carries every line the ledger still holds, and compaction waits until the
    ledger has written them: with a session journal that refuses writes, N answers leave
    N(N+1)/2 carried copies in the usage journal's log (each line ~0.9 KB; at the ledger's
    cap of 100,000 held lines every commit would append ~90 MB), a log that only grows and that
    the next start reads whole. Carried lines should stay linear in the answers."""
    proxy = _proxy(tmp_path, monkeypatch)
    req = _request(proxy, {"budget": {"tokens": {"total": 10_000_000}}})
    ledger = proxy.ledger
    real_fd, full = ledger._fd, os.open("/dev/full", os.O_WRONLY)
    ledger._fd = full
    answers = 40
    try:
        ids = [_answer_in_process(proxy, req) for _ in range(answers)]
        log = (tmp_path / "usage.journal").read_bytes()
    finally:
        ledger._fd = real_fd
        os.close(full)
    copies = sum(log.count(rid.encode()) for rid in ids)
    asyncio.run(proxy.stop())
    assert copies <= 2 * answers, f"{answers} answers carried {copies} times ({len(log):,} bytes of log)"


@pytest.mark.subprocess_proxy
def test_ledger_commands_after_a_kill_before_any_restart_show_every_answered_request(cli, stub, start_proxy, data_dir):
    """SPEC §9: after a crash the journal alone is enough, the `ledger` commands read journals
    without summaries. A kill -9 between the usage journal's fdatasync and the session
    journal's write leaves the last answered request in the usage journal only, and only a
    restarted proxy with the in-process backend puts it back (restore_carried at replay);
    `ledger show` before that restart (or if the proxy never starts again on that backend)
    does not list it."""
    token = cli.token({"budget": {"tokens": {"total": 1_000_000}}})
    ids = answered_then_killed(cli, stub, start_proxy, data_dir, token)
    (name,) = ledger_ids(data_dir)
    path = data_dir / "sessions" / name
    data = path.read_bytes()
    path.write_bytes(data[:data.rstrip(b"\n").rfind(b"\n") + 1])   # the last write never happened
    shown = cli("ledger", "show", name.split("_")[1][:8], "--json")
    assert shown.returncode == 0, shown.stderr
    assert [r["request_id"] for r in json.loads(shown.stdout)["requests"]] == ids


# --- a proxy that starts while the last one is stopping --------------------------------------------

def test_a_proxy_started_while_the_last_one_stops_keeps_its_charges(tmp_path, monkeypatch):
    """Proxy.stop() releases the data dir's lock before its usage journal's last commit and
    compaction (proxy.py: os.close(self._lock_fd) before journal.commit()/compact()). A proxy
    starting in that instant takes the lock, replays the log and answers a request (its
    reservation, settlement and carried ledger line appended to the same log); the stopping
    proxy's compaction then writes its own snapshot and truncates the log under it. Killed
    -9 after that (the files copied as it leaves them), the new proxy's charge is gone: the
    restart counts only the stopping proxy's usage."""
    data, crashed = tmp_path / "data", tmp_path / "crashed"
    data.mkdir()
    first = _proxy(data, monkeypatch)
    req = _request(first, {"budget": {"tokens": {"total": 100000}}})
    assert asyncio.run(first.pipeline(req)).status == 200
    spent_first = charged(data)
    real_commit = tokenomics.limits.journal.UsageJournal.commit
    tried, second = [], []

    def commit(self, *args, **kwargs):
        if self is first.journal and not tried:   # the stopping proxy's last commit
            tried.append(True)
            try:
                second.append(_proxy(data, monkeypatch))
            except tokenomics.errors.RuntimeFailure as exc:   # refused: the dir is still locked
                assert "another tokenomics proxy is serving" in str(exc)
            else:
                with concurrent.futures.ThreadPoolExecutor(1) as pool:   # its own loop, as its own process
                    assert pool.submit(asyncio.run, second[0].pipeline(req)).result(DEADLINE).status == 200
        return real_commit(self, *args, **kwargs)
    monkeypatch.setattr(tokenomics.limits.journal.UsageJournal, "commit", commit)
    asyncio.run(first.stop())
    assert tried
    if not second:
        return   # no second proxy while the first one still writes its journal: nothing can interleave
    shutil.copytree(data, crashed, ignore=shutil.ignore_patterns("proxy.lock"))   # kill -9 of the second now
    rows = [json.loads(x) for p in (data / "sessions").glob("*.jsonl")
            for x in p.read_bytes().splitlines() if x.startswith(b'{"type":"request"')]
    assert len(rows) == 2
    spent_both = sum(r["input_tokens"] + r["output_tokens"] for r in rows)
    assert spent_both > spent_first
    second[0].ledger.close()
    restarted = _proxy(crashed, monkeypatch)
    asyncio.run(restarted.stop())
    assert charged(crashed) == spent_both, "the second proxy's charge was lost"


def test_a_session_journal_that_cannot_be_restored_into_does_not_block_the_start_and_loses_nothing(tmp_path, monkeypatch):
    """A restart that cannot put a crashed session's lines back into its file (here a directory
    stands where the file was) still starts, logs it, and keeps the usage journal's log, which
    holds the only copies, uncompacted (through its own compactions and its graceful stop), so
    that a later start restores them once the file can be written."""
    data, crashed = tmp_path / "data", tmp_path / "crashed"
    data.mkdir()
    first = _proxy(data, monkeypatch)
    req = _request(first, {"budget": {"tokens": {"total": 100000}}})
    ids = [_answer_in_process(first, req) for _ in range(2)]
    name = os.path.basename(first.ledger.journal_path)
    shutil.copytree(data, crashed, ignore=shutil.ignore_patterns("proxy.lock"))   # a kill -9 now
    asyncio.run(first.stop())
    session = crashed / "sessions" / name
    session.unlink()
    session.mkdir()   # no file can be opened there
    second = _proxy(crashed, monkeypatch)
    assert second.journal.keeps_carried
    second.journal.compact_bytes = 1   # it would compact after every commit
    req = _request(second, {"budget": {"tokens": {"total": 100000}}})
    later = _answer_in_process(second, req)
    asyncio.run(second.stop())
    log = (crashed / "usage.journal").read_bytes()
    assert all(rid.encode() in log for rid in ids), "the only copies of answered requests were compacted away"
    session.rmdir()
    third = _proxy(crashed, monkeypatch)
    assert not third.journal.keeps_carried
    asyncio.run(third.stop())
    assert ledger_ids(crashed)[name] == ids
    assert later in [i for v in ledger_ids(crashed).values() for i in v]
    assert json.loads(session.read_bytes().splitlines()[0])["type"] == "session"   # a journal like any other


def test_lines_restored_after_a_graceful_stop_are_in_its_summary_too(tmp_path, monkeypatch):
    """A graceful stop whose ledger could not write its last lines writes the session summary
    from the journal without them; the next start restores them into the journal, and then the
    summary (which the ledger commands read first) must count them as well, once the usage
    journal has forgotten them."""
    ledger, ids = _stop_with_a_full_session_journal(tmp_path, monkeypatch)
    assert len(json.loads(Path(ledger.summary_path).read_bytes())["requests"]) == 1
    restarted = _proxy(tmp_path, monkeypatch)
    restarted.journal.compact_bytes = 1   # its stop compacts: the usage journal forgets the lines
    asyncio.run(restarted.stop())
    assert (tmp_path / "usage.journal").stat().st_size == 0
    summary = json.loads(Path(ledger.summary_path).read_bytes())
    assert [r["request_id"] for r in summary["requests"]] == ids
    assert summary["totals"]["request_count"] == 3 and summary["session_id"] == ledger.session_id
    (session,) = [s for s in tokenomics.records.ledger.load_sessions(str(tmp_path))
                  if s["session_id"] == ledger.session_id]
    assert [r["request_id"] for r in session["requests"]] == ids and session["closed"] is True


def test_a_stop_whose_last_journal_write_fails_still_frees_the_data_dir(tmp_path, monkeypatch):
    """The usage journal's final commit at stop can fail (ENOSPC here, from /dev/full): the
    stop reports it, and the data dir's lock is released all the same, so the next proxy can
    start on what the journal holds instead of being refused until this process exits."""
    proxy = _proxy(tmp_path, monkeypatch)
    req = _request(proxy, {"budget": {"tokens": {"total": 100000}}})
    _answer_in_process(proxy, req)
    journal = proxy.journal
    real_fd, full = journal._fd, os.open("/dev/full", os.O_WRONLY)
    journal._fd = full
    _answer_in_process(proxy, req)                   # its commit fails too; the stop tries again
    try:
        with pytest.raises(OSError):
            asyncio.run(proxy.stop())
    finally:
        journal._fd = real_fd
        os.close(full)
    restarted = _proxy(tmp_path, monkeypatch)        # raised RuntimeFailure: the dir was still locked
    asyncio.run(restarted.stop())
