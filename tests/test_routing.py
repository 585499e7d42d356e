"""Routing across providers end to end: an OpenAI-SDK client reaching an Anthropic-dialect upstream and
an Anthropic-SDK client reaching an OpenAI-dialect upstream, through real sockets and the real SDKs."""
import json

import anthropic
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
