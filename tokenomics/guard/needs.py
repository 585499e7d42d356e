"""What a regular expression needs in a text before it can match, so that the jailbreak
detector runs a pattern only where it might match. A pattern needs a few sets of word pieces:
every match contains a piece of each set. A piece is a string of letters, found inside one run
of letters of the text, at its start ("^ign"), at its end ("ions$") or as the whole run
("^dan$") where the pattern puts a word boundary or a non-letter there. The analysis reads the
parsed pattern and is conservative: where it cannot tell (classes, repeats that may be empty,
case-insensitive groups), it requires nothing. It also finds the pieces a match starts with
(a word start, any letters, one non-letter character, the text's start): a pattern is then
tried only where one of them is, with re's match, instead of searched for.

`Needs` holds the sets of many patterns as bits: `scan(text)` has the bit of every set that
the text satisfies, and `live` of that the bit of every pattern that may match there (the
j-th set of pattern k of n is bit j * n + k, so that one shift per set tells all patterns);
`scan` also gives the places where patterns may start."""

import collections
import functools
import hashlib
import itertools
import json
import operator
import re
from typing import Any, Iterable

try:
    from re import _parser as _sre              # Python 3.11+
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre

_MAX_STRINGS = 64                 # strings per set; larger products are not enumerated


_MAX_STARTS = 1024                # strings a match may start with; more are not enumerated


_MIN_WEIGHT = 3.0                 # a set whose weakest piece weighs less is not kept (such
                                  # pieces are in nearly every text); weight: letters, plus
_ANCHOR_WEIGHT = 1.5              # this for each end of the piece tied to an end of its run
_MAX_SETS = 3                     # sets kept per pattern (the heaviest first)


_BOUND = "\0"                     # stands for \b in the strings a node matches


CHAR = "\1"                       # a start piece that is one character, not letters


_TEXT_START = "\3"                # ^ or \A (patterns are compiled without MULTILINE): the text's
                                  # first place, the only one where a match so begun may start


_NONLETTER = "\2"                 # in the strings a match starts with: a character that is no
                                  # letter (\s, \d), so the letters before it end their run


_RUN_MAX = 40                     # chars; longer letter runs are looked at, not kept


_RUNS_KEPT = 8192                 # letter runs whose pieces are kept (then forgotten at once; ~1 MB)


# Letters (and other word characters that are neither digits nor "_"): a text's runs of them
# are where its pieces are looked up.
LETTERS_RE = re.compile(r"[^\W\d_]+")


_SPLIT_RE = re.compile(r"([^\W\d_]+)")


