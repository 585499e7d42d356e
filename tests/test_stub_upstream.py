"""The stub upstream speaks the providers' wire formats: proven by the official SDKs parsing it.

The SDK clients use `_strict_response_validation=True` wherever the SDK's own types allow it, so
a missing required field or a wrong literal fails the test instead of being silently tolerated.
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import threading
import time

import anthropic
import openai
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stub_upstream import DEFAULT_REPLY, Recorded, StubUpstream  # noqa: E402

USER = [{"role": "user", "content": "Say hello"}]


@pytest.fixture
def stub():
    with StubUpstream() as s:
        yield s


def oai(stub, strict=True, **kw):
    kw.setdefault("max_retries", 0)
    kw.setdefault("timeout", 10)
    return openai.OpenAI(base_url=stub.url + "/v1", api_key="sk-test",
                         _strict_response_validation=strict, **kw)


def ant(stub, strict=True, **kw):
    kw.setdefault("max_retries", 0)
    kw.setdefault("timeout", 10)
    return anthropic.Anthropic(base_url=stub.url, api_key="k",
                               _strict_response_validation=strict, **kw)


def expected_in(rec: Recorded) -> int:
    return max(1, math.ceil(len(rec.body) / 4))


def raw_request(url: str, method: str, path: str, body: bytes = b"", headers: dict | None = None,
                timeout: float = 5.0) -> tuple[bytes, list[tuple[float, bytes]]]:
    """Send one HTTP/1.1 request on a fresh socket; return (head, [(arrival time, chunk payload)])
    for a chunked body, or (head, [(t, body)]) for a Content-Length body."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    try:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close",
                 f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        f = sock.makefile("rb")
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = f.readline()
            assert line, "connection closed inside the response head"
            head += line
        lower = head.lower()
        if b"transfer-encoding: chunked" not in lower:
            length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
            return head, [(time.monotonic(), f.read(length))]
        chunks = []
        for _ in range(10_000):
            size = int(f.readline().strip(), 16)
            if size == 0:
                f.readline()
                return head, chunks
            data = f.read(size)
            f.readline()
            chunks.append((time.monotonic(), data))
        raise AssertionError("too many chunks")
    finally:
        sock.close()


# -- OpenAI Chat Completions ------------------------------------------------------------------

def test_chat_completion_non_stream_parsed_by_sdk_and_recorded(stub):
    r = oai(stub).chat.completions.create(model="gpt-4o-mini", messages=USER)
    rec = stub.last
    assert r.id == "chatcmpl-stub1" and r.object == "chat.completion" and r.model == "gpt-4o-mini"
    assert r.choices[0].message.content == DEFAULT_REPLY
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == expected_in(rec)
    assert r.usage.completion_tokens == len(DEFAULT_REPLY.split())
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r._request_id == "req_stub_1"
    assert (rec.method, rec.path, rec.query) == ("POST", "/v1/chat/completions", "")
    assert rec.headers["authorization"] == "Bearer sk-test"
    assert rec.headers["content-type"] == "application/json"
    assert rec.json == {"model": "gpt-4o-mini", "messages": USER}
    assert json.loads(rec.body) == rec.json


