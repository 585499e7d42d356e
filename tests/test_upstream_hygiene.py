"""Hostile upstreams and load (SPEC §5): pool hygiene, redirects, key echo, bombs, SSE bounds,
the connection cap and the write timeout. Real sockets: `tokenomics serve` in front of the stub."""
import contextlib
import http.client
import json
import resource
import socket
import time
import zlib

import anthropic
import openai
import pytest

import tokenomics
import tokenomics.config
import tokenomics.errors
import tokenomics.http.client
import tokenomics.http.server
import tokenomics.http.sse
from conftest import ANTHROPIC_KEY, OPENAI_KEY, sdk_http_client
from stub_upstream import DEFAULT_REPLY

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}
MSG = {"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}


def oa(proxy, token) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=token, max_retries=0, timeout=20,
                         http_client=sdk_http_client(openai))


def raw(proxy, method, path, body=None, headers=None, timeout=20):
    """One request over http.client; returns (status, headers dict, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=timeout)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers or {})
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    conn.close()
    return out


def bearer(token):
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def chat_chunk(text: str) -> bytes:
    doc = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
           "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


@pytest.fixture
def setup(cli, stub, start_proxy):
    token = cli.token({})
    return start_proxy(upstream_url=stub.url), token


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


# --- the connection pool -------------------------------------------------------------------

def test_leftover_bytes_after_a_content_length_reply_never_reach_another_token(cli, stub, start_proxy):
    token_a, token_b = cli.token({}), cli.token({})
    proxy = start_proxy(upstream_url=stub.url)
    poison = json.dumps({"id": "chatcmpl-poison", "object": "chat.completion", "created": 1, "model": "gpt-4o",
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": "POISON for token B"}}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
    fake = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (len(poison), poison))
    stub.script(trailing=fake)
    first = oa(proxy, token_a).chat.completions.create(**CHAT)
    assert first.choices[0].message.content == DEFAULT_REPLY
    for _ in range(3):
        answer = oa(proxy, token_b).chat.completions.create(**CHAT)
        assert answer.choices[0].message.content == DEFAULT_REPLY
    assert len(stub.requests) == 4  # every request was answered by the upstream itself


# --- redirects -----------------------------------------------------------------------------

@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_upstream_redirect_is_a_502_and_never_followed(setup, stub, status):
    proxy, token = setup
    stub.script(status=status, headers={"location": stub.url + "/elsewhere"}, body=b"")
    got, headers, body = raw(proxy, "POST", "/v1/chat/completions", CHAT, bearer(token))
    assert (got, headers.get("x-tokenomics-error-code")) == (502, "upstream_redirect")
    assert json.loads(body)["error"]["code"] == "upstream_redirect"
    assert "location" not in headers
    assert [r.path for r in stub.requests] == ["/v1/chat/completions"]


def test_upstream_redirect_in_anthropic_dialect_and_sdk_does_not_resend(setup, stub):
    proxy, token = setup
    stub.script(status=307, headers={"location": stub.url + "/elsewhere"}, body=b"")
    with pytest.raises(anthropic.APIStatusError) as info:
        anthropic.Anthropic(base_url=proxy.url, api_key=token, max_retries=0, timeout=20).messages.create(**MSG)
    assert info.value.status_code == 502
    assert info.value.body["type"] == "error" and info.value.body["error"]["code"] == "upstream_redirect"
    stub.script(status=307, headers={"location": stub.url + "/elsewhere"}, body=b"")
    with pytest.raises(openai.APIStatusError) as info:
        oa(proxy, token).chat.completions.create(**CHAT)
    assert info.value.status_code == 502
    assert [r.path for r in stub.requests] == ["/v1/messages", "/v1/chat/completions"]


# --- the injected key never comes back -----------------------------------------------------

def test_key_echoed_in_error_header_and_body_is_redacted(setup, stub):
    proxy, token = setup
    stub.script(status=401, headers={"x-debug-auth": f"Bearer {OPENAI_KEY}"},
                body={"error": {"message": f"Incorrect API key provided: {OPENAI_KEY}.", "type": "invalid_request_error",
                                "code": "invalid_api_key"}})
    status, headers, body = raw(proxy, "POST", "/v1/chat/completions", CHAT, bearer(token))
    assert status == 401
    assert OPENAI_KEY not in json.dumps(headers) and OPENAI_KEY.encode() not in body
    assert headers["x-debug-auth"] == "Bearer [REDACTED]"
    assert json.loads(body)["error"]["message"] == "Incorrect API key provided: [REDACTED]."


def test_key_echoed_in_a_200_body_and_in_a_gzipped_passthrough_is_redacted(setup, stub):
    proxy, token = setup
    stub.script(reply_text=f"your key is {OPENAI_KEY} ok")
    answer = oa(proxy, token).chat.completions.create(**CHAT)
    assert answer.choices[0].message.content == "your key is [REDACTED] ok"
    echoed = json.dumps({"input_tokens": 3, "echo": ANTHROPIC_KEY}).encode()
    stub.script(body=gzip_bytes(echoed), headers={"content-type": "application/json", "content-encoding": "gzip"},
                path="/v1/messages/count_tokens")
    status, headers, body = raw(proxy, "POST", "/v1/messages/count_tokens", MSG,
                                {"x-api-key": token, "anthropic-version": "2023-06-01",
                                 "Content-Type": "application/json", "Accept-Encoding": "gzip"})
    assert status == 200
    if headers.get("content-encoding") == "gzip":
        body = zlib.decompress(body, 16 + zlib.MAX_WBITS)
    assert json.loads(body) == {"input_tokens": 3, "echo": "[REDACTED]"}
    assert stub.last.headers["accept-encoding"] == "identity"  # asked for bytes the proxy can inspect


def test_key_split_across_stream_chunks_is_redacted(setup, stub):
    proxy, token = setup
    event = chat_chunk(f"leak {OPENAI_KEY} leak")
    cut = event.index(OPENAI_KEY.encode()) + 7
    # the key arrives in three chunks, one of them a single byte
    stub.script(stream_events=[chat_chunk("hi "), event[:cut], event[cut:cut + 1], event[cut + 1:],
                               b"data: [DONE]\n\n"])
    stream = oa(proxy, token).chat.completions.create(**CHAT, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "hi leak [REDACTED] leak"


# --- bounded answers -----------------------------------------------------------------------

def gzip_bytes(data: bytes) -> bytes:
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    return comp.compress(data) + comp.flush()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """500 MB of zeros as gzip: about 0.5 MB on the wire."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    out = [comp.compress(block) for _ in range(500)]
    out.append(comp.flush())
    return b"".join(out)


