"""Shared small things: numbers with their units and reasons, the logger, durations and RFC 3339
timestamps, ids, durable files (``atomic_file``, ``write_private``, ``_write_all``, ``_fsync_dir``) and the
secret scrubber used by every record."""

import contextlib
import datetime as _dt
import importlib.util
import logging
import math
import os
import re
import secrets
import tempfile
from typing import Any, BinaryIO, Iterator

from .errors import UsageError


HAVE_TRUSTME = importlib.util.find_spec("trustme") is not None             # the local CA for HTTPS


MiB = 1024 * 1024


DEFAULT_MAX_BODY_BYTES = 10 * MiB       # agents send 75-115 KB; 10 MiB leaves room for images


DEFAULT_MAX_RESPONSE_BYTES = 64 * MiB   # an upstream answer, after decompression: the largest real


DEFAULT_WRITE_TIMEOUT = 60.0            # seconds a client may leave a response unread before it is cut


                                        # reset the connection before the client read the 503
MAX_HEADER_BYTES = 64 * 1024            # h11's 16 KiB default is too tight for long anthropic-beta lists


HEADER_TIMEOUT = 10.0                   # seconds from the first byte of a request to its last header


DEFAULT_UPSTREAM_TIMEOUT = 30.0         # seconds to the first byte, and between stream events


TOKEN_PREFIX = "tkn_"


HASH_PREFIX = 16                        # hex chars of a token hash in records, events and limit keys:


log = logging.getLogger("tokenomics")


_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)$")


