"""One adapter per wire format: where the text is, prompts, output caps, usage and streams."""

import dataclasses
import itertools
import json
from typing import Any, Iterator, TYPE_CHECKING

from .errors import ProxyError
from .limits.prices import Usage
from .providers import _STRUCTURAL_KEYS, _content_groups, _field_groups, _parts_groups, _walk_slots
from .translate import (ChatToMessagesStream, MessagesToChatStream, chat_to_messages_error, chat_to_messages_request,
                        chat_to_messages_response, messages_to_chat_error, messages_to_chat_request,
                        messages_to_chat_response)

if TYPE_CHECKING:  # names used in annotations only
    from .providers import Provider


def _parts_slots(content: Any) -> Iterator[tuple[Any, Any]]:
    """Every text slot of a list of parts/blocks (see _parts_groups), ungrouped."""
    for group in _parts_groups(content):
        yield from group


def _description_groups(value: Any) -> Iterator[list]:
    """Descriptions and titles anywhere in tool/function definitions or schemas (the model
    reads them; names and schema structure are left alone)."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key in ("description", "title"):
                if isinstance(node.get(key), str) and node[key]:
                    yield [(node, key)]
            stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))


def _message_extra_groups(msg: dict, known: tuple) -> Iterator[list]:
    """Every other field of a message (refusal, tool_calls and legacy function_call arguments,
    reasoning_content, fields not yet documented), structural keys left out."""
    for key in msg:
        if key not in known and key not in _STRUCTURAL_KEYS:
            yield from _field_groups(msg, key)


def _list_slots(holder: dict, key: str) -> Iterator[tuple[Any, Any]]:
    value = holder.get(key)
    if isinstance(value, str):
        yield holder, key
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, str):
                yield value, i


def _bad(message: str):
    raise ProxyError(400, "invalid_request", message)


def check_model_name(model: Any) -> str:
    """A model name the proxy can match, log and echo in a header: a non-empty string without
    control characters or surrounding whitespace (which would match no rule as the client meant)."""
    if not isinstance(model, str) or not model:
        _bad("the request body needs a 'model' string")
    if not model.isprintable() or model != model.strip():
        _bad("'model' must be a plain model name, without control characters or leading or trailing "
             "spaces; send the name as /v1/models lists it")
    return model


class Dialect:
    """Adapter for one endpoint's wire format. The pipeline talks to this, never to raw JSON.

    Streams: each SSE event's JSON payload is classified into text deltas (keyed per output
    channel: a choice, a content block, an output part), the channels it closes, and usage."""
    name = ""
    path = ""                  # the governed endpoint that speaks this dialect
    family = "openai"          # error shape, and the provider that speaks it natively
    cap_fields: tuple = ("max_tokens",)
    produces_output = True     # False: no output tokens to reserve or cap (embeddings)
    asks_stream_usage = False  # True: a stream reports usage only when asked (stream_options)
    # The dialect of the other family this one is translated to and from (chat <-> messages),
    # and the functions that do it: set on the instances below, None where there is none.
    peer: "Dialect | None" = None
    sequence_field: str | None = None  # stream events numbered in order; the relay renumbers
                                       # them when it adds events of its own
    # Other top-level fields the proxy reads: name -> (JSON types allowed, how to say so); null
    # counts as absent.
    field_types: dict = {"stream_options": (dict, 'an object such as {"include_usage": true}')}

    def model(self, body: dict) -> str:
        return check_model_name(body.get("model"))

    def check(self, body: dict) -> None:
        """The types of everything the proxy reads or bounds, before anything is decided: a
        wrong one is a 400 here, never a 500 later nor a cap forwarded unbounded ("ten", -1)."""
        for name in self.cap_fields:
            value = body.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                _bad(f"'{name}' must be a whole number of at least 1")
        for name, (types, what) in self.field_types.items():
            if body.get(name) is not None and not isinstance(body[name], types):
                _bad(f"'{name}' must be {what}")
        list(self.input_slots(body))

    def is_stream(self, body: dict) -> bool:
        value = body.get("stream", False)
        if not isinstance(value, bool):
            _bad("'stream' must be true or false")
        return value

    def input_slots(self, body: dict) -> Iterator[tuple[Any, Any]]:
        return iter(())

    def input_groups(self, body: dict) -> Iterator[list]:
        """The input slots in groups; the slots of one group are scanned as one text (adjacent
        text parts of a message), each other slot is a group of its own."""
        for slot in self.input_slots(body):
            yield [slot]

    def output_slots(self, body: dict) -> Iterator[tuple[Any, Any]]:
        return iter(())

    def usage(self, body: dict) -> "Usage":
        return Usage()

    def last_user_text(self, body: dict) -> str:
        texts = [holder[key] for holder, key in self.input_slots(body)]
        return texts[-1] if texts else ""

    def inject_prompts(self, body: dict, prompts: tuple) -> None:
        """Place the policy's prompts before the client's own messages."""

    def requested_output(self, body: dict) -> int | None:
        for name in self.cap_fields:
            value = body.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    def set_output_cap(self, body: dict, limit: int, provider: "Provider") -> None:
        for name in self.cap_fields:
            if name in body:
                body[name] = limit
                return
        body[self.cap_fields[0]] = limit

    # -- translation to and from the upstream's dialect ----------------------------------------
    def speaking(self, provider_family: str) -> "Dialect | None":
        """The dialect to send to a provider of `provider_family`: this one, its peer, or None
        when this endpoint cannot be translated to that family."""
        if provider_family == self.family:
            return self
        return self.peer if self.peer is not None and self.peer.family == provider_family else None

    def translate_request(self, body: dict, upstream: "Dialect", provider_name: str) -> dict | None:
        """The request in the upstream's dialect, or None when the upstream speaks this one.
        Shape errors (a field the other dialect cannot carry) surface as the translate
        module raises them."""
        return None if upstream is self else self._request_to_peer(body, provider_name)

    def _request_to_peer(self, body: dict, provider_name: str) -> dict:
        raise NotImplementedError

    def translate_response(self, answer: dict, upstream: "Dialect", model: str) -> dict | None:
        """An upstream answer in this dialect, or None when it already is."""
        return None if upstream is self else self._response_from_peer(answer, model)

    def _response_from_peer(self, answer: dict, model: str) -> dict:
        raise NotImplementedError

    def translate_error(self, data: bytes, upstream: "Dialect") -> bytes:
        """An upstream error body in this dialect's error shape (unchanged when it is not JSON)."""
        if upstream is self:
            return data
        try:
            body = json.loads(data)
        except ValueError:
            return data
        if not isinstance(body, dict):
            return data
        return json.dumps(self._error_from_peer(body)).encode("utf-8")

    def _error_from_peer(self, body: dict) -> dict:
        raise NotImplementedError

    def stream_translator(self, upstream: "Dialect", model: str, wants_usage: bool) -> Any:
        """A feed/finish translator of the upstream's stream events into this dialect's, or None."""
        return None if upstream is self else self._stream_from_peer(model, wants_usage)

    def _stream_from_peer(self, model: str, wants_usage: bool) -> Any:
        raise NotImplementedError

    def ask_stream_usage(self, body: dict) -> bool:
        """Ask a stream to report usage the client did not ask for; True when the request was
        changed (the relay then strips the usage the client would not have seen)."""
        if not self.asks_stream_usage or (body.get("stream_options") or {}).get("include_usage"):
            return False
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return True

    def strip_stream_usage(self, payload: dict) -> bool | None:
        """Remove from a stream event the usage `ask_stream_usage` asked for: True when it was
        removed, False when there was none, None when the event carried only usage (drop it)."""
        return False

    def stream_error(self, err: ProxyError, body: dict, sequence: int) -> tuple[str | None, dict]:
        """(event name, payload) of the event that ends a stream with an error; `body` is the
        error body of this dialect's family."""
        return ("error" if self.family == "anthropic" else None), body

    # -- streams ------------------------------------------------------------------------------
    def stream_deltas(self, event: str | None, payload: dict) -> list[tuple[Any, Any, Any]]:
        """[(channel, holder, key)] for each text delta carried by this event."""
        return []

    def stream_ends(self, event: str | None, payload: dict) -> list:
        """Channels whose text is complete once this event is reached (flushed before it); a
        tuple also closes every channel it is a prefix of (all channels of a choice, a block)."""
        return []

    def stream_full_texts(self, event: str | None, payload: dict) -> list[tuple[Any, Any]]:
        """(holder, key) slots that repeat a channel's whole text (e.g. Responses `*.done`)."""
        return []

    def tail_event(self, channel, text: str, payload: dict, event: str | None) -> tuple[str | None, dict]:
        """An extra delta event carrying `text` for `channel`, shaped like `payload`."""
        raise NotImplementedError

    def stream_usage(self, event: str | None, payload: dict, usage: "Usage") -> "Usage":
        return usage

    def response_meta(self, payload: dict) -> dict:
        """The served model and finish reason found in an answer or one stream event."""
        meta = {}
        if isinstance(payload.get("model"), str):
            meta["model"] = payload["model"]
        for choice in payload.get("choices") or ():
            if isinstance(choice, dict) and choice.get("finish_reason"):
                meta["finish_reason"] = choice["finish_reason"]
        return meta