@pytest.mark.subprocess_proxy
def test_gzip_bomb_is_a_502_and_memory_stays_bounded(setup, stub, bomb):
    proxy, token = setup
    assert len(bomb) < 600_000
    stub.script(body=bomb, headers={"content-type": "application/json", "content-encoding": "gzip"})
    started = time.monotonic()
    status, headers, body = raw(proxy, "POST", "/v1/chat/completions", CHAT, bearer(token), timeout=60)
    assert (status, headers.get("x-tokenomics-error-code")) == (502, "upstream_response_too_large")
    peak = peak_rss_mb(proxy.proc.pid)
    print(f"\npeak RSS of the proxy under a 500 MB gzip bomb: {peak:.0f} MB "
          f"({time.monotonic() - started:.2f} s to the 502)")
    assert peak < 250, f"the proxy reached {peak:.0f} MB"
    assert raw(proxy, "GET", "/health")[0] == 200


def test_max_response_bytes_config_bounds_a_plain_answer(cli, stub, start_proxy):
    token = cli.token({})
    proxy = start_proxy(upstream_url=stub.url, config={"server": {"max_response_bytes": 2000}})
    assert oa(proxy, token).chat.completions.create(**CHAT).choices[0].message.content == DEFAULT_REPLY
    stub.script(reply_text="word " * 1000)
    status, headers, body = raw(proxy, "POST", "/v1/chat/completions", CHAT, bearer(token))
    assert (status, headers.get("x-tokenomics-error-code")) == (502, "upstream_response_too_large")
    assert "server.max_response_bytes" in json.loads(body)["error"]["message"]


