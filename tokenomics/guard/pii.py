"""PII detectors: one finder per type, validated (Luhn, mod-97, SSN ranges) to keep false
positives low, overlaps resolved by priority."""

import base64
import bisect
import ipaddress
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from ..guard.scan import PII_TYPES, _PEM_MAX_BODY, _SCAN_CACHE_MIN, _cache_get, _cache_put, _text_key


                                   # lies whole inside one segment


@dataclass(frozen=True, slots=True)
class Span:
    """A match in a text: [start, end) and its label (a PII type, a rule name, REGEX/KEYWORD)."""
    start: int
    end: int
    label: str


# Each detector: a candidate regex (ASCII digits only, anchored by look-arounds so it starts
# only at a token boundary, which also keeps the scan linear) and a validator. Candidates of
# all requested types are then resolved: the longest wins an overlap, ties by _PII_PRIORITY.

_PII_PRIORITY = {t: i for i, t in enumerate((
    "private_key", "connection_string", "jwt", "github_token", "aws_key", "api_key", "iban",
    "credit_card", "ssn", "email", "phone", "ip_address"))}


# Where a pattern starts with a digit, the "not preceded by" check comes after the first digit
# ([0-9](?<!X[0-9])): a pattern that starts with a character class lets `re` skip ahead fast.
_SSN_RE = re.compile(r"([0-9](?<![\w.-][0-9])[0-9]{2})([- ])([0-9]{2})\2([0-9]{4})(?![\w-]|[.,][0-9])")


_SSN_CONTEXT_RE = re.compile(
    r"(?i:\bssn|\bsocial\s+security(?:\s+(?:number|no\.?|num\.?|#))?|\bss\s*#)[^0-9\n]{0,20}?"
    r"(?<![0-9])([0-9]{9})(?![0-9])")


_CARD_RE = re.compile(
    r"[0-9](?<![\w.,-][0-9])(?:[0-9]{12,18}|[0-9]{3}([ -])[0-9]{4}\1[0-9]{4}\1[0-9]{1,7}"
    r"|[0-9]{3}([ -])[0-9]{6}\2[0-9]{4,5})(?![\w-]|[.,][0-9])")


_EMAIL_RE = re.compile(
    r"(?<![\w.+%'-])[A-Za-z0-9_](?:[A-Za-z0-9._%+'-]{0,62}[A-Za-z0-9_])?"
    r"@((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+([A-Za-z]{2,24}))(?![\w-]|\.[A-Za-z0-9])")


_EMAIL_LOCAL_RE = re.compile(r"[A-Za-z0-9._%+'-]{1,64}$")


# Asset names like icon@2x.png look like addresses; these "TLDs" are file extensions.
_EMAIL_FILE_TLDS = frozenset(
    "png jpg jpeg gif svg webp ico bmp tif tiff pdf js mjs cjs css scss less html htm json yaml "
    "yml xml txt md lock map ts tsx jsx py rb php java kt swift".split())


_NANP_RE = re.compile(
    r"(?<![\w+.-])(?:\+?1[ .-]?)?(?:\(([2-9][0-9]{2})\)[ ]?|([2-9][0-9]{2})[ .-])"
    r"([2-9][0-9]{2})[ .-]([0-9]{4})(?![\w-]|[.,][0-9])")


# Every North-American number ends in exchange, separator, line: found fast, then the full
# pattern is tried over the few characters before it.
_NANP_HINT_RE = re.compile(r"[2-9](?<![0-9][2-9])[0-9]{2}[ .-][0-9]{4}(?![0-9])")


_E164_RE = re.compile(
    r"(?<![\w+])\+[1-9][0-9]{0,3}(?:[ .-]?\(?[0-9]{1,4}\)?){1,6}(?![\w]|[.,-]?[0-9])")


_IPV4_HINT_RE = re.compile(r"[0-9][0-9]{0,2}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}")   # [0-9] first: see above


_IPV4_RE = re.compile(
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}"
    r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(?!\.?\w)")


# "version 1.2.3.4", "==1.2.3.4": a dotted quad that is a version, not an address.
_IPV4_VERSION_CONTEXT_RE = re.compile(
    r"(?i:\bversion|\bver\.?|\brelease|\bbuild|\brev(?:ision)?|\bfirmware|\bv)\s*$|(?:==|>=|<=|~=|!=|\^|~>)\s*$")


