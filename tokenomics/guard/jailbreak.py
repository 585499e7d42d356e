"""The prompt-injection detector: normalisation (NFKC, invisible characters, leetspeak, base64)
then scoring of signal families from the lexicon, plus the learned scorer's part (family
"learned"): the heuristic signals explain a verdict, the learned part generalises past them."""

import base64
import bisect
import itertools
import re
import unicodedata
from typing import Any, Iterator

from ..guard.lexicon import _B64_RUN_RE, _JB_AI_OWNER_RE, _JB_CONCEPTS, _JB_CORE_DIRECTIVE_RE, _JB_FAMILY_CAP, _JB_FAMILY_REST, _JB_META_RE, _JB_OBFUSCATION_WEIGHT, _JB_QUOTED_RE, _JB_SIGNALS, _JB_STRONG_MODE_RE, _JB_TRIGGER_RE, _JB_WORD_RE, _JB_WORD_SIGNALS
from ..guard.learned import LearnedScorer
from ..guard.needs import Needs, read_table, starting_places
from ..guard.needs_table import TABLE
from ..guard.multilingual import multilingual_hits
from ..guard.suffix import TAIL_CHARS, suffix_score
from ..guard.scan import _SCAN_CACHE_MIN, _cache_get, _cache_put, _text_key


_B64_MAX_RUNS = 32                 # runs decoded per text (bounds the work on hostile input)


_B64_MAX_CHARS = 8192              # chars of one run decoded


_SUFFIX_ALONE = 0.5                # suffix_score at which an adversarial suffix flags a text alone


_SUFFIX_WEAK = 0.35                # ... and at which it counts beside another signal


                                   # 5 ms: the event loop needs the GIL a dozen times to answer
                                   # one /health, and waited up to 5 ms each time)
_JB_SEGMENT = 32 * 1024            # chars per jailbreak segment; its signals are local


_JB_OVERLAP = 512                  # chars; > 2 * _JB_WINDOW, so each trigger word's window


_INVISIBLE = dict.fromkeys(map(ord,
    "\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b\u200c\u200d\u200e\u200f\u202a\u202b"
    "\u202c\u202d\u202e\u2060\u2061\u2062\u2063\u2064\u2066\u2067\u2068\u2069\u3164\ufeff\uffa0"), None)


_CONFUSABLES = str.maketrans({
    # Cyrillic and Greek letters that render like Latin ones (after NFKC, before lower-casing).
    "\u0430": "a", "\u0435": "e", "\u043e": "o", "\u0440": "p", "\u0441": "c", "\u0443": "y",
    "\u0445": "x", "\u0456": "i", "\u0458": "j", "\u0455": "s", "\u0501": "d", "\u04bb": "h",
    "\u0410": "A", "\u0412": "B", "\u0415": "E", "\u041a": "K", "\u041c": "M", "\u041d": "H",
    "\u041e": "O", "\u0420": "P", "\u0421": "C", "\u0422": "T", "\u0425": "X", "\u0406": "I",
    "\u03bf": "o", "\u03b1": "a", "\u03b5": "e", "\u03b9": "i", "\u03ba": "k", "\u03bd": "v",
    "\u03c1": "p", "\u03c4": "t", "\u03c5": "u", "\u03c7": "x", "\u0391": "A", "\u0392": "B",
    "\u0395": "E", "\u0397": "H", "\u0399": "I", "\u039a": "K", "\u039c": "M", "\u039d": "N",
    "\u039f": "O", "\u03a1": "P", "\u03a4": "T", "\u03a7": "X", "\u0261": "g", "\u0131": "i"})


_COMBINING_RE = re.compile(r"[\u0300-\u036f\u1ab0-\u1aff\u20d0-\u20ff]")


_WS_RE = re.compile(r"[^\S\n]+")


_NL_RE = re.compile(r"[^\S\n]*\n\s*")