def test_boundary_less_sse_event_is_a_502_before_the_stream_starts(setup, stub):
    proxy, token = setup
    stub.script(stream_events=[b"data: " + b"x" * (2 << 20)])  # 2 MiB and never a blank line
    status, headers, body = raw(proxy, "POST", "/v1/chat/completions", {**CHAT, "stream": True}, bearer(token))
    assert (status, headers.get("x-tokenomics-error-code")) == (502, "upstream_response_too_large")
    stub.script(stream_events=[b"event: content_block_delta\ndata: " + b"y" * (2 << 20)], path="/v1/messages")
    status, headers, body = raw(proxy, "POST", "/v1/messages", {**MSG, "stream": True},
                                {"x-api-key": token, "anthropic-version": "2023-06-01"})
    assert status == 502 and json.loads(body)["error"]["code"] == "upstream_response_too_large"
    assert json.loads(body)["type"] == "error"


def test_oversized_sse_event_after_the_stream_started_ends_it_with_an_error_event(setup, stub):
    proxy, token = setup
    big = chat_chunk("z" * (3 << 19))  # 1.5 MiB in one event
    stub.script(stream_events=[chat_chunk("first "), big, chat_chunk("never"), b"data: [DONE]\n\n"])
    status, headers, body = raw(proxy, "POST", "/v1/chat/completions", {**CHAT, "stream": True}, bearer(token))
    assert status == 200
    events = [e for e in body.split(b"\n\n") if e.strip()]
    assert b"first " in events[0]
    last = json.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "upstream_response_too_large"
    assert b"never" not in body and len(body) < 10_000


def test_sse_parser_is_linear_fed_one_byte_at_a_time():
    """1 MiB without a boundary, one byte per feed, then the boundary: the old parser copied and
    rescanned its whole buffer on every feed (quadratic: minutes); this one takes seconds."""
    parser = tokenomics.http.sse.SSEParser()
    payload = b"data: " + b"a" * ((1 << 20) - 16)
    deadline = time.monotonic() + 30
    for i in range(len(payload)):
        assert parser.feed(payload[i:i + 1]) == []
        if i % 4096 == 0:
            assert time.monotonic() < deadline, f"still parsing at byte {i}: not linear"
    events = parser.feed(b"\n") + parser.feed(b"\n")
    assert len(events) == 1 and events[0].data == payload[6:].decode()
    # the same events whatever the chunking, boundaries split across feeds included
    wire = b"event: a\ndata: 1\r\n\r\ndata: 2\n\ndata: 3\r\rdata: x\ndata: y\n\n"
    whole = [(e.event, e.data, e.raw) for e in tokenomics.http.sse.SSEParser().feed(wire)]
    bytewise = tokenomics.http.sse.SSEParser()
    assert [(e.event, e.data, e.raw) for i in range(len(wire)) for e in bytewise.feed(wire[i:i + 1])] == whole
    with pytest.raises(tokenomics.errors.ProxyError) as info:
        tokenomics.http.sse.SSEParser().feed(b"data: " + b"b" * (1 << 20))
    assert info.value.code == "upstream_response_too_large"