def test_chat_stream_with_include_usage(stub):
    chunks = list(oai(stub).chat.completions.create(
        model="gpt-4o", messages=USER, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == "chatcmpl-stub1" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text_chunks = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert len(text_chunks) > 2 and "".join(text_chunks) == DEFAULT_REPLY
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == len(DEFAULT_REPLY.split())
    assert chunks[-1].usage.prompt_tokens == expected_in(stub.last)
    assert stub.last.json["stream"] is True and stub.last.json["stream_options"] == {"include_usage": True}


def test_chat_stream_without_usage(stub):
    chunks = list(oai(stub).chat.completions.create(model="gpt-4o", messages=USER, stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == DEFAULT_REPLY
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_stream_wire_is_chunked_one_event_per_chunk_ending_with_done(stub):
    body = json.dumps({"model": "m", "messages": USER, "stream": True}).encode()
    head, chunks = raw_request(stub.url, "POST", "/v1/chat/completions", body,
                               {"Content-Type": "application/json"})
    assert head.startswith(b"HTTP/1.1 200")
    assert b"content-type: text/event-stream" in head.lower()
    assert b"x-request-id: req_stub_1" in head.lower()
    payloads = [c for _, c in chunks]
    assert all(p.startswith(b"data: ") and p.endswith(b"\n\n") and p.count(b"\n\n") == 1
               for p in payloads)
    assert payloads[-1] == b"data: [DONE]\n\n"


# -- OpenAI Responses -------------------------------------------------------------------------

def test_responses_non_stream(stub):
    r = oai(stub).responses.create(model="gpt-4.1", input="Say hello", instructions="be brief")
    assert r.object == "response" and r.status == "completed" and r.id == "resp_stub1"
    assert r.output_text == DEFAULT_REPLY and r.model == "gpt-4.1"
    assert r.output[0].type == "message" and r.output[0].content[0].type == "output_text"
    assert r.usage.input_tokens == expected_in(stub.last)
    assert r.usage.output_tokens == len(DEFAULT_REPLY.split())
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.instructions == "be brief"
    assert stub.last.json["input"] == "Say hello"


def test_responses_stream_event_sequence(stub):
    events = list(oai(stub).responses.create(model="gpt-4.1", input="hi", stream=True))
    types = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert types == (["response.created", "response.in_progress", "response.output_item.added",
                      "response.content_part.added"]
                     + ["response.output_text.delta"] * len(deltas)
                     + ["response.output_text.done", "response.content_part.done",
                        "response.output_item.done", "response.completed"])
    assert len(deltas) > 2 and "".join(deltas) == DEFAULT_REPLY
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = events[-1].response
    assert done.status == "completed" and done.output_text == DEFAULT_REPLY
    assert done.usage.output_tokens == len(DEFAULT_REPLY.split())
    assert done.usage.input_tokens == expected_in(stub.last)


def test_responses_stream_helper_final_response(stub):
    stub.set_reply_text("alpha beta gamma delta")
    with oai(stub).responses.stream(model="gpt-4.1", input="hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas == ["alpha ", "beta ", "gamma ", "delta"]
    assert final.output_text == "alpha beta gamma delta" and final.usage.output_tokens == 4


def test_responses_wire_has_event_lines(stub):
    body = json.dumps({"model": "m", "input": "hi", "stream": True}).encode()
    _, chunks = raw_request(stub.url, "POST", "/v1/responses", body)
    first = chunks[0][1].decode()
    assert first.startswith("event: response.created\ndata: {")
    for _, payload in chunks:
        event_line, data_line, *_ = payload.decode().split("\n")
        assert event_line.removeprefix("event: ") == json.loads(data_line.removeprefix("data: "))["type"]


# -- Anthropic Messages -----------------------------------------------------------------------

def test_anthropic_messages_non_stream(stub):
    m = ant(stub).messages.create(model="claude-haiku-4-5", max_tokens=64, messages=USER)
    rec = stub.last
    assert m.id == "msg_stub1" and m.type == "message" and m.role == "assistant"
    assert m.model == "claude-haiku-4-5" and m.stop_reason == "end_turn"
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == DEFAULT_REPLY
    assert m.usage.input_tokens == expected_in(rec)
    assert m.usage.output_tokens == len(DEFAULT_REPLY.split())
    assert m._request_id == "req_stub_1"
    assert rec.path == "/v1/messages" and rec.json["max_tokens"] == 64
    assert "anthropic-version" in rec.headers
    # Older SDKs send the key as x-api-key, newer ones as a bearer token: either must arrive.
    assert rec.headers.get("x-api-key") == "k" or rec.headers.get("authorization") == "Bearer k"


def test_anthropic_stream_helper_and_final_message(stub):
    with ant(stub).messages.stream(model="claude-haiku-4-5", max_tokens=64, messages=USER) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 2 and "".join(pieces) == DEFAULT_REPLY
    assert final.id == "msg_stub1" and final.content[0].text == DEFAULT_REPLY
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == len(DEFAULT_REPLY.split())
    assert final.usage.input_tokens == expected_in(stub.last)


def test_anthropic_raw_stream_events(stub):
    events = list(ant(stub).messages.create(model="claude-haiku-4-5", max_tokens=64,
                                            messages=USER, stream=True))
    types = [e.type for e in events]
    n = types.count("content_block_delta")
    assert n > 2
    assert types == (["message_start", "content_block_start"] + ["content_block_delta"] * n
                     + ["content_block_stop", "message_delta", "message_stop"])
    assert events[0].message.id == "msg_stub1"
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == DEFAULT_REPLY
    assert events[-2].delta.stop_reason == "end_turn"
    assert events[-2].usage.output_tokens == len(DEFAULT_REPLY.split())


def test_anthropic_wire_includes_ping(stub):
    body = json.dumps({"model": "c", "max_tokens": 5, "messages": USER, "stream": True}).encode()
    head, chunks = raw_request(stub.url, "POST", "/v1/messages", body)
    assert b"request-id: req_stub_1" in head.lower()
    kinds = [p.decode().split("\n")[0].removeprefix("event: ") for _, p in chunks]
    assert kinds[:3] == ["message_start", "content_block_start", "ping"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]


# -- other endpoints --------------------------------------------------------------------------

def test_other_endpoints(stub):
    a, o = ant(stub), oai(stub)
    count = a.messages.count_tokens(model="claude-haiku-4-5", messages=USER)
    assert count.input_tokens == expected_in(stub.last)
    c = o.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hello")
    assert c.object == "text_completion" and c.choices[0].text == DEFAULT_REPLY
    assert c.usage.completion_tokens == len(DEFAULT_REPLY.split())
    # The SDK asks for base64 embeddings by default and decodes them itself (not strict-valid).
    e = oai(stub, strict=False).embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(e.data) == 2 and len(e.data[0].embedding) == 8 and e.usage.prompt_tokens >= 1
    assert e.data[0].embedding != e.data[1].embedding
    f = o.embeddings.create(model="text-embedding-3-small", input="a", encoding_format="float")
    assert f.data[0].embedding == pytest.approx(e.data[0].embedding, abs=1e-5)
    assert "gpt-4o-mini" in [m.id for m in o.models.list()]
    assert "claude-haiku-4-5" in [m.id for m in a.models.list()]
    echo = o.post("/anything/else?x=1", cast_to=object, body={})
    assert echo == {"path": "/v1/anything/else", "method": "POST"}
    assert stub.last.query == "x=1"


def test_legacy_completion_stream(stub):
    # The SDK types these chunks as Completion (finish_reason required), so not strict here.
    chunks = list(oai(stub, strict=False).completions.create(model="m", prompt="hi", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == DEFAULT_REPLY


# -- reply control ----------------------------------------------------------------------------

def test_set_stream_chunks_controls_pieces_exactly(stub):
    email = "write to alice@example.com now"
    pieces = [email[i:i + 3] for i in range(0, len(email), 3)]
    stub.set_stream_chunks(pieces)
    chunks = list(oai(stub).chat.completions.create(model="m", messages=USER, stream=True))
    got = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert got == pieces
    with ant(stub).messages.stream(model="c", max_tokens=5, messages=USER) as s:
        assert list(s.text_stream) == pieces
    assert oai(stub).chat.completions.create(model="m", messages=USER).choices[0].message.content == email
    stub.set_stream_chunks(None)
    assert oai(stub).responses.create(model="m", input="x").output_text == DEFAULT_REPLY


def test_script_reply_text_is_one_shot(stub):
    stub.script(reply_text="just once")
    o = oai(stub)
    first = o.chat.completions.create(model="m", messages=USER)
    assert first.choices[0].message.content == "just once" and first.usage.completion_tokens == 2
    assert o.chat.completions.create(model="m", messages=USER).choices[0].message.content == DEFAULT_REPLY


# -- scripted failures ------------------------------------------------------------------------

def test_script_503_then_default(stub):
    stub.script(status=503)
    o = oai(stub)
    with pytest.raises(openai.InternalServerError) as err:
        o.chat.completions.create(model="m", messages=USER)
    assert err.value.status_code == 503 and err.value.request_id == "req_stub_1"
    assert err.value.body["type"] == "server_error"
    assert o.chat.completions.create(model="m", messages=USER).choices[0].message.content == DEFAULT_REPLY
    assert stub.pending_scripts == 0


def test_script_503_is_retried_by_sdk(stub):
    stub.script(status=503, headers={"retry-after-ms": "5"})
    r = oai(stub, max_retries=2).chat.completions.create(model="m", messages=USER)
    assert r.choices[0].message.content == DEFAULT_REPLY
    assert len(stub.requests) == 2 and stub.requests[1].headers["x-stainless-retry-count"] == "1"


def test_script_error_in_anthropic_shape(stub):
    stub.script(status=529)
    with pytest.raises(anthropic.APIStatusError) as err:
        ant(stub).messages.create(model="c", max_tokens=5, messages=USER)
    assert err.value.status_code == 529
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "overloaded_error"


def test_script_custom_body_headers_and_path_filter(stub):
    stub.script(status=200, body={"custom": True}, headers={"x-extra": "1"}, path="/v1/embeddings")
    head, chunks = raw_request(stub.url, "POST", "/v1/chat/completions", b"{}")
    assert json.loads(chunks[0][1])["object"] == "chat.completion"  # filter: not consumed
    assert stub.pending_scripts == 1
    head, chunks = raw_request(stub.url, "POST", "/v1/embeddings", b"{}")
    assert json.loads(chunks[0][1]) == {"custom": True} and b"x-extra: 1" in head.lower()
    assert stub.pending_scripts == 0


def test_script_fifo_order(stub):
    stub.script(status=500)
    stub.script(status=429, times=2)
    statuses = [int(raw_request(stub.url, "GET", "/v1/models")[0].split()[1]) for _ in range(4)]
    assert statuses == [500, 429, 429, 200]


def test_script_delay(stub):
    stub.script(delay=0.3)
    t0 = time.monotonic()
    r = oai(stub).chat.completions.create(model="m", messages=USER)
    assert time.monotonic() - t0 >= 0.3 and r.choices[0].message.content == DEFAULT_REPLY


def test_script_hang_client_timeout_and_bounded_stop():
    stub = StubUpstream().start()
    try:
        stub.script(hang=True)
        t0 = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            oai(stub, timeout=0.3).chat.completions.create(model="m", messages=USER)
        assert time.monotonic() - t0 < 3
        assert stub.wait_for(lambda: stub.abandoned == 1, timeout=3)
        # A second hanging request still open when stop() is called.
        stub.script(hang=True)
        outcome = []

        def call():
            try:
                oai(stub, timeout=30).chat.completions.create(model="m", messages=USER)
                outcome.append("answered")
            except openai.APIConnectionError:
                outcome.append("dropped")

        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        assert stub.wait_for(lambda: len(stub.requests) == 2, timeout=3)
    finally:
        t0 = time.monotonic()
        stub.stop()
        stopped_in = time.monotonic() - t0
    worker.join(5)
    assert stopped_in < 2 and not worker.is_alive() and outcome == ["dropped"]


def test_close_mid_stream_openai(stub):
    stub.script(close_mid_stream=True)
    got = []
    with pytest.raises(openai.APIConnectionError):
        for c in oai(stub).chat.completions.create(model="m", messages=USER, stream=True):
            got.append(c.choices[0].delta.content or "")
    assert got and "".join(got) != DEFAULT_REPLY and DEFAULT_REPLY.startswith("".join(got))


def test_close_mid_stream_anthropic(stub):
    stub.script(close_mid_stream=True)
    got = []
    with pytest.raises(Exception) as err:  # the SDK surfaces the transport error unwrapped
        with ant(stub).messages.stream(model="c", max_tokens=5, messages=USER) as s:
            got.extend(s.text_stream)
    assert not isinstance(err.value, AssertionError)
    assert "".join(got) != DEFAULT_REPLY and DEFAULT_REPLY.startswith("".join(got))


def test_scripted_stream_events_arrive_one_by_one(stub):
    events = ["data: {\"a\":1}\n\n", b"data: {\"a\":2}\n\n", "data: [DONE]\n\n"]
    stub.script(stream_events=events, event_delay=0.15)
    head, chunks = raw_request(stub.url, "POST", "/v1/chat/completions", b"{}")
    assert b"text/event-stream" in head and [c for _, c in chunks] == [
        e if isinstance(e, bytes) else e.encode() for e in events]
    gaps = [b[0] - a[0] for a, b in zip(chunks, chunks[1:])]
    assert all(g >= 0.1 for g in gaps)


def test_client_going_away_mid_stream_is_counted(stub):
    stub.script(event_delay=0.05)
    sock = socket.create_connection(("127.0.0.1", int(stub.url.rsplit(":", 1)[1])), timeout=5)
    body = json.dumps({"model": "m", "messages": USER, "stream": True}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    sock.close()
    assert stub.wait_for(lambda: stub.disconnects == 1, timeout=3)
    stub.clear()
    list(oai(stub).chat.completions.create(model="m", messages=USER, stream=True))
    assert stub.disconnects == 0 and len(stub.requests) == 1


# -- recording ---------------------------------------------------------------------------------

def test_recording_query_headers_chunked_body_and_clear(stub):
    host, port = stub.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(b"POST /v1/x?beta=true&y=2 HTTP/1.1\r\nHost: h\r\nX-Api-Key: secret\r\n"
                 b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                 b"4\r\nnot \r\n4\r\njson\r\n0\r\n\r\n")
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    sock.close()
    assert data.startswith(b"HTTP/1.1 200")
    rec = stub.last
    assert (rec.method, rec.path, rec.query) == ("POST", "/v1/x", "beta=true&y=2")
    assert rec.headers["x-api-key"] == "secret" and rec.body == b"not json" and rec.json is None
    stub.clear()
    assert stub.requests == [] and stub.last is None


def test_keep_alive_and_request_ids(stub):
    import http.client
    host, port = stub.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    ids, socks = [], set()
    for _ in range(3):
        conn.request("GET", "/v1/models")
        resp = conn.getresponse()
        assert json.loads(resp.read())["object"] == "list" and not resp.will_close
        ids.append(resp.getheader("x-request-id"))
        socks.add(conn.sock.getsockname())
    conn.close()
    assert ids == ["req_stub_1", "req_stub_2", "req_stub_3"] and len(socks) == 1
