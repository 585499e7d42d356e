"""Records end to end (SPEC §9, issue 7): the session ledger after a graceful stop and after
kill -9, the `ledger` commands, webhooks from the CLI and the server, /metrics and /stats, and
the promise that no raw token or upstream key is ever written anywhere.

Real processes throughout: `tokenomics serve` in a subprocess, the official SDKs as clients,
the recording stub upstream, a stdlib HTTP receiver for webhooks, real git repositories."""
import hashlib
import hmac
import http.client
import http.server
import json
import math
import os
import re
import signal
import stat
import statistics
import subprocess
import threading
import time
from pathlib import Path

import openai
import pytest
import yaml

from conftest import ANTHROPIC_KEY, OPENAI_KEY
from stub_upstream import DEFAULT_REPLY
from test_proxy import an, oa

REPLY_WORDS = len(DEFAULT_REPLY.split())        # the stub's output tokens for every answer
GOVERNED = ("/v1/chat/completions", "/v1/messages", "/v1/responses")
REQUEST_FIELDS = {  # SPEC §9, every request line of the journal and of the summary's requests[]
    "timestamp", "request_id", "token_hash", "model", "provider", "endpoint", "input_tokens",
    "output_tokens", "cost_usd", "duration_ms", "status_code", "stream", "error", "upstream_id",
    "upstream_request_id", "retry_count", "fallback_model", "rule_matches", "metadata",
    "provider_meta"}
ROLLUP_FIELDS = {
    "request_count", "input_tokens", "output_tokens", "total_tokens", "cached_input_tokens",
    "cache_creation_tokens", "reasoning_tokens", "error_count", "retry_count",
    "rule_violation_count", "rate_limit_count", "budget_exceeded_count", "cost_usd"}
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}


# --- helpers -------------------------------------------------------------------------------------

def make_token(cli, policy: dict) -> tuple[str, str]:
    """(raw token, full hash) of a new token."""
    out = json.loads(cli("token", "create", "--policy", json.dumps(policy), "--json", check=True).stdout)
    return out["token"], out["hash"]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def stub_usage(stub) -> tuple[int, int]:
    """(input, output) tokens the stub reported for the governed requests it answered."""
    recs = [r for r in stub.requests if r.path in GOVERNED]
    return sum(max(1, math.ceil(len(r.body) / 4)) for r in recs), REPLY_WORDS * len(recs)


def journal_path(cli) -> Path:
    paths = sorted((cli.data_dir / "sessions").glob("*.jsonl"))
    assert len(paths) == 1, paths
    return paths[0]


def journal_requests(path: Path) -> list[dict]:
    """The request lines of a journal; a torn last line (kill -9 mid-write) is skipped."""
    rows = []
    for line in path.read_bytes().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("type") == "request":
            rows.append(row)
    return rows


