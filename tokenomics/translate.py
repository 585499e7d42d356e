"""Translation between OpenAI chat and Anthropic Messages: requests, responses, errors and
streams. Pure dict-to-dict functions and two small stream state machines."""

import json
import secrets
import time
from typing import Any

from .errors import ProxyError
from .limits.prices import Usage
from .stages import SSEEvent


# Pure dict-to-dict functions and two small stream state machines; no I/O, no clock except the
# `created` stamp OpenAI payloads carry. Anything a client asked for that the other dialect
# cannot honour faithfully is a 400 naming the field, never a silent drop; the few fields that
# *are* dropped are listed in the tables below with the reason they are harmless (besides those:
# a message's `name`, an image's `detail` and blocks' `cache_control`, which are hints only).
#
# Decisions worth knowing:
# - Text blocks of one turn are concatenated with no separator, in both directions and in
#   streams, so a streamed and a non-streamed answer read the same.
# - Thinking blocks (Anthropic) and `reasoning_content` (OpenAI-compatible servers) are dropped:
#   output guardrails watch `content` only, so relaying reasoning in a side field would let text
#   bypass them, and chat->messages never turns thinking on.
# - All OpenAI system/developer messages go to Anthropic's top-level `system`, in order, even
#   those in the middle of a conversation (Anthropic has no positional system turn).
# - A stream that ends without its terminal event (`message_stop` / `[DONE]`) before a finish
#   reason was seen ends with an error event, not a fabricated "stop".

# Anthropic requires max_tokens; OpenAI clients usually omit it. 4096 is the output ceiling of
# the smallest current Claude model (Claude 3 Haiku), so the default is never itself a 400, and
# it is long enough for ordinary chat answers. Budget clamps lower it afterwards as usual.
DEFAULT_ANTHROPIC_MAX_TOKENS = 4096


# OpenAI samples temperature in [0, 2], Anthropic in [0, 1]: out-of-range values are clamped.
_ANTHROPIC_MAX_TEMPERATURE = 1.0


# The image formats the Messages API accepts as base64 sources.
_ANTHROPIC_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})


# chat -> messages: fields dropped because they change nothing the model says: `seed` is a
# best-effort determinism hint, `stream_options` is re-created by the stream translator, and
# the rest is OpenAI-side storage, caching and billing bookkeeping.
_CHAT_DROPPED = frozenset({"seed", "stream_options", "store", "metadata", "service_tier",
                           "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options"})


# chat -> messages: fields accepted only at the value OpenAI uses when they are absent.
_CHAT_NEUTRAL = {"n": (1,), "logprobs": (False,), "top_logprobs": (0,), "frequency_penalty": (0,),
                 "presence_penalty": (0,), "logit_bias": ({},), "modalities": (["text"],)}


_CHAT_MAPPED = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "stop", "temperature",
                          "top_p", "stream", "tools", "tool_choice", "parallel_tool_calls", "user",
                          "safety_identifier", "response_format"})


# messages -> chat: `thinking` and `output_config.effort` are reasoning hints with no portable
# mapping (OpenAI reasoning models reason anyway; other models reject reasoning parameters);
# `cache_control` is a caching hint (OpenAI caches prefixes automatically); `service_tier`,
# `speed` and `diagnostics` are Anthropic-side scheduling and telemetry.
_MESSAGES_DROPPED = frozenset({"thinking", "cache_control", "service_tier", "speed", "diagnostics"})


_MESSAGES_MAPPED = frozenset({"model", "messages", "system", "max_tokens", "stop_sequences", "temperature",
                              "top_p", "stream", "tools", "tool_choice", "metadata", "output_config"})


_ANTHROPIC_TO_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
                        "max_tokens": "length", "model_context_window_exceeded": "length",
                        "tool_use": "tool_calls", "refusal": "content_filter"}


_FINISH_TO_ANTHROPIC = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                        "function_call": "tool_use", "content_filter": "refusal"}


# OpenAI error `type`/`code` -> the Anthropic error types the SDK knows; anything else is api_error.
_OPENAI_TO_ANTHROPIC_ERROR = {"invalid_request_error": "invalid_request_error",
                              "authentication_error": "authentication_error", "invalid_api_key": "authentication_error",
                              "permission_error": "permission_error", "not_found_error": "not_found_error",
                              "model_not_found": "not_found_error", "rate_limit_exceeded": "rate_limit_error",
                              "rate_limit_error": "rate_limit_error", "insufficient_quota": "billing_error",
                              "server_error": "api_error", "timeout": "timeout_error", "overloaded": "overloaded_error"}