# Four or more single letters separated by one space/dot/dash: "i g n o r e", "i.g.n.o.r.e".
_SPACED_RE = re.compile(r"(?<![\w])(?:[a-z0-9@$][ ._*/-]){3,}[a-z0-9@$](?![\w])")


_SPACED_SEP_RE = re.compile(r"[ ._*/-]")


# What every match of _SPACED_RE contains, found faster (it starts with a class, not a look-behind).
_SPACED_PRE_RE = re.compile(r"[a-z0-9@$][ ._*/-][a-z0-9@$][ ._*/-][a-z0-9@$][ ._*/-][a-z0-9@$]")


_SEARCH_TURNS = 64                 # places tried one by one in Python before the plain search takes over


def _spaced_runs(lower: str) -> Iterator[re.Match]:
    """_SPACED_RE.finditer(lower), tried only where _SPACED_PRE_RE (a class first, so re skips
    to it) finds what every match starts with: the look-behind first made re try every place.
    A text with many such places (letter-spaced tables, hostile input) is searched the plain
    way from there on, all in C."""
    pos = 0
    for _ in range(_SEARCH_TURNS):
        pre = _SPACED_PRE_RE.search(lower, pos)
        if pre is None:
            return
        m = _SPACED_RE.match(lower, pre.start())       # (the look-behind still sees what precedes)
        if m is None:
            pos = pre.start() + 1
        else:
            yield m
            pos = m.end()
    yield from _SPACED_RE.finditer(lower, pos)


_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"})


_LEET_WORD_RE = re.compile(r"[a-z0-9@$]*[0-9@$][a-z0-9@$]*")


# A digit, @ or $ next to a letter (or to | or !, next to a letter in turn): every text that
# _LEET_WORD_RE changes or _LEET_CAND_RE matches has one (both need a letter and one of those
# in one run of such characters); written to start with its class, so that re skips to those.
_LEET_CHAR_RE = re.compile(r"[0-9@$](?:(?<=[a-z|!][0-9@$])|(?=[a-z|!]))")


_LEET_INNER_RE = re.compile(r"(?<=[a-z])[!|](?=[a-z])")


_INNER_PUNCT_RE = re.compile(r"(?<=[a-z])[._*~+|/\\-]+(?=[a-z])")


# Misspelt key words ("ignroe all prevous instructons") are corrected in short texts only:
# one edit away from one of these, for words of at least 5 letters.
_JB_SPELL_WORDS = ("ignore", "disregard", "previous", "instructions", "instruction", "directives", "system",
                   "prompt", "forget", "bypass", "restrictions", "guidelines", "reveal", "jailbreak", "unrestricted",
                   "unfiltered", "uncensored", "developer", "filters", "safety")


_JB_SPELL_MAX_TEXT = 2000          # chars; longer texts are not spell-corrected (cost)


_JB_WINDOW = 120                   # chars analysed on each side of a trigger word


_JB_MAX_WINDOW = 4096              # chars; overlapping trigger windows merge up to this size, so


                                   # the per-window work (not linear in the window) stays bounded
                                   # and a text dense with trigger words is scanned in linear time
# The look-aheads are bounded: unbounded, "|a|a|a..." made every position rescan the whole run.
_LEET_CAND_RE = re.compile(
    r"(?<![a-z0-9@$])(?=[a-z0-9@$|!]{0,64}[a-z])(?=[a-z0-9@$|!]{0,64}[0-9@$])[a-z0-9@$|!]{3,}")


_LEET_MARK_RE = re.compile(r"[0-9@$]")
_LEET_RUN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789@$|!")
_LEET_RUN_END_RE = re.compile(r"[a-z0-9@$|!]*")