def git(cwd: Path, *args) -> str:
    done = subprocess.run(["git", "-c", "user.name=Records Test", "-c", "user.email=records@example.com",
                           "-c", "commit.gpgsign=false", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=20, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def commit(cwd: Path, name: str) -> str:
    (cwd / name).write_text(name + "\n")
    git(cwd, "add", name)
    git(cwd, "commit", "-q", "-m", f"add {name}")
    return git(cwd, "rev-parse", "--short", "HEAD")


def request_id(exc_or_resp) -> str:
    headers = getattr(exc_or_resp, "response", exc_or_resp).headers
    return headers["x-tokenomics-request-id"]


class KeepAlive:
    """One keep-alive HTTP/1.1 connection to the proxy: the least client overhead per request."""

    def __init__(self, proxy, token: str):
        self.conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def chat(self, body: dict = CHAT) -> tuple[int, dict, bytes]:
        self.conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(), headers=self.headers)
        resp = self.conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def get(self, path: str) -> tuple[int, dict, bytes]:
        self.conn.request("GET", path)
        resp = self.conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def close(self):
        self.conn.close()


class Receiver:
    """A stdlib webhook receiver on 127.0.0.1 recording every POST as (path, headers, body).
    With `hang`, each handler holds its request until release() (at most HANG_LIMIT seconds)."""

    HANG_LIMIT = 30.0

    def __init__(self, hang: bool = False):
        self.posts: list[tuple[str, dict, bytes]] = []
        self.lock = threading.Lock()
        self.released = threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with owner.lock:
                    owner.posts.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                if hang:
                    owner.released.wait(owner.HANG_LIMIT)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def events(self, path: str) -> list[tuple[dict, dict, bytes]]:
        """(event, headers, raw body) of the POSTs to `path`."""
        with self.lock:
            return [(json.loads(body), headers, body) for p, headers, body in self.posts if p == path]

    def types(self, path: str) -> list[str]:
        return [e["type"] for e, _, _ in self.events(path)]

    def close(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def receivers():
    made: list[Receiver] = []

    def make(**kw) -> Receiver:
        made.append(Receiver(**kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


# --- 1. the ledger after a graceful stop -----------------------------------------------------------

RULE_POLICY = {"rules": [{"name": "no-zebra", "type": "regex", "pattern": r"ZEBRA-\d+", "action": "fail"}],
               "metadata": {"feature": "ledger-e2e"}}


def test_graceful_session_totals_git_and_ledger_summary(cli, stub, start_proxy):
    work = cli.cwd
    git(work, "init", "-q", "-b", "feature/ledger")
    first = commit(work, "one.txt")
    token, token_hash = make_token(cli, RULE_POLICY)
    broke, broke_hash = make_token(cli, {"budget": {"tokens": {"total": 1}}})
    proxy = start_proxy(upstream_url=stub.url)
    client, claude = oa(proxy, token), an(proxy, token)
    msgs = [{"role": "user", "content": "hello there"}]
    sdk_in = sdk_out = 0
    ids = set()

    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=msgs)
    ids.add(request_id(raw))
    usage = raw.parse().usage
    sdk_in, sdk_out = sdk_in + usage.prompt_tokens, sdk_out + usage.completion_tokens

    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=msgs, stream=True,
                                                 stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    sdk_in, sdk_out = sdk_in + usage.prompt_tokens, sdk_out + usage.completion_tokens

    raw = claude.messages.with_raw_response.create(model="claude-sonnet-4-6", max_tokens=50, messages=msgs)
    ids.add(request_id(raw))
    usage = raw.parse().usage
    sdk_in, sdk_out = sdk_in + usage.input_tokens, sdk_out + usage.output_tokens

    with claude.messages.stream(model="claude-sonnet-4-6", max_tokens=50, messages=msgs) as stream:
        usage = stream.get_final_message().usage
    sdk_in, sdk_out = sdk_in + usage.input_tokens, sdk_out + usage.output_tokens

    second = commit(work, "two.txt")    # the branch moves on while the proxy runs

    raw = client.responses.with_raw_response.create(model="gpt-4.1", input="hello there")
    ids.add(request_id(raw))
    usage = raw.parse().usage
    sdk_in, sdk_out = sdk_in + usage.input_tokens, sdk_out + usage.output_tokens

    done = [e for e in client.responses.create(model="gpt-4.1", input="hello there", stream=True)
            if e.type == "response.completed"]
    usage = done[0].response.usage
    sdk_in, sdk_out = sdk_in + usage.input_tokens, sdk_out + usage.output_tokens

    with pytest.raises(openai.PermissionDeniedError) as blocked:
        client.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": "my code is ZEBRA-42"}])
    assert blocked.value.body["code"] == "rule_violation"
    ids.add(request_id(blocked.value))
    with pytest.raises(openai.RateLimitError) as refused:
        oa(proxy, broke).chat.completions.create(model="gpt-4o-mini", messages=msgs)
    assert refused.value.body["code"] == "budget_exceeded"
    ids.add(request_id(refused.value))

    assert len(stub.requests) == 6, "the blocked and the refused request must not reach the upstream"
    stub_in, stub_out = stub_usage(stub)
    assert (sdk_in, sdk_out) == (stub_in, stub_out)
    assert proxy.stop() == 0

    summaries = sorted((cli.data_dir / "sessions").glob("*.json"))
    assert len(summaries) == 1, summaries
    session = json.loads(summaries[0].read_text())
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}_[0-9a-f]{8}\.json", summaries[0].name)
    assert summaries[0].name.endswith(f"_{session['session_id']}.json")
    assert journal_path(cli).stem == summaries[0].stem
    for key in ("session_id", "started_at", "ended_at", "duration_ms", "git", "totals", "by_model",
                "by_provider", "by_token", "requests"):
        assert key in session, key
    assert RFC3339.match(session["started_at"]) and RFC3339.match(session["ended_at"])
    assert session["duration_ms"] > 0

    totals = session["totals"]
    assert ROLLUP_FIELDS <= set(totals)
    assert totals["request_count"] == 8
    assert (totals["input_tokens"], totals["output_tokens"]) == (stub_in, stub_out)
    assert totals["total_tokens"] == stub_in + stub_out
    assert totals["rule_violation_count"] == 1
    assert totals["budget_exceeded_count"] == 1 and totals["rate_limit_count"] == 0  # not a rate limit
    assert totals["error_count"] == 2
    assert totals["cost_usd"] > 0

    assert session["git"] == {"branch": "feature/ledger", "commit_start": first, "commit_end": second,
                              "repo_root": os.path.realpath(work)}

    assert set(session["by_model"]) == {"gpt-4o-mini", "claude-sonnet-4-6", "gpt-4.1"}
    assert session["by_model"]["gpt-4o-mini"]["request_count"] == 4
    assert set(session["by_provider"]) == {"openai", "anthropic"}
    assert session["by_provider"]["anthropic"]["request_count"] == 2
    assert set(session["by_token"]) == {token_hash[:16], broke_hash[:16]}
    mine = session["by_token"][token_hash[:16]]
    assert mine["request_count"] == 7 and mine["rule_violation_count"] == 1
    assert set(mine["models_used"]) == {"gpt-4o-mini", "claude-sonnet-4-6", "gpt-4.1"}
    assert RFC3339.match(mine["first_seen"]) and RFC3339.match(mine["last_seen"])
    for table in ("by_model", "by_provider", "by_token"):
        for entry in session[table].values():
            assert ROLLUP_FIELDS <= set(entry), (table, entry)
        assert sum(e["input_tokens"] for e in session[table].values()) == stub_in
        assert sum(e["request_count"] for e in session[table].values()) == 8

    rows = session["requests"]
    assert len(rows) == 8
    journal = journal_requests(journal_path(cli))
    assert [r["request_id"] for r in journal] == [r["request_id"] for r in rows]
    assert ids <= {r["request_id"] for r in rows}
    for row in rows + journal:
        assert REQUEST_FIELDS <= set(row), REQUEST_FIELDS - set(row)
        assert re.fullmatch(r"req_[0-9a-f]{32}", row["request_id"])
        assert len(row["token_hash"]) == 16
        assert RFC3339.match(row["timestamp"])
    assert sum(r["stream"] for r in rows) == 3
    forwarded = [r for r in rows if r["status_code"] == 200]
    assert len(forwarded) == 6
    assert {r["upstream_request_id"] for r in forwarded} == {f"req_stub_{n}" for n in range(1, 7)}
    assert all(r["upstream_id"] for r in forwarded)
    assert all(r["metadata"] == {"feature": "ledger-e2e"} for r in rows if r["token_hash"] == token_hash[:16])
    (violation,) = [r for r in rows if r["error"] == "rule_violation"]
    assert violation["status_code"] == 403 and violation["input_tokens"] == 0
    assert violation["rule_matches"] and violation["rule_matches"][0]["rule"] == "no-zebra"
    assert "ZEBRA-42" not in summaries[0].read_text()
    (budget,) = [r for r in rows if r["error"] == "budget_exceeded"]
    assert budget["status_code"] == 429

    summary = json.loads(cli("ledger", "summary", "--json", check=True).stdout)
    assert summary["totals"] == totals
    assert summary["by_model"] == session["by_model"]
    assert summary["by_provider"] == session["by_provider"]
    assert summary["by_token"] == session["by_token"]
    assert summary["by_branch"]["feature/ledger"]["request_count"] == 8
    on_branch = json.loads(cli("ledger", "summary", "--json", "--branch", "feature/ledger", check=True).stdout)
    assert on_branch["totals"] == totals
    elsewhere = json.loads(cli("ledger", "summary", "--json", "--branch", "main", check=True).stdout)
    assert elsewhere["totals"]["request_count"] == 0
    recent = json.loads(cli("ledger", "summary", "--json", "--since", "1h", check=True).stdout)
    assert recent["totals"] == totals
    ancient = json.loads(cli("ledger", "summary", "--json", "--until", "2001-01-01", check=True).stdout)
    assert ancient["totals"]["request_count"] == 0
    (listed,) = json.loads(cli("ledger", "sessions", "--json", check=True).stdout)
    assert listed["session_id"] == session["session_id"] and listed["git"] == session["git"]
    assert listed["totals"] == totals and "requests" not in listed


# --- 2. kill -9 ----------------------------------------------------------------------------------

@pytest.mark.subprocess_proxy
def test_kill_9_journal_alone_serves_the_ledger_commands(cli, stub, start_proxy):
    token, _ = make_token(cli, {})
    proxy = start_proxy(upstream_url=stub.url)
    client, claude = oa(proxy, token), an(proxy, token)
    ids = []
    for i in range(3):
        ids.append(request_id(client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"turn {i}"}])))
    raw = claude.messages.with_raw_response.create(
        model="claude-sonnet-4-6", max_tokens=20, messages=[{"role": "user", "content": "hi"}], stream=True)
    ids.append(request_id(raw))
    assert "".join(e.delta.text for e in raw.parse() if e.type == "content_block_delta") == DEFAULT_REPLY
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "stream"}], stream=True)
    ids.append(request_id(raw))
    assert list(raw.parse())

    path = journal_path(cli)
    wait_until(lambda: len(journal_requests(path)) == len(ids), 5, "every request in the journal")
    proxy.proc.kill()
    assert proxy.proc.wait(5) == -signal.SIGKILL
    assert not list((cli.data_dir / "sessions").glob("*.json")), "a killed proxy writes no summary"
    stub_in, stub_out = stub_usage(stub)

    sessions = json.loads(cli("ledger", "sessions", "--json", check=True).stdout)
    assert len(sessions) == 1
    (session,) = sessions
    assert path.stem.endswith(session["session_id"])
    assert session["totals"]["request_count"] == len(ids)
    assert (session["totals"]["input_tokens"], session["totals"]["output_tokens"]) == (stub_in, stub_out)

    shown = json.loads(cli("ledger", "show", session["session_id"][:4], "--json", check=True).stdout)
    assert shown["session_id"] == session["session_id"]
    assert [r["request_id"] for r in shown["requests"]] == ids
    for row in shown["requests"]:
        assert REQUEST_FIELDS <= set(row)
    assert [r["stream"] for r in shown["requests"]] == [False, False, False, True, True]
    summary = json.loads(cli("ledger", "summary", "--json", check=True).stdout)
    assert summary["totals"]["request_count"] == len(ids)
    assert summary["totals"]["input_tokens"] == stub_in


