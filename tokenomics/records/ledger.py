"""The session ledger: the per-process journal and summary, carried lines restored after a crash,
the sessions read back (`load_sessions`; ledger_report filters and renders them), git context."""

import asyncio
import calendar
import contextlib
import json
import math
import os
import re
import secrets
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..errors import RuntimeFailure, UsageError
from ..records.rollup import NONE_KEY, Figures, Rollup, figures
from ..util import HASH_PREFIX, PartialWrite, _fsync_dir, _write_all, atomic_file, log, parse_rfc3339, rfc3339_ms


# The journal is the source of truth: one JSON line per governed request, appended in batches.
# With a usage journal, a batch is handed over to it (Ledger.handing_over): carried in the usage
# journal's line, whose fsync is the batch's durability, then written here without an fsync of
# its own; restore_carried() puts back at start what a crash kept from this file. Without one
# (Redis), a batch gets one write + fsync here. Both happen in the group commit, before the
# request's response completes, and off the event loop when other requests are in flight. The
# summary JSON is a convenience written on graceful shutdown; every reader also works from
# journals alone.

GIT_TIMEOUT = 1.0               # seconds for all git calls of one git_context(): a hung NFS mount or
                                # a huge repo must not hold up the proxy's start or its shutdown
LEDGER_FLUSH_INTERVAL = 0.2     # seconds between background flushes of lines no response waits for
                                # (answered requests are flushed before their response completes)
_LEDGER_MAX_PENDING = 100_000   # journal lines held while the disk refuses writes (~50 MB); beyond
                                # this the oldest are dropped and counted, so memory stays bounded
_SESSION_ID_RE = re.compile(r"[0-9a-f]{8}")
_SESSION_FILE_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})_([0-9a-f]{8})\.(jsonl|json)$")
_SESSION_PREFIX_MIN = 4         # chars of a session id `ledger show` needs: 65,536 ids per prefix
_REQUEST_LINE_HEAD = b'{"type":"request",'
_RULE_MATCH_KEYS = ("rule", "type", "action", "scope", "count", "score")   # never the matched text


@dataclass(slots=True)
class RequestRecord:
    """One governed request as the ledger records it; the pipeline builds it from an Exchange.
    `token_hash` is the full hash (only a 16-char prefix is written); `rule_matches` holds
    {"rule", "type", "action", "scope", "count"} dicts, never matched values; `error` is the
    stable error code of a refused or failed request, or ""."""
    timestamp: float
    request_id: str
    token_hash: str
    model: str
    provider: str
    endpoint: str
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    duration_ms: float = 0.0
    status_code: int = 0
    stream: bool = False
    error: str = ""
    upstream_id: str = ""
    upstream_request_id: str = ""
    retry_count: int = 0
    fallback_model: str = ""
    rule_matches: list = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    provider_meta: dict = field(default_factory=dict)