def _leet_candidates(lower: str) -> Iterator[re.Match]:
    """_LEET_CAND_RE.finditer(lower), searched only in the runs of its characters that hold a
    digit, @ or $ (each match lies in one run and needs one): its look-behind first made re try
    every place of the text, and its look-aheads every word. Past _SEARCH_TURNS runs (numbers
    everywhere, hostile input) the rest is searched the plain way, all in C."""
    if not _LEET_CHAR_RE.search(lower):
        return                                         # no mark beside a letter: no candidate
    end, turns = 0, 0
    for mark in _LEET_MARK_RE.finditer(lower):
        at = mark.start()
        if at < end:
            continue                                   # (in the run just searched)
        turns += 1
        if turns > _SEARCH_TURNS:                      # marks everywhere: the plain search, in C
            yield from _LEET_CAND_RE.finditer(lower, end)
            return
        start = at
        while start and lower[start - 1] in _LEET_RUN_CHARS:
            start -= 1
        end = _LEET_RUN_END_RE.match(lower, at).end()
        yield from _LEET_CAND_RE.finditer(lower, start, end)


# Words that, written in leetspeak, mark a place worth analysing (their plain forms may be too
# common to be triggers on their own, e.g. "without", "content").
_LEET_WORDS = frozenset(
    "ignore disregard forget bypass override instructions previous prompt system jailbreak unfiltered uncensored "
    "unrestricted restrictions filters safety guardrails developer mode reveal dan anything without rules policy "
    "content verbatim hidden secret pretend evil ethics censorship disable turn off".split())


class _View:
    """What the prefilter tells about one text: the patterns whose needed pieces it has
    (`live`, bit k for pattern k of _NEEDS), and where those that have starts may start.
    A plain view (v None) tells nothing: every pattern is searched for, which is cheaper
    for a few patterns than looking at the text's words."""
    __slots__ = ("live", "places", "started")

    def __init__(self, v: str | None):
        if v is None:
            self.live, self.places, self.started = -1, {}, 0
            return
        mask, places = _NEEDS.scan(v)
        self.live = _NEEDS.live(mask)
        self.started = _NEEDS.started
        self.places = starting_places(places, self.live & self.started)

    def matches(self, rx: re.Pattern, v: str, k: int) -> bool:
        """rx.search(v) is not None, for pattern k."""
        if not self.live >> k & 1:
            return False
        if self.started >> k & 1:
            return any(rx.match(v, p) for p in self.places.get(1 << k, ()))
        return rx.search(v) is not None

    def places_of(self, rx: re.Pattern, v: str, k: int) -> list[int]:
        """Every place where pattern k matches (overlapping matches too)."""
        if not self.live >> k & 1:
            return []
        if self.started >> k & 1:
            return [p for p in self.places.get(1 << k, ()) if rx.match(v, p)]
        out, m = [], rx.search(v)
        while m:
            out.append(m.start())
            m = rx.search(v, m.start() + 1)
        return out


_PLAIN = _View(None)


class _JbPositions(dict):
    """Word-index spans of each concept in `v` (starts: char offset of each word), found on
    first use: most windows have no directive, role or secret word, and then the concepts
    that only qualify those (dismiss, anchor, reveal...) are never searched; nor is a concept
    whose needed pieces `v` lacks (see _View)."""
    __slots__ = ("v", "starts", "view")

    def __init__(self, v: str, starts: list[int], view: _View):
        super().__init__()
        self.v, self.starts, self.view = v, starts, view

    def __missing__(self, name: str) -> list[tuple[int, int]]:
        starts, spans, view, k = self.starts, [], self.view, _CONCEPT_NEED[name]
        if view.live >> k & 1:
            rx, v = _JB_CONCEPTS[name], self.v
            if view.started >> k & 1:                # rx.finditer(v), tried where k may start
                found, end, match = [], 0, rx.match
                for p in view.places.get(1 << k, ()):
                    if p >= end:
                        m = match(v, p)
                        if m:
                            found.append(m)
                            end = m.end()
            else:
                found = rx.finditer(v)
            for m in found:
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