@pytest.mark.subprocess_proxy
def test_kill_9_right_after_the_last_response_loses_at_most_half_a_second(cli, stub, start_proxy):
    """Steady requests for ~1.7 s, then kill -9 straight after the last response. To make the
    bound testable whatever the flusher's phase, the last 0.7 s start right after a flush was
    seen on disk: a flusher slower than ~0.7 s cannot flush again before the kill."""
    token, _ = make_token(cli, {})
    proxy = start_proxy(upstream_url=stub.url)
    path = journal_path(cli)
    conn = KeepAlive(proxy, token)
    acked: list[tuple[str, float]] = []
    start = time.monotonic()
    size, flushed_at = path.stat().st_size, None
    while True:
        status, headers, _ = conn.chat()
        now = time.monotonic()
        assert status == 200
        acked.append((headers["x-tokenomics-request-id"], now))
        grown, size = path.stat().st_size != size, path.stat().st_size
        if flushed_at is None and grown and now - start >= 1.0:
            flushed_at = now
        if flushed_at is not None and now - flushed_at >= 0.7:
            break
        assert now - start < 6, "the journal never grew while requests were acknowledged"
        time.sleep(0.01)  # a steady pace, like an agent loop
    killed_at = time.monotonic()
    os.kill(proxy.proc.pid, signal.SIGKILL)
    assert proxy.proc.wait(5) == -signal.SIGKILL
    conn.close()

    present = {r["request_id"] for r in journal_requests(path)}
    missing = [(rid, killed_at - t) for rid, t in acked if rid not in present]
    worst = max((age for _, age in missing), default=0.0)
    print(f"\nkill -9: {len(acked)} requests acknowledged over {killed_at - start:.1f} s, {len(missing)} "
          f"missing from the journal; the oldest missing was acknowledged {worst * 1000:.0f} ms before the kill")
    assert not [rid for rid, age in missing if age > 0.5], missing
    sessions = json.loads(cli("ledger", "sessions", "--json", check=True).stdout)
    assert sessions[0]["totals"]["request_count"] == len(present)