class ChatDialect(Dialect):
    name = "chat"
    path = "/v1/chat/completions"
    cap_fields = ("max_completion_tokens", "max_tokens")
    asks_stream_usage = True

    def _request_to_peer(self, body, provider_name):
        return chat_to_messages_request(body)

    def _response_from_peer(self, answer, model):
        return messages_to_chat_response(answer, model)

    def _error_from_peer(self, body):
        return messages_to_chat_error(body)

    def _stream_from_peer(self, model, wants_usage):
        return MessagesToChatStream(model, wants_usage)

    def strip_stream_usage(self, payload):
        if "usage" not in payload:
            return False
        if not payload.get("choices"):
            return None  # the usage chunk itself
        del payload["usage"]
        return True

    def check(self, body):
        for msg in body.get("messages") if isinstance(body.get("messages"), list) else ():
            calls = msg.get("tool_calls") if isinstance(msg, dict) else None
            if calls is not None and not (isinstance(calls, list) and all(isinstance(c, dict) for c in calls)):
                _bad("'tool_calls' must be a list of tool call objects")
        super().check(body)

    def input_slots(self, body):
        for group in self.input_groups(body):
            yield from group

    def input_groups(self, body):
        messages = body.get("messages")
        if not isinstance(messages, list):
            _bad("'messages' must be a list of messages")
        for key in ("tools", "functions", "response_format"):   # definitions the model reads
            yield from _description_groups(body.get(key))
        for msg in messages:
            if not isinstance(msg, dict):
                _bad("each message must be an object")
            yield from _content_groups(msg)
            yield from _message_extra_groups(msg, ("content",))

    def output_slots(self, body):
        for choice in body.get("choices") or ():
            message = choice.get("message") if isinstance(choice, dict) else None
            if isinstance(message, dict):
                for group in itertools.chain(_content_groups(message), _message_extra_groups(message, ("content",))):
                    yield from group

    def usage(self, body):
        u = body.get("usage") or {}
        details = u.get("prompt_tokens_details") or {}
        out_details = u.get("completion_tokens_details") or {}
        return Usage(input_tokens=u.get("prompt_tokens") or 0, output_tokens=u.get("completion_tokens") or 0,
                     cached_input_tokens=details.get("cached_tokens") or 0,
                     reasoning_tokens=out_details.get("reasoning_tokens") or 0)

    def inject_prompts(self, body, prompts):
        body["messages"] = [{"role": p.role, "content": p.content} for p in prompts] + body["messages"]

    def set_output_cap(self, body, limit, provider):
        if "max_tokens" in body and "max_completion_tokens" not in body:
            body["max_tokens"] = limit
        elif "max_completion_tokens" in body or provider.name in ("openai", "azure_openai"):
            body["max_completion_tokens"] = limit  # o-series models refuse max_tokens
        else:
            body["max_tokens"] = limit

    # Channels: (choice, field) for content, refusal and reasoning text; (choice, "tool_calls",
    # call index) and (choice, "function_call") for arguments.
    _DELTA_TEXT_FIELDS = ("content", "refusal", "reasoning_content", "reasoning")

    def stream_deltas(self, event, payload):
        out = []
        for choice in payload.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                continue
            index = choice.get("index", 0)
            for key in self._DELTA_TEXT_FIELDS:
                if isinstance(delta.get(key), str):
                    out.append(((index, key), delta, key))
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    out.append(((index, "tool_calls", call.get("index", 0)), fn, "arguments"))
            fn = delta.get("function_call")
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                out.append(((index, "function_call"), fn, "arguments"))
        return out

    def stream_ends(self, event, payload):
        return [(c.get("index", 0),) for c in payload.get("choices") or ()
                if isinstance(c, dict) and c.get("finish_reason")]

    def tail_event(self, channel, text, payload, event):
        index, kind = channel[0], channel[1]
        if kind == "tool_calls":
            delta = {"tool_calls": [{"index": channel[2], "function": {"arguments": text}}]}
        elif kind == "function_call":
            delta = {"function_call": {"arguments": text}}
        else:
            delta = {kind: text}
        return event, {k: payload[k] for k in ("id", "object", "created", "model") if k in payload} | {
            "choices": [{"index": index, "delta": delta, "finish_reason": None}]}

    def stream_usage(self, event, payload, usage):
        return self.usage(payload) if payload.get("usage") else usage