# What each block of _jb_concept_hits can add, by the concept it loops over.
_JB_CONCEPT_BLOCK_HITS = {
    "directive": {("c-changed", "override", 0.5), ("c-override", "override", 1.0), ("c-override-weak", "override", 0.4)},
    "strong_safety": {("c-filter", "filter_bypass", 1.0), ("c-filter-weak", "filter_bypass", 0.6),
                      ("c-filter-off", "filter_bypass", 1.0), ("c-filter-off-weak", "filter_bypass", 0.6)},
    "safety": {("c-filter-yours", "filter_bypass", 0.8), ("c-filter-weak", "filter_bypass", 0.5)},
    "role": {("c-persona", "persona", 1.0), ("c-persona-bad", "persona", 0.6)},
    "secret": {("c-extract", "prompt_extraction", 1.0)},
    "ai_reader": {("c-indirect", "override", 1.0)},
    "recency": {("c-recency", "persona", 0.4)},
    "mode": {("c-mode", "developer_mode", 1.0), ("c-mode-weak", "developer_mode", 0.6)},
}


def _jb_concept_hits(v: str, hits: set, view: _View) -> None:
    for k, (sid, family, weight, rx) in enumerate(_JB_WORD_SIGNALS, _WORD_NEED):
        if (sid, family, weight) not in hits and view.matches(rx, v, k):
            hits.add((sid, family, weight))
    # Where each word starts: the ends of what lies between them (one split, added up in C).
    starts = list(itertools.accumulate(map(len, _JB_WORD_SPLIT_RE.split(v))))[0:-1:2]
    if not starts:
        return
    c = _JbPositions(v, starts, view)

    def spans(name: str) -> list[tuple[int, int]]:
        """The spans of a concept that starts a block, none if all the block adds is in hits
        (from another variant of the window)."""
        return [] if hits.issuperset(_JB_CONCEPT_BLOCK_HITS[name]) else c[name]

    for a, b in spans("directive"):
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
    for a, b in spans("strong_safety"):
        addressed = bool(_jb_near(c["you"], a, b, 4)) and not _jb_near(c["user_owned"], a, b, 4)
        if _jb_near(c["dismiss"], a, b, 5):
            hits.add(("c-filter", "filter_bypass", 1.0) if addressed else ("c-filter-weak", "filter_bypass", 0.6))
        if _jb_near(c["off"], a, b, 3):
            hits.add(("c-filter-off", "filter_bypass", 1.0) if addressed else ("c-filter-off-weak", "filter_bypass", 0.6))
    for a, b in spans("safety"):
        addressed = bool(_jb_near(c["you"], a, b, 3)) and not _jb_near(c["user_owned"], a, b, 3)
        if _jb_near(c["dismiss"], a, b, 4) or _jb_near(c["off"], a, b, 2):
            hits.add(("c-filter-yours", "filter_bypass", 0.8) if addressed else ("c-filter-weak", "filter_bypass", 0.5))
    for a, b in spans("role"):
        if any(x > b for x, _ in _jb_near(c["unbound"], a, b, 14)):
            hits.add(("c-persona", "persona", 1.0))
        if any(x > b for x, _ in _jb_near(c["bad_persona"], a, b, 6)):
            hits.add(("c-persona-bad", "persona", 0.6))
    for a, b in spans("secret"):
        for x, _ in _jb_near(c["reveal"], a, b, 8):
            if not _jb_starts_in(c["negation"], a - 3, x - 1):
                hits.add(("c-extract", "prompt_extraction", 1.0))
                break
    # A note addressed to an AI reader that asks for secrecy, exfiltration or a new task is an
    # indirect injection (documents, web pages, e-mails); the address alone is only a hint.
    for a, b in spans("ai_reader"):
        if _jb_near(c["payload"], a, b, 30):
            hits.add(("c-indirect", "override", 1.0))
            break
    # "From now on" + talk to the model: a behaviour change, never enough alone.
    for a, b in spans("recency"):
        if _jb_near(c["you"], a, b, 10):
            hits.add(("c-recency", "persona", 0.4))
            break
    for a, b in spans("mode"):
        if _jb_near(c["mode_on"], a, b, 3):
            strong = _JB_STRONG_MODE_RE.search(v, starts[max(0, a - 2)], starts[b] + 5) is not None
            hits.add(("c-mode", "developer_mode", 1.0) if strong else ("c-mode-weak", "developer_mode", 0.6))