_ZERO_WIDTH = (_sre.AT, _sre.ASSERT, _sre.ASSERT_NOT)
_REPEATS = tuple(op for op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", None)) if op)
_GROUPS = tuple(op for op in (_sre.SUBPATTERN, getattr(_sre, "ATOMIC_GROUP", None)) if op)


def _product(a: set[str] | None, b: set[str] | None, cap: int = _MAX_STRINGS) -> set[str] | None:
    if a is None or b is None or len(a) * len(b) > cap:
        return None
    return {x + y for x in a for y in b}


@functools.lru_cache(maxsize=4096)
def _weight(piece: str) -> float:
    return len(piece.strip("^$")) + _ANCHOR_WEIGHT * (piece.startswith("^") + piece.endswith("$"))


def _piece(s: str) -> str:
    """The heaviest piece that a text matching the string s (with _BOUND for \\b) contains."""
    best, best_weight = "", 0.0
    for m in LETTERS_RE.finditer(s):
        piece = ("^" if m.start() > 0 else "") + m.group() + ("$" if m.end() < len(s) else "")
        if _weight(piece) > best_weight:
            best, best_weight = piece, _weight(piece)
    return best


def _score(pieces: frozenset[str]) -> tuple[float, int, list[str]]:
    return min(map(_weight, pieces)), -len(pieces), sorted(pieces)


def _pieces(strings: set[str]) -> frozenset[str] | None:
    """The strings a part of a pattern matches as a set of pieces, if worth keeping."""
    pieces = frozenset(map(_piece, strings))
    return pieces if min(map(_weight, pieces)) >= _MIN_WEIGHT else None


def _class_chars(items: list) -> set[str] | None:
    chars: set[str] = set()
    for op, av in items:
        if op is _sre.LITERAL:
            chars.add(chr(av))
        elif op is _sre.RANGE and av[1] - av[0] < _MAX_STRINGS:
            chars.update(chr(c) for c in range(av[0], av[1] + 1))
        else:
            return None                              # NEGATE, CATEGORY, large ranges
    return chars if len(chars) <= _MAX_STRINGS else None


_MEMO: dict[tuple[Any, int], tuple[set[str] | None, list[frozenset[str]]]] = {}   # within one analyse()


def _node(op, av) -> tuple[set[str] | None, list[frozenset[str]]]:
    """(every string the node can match, if few; the sets of pieces it needs)."""
    key = (op, id(av))
    found = _MEMO.get(key)
    if found is None:
        found = _MEMO[key] = _node_once(op, av)
    return found


def _node_once(op, av) -> tuple[set[str] | None, list[frozenset[str]]]:
    if op is _sre.AT:
        if av is _sre.AT_BOUNDARY:
            return {_BOUND}, []
        return ({_TEXT_START} if av in (_sre.AT_BEGINNING, _sre.AT_BEGINNING_STRING) else {""}), []
    if op in _ZERO_WIDTH:
        return {""}, []
    if op is _sre.IN:
        return _class_chars(av), []
    if op in _GROUPS:
        if op is _sre.SUBPATTERN:
            _, add_flags, _, sub = av
            if add_flags & (re.IGNORECASE | re.LOCALE):
                return None, []
        else:
            sub = av
        return _seq(sub)
    if op is _sre.BRANCH:
        exact: set[str] | None = set()
        needed: set[str] | None = set()
        for alt in av[1]:
            e, n = _seq(alt)
            exact = None if exact is None or e is None or len(exact) + len(e) > _MAX_STRINGS else exact | e
            if needed is not None:
                best = max(n, key=_score, default=None)
                needed = None if best is None else needed | best
        return exact, ([frozenset(needed)] if needed else [])
    if op in _REPEATS:
        lo, hi, sub = av
        e, n = _seq(sub)
        if lo == 0:
            return ({""} | e if hi == 1 and e is not None else None), []
        if lo == hi == 1:
            return e, n
        return None, n
    return None, []                                  # ANY, NOT_LITERAL, CATEGORY, GROUPREF...


def _seq(items: Iterable) -> tuple[set[str] | None, list[frozenset[str]]]:
    """Exact strings and needed sets of a sequence of nodes: each node's own sets, and the
    pieces of each run of nodes whose strings are few (a literal word, "rules?", "summari[sz]e")."""
    exact: set[str] | None = {""}
    run: set[str] = {""}
    needed: list[frozenset[str]] = []

    def close() -> None:
        pieces = _pieces(run) if run != {""} else None
        if pieces:
            needed.append(pieces)

    for op, av in getattr(items, "data", items):    # a parsed SubPattern's own list (faster)
        if op is _sre.LITERAL:                       # the common case, inline
            c = chr(av)
            run = {x + c for x in run}
            if exact is not None:
                exact = {x + c for x in exact}
            continue
        e, n = _node(op, av)
        needed.extend(n)
        exact = _product(exact, e)
        joined = _product(run, e)
        if joined is None:
            close()
            run = e if e is not None else {""}
        else:
            run = joined
    close()
    return exact, needed


def _starts(items, i: int = 0) -> set[str] | None:
    """Strings (with _BOUND for \\b) one of which begins every match of the nodes items[i:]."""
    data = getattr(items, "data", items)
    prefix = {""}
    for k in range(i, len(data)):
        op, av = data[k]
        if op is _sre.LITERAL:
            prefix = {x + chr(av) for x in prefix}
            continue
        e, _ = _node(op, av)
        if e is None and op is _sre.IN and _no_letters(av):
            e = {_NONLETTER}
        if e is not None:
            joined = _product(prefix, e, _MAX_STARTS)
            if joined is None:
                return prefix
            prefix = joined
            continue
        sub: set[str] | None = None
        if op in _REPEATS:
            sub = _starts(av[2])
            if av[0] == 0 and sub is not None:       # taken, or skipped for what follows
                rest = _starts(data, k + 1)
                sub = None if rest is None else sub | rest
        elif op is _sre.BRANCH:
            sub = set()
            for alt in av[1]:
                first = _starts(alt)
                if first is None:
                    sub = None
                    break
                sub |= first
        elif op in _GROUPS:
            if op is _sre.SUBPATTERN and not av[1] & (re.IGNORECASE | re.LOCALE):
                sub = _starts(av[3])
            elif op is not _sre.SUBPATTERN:
                sub = _starts(av)
        joined = _product(prefix, sub, _MAX_STARTS) if sub is not None else None
        return prefix if joined is None else joined
    return prefix


def _no_letters(items: list) -> bool:
    """Whether a class (\\s, \\d, [\\s,]) matches no letter."""
    for op, av in items:
        if op is _sre.CATEGORY:
            if av not in (_sre.CATEGORY_SPACE, _sre.CATEGORY_DIGIT):
                return False
        elif op is _sre.LITERAL:
            if LETTERS_RE.match(chr(av)):
                return False
        else:
            return False                             # NEGATE, ranges
    return True


def _start_piece(s: str) -> str | None:
    """The piece a match that begins with s begins with: letters, or CHAR and a character
    that is no letter ("<" for "<|"); None for the empty string."""
    if s.lstrip(_BOUND).startswith(_TEXT_START):
        return _TEXT_START
    anchored = s.startswith(_BOUND)
    s = s.lstrip(_BOUND)
    m = LETTERS_RE.match(s)
    if m is None:
        return CHAR + s[0] if s and s[0] != _NONLETTER else None
    return ("^" if anchored else "") + m.group() + ("$" if m.end() < len(s) else "")


def analyse(pattern: str) -> tuple[tuple[frozenset[str], ...], frozenset[str] | None]:
    """(pattern_needs(pattern), pattern_starts(pattern)), from one parse."""
    parsed = _sre.parse(pattern)
    if parsed.state.flags & (re.IGNORECASE | re.LOCALE):
        return (), None
    try:
        _, needed = _seq(parsed)
        starts = _starts(parsed)
    finally:
        _MEMO.clear()                                # its keys are ids of this parse's nodes
    pieces: set[str] | None = set()
    for s in starts or ():
        piece = _start_piece(s)
        if piece is None:
            pieces = None
            break
        pieces.add(piece)
    return tuple(sorted(set(needed), key=_score, reverse=True)[:_MAX_SETS]), (frozenset(pieces) if pieces else None)


def pattern_needs(pattern: str) -> tuple[frozenset[str], ...]:
    """The sets of pieces that every match of `pattern` (compiled without flags) contains one
    piece of each. Empty: the pattern could match anywhere."""
    return analyse(pattern)[0]


def pattern_starts(pattern: str) -> frozenset[str] | None:
    """The pieces one of which every match of `pattern` (compiled without flags) begins
    with, or None: a match can start only where one of them starts in a run of letters (or
    at a character that is no letter: CHAR and that character)."""
    return analyse(pattern)[1]


Analysis = tuple[tuple[frozenset[str], ...], frozenset[str] | None]


def pattern_key(pattern: str) -> str:
    return hashlib.blake2b(pattern.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def table(patterns: Iterable[str]) -> str:
    """The analyses of `patterns` as JSON text, keyed by pattern_key (see read_table)."""
    rows = {}
    for pattern in patterns:
        needs, starts = analyse(pattern)
        rows[pattern_key(pattern)] = [[sorted(p) for p in needs], sorted(starts) if starts else None]
    return json.dumps(rows, sort_keys=True, separators=(",", ":"))


def read_table(text: str) -> dict[str, Analysis]:
    return {key: (tuple(frozenset(p) for p in needs), frozenset(starts) if starts else None)
            for key, (needs, starts) in json.loads(text).items()}


class Needs:
    """The needs and starts of many patterns, and a text's pieces (from its letter runs,
    whose results are kept: texts repeat their words). `known`: analyses already made (see
    table); the other patterns are analysed here."""

    def __init__(self, patterns: Iterable[str], known: dict[str, Analysis] | None = None):
        patterns = list(patterns)
        n = self.size = len(patterns)
        self.need: list[int] = []
        self.bits: dict[str, int] = {}
        self.starts: dict[str, int] = {}             # start piece -> bits (1 << k) of pattern k
        self.chars: dict[str, int] = {}              # start character -> bits (1 << k) of pattern k
        self.at_start = 0                            # the bits of patterns that may start at 0
        self.started = 0                             # the bits of patterns that have starts
        self._free = [0] * _MAX_SETS                 # per set j: patterns with fewer sets than j + 1
        for k, pattern in enumerate(patterns):
            mask = 0
            found = known.get(pattern_key(pattern)) if known else None
            needs, starts = found if found is not None else analyse(pattern)
            for j in range(_MAX_SETS):
                if j >= len(needs):
                    self._free[j] |= 1 << k
                    continue
                bit = 1 << (j * n + k)
                for piece in needs[j]:
                    self.bits[piece] = self.bits.get(piece, 0) | bit
                mask |= bit
            self.need.append(mask)
            for piece in starts or ():
                if piece == _TEXT_START:
                    self.at_start |= 1 << k
                elif piece[0] == CHAR:
                    self.chars[piece[1]] = self.chars.get(piece[1], 0) | 1 << k
                else:
                    self.starts[piece] = self.starts.get(piece, 0) | 1 << k
                self.started |= 1 << k
        self._longest = max((len(p.strip("^$")) for p in (*self.bits, *self.starts)), default=0)
        inside = [p for p in (*self.bits, *self.starts) if p[0] != "^" and p[-1] != "$"]
        # The first two letters of the pieces found anywhere in a run (None: one is shorter),
        # so that a long run (a word without spaces, text in a script written without them)
        # is not cut into all its substrings.
        self._heads = None if any(len(p) < 2 for p in inside) else frozenset(p[:2] for p in inside)
        self._runs: dict[str, tuple[int, tuple[tuple[int, int], ...]]] = {}

    def _run_info(self, run: str) -> tuple[int, tuple[tuple[int, int], ...]]:
        """(the need bits the run satisfies, (offset, bits of the patterns that may start there)...)."""
        bits, starts, n, longest = self.bits, self.starts, len(run), self._longest
        at: dict[int, int] = {}

        def look(key: str, offset: int) -> int:
            b = starts.get(key)
            if b:
                at[offset] = at.get(offset, 0) | b
            return bits.get(key, 0)

        mask = look("^" + run + "$", 0)
        for j in range(1, min(n, longest) + 1):
            mask |= look("^" + run[:j], 0) | look(run[n - j:] + "$", n - j)
        heads = self._heads
        for i in range(n):
            if heads is None or run[i:i + 2] in heads:   # pieces inside the run start with a head
                for j in range(i + 1, min(n, i + longest) + 1):
                    mask |= look(run[i:j], i)
        return mask, tuple(sorted(at.items()))

    def scan(self, text: str) -> tuple[int, list[tuple[int, int]]]:
        """(the need bits `text` satisfies, [(place, bits of the patterns that may start there)...])."""
        parts = _SPLIT_RE.split(text)             # between, run, between, run, ..., between
        runs, cache = parts[1::2], self._runs
        infos = list(map(cache.get, runs))
        if None in infos:
            for i, info in enumerate(infos):
                if info is None:
                    run = runs[i]
                    info = infos[i] = self._run_info(run)
                    if len(run) <= _RUN_MAX:
                        if len(cache) >= _RUNS_KEPT:
                            cache.clear()
                        cache[run] = info
        mask = functools.reduce(operator.or_, map(operator.itemgetter(0), infos), 0)
        ends = list(itertools.accumulate(map(len, parts)))       # ends[2 * i]: where run i starts
        places = [(ends[2 * i] + offset, b) for i, info in enumerate(infos) if info[1] for offset, b in info[1]]
        found = False
        if self.at_start:
            places.insert(0, (0, self.at_start))
        for c, b in self.chars.items():
            i = text.find(c)
            while i >= 0:
                places.append((i, b))
                found = True
                i = text.find(c, i + 1)
        if found:
            places.sort()
        return mask, places

    def live(self, mask: int) -> int:
        """The bits (1 << k) of the patterns k whose needs `mask` satisfies."""
        n, all_ = self.size, (1 << self.size) - 1
        live = all_
        for j, free in enumerate(self._free):
            live &= (mask >> (j * n)) & all_ | free
        return live

    def mask(self, text: str) -> int:
        return self.scan(text)[0]


def starting_places(places: list[tuple[int, int]], wanted: int) -> dict[int, list[int]]:
    """{bit of pattern k: the places (ascending) where k may start} for the patterns in `wanted`."""
    out: collections.defaultdict[int, list[int]] = collections.defaultdict(list)
    bits_of = _BITS_OF
    for place, b in places:
        b &= wanted
        if b:
            single = bits_of.get(b)
            if single is None:
                single = _bits(b)
            for low in single:
                out[low].append(place)
    return out


_BITS_OF: dict[int, tuple[int, ...]] = {}   # a set of patterns' bits -> each bit (they recur)


_BITS_KEPT = 4096


def _bits(b: int) -> tuple[int, ...]:
    single = []
    rest = b
    while rest:
        low = rest & -rest
        single.append(low)
        rest ^= low
    if len(_BITS_OF) >= _BITS_KEPT:
        _BITS_OF.clear()
    _BITS_OF[b] = single = tuple(single)
    return single
