"""Adversarial suffixes: the strings a gradient search (GCG and its kin) appends to a request so
that a model complies. They are made of tokens picked for their effect, not their sense, and read
like nothing people write: words glued and re-cased mid-token (``similarlyNow``), punctuation
inside and between words (``oppositeley.](``, ``giving**ONE``), runs of mixed marks (``%{``,
``"\\!--``), brackets left open. This module scores how much of a text's tail reads that way.

Code, links, paths, hashes, tables and log lines are odd too, in their own regular ways; they are
recognised and not counted (a line of code is not a suffix), so ordinary technical text passes.
Pure and bounded: at most the last _TAIL_TOKENS tokens of a text are read."""

import functools
import itertools
import operator
import re

TAIL_CHARS = 4096                  # chars of a text's end that are read at most
_TAIL_TOKENS = 64                  # a suffix is short: the tail of a long text is all that is read
_WINDOW = 12                       # tokens per window; the worst window of the tail counts
_CONTEXT = 24                      # tokens before a window that must read as prose
_MIN_PROSE = 3                     # ... at least this many (the request a suffix is appended to)

# Punctuation a word may carry at its edges in prose: opening marks before, closing marks after.
_LEAD = "([{\"'\u201c\u2018\u00ab*_#@$\u00bf\u00a1<"
_TRAIL = ".,;:!?)]}\"'\u201d\u2019\u00bb*_%\u2026>"
# Punctuation a word may hold inside in prose: don't, well-known, and/or, e.g., 3.14, a&b.
_INNER_OK = frozenset("'-/.&\u2019:+,_@\u2192\u00d7=")

# A token that is a known odd-but-regular thing: a URL, an e-mail, a path, a number or version, a
# hex/base64 run, a hashtag, a mention, an emoticon, a file name, a markdown or table marker.
_REGULAR_RE = re.compile(
    r"(?:\S*[a-z][a-z0-9+.-]*://\S+|www\.\S+|\S+@\S+\.\w+|[~.]?/[\w./-]+|[a-z]:\\\S*|\\\\\S+"
    r"|[#@][\w-]+[.,;:)]*|--?[a-z][\w-]*(?:=\S*)?|v?\d[\d.,:/x-]*%?|[$\u20ac\u00a3\u00a5]?[-+]?\d[\d.,]*[%km]?[.,;:)]*|[0-9a-f]{7,}|[A-Za-z0-9+/=_-]{24,}"
    r"|[:;=8][-']?[()\[\]dpo3/\\|]|<3|\^_\^|-_-|[-=_*#~]{3,}|\|[-:| ]*\|?|`+[^`]+`+[.,;:)]*"
    r"|[\w-]+\.(?:py|js|ts|md|txt|json|yaml|yml|toml|csv|pdf|docx?|xlsx?|png|jpe?g|gif|html?|css|sh|go|rs|c|h|cpp|java|rb|log|zip|gz)[.,;:)]?"
    r"|[\w.]+(?:\(\w*\)|\[\w*\])[.,;:)]*|\(?[a-z]\)|\d+[.)]|[ivx]+[.)]|.*\\(?:[nrt]|u[0-9a-f]{4}).*)$", re.I)
# Marks a suffix strings together; a lone one of the common ones is prose (a dash, an ampersand).
_PROSE_MARKS = frozenset(["-", "\u2013", "\u2014", "&", "+", "=", "*", "/", "|", "\u2022", "\u2192", "...", "\u2026", ">",
                          "#", "~", "(", ")", ":", "?", "!", "--", "**", "..", "<", "%", "$"])
# Markup that pairs up its marks: `code` and ``code`` spans, [links](...), <tags>, &entities;,
# reST targets. Where a text has two or more, they are taken out before its tokens are judged.
_MARKUP_RE = re.compile(r"``[^`]{1,200}``|`[^`\n]{1,200}`|`[^`\n]{1,200}'|!?\[[^\]\n]{0,200}\]\([^)\s]{0,400}\)"
                        r"|\[!\[[^\]\n]{0,200}\]\]\[[^\]\n]{0,200}\]|!?\[[^\]\n]{0,200}\]\[[^\]\n]{0,200}\]|^\s*\[[^\]\n]{1,200}\]:\s*\S.*$"
                        r"|</?[a-zA-Z][^<>\n]{0,300}>|&#?\w{2,8};|^\s*\.\. .*$|^\s*:\w+:.*$", re.M)
