"""Admin API (SPEC §11) over real loopback sockets against `tokenomics serve`: every route, and
the refusals — a change without X-Tokenomics-Admin, another site's Origin, a bad policy,
traversal in the memory viewer, a wrong basic-auth password, a Host that is not loopback."""
import asyncio
import base64
import http.client
import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest

import tokenomics.admin.api
import tokenomics.admin.feed
import tokenomics.config
import tokenomics.http.client
import tokenomics.http.server
import tokenomics.pipeline
import tokenomics.providers
import tokenomics.store

MOCK_POLICY = {"provider": "mock", "budget": {"tokens": {"daily": 100000}}}
CHAT = {"model": "mock-1", "messages": [{"role": "user", "content": "hello admin"}]}


class Answer:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    @property
    def json(self):
        return json.loads(self.body)

    @property
    def code(self):
        return self.json["error"]["code"]


def call(proxy, method, path, body=None, headers=None, host=None) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host or f"127.0.0.1:{proxy.port}")
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if data is not None:
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(len(data)))
        conn.endheaders(data)
        resp = conn.getresponse()
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


ADMIN = {"X-Tokenomics-Admin": "1"}


def chat(proxy, token) -> Answer:
    return call(proxy, "POST", "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {token}"})


@pytest.fixture
def admin(cli, start_proxy):
    token = cli.token(MOCK_POLICY, "--label", "first")
    return start_proxy(), token


# --- the page ------------------------------------------------------------------------------------

def test_page_assets_and_root_redirect_without_cors(admin):
    proxy, _ = admin
    page = call(proxy, "GET", "/admin")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert b"/admin/assets/app.js" in page.body and b"http" not in page.body.replace(b"http-equiv", b"")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    for name, kind in (("app.js", "javascript"), ("app.css", "text/css")):
        asset = call(proxy, "GET", f"/admin/assets/{name}")
        assert asset.status == 200 and kind in asset.headers["content-type"] and len(asset.body) > 1000
        assert b"innerHTML" not in asset.body
    assert call(proxy, "GET", "/admin/assets/evil.js").status == 404
    root = call(proxy, "GET", "/")
    assert root.status == 302 and root.headers["location"] == "/admin"
    assert call(proxy, "HEAD", "/").status == 200
    preflight = call(proxy, "OPTIONS", "/admin/api/keys", headers={"Origin": "http://evil.example",
                                                                  "Access-Control-Request-Method": "POST"})
    assert preflight.status == 405
    for answer in (page, root, preflight, call(proxy, "GET", "/admin/api/keys", headers={"Origin": "http://evil.example"})):
        assert not [h for h in answer.headers if h.startswith("access-control-")]


def test_health(admin):
    proxy, _ = admin
    h = call(proxy, "GET", "/admin/api/health").json
    assert h["status"] == "ok" and h["version"] == tokenomics.__version__ and h["backend"] == "memory"
    assert 0 <= h["uptime_s"] < 60


# --- keys ----------------------------------------------------------------------------------------

def test_keys_create_use_update_revoke(admin, data_dir):
    proxy, first = admin
    made = call(proxy, "POST", "/admin/api/keys", {"policy": MOCK_POLICY, "label": "from-api", "expires": "7d"}, ADMIN)
    assert made.status == 201, made.body
    token, token_hash = made.json["token"], made.json["hash"]
    assert token.startswith("tkn_") and len(token) == 36 and made.json["expires_at"]
    assert made.headers["cache-control"] == "no-store"
    store_text = (data_dir / "tokens.json").read_text()
    assert token not in store_text and token_hash in store_text
    assert stat.S_IMODE(os.stat(data_dir / "tokens.json").st_mode) == 0o600
    assert chat(proxy, token).status == 200            # works at once, no restart

    keys = call(proxy, "GET", "/admin/api/keys").json["keys"]
    mine = next(k for k in keys if k["hash"] == token_hash)
    assert mine["label"] == "from-api" and mine["expired"] is False and mine["policy"] == MOCK_POLICY
    assert "token" not in mine and token not in json.dumps(keys)
    assert mine["usage"]["tokens"] > 0 and mine["usage"]["cost_usd"] > 0 and mine["usage"]["requests"] == 1
    daily = mine["usage"]["budget"]["tokens"]["daily"]
    assert daily["cap"] == 100000 and daily["used"] == mine["usage"]["tokens"]
    assert daily["left"] == 100000 - daily["used"]

    one = call(proxy, "GET", f"/admin/api/keys/{token_hash[:10]}")
    assert one.status == 200 and one.json["hash"] == token_hash
    updated = call(proxy, "PUT", f"/admin/api/keys/{token_hash[:12]}",
                   {"label": "renamed", "expires": None, "policy": {**MOCK_POLICY, "model": "mock-2"}}, ADMIN)
    assert updated.status == 200, updated.body
    assert updated.json["label"] == "renamed" and updated.json["expires_at"] is None
    assert chat(proxy, token).code == "model_not_allowed"   # the new policy is in force

    gone = call(proxy, "DELETE", f"/admin/api/keys/{token_hash}", headers=ADMIN)
    assert gone.status == 200 and gone.json == {"deleted": token_hash}
    assert chat(proxy, token).status == 401 and chat(proxy, token).code == "invalid_token"
    assert call(proxy, "GET", f"/admin/api/keys/{token_hash}").status == 404
    assert chat(proxy, first).status == 200             # the other key is untouched
    for bad in ("tkn_" + "0" * 32, "xyz", "abc"):
        assert call(proxy, "GET", f"/admin/api/keys/{bad}").status == 400