def _when(value: Any) -> float | None:
    """A record's time (RFC 3339 string or Unix seconds) -> Unix seconds, None if unreadable."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value:
        with contextlib.suppress(ValueError):
            return parse_rfc3339(value)
    return None


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _num(value: Any) -> float:
    try:
        value = float(value or 0)
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) else 0.0


# --- git context ---------------------------------------------------------------------------------

def _git(args: list[str], cwd: str, deadline: float) -> str:
    """stdout of one git command, "" on any failure: no git, not a repo, timeout, bad cwd."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return ""
    # No optional locks: a status-like call must never contend with the user's own git commands.
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0", GIT_TERMINAL_PROMPT="0", LC_ALL="C")
    try:
        done = subprocess.run(["git", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=remaining)
    except (OSError, ValueError, subprocess.SubprocessError):
        return ""
    if done.returncode != 0:
        return ""
    return done.stdout.decode("utf-8", "replace").strip()


def git_context(cwd: str) -> dict:
    """{"branch", "commit", "repo_root"} of the repository containing `cwd`: short commit hash,
    "HEAD" as the branch of a detached checkout, "" for a repo without commits' commit, and
    empty strings outside a repo or without git. Bounded by GIT_TIMEOUT; never raises."""
    empty = {"branch": "", "commit": "", "repo_root": ""}
    try:
        deadline = time.monotonic() + GIT_TIMEOUT
        root = _git(["rev-parse", "--show-toplevel"], cwd, deadline)
        if not root:
            return empty
        branch = _git(["symbolic-ref", "--short", "-q", "HEAD"], cwd, deadline)
        commit = _git(["rev-parse", "-q", "--verify", "--short", "HEAD"], cwd, deadline)
        return {"branch": branch or ("HEAD" if commit else ""), "commit": commit, "repo_root": root}
    except Exception:  # git context is decoration: it must never stop the proxy
        log.debug("git context unavailable", exc_info=True)
        return empty


# --- rollups -------------------------------------------------------------------------------------

def row_figures(row: dict) -> Figures:
    """What one request row (as written to the journal) adds to a rollup; computed once per row
    and added to every rollup the row belongs to. Read leniently: rows come from disk."""
    return figures(_int(row.get("status_code")), row.get("error") or "", _int(row.get("input_tokens")),
                   _int(row.get("output_tokens")), _num(row.get("cost_usd")), _int(row.get("cached_input_tokens")),
                   _int(row.get("cache_creation_tokens")), _int(row.get("reasoning_tokens")),
                   _int(row.get("retry_count")))


class _Rollups:
    """Totals plus per-model, per-provider, per-token (and optionally per-branch) rollups:
    the one place that turns request rows into the §9 numbers, live and when rebuilding."""
    __slots__ = ("totals", "by_model", "by_provider", "by_token", "by_branch")

    def __init__(self):
        self.totals = Rollup()
        self.by_model: dict[str, Rollup] = {}
        self.by_provider: dict[str, Rollup] = {}
        self.by_token: dict[str, Rollup] = {}
        self.by_branch: dict[str, Rollup] = {}

    def add(self, row: dict, ts: float | None, branch: str | None = None) -> None:
        deltas, model = row_figures(row), row.get("model") or ""
        self.totals.add(deltas, model, ts)
        keyed = [(self.by_model, model, False), (self.by_provider, row.get("provider"), False),
                 (self.by_token, row.get("token_hash"), True)]
        if branch is not None:
            keyed.append((self.by_branch, branch, False))
        for table, key, per_token in keyed:
            key = key or NONE_KEY
            tally = table.get(key)
            if tally is None:
                tally = table[key] = Rollup(per_token)
            tally.add(deltas, model, ts)

    def as_dict(self, with_branch: bool = False) -> dict:
        out = {"totals": self.totals.as_dict()}
        names = ("by_model", "by_provider", "by_token") + (("by_branch",) if with_branch else ())
        for name in names:
            table = getattr(self, name)
            out[name] = {key: table[key].as_dict() for key in sorted(table)}
        return out


def _request_row(rec: RequestRecord) -> dict:
    """The §9 fields of one request as written to the journal and the summary's requests[]."""
    return {
        "timestamp": rfc3339_ms(rec.timestamp),
        "request_id": rec.request_id,
        "token_hash": (rec.token_hash or "")[:HASH_PREFIX],
        "model": rec.model, "provider": rec.provider, "endpoint": rec.endpoint,
        "input_tokens": _int(rec.input_tokens), "output_tokens": _int(rec.output_tokens),
        "cached_input_tokens": _int(rec.cached_input_tokens),
        "cache_creation_tokens": _int(rec.cache_creation_tokens),
        "reasoning_tokens": _int(rec.reasoning_tokens),
        "cost_usd": round(_num(rec.cost_usd), 9),
        "duration_ms": round(_num(rec.duration_ms), 3),
        "status_code": _int(rec.status_code), "stream": bool(rec.stream), "error": rec.error or "",
        "upstream_id": rec.upstream_id or "", "upstream_request_id": rec.upstream_request_id or "",
        "retry_count": _int(rec.retry_count), "fallback_model": rec.fallback_model or "",
        # Only the named keys survive: a matched value put here by mistake never reaches disk.
        "rule_matches": [{k: m[k] for k in _RULE_MATCH_KEYS if k in m}
                         for m in rec.rule_matches or () if isinstance(m, dict)],
        "metadata": dict(rec.metadata or {}),
        "provider_meta": dict(rec.provider_meta or {}),
    }


# --- the session ledger --------------------------------------------------------------------------

class Ledger:
    """One proxy process's session: the crash-safe journal `{dir}/sessions/<date>_<id>.jsonl`
    (a `session` line with the git context, then one `request` line per governed request) and,
    on close(), the summary `<date>_<id>.json`. <date> is the UTC date the session started.

    record() only serialises and appends to an in-memory batch (no disk I/O); flush() writes the
    batch with one write and one fsync; handing_over() gives the batch to the usage journal's
    commit and then writes it without an fsync (the journal's covers it). The group commit does
    one of them before a request's response completes, so a kill -9 loses no answered request;
    sync() fsyncs what was handed over, before the usage journal may forget it (compaction).
    run_flusher() flushes whatever else is pending every
    `flush_interval` seconds; a graceful stop (cancel the flusher, then close()) loses nothing. A journal write that fails keeps the batch and
    retries it on the next flush (logging once), holding at most _LEDGER_MAX_PENDING lines."""

    def __init__(self, data_dir: str, session_id: str | None = None, cwd: str | None = None,
                 clock: Callable[[], float] = time.time, flush_interval: float = LEDGER_FLUSH_INTERVAL):
        if session_id is None:
            session_id = secrets.token_hex(4)
        if not _SESSION_ID_RE.fullmatch(session_id):
            raise UsageError(f"session id {session_id!r}: expected 8 lowercase hex characters")
        if not flush_interval > 0:
            raise UsageError("ledger flush interval: expected a positive number of seconds")
        self.session_id = session_id
        self.clock, self.flush_interval = clock, float(flush_interval)
        self.cwd = cwd if cwd is not None else os.getcwd()
        self.started_at = clock()
        self.git_start = git_context(self.cwd)
        self.dir = os.path.join(data_dir, "sessions")
        stem = f"{time.strftime('%Y-%m-%d', time.gmtime(self.started_at))}_{session_id}"
        self.journal_path = os.path.join(self.dir, stem + ".jsonl")
        self.summary_path = os.path.join(self.dir, stem + ".json")
        self.dropped = 0                        # journal lines lost to a disk that kept failing
        self._rollups = _Rollups()
        self._pending: list[bytes] = []
        self._carried: list[bytes] = []         # carried by the usage journal, their write here failed
        self._carried_dropped = False           # some of those left memory: the usage journal keeps them
        self._lock = threading.Lock()           # guards _pending (record on the loop, flush in a thread)
        self._write_lock = threading.Lock()     # one flush at a time, so batches land in order
        self._failing = False
        self._flushing = False                  # flush() took a batch and has not written it yet
        self._written = 0                       # bytes in the journal file
        self._unsynced = False                  # handed-over lines written and not fsync'ed yet
        self._torn = False                      # _pending[0] is the unwritten tail of a line
        self._summary: dict | None = None
        header = {"type": "session", "session_id": session_id, "started_at": rfc3339_ms(self.started_at),
                  "git": {"branch": self.git_start["branch"], "commit_start": self.git_start["commit"],
                          "repo_root": self.git_start["repo_root"]},
                  "pid": os.getpid()}
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            self._fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                               0o600)
        except OSError as exc:
            raise RuntimeFailure(f"cannot open the session journal {self.journal_path}: {exc.strerror}; "
                                 "check that the data dir is writable (or pass --dir)") from None
        try:
            os.fchmod(self._fd, 0o600)
            line = _json_bytes(header) + b"\n"
            _write_all(self._fd, line)
            os.fsync(self._fd)
            self._written = len(line)
        except OSError as exc:
            os.close(self._fd)
            raise RuntimeFailure(f"cannot write the session journal {self.journal_path}: {exc.strerror}") \
                from None

    def record(self, rec: RequestRecord) -> None:
        """Queue one finished request for the journal and count it in the rollups. Cheap: no
        disk I/O, safe to call on the event loop."""
        if self._summary is not None:
            log.warning("ledger: request %s finished after the session closed; not recorded",
                        rec.request_id)
            return
        row = _request_row(rec)
        line = _REQUEST_LINE_HEAD + _json_bytes(row)[1:] + b"\n"
        with self._lock:
            self._pending.append(line)
            if len(self._pending) > _LEDGER_MAX_PENDING:
                self._drop_oldest()
        self._rollups.add(row, _num(rec.timestamp))

    def has_pending(self) -> bool:
        """Whether recorded lines wait for flush(), or a flush running in another thread (the
        background flusher) holds lines it has not made durable yet: a commit must wait for it."""
        return bool(self._pending) or self._flushing

    def _drop_oldest(self) -> None:
        # Index 0 may be the unwritten tail of a half-written line: keep it, or the line tears.
        excess = len(self._pending) - _LEDGER_MAX_PENDING
        del self._pending[1:1 + excess]
        self.dropped += excess
        if self.dropped == excess:
            log.error("ledger: the journal has not been writable for a while; dropping the oldest "
                      "unwritten records (%d so far)", self.dropped)

    def flush(self) -> None:
        """Write the pending batch to the journal with one write and one fsync. Blocking: run it
        in a thread from async code (run_flusher does). Never raises: a failed write is logged
        once and its unwritten bytes stay queued for the next flush. Lines handed over and not
        fsync'ed yet are fsync'ed too."""
        with self._write_lock:
            self._flush()

    def _flush(self) -> None:
        """flush(), holding _write_lock."""
        if self._carried and self._fd >= 0 and not self._write_carried():
            return   # earlier lines first; the disk still refuses them
        with self._lock:
            if self._fd < 0:
                return
            batch, self._pending = self._pending, []
            self._flushing = bool(batch)
        if not batch and not self._unsynced:
            return
        data = b"".join(batch)
        try:
            self._write(data)
            self._unsynced = True
            os.fsync(self._fd)
            self._unsynced = False
        except OSError as exc:
            written = exc.written if isinstance(exc, PartialWrite) else len(data)  # else fsync failed
            if written < len(data):
                with self._lock:
                    self._pending.insert(0, data[written:])
                self._torn = self._torn or 0 < written
            self._failed(exc)
            return
        finally:
            self._flushing = False   # after a failure, once the unwritten rest is queued again
        self._torn = False
        self._recovered()

    @contextlib.contextmanager
    def handing_over(self) -> Iterator[list | None]:
        """Hand the pending batch to the usage journal: the block gets [file name, offset, lines]
        to carry in its commit (None when nothing is pending), and when it ends without an error
        the lines are written here with no fsync: the journal's fsync made them durable, and
        restore_carried() puts them back after a crash (a write that fails keeps them for the next
        commit or flush to write, not to carry again). When the block fails the batch stays
        queued for the next commit or flush. After a write that failed part-way (the batch then
        starts inside a line) the batch is flushed here instead. Blocking: holds the file
        through the block, so the lines land at the offset named."""
        with self._write_lock:
            if self._torn:
                self._flush()
            with self._lock:
                if not self._pending or self._fd < 0 or self._torn:
                    batch = []
                else:
                    batch, self._pending = self._pending, []
            if not batch:
                yield None
                return
            data = b"".join(batch)
            try:
                yield [os.path.basename(self.journal_path), self._written, data.decode("utf-8")]
            except BaseException:
                self._requeue(batch)
                raise
            # Carried now: never carried again, only written here (after what was carried before).
            self._carried += batch
            self._write_carried()

    def _write_carried(self) -> bool:
        """Write the lines the usage journal carries and this file lacks, without an fsync (call
        holding _write_lock). False when the disk refused them: they stay queued here, once, and
        sync() keeps the usage journal from forgetting them. At most _LEDGER_MAX_PENDING are
        kept; the usage journal still holds any beyond, and the next start restores them."""
        excess = len(self._carried) - _LEDGER_MAX_PENDING
        if excess > 0:
            del self._carried[:excess]
            if not self._carried_dropped:
                self._carried_dropped = True
                log.error("ledger: the session journal %s has not been writable for a while; the usage journal "
                          "keeps the oldest answered requests until the next start restores them",
                          self.journal_path)
        data = b"".join(self._carried)
        at = self._written
        try:
            self._write(data)
        except OSError as exc:
            self._failed(exc)
            written = self._written - at
            if written:
                try:
                    os.ftruncate(self._fd, at)  # whole lines only, so they can be written again
                except OSError:
                    self._carried = []
                    self._requeue([data[written:]])
                    self._torn = True
                    return False
                self._written = at
            return False
        self._carried = []
        self._unsynced = True
        self._recovered()
        return True

    def sync(self) -> bool:
        """fsync the lines handed over and written since the last fsync. True when every line
        ever handed over is on disk here (the usage journal need not keep them any longer)."""
        with self._write_lock:
            if self._unsynced and self._fd >= 0:
                try:
                    os.fsync(self._fd)
                except OSError as exc:
                    self._failed(exc)
                    return False
                self._unsynced = False
            return not (self._failing or self._unsynced or self._carried or self._carried_dropped)

    def _write(self, data: bytes) -> None:
        try:
            _write_all(self._fd, data)
        except PartialWrite as exc:
            self._written += exc.written
            raise
        self._written += len(data)

    def _requeue(self, batch: list) -> None:
        with self._lock:
            self._pending[:0] = batch

    def _failed(self, exc: OSError) -> None:
        if not self._failing:
            self._failing = True
            log.error("ledger: cannot write the session journal %s: %s; retrying every %.1f s",
                      self.journal_path, exc.strerror or exc, self.flush_interval)

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.warning("ledger: session journal writes recovered")

    async def run_flusher(self) -> None:
        """Background task: flush every flush_interval seconds (off the event loop). Cancel it to
        stop; it flushes once more before the cancellation propagates."""
        try:
            while True:
                await asyncio.sleep(self.flush_interval)
                if self._pending:
                    await asyncio.to_thread(self.flush)
        finally:
            self.flush()  # waits for a flush still running in the thread, then writes the rest

    def rollups(self) -> dict:
        """Live totals and by_model/by_provider/by_token of this session (e.g. for `run`'s
        one-line summary)."""
        return self._rollups.as_dict()

    def close(self) -> dict:
        """Final flush, end-of-session git commit, the summary file (atomic, 0600). Returns the
        summary without requests[] (those stay on disk, so memory does not grow with the
        session); idempotent. Call it after in-flight requests finished and the flusher stopped."""
        if self._summary is not None:
            return self._summary
        self.flush()
        ended_at = self.clock()
        git_end = git_context(self.cwd)
        head = {
            "session_id": self.session_id,
            "started_at": rfc3339_ms(self.started_at),
            "ended_at": rfc3339_ms(ended_at),
            "duration_ms": round((ended_at - self.started_at) * 1000, 3),
            "git": {"branch": self.git_start["branch"], "commit_start": self.git_start["commit"],
                    "commit_end": git_end["commit"], "repo_root": self.git_start["repo_root"]},
            "closed": True,
            **self._rollups.as_dict(),
        }
        try:
            os.close(self._fd)
        except OSError:
            pass
        self._fd = -1
        try:
            _write_summary(self.summary_path, head, self.journal_path)
        except OSError as exc:
            log.error("ledger: cannot write the session summary %s: %s; the journal %s still holds "
                      "every request", self.summary_path, exc.strerror or exc, self.journal_path)
        self._summary = head
        return head