_IPV6_RE = re.compile(
    r"(?<![\w:.])(?=[0-9A-Fa-f:.]*:[0-9A-Fa-f]*:)[0-9A-Fa-f:]{2,39}"
    r"(?:(?<=:)(?:[0-9]{1,3}\.){3}[0-9]{1,3})?(?![\w:]|\.[0-9])")


_AWS_ID_RE = re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Za-z0-9])")


_AWS_SECRET_RE = re.compile(
    r"(?i:aws)[^\n]{0,60}?(?i:secret|key)[^\n]{0,30}?(?:[=:]\s*|\s+)[\"']?"
    r"(?<![A-Za-z0-9/+])([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])")


_API_KEY_RE = re.compile(
    r"(?<![A-Za-z0-9_-])(?:"
    r"(sk-(?:ant-(?:api|admin)[0-9]{2}-|proj-|svcacct-|admin-)?)[A-Za-z0-9_-]{20,}"
    r"|((?:sk|rk)_(?:live|test)_)[A-Za-z0-9]{16,}"
    r"|(key-)[A-Za-z0-9]{24,}"
    r"|(AIza)[0-9A-Za-z_-]{35}"
    r"|(xox[abposr]-)[A-Za-z0-9-]{10,}"
    r"|(xapp-[0-9]-)[A-Za-z0-9-]{10,}"
    r"|(hf_)[A-Za-z0-9]{30,}"
    r"|(gsk_)[A-Za-z0-9]{40,}"
    r"|(xai-)[A-Za-z0-9]{40,}"
    r"|(r8_)[A-Za-z0-9]{30,}"
    r"|(pplx-)[A-Za-z0-9]{40,}"
    r"|(glpat-)[A-Za-z0-9_-]{20,}"
    r"|(npm_)[A-Za-z0-9]{36}"
    r"|(SG\.)[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{16,}"
    r")(?![A-Za-z0-9_-])")


_API_KEY_HINT_RE = re.compile(r"sk-|sk_|rk_|key-|AIza|xox|xapp-|hf_|gsk_|xai-|r8_|pplx-|glpat-|npm_|SG\.")


_API_ASSIGN_HINT_RE = re.compile(r"api[_-]?key|apikey|secret[_-]?key|access[_-]?token|auth[_-]?token|client[_-]?secret")


# `api_key = "..."`-style assignments of an otherwise unprefixed secret.
_API_KEY_ASSIGN_RE = re.compile(
    r"(?i:api[_-]?key|apikey|secret[_-]?key|access[_-]?token|auth[_-]?token|client[_-]?secret"
    r"|x-api-key)[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9_+/=-]{20,200})(?![A-Za-z0-9_+/=-])")


_JWT_RE = re.compile(
    r"(?<![A-Za-z0-9_-])(eyJ[A-Za-z0-9_-]{8,})\.([A-Za-z0-9_-]{8,})\.[A-Za-z0-9_-]{0,1024}(?![A-Za-z0-9_-])")


_PEM_HEAD = r"-----BEGIN (?:[A-Z0-9]+ ){0,2}PRIVATE KEY(?: BLOCK)?-----"


_PEM_LINE_BREAK = r"(?:[ \t]*(?:\r?\n|\\r?\\n)[ \t]*)"


_PEM_RE = re.compile(
    _PEM_HEAD + r"(?:[\s\S]{0,%d}?-----END (?:[A-Z0-9]+ ){0,2}PRIVATE KEY(?: BLOCK)?-----" % _PEM_MAX_BODY
    + r"|" + _PEM_LINE_BREAK + r"?(?:[A-Za-z0-9+/=]{16,}" + _PEM_LINE_BREAK + r"?)+)")


# Continues a private key block whose header scrolled out of a stream's window.
_PEM_BODY_RE = re.compile(
    r"(?:[A-Za-z0-9+/=\s]|\\r|\\n)*(?:-----END (?:[A-Z0-9]+ ){0,2}PRIVATE KEY(?: BLOCK)?-----)?")


_CONN_RE = re.compile(
    r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]{1,30}://([^\s:/?#@'\"`<>]{0,128}):([^\s/?#@'\"`<>]{1,256})"
    r"@[A-Za-z0-9._~%\[\]:-]{1,255}(?:[/?#][^\s'\"`<>]*)?")


_GITHUB_RE = re.compile(
    r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{22,255})(?![A-Za-z0-9_])")


