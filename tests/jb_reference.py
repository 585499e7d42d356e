"""The jailbreak detector's heuristic scan as it was written before it was made fast: one
search per signal family, per word signal and per concept. Kept as the reference that the fast
scan (tokenomics.guard.jailbreak) must agree with exactly; not used by the package."""

import bisect
import itertools
import re

from tokenomics.guard.jailbreak import (_B64_MAX_CHARS, _B64_MAX_RUNS, _INNER_PUNCT_RE, _JB_MAX_WINDOW, _JB_SPELL_MAX_TEXT,
                                        _JB_SPELL_WORDS, _JB_WINDOW, _LEET, _LEET_CAND_RE, _LEET_INNER_RE, _LEET_WORD_RE,
                                        _LEET_WORDS, _NL_RE, _SPACED_RE, _SPACED_SEP_RE, _WS_RE, _b64_text, _jb_normalize)
from tokenomics.guard.lexicon import (_B64_RUN_RE, _JB_AI_OWNER_RE, _JB_CONCEPTS, _JB_CORE_DIRECTIVE_RE, _JB_META_RE,
                                      _JB_OBFUSCATION_WEIGHT, _JB_QUOTED_RE, _JB_SIGNALS, _JB_STRONG_MODE_RE,
                                      _JB_TRIGGER_WORDS, _JB_WORD_RE, _JB_WORD_SIGNALS, _word_trie)


# The trigger regex as first written (the lexicon's is the same alternation, flattened).
_JB_TRIGGER_RE = re.compile(
    _word_trie(_JB_TRIGGER_WORDS)
    + r"|\bdan\b|mode\b|<\||<<\s*/?\s*sys|\[\s*/?\s*(?:inst|system|admin|developer)|</?\s*(?:system|sys|admin|developer"
    r"|root|instructions)\b|#{2,}\s*(?:system|instruction|new|admin|override|developer)|(?:system|admin|developer|root"
    r"|human)\s*:|assistant\s*:\s*sure|\b(?:ai|llm|bot|agent)s?\s*[,:]")


class _JbPositions(dict):
    """Word-index spans of each concept in `v` (starts: char offset of each word), found on
    first use: most windows have no directive, role or secret word, and then the concepts
    that only qualify those (dismiss, anchor, reveal...) are never searched."""
    __slots__ = ("v", "starts")

    def __init__(self, v: str, starts: list[int]):
        super().__init__()
        self.v, self.starts = v, starts

    def __missing__(self, name: str) -> list[tuple[int, int]]:
        starts, spans = self.starts, []
        for m in _JB_CONCEPTS[name].finditer(self.v):
            a = bisect.bisect_right(starts, m.start()) - 1
            b = bisect.bisect_right(starts, max(m.start(), m.end() - 1)) - 1
            spans.append((a, b))
        self[name] = spans
        return spans


def _jb_near(spans: list[tuple[int, int]], a: int, b: int, k: int) -> list[tuple[int, int]]:
    """Spans within k words of the word range [a, b] (spans are sorted by start)."""
    lo = bisect.bisect_left(spans, (a - k - 8, -1))
    out = []
    for s in itertools.islice(spans, lo, None):
        if s[0] > b + k:
            break                                    # sorted by start: nothing further is near
        if s[1] >= a - k:
            out.append(s)
            if len(out) == 64:
                break
    return out


def _jb_starts_in(spans: list[tuple[int, int]], lo: int, hi: int) -> bool:
    """Whether a span starts at a word index in [lo, hi] (spans are sorted by start)."""
    i = bisect.bisect_left(spans, (lo, -1))
    return lo <= hi and i < len(spans) and spans[i][0] <= hi


