"""Charging what the upstream produced (SPEC §7, §9): clients that leave streams early, answers
without usage, write-ahead reservations across kill -9, ledger lines durable before the answer."""
import asyncio
import concurrent.futures
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import tokenomics
import tokenomics.config
import tokenomics.http.client
import tokenomics.http.server
import tokenomics.pipeline
import tokenomics.providers
import tokenomics.proxy
import tokenomics.records.fanout
import tokenomics.records.ledger
import tokenomics.store
import tokenomics.util
from tokenomics.limits.decide import BudgetLine
from tokenomics.limits.journal import UsageJournal
from tokenomics.limits.prices import Usage, charged_usage
from tokenomics.limits.state import MemoryState
from test_proxy import oa, raw

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 500}
WORD = "abcdefg "  # one stub "token" (a word) of 8 bytes: the proxy's own count (bytes / 4) is 2 per word
PIECES = [WORD] * 60
# Text pieces the stub sends before the first delta, per endpoint (role chunk; message_start,
# content_block_start, ping; created, in_progress, output_item.added, content_part.added).
HEAD_EVENTS = {"/v1/chat/completions": 1, "/v1/messages": 3, "/v1/responses": 4}
ENDPOINT_BODY = {
    "/v1/chat/completions": BODY,
    "/v1/messages": {"model": "claude-sonnet-4-5", "max_tokens": 500,
                     "messages": [{"role": "user", "content": "hello there"}]},
    "/v1/responses": {"model": "gpt-4.1", "input": "hello there", "max_output_tokens": 500},
}
DEADLINE = 10.0  # seconds any poll below waits at most


def poll(predicate, timeout: float = DEADLINE, interval: float = 0.02):
    """predicate() once truthy (returned), or its last value after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= end:
            return value
        time.sleep(interval)


def charged(data_dir: Path) -> int:
    """Tokens on the lifetime token counters, as the usage journal on disk holds them (snapshot +
    complete log lines), read without touching the files a running proxy owns."""
    seq, total = 0, 0
    snap = data_dir / "usage.journal.snapshot"
    if snap.exists():
        data = json.loads(snap.read_bytes())
        seq = data["seq"]
        total += sum(r[4] for r in data["counters"] if r[1] == "tokens" and r[2] == "total")
    log = data_dir / "usage.journal"
    raw_log = log.read_bytes() if log.exists() else b""
    for line in raw_log[:raw_log.rfind(b"\n") + 1].splitlines():
        rec = json.loads(line)
        if rec["s"] > seq:
            total += sum(r[4] for r in rec.get("d", ()) if r[1] == "tokens" and r[2] == "total")
    return total


def stub_input_tokens(stub) -> int:
    return max(1, math.ceil(len(stub.last.body) / 4))


def hang_up_after(proxy, token: str, path: str, body: dict, deltas: int = 3) -> bytes:
    """A raw-socket streaming client that reads until `deltas` text deltas arrived, then closes.
    A refusal (not 200) is read to its end and returned."""
    data = json.dumps({**body, "stream": True}).encode()
    auth = b"x-api-key: " + token.encode() if path == "/v1/messages" else b"Authorization: Bearer " + token.encode()
    got = b""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=DEADLINE) as s:
        s.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + auth
                  + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
        for _ in range(1000):  # bounded; each recv waits at most the socket timeout
            chunk = s.recv(65536)
            got += chunk
            if not chunk or got.count(WORD.strip().encode()) >= deltas:
                break
            head, sep, rest = got.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            if sep and not head.startswith(b"HTTP/1.1 200") and length and len(rest) >= int(length.group(1)):
                break
    return got


# --- clients that leave a stream early ------------------------------------------------------------

def test_sdk_client_closing_a_stream_early_is_charged_what_the_upstream_sent(cli, stub, start_proxy, data_dir):
    """The red-team case: read a few deltas, close before the usage chunk. Charged at least the
    upstream's input and every word it streamed before the proxy cancelled it."""
    token = cli.token({"budget": {"tokens": {"total": 1_000_000}}})
    proxy = start_proxy(upstream_url=stub.url)
    stub.event_delay = 0.03
    stub.set_stream_chunks(PIECES)
    stream = oa(proxy, token).chat.completions.create(**BODY, stream=True)
    seen = 0
    for chunk in stream:  # bounded by the stub's 60 pieces
        if chunk.choices and chunk.choices[0].delta.content:
            seen += 1
            if seen == 3:
                break
    stream.close()
    assert stub.wait_for(lambda: stub.disconnects >= 1, timeout=DEADLINE), "the upstream was not cancelled"
    words_sent = stub.events_sent - HEAD_EVENTS["/v1/chat/completions"]
    assert 3 <= words_sent < len(PIECES)
    spent = poll(lambda: charged(data_dir))
    assert spent >= stub_input_tokens(stub) + words_sent, (spent, words_sent)
    assert spent <= stub_input_tokens(stub) + 2 * len(PIECES)  # nothing made up beyond what was received


