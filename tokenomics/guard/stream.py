"""The stream guard: incremental output scanning with a bounded hold-back, so a match split
across chunks is still caught; and the stream stage that runs it over each output channel."""

from typing import Any, Callable

from ..errors import ProxyError
from ..guard.anonymize import Anonymizer, _CONTEXT_START_RE, _PARTIAL_PLACEHOLDER_RE
from ..guard.pii import _PEM_BODY_RE
from ..guard.rules import Guard
from ..stages import SSEEvent


_STREAM_HOLDBACK = 128             # chars; default of config `guardrails.stream_holdback`


_NOT_JSON_OK = ("[DONE]", "")       # event data that is not a JSON object and carries no text


_STREAM_CONTEXT_EXTRA = 64         # chars of released text kept (beyond the hold-back) as left


class StreamGuard:
    """Output rules and placeholder restoration over a stream of text chunks.

    `feed` returns what can be released now, `finish` the held tail. The concatenation equals
    `anonymizer.restore(guard.scan(whole_text))` for every match no longer than `holdback`
    (jailbreak rules are scored per window and accumulated, see below). At most `holdback`
    chars are held, plus, while a match that started before that point is still being
    received, up to the match's length, plus a placeholder in progress. Each chunk rescans only
    the held window and a little released context, never the whole stream.

    A match longer than the hold-back is released in pieces: its first piece is replaced as
    usual and its continuation dropped (a private key block longer than the window is still
    masked to the end). Jailbreak rules score each released window together with its context
    and accumulate the signals over the stream, so a phrase that fits in the window counts as
    it would in the whole text."""
    __slots__ = ("_guard", "_anon", "_holdback", "_context", "_buf", "_done", "_open", "_jb_hits", "_jb_learned",
                 "_jb_fired", "_tail", "_has_jb")

    def __init__(self, guard: Guard | None, anonymizer: Anonymizer | None, holdback: int = _STREAM_HOLDBACK) -> None:
        self._guard = guard if guard is not None and guard.active else None
        self._anon = anonymizer
        self._holdback = max(1, int(holdback))
        self._context = self._holdback + _STREAM_CONTEXT_EXTRA
        self._buf = ""                   # released context + held text (the model's own text)
        self._done = 0                   # chars of _buf already released
        self._open: dict[int, str] = {}  # rule index -> label of a match cut at the last release
        self._jb_hits: set = set()
        self._jb_learned = 0.0
        self._jb_fired: set[int] = set()
        self._tail = ""                  # guarded text held while a placeholder may be in progress
        self._has_jb = self._guard is not None and any(r.type == "jailbreak" for r in self._guard._rules)

    def feed(self, chunk: str) -> str:
        if not chunk:
            return ""
        guard = self._guard
        if guard is None:
            return self._restore(chunk, final=False)
        self._buf += chunk
        cut = len(self._buf) - self._holdback
        if cut <= self._done:
            return ""
        return self._restore(self._release(cut, final=False), final=False)

    def finish(self) -> str:
        out = ""
        if self._guard is not None and len(self._buf) > self._done:
            out = self._release(len(self._buf), final=True)
        return self._restore(out, final=True)

    def _release(self, cut: int, final: bool) -> str:
        guard = self._guard
        rule = None
        try:
            buf, done = self._buf, self._done
            spans = guard._spans(buf, cache=False)   # a window is never scanned twice
            if not final:
                # Never release part of a match that may still be completed by the next chunks:
                # move the cut back to its start, unless the match is already longer than the
                # hold-back (then it is released in pieces).
                moved = True
                while moved:
                    moved = False
                    for per_rule in spans:
                        for s, e, _ in per_rule:
                            if done <= s < cut < e and e - s <= self._holdback:
                                cut, moved = s, True
                if cut <= done:
                    return ""
            edits, drops, open_next = [], [], {}
            for i, rule in enumerate(guard._rules):
                if rule.type == "jailbreak":
                    continue
                new, carried = [], []
                for s, e, label in spans[i]:
                    if e <= done or s >= cut:
                        continue
                    if s < done and i in self._open:     # rest of a match cut at the last release
                        carried.append((done, e, label))
                    else:
                        new.append((max(s, done), e, label))
                    if e > cut:
                        open_next[i] = label
                if not carried and self._open.get(i) == "PRIVATE_KEY":
                    # The header scrolled out of the window: the base64 body still belongs to it.
                    m = _PEM_BODY_RE.match(buf, done)
                    if m.end() > done:
                        carried.append((done, m.end(), "PRIVATE_KEY"))
                        if m.end() >= cut and not final:
                            open_next[i] = "PRIVATE_KEY"
                if carried and rule.action == "mask":
                    drops.extend((s, e) for s, e, _ in carried)    # its [REDACTED:...] is already out
                elif carried and rule.action == "anonymize":
                    edits.append((i, carried))                      # own placeholder, restored as is
                if not new:
                    continue
                guard._record(rule, len(new))
                if rule.action == "fail":
                    raise guard._violation(rule)
                if rule.action in ("mask", "anonymize"):
                    edits.append((i, new))
            rule = None
            if self._has_jb:
                self._check_jailbreak(buf[:cut])
            out = guard._apply(buf, done, cut, edits, drops) if edits or drops else buf[done:cut]
            self._open = open_next
            # Keep some released text as left context, starting after a whitespace where there
            # is one: matches never start mid-word there, so the window sees what the whole
            # text would (matches glued without any space can still be split differently).
            keep = max(0, cut - self._context)
            space = _CONTEXT_START_RE.search(buf, keep, max(keep, cut - self._holdback))
            if space:
                keep = space.end()
            self._buf, self._done = buf[keep:], cut - keep
            return out
        except ProxyError:
            raise
        except Exception as exc:
            raise guard._internal_error(rule) from exc

    def _check_jailbreak(self, window: str) -> None:
        from ..guard.jailbreak import _jb_learned, _jb_scan, _jb_total  # loaded with the rule (rules.py)
        self._jb_hits |= _jb_scan(window)
        self._jb_learned = max(self._jb_learned, _jb_learned(window))
        score = _jb_total(self._jb_hits, self._jb_learned)[0]
        guard = self._guard
        for i, rule in enumerate(guard._rules):
            if rule.type == "jailbreak" and i not in self._jb_fired and score >= rule.threshold:
                self._jb_fired.add(i)
                guard._record(rule, 1)
                if rule.action == "fail":
                    raise guard._violation(rule)

    def _restore(self, text: str, final: bool) -> str:
        anon = self._anon
        if anon is None or not anon.max_placeholder_len:
            return text
        text = self._tail + text
        self._tail = ""
        if not final:
            i = text.rfind("<", max(0, len(text) - anon.max_placeholder_len + 1))
            if i >= 0 and _PARTIAL_PLACEHOLDER_RE.fullmatch(text, i):
                self._tail, text = text[i:], text[:i]
        return anon.restore(text)


