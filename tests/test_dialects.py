"""Dialect adapters own the wire JSON: which dialect an upstream is sent, translation of
requests, answers, errors and streams, asking for stream usage, stream-error events; and the
Upstream interface the pipeline forwards through (the h11 client, the in-process mock)."""
import asyncio
import json

import pytest

from tokenomics.dialects import CHAT, COMPLETIONS, EMBEDDINGS, GOVERNED, MESSAGES, RESPONSES
from tokenomics.errors import ProxyError
from tokenomics.http.client import UpstreamCall, UpstreamClient
from tokenomics.http.mock import MockUpstream
from tokenomics.relay import stream_error_event
from tokenomics.translate import ChatToMessagesStream, MessagesToChatStream

ALL = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, MESSAGES)


def test_each_governed_path_names_its_own_adapter():
    assert {d.path: d for d in ALL} == GOVERNED
    assert len({d.path for d in ALL}) == len(ALL)


@pytest.mark.parametrize("dialect, family, expected", [
    (CHAT, "openai", CHAT), (CHAT, "anthropic", MESSAGES),
    (MESSAGES, "anthropic", MESSAGES), (MESSAGES, "openai", CHAT),
    (RESPONSES, "openai", RESPONSES), (RESPONSES, "anthropic", None),
    (COMPLETIONS, "anthropic", None), (EMBEDDINGS, "anthropic", None), (CHAT, "gemini", None),
])
def test_speaking_picks_the_dialect_sent_to_a_provider_family(dialect, family, expected):
    assert dialect.speaking(family) is expected


@pytest.mark.parametrize("dialect", ALL)
def test_same_dialect_is_never_translated(dialect):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert dialect.translate_request(body, dialect, "openai") is None
    assert dialect.translate_response({"id": "x"}, dialect, "m") is None
    assert dialect.stream_translator(dialect, "m", False) is None
    raw = b'{"error": {"message": "nope"}}'
    assert dialect.translate_error(raw, dialect) is raw


def test_chat_request_to_messages_and_back():
    body = {"model": "claude-x", "max_tokens": 50, "messages": [{"role": "system", "content": "be brief"},
                                                               {"role": "user", "content": "hi"}]}
    out = CHAT.translate_request(body, MESSAGES, "anthropic")
    assert out["system"] == "be brief" and out["max_tokens"] == 50
    assert out["messages"] == [{"role": "user", "content": "hi"}]
    answer = {"id": "msg_1", "type": "message", "role": "assistant", "content": [{"type": "text", "text": "yo"}],
              "stop_reason": "end_turn", "usage": {"input_tokens": 3, "output_tokens": 1}}
    chat = CHAT.translate_response(answer, MESSAGES, "claude-x")
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"] == "yo"
    assert isinstance(CHAT.stream_translator(MESSAGES, "claude-x", True), MessagesToChatStream)


@pytest.mark.parametrize("provider, field", [("openai", "max_completion_tokens"),
                                             ("azure_openai", "max_completion_tokens"),
                                             ("groq", "max_tokens")])
