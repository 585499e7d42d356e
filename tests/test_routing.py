"""Routing across providers end to end: an OpenAI-SDK client reaching an Anthropic-dialect upstream and
an Anthropic-SDK client reaching an OpenAI-dialect upstream, through real sockets and the real SDKs."""
import json

import openai
import pytest

from conftest import ANTHROPIC_KEY, OPENAI_KEY
from stub_upstream import DEFAULT_REPLY
from test_proxy import an, assert_token_never_upstream, oa, raw


@pytest.fixture
def routed(cli, stub, start_proxy):
    token = cli.token({"providers": {
        "anthropic": [{"model_regex": "^claude", "upstream_url": stub.url}],
        "openai": [{"model_regex": "^gpt", "upstream_url": stub.url}]}})
    return start_proxy(), token


def test_openai_sdk_to_claude_non_stream(routed, stub):
    proxy, token = routed
    out = oa(proxy, token).chat.completions.create(
        model="claude-sonnet-4-6", messages=[{"role": "system", "content": "be terse"},
                                             {"role": "user", "content": "hello"}])
    assert out.choices[0].message.content == DEFAULT_REPLY
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens > 0 and out.usage.completion_tokens > 0
    rec = stub.last
    assert rec.path == "/v1/messages"
    assert rec.json["system"] == "be terse"
    assert rec.json["messages"] == [{"role": "user", "content": "hello"}]
    assert isinstance(rec.json["max_tokens"], int) and rec.json["max_tokens"] > 0
    assert rec.headers["x-api-key"] == ANTHROPIC_KEY
    assert rec.headers["anthropic-version"]
    assert "authorization" not in rec.headers
    assert_token_never_upstream(stub, token)


def test_openai_sdk_to_claude_stream(routed, stub):
    proxy, token = routed
    stub.set_stream_chunks(["Hel", "lo ", "world"])
    stream = oa(proxy, token).chat.completions.create(
        model="claude-sonnet-4-6", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello world"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert stub.last.path == "/v1/messages" and stub.last.json["stream"] is True


def test_openai_sdk_tool_call_through_claude(routed, stub):
    proxy, token = routed
    stub.script(body={"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-6",
                      "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                   "input": {"city": "Paris"}}],
                      "stop_reason": "tool_use", "stop_sequence": None,
                      "usage": {"input_tokens": 10, "output_tokens": 5}})
    out = oa(proxy, token).chat.completions.create(
        model="claude-sonnet-4-6", messages=[{"role": "user", "content": "weather?"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}}}}])
    call = out.choices[0].message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert out.choices[0].finish_reason == "tool_calls"
    assert stub.last.json["tools"][0]["name"] == "get_weather"
    assert stub.last.json["tools"][0]["input_schema"]["properties"]["city"]["type"] == "string"


def test_anthropic_sdk_to_openai_model(routed, stub):
    proxy, token = routed
    msg = an(proxy, token).messages.create(model="gpt-4o", max_tokens=100, system="be terse",
                                           messages=[{"role": "user", "content": "hello"}])
    assert msg.content[0].text == DEFAULT_REPLY
    assert msg.stop_reason == "end_turn"
    assert msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0
    rec = stub.last
    assert rec.path == "/v1/chat/completions"
    assert rec.json["messages"][0] == {"role": "system", "content": "be terse"}
    assert rec.json["max_completion_tokens"] == 100
    assert rec.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert not any(h.startswith("anthropic-") for h in rec.headers)
    assert_token_never_upstream(stub, token)