# --- 3. webhooks -----------------------------------------------------------------------------------

def test_webhooks_signed_filtered_from_cli_and_server(cli, stub, start_proxy, receivers):
    hook = receivers()
    secret, signing_key = "whsec-shared-secret", "signing-key-for-hmac"
    config = {"events": {"webhooks": [
        {"url": hook.url + "/filtered", "secret": secret, "signing_key": signing_key, "timeout": 3,
         "events": ["request.*", "rule.*", "server.start", "token.*"]},
        {"url": hook.url + "/all", "events": ["*"], "timeout": 3},
    ]}}
    (cli.cwd / "config.yaml").write_text(yaml.safe_dump(config))   # the CLI reads ./config.yaml

    token, token_hash = make_token(cli, {**RULE_POLICY, "budget": {"tokens": {"total": 1_000_000}}})
    wait_until(lambda: "token.created" in hook.types("/filtered"), 5, "token.created from the CLI")
    proxy = start_proxy(upstream_url=stub.url, config=config)
    wait_until(lambda: "server.start" in hook.types("/filtered"), 5, "server.start")

    client = oa(proxy, token)
    ok = client.chat.completions.with_raw_response.create(**CHAT)
    ok_id = request_id(ok)
    with pytest.raises(openai.PermissionDeniedError) as blocked:
        client.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": "my code is ZEBRA-42"}])
    blocked_id = request_id(blocked.value)
    wait_until(lambda: hook.types("/filtered").count("request.completed") == 2
               and "rule.violation" in hook.types("/filtered"), 5, "request.completed x2 and rule.violation")
    # The unfiltered webhook proves budget.update is really emitted, so its absence below is the filter.
    wait_until(lambda: "budget.update" in hook.types("/all"), 5, "budget.update on the '*' webhook")
    assert proxy.stop() == 0    # a graceful stop drains the queues: nothing is still on its way

    # a token deleted from the CLI with the config present: token.deleted, signed too
    other, other_hash = make_token(cli, {})
    cli("token", "delete", "--hash", other_hash, check=True)
    wait_until(lambda: "token.deleted" in hook.types("/filtered"), 5, "token.deleted from the CLI")

    got = hook.events("/filtered")
    types = [e["type"] for e, _, _ in got]
    assert set(types) == {"token.created", "server.start", "request.completed", "rule.violation",
                          "token.deleted"}, types
    assert types.count("token.created") == 2 and types.count("server.start") == 1
    assert "budget.update" not in types
    for event, headers, body in got:
        assert set(event) == {"id", "type", "timestamp", "data"}, event
        assert re.fullmatch(r"evt_[0-9a-f]{32}", event["id"])
        assert RFC3339.match(event["timestamp"])
        assert isinstance(event["data"], dict)
        assert headers["x-webhook-secret"] == secret
        expected = "sha256=" + hmac.new(signing_key.encode(), body, hashlib.sha256).hexdigest()
        assert headers["x-webhook-signature"] == expected, event["type"]
        assert token not in body.decode() and other not in body.decode()
        assert "ZEBRA-42" not in body.decode(), "an event echoed the text that matched a rule"
    assert len({e["id"] for e, _, _ in got}) == len(got)

    created = [e for e, _, _ in got if e["type"] == "token.created"]
    assert {e["data"]["token_hash"] for e in created} == {token_hash[:16], other_hash[:16]}
    completed = {e["data"]["request_id"]: e["data"] for e, _, _ in got if e["type"] == "request.completed"}
    assert set(completed) == {ok_id, blocked_id}
    assert completed[ok_id]["status"] == 200 and completed[blocked_id]["status"] == 403
    assert completed[ok_id]["input_tokens"] == stub_usage(stub)[0]
    (violation,) = [e for e, _, _ in got if e["type"] == "rule.violation"]
    assert violation["data"]["request_id"] == blocked_id and violation["data"]["rule"] == "no-zebra"

    for _, headers, _ in hook.events("/all"):
        assert "x-webhook-secret" not in headers and "x-webhook-signature" not in headers