def _jb_concept_hits(v: str, hits: set) -> None:
    for sid, family, weight, rx in _JB_WORD_SIGNALS:
        if rx.search(v):
            hits.add((sid, family, weight))
    starts = [m.start() for m in _JB_WORD_RE.finditer(v)]
    if not starts:
        return
    c = _JbPositions(v, starts)
    for a, b in c["directive"]:
        if not _jb_near(c["dismiss"], a, b, 6):
            if c["changed"] and _jb_near(c["changed"], a, b, 6) and any(
                    v[starts[x]:starts[x] + 4] == "your" for x, _ in _jb_near(c["anchor"], a, b, 3)):
                hits.add(("c-changed", "override", 0.5))
            continue
        owned = _jb_starts_in(c["user_owned"], a - 2, a - 1)
        anchors = _jb_near(c["anchor"], a, b, 3)
        anchored = anchors and (
            _jb_near(c["you"], a, b, 8) or _JB_CORE_DIRECTIVE_RE.match(v, starts[a]) is not None
            or any(_JB_AI_OWNER_RE.match(v, starts[x]) for x, _ in anchors))
        if not owned and anchored:
            hits.add(("c-override", "override", 1.0))
        elif _jb_near(c["dismiss"], a, b, 4):
            hits.add(("c-override-weak", "override", 0.4))
    for a, b in c["strong_safety"]:
        addressed = bool(_jb_near(c["you"], a, b, 4)) and not _jb_near(c["user_owned"], a, b, 4)
        if _jb_near(c["dismiss"], a, b, 5):
            hits.add(("c-filter", "filter_bypass", 1.0) if addressed else ("c-filter-weak", "filter_bypass", 0.6))
        if _jb_near(c["off"], a, b, 3):
            hits.add(("c-filter-off", "filter_bypass", 1.0) if addressed else ("c-filter-off-weak", "filter_bypass", 0.6))
    for a, b in c["safety"]:
        addressed = bool(_jb_near(c["you"], a, b, 3)) and not _jb_near(c["user_owned"], a, b, 3)
        if _jb_near(c["dismiss"], a, b, 4) or _jb_near(c["off"], a, b, 2):
            hits.add(("c-filter-yours", "filter_bypass", 0.8) if addressed else ("c-filter-weak", "filter_bypass", 0.5))
    for a, b in c["role"]:
        if any(x > b for x, _ in _jb_near(c["unbound"], a, b, 14)):
            hits.add(("c-persona", "persona", 1.0))
        if any(x > b for x, _ in _jb_near(c["bad_persona"], a, b, 6)):
            hits.add(("c-persona-bad", "persona", 0.6))
    for a, b in c["secret"]:
        for x, _ in _jb_near(c["reveal"], a, b, 8):
            if not _jb_starts_in(c["negation"], a - 3, x - 1):
                hits.add(("c-extract", "prompt_extraction", 1.0))
                break
    # A note addressed to an AI reader that asks for secrecy, exfiltration or a new task is an
    # indirect injection (documents, web pages, e-mails); the address alone is only a hint.
    for a, b in c["ai_reader"]:
        if _jb_near(c["payload"], a, b, 30):
            hits.add(("c-indirect", "override", 1.0))
            break
    # "From now on" + talk to the model: a behaviour change, never enough alone.
    for a, b in c["recency"]:
        if _jb_near(c["you"], a, b, 10):
            hits.add(("c-recency", "persona", 0.4))
            break
    for a, b in c["mode"]:
        if _jb_near(c["mode_on"], a, b, 3):
            strong = _JB_STRONG_MODE_RE.search(v, starts[max(0, a - 2)], starts[b] + 5) is not None
            hits.add(("c-mode", "developer_mode", 1.0) if strong else ("c-mode-weak", "developer_mode", 0.6))


def _jb_compile() -> tuple[tuple[re.Pattern, dict, bool], ...]:
    """One alternation per family and case mode (strongest signals first, so that where two
    signals of a family start at the same place the stronger one is taken)."""
    groups: dict[tuple[str, bool], list] = {}
    for i, (family, weight, pattern) in enumerate(_JB_SIGNALS):
        cased = pattern.startswith("cs:")
        groups.setdefault((family, cased), []).append((i, family, weight, pattern.removeprefix("cs:")))
    compiled = []
    for (_, cased), sigs in groups.items():
        sigs.sort(key=lambda s: -s[2])
        rx = re.compile("|".join(f"(?P<s{i}>{p})" for i, _, _, p in sigs))
        compiled.append((rx, {f"s{i}": (i, f, w) for i, f, w, _ in sigs}, cased))
    return tuple(compiled)


_JB_REGEXES = _jb_compile()


def _jb_fold(lower: str) -> str:
    """Matching-only copy: leetspeak folded inside words that also contain letters,
    punctuation inside words dropped (i.g.n.o.r.e, ignore.all.previous), letter spacing joined."""
    folded = _LEET_WORD_RE.sub(lambda m: m.group().translate(_LEET) if any(c.isalpha() for c in m.group()) else m.group(), lower)
    folded = _LEET_INNER_RE.sub("i", folded)
    folded = _SPACED_RE.sub(lambda m: _SPACED_SEP_RE.sub("", m.group()), folded)
    return _INNER_PUNCT_RE.sub(" ", folded)


