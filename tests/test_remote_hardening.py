"""Push notifications from the token server, attacked: only a signed, fresh, first-seen push
with the shared secret triggers a re-sync (SPEC §12)."""

import asyncio
import hashlib
import hmac
import json
import secrets

import pytest

from tokenomics.config import RemoteWebhookConfig
from tokenomics.http.server import Request
from tokenomics.sync import PUSH_MAX_SKEW, PushReceiver

SIGNING_KEY = "push-signing-key"
SECRET = "shared-push-secret"
NOW = 1_800_000_000.0
BODY = json.dumps({"event": "tokens.changed"}).encode()


@pytest.fixture
def receiver():
    pokes = []
    hook = RemoteWebhookConfig(enabled=True, secret=SECRET, signing_key=SIGNING_KEY)
    push = PushReceiver(hook, lambda: pokes.append(1), clock=lambda: NOW)
    push.pokes = pokes
    return push


def signed(body=BODY, *, timestamp=None, nonce=None, key=SIGNING_KEY, secret=SECRET, drop=()):
    timestamp = str(int(NOW if timestamp is None else timestamp))
    nonce = nonce or secrets.token_hex(16)
    sig = hmac.new(key.encode(), f"{timestamp}.{nonce}.".encode() + body, hashlib.sha256).hexdigest()
    headers = {"x-tokenomics-signature": "sha256=" + sig, "x-tokenomics-timestamp": timestamp,
               "x-tokenomics-nonce": nonce, "x-tokenomics-secret": secret,
               "content-type": "application/json"}
    for name in drop:
        headers.pop(name)
    return Request("POST", "/v1/webhook", "", [], headers, body, "127.0.0.1")


def answer(receiver, req):
    response = asyncio.run(receiver(req))
    code = json.loads(response.body)["error"]["code"] if response.status >= 400 else None
    return response.status, code


def test_a_signed_fresh_push_triggers_one_resync(receiver):
    assert answer(receiver, signed()) == (202, None)
    assert receiver.pokes == [1]


@pytest.mark.parametrize("header", ["x-tokenomics-signature", "x-tokenomics-timestamp", "x-tokenomics-nonce"])
def test_an_unsigned_push_is_refused(receiver, header):
    assert answer(receiver, signed(drop=(header,))) == (401, "invalid_signature")
    assert receiver.pokes == []


def test_a_push_signed_with_another_key_is_refused(receiver):
    assert answer(receiver, signed(key="guessed-key")) == (401, "invalid_signature")
    assert receiver.pokes == []


def test_a_push_without_the_shared_secret_is_refused(receiver):
    assert answer(receiver, signed(secret="wrong")) == (401, "invalid_signature")
    assert answer(receiver, signed(drop=("x-tokenomics-secret",))) == (401, "invalid_signature")
    assert receiver.pokes == []


def test_a_tampered_body_does_not_verify(receiver):
    req = signed()
    req.body = json.dumps({"event": "tokens.changed", "extra": 1}).encode()
    assert answer(receiver, req) == (401, "invalid_signature")
    assert receiver.pokes == []


@pytest.mark.parametrize("offset", [PUSH_MAX_SKEW + 5, -(PUSH_MAX_SKEW + 5)])
def test_a_stale_or_future_push_is_refused(receiver, offset):
    assert answer(receiver, signed(timestamp=NOW + offset)) == (401, "stale_timestamp")
    assert receiver.pokes == []


def test_a_replayed_push_is_refused(receiver):
    req = signed(nonce="n" * 32)
    assert answer(receiver, req)[0] == 202
    assert answer(receiver, signed(nonce="n" * 32)) == (401, "replayed_push")
    assert receiver.pokes == [1]


def test_an_oversized_push_is_refused_before_it_is_verified(receiver):
    assert answer(receiver, signed(body=b"x" * (1 << 20)))[0] == 413
    assert receiver.pokes == []


def test_only_post_is_accepted(receiver):
    req = signed()
    req.method = "GET"
    assert answer(receiver, req)[0] == 405


# --- a hostile token server: the proxy keeps its last good copy ------------------------------------

from remote_helpers import StubRemote, document, entry, proxy_env, remote_config  # noqa: E402

from tokenomics.config import load_config  # noqa: E402
from tokenomics.providers import Catalog  # noqa: E402
from tokenomics.store import TokenStore  # noqa: E402
from tokenomics.sync import RemoteSync  # noqa: E402

TOKEN = "tkn_" + "a" * 40


@pytest.fixture
def mirror(tmp_path):
    with StubRemote() as stub:
        environ = proxy_env()
        config = load_config(None, str(tmp_path / "proxy"), environ=environ,
                             overrides=remote_config(stub.url, sync=0))
        store = TokenStore(config, Catalog(config, environ), environ)
        sync = RemoteSync(config, store, environ)
        loop = asyncio.new_event_loop()   # one loop for every pull: the client pools its connections
        sync.run = lambda: loop.run_until_complete(sync.pull())
        stub.answer = (200, document(entry(TOKEN)))
        assert sync.run() is True
        yield stub, store, sync
        loop.close()


def known(store) -> bool:
    store.refresh(NOW)
    return store.lookup(TOKEN) is not None


@pytest.mark.parametrize("answer", [
    (200, b"<html>not json</html>"),
    (200, b'{"tokens": "all of them"}'),
    (200, b"[" * 100_000),
    (302, b"", [("Location", "http://169.254.169.254/latest/meta-data")]),
    (500, {"error": {"message": "down"}}),
    (200, b'{"tokens": [' + b'{"hash": "x"},' * 200_000 + b'{}]}'),
], ids=["not-json", "wrong-shape", "deep-nesting", "redirect", "server-error", "oversized"])
def test_a_hostile_answer_keeps_the_last_good_copy(mirror, answer):
    stub, store, sync = mirror
    stub.answer = answer
    assert sync.run() is False
    assert known(store)
    assert [r for r in stub.requests if r[0] == "GET" and "169.254" in r[1]] == []


def test_a_bad_entry_is_skipped_and_the_good_ones_are_kept(mirror):
    stub, store, sync = mirror
    other = "tkn_" + "b" * 40
    stub.answer = (200, document(entry(TOKEN), entry(other, created_at="yesterday"),
                                 {**entry("tkn_" + "c" * 40), "label": "x" * 10_000},
                                 {**entry("tkn_" + "d" * 40), "policy": {"max_tokens": "lots"}}))
    sync.run()
    store.refresh(NOW)
    assert store.lookup(TOKEN) is not None
    for bad in (other, "tkn_" + "c" * 40, "tkn_" + "d" * 40):
        assert store.lookup(bad) is None


def test_a_token_deleted_on_the_server_stops_working(mirror):
    stub, store, sync = mirror
    stub.answer = (200, document())
    assert sync.run() is True
    assert not known(store)
