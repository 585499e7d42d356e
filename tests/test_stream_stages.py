"""Stream stages, each fed lists of events: SSE parse, observe, translate, guard, SSE write,
and the chain that runs them in order."""
import json

import pytest
from hypothesis import given, settings, strategies as st

from tokenomics.dialects import CHAT, MESSAGES, RESPONSES
from tokenomics.errors import ProxyError
from tokenomics.guard.anonymize import Anonymizer
from tokenomics.guard.rules import Guard, compile_rules
from tokenomics.guard.stream import GuardStage, StreamGuard
from tokenomics.http.sse import SSEParse
from tokenomics.limits.prices import Usage
from tokenomics.relay import ObserveStage
from tokenomics.stages import Chain, SSEEvent, SSEWrite, StreamStage, sse_bytes, wire
from tokenomics.translate import MessagesToChatStream, TranslateStage


def chat_chunk(delta=None, finish=None, **extra):
    choices = [] if delta is None and finish is None else [
        {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}]
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-x",
            "choices": choices, **extra}


PIECES = ["Write to ", "jane.d", "oe@exam", "ple.com", " or call", " later."]
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}

# A chat stream as an upstream sends it, spaced the ways SSE allows (\n, \r\n, a comment line).
CHAT_WIRE = (b": keep-alive\n\n"
             + sse_bytes(chat_chunk({"role": "assistant", "content": ""}))
             + b"".join(sse_bytes(chat_chunk({"content": p})) for p in PIECES).replace(b"\n\n", b"\r\n\r\n", 1)
             + sse_bytes(chat_chunk(finish="stop"))
             + sse_bytes(chat_chunk(usage=USAGE))
             + sse_bytes("[DONE]"))


def feed_all(stage: StreamStage, parts: list[list[SSEEvent]]) -> list[SSEEvent]:
    out = []
    for part in parts:
        out += stage.feed(part)
    return out + stage.finish()


def parsed(wire_bytes: bytes) -> list[SSEEvent]:
    return feed_all(SSEParse(), [[wire(wire_bytes)]])


def triples(events):
    return [(e.event, e.payload, e.raw) for e in events]


def mask_emails() -> GuardStage:
    rules = compile_rules([{"type": "pii", "action": "mask", "scope": "output", "detect": ["email"]}])
    guard = Guard(rules, "output", Anonymizer(), [])
    return GuardStage(CHAT, lambda: StreamGuard(guard, None, 16), None, collect=True)


def written(events) -> bytes:
    return b"".join(e.raw for e in events)


def chat_text(body: bytes) -> str:
    text = []
    for ev in parsed(body):
        if isinstance(ev.payload, dict):
            text += [c["delta"].get("content") or "" for c in ev.payload["choices"]]
    return "".join(text)


# ---------------------------------------------------------------------------- SSE parse


def test_parse_one_byte_at_a_time_equals_whole():
    whole = parsed(CHAT_WIRE)
    bytewise = feed_all(SSEParse(), [[wire(CHAT_WIRE[i:i + 1])] for i in range(len(CHAT_WIRE))])
    assert triples(bytewise) == triples(whole)
    assert b"".join(e.raw for e in whole) == CHAT_WIRE      # every byte is kept, boundaries included
    assert whole[0].payload == "" and whole[-1].payload == "[DONE]"
    assert whole[2].payload["choices"][0]["delta"] == {"content": "Write to "}


def test_parse_splits_boundaries_at_awkward_points():
    stream = b'event: a\r\ndata: {"x":1}\r\n\r\nevent: b\ndata: {"x":\ndata: 2}\n\n'
    for cut in range(len(stream) + 1):
        events = feed_all(SSEParse(), [[wire(stream[:cut])], [], [wire(stream[cut:])]])
        assert [(e.event, e.payload) for e in events] == [("a", {"x": 1}), ("b", {"x": 2})], cut


def test_parse_finish_returns_an_event_without_its_boundary():
    stage = SSEParse()
    assert stage.feed([wire(b'data: {"a": 1}\n')]) == []
    (last,) = stage.finish()
    assert last.payload == {"a": 1} and last.raw == b'data: {"a": 1}\n'
    assert stage.finish() == []


def test_parse_refuses_an_oversized_event():
    stage = SSEParse(max_event_bytes=64)
    with pytest.raises(ProxyError) as info:
        stage.feed([wire(b"data: " + b"x" * 100)])
    assert (info.value.status, info.value.code) == (502, "upstream_response_too_large")


# ---------------------------------------------------------------------------- SSE write


def test_write_keeps_unchanged_bytes_and_rewrites_changed_events():
    a, b = parsed(b'data: {"b":  1}\n\n' + b'event: x\ndata: {"c": 2}\n\n')
    b.raw = None                              # a stage changed it
    b.payload["c"] = 3
    made = SSEEvent(None, payload="[DONE]")
    (out,) = SSEWrite().feed([a, b, made])
    assert out.raw == b'data: {"b":  1}\n\n' + b'event: x\ndata: {"c":3}\n\n' + b"data: [DONE]\n\n"
    assert SSEWrite().feed([]) == [] and SSEWrite().finish() == []