class CompletionsDialect(ChatDialect):
    name = "completions"
    path = "/v1/completions"
    cap_fields = ("max_tokens",)
    asks_stream_usage = False

    input_groups = Dialect.input_groups

    def input_slots(self, body):
        if not isinstance(body.get("prompt"), (str, list)):
            _bad("'prompt' must be a string or a list of strings")
        return _list_slots(body, "prompt")

    def output_slots(self, body):
        for choice in body.get("choices") or ():
            if isinstance(choice, dict) and isinstance(choice.get("text"), str):
                yield choice, "text"

    def inject_prompts(self, body, prompts):
        prefix = "".join(p.content + "\n\n" for p in prompts)
        if isinstance(body.get("prompt"), str):
            body["prompt"] = prefix + body["prompt"]
        elif isinstance(body.get("prompt"), list):
            body["prompt"] = [prefix + p if isinstance(p, str) else p for p in body["prompt"]]

    def set_output_cap(self, body, limit, provider):
        body["max_tokens"] = limit

    def stream_deltas(self, event, payload):
        return [(c.get("index", 0), c, "text") for c in payload.get("choices") or ()
                if isinstance(c, dict) and isinstance(c.get("text"), str)]

    def stream_ends(self, event, payload):
        return [c.get("index", 0) for c in payload.get("choices") or ()
                if isinstance(c, dict) and c.get("finish_reason")]

    def tail_event(self, channel, text, payload, event):
        return event, {k: payload[k] for k in ("id", "object", "created", "model") if k in payload} | {
            "choices": [{"index": channel, "text": text, "finish_reason": None}]}


