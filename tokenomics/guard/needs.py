"""What a regular expression needs in a text before it can match, so that the jailbreak
detector runs a pattern only where it might match. A pattern needs a few sets of word pieces:
every match contains a piece of each set. A piece is a string of letters, found inside one run
of letters of the text, at its start ("^ign"), at its end ("ions$") or as the whole run
("^dan$") where the pattern puts a word boundary or a non-letter there. The analysis reads the
parsed pattern and is conservative: where it cannot tell (classes, repeats that may be empty,
case-insensitive groups), it requires nothing.

`Needs` holds the sets of many patterns as bits: `mask(text)` has the bit of every set that
the text satisfies, and pattern k can match only if `mask & need[k] == need[k]`."""

import re
from typing import Iterable

try:
    from re import _parser as _sre              # Python 3.11+
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre

_MAX_STRINGS = 64                 # strings per set; larger products are not enumerated


_MIN_WEIGHT = 3.0                 # a set whose weakest piece weighs less is not kept (such
                                  # pieces are in nearly every text); weight: letters, plus
_ANCHOR_WEIGHT = 1.5              # this for each end of the piece tied to an end of its run
_MAX_SETS = 3                     # sets kept per pattern (the heaviest first)


_BOUND = "\0"                     # stands for \b in the strings a node matches


_RUN_MAX = 40                     # chars; longer letter runs are looked at, not kept


_RUNS_KEPT = 20000                # letter runs whose pieces are kept (then forgotten at once)


# Letters (and other word characters that are neither digits nor "_"): a text's runs of them
# are where its pieces are looked up.
LETTERS_RE = re.compile(r"[^\W\d_]+")


_ZERO_WIDTH = (_sre.AT, _sre.ASSERT, _sre.ASSERT_NOT)
_REPEATS = tuple(op for op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", None)) if op)
_GROUPS = tuple(op for op in (_sre.SUBPATTERN, getattr(_sre, "ATOMIC_GROUP", None)) if op)


def _product(a: set[str] | None, b: set[str] | None) -> set[str] | None:
    if a is None or b is None or len(a) * len(b) > _MAX_STRINGS:
        return None
    return {x + y for x in a for y in b}


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


def _node(op, av) -> tuple[set[str] | None, list[frozenset[str]]]:
    """(every string the node can match, if few; the sets of pieces it needs)."""
    if op is _sre.AT:
        return ({_BOUND} if av is _sre.AT_BOUNDARY else {""}), []
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


def pattern_needs(pattern: str) -> tuple[frozenset[str], ...]:
    """The sets of pieces that every match of `pattern` (compiled without flags) contains one
    piece of each. Empty: the pattern could match anywhere."""
    parsed = _sre.parse(pattern)
    if parsed.state.flags & (re.IGNORECASE | re.LOCALE):
        return ()
    _, needed = _seq(parsed)
    return tuple(sorted(set(needed), key=_score, reverse=True)[:_MAX_SETS])


class Needs:
    """The needs of many patterns, and a text's pieces (from its letter runs, whose results
    are kept: texts repeat their words)."""

    def __init__(self, patterns: Iterable[str]):
        self.need: list[int] = []
        self.bits: dict[str, int] = {}
        bit = 0
        for pattern in patterns:
            mask = 0
            for pieces in pattern_needs(pattern):
                for piece in pieces:
                    self.bits[piece] = self.bits.get(piece, 0) | 1 << bit
                mask |= 1 << bit
                bit += 1
            self.need.append(mask)
        self._longest = max((len(p.strip("^$")) for p in self.bits), default=0)
        self._heads = frozenset(p[:3] for p in self.bits if p[0] != "^" and p[-1] != "$")
        self._runs: dict[str, int] = {}

    def _run_mask(self, run: str) -> int:
        bits, n, longest = self.bits, len(run), self._longest
        mask = bits.get("^" + run + "$", 0)
        for j in range(1, min(n, longest) + 1):
            mask |= bits.get("^" + run[:j], 0) | bits.get(run[n - j:] + "$", 0)
        heads = self._heads
        for i in range(n - 2):
            if run[i:i + 3] in heads:
                for j in range(i + 3, min(n, i + longest) + 1):
                    mask |= bits.get(run[i:j], 0)
        return mask

    def mask(self, text: str) -> int:
        mask, runs = 0, self._runs
        for run in set(LETTERS_RE.findall(text)):
            m = runs.get(run)
            if m is None:
                m = self._run_mask(run)
                if len(run) <= _RUN_MAX:
                    if len(runs) >= _RUNS_KEPT:
                        runs.clear()
                    runs[run] = m
            mask |= m
        return mask
