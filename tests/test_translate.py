"""Translation OpenAI chat <-> Anthropic Messages: requests, responses, errors and streams.

Fixtures follow the providers' published wire formats (OpenAI chat completions and streaming
reference with its tool-call delta example; Anthropic Messages, streaming and tool-use
references with their `input_json_delta` example), and every output is checked with the
official SDKs' own types (`openai.types.chat`, `anthropic.types`) and stream accumulators, so the
shapes are the ones the SDKs parse."""
import copy
import json
import typing

import pytest
from hypothesis import given, settings, strategies as st

import tokenomics
import tokenomics.translate
from tokenomics.errors import ProxyError
from tokenomics.limits.prices import Usage
from tokenomics.translate import DEFAULT_ANTHROPIC_MAX_TOKENS, ChatToMessagesStream, MessagesToChatStream, chat_to_messages_request, chat_to_messages_response, messages_to_chat_request, messages_to_chat_response

import anthropic.types as anthropic_types  # noqa: E402
import openai.types.chat as openai_chat  # noqa: E402
import pydantic  # noqa: E402
from anthropic.lib.streaming._messages import accumulate_event  # noqa: E402
from anthropic.types import message_create_params  # noqa: E402
from openai.lib.streaming.chat import ChatCompletionStreamState  # noqa: E402
from openai.types.chat import completion_create_params  # noqa: E402

ANTHROPIC_REQUEST = pydantic.TypeAdapter(anthropic_types.MessageCreateParams)
ANTHROPIC_EVENT = pydantic.TypeAdapter(anthropic_types.RawMessageStreamEvent)
OPENAI_REQUEST = pydantic.TypeAdapter(completion_create_params.CompletionCreateParams)
# The Messages API documents temperature and top_p (and the stream flag); this SDK build's
# TypedDict no longer lists the sampling fields, so they are allowed explicitly.
ANTHROPIC_REQUEST_KEYS = set(typing.get_type_hints(message_create_params.MessageCreateParamsBase)) | {
    "stream", "temperature", "top_p"}
OPENAI_REQUEST_KEYS = set(typing.get_type_hints(completion_create_params.CompletionCreateParamsBase)) | {"stream"}


def _force(value):
    """Walk a TypedDict validation result: pydantic validates `Iterable` fields lazily."""
    if isinstance(value, dict):
        return {k: _force(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_force(v) for v in value]
    if hasattr(value, "__next__"):
        return [_force(v) for v in value]
    return value


def valid_anthropic_request(req: dict) -> dict:
    assert set(req) <= ANTHROPIC_REQUEST_KEYS, set(req) - ANTHROPIC_REQUEST_KEYS
    _force(ANTHROPIC_REQUEST.validate_python(req))
    return req


def valid_openai_request(req: dict) -> dict:
    assert set(req) <= OPENAI_REQUEST_KEYS, set(req) - OPENAI_REQUEST_KEYS
    _force(OPENAI_REQUEST.validate_python(req))
    return req


def refused(fn, *args) -> ProxyError:
    with pytest.raises(ProxyError) as info:
        fn(*args)
    assert info.value.status == 400 and info.value.code == "invalid_request"
    return info.value


# -- fixtures from the published wire formats ---------------------------------------------------

WEATHER_TOOL_OPENAI = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["location"]}}}
WEATHER_TOOL_ANTHROPIC = {"name": "get_weather", "description": "Get the current weather in a given location",
                          "input_schema": WEATHER_TOOL_OPENAI["function"]["parameters"]}
PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="


def chat(messages, **extra):
    return {"model": "claude-sonnet-4-5", "messages": messages, **extra}


def anth(messages, **extra):
    return {"model": "gpt-4o", "max_tokens": 1024, "messages": messages, **extra}


USER = {"role": "user", "content": "What's the weather like in Paris?"}


# -- OpenAI chat request -> Anthropic Messages request -------------------------------------------