class EmbeddingsDialect(ChatDialect):
    name = "embeddings"
    path = "/v1/embeddings"
    cap_fields = ()
    produces_output = False
    asks_stream_usage = False

    input_groups = Dialect.input_groups

    def input_slots(self, body):
        if not isinstance(body.get("input"), (str, list)):
            _bad("'input' must be a string or a list")
        return _list_slots(body, "input")

    def output_slots(self, body):
        return iter(())

    def inject_prompts(self, body, prompts):
        pass  # embeddings have no conversation to prepend to

    def requested_output(self, body):
        return None

    def set_output_cap(self, body, limit, provider):
        pass


class ResponsesDialect(Dialect):
    name = "responses"
    path = "/v1/responses"
    cap_fields = ("max_output_tokens",)
    sequence_field = "sequence_number"

    def stream_error(self, err, body, sequence):
        return "error", {"type": "error", "code": err.code, "message": err.message, "param": None,
                         "sequence_number": sequence}

    def input_slots(self, body):
        for group in self.input_groups(body):
            yield from group

    def input_groups(self, body):
        if isinstance(body.get("instructions"), str):
            yield [(body, "instructions")]
        items = body.get("input")
        if items is not None and not isinstance(items, (str, list)):
            _bad("'input' must be a string or a list of items")
        yield from _description_groups(body.get("tools"))
        if isinstance(items, str):
            yield [(body, "input")]
            return
        yield from self._item_groups(items or ())

    @staticmethod
    def _item_groups(items) -> Iterator[list]:
        """Messages by their content parts; tool outputs as strings or lists of parts; any
        other item (function and custom tool calls, reasoning, unknown types) walked."""
        for i, item in enumerate(items):
            if isinstance(item, str):
                if item:
                    yield [(items, i)]
                continue
            if not isinstance(item, dict):
                continue
            kind = item.get("type")
            if "content" in item and kind in (None, "message"):
                yield from _content_groups(item)
                yield from _message_extra_groups(item, ("content",))
            elif kind in ("function_call_output", "custom_tool_call_output") and isinstance(item.get("output"), list):
                yield from _parts_groups(item["output"])
                yield from _message_extra_groups(item, ("output",))
            else:
                for slot in _walk_slots(item):
                    yield [slot]

    def output_slots(self, body):
        for group in self._item_groups(body.get("output") or ()):
            yield from group

    def usage(self, body):
        u = body.get("usage") or {}
        return Usage(input_tokens=u.get("input_tokens") or 0, output_tokens=u.get("output_tokens") or 0,
                     cached_input_tokens=(u.get("input_tokens_details") or {}).get("cached_tokens") or 0,
                     reasoning_tokens=(u.get("output_tokens_details") or {}).get("reasoning_tokens") or 0)

    def inject_prompts(self, body, prompts):
        items = body.get("input")
        if isinstance(items, str):
            items = [{"role": "user", "content": items}]
        body["input"] = [{"role": p.role, "content": p.content} for p in prompts] + list(items or [])

    # Every `response.*.delta` with a text delta is a channel (item, event family, index field,
    # index): output text, refusals, function and custom tool arguments, reasoning text and
    # summaries. Audio deltas are base64 sound, not text.
    @staticmethod
    def _channel(family: str, payload: dict) -> tuple:
        field_name = next((f for f in ("content_index", "summary_index") if f in payload), None)
        return (payload.get("item_id"), family, field_name, payload.get(field_name, 0) if field_name else 0)

    def stream_deltas(self, event, payload):
        kind = payload.get("type")
        if (isinstance(kind, str) and kind.startswith("response.") and kind.endswith(".delta")
                and not kind.endswith("audio.delta") and isinstance(payload.get("delta"), str)):
            return [(self._channel(kind[:-len(".delta")], payload), payload, "delta")]
        return []

    def stream_ends(self, event, payload):
        kind = payload.get("type")
        if not isinstance(kind, str):
            return []
        if kind == "response.output_item.done" and isinstance(payload.get("item"), dict):
            return [(payload["item"].get("id"),)]
        if kind.startswith("response.") and kind.endswith(".done"):
            return [self._channel(kind[:-len(".done")], payload)]
        return []

    _DONE_TEXT_FIELDS = ("text", "refusal", "arguments", "input", "transcript")

    def stream_full_texts(self, event, payload):
        kind = payload.get("type")
        if not isinstance(kind, str):
            return []
        out = []
        if kind.endswith(".done"):
            out.extend((payload, k) for k in self._DONE_TEXT_FIELDS if isinstance(payload.get(k), str))
        if isinstance(payload.get("part"), dict):
            out.extend(_parts_slots([payload["part"]]))
        if isinstance(payload.get("item"), dict):
            out.extend(self.output_slots({"output": [payload["item"]]}))
        if isinstance(payload.get("response"), dict):
            out.extend(self.output_slots(payload["response"]))
        return out

    def tail_event(self, channel, text, payload, event):
        item_id, family, field_name, index = channel
        out = {"type": family + ".delta", "item_id": item_id, "output_index": payload.get("output_index", 0)}
        if field_name:
            out[field_name] = index
        out["delta"] = text
        return family + ".delta", out

    def stream_usage(self, event, payload, usage):
        response = payload.get("response")
        if isinstance(response, dict) and response.get("usage"):
            return self.usage(response)
        return usage

    def response_meta(self, payload):
        response = payload.get("response") if isinstance(payload.get("response"), dict) else payload
        meta = {}
        if isinstance(response.get("model"), str):
            meta["model"] = response["model"]
        if response.get("status") in ("completed", "incomplete", "failed"):
            meta["finish_reason"] = response["status"]
        return meta


