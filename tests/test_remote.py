"""Central token sync (SPEC §12): `tokenomics remote` serves a data dir's tokens over REST; a
proxy with remote.url mirrors them (pull every remote.sync seconds, at once on a signed push),
and keeps its last good copy when the server is down — also across a restart."""
import json
import os
import stat

import pytest
import yaml

from conftest import ProxyProcess, base_env
from remote_helpers import (HASH_KEY, MOCK, PUSH_SECRET, REMOTE_KEY, SIGNING_KEY, RemoteProcess, StubRemote,
                            ask, call, proxy_env, remote_config, until)


@pytest.fixture
def remote(tmp_path):
    started = []

    def start(**kwargs) -> RemoteProcess:
        proc = RemoteProcess(tmp_path / "central", tmp_path, **kwargs)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def serve(cli):
    """Factory: serve(config or port -> config, env=...) starts `tokenomics serve` on the
    cli's data dir with the shared hash key and the remote key in TEST_REMOTE_KEY."""
    started = []

    def start(config, env: dict | None = None) -> ProxyProcess:
        proxy = ProxyProcess(cli, [], base_env(cli.data_dir, **proxy_env(**(env or {}))))
        path = cli.cwd / f"config-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(config(proxy.port) if callable(config) else config))
        proxy.args = ["--config", str(path)]
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        try:
            proxy.stop()
        except AssertionError:
            pass


def central_cli(cli, central, *args):
    proc = cli(*args, "--dir", str(central.dir), env=base_env(central.dir, TOKENOMICS_HASH_KEY=HASH_KEY))
    assert proc.returncode == 0, proc.stderr
    return proc


def files_text(*dirs) -> str:
    out = []
    for d in dirs:
        for root, _, names in os.walk(d):
            for name in names:
                with open(os.path.join(root, name), "rb") as fh:
                    out.append(fh.read().decode("latin-1"))
    return "\n".join(out)


def test_changes_on_the_central_server_reach_a_proxy_within_sync_seconds(remote, serve, cli):
    central = remote()
    proxy = serve(remote_config(central.url, sync=1))
    by_api = central.create(label="ci")
    assert by_api["token"].startswith("tkn_") and len(by_api["hash"]) == 64
    took = until(lambda: ask(proxy.url, by_api["token"]) == 200, 4)
    assert took < 2.5, f"a token made through the API took {took:.2f} s with remote.sync: 1"

    by_cli = json.loads(central_cli(cli, central, "token", "create", "--policy", json.dumps(MOCK), "--json").stdout)
    assert until(lambda: ask(proxy.url, by_cli["token"]) == 200, 4) < 2.5

    status, body = call("DELETE", f"{central.url}/api/v1/tokens/{by_api['hash']}")
    assert status == 200 and body == {"deleted": by_api["hash"]}
    assert until(lambda: ask(proxy.url, by_api["token"]) == 401, 4) < 2.5
    central_cli(cli, central, "token", "delete", "--hash", by_cli["hash"][:12])
    assert until(lambda: ask(proxy.url, by_cli["token"]) == 401, 4) < 2.5

    # The proxy's copy is an ordinary 0600 store; no raw token is in any file on either side.
    mode = stat.S_IMODE(os.stat(cli.data_dir / "tokens.json").st_mode)
    assert mode == 0o600
    everything = files_text(central.dir, cli.data_dir)
    assert by_api["hash"] not in (cli.data_dir / "tokens.json").read_text()  # deleted there, gone here
    for token in (by_api["token"], by_cli["token"]):
        assert token not in everything


def test_a_push_applies_a_change_within_a_second(remote, serve, cli):
    central = remote()
    hook = {"enabled": True, "signing_key": SIGNING_KEY, "secret": PUSH_SECRET, "auto_register": True}
    proxy = serve(lambda port: remote_config(central.url, sync=300, webhook={
        **hook, "callback_url": f"http://127.0.0.1:{port}/v1/webhook"}))
    until(lambda: len(call("GET", central.url + "/api/v1/clients")[1]["clients"]) == 1, 5)
    clients = call("GET", central.url + "/api/v1/clients")[1]["clients"]
    assert clients[0]["url"].endswith("/v1/webhook") and "signing_key" not in clients[0]

    created = central.create()
    assert until(lambda: ask(proxy.url, created["token"]) == 200, 3) < 1.0
    by_cli = json.loads(central_cli(cli, central, "token", "create", "--policy", json.dumps(MOCK), "--json").stdout)
    assert until(lambda: ask(proxy.url, by_cli["token"]) == 200, 3) < 1.0
    central_cli(cli, central, "token", "delete", "--hash", by_cli["hash"])
    assert until(lambda: ask(proxy.url, by_cli["token"]) == 401, 3) < 1.0
    assert call("DELETE", f"{central.url}/api/v1/tokens/{created['hash']}")[0] == 200
    assert until(lambda: ask(proxy.url, created["token"]) == 401, 3) < 1.0
    # The registration with its signing key is on disk at the server, 0600.
    registry = central.dir / "remote_clients.json"
    assert stat.S_IMODE(os.stat(registry).st_mode) == 0o600


def test_the_proxy_keeps_its_last_copy_when_the_server_is_down_also_after_a_restart(remote, serve):
    central = remote()
    created = central.create()
    config = remote_config(central.url, sync=1)
    proxy = serve(config)
    until(lambda: ask(proxy.url, created["token"]) == 200, 4)
    central.stop()
    until(lambda: "keeping the last good copy (1 tokens)" in proxy.stderr, 5)
    assert ask(proxy.url, created["token"]) == 200
    assert proxy.stop() == 0

    again = serve(config)  # the server is still down: the on-disk copy serves
    assert ask(again.url, created["token"]) == 200
    until(lambda: "keeping the last good copy (1 tokens)" in again.stderr, 5)
    assert ask(again.url, "tkn_" + "0" * 32) == 401