@pytest.mark.parametrize("path", sorted(HEAD_EVENTS))
def test_raw_client_leaving_a_stream_is_charged_in_every_dialect(cli, stub, start_proxy, data_dir, path):
    token = cli.token({"budget": {"tokens": {"total": 1_000_000}}})
    proxy = start_proxy(upstream_url=stub.url)
    stub.event_delay = 0.03
    stub.set_stream_chunks(PIECES)
    assert hang_up_after(proxy, token, path, ENDPOINT_BODY[path]).startswith(b"HTTP/1.1 200")
    assert stub.wait_for(lambda: stub.disconnects >= 1, timeout=DEADLINE), "the upstream was not cancelled"
    words_sent = stub.events_sent - HEAD_EVENTS[path]
    assert 3 <= words_sent < len(PIECES)
    spent = poll(lambda: charged(data_dir))
    assert spent >= stub_input_tokens(stub) + words_sent, (spent, words_sent)


def test_leaving_clients_cannot_spend_past_the_budget(cli, stub, start_proxy, data_dir):
    """Streams abandoned one after another: the budget runs out after what the upstream really
    sent, not after input estimates plus one token each (which would admit all 40)."""
    cap = 600
    token = cli.token({"budget": {"tokens": {"total": cap}}})
    proxy = start_proxy(upstream_url=stub.url)
    stub.event_delay = 0.02
    stub.set_stream_chunks(PIECES)
    real = 0
    for _ in range(40):  # bounded
        before_events, before_disc = stub.events_sent, stub.disconnects
        got = hang_up_after(proxy, token, "/v1/chat/completions", {**BODY, "max_tokens": 20}, deltas=3)
        if not got.startswith(b"HTTP/1.1 200"):
            assert got.startswith(b"HTTP/1.1 429") and b"budget_exceeded" in got, got[:300]
            break
        assert stub.wait_for(lambda: stub.disconnects > before_disc, timeout=DEADLINE)
        real += stub_input_tokens(stub) + max(0, stub.events_sent - before_events - 1)
        assert poll(lambda: charged(data_dir) >= real)
    else:
        pytest.fail("the budget never ran out")
    assert real <= cap + 60  # what was served stays within the cap, but for the last stream's overrun


def test_in_process_early_close_charges_the_usage_already_on_the_wire(tmp_path):
    """A client that closes after the first event, while the rest of the answer (usage included)
    has already arrived: the proxy reads what was sent and charges the upstream's own figure."""
    config = tokenomics.config.load_config(None, str(tmp_path), environ={})
    catalog = tokenomics.providers.Catalog(config, environ={})
    store = tokenomics.store.TokenStore(config, catalog, environ={})
    token, _ = store.create({"provider": "mock", "budget": {"tokens": {"total": 100000}}})
    line = BudgetLine(store.lookup(token).hash[:tokenomics.util.HASH_PREFIX], "tokens", "total", 100000)
    pipeline = tokenomics.pipeline.Pipeline(config, store, catalog, tokenomics.http.client.UpstreamClient(), environ={})
    body = json.dumps({"model": "mock-1", "stream": True, "max_tokens": 1000,  # the mock echoes the prompt
                       "messages": [{"role": "user", "content": "tell me a long story " * 40}]}).encode()

    def request():
        return tokenomics.http.server.Request("POST", "/v1/chat/completions", "", [(b"authorization", f"Bearer {token}".encode())],
                                  {"authorization": f"Bearer {token}"}, body)

    async def scenario():
        full = await pipeline(request())
        async for _ in full.stream:
            pass
        whole = pipeline.state.usage(line, time.time())[0]
        early = await pipeline(request())
        assert await early.stream.__anext__()
        await early.stream.aclose()
        return whole, pipeline.state.usage(line, time.time())

    whole, (used, held) = asyncio.run(scenario())
    assert whole > 0 and held == 0
    assert used == 2 * whole  # the early leaver paid exactly what the full reader paid


