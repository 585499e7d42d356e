"""Budgets, output caps and rate limits end to end: SDKs -> proxy -> recording stub."""
import asyncio
import concurrent.futures
import json
import signal

import openai
import pytest

import tokenomics
import tokenomics.config
import tokenomics.http.client
import tokenomics.http.server
import tokenomics.pipeline
import tokenomics.providers
import tokenomics.store
from test_proxy import oa, raw

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 10}


def unit_usage(cli, stub, start_proxy) -> int:
    """Tokens the stub reports for BODY (input = ceil(bytes/4), output = words of the reply)."""
    token = cli.token({})
    proxy = start_proxy(upstream_url=stub.url)
    used = oa(proxy, token).chat.completions.create(**BODY).usage.total_tokens
    proxy.stop()
    stub.clear()
    return used


def test_budget_runs_out_with_429(cli, stub, start_proxy):
    token = cli.token({"budget": {"tokens": {"daily": 100}}})
    proxy = start_proxy(upstream_url=stub.url)
    client = oa(proxy, token)
    spent = 0
    for _ in range(20):
        try:
            spent += client.chat.completions.create(**BODY).usage.total_tokens
        except openai.RateLimitError as exc:
            assert exc.body["code"] == "budget_exceeded"
            assert exc.response.headers["x-tokenomics-error-code"] == "budget_exceeded"
            assert "daily" in exc.body["message"]
            break
    else:
        pytest.fail("the budget never ran out")
    assert 0 < spent <= 100


def test_concurrent_requests_never_overrun_the_budget(cli, stub, start_proxy):
    proxy = start_proxy(upstream_url=stub.url)
    stub.event_delay = 0.0
    for round_ in range(5):
        token = cli.token({"max_tokens": 130})  # about five requests of ~25 tokens
        stub.script(delay=0.3, times=20)
        client = oa(proxy, token)

        def call(_):
            try:
                return client.chat.completions.create(**BODY).usage.total_tokens
            except openai.RateLimitError as exc:
                assert exc.body["code"] == "budget_exceeded"
                return 0

        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            used = list(pool.map(call, range(20)))
        stub.reset()
        ok = [u for u in used if u]
        assert sum(ok) <= 130, f"round {round_}: overshoot {sum(ok) - 130}"
        assert 3 <= len(ok) <= 6, used


def test_lowered_output_cap_reaches_upstream(cli, stub, start_proxy):
    token = cli.token({"max_output_tokens": 50, "budget": {"tokens": {"total": 1000}}})
    proxy = start_proxy(upstream_url=stub.url)
    client = oa(proxy, token)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert stub.last.json["max_completion_tokens"] == 50
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}],
                                   max_tokens=4000)
    assert stub.last.json["max_tokens"] == 50
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}],
                                   max_tokens=20)
    assert stub.last.json["max_tokens"] == 20


def test_budget_remainder_lowers_the_cap(cli, stub, start_proxy):
    token = cli.token({"budget": {"tokens": {"total": 60}}})
    proxy = start_proxy(upstream_url=stub.url)
    client = oa(proxy, token)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}],
                                   max_tokens=1000)
    assert 0 < stub.last.json["max_tokens"] < 60
    assert stub.last.json["max_tokens"] < 1000


def test_anthropic_and_responses_caps(cli, stub, start_proxy):
    token = cli.token({"max_output_tokens": 33})
    proxy = start_proxy(upstream_url=stub.url)
    status, _, _ = raw(proxy, "POST", "/v1/messages", {
        "model": "claude-sonnet-4-6", "max_tokens": 500, "messages": [{"role": "user", "content": "x"}]},
        {"x-api-key": token})
    assert status == 200 and stub.last.json["max_tokens"] == 33
    oa(proxy, token).responses.create(model="gpt-4.1", input="x")
    assert stub.last.json["max_output_tokens"] == 33