# --- 4. a hanging webhook does not slow requests ---------------------------------------------------

def test_hanging_webhook_does_not_slow_proxied_requests(cli, stub, start_proxy, receivers, tmp_path):
    token, _ = make_token(cli, {})
    hang = receivers(hang=True)
    plain = start_proxy(upstream_url=stub.url, config={})
    # Both proxies run at once so the measurements can interleave; one data dir serves one proxy.
    other = tmp_path / "data-hooked"
    other.mkdir()
    hooked_token = json.loads(cli("token", "create", "--policy", "{}", "--json", "--dir", str(other),
                                  check=True).stdout)["token"]
    hooked = start_proxy(upstream_url=stub.url, args=["--dir", str(other)], config={"events": {"webhooks": [
        {"url": hang.url + "/hang", "events": ["*"], "timeout": 20}]}})
    conns = {"plain": KeepAlive(plain, token), "hooked": KeepAlive(hooked, hooked_token)}
    wait_until(lambda: hang.posts, 5, "the hanging webhook to receive server.start")
    for conn in conns.values():     # warm up: connections, code paths, the stub
        for _ in range(5):
            assert conn.chat()[0] == 200
    times: dict[str, list[float]] = {"plain": [], "hooked": []}
    for _ in range(30):             # interleaved, so machine noise hits both alike
        for name, conn in conns.items():
            t0 = time.perf_counter()
            status, _, _ = conn.chat()
            times[name].append(time.perf_counter() - t0)
            assert status == 200
    stuck = len(hang.posts)
    for conn in conns.values():
        conn.close()
    p50 = {name: statistics.median(ts) * 1000 for name, ts in times.items()}
    print(f"\np50 latency: {p50['plain']:.2f} ms without webhooks, {p50['hooked']:.2f} ms with a hanging "
          f"webhook ({stuck} deliveries stuck in it)")
    assert stuck >= 1
    assert p50["hooked"] < p50["plain"] + 20, p50
    hang.released.set()
    assert hooked.stop() == 0