_IBAN_RE = re.compile(r"[A-Z](?<![A-Za-z0-9][A-Z])[A-Z][0-9]{2}(?: ?[A-Z0-9]){11,36}(?![A-Za-z0-9])")


_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31,
    "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30}


_TRAILING_PUNCT = ".,;:!?)]}'\""


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i & 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_ok(digits: str) -> bool:
    """Length and issuer-prefix sanity, then Luhn: an order number is rarely all three."""
    n = len(digits)
    if not 13 <= n <= 19 or digits.count(digits[0]) == n:
        return False
    p2, p3, p4 = int(digits[:2]), int(digits[:3]), int(digits[:4])
    if digits[0] == "4":
        ok = n in (13, 16, 19)                                   # Visa
    elif 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        ok = n == 16                                             # Mastercard
    elif p2 in (34, 37):
        ok = n == 15                                             # Amex
    elif 300 <= p3 <= 305 or p2 in (36, 38, 39):
        ok = 14 <= n <= 19                                       # Diners
    elif 3528 <= p4 <= 3589:
        ok = 16 <= n <= 19                                       # JCB
    elif p4 == 6011 or p2 in (62, 65) or 644 <= p3 <= 649:
        ok = 16 <= n <= 19                                       # Discover, UnionPay
    elif p2 in (50, 56, 57, 58) or digits[0] == "6":
        ok = 13 <= n <= 19                                       # Maestro
    else:
        ok = False
    return ok and _luhn_ok(digits)


def _ssn_ok(area: str, group: str, serial: str) -> bool:
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _nanp_ok(area: str, exchange: str) -> bool:
    return area[0] in "23456789" and exchange[0] in "23456789" and area[1:] != "11"


def _iban_ok(compact: str) -> bool:
    num = "".join(str(int(c, 36)) for c in compact[4:] + compact[:4])
    return int(num) % 97 == 1


def _looks_random(s: str) -> bool:
    """An unprefixed secret: letters and digits mixed like a random string, not an identifier
    such as get_api_key_from_environment."""
    digits = sum(c.isdigit() for c in s)
    if not digits or not any(c.isalpha() for c in s):
        return False
    mixed_case = any(c.islower() for c in s) and any(c.isupper() for c in s)
    return mixed_case or digits / len(s) >= 0.15