CHAT_TO_MESSAGES = [
    ("default max_tokens", chat([USER]),
     {"model": "claude-sonnet-4-5", "max_tokens": DEFAULT_ANTHROPIC_MAX_TOKENS, "messages": [USER]}),
    ("max_tokens kept", chat([USER], max_tokens=300),
     {"model": "claude-sonnet-4-5", "max_tokens": 300, "messages": [USER]}),
    ("max_completion_tokens wins", chat([USER], max_tokens=300, max_completion_tokens=200),
     {"model": "claude-sonnet-4-5", "max_tokens": 200, "messages": [USER]}),
    ("system string", chat([{"role": "system", "content": "Be terse."}, USER]),
     {"model": "claude-sonnet-4-5", "max_tokens": 4096, "system": "Be terse.", "messages": [USER]}),
    ("system and developer joined, mid-conversation system moved up",
     chat([{"role": "system", "content": "A."}, {"role": "developer", "content": "B."}, USER,
           {"role": "assistant", "content": "Sunny."}, {"role": "system", "content": "C."},
           {"role": "user", "content": "Thanks"}]),
     {"model": "claude-sonnet-4-5", "max_tokens": 4096, "system": "A.\n\nB.\n\nC.",
      "messages": [USER, {"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "Thanks"}]}),
    ("system with parts -> text blocks",
     chat([{"role": "system", "content": [{"type": "text", "text": "A."}, {"type": "text", "text": "B."}]},
           {"role": "developer", "content": "C."}, USER]),
     {"model": "claude-sonnet-4-5", "max_tokens": 4096,
      "system": [{"type": "text", "text": "A."}, {"type": "text", "text": "B."}, {"type": "text", "text": "C."}],
      "messages": [USER]}),
    ("stop string", chat([USER], stop="END"),
     {"model": "claude-sonnet-4-5", "max_tokens": 4096, "messages": [USER], "stop_sequences": ["END"]}),
    ("stop list", chat([USER], stop=["\n\nHuman:", "END"]),
     {"model": "claude-sonnet-4-5", "max_tokens": 4096, "messages": [USER], "stop_sequences": ["\n\nHuman:", "END"]}),
    ("temperature clamped to Anthropic's 0..1", chat([USER], temperature=1.7, top_p=0.9),
     {"model": "claude-sonnet-4-5", "max_tokens": 4096, "messages": [USER], "temperature": 1.0, "top_p": 0.9}),
    ("temperature in range kept", chat([USER], temperature=0.3),
     {"model": "claude-sonnet-4-5", "max_tokens": 4096, "messages": [USER], "temperature": 0.3}),
    ("stream kept, stream_options and seed dropped, user -> metadata",
     chat([USER], stream=True, stream_options={"include_usage": True}, seed=42, user="user-123"),
     {"model": "claude-sonnet-4-5", "max_tokens": 4096, "messages": [USER], "metadata": {"user_id": "user-123"},
      "stream": True}),
    ("neutral values of unsupported fields accepted",
     chat([USER], n=1, logprobs=False, frequency_penalty=0, presence_penalty=0.0, logit_bias={},
          modalities=["text"], top_logprobs=None, response_format={"type": "text"}, store=False),
     {"model": "claude-sonnet-4-5", "max_tokens": 4096, "messages": [USER]}),
    ("images: data URL -> base64 source, https URL -> url source, empty text dropped",
     chat([{"role": "user", "content": [
         {"type": "text", "text": "What is in these images?"}, {"type": "text", "text": ""},
         {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}", "detail": "low"}},
         {"type": "image_url", "image_url": {"url": "https://upload.wikimedia.org/a.jpg"}}]}]),
     {"model": "claude-sonnet-4-5", "max_tokens": 4096, "messages": [{"role": "user", "content": [
         {"type": "text", "text": "What is in these images?"},
         {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
         {"type": "image", "source": {"type": "url", "url": "https://upload.wikimedia.org/a.jpg"}}]}]}),
    ("consecutive user messages merged", chat([USER, {"role": "user", "content": "And in Rome?"}]),
     {"model": "claude-sonnet-4-5", "max_tokens": 4096, "messages": [{"role": "user", "content": [
         {"type": "text", "text": USER["content"]}, {"type": "text", "text": "And in Rome?"}]}]}),
    ("tool round trip: tool_calls -> tool_use, tool results merged with the next user turn",
     chat([USER,
           {"role": "assistant", "content": "Let me check.", "tool_calls": [
               {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                 "arguments": "{\"location\": \"Paris\"}"}},
               {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": ""}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": "18C, cloudy"},
           {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "14:05"}]},
           {"role": "user", "content": "Summarise."}],
          tools=[WEATHER_TOOL_OPENAI]),
     {"model": "claude-sonnet-4-5", "max_tokens": 4096, "messages": [
         USER,
         {"role": "assistant", "content": [
             {"type": "text", "text": "Let me check."},
             {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"location": "Paris"}},
             {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}}]},
         {"role": "user", "content": [
             {"type": "tool_result", "tool_use_id": "call_1", "content": "18C, cloudy"},
             {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "14:05"}]},
             {"type": "text", "text": "Summarise."}]}],
      "tools": [WEATHER_TOOL_ANTHROPIC]}),
    ("assistant with only tool calls and null content",
     chat([USER, {"role": "assistant", "content": None, "tool_calls": [
         {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
         {"role": "tool", "tool_call_id": "call_9", "content": ""}], tools=[WEATHER_TOOL_OPENAI]),
     {"model": "claude-sonnet-4-5", "max_tokens": 4096, "messages": [
         USER, {"role": "assistant", "content": [{"type": "tool_use", "id": "call_9", "name": "get_weather",
                                                  "input": {}}]},
         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_9"}]}],
      "tools": [WEATHER_TOOL_ANTHROPIC]}),
    ("strict tool and tool without parameters",
     chat([USER], tools=[{"type": "function", "function": {"name": "now", "strict": True}}]),
     {"model": "claude-sonnet-4-5", "max_tokens": 4096, "messages": [USER],
      "tools": [{"name": "now", "input_schema": {"type": "object", "properties": {}}, "strict": True}]}),
    ("json_schema response_format -> output_config.format",
     chat([USER], response_format={"type": "json_schema", "json_schema": {
         "name": "weather", "strict": True, "schema": {"type": "object", "properties": {"c": {"type": "number"}},
                                                       "required": ["c"], "additionalProperties": False}}}),
     {"model": "claude-sonnet-4-5", "max_tokens": 4096, "messages": [USER], "output_config": {"format": {
         "type": "json_schema", "schema": {"type": "object", "properties": {"c": {"type": "number"}},
                                           "required": ["c"], "additionalProperties": False}}}}),
]


@pytest.mark.parametrize("name, body, expected", CHAT_TO_MESSAGES, ids=[c[0] for c in CHAT_TO_MESSAGES])
def test_chat_to_messages_request(name, body, expected):
    original = copy.deepcopy(body)
    out = chat_to_messages_request(body)
    assert out == expected
    assert body == original  # the client's body is not mutated
    valid_anthropic_request(out)


@pytest.mark.parametrize("choice, parallel, expected", [
    ("auto", None, {"type": "auto"}),
    ("none", None, {"type": "none"}),
    ("required", None, {"type": "any"}),
    ({"type": "function", "function": {"name": "get_weather"}}, None, {"type": "tool", "name": "get_weather"}),
    (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
    ({"type": "function", "function": {"name": "get_weather"}}, False,
     {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}),
    ("none", False, {"type": "none"}),
    (None, None, None),
    (None, True, None),
])
def test_chat_tool_choice(choice, parallel, expected):
    extra = {k: v for k, v in (("tool_choice", choice), ("parallel_tool_calls", parallel)) if v is not None}
    out = valid_anthropic_request(chat_to_messages_request(chat([USER], tools=[WEATHER_TOOL_OPENAI], **extra)))
    assert out.get("tool_choice") == expected


@pytest.mark.parametrize("body, field", [
    (chat([USER], n=2), "'n'"),
    (chat([USER], n=True), "'n'"),
    (chat([USER], logprobs=True), "'logprobs'"),
    (chat([USER], top_logprobs=3), "'top_logprobs'"),
    (chat([USER], frequency_penalty=0.5), "'frequency_penalty'"),
    (chat([USER], presence_penalty=-1), "'presence_penalty'"),
    (chat([USER], logit_bias={"50256": -100}), "'logit_bias'"),
    (chat([USER], response_format={"type": "json_object"}), "response_format=json_object"),
    (chat([USER], audio={"voice": "alloy", "format": "wav"}), "'audio'"),
    (chat([USER], modalities=["text", "audio"]), "'modalities'"),
    (chat([USER], functions=[{"name": "f", "parameters": {}}]), "'functions'"),
    (chat([USER], function_call="auto"), "'function_call'"),
    (chat([USER], reasoning_effort="high"), "'reasoning_effort'"),
    (chat([USER], prediction={"type": "content", "content": "x"}), "'prediction'"),
    (chat([USER], web_search_options={}), "'web_search_options'"),
    (chat([USER], some_future_field=1), "'some_future_field'"),
    (chat([USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]),
     "messages[1].tool_calls[0].function.arguments"),
    (chat([USER, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}]}]),
     "messages[1].tool_calls[0].function.arguments"),
    (chat([USER, {"role": "assistant", "tool_calls": [{"id": "c", "type": "custom", "custom": {}}]}]),
     "messages[1].tool_calls[0].type=custom"),
    (chat([USER, {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}}]),
     "messages[1].function_call"),
    (chat([{"role": "function", "name": "f", "content": "x"}]), "messages[0].role=function"),
    (chat([{"role": "tool", "content": "x"}]), "messages[0].tool_call_id"),
    (chat([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}]}]),
     "messages[0].content[0].type=input_audio"),
    (chat([{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}]),
     "messages[0].content[0].type=file"),
    (chat([{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:application/pdf;base64,JVBERi0="}}]}]), "messages[0].content[0].image_url.url"),
    (chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}]}]),
     "messages[0].content[0].image_url.url"),
    (chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/a.png"}}]}]),
     "messages[0].content[0].image_url.url"),
    (chat([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "https://x/a.png"}}]}, USER]),
     "messages[0].content[0].type"),
    (chat([USER], tools=[{"type": "custom", "custom": {"name": "grammar"}}]), "tools[0].type=custom"),
    (chat([USER], tools=[WEATHER_TOOL_OPENAI], tool_choice={"type": "allowed_tools", "allowed_tools": {}}),
     "tool_choice="),
    (chat([USER], tool_choice="required"), "'tool_choice'"),
    (chat([USER], max_tokens=0), "'max_tokens'"),
    (chat([USER], temperature="hot"), "'temperature'"),
    (chat([USER], stop=[1]), "'stop'"),
    (chat([]), "'messages'"),
    (chat([{"role": "system", "content": "only a system prompt"}]), "'messages'"),
])
def test_chat_to_messages_request_refuses_what_it_cannot_carry(body, field):
    err = refused(chat_to_messages_request, body)
    assert field in err.message