def _unsupported(field: str, why: str) -> ProxyError:
    return ProxyError(400, "invalid_request", f"'{field}' {why}")


def _to_anthropic_error(field: str) -> ProxyError:
    return _unsupported(field, "is not supported when the model is served through the Anthropic Messages API; "
                               "remove it or choose a model served in the OpenAI dialect")


def _to_openai_error(field: str) -> ProxyError:
    return _unsupported(field, "is not supported when the model is served through the OpenAI chat API; "
                               "remove it or choose a model served in the Anthropic dialect")


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _json_args(text: Any, where: str) -> dict:
    """Tool-call arguments (a JSON string) -> the object Anthropic wants as `input`."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return {}  # clients send "" for tools without parameters
    if not isinstance(text, str):
        raise _unsupported(where, "must be a JSON string")
    try:
        value = json.loads(text)
    except ValueError:
        raise _unsupported(where, "is not valid JSON; tool-call arguments must be a JSON object") from None
    if not isinstance(value, dict):
        raise _unsupported(where, "must encode a JSON object")
    return value


def _same(value: Any, neutral: Any) -> bool:
    if isinstance(value, bool) or isinstance(neutral, bool):
        return value is neutral  # True is not a valid `n`, 0 is not `logprobs: false`
    return value == neutral


def _check_fields(body: dict, mapped: frozenset, dropped: frozenset, neutral: dict, error) -> None:
    """Refuse every top-level field that is neither mapped, harmless to drop, nor at its neutral
    value: a field nobody listed (e.g. one a provider adds next month) is a 400, not a guess."""
    if not isinstance(body, dict):
        raise ProxyError(400, "invalid_request", "the request body must be a JSON object")
    for key, value in body.items():
        if value is None or key in mapped or key in dropped:
            continue
        if any(_same(value, ok) for ok in neutral.get(key, ())):
            continue
        raise error(key)


def _number(body: dict, key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _unsupported(key, "must be a number")
    return value


def _positive_int(body: dict, key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _unsupported(key, "must be a positive integer")
    return value


def _text_of_parts(content: Any, where: str, kinds: tuple = ("text",)) -> list[str]:
    """A string or a list of text parts/blocks -> the list of texts; other parts are a 400."""
    if isinstance(content, str):
        return [content]
    if content is None:
        return []
    if not isinstance(content, list):
        raise _unsupported(where, "must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in kinds:
            raise _unsupported(f"{where}[{j}].type", f"must be {' or '.join(kinds)} here (got {kind!r})")
        text = part.get(kind) if kind == "refusal" else part.get("text")
        if not isinstance(text, str):
            raise _unsupported(f"{where}[{j}].text", "must be a string")
        texts.append(text)
    return texts


# -- OpenAI chat request -> Anthropic Messages request -----------------------------------------

def _image_block(part: dict, where: str) -> dict:
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        raise _unsupported(f"{where}.image_url.url", "must be a string")
    if url.startswith("data:"):
        header, comma, data = url.partition(",")
        media, _, encoding = header[5:].partition(";")
        media = "image/jpeg" if media.lower() == "image/jpg" else media.lower()
        if not comma or not encoding.endswith("base64"):
            raise _unsupported(f"{where}.image_url.url", "must be a base64 data URL or an http(s) URL")
        if media not in _ANTHROPIC_IMAGE_TYPES:
            raise _unsupported(f"{where}.image_url.url", f"has media type {media!r}; Anthropic accepts "
                                                         + ", ".join(sorted(_ANTHROPIC_IMAGE_TYPES)))
        return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise _unsupported(f"{where}.image_url.url", "must be an http(s) URL or a base64 data URL")


def _user_blocks(content: Any, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise _unsupported(where, "must be a string or a list of content parts")
    blocks = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _unsupported(f"{where}[{j}].text", "must be a string")
            if part["text"]:  # Anthropic rejects empty text blocks
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image_block(part, f"{where}[{j}]"))
        else:
            raise _to_anthropic_error(f"{where}[{j}].type={kind}")
    return blocks


def _assistant_blocks(msg: dict, where: str) -> list[dict]:
    for key in ("function_call", "audio"):
        if msg.get(key) is not None:
            raise _to_anthropic_error(f"{where}.{key}")
    texts = _text_of_parts(msg.get("content"), f"{where}.content", ("text", "refusal"))
    blocks = [{"type": "text", "text": t} for t in texts if t]
    calls = msg.get("tool_calls") or []
    if not isinstance(calls, list):
        raise _unsupported(f"{where}.tool_calls", "must be a list")
    for k, call in enumerate(calls):
        at = f"{where}.tool_calls[{k}]"
        kind = call.get("type", "function") if isinstance(call, dict) else type(call).__name__
        if kind != "function":
            raise _to_anthropic_error(f"{at}.type={kind}")
        fn = call.get("function") or {}
        if not isinstance(call.get("id"), str) or not isinstance(fn.get("name"), str):
            raise _unsupported(at, "needs an 'id' and a 'function.name'")
        blocks.append({"type": "tool_use", "id": call["id"], "name": fn["name"],
                       "input": _json_args(fn.get("arguments"), f"{at}.function.arguments")})
    return blocks


def _tool_result_block(msg: dict, where: str) -> dict:
    if not isinstance(msg.get("tool_call_id"), str):
        raise _unsupported(f"{where}.tool_call_id", "is required on tool messages")
    block = {"type": "tool_result", "tool_use_id": msg["tool_call_id"]}
    content = msg.get("content")
    if isinstance(content, list):
        texts = _text_of_parts(content, f"{where}.content")
        if any(texts):
            block["content"] = [{"type": "text", "text": t} for t in texts if t]
    else:
        text = "".join(_text_of_parts(content, f"{where}.content"))
        if text:
            block["content"] = text
    return block


def _append_turn(turns: list[dict], role: str, blocks: list[dict]) -> None:
    """Anthropic requires user and assistant turns to alternate: same-role neighbours merge."""
    if not blocks:
        return  # an empty turn is a 400 upstream and says nothing
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": list(blocks)})


def _compact(content: list[dict]) -> str | list[dict]:
    if len(content) == 1 and content[0].get("type") == "text":
        return content[0]["text"]
    return content


def _chat_tools(tools: Any) -> list[dict]:
    if not isinstance(tools, list):
        raise _unsupported("tools", "must be a list")
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type", "function") if isinstance(tool, dict) else None
        if kind != "function":
            raise _to_anthropic_error(f"tools[{i}].type={kind}")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _unsupported(f"tools[{i}].function.name", "is required")
        entry = {"name": fn["name"]}
        if isinstance(fn.get("description"), str):
            entry["description"] = fn["description"]
        entry["input_schema"] = fn.get("parameters") or {"type": "object", "properties": {}}
        if fn.get("strict") is True:
            entry["strict"] = True
        out.append(entry)
    return out


def _chat_tool_choice(choice: Any, parallel: Any) -> dict | None:
    if parallel is not None and not isinstance(parallel, bool):
        raise _unsupported("parallel_tool_calls", "must be true or false")
    if choice is None or choice == "auto":
        result = {"type": "auto"} if choice is not None or parallel is False else None
    elif choice == "none":
        return {"type": "none"}  # Anthropic's none takes no parallel flag
    elif choice == "required":
        result = {"type": "any"}
    elif isinstance(choice, dict) and choice.get("type") == "function" \
            and isinstance((choice.get("function") or {}).get("name"), str):
        result = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise _to_anthropic_error(f"tool_choice={json.dumps(choice)[:60]}")
    if parallel is False:
        result["disable_parallel_tool_use"] = True
    return result


def _chat_response_format(fmt: Any) -> dict | None:
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise _unsupported("response_format.json_schema.schema", "must be a JSON Schema object")
        # Anthropic structured outputs always constrain decoding, i.e. behave like strict: true.
        return {"format": {"type": "json_schema", "schema": spec["schema"]}}
    kind = fmt.get("type") if isinstance(fmt, dict) else fmt
    raise _to_anthropic_error(f"response_format={kind}")


def chat_to_messages_request(body: dict) -> dict:
    """An OpenAI chat completions request -> the equivalent Anthropic Messages request.
    Raises ProxyError(400, 'invalid_request') naming the field for anything without a faithful
    mapping (n > 1, logprobs, penalties, audio, legacy functions, json_object, ...)."""
    _check_fields(body, _CHAT_MAPPED, _CHAT_DROPPED, _CHAT_NEUTRAL, _to_anthropic_error)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _unsupported("messages", "must be a non-empty list of messages")
    system: list[list[str]] = []
    system_blocks = False
    turns: list[dict] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _unsupported(where, "must be an object")
        role = msg.get("role")
        if role in ("system", "developer"):
            system_blocks = system_blocks or isinstance(msg.get("content"), list)
            system.append(_text_of_parts(msg.get("content"), f"{where}.content"))
        elif role == "user":
            _append_turn(turns, "user", _user_blocks(msg.get("content"), f"{where}.content"))
        elif role == "assistant":
            _append_turn(turns, "assistant", _assistant_blocks(msg, where))
        elif role == "tool":
            _append_turn(turns, "user", [_tool_result_block(msg, where)])
        else:
            raise _to_anthropic_error(f"{where}.role={role}")
    if not turns:
        raise _unsupported("messages", "needs at least one non-empty user or assistant message")

    max_tokens = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
    out: dict = {"model": body.get("model"), "max_tokens": max_tokens or DEFAULT_ANTHROPIC_MAX_TOKENS}
    if system_blocks:
        blocks = [{"type": "text", "text": t} for texts in system for t in texts if t]
        if blocks:
            out["system"] = blocks
    else:
        joined = "\n\n".join(t for texts in system for t in texts if t)
        if joined:
            out["system"] = joined
    out["messages"] = [{"role": t["role"], "content": _compact(t["content"])} for t in turns]

    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _unsupported("stop", "must be a string or a list of strings")
        if any(stops):
            out["stop_sequences"] = [s for s in stops if s]
    temperature = _number(body, "temperature")
    if temperature is not None:
        out["temperature"] = max(0.0, min(_ANTHROPIC_MAX_TEMPERATURE, temperature))
    if _number(body, "top_p") is not None:
        out["top_p"] = body["top_p"]
    if body.get("tools"):
        out["tools"] = _chat_tools(body["tools"])
        choice = _chat_tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice is not None:
            out["tool_choice"] = choice
    elif body.get("tool_choice") not in (None, "auto", "none"):
        raise _unsupported("tool_choice", "names a tool but the request has no 'tools'")
    fmt = _chat_response_format(body.get("response_format"))
    if fmt is not None:
        out["output_config"] = fmt
    user = body.get("user") if body.get("user") is not None else body.get("safety_identifier")
    if user is not None:
        if not isinstance(user, str):
            raise _unsupported("user", "must be a string")
        out["metadata"] = {"user_id": user}
    if body.get("stream") is not None:
        if not isinstance(body["stream"], bool):
            raise _unsupported("stream", "must be true or false")
        out["stream"] = body["stream"]
    return out


# -- Anthropic Messages response -> OpenAI chat response ---------------------------------------

def _chat_usage(raw: dict) -> dict:
    cached = raw.get("cache_read_input_tokens") or 0
    prompt = (raw.get("input_tokens") or 0) + cached + (raw.get("cache_creation_input_tokens") or 0)
    completion = raw.get("output_tokens") or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _usage_from_anthropic(raw: dict) -> "Usage":
    cached = raw.get("cache_read_input_tokens") or 0
    created = raw.get("cache_creation_input_tokens") or 0
    return Usage(input_tokens=(raw.get("input_tokens") or 0) + cached + created,
                 output_tokens=raw.get("output_tokens") or 0,
                 cached_input_tokens=cached, cache_creation_tokens=created)


def messages_to_chat_response(msg: dict, model: str) -> dict:
    """An Anthropic Message -> an OpenAI chat.completion (one choice)."""
    texts, calls = [], []
    for block in msg.get("content") or ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "type": "function", "function": {
                "name": block.get("name"), "arguments": json.dumps(block.get("input") or {})}})
        # thinking, redacted_thinking and server-tool blocks are not relayed (see banner)
    message: dict = {"role": "assistant", "content": "".join(texts) if texts or not calls else None,
                     "refusal": None}
    if calls:
        message["tool_calls"] = calls
    return {"id": f"chatcmpl-{msg.get('id') or _new_id('')}", "object": "chat.completion",
            "created": int(time.time()), "model": model or msg.get("model") or "", "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": _ANTHROPIC_TO_FINISH.get(msg.get("stop_reason"), "stop")}],
            "usage": _chat_usage(msg.get("usage") or {})}


def messages_to_chat_error(body: dict) -> dict:
    """An Anthropic error body (or `error` stream event) -> the OpenAI error shape."""
    err = body.get("error") if isinstance(body.get("error"), dict) else {}
    kind = err.get("type") or "api_error"
    return {"error": {"message": err.get("message") or "the upstream model reported an error",
                      "type": kind, "param": None, "code": kind}}


class MessagesToChatStream:
    """An Anthropic Messages event stream -> OpenAI chat.completion.chunk payloads, one event at
    a time: each `feed` returns what can be said now (payload dicts, and "[DONE]" at the end)."""

    def __init__(self, model: str, include_usage: bool):
        self.model = model
        self.include_usage = include_usage
        self._id = ""
        self._created = int(time.time())
        self._raw: dict = {}            # Anthropic usage fields seen so far (latest wins: cumulative)
        self._tool_index: dict = {}     # Anthropic block index -> OpenAI tool_calls index
        self._started = False
        self._finished = False          # the chunk with finish_reason went out
        self._done = False

    @property
    def usage(self) -> "Usage":
        return _usage_from_anthropic(self._raw)

    def _chunk(self, delta: dict, finish: str | None = None) -> dict:
        return {"id": self._id, "object": "chat.completion.chunk", "created": self._created, "model": self.model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def _start(self, message: dict | None = None) -> list:
        if self._started:
            return []
        self._started = True
        self._id = f"chatcmpl-{(message or {}).get('id') or _new_id('')}"
        return [self._chunk({"role": "assistant", "content": ""})]

    def feed(self, event: str | None, payload: dict) -> list:
        if self._done or not isinstance(payload, dict):
            return []
        handler = self._HANDLERS.get(payload.get("type") or event)
        return handler(self, payload) if handler is not None else []  # ping and future events

    def finish(self) -> list:
        """The upstream stream ended without `message_stop`."""
        if self._done:
            return []
        if self._finished:
            return self._on_message_stop({})
        self._done = True
        return [{"error": {"message": "the upstream model ended the stream before the answer was complete; "
                                      "retry the request", "type": "api_error", "param": None,
                           "code": "incomplete_stream"}}]

    def _on_message_start(self, payload: dict) -> list:
        message = payload.get("message") or {}
        self._raw.update(message.get("usage") or {})
        return self._start(message)

    def _on_block_start(self, payload: dict) -> list:
        out = self._start()
        block = payload.get("content_block") or {}
        kind = block.get("type")
        if kind == "text" and block.get("text"):
            out.append(self._chunk({"content": block["text"]}))
        elif kind == "tool_use":
            n = self._tool_index[payload.get("index", 0)] = len(self._tool_index)
            args = json.dumps(block["input"]) if block.get("input") else ""
            out.append(self._chunk({"tool_calls": [{"index": n, "id": block.get("id"), "type": "function",
                                                    "function": {"name": block.get("name"), "arguments": args}}]}))
        return out

    def _on_block_delta(self, payload: dict) -> list:
        out = self._start()
        delta = payload.get("delta") or {}
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            out.append(self._chunk({"content": delta["text"]}))
        elif kind == "input_json_delta" and delta.get("partial_json"):
            n = self._tool_index.get(payload.get("index", 0))
            if n is not None:
                call = {"index": n, "function": {"arguments": delta["partial_json"]}}
                out.append(self._chunk({"tool_calls": [call]}))
        return out  # thinking, signature and citation deltas are not relayed (see banner)

    def _on_message_delta(self, payload: dict) -> list:
        out = self._start()
        self._raw.update({k: v for k, v in (payload.get("usage") or {}).items() if v is not None})
        reason = (payload.get("delta") or {}).get("stop_reason")
        if reason and not self._finished:
            self._finished = True
            out.append(self._chunk({}, _ANTHROPIC_TO_FINISH.get(reason, "stop")))
        return out

    def _on_message_stop(self, payload: dict) -> list:
        out = self._start()
        if not self._finished:
            self._finished = True
            out.append(self._chunk({}, "stop"))
        if self.include_usage:
            out.append({**self._chunk({}), "choices": [], "usage": _chat_usage(self._raw)})
        self._done = True
        return out + ["[DONE]"]

    def _on_error(self, payload: dict) -> list:
        self._done = True
        return [messages_to_chat_error(payload)]

    _HANDLERS = {"message_start": _on_message_start, "content_block_start": _on_block_start,
                 "content_block_delta": _on_block_delta, "message_delta": _on_message_delta,
                 "message_stop": _on_message_stop, "error": _on_error}


# -- Anthropic Messages request -> OpenAI chat request -----------------------------------------

def _image_part(block: dict, where: str) -> dict:
    source = block.get("source") or {}
    if source.get("type") == "base64" and isinstance(source.get("data"), str):
        url = f"data:{source.get('media_type')};base64,{source['data']}"
    elif source.get("type") == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise _to_openai_error(f"{where}.source.type={source.get('type')}")
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_message(block: dict, where: str) -> dict:
    if not isinstance(block.get("tool_use_id"), str):
        raise _unsupported(f"{where}.tool_use_id", "is required on tool_result blocks")
    content = block.get("content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text":
                raise _to_openai_error(f"{where}.content[{j}].type={kind}")
    text = "\n".join(_text_of_parts(content, f"{where}.content"))
    if block.get("is_error"):
        text = f"[tool error] {text}"  # OpenAI tool messages have no error flag
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": text}


def _messages_turn(msg: dict, where: str) -> list[dict]:
    """One Anthropic message -> one or more OpenAI messages (tool results become `tool` messages,
    which OpenAI wants right after the assistant's tool_calls, so they go first)."""
    role, content = msg.get("role"), msg.get("content")
    if role not in ("user", "assistant", "system"):
        raise _to_openai_error(f"{where}.role={role}")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if role == "system":
        return [{"role": "system", "content": "\n\n".join(t for t in _text_of_parts(content, f"{where}.content") if t)}]
    if not isinstance(content, list):
        raise _unsupported(f"{where}.content", "must be a string or a list of content blocks")
    tools_out, parts, calls = [], [], []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image" and role == "user":
            parts.append(_image_part(block, at))
        elif kind == "tool_result" and role == "user":
            tools_out.append(_tool_message(block, at))
        elif kind == "tool_use" and role == "assistant":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"), "arguments": json.dumps(block.get("input") or {})}})
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # signed reasoning only the Anthropic model can read back (see banner)
        else:
            raise _to_openai_error(f"{at}.type={kind}")
    out = tools_out
    if role == "assistant":
        if parts or calls:
            text = "".join(p["text"] for p in parts)
            message: dict = {"role": "assistant", "content": text if parts or not calls else None}
            if calls:
                message["tool_calls"] = calls
            out.append(message)
    elif parts:
        only_text = len(parts) == 1 and parts[0]["type"] == "text"
        out.append({"role": "user", "content": parts[0]["text"] if only_text else parts})
    return out


def _messages_tools(tools: Any) -> list[dict]:
    if not isinstance(tools, list):
        raise _unsupported("tools", "must be a list")
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else "?"
        if kind not in (None, "custom"):  # server tools (web_search_..., bash_..., ...) run at Anthropic
            raise _to_openai_error(f"tools[{i}].type={kind}")
        if not isinstance(tool.get("name"), str):
            raise _unsupported(f"tools[{i}].name", "is required")
        fn = {"name": tool["name"]}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        fn["parameters"] = tool.get("input_schema") or {"type": "object", "properties": {}}
        if tool.get("strict") is True:
            fn["strict"] = True
        out.append({"type": "function", "function": fn})
    return out


def _messages_tool_choice(choice: Any) -> tuple[Any, bool | None]:
    """Anthropic tool_choice -> (OpenAI tool_choice, parallel_tool_calls or None)."""
    if choice is None:
        return None, None
    kind = choice.get("type") if isinstance(choice, dict) else None
    parallel = False if kind and choice.get("disable_parallel_tool_use") is True else None
    if kind in ("auto", "none"):
        return kind, parallel
    if kind == "any":
        return "required", parallel
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}, parallel
    raise _to_openai_error(f"tool_choice={json.dumps(choice)[:60]}")