def test_changes_need_the_admin_header_and_a_matching_origin(admin, data_dir):
    proxy, _ = admin
    before = (data_dir / "tokens.json").read_bytes()
    body = {"policy": {}}
    refused = [
        call(proxy, "POST", "/admin/api/keys", body),
        call(proxy, "POST", "/admin/api/keys", body, {"X-Tokenomics-Admin": "yes"}),
        call(proxy, "POST", "/admin/api/keys", body, {**ADMIN, "Origin": "http://evil.example"}),
        call(proxy, "POST", "/admin/api/keys", body, {**ADMIN, "Origin": f"http://127.0.0.1:{proxy.port + 1}"}),
        call(proxy, "POST", "/admin/api/keys", body, {**ADMIN, "Sec-Fetch-Site": "cross-site"}),
    ]
    keys = call(proxy, "GET", "/admin/api/keys").json["keys"]
    refused.append(call(proxy, "DELETE", f"/admin/api/keys/{keys[0]['hash']}"))
    refused.append(call(proxy, "PUT", f"/admin/api/keys/{keys[0]['hash']}", {"label": "x"}))
    for answer in refused:
        assert answer.status == 403, answer.body
        assert answer.headers["x-tokenomics-error-code"] in ("admin_header_required", "forbidden")
    assert refused[0].code == "admin_header_required" and "X-Tokenomics-Admin: 1" in refused[0].json["error"]["message"]
    assert (data_dir / "tokens.json").read_bytes() == before
    same = call(proxy, "POST", "/admin/api/keys", body, {**ADMIN, "Origin": f"http://127.0.0.1:{proxy.port}"})
    assert same.status == 201


def test_invalid_policy_is_a_400_naming_the_json_path(admin, data_dir):
    proxy, _ = admin
    before = (data_dir / "tokens.json").read_bytes()
    cases = {
        json.dumps({"policy": {"rules": [{"type": "regex", "pattern": "("}]}}): "rules[0]",
        json.dumps({"policy": {"budget": {"tokens": {"weekly": 5}}}}): "budget.tokens.weekly",
        json.dumps({"policy": {"bogus": 1}}): "bogus",
        json.dumps({"policy": {"rate_limit": {"rules": [{"requests": 1, "window": "soon"}]}}}): "rate_limit.rules[0]",
        json.dumps({"policy": {"memory": {"file_path": "../outside"}}}): "memory.file_path",
        json.dumps({"policy": []}): "policy",
        json.dumps({"policy": {}, "expires": "yesterday"}): "expires",
        json.dumps({"policy": {}, "colour": "red"}): "colour",
        "{not json": "JSON",
    }
    for raw, where in cases.items():
        answer = call(proxy, "POST", "/admin/api/keys", raw.encode(), ADMIN)
        assert answer.status == 400, (raw, answer.body)
        assert where in answer.json["error"]["message"], (raw, answer.json)
        assert answer.json["error"]["code"] in ("invalid_policy", "invalid_request")
    keys = call(proxy, "GET", "/admin/api/keys").json["keys"]
    bad_update = call(proxy, "PUT", f"/admin/api/keys/{keys[0]['hash']}", {"policy": {"model_regex": "("}}, ADMIN)
    assert bad_update.status == 400 and "model_regex" in bad_update.json["error"]["message"]
    assert (data_dir / "tokens.json").read_bytes() == before


# --- analytics and sessions ------------------------------------------------------------------------

