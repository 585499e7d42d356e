"""Scan limits shared by the detectors, and the cache of recent scan results."""

import collections
import hashlib
import threading
from typing import Any


# Everything here is text in, text or decisions out: no JSON bodies, no sockets. The dialect
# adapters hand every piece of text the model reads (input) or writes (output) to a `Guard`;
# streamed output goes through a `StreamGuard`, which keeps a small hold-back window so that a
# match split across chunks is handled exactly as in a non-streamed body.
#
# Semantics of a Guard: every rule whose scope covers the direction is evaluated on the text as
# it arrived (a later rule never sees an earlier rule's `[REDACTED:...]`), in policy order.
# The first rule with action `fail` that matches blocks; `warn`/`log` only record; `mask` and
# `anonymize` edits are applied together, an earlier rule winning where two edits overlap.
# What is recorded is a RuleMatch (rule, type, action, direction, count), never a matched value.

PII_TYPES = ("ssn", "credit_card", "email", "phone", "ip_address", "aws_key", "api_key", "jwt",
             "private_key", "connection_string", "github_token", "iban")


_PEM_MAX_BODY = 16384              # chars between BEGIN and END of a private key block


_SCAN_CACHE_MIN = 64               # chars; shorter texts are cheaper to scan than to look up (a


                                   # 64-char jailbreak scan costs ~20 us, a digest under 1 us)
_SCAN_CACHE_SIZE = 1024            # entries (keys are 16-byte digests, values small)


# Agents resend the whole conversation on every turn, so the same long texts are scanned again
# and again. Detector results for long texts are kept in one small LRU keyed by a digest of
# the text (bounded memory; results are deterministic, so a hit changes nothing but the cost).

_SCAN_CACHE: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()


# Big texts are scanned in worker threads (see _OFF_LOOP_CHARS): one lock keeps the LRU whole.
_SCAN_CACHE_LOCK = threading.Lock()


_KEY_MEMO_MAX = 65536             # chars: a longer text is not kept alive for the memo below
_LAST_KEY: tuple = (object(), b"")  # (text, its key): the detectors of one scan key the same text in turn


def _text_key(text: str) -> bytes:
    global _LAST_KEY
    last = _LAST_KEY                # one read: a worker thread may replace it meanwhile
    if last[0] is text:             # the very object (the tuple keeps it alive): the same text
        return last[1]
    key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    if len(text) <= _KEY_MEMO_MAX:
        _LAST_KEY = (text, key)
    return key


def _cache_get(key: tuple) -> Any:
    with _SCAN_CACHE_LOCK:
        value = _SCAN_CACHE.get(key)
        if value is not None:
            _SCAN_CACHE.move_to_end(key)
        return value


def _cache_put(key: tuple, value: Any) -> None:
    with _SCAN_CACHE_LOCK:
        _SCAN_CACHE[key] = value
        if len(_SCAN_CACHE) > _SCAN_CACHE_SIZE:
            _SCAN_CACHE.popitem(last=False)