def test_include_usage_added_upstream_and_hidden_from_client(cli, stub, start_proxy):
    token = cli.token({})
    proxy = start_proxy(upstream_url=stub.url)
    status, _, body = raw(proxy, "POST", "/v1/chat/completions", {**BODY, "stream": True},
                          {"Authorization": f"Bearer {token}"})
    assert status == 200
    assert stub.last.json["stream_options"] == {"include_usage": True}
    events = [json.loads(line[6:]) for line in body.decode().splitlines()
              if line.startswith("data: {")]
    assert events and all(e["choices"] for e in events)
    assert all("usage" not in e or e["usage"] is None for e in events)
    assert body.decode().rstrip().endswith("data: [DONE]")
    # a client that asked for usage still gets it
    stream = oa(proxy, token).chat.completions.create(**BODY, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


def test_streamed_usage_is_charged(cli, stub, start_proxy):
    token = cli.token({"budget": {"tokens": {"total": 100}}})
    proxy = start_proxy(upstream_url=stub.url)
    client = oa(proxy, token)
    streamed = 0
    for _ in range(20):
        try:
            list(client.chat.completions.create(**BODY, stream=True))
            streamed += 1
        except openai.RateLimitError as exc:
            assert exc.body["code"] == "budget_exceeded"
            break
    assert 1 <= streamed <= 4  # each stream was charged its reported usage (~25 tokens)


def test_rate_limit_three_per_minute(cli, stub, start_proxy):
    token = cli.token({"rate_limit": {"rules": [{"requests": 3, "window": "1m"}]}})
    proxy = start_proxy(upstream_url=stub.url)
    client = oa(proxy, token)
    for _ in range(3):
        client.chat.completions.create(**BODY)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(**BODY)
    assert info.value.body["code"] == "rate_limited"
    retry_after = int(info.value.response.headers["retry-after"])
    assert 1 <= retry_after <= 60
    assert len(stub.requests) == 3


def test_max_parallel_one(cli, stub, start_proxy):
    token = cli.token({"rate_limit": {"max_parallel": 1}})
    proxy = start_proxy(upstream_url=stub.url)
    stub.script(delay=1.0)
    client = oa(proxy, token)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(client.chat.completions.create, **BODY)
        assert stub.wait_for(lambda: stub.requests, timeout=5)
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(**BODY)
        assert info.value.body["code"] == "rate_limited"
        assert info.value.response.headers["retry-after"]
        assert slow.result(10).choices[0].message.content
    client.chat.completions.create(**BODY)  # the slot is free again


@pytest.mark.subprocess_proxy
@pytest.mark.parametrize("how", ["graceful", "kill -9"])
def test_budget_survives_restart(cli, stub, start_proxy, how):
    u = unit_usage(cli, stub, start_proxy)
    token = cli.token({"budget": {"tokens": {"total": 2 * u + u // 2}}})
    proxy = start_proxy(upstream_url=stub.url)
    client = oa(proxy, token)
    client.chat.completions.create(**BODY)
    client.chat.completions.create(**BODY)
    if how == "graceful":
        assert proxy.stop(signal.SIGTERM) == 0
    else:
        proxy.stop(signal.SIGKILL)
    proxy = start_proxy(upstream_url=stub.url)
    with pytest.raises(openai.RateLimitError) as info:
        oa(proxy, token).chat.completions.create(**BODY)
    assert info.value.body["code"] == "budget_exceeded"


# --- in-process, with an injected clock: the daily window resets at UTC midnight ----------------

def test_daily_budget_resets_at_utc_midnight(tmp_path):
    config = tokenomics.config.load_config(None, str(tmp_path), environ={})
    catalog = tokenomics.providers.Catalog(config, environ={})
    store = tokenomics.store.TokenStore(config, catalog, environ={})
    token, _ = store.create({"provider": "mock", "budget": {"tokens": {"daily": 60}}})
    now = [1795910400.0 - 120]  # 2026-11-28T23:58:00Z
    pipeline = tokenomics.pipeline.Pipeline(config, store, catalog, tokenomics.http.client.UpstreamClient(), environ={},
                                   clock=lambda: now[0])

    def call():
        body = json.dumps({"model": "mock-1", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
        req = tokenomics.http.server.Request("POST", "/v1/chat/completions", "", [(b"authorization", f"Bearer {token}".encode())],
                                 {"authorization": f"Bearer {token}"}, body.encode())
        return asyncio.run(pipeline(req))

    statuses = [call().status for _ in range(6)]
    assert statuses[0] == 200 and statuses[-1] == 429
    assert json.loads(call().body)["error"]["code"] == "budget_exceeded"
    now[0] += 119  # 23:59:59 — still the same day
    assert call().status == 429
    now[0] += 1    # 00:00:00 UTC — a new day
    assert call().status == 200


def test_abandoned_stream_is_charged_what_was_surely_spent(cli, stub, start_proxy):
    from test_proxy import stream_then_hang_up
    token = cli.token({"budget": {"tokens": {"total": 100000}}})
    proxy = start_proxy(upstream_url=stub.url)
    stream_then_hang_up(proxy, token, BODY, stub)
    assert proxy.stop() == 0
    sessions = json.loads(cli("ledger", "sessions", "--json", check=True).stdout)
    entry = json.loads(cli("ledger", "show", sessions[-1]["session_id"], "--json", check=True).stdout)["requests"][0]
    assert entry["stream"] is True
    assert entry["input_tokens"] >= len(json.dumps(BODY)) // 4 and entry["output_tokens"] >= 1