def test_analytics_summary_series_and_sessions(admin):
    proxy, token = admin
    for _ in range(3):
        assert chat(proxy, token).status == 200
    summary = call(proxy, "GET", "/admin/api/analytics/summary?bucket=hour").json
    for key in ("totals", "by_model", "by_provider", "by_token", "by_branch", "series"):
        assert key in summary, key
    assert summary["totals"]["request_count"] == 3 and summary["by_model"]["mock-1"]["request_count"] == 3
    assert summary["by_provider"]["mock"]["input_tokens"] == summary["totals"]["input_tokens"]
    (entry,) = summary["by_token"].values()
    assert entry["label"] == "first"
    assert sum(p["requests"] for p in summary["series"]) == 3
    point = summary["series"][-1]
    assert set(point) == {"t", "requests", "input_tokens", "output_tokens", "cost_usd"}
    assert point["t"].endswith(":00:00.000Z")
    day = call(proxy, "GET", "/admin/api/analytics/summary?bucket=day").json["series"]
    assert len(day) == 1 and day[0]["t"].endswith("T00:00:00.000Z") and day[0]["requests"] == 3
    future = call(proxy, "GET", "/admin/api/analytics/summary?since=2099-01-01").json
    assert future["totals"]["request_count"] == 0 and future["series"] == []
    assert call(proxy, "GET", "/admin/api/analytics/summary?bucket=week").status == 400
    assert call(proxy, "GET", "/admin/api/analytics/summary?since=whenever").status == 400

    sessions = call(proxy, "GET", "/admin/api/sessions").json
    assert isinstance(sessions, list) and len(sessions) == 1 and "requests" not in sessions[0]
    sid = sessions[0]["session_id"]
    assert sessions[0]["totals"]["request_count"] == 3
    shown = call(proxy, "GET", f"/admin/api/sessions/{sid[:4]}").json
    assert shown["session_id"] == sid and len(shown["requests"]) == 3
    assert {r["model"] for r in shown["requests"]} == {"mock-1"} and all(r["status_code"] == 200 for r in shown["requests"])
    assert call(proxy, "GET", "/admin/api/sessions/ffffffff").status == 404 or sid.startswith("ffff")
    assert call(proxy, "GET", "/admin/api/sessions/ab").status == 400
    assert call(proxy, "GET", "/admin/api/nothing").status == 404
    assert call(proxy, "POST", "/admin/api/health", {}, ADMIN).status == 405


# --- memory ----------------------------------------------------------------------------------------

def test_memory_files_listed_and_viewer_confined(cli, start_proxy, data_dir, tmp_path):
    token = cli.token({"provider": "mock", "memory": {"enabled": True, "file_path": "memory",
                                                       "file_name": "{token_hash}/{date}.md"}})
    proxy = start_proxy()
    assert chat(proxy, token).status == 200
    deadline = time.monotonic() + 5
    files = []
    while time.monotonic() < deadline and not files:
        files = call(proxy, "GET", "/admin/api/memory/files").json["files"]
        if not files:
            time.sleep(0.05)
    assert len(files) == 1 and files[0]["path"].startswith("memory/") and files[0]["path"].endswith(".md")
    text = call(proxy, "GET", "/admin/api/memory/files/" + files[0]["path"])
    assert text.status == 200 and text.headers["content-type"].startswith("text/plain")
    assert b"hello admin" in text.body and token.encode() not in text.body

    outside = tmp_path / "secret.txt"
    outside.write_text("outside the data dir")
    (data_dir / "memory" / "link.md").symlink_to(outside)
    (data_dir / "memory" / "store.md").symlink_to(data_dir / "tokens.json")
    (data_dir / "memory" / "tokens.json").write_text("{}")
    (data_dir / "memory" / "usage.journal").write_text("x")
    (data_dir / "memory" / "tokenomics.pid").write_text("1")
    (data_dir / "memory" / "notes.txt").write_text("not a memory log")
    (data_dir / "requests.log").write_text("a request log")
    listed = {f["path"] for f in call(proxy, "GET", "/admin/api/memory/files").json["files"]}
    assert listed == {files[0]["path"]}
    attempts = ["../tokens.json", "%2e%2e/tokens.json", "%2E%2E%2Ftokens.json", "memory/../tokens.json",
                "..%2ftokens.json", "/etc/passwd", "%2Fetc%2Fpasswd", "tokens.json", "hash.key",
                "memory/link.md", "memory/store.md", "memory/tokens.json", "memory/usage.journal",
                "memory/tokenomics.pid", "memory/notes.txt", "requests.log", "memory/%00.md", "memory%00", "certs/ca.key", "config.yaml",
                "sessions", "memory", "..", "%2e%2e", "memory\\..\\tokens.json"]
    # a memory log kept in the data dir itself lists its own files there, still never the store
    assert call(proxy, "POST", "/admin/api/keys", {"policy": {"memory": {"file_path": "talk.md"}}}, ADMIN).status == 201
    (data_dir / "talk.md").write_text("## a log")
    (data_dir / "talk.20260101T000000.md.gz").write_bytes(__import__("gzip").compress(b"## old log"))
    listed = {f["path"] for f in call(proxy, "GET", "/admin/api/memory/files").json["files"]}
    assert listed == {files[0]["path"], "talk.md", "talk.20260101T000000.md.gz"}
    assert call(proxy, "GET", "/admin/api/memory/files/talk.20260101T000000.md.gz").body == b"## old log"
    for attempt in attempts:
        answer = call(proxy, "GET", "/admin/api/memory/files/" + attempt)
        assert answer.status == 404, (attempt, answer.status, answer.body)
        assert b"outside the data dir" not in answer.body and b"hash" not in answer.body.lower()