_INDENTED_RE = re.compile(r"^(?: {4,}|\t)\S", re.M)
_RUN_RE = re.compile(r"[^\w\s.]{2,}|[^\w\s]{3,}")
_OPENERS = {"[": "]", "{": "}", "(": ")"}
_FIRST, _LAST = operator.itemgetter(0), operator.itemgetter(-1)     # (of a token: never empty)
_OPERATOR_RE = re.compile(r"(?:[-=!<>:+*/%&|^]=?|[=<>!]{2,3}|->|=>|<-)[.,;:]?$")
_PLAIN_RE = re.compile(r"[(\"'\u201c\u2018]?(?:[A-Z]?[a-z]+|[A-Z]+|\d+)(?:['\u2019-][a-z]+)*[.,;:!?)\"'\u201d\u2019]{0,2}$")
_TOKEN_CHARS = 64                  # chars of a token judged (bounds the regexes' work)
_LINE_CHARS = 500                  # chars of a line matched against the code patterns
_CLOSE_WITHIN = 8                  # tokens within which prose closes a bracket it opens
_FLOOR = 0.2                       # share of odd tokens below which a window is prose
_OPEN_BONUS = 0.15                 # added to a window's share when it leaves three brackets open
_REPEATED = frozenset(["[", "]", "{", "}", "(", ")", "!", "?", "<", ">", "`", "^", "[[", "]]", "!!", "{{", "}}"])
_CAMEL_RE = re.compile(r"[a-z]{2,}[A-Z][a-z]|[A-Z]{2,}[a-z]{3,}")
_PASCAL_RE = re.compile(r"[A-Z][a-z]{3,}[A-Z][a-z]+[A-Z]|[A-Z][a-z]{4,}[A-Z][a-z]{5,}|[a-z][A-Z]{2}")
_WORDISH_RE = re.compile(r"[^\W\d_]{2,}")

# Lines that are code, markup or data: a text with several is technical, and its tail is judged
# as such (not at all).
_CODE_LINE_RE = re.compile(
    r"^ {4,}\S.*$|^\t+\S|^\s*(?:def |async def |await |class |import |from \S+ import |return\b|if .*:$|for .*:$|elif |else:|try:|except|with .*:$"
    r"|function\b|const |let |var |public |private |static |#include|package |func |fn |impl |struct |use \w"
    r"|@\w|//|/\*|\*/|#!|\$ |>>> |\.\.\. |SELECT |INSERT |UPDATE |CREATE |<\w[^>]*>|</\w)"
    r"|[;{}]\s*$|^\s*[}\])]|=>|->\s*\w+\s*[:{]|\w\(.*\)\s*[;{:]?\s*$|^\s*[\w.\[\]\"']+\s*[-+*/]?=\s*\S"
    r"|^\s*\S+\s+\|\s+\d+|\b\d+\s+files?\s+changed\b|^\s*[#$]\s+[\w./-]+\s+-"
    r"|^\s*[\"'][^\"'\n]*[\"'],?\s*$|^\s*\"?[\w-]+\"?\s*:\s*\S|^\s*[-*]\s|^\s*\||^\s*#\s|\{['\"]\w|['\"]\s*:\s*['\"\d\[{]|``", re.M)


def _odd(token: str) -> float:
    """How unlike prose one whitespace-delimited token is: 0 (a word, a number, a link) to 1."""
    if _REGULAR_RE.match(token):
        return 0.0
    if not any(c.isalpha() for c in token):
        if token in _PROSE_MARKS or len(token) == 1:
            return 0.25
        if _OPERATOR_RE.match(token):
            return 0.5                                                # == != -> (also in code and maths)
        return 1.0 if len(set(token)) > 1 else 0.5                  # %{ "\!-- ]( -> ==
    core = token.lstrip(_LEAD).rstrip(_TRAIL)
    lead, trail = len(token) - len(token.lstrip(_LEAD)), len(token) - len(token.rstrip(_TRAIL))
    score = 0.0
    if not core:
        return 1.0
    inner = [c for c in core if not c.isalnum() and c not in _INNER_OK]
    if inner or _RUN_RE.search(core):
        score = 1.0                                                   # giving**ONE FOR:}Task giving////one
    elif lead > 2 or trail > 3 or (trail > 1 and len(set(token[len(token) - trail:])) > 2):
        score = 1.0                                                   # oppositeley.]( "{Sure
    if _CAMEL_RE.search(core) and not core[:1].isupper() or _CAMEL_RE.match(core) and core[:2].isupper():
        score = max(score, 0.75)                                      # similarlyNow DJstructor
    elif _PASCAL_RE.search(core):
        score = max(score, 0.5)                                       # JustifiesHChoice
    if sum(not c.isalnum() for c in core) >= 2 and len(set(c for c in core if not c.isalnum())) >= 2 \
            and not _WORDISH_RE.fullmatch(core.replace("'", "").replace("-", "")):
        score = max(score, 0.75)
    return score