def restore_carried(data_dir: str, carried: list) -> int:
    """Put back into their session journals the request lines the usage journal carried
    (Ledger.handing_over) where a crash kept them from the file, each exactly once: a line whose
    request id the file already holds is not written again. Call it at start, before the usage
    journal forgets them (its compaction). Returns how many lines were written; raises
    RuntimeFailure naming a file it could not restore into, after restoring the others."""
    restored, failed = 0, None
    for name, (at, lines) in _carried_by_file(carried).items():
        try:
            restored += _restore_lines(os.path.join(data_dir, "sessions", name), at, lines)
        except OSError as exc:
            failed = failed or RuntimeFailure(f"cannot restore answered requests into the session journal "
                                              f"{name}: {exc.strerror or exc}; check that {data_dir} is writable")
    if failed is not None:
        raise failed
    return restored


def _carried_by_file(carried: list) -> dict[str, list]:
    """{session journal's file name: [lowest offset named, lines in order]} from what the usage
    journal carried; items of another shape, or naming another file, are skipped."""
    files: dict[str, list] = {}
    for item in carried:
        if not (isinstance(item, list) and len(item) == 3):
            continue
        name, at, text = item
        if not (isinstance(name, str) and _SESSION_FILE_RE.match(name) and name.endswith(".jsonl")
                and isinstance(at, int) and at >= 0 and isinstance(text, str)):
            continue
        entry = files.setdefault(name, [at, []])
        entry[0] = min(entry[0], at)
        entry[1] += [line for line in text.encode("utf-8").split(b"\n") if line]
    return files