def _jb_compile() -> tuple[tuple, tuple]:
    """The phrase signals grouped per family and case mode, strongest first: where two signals
    of a family match at the same place only the stronger one counts (as in one alternation
    per family). Each signal: (its hit, its pattern, its index in _NEEDS); each family: (its
    signals, the bits of their indices)."""
    groups: dict[tuple[str, bool], list] = {}
    for i, (family, weight, pattern) in enumerate(_JB_SIGNALS):
        cased = pattern.startswith("cs:")
        groups.setdefault((family, cased), []).append(((i, family, weight), re.compile(pattern.removeprefix("cs:")), i))
    for sigs in groups.values():
        sigs.sort(key=lambda s: -s[0][2])
    family = {key: sum(1 << k for _, _, k in sigs) for key, sigs in groups.items()}
    return (tuple((tuple(sigs), family[key]) for key, sigs in groups.items() if not key[1]),
            tuple((tuple(sigs), family[key]) for key, sigs in groups.items() if key[1]))


_JB_GROUPS, _JB_CASED_GROUPS = _jb_compile()


# Needs of every pattern run on a window: the phrase signals, then the word signals, then the
# concepts. Their analyses ship in needs_table.py (tools/lexicon_needs.py writes it), as making
# them takes longer than the rest of the import.
_WINDOW_PATTERNS = ([p.removeprefix("cs:") for _, _, p in _JB_SIGNALS] + [rx.pattern for *_, rx in _JB_WORD_SIGNALS]
                    + [rx.pattern for rx in _JB_CONCEPTS.values()])


_KNOWN = read_table(TABLE)


_NEEDS = Needs(_WINDOW_PATTERNS, _KNOWN)


_WORD_NEED = len(_JB_SIGNALS)


def _jb_gate(ks: list[int]) -> tuple[str, ...] | None:
    """Strings one of which a text contains wherever one of the patterns ks of _NEEDS
    matches (None: no such strings): the letters of each pattern's first needed pieces."""
    out: set[str] = set()
    for k in ks:
        first = 1 << k                               # the bit of pattern k's first set
        pieces = {piece for piece, bits in _NEEDS.bits.items() if bits & first}
        if not pieces:
            return None
        out |= {piece.strip("^$") for piece in pieces}
    return tuple(sorted(out))


# The cased signals (DAN) need their own look at the window; most windows have none of their words.
_JB_CASED_GATE = _jb_gate([i for i, (_, _, p) in enumerate(_JB_SIGNALS) if p.startswith("cs:")])


_CONCEPT_NEED = {name: _WORD_NEED + len(_JB_WORD_SIGNALS) + k for k, name in enumerate(_JB_CONCEPTS)}


def _jb_phrase_hits(v: str, groups: tuple, view: _View, hits: set) -> None:
    """The phrase signals of `groups` found in v: in each family, a signal counts where it
    matches at a place no stronger signal of its family matches. Signals already in `hits`
    (from another variant of the window) are looked for only as far as weaker ones need."""
    for sigs, family in groups:
        if not view.live & family:
            continue
        live = [sig for sig in sigs if view.live >> sig[2] & 1]
        last = len(live) - 1                     # the weakest signal not yet found
        while last >= 0 and live[last][0] in hits:
            last -= 1
        if last < 0:
            continue
        if last == 0:
            hit, rx, k = live[0]
            if view.matches(rx, v, k):
                hits.add(hit)
            continue
        taken: set[int] = set()                  # where a stronger signal of the family matched
        started, places = view.started, view.places
        for hit, rx, k in live[:last + 1]:
            if started >> k & 1:                 # view.places_of, inline
                match = rx.match
                found = [p for p in places.get(1 << k, ()) if match(v, p)]
            else:
                found = view.places_of(rx, v, k)
            for p in found:
                if p not in taken:
                    hits.add(hit)
                    taken.add(p)