def messages_to_chat_request(body: dict) -> dict:
    """An Anthropic Messages request -> the equivalent OpenAI chat completions request.
    Raises ProxyError(400, 'invalid_request') naming the field for what OpenAI chat cannot carry
    (document blocks, server tools, top_k, MCP servers, ...)."""
    _check_fields(body, _MESSAGES_MAPPED, _MESSAGES_DROPPED, {}, _to_openai_error)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _unsupported("messages", "must be a non-empty list of messages")
    out: dict = {"model": body.get("model")}
    chat: list[dict] = []
    system = body.get("system")
    if system is not None:
        text = "\n\n".join(t for t in _text_of_parts(system, "system") if t)
        if text:
            chat.append({"role": "system", "content": text})
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _unsupported(f"messages[{i}]", "must be an object")
        chat.extend(_messages_turn(msg, f"messages[{i}]"))
    out["messages"] = chat
    max_tokens = _positive_int(body, "max_tokens")
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _unsupported("stop_sequences", "must be a list of strings")
        if stops:
            out["stop"] = stops
    for key in ("temperature", "top_p"):
        if _number(body, key) is not None:
            out[key] = body[key]
    if body.get("tools"):
        out["tools"] = _messages_tools(body["tools"])
        choice, parallel = _messages_tool_choice(body.get("tool_choice"))
        if choice is not None:
            out["tool_choice"] = choice
        if parallel is not None:
            out["parallel_tool_calls"] = parallel
    config = body.get("output_config")
    if config is not None:
        if not isinstance(config, dict):
            raise _unsupported("output_config", "must be an object")
        for key, value in config.items():
            if key == "format" and value is not None:
                if not (isinstance(value, dict) and value.get("type") == "json_schema"
                        and isinstance(value.get("schema"), dict)):
                    raise _to_openai_error(f"output_config.format={json.dumps(value)[:60]}")
                out["response_format"] = {"type": "json_schema", "json_schema": {
                    "name": "output", "schema": value["schema"], "strict": True}}
            elif key != "effort" and value is not None:  # effort: see _MESSAGES_DROPPED
                raise _to_openai_error(f"output_config.{key}")
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        out["user"] = metadata["user_id"]
    if body.get("stream") is not None:
        if not isinstance(body["stream"], bool):
            raise _unsupported("stream", "must be true or false")
        out["stream"] = body["stream"]
        if body["stream"]:
            out["stream_options"] = {"include_usage": True}
    return out