# -- Anthropic Messages request -> OpenAI chat request -------------------------------------------

A_USER = {"role": "user", "content": "What's the weather like in Paris?"}

MESSAGES_TO_CHAT = [
    ("minimal", anth([A_USER]), {"model": "gpt-4o", "messages": [A_USER], "max_tokens": 1024}),
    ("system string", anth([A_USER], system="Be terse."),
     {"model": "gpt-4o", "messages": [{"role": "system", "content": "Be terse."}, A_USER], "max_tokens": 1024}),
    ("system blocks joined, cache_control dropped",
     anth([A_USER], system=[{"type": "text", "text": "You are a CLI.", "cache_control": {"type": "ephemeral"}},
                            {"type": "text", "text": "Be terse."}]),
     {"model": "gpt-4o", "messages": [{"role": "system", "content": "You are a CLI.\n\nBe terse."}, A_USER],
      "max_tokens": 1024}),
    ("system role inside messages (Claude Code) kept in place",
     anth([A_USER, {"role": "assistant", "content": "Sunny."},
           {"role": "system", "content": [{"type": "text", "text": "Reminder."}]}]),
     {"model": "gpt-4o", "messages": [A_USER, {"role": "assistant", "content": "Sunny."},
                                      {"role": "system", "content": "Reminder."}], "max_tokens": 1024}),
    ("sampling, stop, user, stream with usage; thinking dropped",
     anth([A_USER], temperature=0.2, top_p=0.8, stop_sequences=["END"], metadata={"user_id": "u-1"}, stream=True,
          thinking={"type": "enabled", "budget_tokens": 2048}),
     {"model": "gpt-4o", "messages": [A_USER], "max_tokens": 1024, "stop": ["END"], "temperature": 0.2,
      "top_p": 0.8, "user": "u-1", "stream": True, "stream_options": {"include_usage": True}}),
    ("images: base64 -> data URL, url -> url",
     anth([{"role": "user", "content": [
         {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
         {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
         {"type": "text", "text": "Describe these."}]}]),
     {"model": "gpt-4o", "max_tokens": 1024, "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
         {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
         {"type": "text", "text": "Describe these."}]}]}),
    ("text blocks of one user turn stay parts",
     anth([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]),
     {"model": "gpt-4o", "max_tokens": 1024, "messages": [{"role": "user", "content": [
         {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}),
    ("tool use and results (documented example), thinking block in history dropped",
     anth([A_USER,
           {"role": "assistant", "content": [
               {"type": "thinking", "thinking": "I should call the tool.", "signature": "sig"},
               {"type": "text", "text": "I'll check the weather."},
               {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather",
                "input": {"location": "San Francisco, CA", "unit": "celsius"}}]},
           {"role": "user", "content": [
               {"type": "tool_result", "tool_use_id": "toolu_01A09q90qw90lq917835lq9", "content": "15 degrees"},
               {"type": "tool_result", "tool_use_id": "toolu_02", "is_error": True,
                "content": [{"type": "text", "text": "timeout"}, {"type": "text", "text": "retry later"}]},
               {"type": "text", "text": "Thanks!"}]}],
          tools=[WEATHER_TOOL_ANTHROPIC], tool_choice={"type": "auto"}),
     {"model": "gpt-4o", "max_tokens": 1024, "messages": [
         A_USER,
         {"role": "assistant", "content": "I'll check the weather.", "tool_calls": [
             {"id": "toolu_01A09q90qw90lq917835lq9", "type": "function", "function": {
                 "name": "get_weather", "arguments": json.dumps({"location": "San Francisco, CA", "unit": "celsius"})}}]},
         {"role": "tool", "tool_call_id": "toolu_01A09q90qw90lq917835lq9", "content": "15 degrees"},
         {"role": "tool", "tool_call_id": "toolu_02", "content": "[tool error] timeout\nretry later"},
         {"role": "user", "content": "Thanks!"}],
      "tools": [WEATHER_TOOL_OPENAI], "tool_choice": "auto"}),
    ("assistant with only tool_use -> content None",
     anth([A_USER, {"role": "assistant", "content": [
         {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}]},
         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1"}]}],
          tools=[{**WEATHER_TOOL_ANTHROPIC, "type": "custom", "cache_control": {"type": "ephemeral"}}]),
     {"model": "gpt-4o", "max_tokens": 1024, "messages": [
         A_USER, {"role": "assistant", "content": None, "tool_calls": [
             {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
         {"role": "tool", "tool_call_id": "toolu_1", "content": ""}],
      "tools": [WEATHER_TOOL_OPENAI]}),
    ("structured output -> json_schema response_format; effort dropped",
     anth([A_USER], output_config={"effort": "low", "format": {"type": "json_schema", "schema": {"type": "object"}}}),
     {"model": "gpt-4o", "messages": [A_USER], "max_tokens": 1024, "response_format": {
         "type": "json_schema", "json_schema": {"name": "output", "schema": {"type": "object"}, "strict": True}}}),
]


@pytest.mark.parametrize("name, body, expected", MESSAGES_TO_CHAT, ids=[c[0] for c in MESSAGES_TO_CHAT])
def test_messages_to_chat_request(name, body, expected):
    original = copy.deepcopy(body)
    out = messages_to_chat_request(body)
    assert out == expected
    assert body == original
    valid_openai_request(out)


@pytest.mark.parametrize("choice, expected, parallel", [
    ({"type": "auto"}, "auto", None),
    ({"type": "any"}, "required", None),
    ({"type": "none"}, "none", None),
    ({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}, None),
    ({"type": "any", "disable_parallel_tool_use": True}, "required", False),
    ({"type": "auto", "disable_parallel_tool_use": False}, "auto", None),
])
def test_messages_tool_choice(choice, expected, parallel):
    out = valid_openai_request(messages_to_chat_request(anth([A_USER], tools=[WEATHER_TOOL_ANTHROPIC],
                                                             tool_choice=choice)))
    assert out["tool_choice"] == expected
    assert out.get("parallel_tool_calls") == parallel


@pytest.mark.parametrize("body, field", [
    (anth([A_USER], top_k=40), "'top_k'"),
    (anth([A_USER], container="c1"), "'container'"),
    (anth([A_USER], mcp_servers=[{"type": "url", "url": "https://x", "name": "x"}]), "'mcp_servers'"),
    (anth([A_USER], inference_geo="eu"), "'inference_geo'"),
    (anth([A_USER], context_management={"edits": []}), "'context_management'"),
    (anth([A_USER], tools=[{"type": "web_search_20250305", "name": "web_search"}]),
     "tools[0].type=web_search_20250305"),
    (anth([A_USER], tools=[{"type": "bash_20250124", "name": "bash"}]), "tools[0].type=bash_20250124"),
    (anth([{"role": "user", "content": [{"type": "document", "source": {
        "type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}}]}]), "messages[0].content[0].type=document"),
    (anth([{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]),
     "messages[0].content[0].source.type=file"),
    (anth([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://x/a.png"}}]}]}]),
     "messages[0].content[0].content[0].type=image"),
    (anth([A_USER, {"role": "assistant", "content": [{"type": "server_tool_use", "id": "s", "name": "web_search",
                                                       "input": {}}]}]), "messages[1].content[0].type=server_tool_use"),
    (anth([{"role": "tool", "content": "x"}]), "messages[0].role=tool"),
    (anth([A_USER], output_config={"format": {"type": "json_object"}}), "output_config.format"),
    (anth([A_USER], tools=[WEATHER_TOOL_ANTHROPIC], tool_choice={"type": "sometimes"}), "tool_choice="),
    (anth([]), "'messages'"),
])
def test_messages_to_chat_request_refuses_what_it_cannot_carry(body, field):
    err = refused(messages_to_chat_request, body)
    assert field in err.message


# -- responses ------------------------------------------------------------------------------------

def anthropic_message(content, stop_reason="end_turn", usage=None):
    return {"id": "msg_01Aq9w938a90dw8q", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": content, "stop_reason": stop_reason, "stop_sequence": None,
            "usage": usage or {"input_tokens": 2095, "output_tokens": 503}}


TOOL_USE_CONTENT = [
    {"type": "text", "text": "I'll check the weather."},
    {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather",
     "input": {"location": "San Francisco, CA", "unit": "celsius"}}]


@pytest.mark.parametrize("stop_reason, finish", [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("pause_turn", "stop"), ("max_tokens", "length"),
    ("model_context_window_exceeded", "length"), ("tool_use", "tool_calls"), ("refusal", "content_filter"),
    (None, "stop"),
])
def test_messages_to_chat_response_stop_reasons(stop_reason, finish):
    out = messages_to_chat_response(anthropic_message([{"type": "text", "text": "Hi"}], stop_reason), "claude-x")
    assert out["choices"][0]["finish_reason"] == finish
    openai_chat.ChatCompletion.model_validate(out)


def test_messages_to_chat_response_text_tools_and_usage():
    msg = anthropic_message([{"type": "thinking", "thinking": "hmm", "signature": "s"}] + TOOL_USE_CONTENT
                            + [{"type": "text", "text": " Done."}], "tool_use",
                            {"input_tokens": 10, "output_tokens": 7, "cache_read_input_tokens": 100,
                             "cache_creation_input_tokens": 20})
    out = messages_to_chat_response(msg, "claude-sonnet-4-5")
    parsed = openai_chat.ChatCompletion.model_validate(out)
    assert out["id"] == "chatcmpl-msg_01Aq9w938a90dw8q" and out["model"] == "claude-sonnet-4-5"
    assert isinstance(out["created"], int) and out["object"] == "chat.completion"
    message = parsed.choices[0].message
    assert message.content == "I'll check the weather. Done."
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("toolu_01A09q90qw90lq917835lq9", "get_weather", {"location": "San Francisco, CA", "unit": "celsius"})]
    assert out["usage"] == {"prompt_tokens": 130, "completion_tokens": 7, "total_tokens": 137,
                            "prompt_tokens_details": {"cached_tokens": 100}}


def test_messages_to_chat_response_only_tool_calls_has_null_content():
    out = messages_to_chat_response(anthropic_message(TOOL_USE_CONTENT[1:], "tool_use"), "m")
    assert out["choices"][0]["message"]["content"] is None
    assert openai_chat.ChatCompletion.model_validate(out).choices[0].finish_reason == "tool_calls"


def openai_completion(message, finish="stop", usage=None):
    return {"id": "chatcmpl-123", "object": "chat.completion", "created": 1677652288, "model": "gpt-4o-mini",
            "system_fingerprint": "fp_44709d6fcb",
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": usage or {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}}


OPENAI_TOOL_CALLS = [{"id": "call_abc123", "type": "function", "function": {
    "name": "get_current_weather", "arguments": "{\n\"location\": \"Boston, MA\"\n}"}}]


@pytest.mark.parametrize("message, finish, stop_reason", [
    ({"content": "Hello there"}, "stop", "end_turn"),
    ({"content": "Hello th"}, "length", "max_tokens"),
    ({"content": None, "tool_calls": OPENAI_TOOL_CALLS}, "tool_calls", "tool_use"),
    ({"content": None, "tool_calls": OPENAI_TOOL_CALLS}, "stop", "tool_use"),
    ({"content": ""}, "content_filter", "refusal"),
    ({"content": None, "refusal": "I can't help with that."}, "stop", "refusal"),
    ({"content": None, "function_call": {"name": "f", "arguments": "{}"}}, "function_call", "tool_use"),
    ({"content": "Hi"}, None, "end_turn"),
])
def test_chat_to_messages_response_stop_reasons(message, finish, stop_reason):
    out = chat_to_messages_response(openai_completion(message, finish), "gpt-4o-mini")
    assert out["stop_reason"] == stop_reason
    anthropic_types.Message.model_validate(out)


def test_chat_to_messages_response_text_tools_and_usage():
    resp = openai_completion({"content": "Checking.", "tool_calls": OPENAI_TOOL_CALLS}, "tool_calls",
                             {"prompt_tokens": 1200, "completion_tokens": 30, "total_tokens": 1230,
                              "prompt_tokens_details": {"cached_tokens": 1024}})
    out = chat_to_messages_response(resp, "gpt-4o-mini")
    parsed = anthropic_types.Message.model_validate(out)
    assert out["id"] == "msg_chatcmpl-123" and parsed.model == "gpt-4o-mini"
    assert out["content"] == [{"type": "text", "text": "Checking."},
                              {"type": "tool_use", "id": "call_abc123", "name": "get_current_weather",
                               "input": {"location": "Boston, MA"}}]
    assert out["usage"] == {"input_tokens": 176, "output_tokens": 30, "cache_creation_input_tokens": 0,
                            "cache_read_input_tokens": 1024}


def test_chat_to_messages_response_with_broken_tool_arguments_is_a_502():
    resp = openai_completion({"content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"a\": "}}]}, "tool_calls")
    with pytest.raises(ProxyError) as info:
        chat_to_messages_response(resp, "m")
    assert info.value.status == 502 and "tool_calls[0].function.arguments" in info.value.message


def test_error_bodies_translate_both_ways():
    out = tokenomics.translate.messages_to_chat_error({"type": "error", "error": {"type": "overloaded_error",
                                                                        "message": "Overloaded"}})
    assert out == {"error": {"message": "Overloaded", "type": "overloaded_error", "param": None,
                             "code": "overloaded_error"}}
    back = tokenomics.translate.chat_to_messages_error({"error": {"message": "Rate limit reached", "type": "requests",
                                                        "param": None, "code": "rate_limit_exceeded"}})
    assert back == {"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limit reached"}}
    anthropic_types.ErrorResponse.model_validate(back)
    odd = tokenomics.translate.chat_to_messages_error({"error": {"message": "?", "type": "weird"}})
    assert anthropic_types.ErrorResponse.model_validate(odd).error.type == "api_error"


# -- streams: Anthropic events -> OpenAI chunks -----------------------------------------------------

def ev(payload):
    return payload["type"], payload


def a_start(input_tokens=472, **usage):
    return ev({"type": "message_start", "message": {
        "id": "msg_014p7gG3wDgGV9EUtLvnow3U", "type": "message", "role": "assistant", "model": "claude-opus-4-6",
        "stop_sequence": None, "usage": {"input_tokens": input_tokens, "output_tokens": 2, **usage},
        "content": [], "stop_reason": None}})


def a_block(index, block):
    return ev({"type": "content_block_start", "index": index, "content_block": block})


def a_delta(index, delta):
    return ev({"type": "content_block_delta", "index": index, "delta": delta})


def a_stop(index):
    return ev({"type": "content_block_stop", "index": index})


def a_end(stop_reason, output_tokens=89):
    return [ev({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": output_tokens}}), ev({"type": "message_stop"})]


TEXT_PIECES = ["Okay", ",", " let", " me", " check", " the", " weather", " for", " San", " Francisco", ",", " CA", ":"]
JSON_PIECES = ["", "{\"location\":", " \"San", " Francisc", "o,", " CA\"", ", ", "\"unit\": \"fah", "renheit\"}"]

# The streaming reference's tool-use example, event for event (ping included).
ANTHROPIC_TOOL_STREAM = (
    [a_start(), a_block(0, {"type": "text", "text": ""}), ("ping", {"type": "ping"})]
    + [a_delta(0, {"type": "text_delta", "text": t}) for t in TEXT_PIECES]
    + [a_stop(0), a_block(1, {"type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather",
                              "input": {}})]
    + [a_delta(1, {"type": "input_json_delta", "partial_json": p}) for p in JSON_PIECES]
    + [a_stop(1)] + a_end("tool_use"))


def run_messages_to_chat(events, include_usage=True, model="claude-opus-4-6"):
    stream = MessagesToChatStream(model, include_usage)
    out = []
    for name, payload in events:
        out.extend(stream.feed(name, copy.deepcopy(payload)))
    return stream, out


def openai_final(chunks):
    """Accumulate chunks with the openai SDK's own stream state."""
    state = ChatCompletionStreamState()
    for chunk in chunks:
        if chunk != "[DONE]":
            state.handle_chunk(openai_chat.ChatCompletionChunk.model_validate(chunk))
    return state.get_final_completion()


def test_messages_stream_with_tool_call_to_chat_chunks():
    stream, out = run_messages_to_chat(ANTHROPIC_TOOL_STREAM)
    assert out[-1] == "[DONE]"
    chunks = out[:-1]
    for chunk in chunks:
        openai_chat.ChatCompletionChunk.model_validate(chunk)
    assert {c["id"] for c in chunks} == {"chatcmpl-msg_014p7gG3wDgGV9EUtLvnow3U"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if c["choices"]
             and "tool_calls" in c["choices"][0]["delta"]]
    assert calls[0] == {"index": 0, "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "type": "function",
                        "function": {"name": "get_weather", "arguments": ""}}
    assert [c["function"]["arguments"] for c in calls[1:]] == [p for p in JSON_PIECES if p]
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 472, "completion_tokens": 89, "total_tokens": 561, "prompt_tokens_details": {"cached_tokens": 0}}
    final = openai_final(out)
    message = final.choices[0].message
    assert message.content == "".join(TEXT_PIECES)
    assert json.loads(message.tool_calls[0].function.arguments) == {"location": "San Francisco, CA", "unit": "fahrenheit"}
    assert final.choices[0].finish_reason == "tool_calls"
    assert stream.usage == Usage(input_tokens=472, output_tokens=89)


def test_messages_stream_is_relayed_event_by_event():
    stream = MessagesToChatStream("m", include_usage=False)
    assert len(stream.feed(*a_start())) == 1
    assert stream.feed(*a_block(0, {"type": "text", "text": ""})) == []
    assert stream.feed("ping", {"type": "ping"}) == []
    for piece in TEXT_PIECES:
        (chunk,) = stream.feed(*a_delta(0, {"type": "text_delta", "text": piece}))
        assert chunk["choices"][0]["delta"] == {"content": piece}


@pytest.mark.parametrize("include_usage", [True, False])
def test_messages_stream_usage_chunk_only_when_asked(include_usage):
    events = [a_start(10, cache_read_input_tokens=90, cache_creation_input_tokens=5),
              a_block(0, {"type": "text", "text": ""}), a_delta(0, {"type": "text_delta", "text": "Hi"}),
              a_stop(0)] + a_end("end_turn", 3)
    stream, out = run_messages_to_chat(events, include_usage)
    usage_chunks = [c for c in out[:-1] if c.get("usage")]
    assert len(usage_chunks) == int(include_usage)
    if include_usage:
        assert usage_chunks[0]["usage"] == {"prompt_tokens": 105, "completion_tokens": 3, "total_tokens": 108,
                                            "prompt_tokens_details": {"cached_tokens": 90}}
    assert stream.usage == Usage(input_tokens=105, output_tokens=3, cached_input_tokens=90, cache_creation_tokens=5)
    assert openai_final(out).choices[0].message.content == "Hi"


@pytest.mark.parametrize("stop_reason, finish", [
    ("end_turn", "stop"), ("max_tokens", "length"), ("stop_sequence", "stop"), ("tool_use", "tool_calls"),
    ("refusal", "content_filter")])
def test_messages_stream_finish_reasons(stop_reason, finish):
    _, out = run_messages_to_chat([a_start(), a_block(0, {"type": "text", "text": ""}),
                                   a_delta(0, {"type": "text_delta", "text": "x"}), a_stop(0)] + a_end(stop_reason))
    finishes = [c["choices"][0]["finish_reason"] for c in out[:-1] if c["choices"]]
    assert finishes == [None, None, finish]


def test_messages_stream_thinking_is_dropped_and_tool_indexes_follow_tools():
    events = [a_start(), a_block(0, {"type": "thinking", "thinking": "", "signature": ""}),
              a_delta(0, {"type": "thinking_delta", "thinking": "Let me think"}),
              a_delta(0, {"type": "signature_delta", "signature": "EqQBCgIYAhIM"}), a_stop(0),
              a_block(1, {"type": "tool_use", "id": "toolu_a", "name": "a", "input": {}}),
              a_delta(1, {"type": "input_json_delta", "partial_json": "{\"x\": 1}"}), a_stop(1),
              a_block(2, {"type": "tool_use", "id": "toolu_b", "name": "b", "input": {}}),
              a_delta(2, {"type": "input_json_delta", "partial_json": "{\"y\":"}),
              a_delta(2, {"type": "input_json_delta", "partial_json": " 2}"}), a_stop(2)] + a_end("tool_use")
    _, out = run_messages_to_chat(events, include_usage=False)
    assert not any("Let me think" in json.dumps(c) for c in out)
    final = openai_final(out)
    calls = final.choices[0].message.tool_calls
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("toolu_a", "a", {"x": 1}), ("toolu_b", "b", {"y": 2})]
    assert final.choices[0].message.content is None or final.choices[0].message.content == ""


def test_messages_stream_error_event():
    stream = MessagesToChatStream("m", include_usage=True)
    stream.feed(*a_start())
    out = stream.feed("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert out == [{"error": {"message": "Overloaded", "type": "overloaded_error", "param": None,
                              "code": "overloaded_error"}}]
    assert stream.feed(*a_delta(0, {"type": "text_delta", "text": "late"})) == []
    assert stream.finish() == []


def test_messages_stream_cut_short():
    stream = MessagesToChatStream("m", include_usage=True)
    stream.feed(*a_start())
    stream.feed(*a_delta(0, {"type": "text_delta", "text": "partial"}))
    (err,) = stream.finish()
    assert "error" in err and "retry" in err["error"]["message"]
    done = MessagesToChatStream("m", include_usage=True)
    for name, payload in [a_start(), a_block(0, {"type": "text", "text": ""})] + a_end("end_turn")[:1]:
        done.feed(name, payload)
    tail = done.finish()  # message_delta arrived, only message_stop is missing: finish normally
    assert tail[-1] == "[DONE]" and tail[0]["usage"]["completion_tokens"] == 89


# -- streams: OpenAI chunks -> Anthropic events -------------------------------------------------

def o_chunk(delta=None, finish=None, usage=None, choices=True):
    chunk = {"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190,
             "model": "gpt-4o-mini", "system_fingerprint": "fp_44709d6fcb"}
    chunk["choices"] = [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}] if choices else []
    if usage is not None:
        chunk["usage"] = usage
    return chunk


OPENAI_ARG_PIECES = ["{\"", "location", "\":\"", "Paris", ",", " France", "\"}"]
# The function-calling guide's streamed tool call, chunk for chunk, then the include_usage chunk.
OPENAI_TOOL_STREAM = (
    [o_chunk({"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA", "type": "function",
         "function": {"name": "get_weather", "arguments": ""}}]})]
    + [o_chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in OPENAI_ARG_PIECES]
    + [o_chunk(finish="tool_calls"),
       o_chunk(usage={"prompt_tokens": 82, "completion_tokens": 17, "total_tokens": 99,
                      "prompt_tokens_details": {"cached_tokens": 64}}, choices=False),
       "[DONE]"])


def run_chat_to_messages(chunks, model="gpt-4o-mini"):
    stream = ChatToMessagesStream(model)
    out = []
    for chunk in chunks:
        out.extend(stream.feed(None, copy.deepcopy(chunk)))
    return stream, out


def anthropic_final(events):
    """Validate every event with the anthropic SDK's types and accumulate them into a Message."""
    snapshot, bufs = None, {}
    for name, payload in events:
        assert name == payload["type"]
        event = ANTHROPIC_EVENT.validate_python(payload)
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=bufs)
    return snapshot


def test_chat_stream_with_tool_call_to_messages_events():
    stream, out = run_chat_to_messages(OPENAI_TOOL_STREAM)
    names = [n for n, _ in out]
    assert names == (["message_start", "content_block_start"] + ["content_block_delta"] * len(OPENAI_ARG_PIECES)
                     + ["content_block_stop", "message_delta", "message_stop"])
    assert out[0][1]["message"]["id"] == "msg_chatcmpl-123"
    assert out[1][1]["content_block"] == {"type": "tool_use", "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA",
                                          "name": "get_weather", "input": {}}
    assert [p["delta"]["partial_json"] for n, p in out if n == "content_block_delta"] == OPENAI_ARG_PIECES
    assert out[-2][1] == {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                          "usage": {"output_tokens": 17, "input_tokens": 18, "cache_read_input_tokens": 64}}
    final = anthropic_final(out)
    assert final.stop_reason == "tool_use"
    assert final.content[0].type == "tool_use" and final.content[0].input == {"location": "Paris, France"}
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.cache_read_input_tokens) == (18, 17, 64)
    assert stream.usage == Usage(input_tokens=82, output_tokens=17, cached_input_tokens=64)


def test_chat_stream_text_then_parallel_tool_calls():
    chunks = ([o_chunk({"role": "assistant", "content": ""})]
              + [o_chunk({"content": w}) for w in ["Checking", " both", "."]]
              + [o_chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                          "function": {"name": "a", "arguments": "{\"x\""}}]}),
                 o_chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}),
                 o_chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                          "function": {"name": "b", "arguments": ""}}]}),
                 o_chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}),
                 o_chunk(finish="tool_calls"), "[DONE]"])
    _, out = run_chat_to_messages(chunks)
    starts = [(p["index"], p["content_block"]["type"]) for n, p in out if n == "content_block_start"]
    stops = [p["index"] for n, p in out if n == "content_block_stop"]
    assert starts == [(0, "text"), (1, "tool_use"), (2, "tool_use")] and stops == [0, 1, 2]
    final = anthropic_final(out)
    assert final.content[0].text == "Checking both."
    assert [(b.id, b.name, b.input) for b in final.content[1:]] == [("call_a", "a", {"x": 1}), ("call_b", "b", {})]
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 0