def test_in_process_stream_closed_before_its_first_byte_is_settled(tmp_path):
    """The client left before reading any of the answer: nothing reads the stream, yet the hold is
    settled (what the upstream reported, since its stream is taken in to the end) and the request
    is recorded, not held forever."""
    config = tokenomics.config.load_config(None, str(tmp_path), environ={})
    catalog = tokenomics.providers.Catalog(config, environ={})
    store = tokenomics.store.TokenStore(config, catalog, environ={})
    token, _ = store.create({"provider": "mock", "budget": {"tokens": {"total": 100000}}})
    line = BudgetLine(store.lookup(token).hash[:tokenomics.util.HASH_PREFIX], "tokens", "total", 100000)
    records = tokenomics.records.fanout.Records()
    pipeline = tokenomics.pipeline.Pipeline(config, store, catalog, tokenomics.http.client.UpstreamClient(), environ={}, records=records)
    body = json.dumps({"model": "mock-1", "stream": True, "max_tokens": 50,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = tokenomics.http.server.Request("POST", "/v1/chat/completions", "", [(b"authorization", f"Bearer {token}".encode())],
                             {"authorization": f"Bearer {token}"}, body)

    async def scenario():
        response = await pipeline(req)
        assert response.status == 200
        await response.stream.aclose()  # what the server does when the client is gone

    asyncio.run(scenario())
    used, held = pipeline.state.usage(line, time.time())
    assert held == 0 and used > 0
    assert records.totals.requests == 1



def _chunked_sse(payload: dict) -> bytes:
    data = b"data: " + json.dumps(payload).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


def _word_event(text: str) -> bytes:
    return _chunked_sse({"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini",
                         "choices": [{"index": 0, "delta": {"content": text}}]})


def test_in_process_words_that_arrived_while_the_loop_was_busy_are_charged(tmp_path):
    """The client left; while the proxy takes in what the upstream still sends, its event loop is
    busy for longer than STREAM_LEFT_READ and 20 more words arrive meanwhile. When the loop runs
    again the deadline has passed, but those words are in the proxy's socket: they are charged,
    not dropped with the connection (a timer firing first used to throw them away)."""
    go, sent, done = threading.Event(), threading.Event(), threading.Event()
    released: list = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(DEADLINE)

    def upstream():  # one raw HTTP/1.1 exchange: 3 words, then 20 more when told, then wait
        with listener, listener.accept()[0] as conn:
            conn.settimeout(DEADLINE)
            head = b""
            while b"\r\n\r\n" not in head:  # bounded by the socket timeout
                head += conn.recv(65536)
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            body = head.partition(b"\r\n\r\n")[2]
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                         + b"".join(_word_event(WORD) for _ in range(3)))
            released.append(go.wait(DEADLINE))   # False: the words would come before the client left
            conn.sendall(b"".join(_word_event(WORD) for _ in range(20)))
            sent.set()
            done.wait(DEADLINE)

    server = threading.Thread(target=upstream, daemon=True)
    server.start()
    config = tokenomics.config.load_config(None, str(tmp_path), environ={}, overrides={
        "server": {"upstream_url": f"http://127.0.0.1:{listener.getsockname()[1]}"}})
    catalog = tokenomics.providers.Catalog(config, environ={"OPENAI_API_KEY": "sk-test-key"})
    store = tokenomics.store.TokenStore(config, catalog, environ={})
    token, _ = store.create({"budget": {"tokens": {"total": 100000}}})
    line = BudgetLine(store.lookup(token).hash[:tokenomics.util.HASH_PREFIX], "tokens", "total", 100000)
    pipeline = tokenomics.pipeline.Pipeline(config, store, catalog, tokenomics.http.client.UpstreamClient(),
                                            environ={"OPENAI_API_KEY": "sk-test-key"})
    body = json.dumps({**BODY, "stream": True}).encode()
    req = tokenomics.http.server.Request("POST", "/v1/chat/completions", "", [(b"authorization", f"Bearer {token}".encode())],
                                         {"authorization": f"Bearer {token}"}, body)

    def busy_loop():  # the event loop is held while the upstream sends, past the read deadline
        go.set()
        assert sent.wait(DEADLINE)
        time.sleep(tokenomics.pipeline.STREAM_LEFT_READ * 2)

    async def scenario():
        response = await pipeline(req)
        assert response.status == 200
        seen = response.body or b""  # the first chunk, which leaves with the status line
        async for piece in response.stream:  # bounded: the upstream sent 3 words and waits
            seen += piece
            if seen.count(WORD.strip().encode()) >= 3:
                break
        asyncio.get_running_loop().call_soon(busy_loop)
        await response.stream.aclose()  # the client is gone

    try:
        asyncio.run(scenario())
    finally:
        done.set()
        server.join(DEADLINE)
    assert released == [True]   # the 20 words were sent after the client had left
    used, held = pipeline.state.usage(line, time.time())
    own_input = math.ceil(len(body) / 4)
    assert held == 0
    assert used >= own_input + 23 * math.ceil(len(WORD) / 4), used  # every word the upstream sent


# --- answers without usage ------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("path", sorted(HEAD_EVENTS))
def test_answers_without_usage_are_charged_the_proxys_own_count(cli, stub, start_proxy, data_dir, path, stream):
    token = cli.token({"budget": {"tokens": {"total": 1_000_000}}})
    proxy = start_proxy(upstream_url=stub.url)
    stub.set_stream_chunks(PIECES)
    stub.script(no_usage=True)
    headers = {"x-api-key": token} if path == "/v1/messages" else {"Authorization": f"Bearer {token}"}
    status, _, answer = raw(proxy, "POST", path, {**ENDPOINT_BODY[path], "stream": stream}, headers)
    assert status == 200 and b"usage\":{" not in answer.replace(b" ", b"")
    own_output = math.ceil(len(WORD) * len(PIECES) / 4)
    spent = poll(lambda: charged(data_dir))
    assert spent >= stub_input_tokens(stub) + own_output, spent
    assert spent <= stub_input_tokens(stub) + own_output + 16  # the own count, not a guess


# --- write-ahead reservations across kill -9 -------------------------------------------------------

@pytest.mark.subprocess_proxy
def test_requests_in_flight_at_kill_9_are_charged_in_full_after_restart(cli, stub, start_proxy, data_dir):
    body = json.dumps({**BODY, "max_tokens": 1000}).encode()
    hold = math.ceil(len(body) / 4) + 1000  # input estimate + output allowance
    cap = 3 * hold + 5
    token = cli.token({"budget": {"tokens": {"total": cap}}})
    proxy = start_proxy(upstream_url=stub.url)
    stub.script(hang=True, times=3)  # the upstream stalls: the three requests stay in flight

    def call():
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=DEADLINE)
        try:
            conn.request("POST", "/v1/chat/completions", body=body, headers={"Authorization": f"Bearer {token}"})
            return conn.getresponse().status
        except (OSError, http.client.HTTPException):
            return None  # the proxy died under it
        finally:
            conn.close()

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        calls = [pool.submit(call) for _ in range(3)]
        assert stub.wait_for(lambda: len(stub.requests) == 3, timeout=DEADLINE)
        proxy.stop(signal.SIGKILL)
        assert [c.result(DEADLINE) for c in calls] == [None] * 3
    proxy = start_proxy(upstream_url=stub.url)
    assert poll(lambda: "were in flight" in proxy.stderr, timeout=2), proxy.stderr  # and it says so
    status, _, answer = raw(proxy, "POST", "/v1/chat/completions", BODY, {"Authorization": f"Bearer {token}"})
    assert status == 429, answer
    message = json.loads(answer)["error"]["message"]
    assert f"used {3 * hold:,} of {cap:,}" in message, message
    assert charged(data_dir) == 3 * hold
    # a second restart counts nothing twice
    proxy.stop(signal.SIGKILL)
    proxy = start_proxy(upstream_url=stub.url)
    assert charged(data_dir) == 3 * hold