# --- who may come in -------------------------------------------------------------------------------

def test_host_header_must_be_loopback_without_auth(admin):
    proxy, _ = admin
    port = proxy.port
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", f"10.0.0.1:{port}", "localhost.evil.com"):
        answer = call(proxy, "GET", "/admin/api/health", host=host)
        assert answer.status == 403 and answer.code == "forbidden", host
        assert call(proxy, "GET", "/admin", host=host).status == 403
    for host in (f"localhost:{port}", "localhost", f"app.localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}",
                 "127.1.2.3"):
        assert call(proxy, "GET", "/admin/api/health", host=host).status == 200, host


def test_basic_auth_guards_every_admin_route(cli, start_proxy):
    cli.token(MOCK_POLICY)
    proxy = start_proxy(config={"admin": {"auth": {"username": "ops", "password": "s3cret-pass"}}})

    def auth(user, password):
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    for path in ("/admin", "/admin/assets/app.js", "/admin/api/health", "/admin/api/keys", "/admin/api/sessions",
                 "/admin/api/memory/files", "/admin/api/events", "/admin/api/analytics/summary"):
        for headers in ({}, auth("ops", "wrong"), auth("admin", "s3cret-pass"), {"Authorization": "Basic !!!"}):
            answer = call(proxy, "GET", path, headers=headers)
            assert answer.status == 401 and answer.code == "admin_auth_required", (path, headers)
            assert answer.headers["www-authenticate"].startswith("Basic")
            assert b"s3cret" not in answer.body
    good = auth("ops", "s3cret-pass")
    assert call(proxy, "GET", "/admin/api/health", headers=good).status == 200
    assert call(proxy, "GET", "/admin/api/health", headers=good, host="proxy.example.com").status == 200
    assert call(proxy, "POST", "/admin/api/keys", {"policy": {}}, good).status == 403
    assert call(proxy, "POST", "/admin/api/keys", {"policy": {}}, {**good, **ADMIN}).status == 201
    assert call(proxy, "POST", "/admin/api/keys", {"policy": {}}, {**auth("ops", "nope"), **ADMIN}).status == 401


def _app(tmp_path, **admin):
    config = tokenomics.config.load_config(None, str(tmp_path), environ={}, overrides={"admin": admin} if admin else None)
    catalog = tokenomics.providers.Catalog(config, environ={})
    store = tokenomics.store.TokenStore(config, catalog, environ={"TOKENOMICS_HASH_KEY": "k"})
    pipeline = tokenomics.pipeline.Pipeline(config, store, catalog, tokenomics.http.client.UpstreamClient(), environ={})
    return tokenomics.admin.api.AdminApp(pipeline)


def _request(method, path, client, headers):
    lower = {k.lower(): v for k, v in headers.items()}
    return tokenomics.http.server.Request(method, path, "", [(k.encode(), v.encode()) for k, v in lower.items()],
                                          lower, b"", client)


def test_non_loopback_clients_are_refused_without_auth(tmp_path):
    app = _app(tmp_path)
    for client in ("10.1.2.3", "192.168.0.5", "2001:db8::1", "", "local"):
        answer = asyncio.run(app(_request("GET", "/admin/api/health", client, {"Host": "127.0.0.1:8080"})))
        assert answer.status == 403, client
        assert json.loads(answer.body)["error"]["code"] == "forbidden"
    assert asyncio.run(app(_request("GET", "/admin/api/health", "127.0.0.1", {"Host": "127.0.0.1:8080"}))).status == 200
    assert asyncio.run(app(_request("GET", "/admin/api/health", "::1", {"Host": "localhost"}))).status == 200