def test_an_https_server_with_a_self_signed_certificate_needs_remote_insecure(remote, serve, cli):
    central = remote(args=["--tls"])
    made = json.loads(central_cli(cli, central, "token", "create", "--policy", json.dumps(MOCK), "--json").stdout)
    verified = serve(remote_config(central.url, sync=1))
    until(lambda: "keeping the last good copy" in verified.stderr, 5)
    assert ask(verified.url, made["token"]) == 401
    verified.stop()
    trusting = serve(remote_config(central.url, sync=1, insecure=True))
    until(lambda: ask(trusting.url, made["token"]) == 200, 5)


def test_the_rest_api_validates_like_the_cli(remote):
    central = remote()
    base = central.url + "/api/v1/tokens"
    assert call("GET", central.url + "/health", key=None)[0] == 200
    status, body = call("GET", base, key=None)
    assert status == 401 and body["error"]["code"] == "missing_api_key"
    assert set(body["error"]) == {"message", "type", "code", "param"}
    status, body = call("GET", base, key="rk-wrong")
    assert status == 401 and body["error"]["code"] == "invalid_api_key" and "rk-wrong" not in json.dumps(body)

    status, body = call("POST", base, raw=json.dumps({"policy": MOCK}).encode(), headers={"Content-Type": "text/plain"})
    assert status == 415
    status, body = call("POST", base, {"policy": {"model_regex": "("}})
    assert status == 400 and "model_regex" in body["error"]["message"]
    status, body = call("POST", base, {"policy": {"no_such_field": 1}})
    assert status == 400 and "no_such_field" in body["error"]["message"]
    assert call("POST", base, {"policy": MOCK, "owner": "x"})[0] == 400
    assert call("POST", base, {"policy": MOCK, "expires": "2001-01-01T00:00:00Z"})[0] == 400
    assert call("POST", base, {"policy": MOCK, "label": "x" * 201})[0] == 400
    status, body = call("POST", base, raw=b'{"policy": {}, "policy": {"model": "x"}}',
                        headers={"Content-Type": "application/json"})
    assert status == 400
    status, body = call("POST", base, raw=b"{" + b" " * (2 * 1024 * 1024) + b"}",
                        headers={"Content-Type": "application/json"})
    assert status == 413

    created = central.create(label="ci", expires="7d")
    assert created["expires_at"] and set(created) == {"token", "hash", "expires_at"}
    status, listing = call("GET", base)
    assert status == 200 and [t["hash"] for t in listing["tokens"]] == [created["hash"]]
    assert listing["tokens"][0]["label"] == "ci" and listing["tokens"][0]["policy"] == MOCK
    assert created["token"] not in json.dumps(listing)
    status, one = call("GET", f"{base}/{created['hash'][:8]}")
    assert status == 200 and one["hash"] == created["hash"]
    assert call("GET", f"{base}/{'0' * 64}")[0] == 404
    assert call("GET", f"{base}/{created['token']}")[0] == 400
    status, updated = call("PUT", f"{base}/{created['hash']}", {"label": "nightly", "expires": None})
    assert status == 200 and updated["label"] == "nightly" and updated["expires_at"] is None
    assert call("PUT", f"{base}/{created['hash']}", {})[0] == 400
    assert call("PUT", f"{base}/{created['hash']}", {"policy": {"rules": [{"type": "nope"}]}})[0] == 400
    status, body = call("PATCH", f"{base}/{created['hash']}", {"label": "x"})
    assert status == 405
    assert call("DELETE", f"{base}/{created['hash']}")[0] == 200
    assert call("GET", f"{base}/{created['hash']}")[0] == 404


def test_the_server_emits_token_events_as_the_cli_does(tmp_path):
    with StubRemote() as sink:
        central_dir = tmp_path / "central"
        central_dir.mkdir()
        (central_dir / "config.yaml").write_text(yaml.safe_dump({"events": {"webhooks": [
            {"url": sink.url + "/events", "events": ["token.*"]}]}}))
        central = RemoteProcess(central_dir, tmp_path).start()
        try:
            created = central.create(label="ev")
            until(lambda: any(r[1] == "/events" for r in sink.requests), 5)
            event = json.loads(next(r for r in sink.requests if r[1] == "/events")[2]["_body"])
            assert event["type"] == "token.created" and event["data"]["token_hash"] == created["hash"][:16]
            assert created["token"] not in json.dumps(event)
        finally:
            central.stop()


def test_doctor_checks_the_remote_server(remote, cli):
    central = remote()
    central.create()
    path = cli.cwd / "config.yaml"
    path.write_text(yaml.safe_dump(remote_config(central.url)))

    def doctor(**env):
        proc = cli("doctor", "--json", "--config", str(path), env=base_env(cli.data_dir, **proxy_env(**env)))
        checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
        return proc.returncode, checks["remote"]

    rc, line = doctor()
    assert line["status"] == "ok" and "1 tokens" in line["detail"]
    rc, line = doctor(TEST_REMOTE_KEY="rk-wrong-key")
    assert rc == 1 and line["status"] == "fail" and "refused the API key" in line["detail"]
    assert "rk-wrong-key" not in line["detail"] and REMOTE_KEY not in line["detail"]
    central.stop()
    rc, line = doctor()
    assert rc == 1 and line["status"] == "fail"