def _line_request_id(line: bytes) -> str | None:
    if not line.startswith(_REQUEST_LINE_HEAD):
        return None
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row.get("request_id") if isinstance(row, dict) else None


def _restore_lines(path: str, at: int, lines: list[bytes]) -> int:
    """Append to `path` those of `lines` whose request id it does not hold from offset `at` on
    (every line carried for it was written there or later; before it the file was fsync'ed),
    and fsync the file."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    created = not os.path.exists(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        size = os.fstat(fd).st_size
        start = min(at, size)
        if start and os.pread(fd, 1, start - 1) != b"\n":
            start = 0   # not a line boundary: read it all
        chunks, offset = [], start
        while offset < size:
            chunk = os.pread(fd, min(size - offset, 1 << 20), offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        data = b"".join(chunks)
        end = data.rfind(b"\n") + 1    # after it: a line torn by the crash
        seen = {_line_request_id(line) for line in data[:end].split(b"\n")}
        missing = []
        for line in lines:
            rid = _line_request_id(line)
            if rid is not None and rid not in seen:
                seen.add(rid)
                missing.append(line + b"\n")
        if missing and not start + end:   # the file is gone (or empty): begin it as a journal
            head = {"type": "session", "session_id": _SESSION_FILE_RE.match(os.path.basename(path)).group(2)}
            with contextlib.suppress(ValueError, KeyError, TypeError):
                head["started_at"] = json.loads(missing[0])["timestamp"]   # as near as is known
            missing.insert(0, _json_bytes(head) + b"\n")
        if missing:
            os.ftruncate(fd, start + end)   # the restored lines must not glue onto a torn one
            os.lseek(fd, 0, os.SEEK_END)
            _write_all(fd, b"".join(missing))
        # Even with nothing missing: the crashed proxy wrote its handed-over lines without an
        # fsync, so they may be in the page cache only, and the usage journal may forget its
        # copies (compaction) as soon as this returns.
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        _fsync_dir(os.path.dirname(path))
    if missing and os.path.exists(path[:-1]):
        _recount_summary(path[:-1], path)
    return sum(line.startswith(_REQUEST_LINE_HEAD) for line in missing)


def _recount_summary(summary_path: str, journal_path: str) -> None:
    """A graceful stop wrote this summary from a journal that lacked lines restored since: keep
    its head, take its totals, rollups and requests[] from the journal now. A summary that cannot
    be rewritten is removed, so that the readers rebuild the session from the journal."""
    try:
        with open(summary_path, "rb") as fh:
            head = json.load(fh)
        if not (isinstance(head, dict) and "session_id" in head):
            raise ValueError("not a summary")
        m = _SESSION_FILE_RE.match(os.path.basename(journal_path))
        rebuilt = _rebuild_session(journal_path, m.group(1), m.group(2))
        head = {k: v for k, v in head.items() if k != "requests"}
        head.update({k: rebuilt[k] for k in ("totals", "by_model", "by_provider", "by_token")})
        _write_summary(summary_path, head, journal_path)
    except (OSError, ValueError):
        log.warning("ledger: the session summary %s misses requests restored into its journal; removing it, "
                    "the journal %s holds them all", summary_path, journal_path)
        with contextlib.suppress(OSError):
            os.unlink(summary_path)


def _write_summary(path: str, head: dict, journal_path: str) -> None:
    """Write the summary JSON atomically (0600), streaming requests[] from the journal so a long
    session's shutdown does not hold every request in memory. Journal request lines are spliced
    in as they are (minus their "type"); anything else is parsed and skipped."""
    with atomic_file(path) as out:
        out.write(_json_bytes(head)[:-1] + b',"requests":[')
        first = True
        with open(journal_path, "rb") as journal:
            for line in journal:
                line = line.rstrip(b"\n")
                if not (line.startswith(_REQUEST_LINE_HEAD) and line.endswith(b"}")):
                    continue
                out.write((b"{" if first else b",{") + line[len(_REQUEST_LINE_HEAD):])
                first = False
        out.write(b"]}\n")


# --- reading the ledger ---------------------------------------------------------------------------

def _journal_rows(path: str) -> Iterator[tuple[str, dict]]:
    """("session" | "request", row) for each readable journal line; a torn last line (the
    process died mid-write) and any other unreadable line are skipped."""
    try:
        fh = open(path, "rb")
    except OSError:
        return
    with fh:
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                kind = row.pop("type", "request")
                if kind in ("session", "request"):
                    yield kind, row


def _rebuild_session(path: str, date: str, session_id: str) -> dict:
    """A summary from a journal alone (a crash, or a session still running): ended_at is the
    last request's time, commit_end is unknown (""), closed is False."""
    header: dict = {}
    requests: list[dict] = []
    rollups = _Rollups()
    last: float | None = None
    for kind, row in _journal_rows(path):
        if kind == "session":
            header = header or row
            continue
        ts = _when(row.get("timestamp"))
        rollups.add(row, ts)
        requests.append(row)
        if ts is not None:
            last = ts if last is None else max(last, ts)
    started = _when(header.get("started_at"))
    if started is None:
        started = calendar.timegm(time.strptime(date, "%Y-%m-%d"))
    ended = last if last is not None and last > started else started
    git = header.get("git") or {}
    return {
        "session_id": header.get("session_id") or session_id,
        "started_at": rfc3339_ms(started), "ended_at": rfc3339_ms(ended),
        "duration_ms": round((ended - started) * 1000, 3),
        "git": {"branch": git.get("branch", ""), "commit_start": git.get("commit_start", ""),
                "commit_end": "", "repo_root": git.get("repo_root", "")},
        "closed": False,
        **rollups.as_dict(),
        "requests": requests,
    }