# --- configuration -------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, expected", [
    ("max_connections", "many", "server.max_connections: expected an integer"),
    ("max_connections", -1, "server.max_connections: must be 0"),
    ("write_timeout", "soon", "server.write_timeout: expected a number"),
    ("write_timeout", 0, "server.write_timeout: must be a positive number"),
    ("max_response_bytes", 1.5, "server.max_response_bytes: expected an integer"),
    ("max_response_bytes", 0, "server.max_response_bytes: must be a positive"),
])
def test_server_limits_are_validated(tmp_path, key, value, expected):
    import yaml
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"server": {key: value}}))
    with pytest.raises(tokenomics.errors.UsageError) as info:
        tokenomics.config.load_config(str(path), str(tmp_path / "d"), environ={})
    assert expected in str(info.value)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"server": {"max_connections": 10, "write_timeout": 5,
                                               "max_response_bytes": 1000}}))
    server = tokenomics.config.load_config(str(good), str(tmp_path / "d"), environ={}).server
    assert (server.max_connections, server.write_timeout, server.max_response_bytes) == (10, 5.0, 1000)


# --- load: the connection cap and the write timeout ----------------------------------------

def http_get(sock: socket.socket, path: str = "/health") -> bytes:
    """A keep-alive GET on an open socket; returns the whole response (Content-Length framed)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    deadline = time.monotonic() + 10
    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + content_length(data):
        assert time.monotonic() < deadline, "no complete response"
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    return data


def content_length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    for line in head.split("\r\n"):
        if line.startswith("content-length:"):
            return int(line.split(":", 1)[1])
    return 0


def read_to_eof(sock: socket.socket, limit: float = 10) -> bytes:
    data, deadline = b"", time.monotonic() + limit
    while time.monotonic() < deadline:
        piece = sock.recv(65536)
        if not piece:
            return data
        data += piece
    raise AssertionError("the connection was not closed")


def health_within(proxy, seconds: float) -> list:
    """GET /health on fresh connections until a 200 or `seconds` pass; the statuses seen."""
    answers, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            s.settimeout(5)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answers.append(read_to_eof(s, 5).split(b" ", 2)[1])
        if answers[-1] == b"200":
            break
        time.sleep(0.05)  # a client's retry pause; the loop is bounded by the deadline
    return answers


def hold_connections(proxy, n: int, seconds: float = 10) -> list:
    """`n` keep-alive connections that each had a 200 /health, retrying those refused while the
    server still counts connections the test closed; bounded by `seconds`."""
    held, deadline = [], time.monotonic() + seconds
    while len(held) < n:
        assert time.monotonic() < deadline, f"only {len(held)} of {n} connections were served"
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        if http_get(s).startswith(b"HTTP/1.1 200"):
            held.append(s)
        else:
            s.close()
    return held


def test_connections_over_the_cap_get_503_overloaded_and_health_still_answers(cli, start_proxy):
    proxy = start_proxy(config={"server": {"max_connections": 4}})
    held = []
    try:
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            assert http_get(s).startswith(b"HTTP/1.1 200")
            held.append(s)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as extra:
            extra.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            answer = read_to_eof(extra)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"x-tokenomics-error-code: overloaded" in head
        doc = json.loads(body)  # in the dialect of the path
        assert doc["type"] == "error" and doc["error"]["code"] == "overloaded"
        # a refusal closes the longest-idle connection once it sat idle OVERLOAD_RECLAIM_IDLE seconds:
        # a client that retries is served
        assert health_within(proxy, 5 + tokenomics.http.server.OVERLOAD_RECLAIM_IDLE)[-1] == b"200"
        # a burst over the cap is answered (200 or 503, never a hang) and logged at most once a second;
        # while the cap's slots hold connections that are not yet reclaimable (idle under
        # OVERLOAD_RECLAIM_IDLE), every connection of the burst is over the cap
        started, refused = time.monotonic(), 0
        for _ in range(10):
            for s in held:
                s.close()
            held = hold_connections(proxy, 4)
            burst = [socket.create_connection(("127.0.0.1", proxy.port), timeout=10) for _ in range(8)]
            for s in burst:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            for s in burst:
                with s:
                    answer = read_to_eof(s)
                    assert answer.split(b" ", 2)[1] in (b"200", b"503")
                    if answer.startswith(b"HTTP/1.1 503"):
                        refused += 1
                        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "overloaded"
        elapsed = time.monotonic() - started
        assert refused >= 10
    finally:
        for s in held:
            s.close()
    assert raw(proxy, "GET", "/health")[0] == 200
    lines = [line for line in proxy.stderr.splitlines() if "connection limit reached" in line]
    assert 1 <= len(lines) <= elapsed / tokenomics.http.server.OVERLOAD_LOG_INTERVAL + 2
    assert "Traceback" not in proxy.stderr


def test_shutdown_while_a_refused_connection_lingers_is_clean(cli, start_proxy):
    proxy = start_proxy(config={"server": {"max_connections": 1}})
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as held, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as refused:
        assert http_get(held).startswith(b"HTTP/1.1 200")
        # the 503 is written, then the server lingers reading until this client closes
        assert http_get(refused).startswith(b"HTTP/1.1 503")
        assert proxy.stop() == 0
    assert "Traceback" not in proxy.stderr and "CancelledError" not in proxy.stderr


@contextlib.contextmanager
def fd_limit_for_children(soft: int):
    """Children started inside inherit a soft RLIMIT_NOFILE of `soft` (this process gets its own back)."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