class GuardStage:
    """The stream stage of the output guards: one StreamGuard (built by `channel`) per output
    channel of the client's dialect (a choice's content, a tool call's arguments, a block),
    each delta rewritten to what its channel releases; when a channel closes, what it still
    held goes out as an extra delta event just before the closing event (the events after it
    renumbered, where the dialect numbers them). `full_text` rewrites events that repeat a
    whole text. With `collect`, the model's own text (before any rewrite) is kept in
    `collected`, for the conversation log and end-of-stream classifier rules."""
    __slots__ = ("dialect", "channel", "full_text", "collected", "released_text", "_channels", "_seq_shift")

    def __init__(self, dialect: Any, channel: "Callable[[], StreamGuard] | None" = None,
                 full_text: Callable[[str], str] | None = None, collect: bool = False):
        self.dialect, self.channel, self.full_text = dialect, channel, full_text
        self.collected: list[str] | None = [] if collect else None
        self.released_text = False   # some text passed the output rules
        self._channels: dict = {}
        self._seq_shift = 0

    def feed(self, events: list[SSEEvent]) -> list[SSEEvent]:
        out: list[SSEEvent] = []
        for ev in events:
            self._event(ev, out)
        return out

    def finish(self) -> list[SSEEvent]:
        return self._flush(list(self._channels), None, None)

    def _event(self, ev: SSEEvent, out: list) -> None:
        payload, name = ev.payload, ev.event
        guarded = self.channel is not None or self.full_text is not None
        if not isinstance(payload, dict):   # [DONE] and the like: every channel is complete
            if guarded and payload not in _NOT_JSON_OK:
                # Fail closed: the output rules read JSON objects; other data would pass unchecked.
                raise ProxyError(500, "guardrail_error", "the upstream sent a stream event that is not a JSON "
                                                         "object, so the output rules could not check it")
            out += self._flush(list(self._channels), None, None)
            out.append(ev)
            return
        dialect = self.dialect
        # Guarded, every event is written anew from what was parsed and scanned, never relayed
        # as received: JSON that repeats a key (a second "delta" after one holding text) parses
        # to the last copy, while the client might read the first.
        changed = guarded
        deltas = dialect.stream_deltas(name, payload) if guarded or self.collected is not None else ()
        if self.collected is not None:
            self.collected.extend(holder[key] for _, holder, key in deltas)
        if guarded:
            ends = dialect.stream_ends(name, payload)
            if ends:
                out += self._flush(self._closed_channels(ends), payload, name)
            for ch, holder, key in deltas:
                guard = self._channels.get(ch)
                if guard is None:
                    guard = self._channels[ch] = self.channel()
                holder[key] = released = guard.feed(holder[key])
                if released:
                    self.released_text = True
            if self.full_text is not None:
                for holder, key in dialect.stream_full_texts(name, payload):
                    holder[key] = self.full_text(holder[key])
        seq = dialect.sequence_field
        if self._seq_shift and seq is not None and seq in payload:
            payload[seq] += self._seq_shift
            changed = True
        if changed:
            ev.raw = None
        out.append(ev)

    def _closed_channels(self, ends: list) -> list:
        """The open channels an event closes: each end itself, and for a tuple end every
        channel it is a prefix of (a choice's content, refusal and tool-call arguments)."""
        out = []
        for ch in self._channels:
            for end in ends:
                if ch == end or (isinstance(end, tuple) and isinstance(ch, tuple) and ch[:len(end)] == end):
                    out.append(ch)
                    break
        return out

    def _flush(self, channels: list, payload: dict | None, event: str | None) -> list[SSEEvent]:
        out = []
        for ch in channels:
            guard = self._channels.pop(ch, None)
            text = guard.finish() if guard is not None else ""
            if text:
                name, extra = self.dialect.tail_event(ch, text, payload or {}, event)
                seq = self.dialect.sequence_field
                if seq is not None and seq in (payload or {}):
                    extra[seq] = payload[seq] + self._seq_shift
                    self._seq_shift += 1
                out.append(SSEEvent(None, name, payload=extra))
        return out