@functools.lru_cache(maxsize=4096)
def _token_odd(token: str) -> float:
    """_odd of a token, with plain words decided by str methods and a regex first; kept per
    token (prose repeats its words, code and resent conversations their tokens)."""
    if (token.isalpha() and (token.islower() or token.istitle() or token.isupper())) or _PLAIN_RE.match(token):
        return 0.0
    return _odd(token[:_TOKEN_CHARS])


def _oddness(tokens: list[str]) -> list[float]:
    """_odd of each token, lone marks repeated and brackets left open counted in full."""
    odd = [_token_odd(t) for t in tokens]
    if not _REPEATED.isdisjoint(tokens):
        for i in range(1, len(tokens)):
            # The same lone mark again and again ("[ [ [", "! ! !"): no prose repeats punctuation so.
            if odd[i] and tokens[i] in _REPEATED and tokens[i] in tokens[max(0, i - 2):i]:
                odd[i] = 1.0
    joined = " ".join(tokens)
    openers = [] if "(" not in joined and "[" not in joined and "{" not in joined else \
        list(itertools.compress(range(len(tokens)), map(operator.or_, map(_OPENERS.__contains__, map(_FIRST, tokens)),
                                                        map(_OPENERS.__contains__, map(_LAST, tokens)))))
    for i in openers:
        # A bracket opened at a word and never closed within a few words ("[binom", "[ und").
        t = tokens[i]
        opener = t[:1] if t[:1] in _OPENERS else t[-1:]
        if odd[i] < 0.75 and not any(_OPENERS[opener] in u for u in tokens[i:i + _CLOSE_WITHIN]):
            odd[i] = 0.75
    return odd


def _worst(tokens: list[str], odd: list[float]) -> tuple[float, int]:
    """(share of odd tokens, start) of the worst window starting after the first _MIN_PROSE
    tokens and within the last _TAIL_TOKENS, the first of equals; (0, -1) when the text is too
    short for one. Oddness is in quarters, so the window sums (prefix-sum differences) are
    exact."""
    n = _WINDOW
    first = max(_MIN_PROSE, len(tokens) - _TAIL_TOKENS)
    if len(tokens) - n < first:
        return 0.0, -1
    prefix = list(itertools.accumulate(odd[first:], initial=0.0))
    sums = list(map(operator.sub, prefix[n:], prefix))
    best = max(sums)
    at = first + sums.index(best)
    window = "".join(tokens[at:at + n])
    open_marks = sum(window.count(c) for c in "([{") - sum(window.count(c) for c in ")]}")
    return best / n + (_OPEN_BONUS if abs(open_marks) >= 3 else 0.0), at     # brackets left open


def suffix_score(text: str) -> float:
    """0 to 1: the share of odd tokens in the worst window of the text's tail, where the text
    before reads as prose and the tail is not code, markup or data. 0 when it cannot tell."""
    text = text[-TAIL_CHARS:]
    tokens = text.split()[-(_TAIL_TOKENS + _CONTEXT):]
    share, at = _worst(tokens, _oddness(tokens))
    if share < _FLOOR:
        return 0.0                                                    # prose: the common case, decided here
    # The tail's lines: code or data lines among them make it technical text, not a suffix.
    tail_text = text[-min(len(text), sum(len(t) + 1 for t in tokens[max(0, at - _CONTEXT):]) + 64):]
    lines = [line[:_LINE_CHARS] for line in tail_text.splitlines()]
    if sum(len(_CODE_LINE_RE.findall(line)) + bool(_INDENTED_RE.match(line)) for line in lines) >= 2:
        return 0.0                                                    # (a code block's line counts twice)
    if len(_MARKUP_RE.findall(text)) >= 2:
        text = _MARKUP_RE.sub(" ", text)                              # code spans, links, tags: not suffixes
        tokens = text.split()[-(_TAIL_TOKENS + _CONTEXT):]
    odd = _oddness(tokens)
    share, at = _worst(tokens, odd)
    if share < _FLOOR:
        return 0.0
    # What comes before the worst window must read as prose: a request in words.
    before = odd[max(0, at - _CONTEXT):at]
    if sum(before) / len(before) > 0.2:
        return 0.0
    if sum(1 for t in tokens[at:at + _WINDOW] if _WORDISH_RE.search(t)) < 2:
        return 0.0                                                    # a row of marks, not a suffix
    return round(min(1.0, max(0.0, (share - _FLOOR) / 0.3)), 4)