def test_write_keeps_the_last_sequence_number():
    write = SSEWrite("sequence_number")
    write.feed(parsed(sse_bytes({"type": "a", "sequence_number": 4}) + sse_bytes("[DONE]")))
    assert write.last_sequence == 4


def test_parse_then_write_is_the_identity():
    assert written(Chain([SSEParse(), SSEWrite()]).feed([wire(CHAT_WIRE)])) == CHAT_WIRE


# ---------------------------------------------------------------------------- observe


def test_observe_counts_usage_and_strips_what_the_proxy_asked_for():
    observe = ObserveStage(CHAT, strip_usage=True)
    out = feed_all(observe, [parsed(CHAT_WIRE)])
    assert observe.usage == Usage(input_tokens=11, output_tokens=7)
    assert observe.meta == {"model": "gpt-x", "finish_reason": "stop"}
    assert observe.upstream_id == "chatcmpl-1"
    assert observe.output_bytes == len("".join(PIECES).encode())
    assert not any(isinstance(e.payload, dict) and "usage" in e.payload for e in out)
    assert len(out) == len(parsed(CHAT_WIRE)) - 1            # the usage-only chunk is gone
    assert all(e.raw is not None for e in out)                # nothing else was touched


def test_observe_leaves_usage_to_a_translation():
    observe = ObserveStage(CHAT, count_usage=False)
    feed_all(observe, [parsed(CHAT_WIRE)])
    assert observe.usage == Usage() and observe.output_bytes


def test_observe_removes_usage_riding_on_a_chunk_with_choices():
    observe = ObserveStage(CHAT, strip_usage=True)
    (ev,) = observe.feed(parsed(sse_bytes(chat_chunk(finish="stop", usage=USAGE))))
    assert ev.raw is None and "usage" not in ev.payload and observe.usage.total_tokens == 18


# ---------------------------------------------------------------------------- translate


MESSAGES_EVENTS = [
    ("message_start", {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                                            "model": "claude-x", "content": [],
                                                            "usage": {"input_tokens": 5, "output_tokens": 1}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    *[("content_block_delta", {"type": "content_block_delta", "index": 0,
                               "delta": {"type": "text_delta", "text": p}}) for p in PIECES],
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}}),
    ("message_stop", {"type": "message_stop"}),
]
MESSAGES_WIRE = b"".join(sse_bytes(p, n) for n, p in MESSAGES_EVENTS)


def test_translate_stage_says_what_its_translator_says():
    direct = MessagesToChatStream("gpt-x", include_usage=True)
    expected = [out for name, payload in MESSAGES_EVENTS for out in direct.feed(name, json.loads(json.dumps(payload)))]
    stage = TranslateStage(MessagesToChatStream("gpt-x", include_usage=True))
    out = feed_all(stage, [parsed(b": comment\n\n" + MESSAGES_WIRE)])
    got = [e.payload for e in out]
    for chunk in got[:-1]:
        chunk.pop("created"), chunk.pop("id")
    for chunk in expected[:-1]:
        chunk.pop("created"), chunk.pop("id")
    assert got == expected and got[-1] == "[DONE]"
    assert all(e.raw is None for e in out)                    # translated events are written anew
    assert stage.usage == Usage(input_tokens=5, output_tokens=9)


def test_translate_stage_finish_reports_an_unfinished_stream():
    stage = TranslateStage(MessagesToChatStream("gpt-x", include_usage=False))
    stage.feed(parsed(MESSAGES_WIRE.split(b"event: content_block_stop")[0]))
    (err,) = stage.finish()
    assert err.payload["error"]["code"] == "incomplete_stream"


# ---------------------------------------------------------------------------- guard


def test_guard_masks_an_email_split_across_deltas():
    stage = mask_emails()
    out = feed_all(stage, [[e] for e in parsed(CHAT_WIRE)])
    body = written(SSEWrite().feed(out))
    assert chat_text(body) == "Write to [REDACTED:EMAIL] or call later."
    assert b"jane" not in body
    assert "".join(stage.collected) == "".join(PIECES)       # the model's own text, before the rule


def test_guard_releases_the_held_tail_before_the_closing_event():
    stage = mask_emails()
    out = feed_all(stage, [parsed(CHAT_WIRE)])
    finish = next(i for i, e in enumerate(out) if isinstance(e.payload, dict) and e.payload["choices"]
                  and e.payload["choices"][0]["finish_reason"])
    tail = out[finish - 1].payload["choices"][0]
    assert tail["delta"]["content"].endswith("later.") and tail["finish_reason"] is None
    assert out[finish - 1].raw is None