def test_anthropic_sdk_stream_to_openai_model(routed, stub):
    proxy, token = routed
    stub.set_stream_chunks(["one ", "two"])
    with an(proxy, token).messages.stream(model="gpt-4o", max_tokens=50,
                                          messages=[{"role": "user", "content": "count"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "one two"
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0
    assert stub.last.json["stream"] is True
    assert stub.last.json["stream_options"] == {"include_usage": True}


def test_translated_upstream_error_keeps_client_dialect(routed, stub):
    proxy, token = routed
    stub.script(status=400, body={"type": "error", "error": {"type": "invalid_request_error",
                                                              "message": "bad thing"}})
    with pytest.raises(openai.BadRequestError) as info:
        oa(proxy, token).chat.completions.create(model="claude-sonnet-4-6",
                                                 messages=[{"role": "user", "content": "x"}])
    assert info.value.body["message"] == "bad thing"


def test_unsupported_feature_is_a_clear_400(routed, stub):
    proxy, token = routed
    with pytest.raises(openai.BadRequestError) as info:
        oa(proxy, token).chat.completions.create(model="claude-sonnet-4-6", n=2,
                                                 messages=[{"role": "user", "content": "x"}])
    assert "n" in info.value.body["message"]
    assert not stub.requests


def test_responses_to_anthropic_provider_is_refused(routed, stub):
    proxy, token = routed
    status, headers, body = raw(proxy, "POST", "/v1/responses", {"model": "claude-sonnet-4-6", "input": "x"},
                                {"Authorization": f"Bearer {token}"})
    assert status == 400 and headers["x-tokenomics-error-code"] == "invalid_request"
    assert not stub.requests


# --- retries, fallbacks, Azure, provider metadata, provider test -------------------------------

BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def test_two_503s_then_success_with_max_retries_2(cli, stub, start_proxy):
    token = cli.token({"retry": {"max_retries": 2, "backoff": 0.01}})
    proxy = start_proxy(upstream_url=stub.url)
    stub.script(status=503, times=2)
    out = oa(proxy, token).chat.completions.create(**BODY)
    assert out.choices[0].message.content == DEFAULT_REPLY
    assert len(stub.requests) == 3


def test_retries_exhausted_pass_the_upstream_error_through(cli, stub, start_proxy):
    token = cli.token({"retry": {"max_retries": 1, "backoff": 0.01}})
    proxy = start_proxy(upstream_url=stub.url)
    stub.script(status=503, times=5)
    with pytest.raises(openai.InternalServerError) as info:
        oa(proxy, token).chat.completions.create(**BODY)
    assert info.value.status_code == 503
    assert len(stub.requests) == 2


def test_no_retry_on_a_400(cli, stub, start_proxy):
    token = cli.token({"retry": {"max_retries": 3, "backoff": 0.01}})
    proxy = start_proxy(upstream_url=stub.url)
    stub.script(status=400)
    with pytest.raises(openai.BadRequestError):
        oa(proxy, token).chat.completions.create(**BODY)
    assert len(stub.requests) == 1


def test_failing_primary_falls_back_and_header_names_the_fallback(cli, stub, start_proxy):
    token = cli.token({"retry": {"max_retries": 1, "backoff": 0.01, "fallbacks": ["gpt-4o-mini"]}})
    proxy = start_proxy(upstream_url=stub.url)
    stub.script(status=503, times=2)
    resp = oa(proxy, token).chat.completions.with_raw_response.create(**BODY)
    assert resp.headers["x-tokenomics-model"] == "gpt-4o-mini"
    assert [r.json["model"] for r in stub.requests] == ["gpt-4o", "gpt-4o", "gpt-4o-mini"]
    assert resp.parse().choices[0].message.content == DEFAULT_REPLY


def test_fallback_to_another_provider(cli, stub, start_proxy):
    token = cli.token({"retry": {"fallbacks": ["claude-sonnet-4-6"]},
                       "providers": {"anthropic": [{"model_regex": "^claude", "upstream_url": stub.url}],
                                     "openai": [{"model_regex": "^gpt", "upstream_url": stub.url}]}})
    proxy = start_proxy()
    stub.script(status=500)
    resp = oa(proxy, token).chat.completions.with_raw_response.create(**BODY)
    assert resp.headers["x-tokenomics-model"] == "claude-sonnet-4-6"
    assert [r.path for r in stub.requests] == ["/v1/chat/completions", "/v1/messages"]
    assert stub.last.headers["x-api-key"] == ANTHROPIC_KEY
    assert resp.parse().choices[0].message.content == DEFAULT_REPLY


def test_connection_failure_falls_back(cli, stub, start_proxy):
    from conftest import free_port
    token = cli.token({"retry": {"fallbacks": ["gpt-4o-mini"]},
                       "providers": {"openai": [{"model": "gpt-4o", "upstream_url": f"http://127.0.0.1:{free_port()}"},
                                                {"model": "gpt-4o-mini", "upstream_url": stub.url}]}})
    proxy = start_proxy()
    resp = oa(proxy, token).chat.completions.with_raw_response.create(**BODY)
    assert resp.headers["x-tokenomics-model"] == "gpt-4o-mini"
    assert len(stub.requests) == 1


def test_azure_deployment_url_key_header_and_api_version(cli, stub, start_proxy):
    proxy = start_proxy(env={"AZURE_OPENAI_ENDPOINT": stub.url, "AZURE_OPENAI_API_KEY": "azure-secret"})
    token = cli.token({"provider": "azure_openai"})
    oa(proxy, token).chat.completions.create(model="my-gpt4o", messages=[{"role": "user", "content": "x"}])
    rec = stub.last
    assert rec.path == "/openai/deployments/my-gpt4o/chat/completions"
    assert rec.query.startswith("api-version=")
    assert rec.headers["api-key"] == "azure-secret"
    assert "authorization" not in rec.headers


def test_gemini_openai_compatible_path_and_bearer(cli, stub, start_proxy):
    config = {"providers": {"google_gemini": {"upstream_url": stub.url + "/v1beta/openai"}}}
    proxy = start_proxy(config=config, env={"GEMINI_API_KEY": "gemini-secret"})
    token = cli.token({"provider": "google_gemini"})
    oa(proxy, token).chat.completions.create(model="gemini-2.5-flash", messages=[{"role": "user", "content": "x"}])
    assert stub.last.path == "/v1beta/openai/chat/completions"
    assert stub.last.headers["authorization"] == "Bearer gemini-secret"


def test_provider_metadata_and_ids_reach_the_ledger(cli, stub, start_proxy):
    token = cli.token({})
    proxy = start_proxy(upstream_url=stub.url)
    client = oa(proxy, token)
    client.chat.completions.create(**BODY)
    list(client.chat.completions.create(**BODY, stream=True))
    assert proxy.stop() == 0
    sessions = json.loads(cli("ledger", "sessions", "--json", check=True).stdout)
    shown = json.loads(cli("ledger", "show", sessions[-1]["session_id"], "--json", check=True).stdout)
    requests = shown["requests"]
    assert len(requests) == 2
    for entry in requests:
        assert entry["upstream_request_id"].startswith("req_stub_")
        assert entry["upstream_id"].startswith("chatcmpl-")
        assert entry["provider_meta"]["finish_reason"] == "stop"
        assert entry["provider_meta"]["model"] == "gpt-4o"
        assert entry["input_tokens"] > 0 and entry["output_tokens"] > 0
    assert [e["stream"] for e in requests] == [False, True]


def test_provider_test_command(cli, stub):
    from conftest import free_port
    import yaml
    (cli.cwd / "config.yaml").write_text(yaml.safe_dump({"providers": {
        "good": {"upstream_url": stub.url, "api_key_env": "GOOD_KEY"},
        "closed": {"upstream_url": f"http://127.0.0.1:{free_port()}", "api_key_env": "GOOD_KEY"}}}))
    env = {**cli.env, "GOOD_KEY": "k"}
    proc = cli("provider", "test", "good", "mock", "--json", env=env)
    results = {r["provider"]: r for r in json.loads(proc.stdout)}
    assert proc.returncode == 0, proc.stderr
    assert results["good"]["status"] == "ok" and results["good"]["latency_ms"] > 0
    assert stub.last.path == "/v1/models" and stub.last.headers["authorization"] == "Bearer k"
    stub.script(status=401)
    proc = cli("provider", "test", "good", "closed", "--json", env=env)
    results = {r["provider"]: r for r in json.loads(proc.stdout)}
    assert proc.returncode == 1
    assert results["good"]["status"] == "auth_failed"
    assert results["closed"]["status"] == "unreachable"
    listing = json.loads(cli("provider", "list", "--json", env=env, check=True).stdout)
    assert {"openai", "anthropic", "mock", "good"} <= {p["name"] for p in listing}