def parse_duration(text: str) -> float:
    """`1s`, `1m`, `1h`, `24h`, `7d`, `1y` -> seconds. ValueError on anything else."""
    m = _DURATION_RE.match(str(text).strip())
    if not m:
        raise ValueError("not a duration: expected a number and a unit (ms, s, m, h, d, w, y), "
                         "e.g. 30s, 1h, 7d")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def _json_type(value: Any) -> str:
    """How a JSON value is named in error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def utc_iso(ts: float) -> str:
    """Unix seconds -> RFC 3339 UTC with a Z, second precision."""
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="seconds")[:-6] + "Z"


def rfc3339_ms(ts: float) -> str:
    """Unix seconds -> RFC 3339 UTC with milliseconds (request times need sub-second order)."""
    # isoformat truncates to milliseconds as `microsecond // 1000` did, at half strftime's cost;
    # [:-6] drops its "+00:00"
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"


def parse_rfc3339(text: str) -> float:
    """RFC 3339 / ISO 8601 timestamp -> Unix seconds (naive times are taken as UTC)."""
    value = _dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.timezone.utc)
    return value.timestamp()


def new_id(prefix: str = "") -> str:
    return prefix + secrets.token_hex(16)


# A percent-escape of '/', '\\' or an unreserved character (RFC 3986: ALPHA DIGIT - . _ ~), or a
# '%' that starts no escape: a server that decodes these sees another path than the router did.
_DISGUISED_ESCAPE = re.compile(r"%(?:2[d-fD-F]|3[0-9]|4[1-9a-fA-F]|5[0-9aAcCfF]|6[1-9a-fA-F]|7[0-9aAeE])"
                               r"|%(?![0-9a-fA-F]{2})")


def non_canonical(path: str, query: str = "") -> str:
    """Why a request target is not in canonical form, or "" when it is. Routing and the endpoint
    allowlist match the path as sent, so any spelling an upstream could read as another path
    (a fragment, an escaped '/' or letter, dot or empty segments, a backslash) is refused."""
    if "#" in path or "#" in query:
        return "has a fragment (#)"
    if "\\" in path or "\\" in query:
        return "has a backslash"
    if _DISGUISED_ESCAPE.search(path):
        return "has a percent-escape an upstream could decode into another path (%2F, %5C, an escaped " \
               "letter, digit or -._~, or a stray %)"
    segments = path.split("/")[1:]
    if any(seg in (".", "..") for seg in segments):
        return "has a '.' or '..' segment"
    if "" in segments[:-1]:
        return "has an empty segment (//)"
    return ""


def _type_name(tp) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            dict: "a mapping", list: "a list"}.get(tp, getattr(tp, "__name__", str(tp)))


@contextlib.contextmanager
def atomic_file(path: str, durable: bool = True) -> Iterator[BinaryIO]:
    """A binary file, mode 0600, that replaces `path` when the block ends without an error: a
    temp file in the same directory, fsync'ed, renamed over `path`, then the directory fsync'ed
    so that the rename survives a crash too. On an error the temp file goes and `path` is left
    as it was. The one atomic write of the package: everything durable goes through it.
    `durable` false: no fsyncs, for a file that means nothing after the machine went down (a
    running proxy's pid file): readers still see the old file or the new one, never half."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(directory)


def write_private(path: str, data: bytes, durable: bool = True) -> None:
    """Atomically replace `path` with `data`, mode 0600 (see atomic_file)."""
    with atomic_file(path, durable) as fh:
        fh.write(data)


_MEMORY_DEFAULT_DIR = "memory"  # under the data dir, when a memory spec names no file_path


_MEMORY_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")


_MEMORY_PLACEHOLDERS = ("token_hash", "date")


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def memory_file_path(spec: dict, data_dir: str | None, where: str = "memory") -> str:
    """The absolute `file_path` of a memory spec, confined to the data dir (SPEC §9): relative
    means relative to the data dir; `~`, any `..` and (given `data_dir`) an absolute path
    elsewhere or one that a symlink takes elsewhere are refused, naming `{where}.file_path`.
    Without `data_dir` only what can be told from the text is checked. The writer checks the
    resolved path again before each write: a symlink made later must not let writes out."""
    raw = str(spec.get("file_path") or _MEMORY_DEFAULT_DIR)
    field_ = f"{where}.file_path"
    if raw.startswith("~"):
        raise UsageError(f"{field_}: '~' is not allowed; give a path relative to the data dir")
    if ".." in re.split(r"[\\/]", raw):
        raise UsageError(f"{field_}: '..' is not allowed; the memory log stays inside the data dir")
    if "\0" in raw:
        raise UsageError(f"{field_}: contains a NUL character")
    if data_dir is None:
        return raw
    root = os.path.realpath(data_dir)
    path = os.path.normpath(raw if os.path.isabs(raw) else os.path.join(data_dir, raw))
    # Compare both the path as written and as resolved: an absolute path into the data dir is
    # fine, one elsewhere is not, and neither is a symlink inside the data dir pointing out.
    if not (_inside(os.path.normpath(os.path.abspath(data_dir)), path) or _inside(root, path)) \
            or not _inside(root, os.path.realpath(path)):
        raise UsageError(f"{field_}: {raw!r} resolves outside the data dir {data_dir}; the memory log "
                         "must stay inside it (use a relative path)")
    return path


def check_memory_file_name(pattern: str, where: str = "memory") -> None:
    """`file_name`: a relative name under file_path with only the known placeholders."""
    for name in _MEMORY_PLACEHOLDER_RE.findall(pattern):
        if name not in _MEMORY_PLACEHOLDERS:
            raise UsageError(f"{where}.file_name: unknown placeholder {{{name}}}; use {{token_hash}} "
                             "and {date}")
    parts = re.split(r"[\\/]", pattern)
    if os.path.isabs(pattern) or pattern.startswith("~") or ".." in parts or parts[-1] in ("", ".") \
            or "\0" in pattern:
        raise UsageError(f"{where}.file_name: must be a relative file name under {where}.file_path "
                         "(subdirectories are fine; no absolute path, no `..`)")


class PartialWrite(OSError):
    """A write that failed part-way: `written` bytes made it to the file (an append-only log
    keeps the rest queued rather than writing them twice)."""

    def __init__(self, errno_: int | None, strerror: str | None, written: int):
        super().__init__(errno_, strerror)
        self.written = written


def _write_all(fd: int, data: bytes) -> None:
    """Write all of `data`, however many os.write calls it takes; a failure is a PartialWrite."""
    view, done = memoryview(data), 0
    while done < len(view):
        try:
            done += os.write(fd, view[done:])
        except OSError as exc:
            raise PartialWrite(exc.errno, exc.strerror, done) from exc


def _read_optional(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


_MEMORY_DEFAULT_FILE = "memory.md"


# --- tables for people ------------------------------------------------------------------------------

# What a terminal would act on rather than show: C0 controls (newline forges a row, ESC starts an
# ANSI sequence), DEL, C1 controls (0x9b is a one-byte CSI), bidi embeddings, overrides, isolates
# and marks (reorder what follows), the Unicode line and paragraph separators, and lone
# surrogates (from JSON `\ud800` or undecodable argv bytes; stdout could not even encode them).
_UNPRINTABLE_RE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                             "\u2066-\u2069\ud800-\udfff]")


_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(m: "re.Match") -> str:
    ch = m.group(0)
    code = ord(ch)
    return _NAMED_ESCAPES.get(ch) or (f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}")


def printable(value: Any) -> str:
    """`value` as text a terminal shows but never acts on: control characters, bidi controls
    and line separators are written as escapes (`\\n`, `\\x1b`, `\\u202e`). Every table and
    every client-chosen string the CLI prints (labels, model names, branches) goes through it."""
    text = value if isinstance(value, str) else str(value)
    return _UNPRINTABLE_RE.sub(_escape_char, text) if _UNPRINTABLE_RE.search(text) else text


# Belt and braces: records are built from hashes, names and counts and never receive a key or a
# raw token, but a log line can also carry free text (metadata, bodies, exception messages). So
# every line is scrubbed of the shapes of wrapper tokens and common provider keys before it is
# written. Request ids (`req_` + 32 hex) do not have the token shape; `keep` spares a line's own id.
_SECRET_RE = re.compile(
    r"tkn_[0-9a-fA-F]{32}"            # wrapper tokens
    r"|sk-[A-Za-z0-9_-]{16,}"         # OpenAI, Anthropic (sk-ant-...), DeepSeek, OpenRouter, ...
    r"|AKIA[0-9A-Z]{16}"              # AWS access key ids (Bedrock)
    r"|AIza[0-9A-Za-z_-]{35}"         # Google API keys (Gemini)
)


REDACTED = "[REDACTED]"


def scrub(text: str, keep: frozenset | tuple = ()) -> str:
    """`text` with every token- or key-shaped substring replaced by [REDACTED], except the exact
    strings in `keep` (the line's own request id)."""
    if not keep:
        return _SECRET_RE.sub(REDACTED, text)
    return _SECRET_RE.sub(lambda m: m.group(0) if m.group(0) in keep else REDACTED, text)


def usd_text(amount: float, places: int = 4) -> str:
    """A dollar amount for people: `places` decimals from a cent up, and below a cent two
    significant digits (0.00012, 0.0000031), so a real cost never reads $0.0000."""
    if amount == 0 or abs(amount) >= 0.01:
        return f"{amount:.{places}f}"
    return f"{amount:.{1 - math.floor(math.log10(abs(amount)))}f}"