@pytest.mark.subprocess_proxy
def test_answered_requests_are_in_the_ledger_exactly_once_after_kill_9_and_restarts(cli, stub, start_proxy, data_dir):
    """Every answered request's ledger line survives a kill -9 (its usage journal line carried it),
    and restarting, twice, writes none of them again."""
    token = cli.token({"budget": {"tokens": {"total": 1_000_000}}})
    proxy = start_proxy(upstream_url=stub.url)
    ids = []
    for _ in range(5):
        status, headers, answer = raw(proxy, "POST", "/v1/chat/completions", BODY, {"Authorization": f"Bearer {token}"})
        assert status == 200, answer
        ids.append(headers["x-tokenomics-request-id"])
    proxy.stop(signal.SIGKILL)
    for _ in range(2):
        proxy = start_proxy(upstream_url=stub.url)
        proxy.stop(signal.SIGKILL)
        logged = [r["request_id"] for s in tokenomics.records.ledger.load_sessions(str(data_dir)) for r in s["requests"]]
        assert sorted(logged) == sorted(ids)


@pytest.mark.subprocess_proxy
def test_streams_cut_by_kill_9_leave_nothing_unbilled(cli, stub, start_proxy, data_dir):
    token = cli.token({"budget": {"tokens": {"total": 1_000_000}}})
    proxy = start_proxy(upstream_url=stub.url)
    stub.event_delay = 0.05
    stub.set_stream_chunks(PIECES)
    got = hang_up_after(proxy, token, "/v1/chat/completions", BODY, deltas=5)  # reads 5, then ...
    assert got.startswith(b"HTTP/1.1 200")
    proxy.stop(signal.SIGKILL)  # ... the proxy dies (the client's close may race it: either way)
    served_words = got.count(WORD.strip().encode())
    start_proxy(upstream_url=stub.url)
    assert charged(data_dir) >= stub_input_tokens(stub) + served_words