# --- the live feed -------------------------------------------------------------------------------

def test_events_feed_streams_request_completed(admin):
    proxy, token = admin
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(f"GET /admin/api/events HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n\r\n".encode())
        received = b""
        deadline = time.monotonic() + 10
        while b": connected" not in received and time.monotonic() < deadline:
            received += s.recv(65536)
        assert received.startswith(b"HTTP/1.1 200") and b"text/event-stream" in received
        assert b"access-control" not in received.lower()
        assert chat(proxy, token).status == 200
        while b"event: request.completed" not in received and time.monotonic() < deadline:
            received += s.recv(65536)
    assert b"event: request.completed" in received
    data = received.split(b"event: request.completed", 1)[1].split(b"data: ", 1)[1].split(b"\n", 1)[0]
    event = json.loads(data)
    assert event["type"] == "request.completed" and event["id"].startswith("evt_")
    assert event["data"]["model"] == "mock-1" and event["data"]["status"] == 200
    assert token not in received.decode()


def test_feed_queues_are_bounded_and_only_feed_events():
    async def scenario():
        hub = tokenomics.admin.feed.EventHub()
        stream = hub.subscribe()
        assert await stream.__anext__() == b"retry: 3000\n: connected\n\n"
        hub.emit({"type": "token.created", "id": "evt_x", "data": {}})
        for i in range(tokenomics.admin.feed.FEED_QUEUE_SIZE + 50):
            hub.emit({"type": "request.completed", "id": f"evt_{i}", "data": {}})
        hub.emit({"type": "rule.violation", "id": "evt_rule", "data": {}})
        chunk = await asyncio.wait_for(stream.__anext__(), 5)
        events = chunk.count(b"\nevent: ") + chunk.startswith(b"event: ")
        assert events == tokenomics.admin.feed.FEED_QUEUE_SIZE
        assert b"token.created" not in chunk and b"evt_rule" in chunk and b"id: evt_0\n" not in chunk
        hub.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(stream.__anext__(), 5)
        assert hub.subscribers == 0
        many = [hub.subscribe() for _ in range(3)]
        assert many == [None] * 3                    # closed: no new feeds
    asyncio.run(scenario())


# --- run --admin -----------------------------------------------------------------------------------

CHILD = ("import os, urllib.request, urllib.error\n"
         "base = os.environ['OPENAI_BASE_URL'][:-3]\n"
         "try:\n"
         "    print(urllib.request.urlopen(base + '/admin/api/health', timeout=5).status)\n"
         "except urllib.error.HTTPError as e:\n"
         "    print(e.code)\n")


def test_run_admin_serves_the_page_on_the_ephemeral_proxy(cli):
    token = cli.token(MOCK_POLICY)
    with_admin = cli("run", "--token", token, "--admin", "--", sys.executable, "-c", CHILD, timeout=60)
    assert with_admin.returncode == 0, with_admin.stderr
    assert with_admin.stdout.strip() == "200"
    assert "tokenomics admin UI: http://127.0.0.1:" in with_admin.stderr and "/admin" in with_admin.stderr
    without = cli("run", "--token", token, "--", sys.executable, "-c", CHILD, timeout=60)
    assert without.returncode == 0 and without.stdout.strip() == "404"
    (cli.cwd / "config.yaml").write_text("admin:\n  enabled: false\n")
    refused = cli("run", "--token", token, "--admin", "--", sys.executable, "-c", "pass", timeout=60)
    assert refused.returncode == 2 and "admin.enabled" in refused.stderr


def test_admin_disabled_serves_no_admin_routes(cli, start_proxy):
    cli.token(MOCK_POLICY)
    proxy = start_proxy(config={"admin": {"enabled": False}})
    assert call(proxy, "GET", "/admin").status == 404
    assert call(proxy, "GET", "/admin/api/health").status == 404
    assert call(proxy, "GET", "/").status == 200


def test_zipapp_carries_the_page(tmp_path):
    target = tmp_path / "tokenomics.pyz"
    subprocess.run([sys.executable, "-c", f"from tokenomics.cli import build_zipapp; build_zipapp({str(target)!r})"],
                   check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import tokenomics.admin.api as a; "
             "print(len(a._asset('index.html')), len(a._asset('app.js')), len(a._asset('app.css')))")
    out = subprocess.run([sys.executable, "-S", "-c", probe, str(target)], capture_output=True, text=True, timeout=60,
                         env={"PATH": os.environ.get("PATH", "")})
    assert out.returncode == 0, out.stderr
    assert all(int(n) > 1000 for n in out.stdout.split())