_JB_FAMILY_ORDER = ("override", "persona", "developer_mode", "prompt_extraction", "filter_bypass",
                    "role_injection", "harmful_intent", "obfuscation", "adversarial_suffix", "learned")


# The learned scorer: its weights are read on first use and kept by this object.
_LEARNED = LearnedScorer()


def _jb_normalize(text: str) -> str:
    """NFKC, invisible/bidi characters removed, look-alikes folded (whitespace is collapsed per
    window). Case is kept (the DAN signals need it)."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text).translate(_INVISIBLE).translate(_CONFUSABLES)
        text = _COMBINING_RE.sub("", text)
    return text


def _jb_fold(lower: str) -> str:
    """Matching-only copy: leetspeak folded inside words that also contain letters,
    punctuation inside words dropped (i.g.n.o.r.e, ignore.all.previous), letter spacing joined."""
    folded = lower
    if _LEET_CHAR_RE.search(folded):
        folded = _LEET_WORD_RE.sub(lambda m: m.group().translate(_LEET) if any(c.isalpha() for c in m.group()) else m.group(), folded)
    if "!" in folded or "|" in folded:
        folded = _LEET_INNER_RE.sub("i", folded)
    if _SPACED_PRE_RE.search(folded):
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
    return _spell_word(m.group())


def _spell_word(word: str) -> str:
    fixed = _SPELL_MEMO.get(word)
    if fixed is None:
        fixed = word
        if len(word) >= 5:
            for key in _JB_SPELL_WORDS:
                if word != key and word[0] == key[0] and _one_edit(word, key):
                    fixed = key
                    break
        if len(word) <= _SPELL_MEMO_WORD:
            if len(_SPELL_MEMO) >= _SPELL_MEMO_SIZE:
                _SPELL_MEMO.clear()
            _SPELL_MEMO[word] = fixed
    return fixed


_SPELL_MEMO: dict[str, str] = {}   # word -> its spelling fix (texts repeat their words)


_SPELL_MEMO_SIZE = 8192           # words kept (then forgotten at once)


_SPELL_MEMO_WORD = 40              # chars; longer words are fixed, not kept


_JB_WORD_SPLIT_RE = re.compile(f"({_JB_WORD_RE.pattern})")    # between, word, between, ..., between


_SPELL_CLEAN: set[str] = set()     # white-space-delimited pieces none of whose words a fix changes


def _spelling_changes(text: str) -> bool:
    """Whether a word of `text` has a spelling fix. A word never holds white space, so the
    text's words are its pieces' words: most pieces are known to have none, and only the others
    are split into words."""
    pieces = text.split()
    if _SPELL_CLEAN.issuperset(pieces):
        return False
    changes = False
    for piece in set(pieces).difference(_SPELL_CLEAN):
        if any(_spell_word(w) != w for w in _JB_WORD_RE.findall(piece)):
            changes = True
        elif len(piece) <= _SPELL_MEMO_WORD:
            if len(_SPELL_CLEAN) >= _SPELL_MEMO_SIZE:
                _SPELL_CLEAN.clear()
            _SPELL_CLEAN.add(piece)
    return changes


def _jb_spellfixed(text: str) -> str:
    """_JB_WORD_RE.sub(_jb_spellfix, text), its words looked up (mostly) rather than matched
    one by one, and no rewrite where none changes."""
    if not _spelling_changes(text):
        return text
    parts = _JB_WORD_SPLIT_RE.split(text)
    words = parts[1::2]
    fixed = list(map(_SPELL_MEMO.get, words))
    if None in fixed:
        fixed = [f if f is not None else _spell_word(w) for f, w in zip(fixed, words)]
    if fixed == words:
        return text
    parts[1::2] = fixed
    return "".join(parts)


def _jb_windows(lower: str) -> list[tuple[int, int]]:
    """Where to look: every signal contains a trigger word, so only the text around trigger
    words (plainly written, letter-spaced, leetspeak or, in short texts, misspelt) is analysed."""
    pos = [m.start() for m in _JB_TRIGGER_RE.finditer(lower)]
    for m in _spaced_runs(lower):
        if _JB_TRIGGER_RE.search(_SPACED_SEP_RE.sub("", m.group())):
            pos.append(m.start())
    for m in _leet_candidates(lower):
        word = m.group().translate(_LEET)
        if word in _LEET_WORDS or _JB_TRIGGER_RE.search(word):
            pos.append(m.start())
    if not pos and len(lower) <= _JB_SPELL_MAX_TEXT:
        fixed = _jb_spellfixed(lower)
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
        fixed = _jb_spellfixed(variants[-1])
        if fixed != variants[-1]:
            variants.append(fixed)
    for v in variants:
        view = _View(v)
        _jb_concept_hits(v, hits, view)
        _jb_phrase_hits(v, _JB_GROUPS, view, hits)
    if _JB_CASED_GATE is None or any(w in norm for w in _JB_CASED_GATE):
        _jb_phrase_hits(norm, _JB_CASED_GROUPS, _PLAIN, hits)


_WINDOW_HITS: dict[bytes, frozenset] = {}   # digest of a window -> its signals


_WINDOW_HITS_KEPT = 4096           # windows whose signals are kept (then forgotten at once)


def _jb_window_hits_kept(window: str) -> frozenset:
    """_jb_window_hits of a window, kept for windows seen again: a conversation resends its
    history with each turn, and the windows of the old turns come out as they were (the
    text-level caches miss, as the text grew)."""
    if len(window) < _SCAN_CACHE_MIN:
        hits: set = set()
        _jb_window_hits(window, hits)
        return frozenset(hits)
    key = _text_key(window)
    found = _WINDOW_HITS.get(key)
    if found is None:
        hits = set()
        _jb_window_hits(window, hits)
        found = frozenset(hits)
        if len(_WINDOW_HITS) >= _WINDOW_HITS_KEPT:
            _WINDOW_HITS.clear()
        _WINDOW_HITS[key] = found
    return found


def _jb_scan(text: str) -> set:
    """The signals of one text. In talk about prompt injection, quoted text is left out."""
    hits: set = set()
    norm = _jb_normalize(text)
    lower = norm.lower()
    for s, e in _jb_windows(lower):
        window = _jb_window_hits_kept(norm[s:e])
        if window and _JB_META_RE.search(lower, s, e):
            unquoted = _JB_QUOTED_RE.sub(" ", norm[s:e])
            if unquoted != norm[s:e]:
                window = _jb_window_hits_kept(unquoted)
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


def _segments(n: int, segment: int, overlap: int) -> Iterator[tuple[int, int, int]]:
    """(lo, hi, core_start) slices of a text of n chars: cores of `segment` chars tile it, each
    slice adds `overlap` chars of context on both sides."""
    for core in range(0, n, segment):
        yield max(0, core - overlap), min(n, core + segment + overlap), core


def _jb_hits(text: str) -> frozenset:
    """_jb_scan, memoised for long texts: a conversation resends its history every turn.
    Long texts are scanned segment by segment (see _SCAN_SEGMENT) and their signals joined."""
    if len(text) > _JB_SEGMENT + 2 * _JB_OVERLAP:
        hits: set = set()
        for lo, hi, _ in _segments(len(text), _JB_SEGMENT, _JB_OVERLAP):
            hits |= _jb_hits(text[lo:hi])
        return frozenset(hits)
    if len(text) < _SCAN_CACHE_MIN:
        return _jb_scan_all(text)
    key = ("jb", _text_key(text))
    hits = _cache_get(key)
    if hits is None:
        hits = _jb_scan_all(text)
        _cache_put(key, hits)
    return hits


def _jb_scan_all(text: str) -> frozenset:
    """The lexicon's signals, the adversarial-suffix signal and the other languages' intents."""
    hits = frozenset(_jb_scan(text)) | _jb_suffix(text)
    if text.isascii():
        return hits | multilingual_hits(text)
    return hits | multilingual_hits(text.translate(_INVISIBLE))


_SUFFIX_HITS = (frozenset(), frozenset({("suffix", "adversarial_suffix", 0.6)}),
                frozenset({("suffix", "adversarial_suffix", 1.0)}))


def _jb_suffix(text: str) -> frozenset:
    """The adversarial-suffix signal of a text's tail: strong enough to flag alone, or a weak
    one that needs another signal, or none."""
    odd = suffix_score(_jb_normalize(text[-2 * TAIL_CHARS:]))
    return _SUFFIX_HITS[2 if odd >= _SUFFIX_ALONE else 1 if odd >= _SUFFIX_WEAK else 0]


def _b64_text(run: str) -> str | None:
    """Decoded text of a base64 run if it reads like a sentence, else None."""
    run = run.rstrip("=")
    if len(run) % 4 == 1:
        run = run[:-1]
    try:
        raw = base64.urlsafe_b64decode(run.replace("+", "-").replace("/", "_") + "=" * (-len(run) % 4))
        decoded = raw.decode("utf-8")
    except ValueError:                                          # incl. binascii.Error, UnicodeDecodeError
        return None
    printable = sum(c.isprintable() or c in "\n\t" for c in decoded)
    if len(decoded) < 8 or printable < 0.95 * len(decoded) or decoded.count(" ") < 2:
        return None
    return decoded


def _jb_score(hits: set) -> tuple[float, tuple[str, ...]]:
    best: dict[Any, tuple[str, float]] = {}
    for sid, family, weight in hits:
        if sid not in best or abs(weight) > abs(best[sid][1]):
            best[sid] = (family, weight)
    by_family: dict[str, list[float]] = {}
    for family, weight in best.values():
        by_family.setdefault(family, []).append(weight)
    score = 0.0
    for weights in by_family.values():
        weights.sort(reverse=True)
        # Signals of one family often see the same words; only a little of the rest counts.
        score += min(_JB_FAMILY_CAP, weights[0] + _JB_FAMILY_REST * sum(weights[1:]))
    return round(max(score, 0.0), 4), tuple(f for f in _JB_FAMILY_ORDER if max(by_family.get(f, (0,))) > 0)


def _jb_learned(text: str) -> float:
    """The learned scorer's part of a text's score (0 to 1), memoised for long texts like the
    signals; a very long text is scored segment by segment and its best segment counts."""
    if len(text) > _JB_SEGMENT + 2 * _JB_OVERLAP:
        return max(_jb_learned(text[lo:hi]) for lo, hi, _ in _segments(len(text), _JB_SEGMENT, _JB_OVERLAP))
    if len(text) < _SCAN_CACHE_MIN:
        norm = _jb_normalize(text)
        return _LEARNED.component(norm, norm.lower())
    key = ("jbl", _text_key(text))
    value = _cache_get(key)
    if value is None:
        norm = _jb_normalize(text)
        value = _LEARNED.component(norm, norm.lower())
        _cache_put(key, value)
    return value


def _jb_total(hits: set, learned: float) -> tuple[float, tuple[str, ...]]:
    """The heuristic score of `hits` plus the learned part; "learned" is named among the
    families when that part counted."""
    score, families = _jb_score(hits)
    if learned <= 0.0:
        return score, families
    return round(score + learned, 4), families + ("learned",)


def jailbreak_score(text: str) -> tuple[float, tuple[str, ...]]:
    """(score, families hit) for a text; the text is a prompt injection when the score is at
    least the rule's threshold (JAILBREAK_THRESHOLD by default)."""
    if not text:
        return 0.0, ()
    return _jb_total(_jb_hits(text), _jb_learned(text))