def test_chat_stream_is_relayed_chunk_by_chunk_and_holds_message_delta_for_usage():
    stream = ChatToMessagesStream("gpt-4o-mini")
    first = stream.feed(None, o_chunk({"role": "assistant", "content": ""}))
    assert [n for n, _ in first] == ["message_start"]
    assert first[0][1]["message"]["usage"] == {"input_tokens": 0, "output_tokens": 0}
    assert [n for n, _ in stream.feed(None, o_chunk({"content": "Hel"}))] == ["content_block_start",
                                                                              "content_block_delta"]
    (delta,) = stream.feed(None, o_chunk({"content": "lo"}))
    assert delta[1]["delta"] == {"type": "text_delta", "text": "lo"}
    assert [n for n, _ in stream.feed(None, o_chunk(finish="length"))] == ["content_block_stop"]
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    (md,) = stream.feed(None, o_chunk(usage=usage, choices=False))
    assert md == ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                                    "usage": {"output_tokens": 2, "input_tokens": 5, "cache_read_input_tokens": 0}})
    assert stream.feed(None, "[DONE]") == [("message_stop", {"type": "message_stop"})]
    assert stream.feed(None, "[DONE]") == []


def test_chat_stream_usage_in_the_finish_chunk_and_no_usage_at_all():
    _, out = run_chat_to_messages([o_chunk({"content": "Hi"}), o_chunk(finish="stop", usage={
        "prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4})])
    assert [n for n, _ in out][-2:] == ["content_block_stop", "message_delta"]
    _, out = run_chat_to_messages([o_chunk({"content": "Hi"}), o_chunk(finish="stop"), "[DONE]"])
    assert [n for n, _ in out][-3:] == ["content_block_stop", "message_delta", "message_stop"]
    final = anthropic_final(out)
    assert final.stop_reason == "end_turn" and final.content[0].text == "Hi"


@pytest.mark.parametrize("finish, stop_reason", [
    ("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"), ("content_filter", "refusal")])
def test_chat_stream_finish_reasons(finish, stop_reason):
    _, out = run_chat_to_messages([o_chunk({"content": "x"}), o_chunk(finish=finish), "[DONE]"])
    assert anthropic_final(out).stop_reason == stop_reason


def test_chat_stream_error_payload():
    stream = ChatToMessagesStream("m")
    stream.feed(None, o_chunk({"content": "x"}))
    out = stream.feed(None, {"error": {"message": "The server had an error", "type": "server_error",
                                       "param": None, "code": None}})
    assert out == [("error", {"type": "error", "error": {"type": "api_error", "message": "The server had an error"}})]
    anthropic_types.ErrorResponse.model_validate(out[0][1])
    assert stream.feed(None, "[DONE]") == [] and stream.finish() == []


def test_chat_stream_cut_short():
    stream = ChatToMessagesStream("m")
    stream.feed(None, o_chunk({"content": "partial"}))
    out = stream.finish()
    assert [n for n, _ in out] == ["content_block_stop", "error"]
    ended = ChatToMessagesStream("m")
    ended.feed(None, o_chunk({"content": "done"}))
    ended.feed(None, o_chunk(finish="stop"))
    tail = ended.finish()  # a server that omits [DONE] after the finish reason
    assert [n for n, _ in tail] == ["message_delta", "message_stop"]


# -- properties -------------------------------------------------------------------------------------

TEXT = st.text(min_size=1, max_size=30)
CONTENT = st.one_of(TEXT, st.lists(TEXT, min_size=1, max_size=3).map(
    lambda ts: [{"type": "text", "text": t} for t in ts]))
MESSAGE = st.tuples(st.sampled_from(["user", "assistant", "system", "developer"]), CONTENT).map(
    lambda rc: {"role": rc[0], "content": rc[1]})


def _texts(content):
    return [content] if isinstance(content, str) else [p["text"] for p in content]


def _runs(messages):
    """[(role, joined text)] with consecutive same-role messages merged; system texts apart."""
    runs, system = [], []
    for m in messages:
        role = m["role"]
        if role in ("system", "developer"):
            system.extend(_texts(m["content"]))
        elif runs and runs[-1][0] == role:
            runs[-1] = (role, runs[-1][1] + "".join(_texts(m["content"])))
        else:
            runs.append((role, "".join(_texts(m["content"]))))
    return runs, "\n\n".join(system)


@settings(max_examples=200, deadline=None)
@given(st.lists(MESSAGE, min_size=1, max_size=8).filter(
    lambda ms: any(m["role"] in ("user", "assistant") for m in ms)))
def test_text_survives_chat_to_messages_to_chat(messages):
    there = valid_anthropic_request(chat_to_messages_request(chat(messages)))
    back = valid_openai_request(messages_to_chat_request(there))
    assert _runs(back["messages"]) == _runs(messages)


STREAM_TEXT = st.lists(st.text(min_size=1, max_size=8), min_size=0, max_size=6)
TOOL_INPUT = st.dictionaries(st.text(min_size=1, max_size=5), st.one_of(st.integers(), st.text(max_size=6),
                                                                        st.booleans()), max_size=3)


def _split(text, cuts):
    points = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0] + points, points + [len(text)])]


@settings(max_examples=150, deadline=None)
@given(STREAM_TEXT, st.lists(st.tuples(TOOL_INPUT, st.lists(st.integers(0, 200), max_size=6)), max_size=3),
       st.sampled_from(["end_turn", "max_tokens"]))
def test_stream_survives_messages_to_chat_to_messages(pieces, tools, stop_reason):
    """Anthropic events -> OpenAI chunks -> Anthropic events: the anthropic SDK accumulates the
    same text, tool calls and token counts, however the tool arguments were split."""
    events = [a_start(40)]
    index = 0
    if pieces:
        events.append(a_block(0, {"type": "text", "text": ""}))
        events += [a_delta(0, {"type": "text_delta", "text": p}) for p in pieces] + [a_stop(0)]
        index = 1
    for k, (tool_input, cuts) in enumerate(tools):
        events.append(a_block(index, {"type": "tool_use", "id": f"toolu_{k}", "name": f"tool_{k}", "input": {}}))
        events += [a_delta(index, {"type": "input_json_delta", "partial_json": p})
                   for p in _split(json.dumps(tool_input), cuts)] + [a_stop(index)]
        index += 1
    events += a_end("tool_use" if tools else stop_reason, 21)
    _, chunks = run_messages_to_chat(events, include_usage=True)
    _, back = run_chat_to_messages(chunks)
    final = anthropic_final(back)
    texts = [b.text for b in final.content if b.type == "text"]
    assert "".join(texts) == "".join(pieces)
    assert [(b.id, b.name, b.input) for b in final.content if b.type == "tool_use"] == [
        (f"toolu_{k}", f"tool_{k}", tool_input) for k, (tool_input, _) in enumerate(tools)]
    assert final.stop_reason == ("tool_use" if tools else stop_reason)
    assert (final.usage.input_tokens, final.usage.output_tokens) == (40, 21)


@settings(max_examples=100, deadline=None)
@given(st.lists(TEXT, max_size=3), st.lists(TOOL_INPUT, max_size=3),
       st.sampled_from(["end_turn", "max_tokens", "tool_use", "refusal"]))
def test_response_survives_messages_to_chat_to_messages(texts, inputs, stop_reason):
    content = [{"type": "text", "text": t} for t in texts] + [
        {"type": "tool_use", "id": f"toolu_{k}", "name": "f", "input": i} for k, i in enumerate(inputs)]
    stop = "tool_use" if inputs else stop_reason if stop_reason != "tool_use" else "end_turn"
    msg = anthropic_message(content, stop, {"input_tokens": 7, "output_tokens": 3, "cache_read_input_tokens": 2})
    back = chat_to_messages_response(messages_to_chat_response(msg, "claude-x"), "claude-x")
    anthropic_types.Message.model_validate(back)
    assert "".join(b["text"] for b in back["content"] if b["type"] == "text") == "".join(texts)
    assert [b["input"] for b in back["content"] if b["type"] == "tool_use"] == inputs
    assert back["stop_reason"] == stop
    assert back["usage"]["input_tokens"] == 7 and back["usage"]["cache_read_input_tokens"] == 2