def test_guard_renumbers_events_after_an_inserted_tail():
    ids = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    events = [{"type": "response.output_text.delta", **ids, "delta": "hello there", "sequence_number": 1},
              {"type": "response.output_text.done", **ids, "text": "hello there", "sequence_number": 2},
              {"type": "response.completed", "sequence_number": 3}]
    guard = Guard(compile_rules([{"type": "regex", "pattern": "x^", "action": "mask", "scope": "output"}]),
                  "output", Anonymizer(), [])     # a rule that never matches: the text is held back
    stage = GuardStage(RESPONSES, lambda: StreamGuard(guard, None, 64), lambda text: text)
    wire_bytes = b"".join(sse_bytes(e, e["type"]) for e in events)
    out = feed_all(stage, [parsed(wire_bytes)])
    assert [e.payload["sequence_number"] for e in out] == [1, 2, 3, 4]
    assert out[0].payload["delta"] == "" and out[1].payload["delta"] == "hello there"
    write = SSEWrite(RESPONSES.sequence_field)
    write.feed(out)
    assert write.last_sequence == 4


def test_guard_flushes_every_channel_on_done_and_at_finish():
    for wire_bytes in (CHAT_WIRE, CHAT_WIRE.replace(sse_bytes(chat_chunk(finish="stop")), b"")):
        stage = mask_emails()
        out = feed_all(stage, [parsed(wire_bytes)])
        assert chat_text(written(SSEWrite().feed(out))) == "Write to [REDACTED:EMAIL] or call later."
    stage = mask_emails()
    stage.feed(parsed(CHAT_WIRE.split(b"data: [DONE]")[0].replace(sse_bytes(chat_chunk(finish="stop")), b"")))
    (tail,) = stage.finish()                                  # no [DONE] either: finish releases it
    assert tail.payload["choices"][0]["delta"]["content"].endswith("later.")


# ---------------------------------------------------------------------------- chain


class _Holding:
    """A stage that holds everything until finish, to see the chain's order of flushing."""

    def __init__(self, tag):
        self.tag, self.held = tag, []

    def feed(self, events):
        self.held += events
        return []

    def finish(self):
        out, self.held = self.held + [SSEEvent(None, payload=self.tag)], []
        return out


def test_chain_finishes_in_order_through_the_later_stages():
    seen = []

    class Record:
        def feed(self, events):
            seen.extend(e.payload for e in events)
            return events

        def finish(self):
            return [SSEEvent(None, payload="record-end")]

    chain = Chain([SSEParse(), _Holding("first"), None, Record(), SSEWrite()])
    assert chain.feed([wire(b'data: {"a":1}\n\ndata: x')]) == []
    out = chain.finish()
    assert seen == [{"a": 1}, "x", "first"]
    assert written(out) == b'data: {"a":1}\n\ndata: x' + b"data: first\n\n" + b"data: record-end\n\n"


def full_chain(translated: bool = False) -> tuple[Chain, ObserveStage]:
    if translated:
        observe = ObserveStage(MESSAGES, count_usage=False)
        translate = TranslateStage(MessagesToChatStream("gpt-x", include_usage=True))
    else:
        observe, translate = ObserveStage(CHAT, strip_usage=True), None
    return Chain([SSEParse(), observe, translate, mask_emails(), SSEWrite()]), observe


def cuts(data_len):
    return st.lists(st.integers(0, data_len), max_size=12).map(sorted)


@settings(max_examples=150, deadline=None)
@given(cuts(len(CHAT_WIRE)))
def test_any_partition_of_the_bytes_gives_the_same_stream(points):
    whole, observe_whole = full_chain()
    expected = written(whole.feed([wire(CHAT_WIRE)]) + whole.finish())
    chain, observe = full_chain()
    bounds = [0, *points, len(CHAT_WIRE)]
    out = []
    for a, b in zip(bounds, bounds[1:]):
        out += chain.feed([wire(CHAT_WIRE[a:b])])
    assert written(out + chain.finish()) == expected
    assert (observe.usage, observe.output_bytes) == (observe_whole.usage, observe_whole.output_bytes)
    assert chat_text(expected) == "Write to [REDACTED:EMAIL] or call later."


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_any_partition_of_the_events_gives_the_same_events_at_every_stage(data):
    """Each stage alone, fed the parsed events grouped in lists at random, says what it says
    when fed them in one list."""
    wire_bytes = data.draw(st.sampled_from([CHAT_WIRE, MESSAGES_WIRE]))
    makers = ([lambda: ObserveStage(CHAT, strip_usage=True), mask_emails, SSEWrite] if wire_bytes == CHAT_WIRE
              else [lambda: ObserveStage(MESSAGES),
                    lambda: TranslateStage(MessagesToChatStream("gpt-x", include_usage=True))])
    n = len(parsed(wire_bytes))
    points = sorted(data.draw(st.lists(st.integers(0, n), max_size=8)))
    bounds = [0, *points, n]
    for make in makers:
        whole = feed_all(make(), [parsed(wire_bytes)])
        events = parsed(wire_bytes)
        split = feed_all(make(), [events[a:b] for a, b in zip(bounds, bounds[1:])])
        if make is SSEWrite:   # the writer's events are bytes on the wire: their grouping is free
            assert written(split) == written(whole) == wire_bytes
        else:
            assert _comparable(split) == _comparable(whole)


def _comparable(events):
    out = []
    for e in events:
        payload = e.payload
        if isinstance(payload, dict) and payload.get("object") == "chat.completion.chunk":
            payload = {k: v for k, v in payload.items() if k not in ("created", "id")}   # clock and ids
        out.append((e.event, payload, e.raw))
    return out