def _with_carried(session: dict, lines: list[bytes]) -> dict:
    """`session` with the request rows of `lines` (carried by the usage journal) it lacks,
    matched by request id, and its totals and rollups recomputed when any was added."""
    requests = list(session.get("requests") or ())
    seen = {row.get("request_id") for row in requests}
    for line in lines:
        rid = _line_request_id(line)
        if rid is None or rid in seen:
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        row.pop("type", None)
        seen.add(rid)
        requests.append(row)
    if len(requests) == len(session.get("requests") or ()):
        return session
    rollups = _Rollups()
    for row in requests:
        rollups.add(row, _when(row.get("timestamp")))
    return {**session, **rollups.as_dict(), "requests": requests}


def load_sessions(data_dir: str, carried: list = ()) -> list[dict]:
    """Every session under {data_dir}/sessions, oldest first: the summary JSON where a graceful
    shutdown wrote one, else rebuilt from the journal (see _rebuild_session). `carried`: what
    the usage journal carries (limits.journal.read_carried); after a crash its request lines
    may be missing from their session journals until a proxy restores them, so they are read
    in too (never written: a live proxy may own the files)."""
    directory = os.path.join(data_dir, "sessions")
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise RuntimeFailure(f"cannot read the ledger in {directory}: {exc.strerror}") from None
    found: dict[tuple[str, str], set] = {}
    for name in names:
        m = _SESSION_FILE_RE.match(name)
        if m:
            found.setdefault((m.group(1), m.group(2)), set()).add(m.group(3))
    extra = {}
    for name, (_, lines) in _carried_by_file(list(carried)).items():
        m = _SESSION_FILE_RE.match(name)
        extra[(m.group(1), m.group(2))] = lines
        found.setdefault((m.group(1), m.group(2)), set()).add("jsonl")   # even if its file is gone
    sessions = []
    for (date, sid), kinds in found.items():
        stem = os.path.join(directory, f"{date}_{sid}")
        session = None
        if "json" in kinds:
            try:
                with open(stem + ".json", "rb") as fh:
                    session = json.load(fh)
            except (OSError, ValueError):
                session = None  # unreadable summary: the journal is the source of truth anyway
            if not isinstance(session, dict) or "session_id" not in session:
                session = None
        if session is None and "jsonl" in kinds:
            session = _rebuild_session(stem + ".jsonl", date, sid)
        if session is not None:
            if (date, sid) in extra:
                session = _with_carried(session, extra[(date, sid)])
            session.setdefault("closed", True)
            sessions.append(session)
    sessions.sort(key=lambda s: (_when(s.get("started_at")) or 0.0, s.get("session_id", "")))
    return sessions
