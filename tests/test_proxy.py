"""End to end through real sockets: the official SDKs -> `tokenomics serve` -> a recording stub."""
import http.client
import json
import re
import signal
import socket
import threading
import time

import anthropic
import openai
import pytest

import tokenomics
import tokenomics.config
import tokenomics.providers
import tokenomics.store
from conftest import ANTHROPIC_KEY, OPENAI_KEY, free_port, sdk_http_client
from stub_upstream import DEFAULT_REPLY


def oa(proxy, token, **kw) -> openai.OpenAI:
    kw.setdefault("http_client", sdk_http_client(openai))
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=token, max_retries=0, timeout=20, **kw)


def an(proxy, token, **kw) -> anthropic.Anthropic:
    kw.setdefault("http_client", sdk_http_client(anthropic))
    return anthropic.Anthropic(base_url=proxy.url, api_key=token, max_retries=0, timeout=20, **kw)


def raw(proxy, method, path, body=None, headers=None, timeout=10):
    """One request over http.client; returns (status, headers dict, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=timeout)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers or {})
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    conn.close()
    return out


def assert_token_never_upstream(stub, token):
    assert stub.requests, "the stub received nothing"
    for rec in stub.requests:
        assert token not in json.dumps(rec.headers)
        assert token not in rec.query
        assert token.encode() not in rec.body


@pytest.fixture
def setup(cli, stub, start_proxy):
    """A proxy in front of the stub and a token with an empty policy."""
    token = cli.token({})
    proxy = start_proxy(upstream_url=stub.url)
    return proxy, token


# --- the three dialects, streamed and not ------------------------------------------------------

def test_chat_completion_forwarded_with_real_key(setup, stub):
    proxy, token = setup
    resp = oa(proxy, token).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
    completion = resp.parse()
    assert completion.choices[0].message.content == DEFAULT_REPLY
    assert completion.usage.total_tokens > 0
    rec = stub.last
    assert rec.path == "/v1/chat/completions"
    assert rec.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert rec.json["messages"] == [{"role": "user", "content": "hello"}]
    request_id = resp.headers["x-tokenomics-request-id"]
    assert re.fullmatch(r"req_[0-9a-f]{32}", request_id)
    assert rec.headers["x-client-request-id"] == request_id
    assert resp.headers["x-tokenomics-model"] == "gpt-4o-mini"
    assert_token_never_upstream(stub, token)


def test_chat_stream_relayed_event_by_event(setup, stub):
    proxy, token = setup
    stub.set_stream_chunks(["one ", "two ", "three"])
    stream = oa(proxy, token).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "count"}], stream=True)
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert pieces == ["one ", "two ", "three"]
    assert stub.last.json["stream"] is True
    assert_token_never_upstream(stub, token)


def test_responses_non_stream_and_stream(setup, stub):
    proxy, token = setup
    client = oa(proxy, token)
    resp = client.responses.create(model="gpt-4.1", input="hi", instructions="be brief")
    assert resp.output_text == DEFAULT_REPLY
    assert stub.last.path == "/v1/responses"
    assert stub.last.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    deltas = [e.delta for e in client.responses.create(model="gpt-4.1", input="hi", stream=True)
              if e.type == "response.output_text.delta"]
    assert "".join(deltas) == DEFAULT_REPLY
    assert_token_never_upstream(stub, token)


def test_messages_non_stream_and_stream_use_anthropic_key(setup, stub):
    proxy, token = setup
    client = an(proxy, token)
    msg = client.messages.create(model="claude-sonnet-4-6", max_tokens=100,
                                 messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].text == DEFAULT_REPLY
    rec = stub.last
    assert rec.path == "/v1/messages"
    assert rec.headers["x-api-key"] == ANTHROPIC_KEY
    assert "authorization" not in rec.headers
    assert "anthropic-version" in rec.headers
    with client.messages.stream(model="claude-sonnet-4-6", max_tokens=100,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == DEFAULT_REPLY
    assert final.usage.output_tokens > 0
    assert_token_never_upstream(stub, token)


def test_messages_query_extra_headers_and_x_api_key_auth(setup, stub):
    proxy, token = setup
    beta = "claude-code-20250219,interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14"
    status, headers, body = raw(proxy, "POST", "/v1/messages?beta=true", {
        "model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]},
        {"x-api-key": token, "anthropic-version": "2023-06-01", "anthropic-beta": beta,
         "x-stainless-lang": "js", "x-claude-code-session-id": "abc-123", "content-type": "application/json"})
    assert status == 200, body
    rec = stub.last
    assert rec.path == "/v1/messages" and rec.query == "beta=true"
    assert rec.headers["anthropic-beta"] == beta
    assert rec.headers["anthropic-version"] == "2023-06-01"
    assert rec.headers["x-stainless-lang"] == "js"
    assert rec.headers["x-claude-code-session-id"] == "abc-123"
    assert rec.headers["x-api-key"] == ANTHROPIC_KEY
    assert_token_never_upstream(stub, token)


def test_completions_and_embeddings_governed(setup, stub):
    proxy, token = setup
    client = oa(proxy, token)
    text = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="say hi").choices[0].text
    assert text == DEFAULT_REPLY
    assert stub.last.path == "/v1/completions"
    emb = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"], encoding_format="float")
    assert len(emb.data) == 2
    assert stub.last.path == "/v1/embeddings"
    assert stub.last.headers["authorization"] == f"Bearer {OPENAI_KEY}"


def test_passthrough_swaps_key(cli, setup, stub):
    proxy, _ = setup
    token = cli.token({"endpoints": ["/v1/files"]})  # a path beyond the governed ones must be listed
    status, _, body = raw(proxy, "GET", "/v1/files?purpose=batch", None, {"Authorization": f"Bearer {token}"})
    assert status == 200
    assert stub.last.path == "/v1/files" and stub.last.query == "purpose=batch"
    assert stub.last.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    count = an(proxy, token).messages.count_tokens(model="claude-sonnet-4-6",
                                                    messages=[{"role": "user", "content": "hi"}])
    assert count.input_tokens > 0
    assert stub.last.path == "/v1/messages/count_tokens"
    assert stub.last.headers["x-api-key"] == ANTHROPIC_KEY
    status, _, _ = raw(proxy, "GET", "/v1/files", None, {})
    assert status == 401
    assert_token_never_upstream(stub, token)


def test_provider_headers_key_env_and_query_auth(cli, stub, start_proxy):
    config = {"providers": {"acme": {"upstream_url": stub.url + "/api/v1", "api_key_env": "ACME_KEY",
                                     "auth_scheme": "query", "headers": {"x-acme": "yes"}},
                            "hdr": {"upstream_url": stub.url, "auth_scheme": "header", "auth_header": "api-key",
                                    "chat_path": "/deploy/chat"}}}
    proxy = start_proxy(config=config, env={"ACME_KEY": "acme-secret", "HDR_KEY": "hdr-secret"})
    token = cli.token({"providers": {"acme": [{"model": "acme-1"}],
                                     "hdr": [{"model": "hdr-1", "base_key_env": "HDR_KEY"}]}})
    client = oa(proxy, token)
    client.chat.completions.create(model="acme-1", messages=[{"role": "user", "content": "x"}])
    rec = stub.last
    assert rec.path == "/api/v1/chat/completions"
    assert rec.query == "key=acme-secret"
    assert rec.headers["x-acme"] == "yes"
    assert "authorization" not in rec.headers
    client.chat.completions.create(model="hdr-1", messages=[{"role": "user", "content": "x"}])
    rec = stub.last
    assert rec.path == "/deploy/chat"
    assert rec.headers["api-key"] == "hdr-secret"
    assert_token_never_upstream(stub, token)


def test_models_filtered_by_policy(cli, start_proxy, stub):
    token = cli.token({"model_regex": "^gpt-4o"})
    proxy = start_proxy(upstream_url=stub.url)
    ids = [m.id for m in oa(proxy, token).models.list()]
    assert ids and all(i.startswith("gpt-4o") for i in ids)
    assert "gpt-4o-mini" in ids
    assert not stub.requests


def test_mock_provider_all_dialects(cli, start_proxy):
    token = cli.token({"provider": "mock"})
    proxy = start_proxy()
    client = oa(proxy, token)
    out = client.chat.completions.create(model="mock-1", messages=[{"role": "user", "content": "ping"}])
    assert out.choices[0].message.content == "Mock reply: ping"
    assert out.usage.prompt_tokens > 0 and out.usage.completion_tokens > 0
    stream = client.chat.completions.create(model="mock-1", messages=[{"role": "user", "content": "ping"}],
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Mock reply: ping"
    assert chunks[-1].usage.total_tokens > 0
    assert client.responses.create(model="mock-1", input="ping").output_text == "Mock reply: ping"
    events = [e.type for e in client.responses.create(model="mock-1", input="ping", stream=True)]
    assert events[0] == "response.created" and events[-1] == "response.completed"
    msg = an(proxy, token).messages.create(model="mock-1", max_tokens=50,
                                           messages=[{"role": "user", "content": "ping"}])
    assert msg.content[0].text == "Mock reply: ping"
    with an(proxy, token).messages.stream(model="mock-1", max_tokens=50,
                                          messages=[{"role": "user", "content": "ping"}]) as s:
        assert "".join(s.text_stream) == "Mock reply: ping"


def test_upstream_error_passes_through(setup, stub):
    proxy, token = setup
    stub.script(status=429, body={"error": {"message": "slow down", "type": "requests"}},
                headers={"retry-after": "7"})
    with pytest.raises(openai.RateLimitError) as info:
        oa(proxy, token).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert info.value.response.headers["retry-after"] == "7"
    assert info.value.body["message"] == "slow down"


# --- the error table ---------------------------------------------------------------------------

def error_of(status_headers_body):
    status, headers, body = status_headers_body
    doc = json.loads(body)
    return status, headers.get("x-tokenomics-error-code"), doc


CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}
MSG = {"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}


def test_auth_errors(setup, cli, stub):
    proxy, token = setup
    status, code, doc = error_of(raw(proxy, "POST", "/v1/chat/completions", CHAT))
    assert (status, code, doc["error"]["code"]) == (401, "missing_token", "missing_token")
    assert doc["error"]["param"] is None and doc["error"]["type"]
    status, code, doc = error_of(raw(proxy, "POST", "/v1/messages", MSG, {"x-api-key": "tkn_" + "0" * 32}))
    assert (status, code) == (401, "invalid_token")
    assert doc["type"] == "error" and doc["error"]["code"] == "invalid_token"
    assert doc["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        oa(proxy, "tkn_" + "1" * 32).chat.completions.create(**CHAT)
    assert not stub.requests


def test_expired_token(setup, cli, data_dir):
    proxy, _ = setup
    token = cli.token({})
    config = tokenomics.config.load_config(None, str(data_dir), environ={"TOKENOMICS_DIR": str(data_dir)})
    store = tokenomics.store.TokenStore(config, tokenomics.providers.Catalog(config), environ={})
    record = store.lookup(token)
    store.update(record.hash[:16], expires_at=time.time() - 5)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        status, code, doc = error_of(raw(proxy, "POST", "/v1/chat/completions", CHAT,
                                         {"Authorization": f"Bearer {token}"}))
        if status == 401:
            break
        time.sleep(0.05)
    assert (status, code) == (401, "token_expired")


def test_model_not_allowed_both_shapes(cli, stub, start_proxy):
    token = cli.token({"model": "gpt-4o-mini"})
    proxy = start_proxy(upstream_url=stub.url)
    status, code, doc = error_of(raw(proxy, "POST", "/v1/chat/completions", CHAT, {"Authorization": token}))
    assert (status, code, doc["error"]["code"]) == (403, "model_not_allowed", "model_not_allowed")
    status, code, doc = error_of(raw(proxy, "POST", "/v1/messages", MSG, {"x-api-key": token}))
    assert (status, code, doc["error"]["type"]) == (403, "model_not_allowed", "permission_error")
    with pytest.raises(anthropic.PermissionDeniedError):
        an(proxy, token).messages.create(**MSG)
    assert not stub.requests


@pytest.mark.parametrize("body, what", [
    (b"{not json", "malformed"), (b"[1, 2]", "non-object"), (b'{"messages": []}', "missing model"),
    (b'{"model": "gpt-4o", "messages": "hi"}', "wrong type"), (b'{"model": "\xff\xfe"}', "invalid utf-8"),
    (b'{"model": "gpt-4o", "messages": [], "stream": "yes"}', "stream type"),
])
def test_invalid_request(setup, stub, body, what):
    proxy, token = setup
    status, code, doc = error_of(raw(proxy, "POST", "/v1/chat/completions", body,
                                     {"Authorization": f"Bearer {token}", "content-type": "application/json"}))
    assert (status, code) == (400, "invalid_request"), what
    assert not stub.requests
    assert raw(proxy, "GET", "/health")[0] == 200


def test_request_too_large(cli, stub, start_proxy):
    token = cli.token({})
    proxy = start_proxy(upstream_url=stub.url, config={"server": {"max_body_bytes": 1000}})
    big = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 5000}]}
    status, code, doc = error_of(raw(proxy, "POST", "/v1/chat/completions", big, {"Authorization": token}))
    assert (status, code) == (413, "request_too_large")
    status, code, doc = error_of(raw(proxy, "POST", "/v1/messages", {**MSG, "system": "y" * 5000},
                                     {"x-api-key": token}))
    assert (status, doc["error"]["type"]) == (413, "request_too_large")
    assert not stub.requests
    assert raw(proxy, "POST", "/v1/chat/completions", CHAT, {"Authorization": token})[0] == 200


def test_upstream_key_missing_names_variable(cli, stub, start_proxy):
    token = cli.token({"base_key_env": "NOT_SET_ANYWHERE_KEY"})
    proxy = start_proxy(upstream_url=stub.url)
    status, code, doc = error_of(raw(proxy, "POST", "/v1/chat/completions", CHAT, {"Authorization": token}))
    assert (status, code) == (500, "upstream_key_missing")
    assert "NOT_SET_ANYWHERE_KEY" in doc["error"]["message"]
    assert not stub.requests


def test_upstream_unreachable(cli, start_proxy):
    token = cli.token({})
    proxy = start_proxy(upstream_url=f"http://127.0.0.1:{free_port()}")
    status, code, _ = error_of(raw(proxy, "POST", "/v1/chat/completions", CHAT, {"Authorization": token}))
    assert (status, code) == (502, "upstream_unreachable")
    status, code, doc = error_of(raw(proxy, "POST", "/v1/messages", MSG, {"x-api-key": token}))
    assert (status, code, doc["type"]) == (502, "upstream_unreachable", "error")


def test_upstream_timeout_within_policy_timeout(cli, stub, start_proxy):
    token = cli.token({"timeout": "1s"})
    proxy = start_proxy(upstream_url=stub.url)
    stub.script(hang=True)
    started = time.monotonic()
    status, code, _ = error_of(raw(proxy, "POST", "/v1/chat/completions", CHAT, {"Authorization": token}))
    elapsed = time.monotonic() - started
    assert (status, code) == (504, "upstream_timeout")
    assert 0.9 <= elapsed < 3.0


# --- live token store --------------------------------------------------------------------------

def test_token_created_and_deleted_while_serving_take_effect_within_a_second(setup, cli, stub):
    proxy, _ = setup
    token = cli.token({})
    created = time.monotonic()
    hash_ = None
    while time.monotonic() - created < 3:
        status, _, _ = raw(proxy, "POST", "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {token}"})
        if status == 200:
            break
        time.sleep(0.02)
    assert status == 200 and time.monotonic() - created <= 1.0
    listing = json.loads(cli("token", "list", "--json", check=True).stdout)
    hash_ = next(r["hash"] for r in listing if r["label"] == "" and r["hash"])
    for r in listing:
        cli("token", "delete", "--hash", r["hash"], check=True)
    deleted = time.monotonic()
    while time.monotonic() - deleted < 3:
        status, code, _ = error_of(raw(proxy, "POST", "/v1/chat/completions", CHAT,
                                       {"Authorization": f"Bearer {token}"}))
        if status == 401:
            break
        time.sleep(0.02)
    assert (status, code) == (401, "invalid_token") and time.monotonic() - deleted <= 1.0
    assert hash_


# --- bad input at the HTTP layer ---------------------------------------------------------------

def _send_raw(port, data: bytes, read_timeout=5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while True:
                piece = s.recv(65536)
                if not piece:
                    break
                chunks.append(piece)
        except socket.timeout:
            pass
    return b"".join(chunks)


def test_malformed_request_line_and_header_flood(setup):
    proxy, _ = setup
    assert _send_raw(proxy.port, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400")
    flood = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 100)
                                                           for i in range(2000)) + b"\r\n"
    answer = _send_raw(proxy.port, flood)
    assert answer.startswith(b"HTTP/1.1 4"), answer[:80]
    assert raw(proxy, "GET", "/health")[0] == 200


def test_slow_headers_get_408_and_server_keeps_serving(cli, start_proxy):
    proxy = start_proxy(config={"server": {"header_timeout": 0.5}})
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # never finishes the headers
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408")
    assert time.monotonic() - started < 3
    assert raw(proxy, "GET", "/health")[0] == 200


def test_head_probe_and_unknown_paths_answer_fast(setup):
    proxy, _ = setup
    status, _, body = raw(proxy, "HEAD", "/")
    assert status == 200 and body == b""
    assert raw(proxy, "GET", "/ping")[0] == 200
    status, code, _ = error_of(raw(proxy, "GET", "/nope"))
    assert (status, code) == (404, "not_found")


def test_keep_alive_reuses_one_connection(setup, stub):
    proxy, token = setup
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    for _ in range(5):
        conn.request("POST", "/v1/chat/completions", body=json.dumps(CHAT),
                     headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        assert resp.status == 200
        resp.read()
    conn.close()
    assert len(stub.requests) == 5


# --- streams: disconnects and shutdown ---------------------------------------------------------

def stream_then_hang_up(proxy, token: str, body: dict, stub) -> None:
    """Start a streamed request over a raw socket, read the first bytes, close the connection,
    and wait (bounded) until the stub saw its stream abandoned."""
    stub.event_delay = 0.2
    stub.set_stream_chunks([f"w{i} " for i in range(40)])
    data = json.dumps({**body, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
    assert stub.wait_for(lambda: stub.disconnects >= 1, timeout=5), "upstream stream was not cancelled"


def test_client_disconnect_cancels_upstream_stream(setup, stub):
    proxy, token = setup
    stream_then_hang_up(proxy, token, CHAT, stub)


@pytest.mark.subprocess_proxy
def test_sigterm_finishes_in_flight_request(setup, stub):
    proxy, token = setup
    stub.script(delay=1.0)
    result = {}

    def call():
        result["answer"] = raw(proxy, "POST", "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {token}"})

    worker = threading.Thread(target=call)
    worker.start()
    assert stub.wait_for(lambda: stub.requests, timeout=5)
    proxy.proc.send_signal(signal.SIGTERM)
    worker.join(10)
    assert result["answer"][0] == 200
    assert proxy.proc.wait(10) == 0