def test_1100_idle_connections_at_a_1024_fd_limit_do_not_lock_anyone_out(cli, start_proxy):
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 1300:
        pytest.skip("this test needs 1,300 file descriptors for its own client sockets")
    with fd_limit_for_children(1024):
        proxy = start_proxy()
    held, refused = [], 0
    try:
        for _ in range(1100):
            held.append(socket.create_connection(("127.0.0.1", proxy.port), timeout=10))
        started = time.monotonic()
        answers = health_within(proxy, 5 + tokenomics.http.server.OVERLOAD_RECLAIM_IDLE)
        took = time.monotonic() - started
        for s in held:
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError, OSError):
                if s.recv(65536).startswith(b"HTTP/1.1 503"):
                    refused += 1
    finally:
        for s in held:
            s.close()
    print(f"\n1,100 idle connections at a 1,024-fd limit: {refused} got 503 overloaded; /health answered "
          f"{[a.decode() for a in answers]} in {took * 1000:.0f} ms; stderr {len(proxy.stderr)} bytes")
    assert answers[-1] == b"200"
    assert refused > 0
    assert "Traceback" not in proxy.stderr and len(proxy.stderr) < 20_000


def test_client_that_stops_reading_is_cut_after_write_timeout_and_upstream_released(cli, stub, start_proxy):
    token = cli.token({})
    proxy = start_proxy(upstream_url=stub.url, config={"server": {"write_timeout": 1}})
    event = chat_chunk("w" * 16384)
    stub.script(stream_events=[event] * 4096)  # 64 MB: far more than every socket buffer on the way
    data = json.dumps({**CHAT, "stream": True}).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    try:
        s.connect(("127.0.0.1", proxy.port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
        assert s.recv(64).startswith(b"HTTP/1.1 200")
        # ... and never reads again
        assert stub.wait_for(lambda: stub.disconnects >= 1, timeout=15), "the upstream stream was not released"
    finally:
        s.close()
    assert raw(proxy, "GET", "/health")[0] == 200
    assert "Traceback" not in proxy.stderr


def test_key_redaction_holds_for_any_chunking():
    """Property: however the upstream cuts its bytes, the key never passes and nothing else changes."""
    from hypothesis import given, settings, strategies as st
    key = OPENAI_KEY.encode()

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.sampled_from([key, key[:5], key[5:], b"s", b"sk-", b"\n\n", b"data: x", b""]), max_size=12),
           st.lists(st.integers(min_value=0, max_value=200), max_size=8))
    def check(parts, cuts):
        wire = b"".join(parts)
        bounds = sorted({min(c, len(wire)) for c in cuts} | {0, len(wire)})
        redactor = tokenomics.http.client._Redactor(key)
        out = b"".join(redactor.feed(wire[a:b]) for a, b in zip(bounds, bounds[1:])) + redactor.flush()
        assert out == wire.replace(key, b"[REDACTED]")
    check()