# -- OpenAI chat response -> Anthropic Messages response ---------------------------------------

def _anthropic_usage(raw: dict) -> dict:
    cached = (raw.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {"input_tokens": max(0, (raw.get("prompt_tokens") or 0) - cached), "output_tokens":
            raw.get("completion_tokens") or 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def _usage_from_openai(raw: dict) -> "Usage":
    return Usage(input_tokens=raw.get("prompt_tokens") or 0, output_tokens=raw.get("completion_tokens") or 0,
                 cached_input_tokens=(raw.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
                 reasoning_tokens=(raw.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)


def _upstream_args(text: Any, where: str) -> dict:
    try:
        return _json_args(text, where)
    except ProxyError:
        raise ProxyError(502, "upstream_invalid_response", f"the upstream model returned {where} that is not a "
                         "JSON object, which the Anthropic format cannot carry; retry the request") from None


def chat_to_messages_response(resp: dict, model: str) -> dict:
    """An OpenAI chat.completion -> an Anthropic Message (the first choice)."""
    choices = resp.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    content = []
    text = message.get("content")
    if isinstance(text, list):  # some compatible servers answer with parts
        text = "".join(p.get("text") or "" for p in text if isinstance(p, dict))
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        text = (text or "") + refusal
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    calls = list(message.get("tool_calls") or ())
    if isinstance(message.get("function_call"), dict):  # legacy single function call
        calls.append({"id": _new_id("toolu_"), "function": message["function_call"]})
    for k, call in enumerate(calls):
        fn = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id") or _new_id("toolu_"), "name": fn.get("name") or "",
                        "input": _upstream_args(fn.get("arguments"), f"tool_calls[{k}].function.arguments")})
    finish = choice.get("finish_reason")
    if calls and finish in (None, "stop", "tool_calls", "function_call"):
        stop = "tool_use"  # several compatible servers say "stop" after a tool call
    elif refusal:
        stop = "refusal"
    else:
        stop = _FINISH_TO_ANTHROPIC.get(finish, "end_turn")
    return {"id": f"msg_{resp.get('id') or _new_id('')}", "type": "message", "role": "assistant",
            "model": model or resp.get("model") or "", "content": content, "stop_reason": stop,
            "stop_sequence": None, "usage": _anthropic_usage(resp.get("usage") or {})}


def chat_to_messages_error(body: dict) -> dict:
    """An OpenAI error body (or error chunk) -> the Anthropic error shape."""
    err = body.get("error") if isinstance(body.get("error"), dict) else {}
    kind = "api_error"
    for key in (err.get("code"), err.get("type")):
        if isinstance(key, str) and key in _OPENAI_TO_ANTHROPIC_ERROR:
            kind = _OPENAI_TO_ANTHROPIC_ERROR[key]
            break
    return {"type": "error", "error": {"type": kind, "message": err.get("message")
                                       or "the upstream model reported an error"}}


class ChatToMessagesStream:
    """An OpenAI chat.completion.chunk stream -> Anthropic Messages events, one chunk at a time:
    each `feed` returns the (event name, payload) pairs that can be sent now. The final
    message_delta waits for the usage chunk (or `[DONE]`) so it carries the real token counts."""

    def __init__(self, model: str):
        self.model = model
        self._raw: dict = {}            # OpenAI usage as last reported
        self._tool_block: dict = {}     # OpenAI tool_calls index -> Anthropic block index
        self._open: int | None = None   # index of the content block being written
        self._open_text = False
        self._blocks = 0
        self._stop: str | None = None   # Anthropic stop_reason once a finish_reason arrived
        self._refused = False
        self._started = False
        self._delta_sent = False
        self._done = False

    @property
    def usage(self) -> "Usage":
        return _usage_from_openai(self._raw)

    def _start(self, chunk: dict) -> list:
        if self._started:
            return []
        self._started = True
        usage = _anthropic_usage(self._raw)
        message = {"id": f"msg_{chunk.get('id') or _new_id('')}", "type": "message", "role": "assistant",
                   "model": self.model, "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": usage["input_tokens"], "output_tokens": 0}}
        return [("message_start", {"type": "message_start", "message": message})]

    def _close(self) -> list:
        if self._open is None:
            return []
        index, self._open, self._open_text = self._open, None, False
        return [("content_block_stop", {"type": "content_block_stop", "index": index})]

    def _open_block(self, block: dict) -> list:
        out = self._close()
        self._open, self._blocks = self._blocks, self._blocks + 1
        out.append(("content_block_start", {"type": "content_block_start", "index": self._open,
                                            "content_block": block}))
        return out

    def _text(self, text: str) -> list:
        out = [] if self._open_text else self._open_block({"type": "text", "text": ""})
        self._open_text = True
        out.append(("content_block_delta", {"type": "content_block_delta", "index": self._open,
                                            "delta": {"type": "text_delta", "text": text}}))
        return out

    def _tool(self, call: dict) -> list:
        fn = call.get("function") or {}
        key = call.get("index", 0)
        out = []
        if key not in self._tool_block:
            out = self._open_block({"type": "tool_use", "id": call.get("id") or _new_id("toolu_"),
                                    "name": fn.get("name") or "", "input": {}})
            self._tool_block[key] = self._open
        args = fn.get("arguments")
        if isinstance(args, str) and args:
            out.append(("content_block_delta", {"type": "content_block_delta", "index": self._tool_block[key],
                                                "delta": {"type": "input_json_delta", "partial_json": args}}))
        return out

    def _message_delta(self) -> list:
        self._delta_sent = True
        usage = _anthropic_usage(self._raw)
        counts = {"output_tokens": usage["output_tokens"]}
        if self._raw:
            counts.update(input_tokens=usage["input_tokens"], cache_read_input_tokens=usage["cache_read_input_tokens"])
        return [("message_delta", {"type": "message_delta", "delta": {
            "stop_reason": self._stop or "end_turn", "stop_sequence": None}, "usage": counts})]

    def _end(self) -> list:
        out = self._start({}) + self._close()
        if not self._delta_sent:
            out += self._message_delta()
        self._done = True
        return out + [("message_stop", {"type": "message_stop"})]

    def feed(self, event: str | None, payload: dict | str) -> list[tuple[str, dict]]:
        if self._done:
            return []
        if isinstance(payload, str):
            return self._end() if payload.strip() == "[DONE]" else []
        if not isinstance(payload, dict):
            return []
        if isinstance(payload.get("error"), dict):
            self._done = True
            return [("error", chat_to_messages_error(payload))]
        usage_now = isinstance(payload.get("usage"), dict)
        if usage_now:
            self._raw = payload["usage"]
        out = self._start(payload)
        for choice in payload.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0 or self._stop is not None:
                continue
            delta = choice.get("delta") or {}
            for key in ("content", "refusal"):
                if isinstance(delta.get(key), str) and delta[key]:
                    self._refused = self._refused or key == "refusal"
                    out += self._text(delta[key])
            for call in delta.get("tool_calls") or ():
                if isinstance(call, dict):
                    out += self._tool(call)
            finish = choice.get("finish_reason")
            if finish:
                out += self._close()
                self._stop = "refusal" if self._refused else "tool_use" if self._tool_block and finish == "stop" \
                    else _FINISH_TO_ANTHROPIC.get(finish, "end_turn")
        if self._stop is not None and usage_now and not self._delta_sent:
            out += self._message_delta()
        return out

    def finish(self) -> list[tuple[str, dict]]:
        """The upstream stream ended without `[DONE]`: close what is open; if no finish reason
        was seen the answer is incomplete, which is said with an error event."""
        if self._done:
            return []
        if self._stop is not None:
            return self._end()
        out = self._close()
        self._done = True
        return out + [("error", {"type": "error", "error": {
            "type": "api_error", "message": "the upstream model ended the stream before the answer was complete; "
                                            "retry the request"}})]


class TranslateStage:
    """The stream stage of a translation: upstream events -> events of the client's dialect,
    by one of the translators above (whose `usage` is the count the upstream reported). Events
    without data (comments, keep-alives) have nothing to translate and are dropped."""
    __slots__ = ("translator",)

    def __init__(self, translator: "MessagesToChatStream | ChatToMessagesStream"):
        self.translator = translator

    @property
    def usage(self) -> "Usage":
        return self.translator.usage

    def feed(self, events: list[SSEEvent]) -> list[SSEEvent]:
        out = []
        for ev in events:
            if ev.payload:
                out += self._events(self.translator.feed(ev.event, ev.payload))
        return out

    def finish(self) -> list[SSEEvent]:
        return self._events(self.translator.finish())

    @staticmethod
    def _events(items: list) -> list[SSEEvent]:
        return [SSEEvent(None, item[0], payload=item[1]) if isinstance(item, tuple) else SSEEvent(None, payload=item)
                for item in items]
