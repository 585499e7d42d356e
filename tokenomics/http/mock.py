"""The mock provider: deterministic in-process answers in every dialect, no network."""

import hashlib
import json
import math
import re
import time

from ..dialects import COMPLETIONS, Dialect, EMBEDDINGS, MESSAGES, RESPONSES
from ..errors import ProxyError
from ..http.client import UpstreamCall, UpstreamResponse
from ..stages import sse_bytes as _sse


def _mock_words(text: str) -> list[str]:
    """Stream pieces: words with their following space, so joined pieces equal the text."""
    return re.findall(r"\S+\s*|\s+", text) or [""]


class MockProvider:
    """The `mock` provider: answers governed endpoints in both dialects, stream or not,
    deterministically, with usage numbers computed the way providers do (about 4 chars/token)."""

    def reply(self, dialect: Dialect, body: dict) -> tuple[str, int, int, str]:
        asked = dialect.last_user_text(body).strip()
        text = f"Mock reply: {asked}" if asked else "Hello from the tokenomics mock provider."
        limit = body.get("max_tokens") or body.get("max_completion_tokens") or body.get("max_output_tokens")
        finish = "stop"
        if isinstance(limit, int) and limit > 0 and math.ceil(len(text) / 4) > limit:
            text, finish = text[: limit * 4], "length"
        input_tokens = max(1, math.ceil(len(json.dumps(body.get("messages") or body.get("input")
                                                        or body.get("prompt") or "")) / 4))
        return text, input_tokens, max(1, math.ceil(len(text) / 4)), finish

    def answer(self, dialect: Dialect, body: dict) -> tuple[int, bytes | list[bytes]]:
        """(status, JSON body) or (status, list of SSE event bytes) for a streamed request."""
        model = body.get("model", "mock-1")
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:24]
        created = int(time.time())
        if dialect is EMBEDDINGS:
            inputs = body.get("input") if isinstance(body.get("input"), list) else [body.get("input", "")]
            data = [{"object": "embedding", "index": i,
                     "embedding": [b / 255 for b in hashlib.sha256(str(x).encode()).digest()[:8]]}
                    for i, x in enumerate(inputs)]
            n = sum(max(1, math.ceil(len(str(x)) / 4)) for x in inputs)
            return 200, json.dumps({"object": "list", "data": data, "model": model,
                                    "usage": {"prompt_tokens": n, "total_tokens": n}}).encode()
        text, n_in, n_out, finish = self.reply(dialect, body)
        stream = body.get("stream") is True
        if dialect is MESSAGES:
            return 200, self._messages(model, digest, text, n_in, n_out, finish, stream)
        if dialect is RESPONSES:
            return 200, self._responses(model, digest, created, text, n_in, n_out, stream)
        if dialect is COMPLETIONS:
            return 200, json.dumps({
                "id": f"cmpl-{digest}", "object": "text_completion", "created": created, "model": model,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
                "usage": {"prompt_tokens": n_in, "completion_tokens": n_out,
                          "total_tokens": n_in + n_out}}).encode()
        return 200, self._chat(model, digest, created, text, n_in, n_out, finish, stream, body)

    def _chat(self, model, digest, created, text, n_in, n_out, finish, stream, body):
        usage = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
        head = {"id": f"chatcmpl-{digest}", "created": created, "model": model, "system_fingerprint": None}
        if not stream:
            return json.dumps({**head, "object": "chat.completion", "choices": [{
                "index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None, "finish_reason": finish}], "usage": usage}).encode()
        chunk = {**head, "object": "chat.completion.chunk"}
        events = [_sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "logprobs": None, "finish_reason": None}]})]
        events += [_sse({**chunk, "choices": [{"index": 0, "delta": {"content": piece}, "logprobs": None,
                                               "finish_reason": None}]}) for piece in _mock_words(text)]
        events.append(_sse({**chunk, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                  "finish_reason": finish}]}))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(_sse({**chunk, "choices": [], "usage": usage}))
        events.append(_sse("[DONE]"))
        return events

    def _messages(self, model, digest, text, n_in, n_out, finish, stream):
        stop = "max_tokens" if finish == "length" else "end_turn"
        message = {"id": f"msg_{digest}", "type": "message", "role": "assistant", "model": model,
                   "content": [{"type": "text", "text": text}], "stop_reason": stop, "stop_sequence": None,
                   "usage": {"input_tokens": n_in, "output_tokens": n_out,
                             "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}
        if not stream:
            return json.dumps(message).encode()
        start = {**message, "content": [], "stop_reason": None,
                 "usage": {**message["usage"], "output_tokens": 1}}
        events = [_sse({"type": "message_start", "message": start}, "message_start"),
                  _sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                       "content_block_start"),
                  _sse({"type": "ping"}, "ping")]
        events += [_sse({"type": "content_block_delta", "index": 0,
                         "delta": {"type": "text_delta", "text": piece}}, "content_block_delta")
                   for piece in _mock_words(text)]
        events += [_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
                   _sse({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                         "usage": {"output_tokens": n_out}}, "message_delta"),
                   _sse({"type": "message_stop"}, "message_stop")]
        return events

    def _responses(self, model, digest, created, text, n_in, n_out, stream):
        part = {"type": "output_text", "text": text, "annotations": []}
        item = {"id": f"msg_{digest}", "type": "message", "status": "completed", "role": "assistant",
                "content": [part]}
        usage = {"input_tokens": n_in, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": n_out,
                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": n_in + n_out}
        response = {"id": f"resp_{digest}", "object": "response", "created_at": created, "status": "completed",
                    "model": model, "output": [item], "usage": usage, "error": None,
                    "incomplete_details": None, "instructions": None, "parallel_tool_calls": True,
                    "tool_choice": "auto", "tools": [], "text": {"format": {"type": "text"}}}
        if not stream:
            return json.dumps(response).encode()
        seq = iter(range(1 << 30))
        pending = {**response, "status": "in_progress", "output": [], "usage": None}

        def ev(kind, **data):
            return _sse({"type": kind, "sequence_number": next(seq), **data}, kind)

        ids = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        events = [ev("response.created", response=pending), ev("response.in_progress", response=pending),
                  ev("response.output_item.added", output_index=0,
                     item={**item, "status": "in_progress", "content": []}),
                  ev("response.content_part.added", **ids, part={**part, "text": ""})]
        events += [ev("response.output_text.delta", **ids, delta=piece) for piece in _mock_words(text)]
        events += [ev("response.output_text.done", **ids, text=text),
                   ev("response.content_part.done", **ids, part=part),
                   ev("response.output_item.done", output_index=0, item=item),
                   ev("response.completed", response=response)]
        return events


class MockUpstream:
    """The mock provider as an `Upstream`: answers in the client's own dialect (so nothing is
    translated), governed endpoints only, and shows what it was sent in `x-mock-received`
    (already masked and anonymized: the demo prints it)."""
    speaks_every_dialect = True
    serves_passthrough = False

    def __init__(self, provider: MockProvider | None = None):
        self.provider = provider or MockProvider()

    async def send(self, call: UpstreamCall) -> UpstreamResponse:
        if call.dialect is None:
            raise ProxyError(404, "not_found", f"the mock provider does not serve {call.path}")
        status, payload = self.provider.answer(call.dialect, call.parsed)
        content_type = "text/event-stream" if isinstance(payload, list) else "application/json"
        seen = call.dialect.last_user_text(call.parsed)[:200].encode("ascii", "backslashreplace").decode()
        return UpstreamResponse(status, [("content-type", content_type),
                                         ("x-request-id", "req_mock_" + call.request_id[4:20]),
                                         ("x-mock-received", re.sub(r"[\r\n]+", " ", seen))],
                                None, None, call.timeout, body=payload)

    def close(self) -> None:
        pass