def _one_edit(a: str, b: str) -> bool:
    """Whether a and b differ by one insertion, deletion, substitution or adjacent swap."""
    la, lb = len(a), len(b)
    if abs(la - lb) > 1:
        return False
    i = 0
    while i < min(la, lb) and a[i] == b[i]:
        i += 1
    if la == lb:
        return a[i + 1:] == b[i + 1:] or (i + 1 < la and a[i] == b[i + 1] and a[i + 1] == b[i] and a[i + 2:] == b[i + 2:])
    return a[i:] == b[i + 1:] if la < lb else a[i + 1:] == b[i:]


def _jb_spellfix(m: re.Match) -> str:
    word = m.group()
    if len(word) < 5:
        return word
    for key in _JB_SPELL_WORDS:
        if word != key and word[0] == key[0] and _one_edit(word, key):
            return key
    return word


def _jb_windows(lower: str) -> list[tuple[int, int]]:
    """Where to look: every signal contains a trigger word, so only the text around trigger
    words (plainly written, letter-spaced, leetspeak or, in short texts, misspelt) is analysed."""
    pos = [m.start() for m in _JB_TRIGGER_RE.finditer(lower)]
    for m in _SPACED_RE.finditer(lower):
        if _JB_TRIGGER_RE.search(_SPACED_SEP_RE.sub("", m.group())):
            pos.append(m.start())
    for m in _LEET_CAND_RE.finditer(lower):
        word = m.group().translate(_LEET)
        if word in _LEET_WORDS or _JB_TRIGGER_RE.search(word):
            pos.append(m.start())
    if not pos and len(lower) <= _JB_SPELL_MAX_TEXT:
        fixed = _JB_WORD_RE.sub(_jb_spellfix, lower)
        if fixed != lower and _JB_TRIGGER_RE.search(fixed):
            pos.append(0)
    if not pos:
        return []
    if len(lower) <= 2 * _JB_WINDOW:
        return [(0, len(lower))]
    pos.sort()
    out: list[tuple[int, int]] = []
    for p in pos:
        s, e = max(0, p - _JB_WINDOW), min(len(lower), p + _JB_WINDOW)
        if out and s <= out[-1][1] and e - out[-1][0] <= _JB_MAX_WINDOW:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def _jb_window_hits(norm: str, hits: set) -> None:
    """Add (signal id, family, weight) of every signal found in a (normalised) window."""
    norm = _NL_RE.sub("\n", _WS_RE.sub(" ", norm))
    lower = norm.lower()
    variants = [lower]
    folded = _jb_fold(lower)
    if folded != lower and sorted(_JB_TRIGGER_RE.findall(folded)) != sorted(_JB_TRIGGER_RE.findall(lower)):
        variants.append(folded)                  # obfuscation changed what reads as a trigger
    if len(lower) <= _JB_SPELL_MAX_TEXT:
        fixed = _JB_WORD_RE.sub(_jb_spellfix, variants[-1])
        if fixed != variants[-1]:
            variants.append(fixed)
    for v in variants:
        _jb_concept_hits(v, hits)
    for rx, names, cased in _JB_REGEXES:
        for v in ((norm,) if cased else variants):
            # Overlapping search: a signal may start inside another one's match.
            m = rx.search(v)
            while m:
                hits.add(names[m.lastgroup])
                m = rx.search(v, m.start() + 1)


def _jb_scan(text: str) -> set:
    """The signals of one text. In talk about prompt injection, quoted text is left out."""
    hits: set = set()
    norm = _jb_normalize(text)
    lower = norm.lower()
    for s, e in _jb_windows(lower):
        window: set = set()
        _jb_window_hits(norm[s:e], window)
        if window and _JB_META_RE.search(lower, s, e):
            unquoted = _JB_QUOTED_RE.sub(" ", norm[s:e])
            if unquoted != norm[s:e]:
                window = set()
                _jb_window_hits(unquoted, window)
        hits |= window
    for k, m in enumerate(_B64_RUN_RE.finditer(text)):
        if k >= _B64_MAX_RUNS:
            break
        decoded = _b64_text(m.group()[:_B64_MAX_CHARS])
        if decoded:
            inner = _jb_scan(decoded)
            if inner:
                hits |= inner
                hits.add(("b64", "obfuscation", _JB_OBFUSCATION_WEIGHT))
    return hits