# --- the ledger line is on disk before the answer ---------------------------------------------------

@pytest.mark.subprocess_proxy
def test_kill_9_right_after_answers_loses_no_ledger_line(cli, stub, start_proxy, data_dir):
    token = cli.token({})
    proxy = start_proxy(upstream_url=stub.url)
    auth = {"Authorization": f"Bearer {token}"}
    ids = []
    for body in (BODY, {**BODY, "stream": True}, BODY):
        status, headers, _ = raw(proxy, "POST", "/v1/chat/completions", body, auth)
        assert status == 200
        ids.append(headers["x-tokenomics-request-id"])
    status, headers, _ = raw(proxy, "POST", "/v1/chat/completions", {**BODY, "model": 3}, auth)
    assert status == 400  # refusals are answered requests too
    ids.append(headers["x-tokenomics-request-id"])
    proxy.stop(signal.SIGKILL)
    rows = []
    for path in (data_dir / "sessions").glob("*.jsonl"):
        for line in path.read_bytes().splitlines():
            row = json.loads(line)
            if row.get("type") == "request":
                rows.append(row)
    assert [r["request_id"] for r in rows] == ids
    assert all(r["input_tokens"] > 0 for r in rows[:3])


# --- the arithmetic -------------------------------------------------------------------------------

counts = st.integers(0, 10**7)
usages = st.builds(Usage, counts, counts, counts, counts, counts)