# --- JSON that repeats a key ---------------------------------------------------------------
# A parser keeps the last copy of a repeated key; a client's parser may keep the first. Under an
# output rule, what the client gets is written from what the proxy parsed and scanned.

_HIDDEN = "hidden.person@example.com"
_OUTPUT_PII = {"rules": [{"type": "pii", "action": "mask", "scope": "output", "detect": ["email"]}]}


def _post_raw(proxy, token, body: dict) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=20)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                 headers={"authorization": f"Bearer {token}", "content-type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, resp.read()
    conn.close()
    return out


def test_an_answer_repeating_a_key_reaches_the_client_as_scanned(cli, stub, start_proxy):
    token = cli.token(_OUTPUT_PII)
    proxy = start_proxy(upstream_url=stub.url)
    body = ('{"id":"chatcmpl-x","object":"chat.completion","created":1,"model":"gpt-4o","choices":[{"index":0,'
            f'"message":{{"role":"assistant","content":"write to {_HIDDEN}"}},'
            '"message":{"role":"assistant","content":"all clear"},"finish_reason":"stop"}],'
            '"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}')
    stub.script(body=body.encode(), headers={"content-type": "application/json"})
    status, data = _post_raw(proxy, token, CHAT)
    assert status == 200
    assert _HIDDEN.encode() not in data
    assert json.loads(data)["choices"][0]["message"]["content"] == "all clear"


def test_a_stream_event_repeating_a_key_reaches_the_client_as_scanned(cli, stub, start_proxy):
    token = cli.token(_OUTPUT_PII)
    proxy = start_proxy(upstream_url=stub.url)
    smuggled = ('data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"gpt-4o",'
                f'"choices":[{{"index":0,"delta":{{"content":"mail {_HIDDEN}"}},"delta":{{}},'
                '"finish_reason":"stop"}]}\n\n').encode()
    stub.script(stream_events=[chat_chunk("hello "), smuggled, b"data: [DONE]\n\n"])
    status, data = _post_raw(proxy, token, dict(CHAT, stream=True))
    assert status == 200
    assert _HIDDEN.encode() not in data
    assert b"hello " in data


def test_an_answer_that_is_not_a_json_object_is_not_relayed_past_output_rules(cli, stub, start_proxy):
    token = cli.token(_OUTPUT_PII)
    proxy = start_proxy(upstream_url=stub.url)
    stub.script(body=f"write to {_HIDDEN}".encode(), headers={"content-type": "text/plain"})
    status, data = _post_raw(proxy, token, CHAT)
    assert status == 500 and json.loads(data)["error"]["code"] == "guardrail_error"
    assert _HIDDEN.encode() not in data


def test_a_stream_event_that_is_not_a_json_object_is_refused_under_output_rules(cli, stub, start_proxy):
    token = cli.token(_OUTPUT_PII)
    proxy = start_proxy(upstream_url=stub.url)
    stub.script(stream_events=[chat_chunk("hello "), f'data: ["mail {_HIDDEN}"]\n\n'.encode(), b"data: [DONE]\n\n"])
    status, data = _post_raw(proxy, token, dict(CHAT, stream=True))
    assert _HIDDEN.encode() not in data
    # "hello " is still held back when the event arrives: nothing reached the client, a plain error
    assert status == 500 and json.loads(data)["error"]["code"] == "guardrail_error"


def test_a_stream_event_that_is_not_a_json_object_passes_without_output_rules(setup, stub):
    proxy, token = setup                      # no output rule: the proxy relays what it cannot read
    stub.script(stream_events=[chat_chunk("hello "), b'data: ["x"]\n\n', b"data: [DONE]\n\n"])
    status, data = _post_raw(proxy, token, dict(CHAT, stream=True))
    assert status == 200 and b'data: ["x"]' in data