def test_messages_to_chat_names_the_output_cap_the_provider_accepts(provider, field):
    body = {"model": "gpt-x", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    out = MESSAGES.translate_request(body, CHAT, provider)
    assert out[field] == 64
    assert {"max_tokens", "max_completion_tokens"} - {field} & out.keys() == set()
    assert isinstance(MESSAGES.stream_translator(CHAT, "gpt-x", False), ChatToMessagesStream)


def test_errors_are_translated_into_the_clients_shape():
    anthropic = json.dumps({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}).encode()
    assert json.loads(CHAT.translate_error(anthropic, MESSAGES))["error"]["message"] == "busy"
    openai = json.dumps({"error": {"message": "slow down", "type": "rate_limit_error",
                                   "code": "rate_limit_exceeded"}}).encode()
    out = json.loads(MESSAGES.translate_error(openai, CHAT))
    assert out["type"] == "error" and out["error"]["message"] == "slow down"
    for raw in (b"<html>bad gateway</html>", b"[1, 2]"):  # not an error object: relayed as is
        assert CHAT.translate_error(raw, MESSAGES) == raw


def test_only_chat_streams_are_asked_for_usage():
    body = {"model": "m", "stream": True, "stream_options": {"other": 1}}
    assert CHAT.ask_stream_usage(body) is True
    assert body["stream_options"] == {"other": 1, "include_usage": True}
    assert CHAT.ask_stream_usage(body) is False  # the client asked (now): nothing to strip
    for dialect in (COMPLETIONS, RESPONSES, MESSAGES, EMBEDDINGS):
        body = {"model": "m", "stream": True}
        assert dialect.ask_stream_usage(body) is False and body == {"model": "m", "stream": True}


def test_only_embeddings_have_no_output_to_reserve():
    assert [d.produces_output for d in ALL] == [True, True, False, True, True]


def _event(raw: bytes) -> tuple[str | None, dict]:
    lines = raw.decode().strip().split("\n")
    event = lines[0][len("event: "):] if lines[0].startswith("event: ") else None
    return event, json.loads(lines[-1][len("data: "):])


def test_stream_error_events_in_each_dialect():
    err = ProxyError(403, "output_blocked", "the answer broke a rule")
    event, payload = _event(stream_error_event(RESPONSES, err, 7))
    assert event == "error" and payload == {"type": "error", "code": "output_blocked",
                                            "message": "the answer broke a rule", "param": None,
                                            "sequence_number": 7}
    event, payload = _event(stream_error_event(MESSAGES, err, 7))
    assert event == "error" and payload["type"] == "error" and payload["error"]["code"] == "output_blocked"
    event, payload = _event(stream_error_event(CHAT, err))
    assert event is None and payload["error"]["code"] == "output_blocked" and "sequence_number" not in payload


def _call(dialect, parsed, address=None):
    def refuse():
        raise AssertionError("the mock must not build a network address (or read a key)")
    return UpstreamCall("POST", "/v1/x", b"{}", 5.0, "req_0123456789abcdef0123", dialect, parsed,
                        address or refuse)


def test_mock_upstream_answers_governed_requests_without_an_address():
    mock = MockUpstream()
    assert mock.speaks_every_dialect and not mock.serves_passthrough
    body = {"model": "mock-1", "messages": [{"role": "user", "content": "hello\r\nthere"}]}
    upstream = asyncio.run(mock.send(_call(CHAT, body)))
    assert upstream.status == 200
    assert upstream.header_map["x-mock-received"] == "hello there"
    answer = json.loads(asyncio.run(upstream.read()))
    assert answer["choices"][0]["message"]["content"] == "Mock reply: hello\r\nthere"
    with pytest.raises(ProxyError) as caught:
        asyncio.run(mock.send(_call(None, None)))
    assert caught.value.status == 404 and "/v1/x" in caught.value.message


def test_h11_client_sends_to_the_address_the_call_builds(monkeypatch):
    client = UpstreamClient()
    assert not client.speaks_every_dialect and client.serves_passthrough
    seen = []

    async def request(method, url, headers, body, timeout, insecure=False, secret=""):
        seen.append((method, url, headers, body, timeout, insecure, secret))
        return "answer"
    monkeypatch.setattr(client, "request", request)
    call = _call(CHAT, {}, address=lambda: ("https://api.example/v1/x", [("host", "api.example")], "sk", True))
    assert asyncio.run(client.send(call)) == "answer"
    assert seen == [("POST", "https://api.example/v1/x", [("host", "api.example")], b"{}", 5.0, True, "sk")]


def test_forwarder_chooses_the_upstream_by_scheme():
    from tokenomics.forward import Forwarder
    client, mock = UpstreamClient(), MockUpstream()
    forwarder = Forwarder(client, {"http": client, "https": client, "mock": mock}, environ={})
    assert forwarder.upstream_for("mock://") is mock
    assert forwarder.upstream_for("MOCK://x") is mock
    assert forwarder.upstream_for("https://api.openai.com/v1") is client
    assert forwarder.upstream_for("") is client  # it then explains the missing URL


def test_chat_strips_only_the_usage_it_asked_for():
    usage_only = {"choices": [], "usage": {"prompt_tokens": 3}}
    assert CHAT.strip_stream_usage(usage_only) is None  # the whole event goes
    both = {"choices": [{"index": 0, "delta": {}}], "usage": {"prompt_tokens": 3}}
    assert CHAT.strip_stream_usage(both) is True and "usage" not in both
    assert CHAT.strip_stream_usage({"choices": [{"index": 0, "delta": {"content": "x"}}]}) is False
    assert RESPONSES.strip_stream_usage({"type": "response.completed", "usage": {}}) is False


def test_only_responses_streams_are_renumbered():
    assert {d.name: d.sequence_field for d in ALL} == {
        "chat": None, "completions": None, "embeddings": None, "responses": "sequence_number", "messages": None}