class MessagesDialect(Dialect):
    name = "messages"
    path = "/v1/messages"
    family = "anthropic"
    cap_fields = ("max_tokens",)

    # OpenAI's o-series and gpt-5 refuse max_tokens on chat; other OpenAI-style servers want it.
    _COMPLETION_CAP_PROVIDERS = frozenset(("openai", "azure_openai"))

    def _request_to_peer(self, body, provider_name):
        out = messages_to_chat_request(body)
        if provider_name in self._COMPLETION_CAP_PROVIDERS and "max_tokens" in out:
            out["max_completion_tokens"] = out.pop("max_tokens")
        return out

    def _response_from_peer(self, answer, model):
        return chat_to_messages_response(answer, model)

    def _error_from_peer(self, body):
        return chat_to_messages_error(body)

    def _stream_from_peer(self, model, wants_usage):
        return ChatToMessagesStream(model)

    def input_slots(self, body):
        for group in self.input_groups(body):
            yield from group

    def input_groups(self, body):
        system = body.get("system")
        if isinstance(system, str):
            yield [(body, "system")]
        elif system is not None and not isinstance(system, list):
            _bad("'system' must be a string or a list of text blocks")
        else:
            yield from _parts_groups(system)
        messages = body.get("messages")
        if not isinstance(messages, list):
            _bad("'messages' must be a list of messages")
        yield from _description_groups(body.get("tools"))
        for msg in messages:
            if not isinstance(msg, dict):
                _bad("each message must be an object")
            yield from _content_groups(msg)

    def output_slots(self, body):
        return _parts_slots(body.get("content"))

    def usage(self, body):
        u = body.get("usage") or {}
        cached = u.get("cache_read_input_tokens") or 0
        created = u.get("cache_creation_input_tokens") or 0
        return Usage(input_tokens=(u.get("input_tokens") or 0) + cached + created,
                     output_tokens=u.get("output_tokens") or 0,
                     cached_input_tokens=cached, cache_creation_tokens=created)

    def inject_prompts(self, body, prompts):
        system = [p.content for p in prompts if p.role in ("system", "developer")]
        turns = [{"role": p.role, "content": p.content} for p in prompts if p.role in ("user", "assistant")]
        if system:
            current = body.get("system")
            if isinstance(current, list):
                body["system"] = [{"type": "text", "text": text} for text in system] + current
            else:
                body["system"] = "\n\n".join(system + ([current] if current else []))
        if turns:
            body["messages"] = turns + body["messages"]

    # Channels: (block index, delta type, field): text_delta text, input_json_delta
    # partial_json (a tool call's input), thinking_delta thinking, and the string fields of any
    # delta type not known here. Signatures are opaque, citations point at input already read.
    _DELTA_SKIP = frozenset(("signature_delta", "citations_delta"))

    def stream_deltas(self, event, payload):
        if payload.get("type") != "content_block_delta":
            return []
        delta = payload.get("delta")
        kind = delta.get("type") if isinstance(delta, dict) else None
        if not isinstance(kind, str) or kind in self._DELTA_SKIP:
            return []
        index = payload.get("index", 0)
        return [((index, kind, key), delta, key) for key, value in delta.items()
                if key != "type" and isinstance(value, str)]

    def stream_ends(self, event, payload):
        return [(payload.get("index", 0),)] if payload.get("type") == "content_block_stop" else []

    def stream_full_texts(self, event, payload):
        kind = payload.get("type")
        if kind == "content_block_start" and isinstance(payload.get("content_block"), dict):
            return list(_parts_slots([payload["content_block"]]))
        if kind == "message_start" and isinstance(payload.get("message"), dict):
            return list(self.output_slots(payload["message"]))
        return []

    def tail_event(self, channel, text, payload, event):
        index, kind, key = channel
        return "content_block_delta", {"type": "content_block_delta", "index": index,
                                       "delta": {"type": kind, key: text}}

    def response_meta(self, payload):
        message = payload.get("message") if isinstance(payload.get("message"), dict) else payload
        meta = {}
        if isinstance(message.get("model"), str):
            meta["model"] = message["model"]
        stop = message.get("stop_reason") or (payload.get("delta") or {}).get("stop_reason")
        if stop:
            meta["finish_reason"] = stop
        return meta

    def stream_usage(self, event, payload, usage):
        kind = payload.get("type")
        if kind == "message_start":
            return self.usage(payload.get("message") or {})
        if kind == "message_delta" and payload.get("usage"):
            u = payload["usage"]
            new = dataclasses.replace(usage, output_tokens=u.get("output_tokens") or usage.output_tokens)
            if u.get("input_tokens"):  # some upstreams report input only at the end
                new = dataclasses.replace(new, input_tokens=u["input_tokens"] + new.cached_input_tokens
                                          + new.cache_creation_tokens)
            return new
        return usage


CHAT, COMPLETIONS, EMBEDDINGS = ChatDialect(), CompletionsDialect(), EmbeddingsDialect()


RESPONSES, MESSAGES = ResponsesDialect(), MessagesDialect()


CHAT.peer, MESSAGES.peer = MESSAGES, CHAT


# Governed endpoints: path -> dialect adapter. Everything else under /v1 is passthrough.
GOVERNED = {d.path: d for d in (CHAT, RESPONSES, MESSAGES, COMPLETIONS, EMBEDDINGS)}


def dialect_family(path: str) -> str:
    return "anthropic" if path.startswith("/v1/messages") else "openai"