# --- 5. /metrics and /stats -------------------------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*"'
_SAMPLE = re.compile(rf'^({_NAME})(?:\{{((?:{_LABEL})(?:,{_LABEL})*)?\}})? (\S+)(?: -?\d+)?$')
_LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\\\|\\"|\\n)*)"')
_VALUE = re.compile(r"^(?:[+-]?Inf|NaN|[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)$")


def parse_prometheus(text: str) -> dict:
    """Strict text exposition format 0.0.4 -> {family: {"type", "help", "samples": [(name, labels,
    value)]}}. Asserts: HELP then TYPE before a family's samples, samples inside their family,
    no duplicate series, counters >= 0, histogram buckets ascending in `le` and cumulative with
    +Inf == _count, and one _sum per label set."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    families: dict = {}
    current = None
    seen = set()
    for line in text[:-1].split("\n"):
        assert line.strip(), "blank line inside the exposition"
        if line.startswith("# HELP "):
            name, _, help_ = line[7:].partition(" ")
            assert re.fullmatch(_NAME, name) and name not in families, line
            current = families[name] = {"help": help_, "type": None, "samples": []}
            continue
        if line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert current is families.get(name) and current["type"] is None and not current["samples"], line
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            current["type"] = kind
            continue
        assert not line.startswith("#"), f"unexpected comment {line!r}"
        m = _SAMPLE.match(line)
        assert m, f"bad sample line {line!r}"
        name, value = m.group(1), m.group(3)
        assert _VALUE.match(value), f"bad value in {line!r}"
        pairs = _LABEL_PAIR.findall(m.group(2) or "")
        labels = dict(pairs)
        assert len(labels) == len(pairs), f"duplicate label in {line!r}"
        assert current is not None and current["type"], f"sample before HELP/TYPE: {line!r}"
        family = next(f for f, fam in families.items() if fam is current)
        allowed = {family} | ({family + s for s in ("_bucket", "_sum", "_count")}
                              if current["type"] == "histogram" else set())
        assert name in allowed, f"{name} outside its family block {family}"
        key = (name, tuple(sorted(labels.items())))
        assert key not in seen, f"duplicate series {key}"
        seen.add(key)
        number = float(value.replace("Inf", "inf"))
        if current["type"] == "counter":
            assert number >= 0, line
        current["samples"].append((name, labels, number))
    for family, fam in families.items():
        assert fam["type"], f"{family} has no TYPE"
        if fam["type"] != "histogram":
            continue
        groups: dict = {}
        for name, labels, number in fam["samples"]:
            rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
            groups.setdefault(rest, {"buckets": [], "sum": [], "count": []})
            if name.endswith("_bucket"):
                groups[rest]["buckets"].append((float(labels["le"].replace("Inf", "inf")), number))
            else:
                groups[rest][name.rsplit("_", 1)[1]].append(number)
        assert groups, f"histogram {family} has no samples"
        for rest, g in groups.items():
            bounds = [b for b, _ in g["buckets"]]
            counts = [c for _, c in g["buckets"]]
            assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds), bounds
            assert bounds and bounds[-1] == math.inf, f"{family}{rest}: no +Inf bucket"
            assert all(a <= b for a, b in zip(counts, counts[1:])), f"{family}: buckets not cumulative"
            assert g["count"] == [counts[-1]], f"{family}: +Inf bucket != _count"
            assert len(g["sum"]) == 1
    return families


def sample(families: dict, name: str, family: str | None = None, **labels) -> float:
    """The value of the one series of `name` with exactly these labels (0 when absent)."""
    fam = families[family or name]
    hits = [v for n, ls, v in fam["samples"] if n == name and ls == labels]
    assert len(hits) <= 1
    return hits[0] if hits else 0.0


def test_metrics_parse_and_count_what_was_sent_and_stats_agree(cli, stub, start_proxy):
    token, token_hash = make_token(cli, RULE_POLICY)
    broke, _ = make_token(cli, {"budget": {"tokens": {"total": 1}}})
    proxy = start_proxy(upstream_url=stub.url)
    client = oa(proxy, token)
    admin = KeepAlive(proxy, token)
    msgs = [{"role": "user", "content": "hello there"}]
    for _ in range(2):
        client.chat.completions.create(model="gpt-4o-mini", messages=msgs)
    assert list(client.chat.completions.create(model="gpt-4o-mini", messages=msgs, stream=True))
    an(proxy, token).messages.create(model="claude-sonnet-4-6", max_tokens=20, messages=msgs)
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "ZEBRA-1"}])
    with pytest.raises(openai.RateLimitError):
        oa(proxy, broke).chat.completions.create(model="gpt-4o-mini", messages=msgs)

    # one slow request: the in-flight gauge shows it while it runs, and the histogram its latency
    stub.script(delay=1.0)
    slow = threading.Thread(target=lambda: client.chat.completions.create(model="gpt-4o-mini", messages=msgs))
    slow.start()
    try:
        def in_flight():
            fams = parse_prometheus(admin.get("/metrics")[2].decode())
            return sample(fams, "tokenomics_requests_in_flight") == 1
        wait_until(in_flight, 3, "tokenomics_requests_in_flight == 1 during the slow request")
    finally:
        slow.join(10)
    assert not slow.is_alive()

    status, headers, body = admin.get("/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    fams = parse_prometheus(body.decode())
    for name in ("tokenomics_requests_total", "tokenomics_tokens_total", "tokenomics_upstream_latency_seconds",
                 "tokenomics_requests_in_flight"):
        assert name in fams, name
    assert fams["tokenomics_requests_total"]["type"] == "counter"
    assert fams["tokenomics_upstream_latency_seconds"]["type"] == "histogram"
    assert fams["tokenomics_requests_in_flight"]["type"] == "gauge"

    by_model: dict[str, list[int]] = {}
    for rec in stub.requests:
        entry = by_model.setdefault(rec.json["model"], [0, 0])
        entry[0] += max(1, math.ceil(len(rec.body) / 4))
        entry[1] += REPLY_WORDS
    requests = lambda cls, model: sample(fams, "tokenomics_requests_total", status_class=cls, model=model)
    assert requests("2xx", "gpt-4o-mini") == 4
    assert requests("2xx", "claude-sonnet-4-6") == 1
    assert requests("4xx", "gpt-4o-mini") == 2
    assert sum(v for n, _, v in fams["tokenomics_requests_total"]["samples"]) == 7
    for model, (inp, out) in by_model.items():
        assert sample(fams, "tokenomics_tokens_total", direction="input", model=model) == inp, model
        assert sample(fams, "tokenomics_tokens_total", direction="output", model=model) == out, model
    hist = "tokenomics_upstream_latency_seconds"
    assert sample(fams, hist + "_count", family=hist) == 5          # the forwarded requests
    assert sample(fams, hist + "_bucket", family=hist, le="0.5") == 4
    assert sample(fams, hist + "_sum", family=hist) >= 1.0
    assert sample(fams, "tokenomics_requests_in_flight") == 0
    assert sample(fams, "tokenomics_guardrail_actions_total", action="fail", type="regex") == 1
    assert sample(fams, "tokenomics_rejections_total", reason="budget_exceeded") == 1

    stats = json.loads(admin.get("/stats")[2])
    admin.close()
    total_in = sum(v[0] for v in by_model.values())
    total_out = sum(v[1] for v in by_model.values())
    assert stats["totals"]["requests"] == 7
    assert (stats["totals"]["input_tokens"], stats["totals"]["output_tokens"]) == (total_in, total_out)
    assert stats["totals"]["errors"] == 2
    assert stats["by_model"]["gpt-4o-mini"]["requests"] == 6
    assert stats["by_model"]["claude-sonnet-4-6"]["input_tokens"] == by_model["claude-sonnet-4-6"][0]
    assert set(stats["by_key_env"]) == {"OPENAI_API_KEY", "ANTHROPIC_API_KEY"}
    assert stats["by_token"][token_hash[:16]]["requests"] == 6


# --- 6. secrets are never written ------------------------------------------------------------------

@pytest.mark.subprocess_proxy
def test_no_raw_token_or_upstream_key_is_ever_written(cli, stub, start_proxy):
    env = {"TOKENOMICS_ENCRYPTION_KEY": None}
    created = [cli("token", "create", "--policy", json.dumps(policy), "--json", check=True)
               for policy in ({"metadata": {"team": "records"}}, {})]
    (token, token_hash), (spare, spare_hash) = [(json.loads(c.stdout)["token"], json.loads(c.stdout)["hash"])
                                                for c in created]
    fake = "tkn_" + "0123456789abcdef" * 2     # token-shaped, unknown to the store
    config = {"logging": {"disable_request": False, "request_body": True, "response_body": True,
                          "file": {"enabled": True, "path": "requests.log"}}}
    proxy = start_proxy(upstream_url=stub.url, config=config, env=env)
    client, claude = oa(proxy, token), an(proxy, token)
    msgs = [{"role": "user", "content": "hello there"}]

    def claude_stream():
        with claude.messages.stream(model="claude-sonnet-4-6", max_tokens=20, messages=msgs) as stream:
            return stream.get_final_message().content

    calls = [
        lambda: client.chat.completions.create(model="gpt-4o-mini", messages=msgs),
        lambda: list(client.chat.completions.create(model="gpt-4o-mini", messages=msgs, stream=True)),
        lambda: list(client.chat.completions.create(model="gpt-4o-mini", messages=msgs, stream=True,
                                                    stream_options={"include_usage": True})),
        lambda: claude.messages.create(model="claude-sonnet-4-6", max_tokens=20, messages=msgs),
        claude_stream,
        lambda: list(client.responses.create(model="gpt-4.1", input="hello there", stream=True)),
        # a user who pastes the token into a prompt: the body is logged, the token must not be
        lambda: client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"is {token} valid?"}]),
    ]
    for call in calls:
        assert call()
    governed = len(calls)
    with pytest.raises(openai.AuthenticationError):
        oa(proxy, fake).chat.completions.create(model="gpt-4o-mini", messages=msgs)
    wait_until(lambda: proxy.stderr.count('"request_id"') >= governed, 5, "the request log lines on stderr")

    outputs = [cli("token", "list"), cli("token", "list", "--json"), cli("token", "get", "--hash", token_hash),
               cli("token", "get", "--hash", token_hash, "--json"), cli("token", "delete", "--hash", spare_hash)]
    assert proxy.stop() == 0
    outputs += [cli("ledger", "summary"), cli("ledger", "summary", "--json"), cli("ledger", "sessions"),
                cli("ledger", "show", journal_path(cli).stem.split("_")[1][:4]),
                cli("ledger", "show", journal_path(cli).stem.split("_")[1][:4], "--json")]
    for out in outputs:
        assert out.returncode == 0, out.stderr

    secrets_ = {"token": token, "spare token": spare, "unknown token": fake, "OpenAI key": OPENAI_KEY,
                "Anthropic key": ANTHROPIC_KEY}
    places = {}
    for root in (cli.data_dir, cli.cwd):
        for path in root.rglob("*"):
            if path.is_file():
                places[str(path)] = path.read_bytes().decode("utf-8", "replace")
    places["proxy stderr"] = proxy.stderr
    places["proxy stdout"] = proxy.proc.stdout.read()
    for i, out in enumerate(created):     # `token create` may print the token on stdout only
        places[f"token create {i} stderr"] = out.stderr
    for i, out in enumerate(outputs):
        places[f"cli output {i} stdout"] = out.stdout
        places[f"cli output {i} stderr"] = out.stderr
    assert any(p.endswith("requests.log") for p in places)
    leaks = [(where, what) for where, text in places.items() for what, secret in secrets_.items()
             if secret in text]
    assert not leaks, leaks

    log_path = cli.data_dir / "requests.log"
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(lines) == governed
    for line in lines:
        assert line["token_hash"] == token_hash[:len(line["token_hash"])] and len(line["token_hash"]) >= 8
        assert line["metadata"] == {"team": "records"}
        assert line["request_body"], line
        json.loads(line["request_body"])
    assert all("response_body" in line for line in lines if not line["stream"]), \
        [line["path"] for line in lines if "response_body" not in line]
    pasted = [line for line in lines if "valid?" in line["request_body"]]
    assert len(pasted) == 1 and "[REDACTED]" in pasted[0]["request_body"]
    stderr_lines = [json.loads(s) for s in proxy.stderr.splitlines() if s.startswith("{")]
    assert [s["request_id"] for s in stderr_lines] == [line["request_id"] for line in lines]