def _b64url_json(part: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except ValueError:
        return None


def _find_ssn(text: str) -> Iterator[tuple[int, int]]:
    for m in _SSN_RE.finditer(text):
        if _ssn_ok(m.group(1), m.group(3), m.group(4)):
            yield m.span()
    lower = text.lower()
    if "ssn" not in lower and "social" not in lower and "ss#" not in lower and "ss #" not in lower:
        return
    for m in _SSN_CONTEXT_RE.finditer(text):
        d = m.group(1)
        if _ssn_ok(d[:3], d[3:5], d[5:]):
            yield m.span(1)


def _find_credit_card(text: str) -> Iterator[tuple[int, int]]:
    for m in _CARD_RE.finditer(text):
        if _card_ok(m.group().replace(" ", "").replace("-", "")):
            yield m.span()


def _find_email(text: str) -> Iterator[tuple[int, int]]:
    at = text.find("@")
    resume = 0
    while at >= 0:
        # Start from each "@" and look back for the local part, instead of trying every word.
        local = _EMAIL_LOCAL_RE.search(text, max(resume, at - 64), at)
        m = None
        if local:
            for start in range(local.start(), at):
                m = _EMAIL_RE.match(text, start)
                if m:
                    break
        at = text.find("@", at + 1)
        if m is None:
            continue
        resume = m.end()
        if at >= 0 and at < resume:
            at = text.find("@", resume)
        if m.group(2).lower() in _EMAIL_FILE_TLDS:
            continue
        if text.startswith("://", m.start() - 3):
            continue                                             # https://user@host: URL userinfo
        end = m.end()
        if text.startswith(":", end) and end + 1 < len(text) and not text[end + 1].isspace():
            continue                                             # git@github.com:org/repo (scp-style)
        yield m.span()


def _find_phone(text: str) -> Iterator[tuple[int, int]]:
    for hint in _NANP_HINT_RE.finditer(text):
        m = _NANP_RE.search(text, max(0, hint.start() - 12), min(len(text), hint.end() + 3))
        if m and m.end() == hint.end() and _nanp_ok(m.group(1) or m.group(2), m.group(3)):
            yield m.span()
    if "+" in text:
        for m in _E164_RE.finditer(text):
            digits = re.sub(r"[^0-9]", "", m.group())
            if digits[0] == "1":
                if len(digits) == 11 and _nanp_ok(digits[1:4], digits[4:7]):
                    yield m.span()
            elif 8 <= len(digits) <= 15:
                yield m.span()


def _find_ip_address(text: str) -> Iterator[tuple[int, int]]:
    if "." in text:
        for hint in _IPV4_HINT_RE.finditer(text):
            m = _IPV4_RE.match(text, hint.start())
            if m and not _IPV4_VERSION_CONTEXT_RE.search(text, max(0, m.start() - 12), m.start()):
                yield m.span()
    if text.count(":") >= 2:                                     # _IPV6_RE's look-ahead needs two
        for m in _IPV6_RE.finditer(text):
            cand = m.group()
            if not any(c.isdigit() for c in cand):
                continue                                         # dead::beef, C++ a::b
            try:
                ipaddress.IPv6Address(cand)
            except ValueError:
                continue
            yield m.span()


def _find_aws_key(text: str) -> Iterator[tuple[int, int]]:
    if "A" in text and ("AKIA" in text or "ASIA" in text or "ABIA" in text or "ACCA" in text):
        for m in _AWS_ID_RE.finditer(text):
            yield m.span()
    if not _has_digit(text) or "aws" not in text.lower():      # a secret has a digit, near "aws"
        return
    for m in _AWS_SECRET_RE.finditer(text):
        s = m.group(1)
        if any(c.islower() for c in s) and any(c.isupper() for c in s) and any(c.isdigit() for c in s):
            yield m.span(1)


# The literals _API_KEY_HINT_RE finds: by the separator they end in, and the others each with
# a rarer character of theirs, checked first.
_API_KEY_HINTS = (("-", ("sk-", "key-", "xapp-", "xai-", "pplx-", "glpat-")),
                  ("_", ("sk_", "rk_", "hf_", "gsk_", "r8_", "npm_")))
_API_KEY_BARE_HINTS = (("z", "AIza"), ("x", "xox"), ("G", "SG."))
_HINT_STEPS = 64                   # occurrences looked at in Python (plus 1 per 128 chars) before
                                   # the hint regex takes over


def _api_key_hints(text: str) -> list[int]:
    """Where a hint literal of _API_KEY_HINT_RE starts, found from the separators ('-', '_')
    that most of them end in: prose has few of those, while the hint regex tries nearly every
    letter. Falls back to the regex when occurrences are many (the loop here is Python)."""
    starts = set()
    steps = _HINT_STEPS + len(text) // 128
    for sep, literals in _API_KEY_HINTS:
        i = text.find(sep)
        while i >= 0:
            steps -= 1
            if steps < 0:
                return [h.start() for h in _API_KEY_HINT_RE.finditer(text)]
            if text.endswith(literals, 0, i + 1):
                starts.update(i + 1 - len(lit) for lit in literals if text.endswith(lit, 0, i + 1))
            i = text.find(sep, i + 1)
    for rare, literal in _API_KEY_BARE_HINTS:
        if rare in text:
            i = text.find(literal)
            while i >= 0:
                steps -= 1
                if steps < 0:
                    return [h.start() for h in _API_KEY_HINT_RE.finditer(text)]
                starts.add(i)
                i = text.find(literal, i + 1)
    return sorted(starts)


def _find_api_key(text: str) -> Iterator[tuple[int, int]]:
    end = 0
    for start in _api_key_hints(text):
        if start < end:
            continue
        m = _API_KEY_RE.match(text, start)
        if m:
            end = m.end()
            prefix = next(g for g in m.groups() if g)
            if _looks_random(m.group()[len(prefix):].replace("-", "").replace("_", "")) or prefix == "AIza":
                yield m.span()
    lower = text.lower()
    if "key" not in lower and "token" not in lower and "secret" not in lower:
        return                                                   # every assigned name has one
    if len(lower) == len(text):                                  # offsets agree: match at each name
        matches = (_API_KEY_ASSIGN_RE.match(text, h.start()) for h in _API_ASSIGN_HINT_RE.finditer(lower))
    else:
        matches = _API_KEY_ASSIGN_RE.finditer(text)
    for m in matches:
        if m and _looks_random(m.group(1)):
            yield m.span(1)


def _find_jwt(text: str) -> Iterator[tuple[int, int]]:
    if "J" not in text or "eyJ" not in text:                    # memchr first: J is rare
        return
    for m in _JWT_RE.finditer(text):
        header = _b64url_json(m.group(1))
        if isinstance(header, dict) and ("alg" in header or "typ" in header):
            yield m.span()


def _find_private_key(text: str) -> Iterator[tuple[int, int]]:
    if "V" not in text or "PRIVATE KEY" not in text:
        return
    for m in _PEM_RE.finditer(text):
        yield m.span()


def _find_connection_string(text: str) -> Iterator[tuple[int, int]]:
    if ":" not in text or "://" not in text:
        return
    for m in _CONN_RE.finditer(text):
        password = m.group(2)
        if password[0] in "${<%" or set(password) <= set("*x.X"):
            continue                                             # ${DB_PASSWORD}, <password>, ****
        start, end = m.span()
        while end > start and text[end - 1] in _TRAILING_PUNCT:
            end -= 1
        yield start, end


def _find_github_token(text: str) -> Iterator[tuple[int, int]]:
    if "_" not in text or ("gh" not in text and "github_pat_" not in text):
        return
    for m in _GITHUB_RE.finditer(text):
        yield m.span()


def _find_iban(text: str) -> Iterator[tuple[int, int]]:
    for m in _IBAN_RE.finditer(text):
        cand = m.group()
        want = _IBAN_LENGTHS.get(cand[:2])
        if want is None:
            continue
        # The candidate may run into a following word ("... 00 EUR"): keep exactly the
        # country's length, ending at a group boundary.
        n, cut = 0, None
        for i, ch in enumerate(cand):
            if ch != " ":
                n += 1
                if n == want:
                    cut = i + 1
                    break
        if cut is None or (cut < len(cand) and cand[cut] != " "):
            continue
        if _iban_ok(cand[:cut].replace(" ", "")):
            yield m.start(), m.start() + cut


_PII_FINDERS: dict[str, Callable[[str], Iterator[tuple[int, int]]]] = {
    "ssn": _find_ssn, "credit_card": _find_credit_card, "email": _find_email, "phone": _find_phone,
    "ip_address": _find_ip_address, "aws_key": _find_aws_key, "api_key": _find_api_key,
    "jwt": _find_jwt, "private_key": _find_private_key, "connection_string": _find_connection_string,
    "github_token": _find_github_token, "iban": _find_iban}


# The ASCII digits every match of a type holds at least (the detectors see the NFKC form, where
# fullwidth digits are ASCII): a text with fewer skips the type. SSN 3-2-4 or 9 in a row; a card
# 13 to 19; a phone number an exchange and line (7), E.164 8 or more; an IBAN its check digits;
# an IPv6 address one digit (an IPv4 one four).
_MIN_DIGITS = {"ssn": 9, "credit_card": 13, "phone": 7, "ip_address": 1, "iban": 2}


def _digit_count(text: str) -> int:
    # `in` is a memchr, count() a slower loop: count only the digits that are there
    return sum(text.count(d) for d in "0123456789" if d in text)


def _has_digit(text: str) -> bool:
    """Whether `text` holds an ASCII digit: ten memchr scans, far cheaper than one regex pass."""
    return ("0" in text or "1" in text or "2" in text or "3" in text or "4" in text or "5" in text
            or "6" in text or "7" in text or "8" in text or "9" in text)


_NON_ASCII_RE = re.compile(r"[^\x00-\x7f]+")


def _pii_normalize(text: str) -> tuple[str, list | None]:
    """The text as the detectors see it: NFKC (fullwidth ＠ and digits become ASCII),
    zero-width, bidi and soft-hyphen characters removed, look-alike letters folded and
    combining marks dropped, as the jailbreak normaliser does. Returns (normalised, segments),
    segments None when nothing changed; else sorted (norm_start, orig_start, norm_len,
    orig_len) tuples covering the normalised text, for _pii_map_back. Per character, so the
    positions stay mappable; only the non-ASCII runs that change are walked in Python."""
    if text.isascii():
        return text, None
    from ..guard.jailbreak import _COMBINING_RE, _CONFUSABLES, _INVISIBLE  # not at start: see rules.py
    pieces: list[str] = []
    segs: list[tuple[int, int, int, int]] = []
    pos = npos = 0                                   # next original / normalised offset
    memo: dict[str, str] = {}                        # per call: distinct characters are few

    def keep(upto: int) -> None:                     # text[pos:upto] unchanged
        nonlocal pos, npos
        if upto > pos:
            pieces.append(text[pos:upto])
            segs.append((npos, pos, upto - pos, upto - pos))
            npos += upto - pos
            pos = upto

    for m in _NON_ASCII_RE.finditer(text):
        run = m.group()
        if (unicodedata.is_normalized("NFKC", run) and run.translate(_INVISIBLE) == run
                and run.translate(_CONFUSABLES) == run and not _COMBINING_RE.search(run)):
            continue
        keep(m.start())
        for ch in run:
            new = memo.get(ch)
            if new is None:
                new = memo[ch] = _COMBINING_RE.sub("", unicodedata.normalize("NFKC", ch).translate(_INVISIBLE)
                                                   .translate(_CONFUSABLES))
            if new == ch:
                keep(pos + 1)
                continue
            if new:
                pieces.append(new)
                segs.append((npos, pos, len(new), 1))
                npos += len(new)
            pos += 1
    if not segs:
        return text, None
    keep(len(text))
    return "".join(pieces), segs


def _pii_map_back(spans: Iterable[tuple[int, int, str]], segs: list) -> list[tuple[int, int, str]]:
    """Spans on the normalised text -> spans covering the original characters."""
    starts = [g[0] for g in segs]
    out = []
    for s, e, t in spans:
        ns, os_, nl, ol = segs[bisect.bisect_right(starts, s) - 1]
        start = os_ + (s - ns) if nl == ol else os_
        ns, os_, nl, ol = segs[bisect.bisect_right(starts, e - 1) - 1]
        end = os_ + (e - ns) if nl == ol else os_ + ol
        out.append((start, end, t))
    return out


def _pii_candidates(text: str, types: tuple[str, ...], cache: bool = True) -> tuple[tuple[int, int, str], ...]:
    """(start, end, type) of every validated candidate of the given types (may overlap), found
    on the normalised text and given in positions of the original one. `cache` false: the text
    is not worth remembering (a stream's window, never seen again)."""
    key = None
    if cache and len(text) >= _SCAN_CACHE_MIN:
        key = ("pii", types, _text_key(text))
        cached = _cache_get(key)
        if cached is not None:
            return cached
    norm, segs = _pii_normalize(text)
    out = []
    digits = None
    for t in types:
        need = _MIN_DIGITS.get(t)
        if need is not None:
            if digits is None:
                digits = _digit_count(norm)
            if digits < need:
                continue
        out.extend((s, e, t) for s, e in _PII_FINDERS[t](norm) if e > s)
    if segs is not None:
        out = _pii_map_back(out, segs)
    result = tuple(out)
    if key is not None:
        _cache_put(key, result)
    return result


def _resolve_overlaps(cands: Iterable[tuple[int, int, str]]) -> list[Span]:
    """Non-overlapping subset: longest first, then by type priority, then leftmost."""
    cands = list(cands)
    if len(cands) <= 1:
        return [Span(*c) for c in cands]
    chosen_starts: list[int] = []
    chosen: list[tuple[int, int, str]] = []
    for s, e, t in sorted(set(cands), key=lambda c: (c[0] - c[1], _PII_PRIORITY[c[2]], c[0])):
        i = bisect.bisect_right(chosen_starts, s)
        if i and chosen[i - 1][1] > s:
            continue
        if i < len(chosen) and chosen[i][0] < e:
            continue
        chosen_starts.insert(i, s)
        chosen.insert(i, (s, e, t))
    return [Span(*c) for c in chosen]


def find_pii(text: str, types: Iterable[str] | None = None) -> list[Span]:
    """PII spans in `text`, sorted and non-overlapping; `types` limits the detectors
    (default: all of PII_TYPES). Unknown types raise ValueError."""
    wanted = PII_TYPES if types is None else tuple(types)
    unknown = [t for t in wanted if t not in _PII_FINDERS]
    if unknown:
        raise ValueError(f"unknown PII type {unknown[0]!r}; known: {', '.join(PII_TYPES)}")
    if not text:
        return []
    return _resolve_overlaps(_pii_candidates(text, wanted))