@settings(max_examples=500, deadline=None)
@given(reported=usages, own_in=counts, own_out=counts, complete=st.booleans())
def test_charged_usage_is_the_report_or_the_larger_count_never_zero(reported, own_in, own_out, complete):
    got = charged_usage(reported, own_in, own_out, complete)
    assert got.total_tokens >= 1
    assert (got.cached_input_tokens, got.cache_creation_tokens, got.reasoning_tokens) == \
        (reported.cached_input_tokens, reported.cache_creation_tokens, reported.reasoning_tokens)
    if complete and reported.total_tokens:
        assert got == reported
    else:
        assert got.input_tokens == max(reported.input_tokens, own_in, 1)
        assert got.output_tokens == max(reported.output_tokens, own_out)
        assert got.total_tokens >= max(reported.total_tokens, own_in + own_out)


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.text(max_size=20), max_size=12))
def test_output_counts_every_text_of_every_dialect(pieces):
    size = sum(len(p.encode("utf-8", "replace")) for p in pieces)
    text = "".join(pieces)
    chat = {"id": "x", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": text, "refusal": None,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "", "arguments": text}}]}}]}
    messages = {"id": "x", "type": "message", "role": "assistant", "stop_reason": "end_turn",
                "content": [{"type": "thinking", "thinking": text, "signature": "sig" * 30},
                            {"type": "tool_use", "id": "t", "name": "", "input": {"q": text}}]}
    responses = {"id": "x", "object": "response", "status": "completed",
                 "output": [{"type": "reasoning", "id": "r", "encrypted_content": "e" * 90, "summary": []},
                            {"type": "message", "id": "m", "role": "assistant", "status": "completed",
                             "content": [{"type": "output_text", "text": text, "annotations": []}]}]}
    assert tokenomics.http.server.answer_output_bytes(chat) == 2 * size
    assert tokenomics.http.server.answer_output_bytes(messages) == 2 * size
    assert tokenomics.http.server.answer_output_bytes(responses) == size
    events = []
    for p in pieces:
        events += [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]},
                   {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": p}},
                   {"type": "response.function_call_arguments.delta", "item_id": "i", "delta": p}]
    events += [{"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}},
               {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": "stop"}]}]
    assert sum(tokenomics.http.server.event_output_bytes(e) for e in events) == 3 * size


TOTAL = BudgetLine("k", "tokens", "total", 10**12)
OPS = st.lists(st.one_of(
    st.tuples(st.just("reserve"), st.integers(1, 5000)),
    st.tuples(st.just("settle"), st.integers(0, 50), st.integers(0, 9000)),
    st.tuples(st.just("release"), st.integers(0, 50)),
    st.tuples(st.just("commit")), st.tuples(st.just("compact")), st.tuples(st.just("write_ahead"))), max_size=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_a_crash_charges_settled_usage_and_open_reservations_exactly_once(ops):
    """Whatever was durable at the crash (the last commit or compaction): settled usage, plus the
    full hold of every reservation opened and not settled by then; nothing twice on a second start."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "usage.journal")
        j, s = UsageJournal(path, compact_bytes=400), MemoryState()
        j.replay(s)
        open_, used, durable, durable_open, durable_holds = [], 0, 0, 0, 0
        for op in ops:
            if op[0] == "reserve":
                open_.append(s.reserve([TOTAL], op[1], 0.0, 0.0)[0])
            elif op[0] in ("settle", "release") and open_:
                res = open_.pop(op[1] % len(open_))
                if op[0] == "settle":
                    s.settle(res, op[2], 0.0, 0.0)
                    used += op[2]
                else:
                    s.release(res)
            elif op[0] in ("commit", "compact", "write_ahead"):  # a kill -9 keeps written lines too
                {"commit": j.commit, "compact": j.compact, "write_ahead": j.write_ahead}[op[0]](s)
                durable, durable_open = used, len(open_)
                durable_holds = sum(r.tokens for r in open_)
        expected = durable + durable_holds  # the files as a kill -9 leaves them: no close()
        crashed = os.path.join(tmp, "after")
        os.mkdir(crashed)
        for name in os.listdir(tmp):
            if name.startswith("usage.journal"):
                shutil.copy(os.path.join(tmp, name), crashed)
        for attempt in range(2):  # the first start charges the orphans; the second must not again
            j2, s2 = UsageJournal(os.path.join(crashed, "usage.journal")), MemoryState()
            j2.replay(s2)
            assert s2.usage(TOTAL, 0.0) == (expected, 0), attempt
            assert j2.charged_in_flight[0] == (durable_open if attempt == 0 else 0)
            j2.close()
        j.close()


def test_reservation_opened_and_settled_in_one_batch_writes_only_its_usage(tmp_path):
    j, s = UsageJournal(tmp_path / "usage.journal"), MemoryState()
    j.replay(s)
    res, _ = s.reserve([TOTAL], 100, 0.0, 0.0)
    s.settle(res, 40, 0.0, 0.0)
    j.commit(s)
    (line,) = _log_lines(tmp_path / "usage.journal")
    assert json.loads(line) == {"s": 1, "d": [["k", "tokens", "total", 0.0, 40]]}
    res, _ = s.reserve([TOTAL], 100, 0.0, 0.0)
    j.commit(s)  # write-ahead: the open reservation is on disk ...
    s.release(res)
    j.commit(s)  # ... and so is its release: it will not be charged after a crash
    recs = [json.loads(x) for x in _log_lines(tmp_path / "usage.journal")]
    assert recs[1]["o"] == [[res.id, [["k", "tokens", "total", 0.0, 100]]]] and recs[2]["c"] == [res.id]
    s2 = MemoryState()
    UsageJournal(tmp_path / "usage.journal").replay(s2)
    assert s2.usage(TOTAL, 0.0) == (40, 0)


def _log_lines(path) -> list:
    """The usage journal's lines (the log ends where the zeros written ahead of it start)."""
    return Path(path).read_bytes().partition(b"\0")[0].splitlines()


def _count_syncs(monkeypatch) -> list:
    """The fds fsync'ed or fdatasync'ed from now on, in order."""
    synced: list = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda fd, real=real: (synced.append(fd), real(fd))[1])
    return synced


def test_a_reservation_written_ahead_is_charged_after_a_kill_and_fsynced_with_its_settlement(tmp_path, monkeypatch):
    """write_ahead() puts the open reservation in the file without an fsync (a kill -9 keeps it:
    the kernel has the bytes); the settlement's commit fsyncs both at once: one fsync a request."""
    synced = _count_syncs(monkeypatch)
    j, s = UsageJournal(tmp_path / "usage.journal"), MemoryState()
    j.replay(s)
    res, _ = s.reserve([TOTAL], 100, 0.0, 0.0)
    j.write_ahead(s)
    assert synced == [] and j.needs_commit(s)
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copy(tmp_path / "usage.journal", crashed)  # what a kill -9 leaves
    s2 = MemoryState()
    UsageJournal(crashed / "usage.journal").replay(s2)
    assert s2.usage(TOTAL, 0.0) == (100, 0)  # charged in full
    s.settle(res, 40, 0.0, 0.0)
    j.commit(s)
    assert synced.count(j._fd) == 1 and not j.needs_commit(s)
    j.commit(s)
    assert synced.count(j._fd) == 1  # nothing new: no fsync
    s3 = MemoryState()
    UsageJournal(tmp_path / "usage.journal").replay(s3)
    assert s3.usage(TOTAL, 0.0) == (40, 0)


def _in_process_setup(data_dir):
    """A pipeline over a usage journal and a session ledger in `data_dir`, with one mock token."""
    config = tokenomics.config.load_config(None, str(data_dir), environ={})
    catalog = tokenomics.providers.Catalog(config, environ={})
    store = tokenomics.store.TokenStore(config, catalog, environ={})
    token, _ = store.create({"provider": "mock", "budget": {"tokens": {"total": 100000}}})
    state, journal = MemoryState(), UsageJournal(data_dir / "usage.journal")
    journal.replay(state)
    ledger = tokenomics.records.ledger.Ledger(str(data_dir), cwd=str(data_dir))
    records = tokenomics.records.fanout.Records(ledger)
    pipeline = tokenomics.pipeline.Pipeline(config, store, catalog, tokenomics.http.client.UpstreamClient(),
                                            state=state, journal=journal, environ={}, records=records)
    body = json.dumps({"model": "mock-1", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = tokenomics.http.server.Request("POST", "/v1/chat/completions", "", [(b"authorization", f"Bearer {token}".encode())],
                                         {"authorization": f"Bearer {token}"}, body)
    return pipeline, journal, ledger, req


def _ledger_ids(path) -> list:
    return [json.loads(line)["request_id"] for line in Path(path).read_bytes().splitlines()
            if line.startswith(b'{"type":"request"')]


def test_a_governed_request_costs_one_durable_write(tmp_path, monkeypatch):
    """Reservation, settlement and ledger line of one request: one fsync in all, of the usage
    journal, whose line carries the ledger line; the ledger's own file is written (not
    fsync'ed) before the answer is handed back."""
    pipeline, journal, ledger, req = _in_process_setup(tmp_path)
    synced = _count_syncs(monkeypatch)
    ids = []

    async def scenario():
        for _ in range(2):
            response = await pipeline(req)
            assert response.status == 200
            assert not journal.needs_commit(state) and not ledger.has_pending()  # durable before the answer
            ids.append(dict(response.headers)["x-tokenomics-request-id"])
            assert _ledger_ids(ledger.journal_path) == ids   # in the ledger's file already

    state = pipeline.state
    asyncio.run(scenario())
    assert synced == [journal._fd] * 2
    lines = [json.loads(x) for x in _log_lines(tmp_path / "usage.journal")]
    assert [sorted(x) for x in lines] == [["o", "s"], ["c", "d", "s", "x"]] * 2
    name, _, text = lines[1]["x"]
    assert name == os.path.basename(ledger.journal_path) and json.loads(text)["request_id"] == ids[0]
    ledger_fd = ledger._fd
    ledger.close()
    assert synced[2] == ledger_fd   # the lines handed over are fsync'ed at close (then the summary's files)
    journal.close()


@pytest.mark.parametrize("kill_at", ["before the ledger write", "after the ledger write"])
def test_a_kill_around_the_ledger_write_keeps_the_answered_request_exactly_once(tmp_path, monkeypatch, kill_at):
    """What a kill -9 leaves right after the usage journal's commit (before the ledger line is
    written to its own file) or right after the ledger write: the restarted proxy's ledger holds
    the answered request once, whichever it was; a second restart adds nothing."""
    live, crashed = tmp_path / "live", tmp_path / "crashed"
    live.mkdir()
    pipeline, journal, ledger, req = _in_process_setup(live)
    real_commit, real_write = UsageJournal.commit, tokenomics.records.ledger.Ledger._write
    kill = {"armed": False}

    def snapshot():
        if kill["armed"]:
            kill["armed"] = False
            shutil.copytree(live, crashed)   # the files as a kill -9 at this instant leaves them

    def commit(self, *args, **kwargs):
        real_commit(self, *args, **kwargs)
        if kill_at == "before the ledger write":
            snapshot()

    def write(self, data):
        real_write(self, data)
        if kill_at == "after the ledger write":
            snapshot()
    monkeypatch.setattr(UsageJournal, "commit", commit)
    monkeypatch.setattr(tokenomics.records.ledger.Ledger, "_write", write)

    async def scenario():
        first = await pipeline(req)          # an earlier request, already in the ledger's file
        kill["armed"] = True
        second = await pipeline(req)
        return [dict(r.headers)["x-tokenomics-request-id"] for r in (first, second)]

    ids = asyncio.run(scenario())
    assert crashed.exists()
    ledger_file = crashed / "sessions" / os.path.basename(ledger.journal_path)
    before = _ledger_ids(ledger_file)
    assert before == (ids[:1] if kill_at == "before the ledger write" else ids)
    monkeypatch.undo()
    for _ in range(2):   # restart, then restart again
        config = tokenomics.config.load_config(None, str(crashed), environ={})
        state, restarted = tokenomics.proxy.build_state(config)
        restarted.close()
        assert _ledger_ids(ledger_file) == ids
    (session,) = [s for s in tokenomics.records.ledger.load_sessions(str(crashed))
                  if s["session_id"] == ledger.session_id]
    assert [r["request_id"] for r in session["requests"]] == ids
    ledger.close()
    journal.close()


def test_the_journal_forgets_carried_ledger_lines_only_once_the_ledger_has_fsynced_them(tmp_path, monkeypatch):
    """Compaction truncates the usage journal's log, and the ledger lines it carried with it:
    the ledger file is fsync'ed first. While the ledger cannot write, the log keeps them (no
    compaction), and each is carried once, not again with every commit until written (the log
    would grow with the square of the answers); a restart then finds each once."""
    pipeline, journal, ledger, req = _in_process_setup(tmp_path)
    journal.compact_bytes = 1   # compact after every commit that may
    synced = _count_syncs(monkeypatch)
    ledger_fd, journal_fd = ledger._fd, journal._fd

    async def one() -> str:
        response = await pipeline(req)
        assert response.status == 200
        return dict(response.headers)["x-tokenomics-request-id"]

    ids = [asyncio.run(one())]
    assert synced[:2] == [journal_fd, ledger_fd] and synced[-1] == journal_fd   # ledger, then truncation
    assert (tmp_path / "usage.journal").stat().st_size == 0
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        ledger._fd = full   # every ledger write fails with ENOSPC
        ids += [asyncio.run(one()), asyncio.run(one())]
    finally:
        ledger._fd = ledger_fd
        os.close(full)
    carried = [json.loads(x).get("x") for x in _log_lines(tmp_path / "usage.journal")]
    assert [[json.loads(x)["request_id"] for x in c[2].splitlines()] for c in carried if c] == \
        [ids[1:2], ids[2:3]]   # kept, each carried once
    assert _ledger_ids(ledger.journal_path) == ids[:1]
    ids.append(asyncio.run(one()))   # the ledger writes again: all three lines, then compaction
    assert _ledger_ids(ledger.journal_path) == ids
    assert (tmp_path / "usage.journal").stat().st_size == 0
    journal.close()
    config = tokenomics.config.load_config(None, str(tmp_path), environ={})
    tokenomics.proxy.build_state(config)[1].close()
    assert _ledger_ids(ledger.journal_path) == ids
    ledger.close()


def test_restore_carried_truncates_a_torn_tail_and_skips_what_it_cannot_read(tmp_path):
    """A ledger line torn by the crash is cut off before the restored lines go after it; carried
    items of the wrong shape or naming another file than a session journal are ignored."""
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    name = "2026-12-04_0123abcd.jsonl"
    kept = b'{"type":"request","request_id":"req_a","model":"m"}\n'
    (sessions / name).write_bytes(b'{"type":"session","session_id":"0123abcd"}\n' + kept + b'{"type":"requ')
    carried = [[name, 10, kept.decode() + '{"type":"request","request_id":"req_b","model":"m"}\n'],
               ["../../etc/passwd", 0, '{"type":"request","request_id":"req_x"}\n'], "junk", [name, -1, "x"]]
    restore = tokenomics.records.ledger.restore_carried
    assert restore(str(tmp_path), carried) == 1
    assert _ledger_ids(sessions / name) == ["req_a", "req_b"]
    assert (sessions / name).read_bytes().endswith(b'"req_b","model":"m"}\n')
    assert restore(str(tmp_path), carried) == 0
    assert not (tmp_path / "etc").exists()


def test_in_process_cancelled_request_is_no_longer_in_flight(tmp_path):
    """A request cancelled while its upstream is still answering (the client left) stops counting
    as in flight: a later request alone then commits its journal on the loop, and /metrics'
    in-flight gauge returns to 0."""
    config = tokenomics.config.load_config(None, str(tmp_path), environ={})
    catalog = tokenomics.providers.Catalog(config, environ={})
    store = tokenomics.store.TokenStore(config, catalog, environ={})
    token, _ = store.create({"upstream_url": "http://127.0.0.1:9/v1", "budget": {"tokens": {"total": 100000}}})

    class Stalled:   # an upstream that never answers
        speaks_every_dialect, serves_passthrough = False, True

        async def send(self, call):
            await asyncio.Event().wait()

        def close(self):
            pass

    records = tokenomics.records.fanout.Records()
    pipeline = tokenomics.pipeline.Pipeline(config, store, catalog, tokenomics.http.client.UpstreamClient(),
                                            environ={"OPENAI_API_KEY": "sk-test"}, records=records,
                                            upstreams={"http": Stalled()})
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = tokenomics.http.server.Request("POST", "/v1/chat/completions", "", [(b"authorization", f"Bearer {token}".encode())],
                                         {"authorization": f"Bearer {token}"}, body)

    async def scenario():
        task = asyncio.ensure_future(pipeline(req))
        for _ in range(100):          # until the request is waiting on the upstream
            await asyncio.sleep(0)
            if pipeline._in_flight:
                break
        assert pipeline._in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert pipeline._in_flight == 0
    assert records.metrics._in_flight == 0
