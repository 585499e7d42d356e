"""The usage journal: reservations and settled usage appended, fsync'ed in group commits,
replayed at start and compacted."""

import asyncio
import contextlib
import json
import os
import threading
from typing import Callable, Protocol

from ..errors import RuntimeFailure
from ..limits.decide import _is_count
from ..limits.state import MemoryState, _check_rows
from ..util import _read_optional, _write_all, atomic_file, log


def _datasync(fd: int) -> None:
    """fdatasync where there is one (not on macOS), else fsync."""
    (os.fdatasync if hasattr(os, "fdatasync") else os.fsync)(fd)


def _log_end(log: bytes) -> int:
    """Where the log's whole lines end: before the zeros written ahead (at its first NUL), after
    its last newline (what follows is a torn write)."""
    nul = log.find(b"\0")
    return (log if nul < 0 else log[:nul]).rfind(b"\n") + 1


_PREALLOC_STEP = 128 * 1024       # bytes of zeros written ahead of the log at a time: a line written
_PREALLOC_AHEAD = 32 * 1024       # over them changes no file size, so its fdatasync has no metadata to
                                  # commit (84 us against 120 us for an append, ext4 on a small VM);
                                  # the size change is paid once per step, within that commit's sync


_JOURNAL_COMPACT_BYTES = 1 << 20  # ~1.2k requests of deltas with their carried ledger lines (~870 B
                                  # each); replaying 1 MiB after a crash takes ~50 ms on a small VM


class UsageJournal:
    """Crash-safe persistence of settled usage in the data dir.

    `path` is an append-only log: one JSON line {"s": seq, "d": [deltas], "o": [[id, rows]],
    "c": [ids], "x": carried} per write (empty parts left out), each with one write().
    `carried` is what another file hands over to be made durable by this line's fsync rather
    than by one of its own (the session ledger's request lines): opaque here, handed back by
    replay() to `restore` before the log can be truncated. Zeros are written ahead of the log's
    end (up to compact_bytes), so the lines of most commits overwrite them and the file's size
    does not change; the log ends at its first NUL (JSON never holds a raw one). Write-ahead: a
    reservation is opened ("o") in the file, handed to the kernel by write_ahead(), before its
    request is forwarded, so a kill -9 of the proxy cannot lose it; commit() then fsyncs it
    together with its settlement ("d" and "c") before the response completes: one fsync per
    request (or per group of concurrent requests) rather than two. What this gives up is
    narrow: a power loss (not a process crash) while a request is in flight can lose that
    request's open reservation, as it loses the request's answer; once any response has
    completed, every reservation opened before it is on disk. `path + ".snapshot"`
    holds the counters and the open reservations as of sequence number `seq`, replaced
    atomically (temp file, fsync, rename) when the log grows past `compact_bytes`; the log is
    then truncated. Replay loads the snapshot and applies only log lines with s > seq, so a
    crash between the rename and the truncation counts nothing twice. A reservation still
    open at the end of the replay belonged to a request in flight at a crash: it is charged in
    full (its hold, in the window it was taken in), so a crash never hands out unbilled
    tokens, and a snapshot makes that charge durable at once. A torn last line (kill -9
    mid-write) is cut off at replay. Both files are created 0600."""

    def __init__(self, path: str, compact_bytes: int = _JOURNAL_COMPACT_BYTES):
        self.path = os.fspath(path)
        self.snapshot_path = self.path + ".snapshot"
        self.compact_bytes = compact_bytes
        self.charged_in_flight: tuple[int, int] = (0, 0)  # (requests, tokens) charged in full at replay
        self.keeps_carried = False   # replay's restore could not put back what the log carries: the log
                                     # is never compacted (truncated) until a start can
        self._fd: int | None = None
        self._seq = 0
        self._size = 0             # bytes in the log
        self._allocated = 0        # bytes in the file: the log, then zeros written ahead
        self._synced = 0           # of which fsync'ed
        self._lock = threading.Lock()        # the file's end: appends, truncation
        self._sync_lock = threading.Lock()   # one commit (fsync, compaction) at a time

    def replay(self, state: MemoryState, restore: "Callable[[list], object] | None" = None) -> None:
        """Load the snapshot and the log into `state`; call once at start, before commits.
        `restore` gets what the log's lines carried (in order), before any compaction: the
        owner of those records puts back what a crash kept from its own file, and returns False
        when it could not (then the log keeps them: see keeps_carried)."""
        with self._lock:
            snap_seq = 0
            orphans: dict = {}  # reservation id -> rows, opened and not (yet) closed
            carried: list = []
            raw = _read_optional(self.snapshot_path)
            if raw is not None:
                try:
                    snap = json.loads(raw)
                    snap_seq = snap["seq"]
                    if not _is_count(snap_seq):
                        raise ValueError("bad seq")
                    state.load(snap)
                    for rid, rows in snap.get("open") or ():
                        orphans[int(rid)] = _check_rows(rows)
                except (ValueError, KeyError, TypeError) as exc:
                    raise RuntimeFailure(f"usage snapshot {self.snapshot_path} is unreadable ({exc}); "
                                         "move it aside to start with empty usage counters") from None
            log = _read_optional(self.path) or b""
            end = _log_end(log)
            last = snap_seq
            for line in log[:end].split(b"\n"):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    seq = rec["s"]
                    if not _is_count(seq):
                        raise ValueError("bad seq")
                    if seq > snap_seq:
                        opened = [(int(rid), _check_rows(rows)) for rid, rows in rec.get("o") or ()]
                        closed = [int(rid) for rid in rec.get("c") or ()]
                        state.apply(rec.get("d") or [])
                        if "x" in rec:
                            carried.append(rec["x"])
                        orphans.update(opened)
                        for rid in closed:
                            orphans.pop(rid, None)
                except (ValueError, KeyError, TypeError):  # a damaged line counts nothing
                    continue
                last = max(last, seq)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
            os.fchmod(fd, 0o600)
            if end < len(log):
                os.ftruncate(fd, end)  # later appends must not glue onto the torn fragment
                os.fsync(fd)
            os.lseek(fd, end, os.SEEK_SET)   # lines are written at the log's end, over the zeros
            if self._fd is not None:
                os.close(self._fd)
            self._fd, self._seq, self._size, self._synced = fd, last, end, end
            self._allocated = end
            state.write_ahead = True
            if carried and restore is not None:
                self.keeps_carried = restore(carried) is False
            if orphans:
                state.skip_ids(max(orphans))
                tokens = 0
                for rows in orphans.values():
                    state.apply(rows)
                    tokens += max((r[4] for r in rows if r[1] == "tokens"), default=0)
                self.charged_in_flight = (len(orphans), tokens)
                self._compact(state)  # the charge is durable now, and the orphans leave the log

    def append(self, entries: list) -> None:
        """Durably add one batch of settled deltas (one line, one write, one fsync)."""
        if entries:
            with self._sync_lock:
                with self._lock:
                    self._append({"d": entries})
                self._sync()

    def write_ahead(self, state: MemoryState) -> None:
        """Hand what `state` holds for the journal (reservations just opened, among them) to the
        kernel with one write() and no fsync: cheap enough for the event loop, and safe from a
        kill -9 from here on. The next commit() fsyncs it."""
        with self._lock:
            record = state.drain_journal()
            if record:
                self._append(record)

    def needs_commit(self, state: MemoryState) -> bool:
        """Whether commit() has anything to do: records in `state`, or written bytes not fsync'ed."""
        return state.has_pending() or self._synced < self._size

    def commit(self, state: MemoryState, carry: object = None, compact: bool = True) -> None:
        """Make every delta settled so far durable: drain `state` (and `carry`, see the class)
        into one appended line, fsync everything written before (write_ahead() lines too), and
        compact when the log is past compact_bytes (unless `compact` is false: the caller then
        compacts once what was carried is durable elsewhere). Concurrent commits serialise, so a
        commit that finds nothing pending returns only after the commit that took its delta has
        fsync'ed. The fsync holds no lock write_ahead() needs. Blocking I/O: run it in a worker
        thread if the event loop must not wait."""
        with self._sync_lock:
            with self._lock:
                record = state.drain_journal()
                if carry is not None:
                    record["x"] = carry
                if record:
                    self._append(record)
                    self._write_zeros_ahead()
            self._sync()
            if compact and self.wants_compaction():
                with self._lock:
                    self._compact(state)

    def wants_compaction(self) -> bool:
        """Whether the log has grown past compact_bytes (and may be compacted)."""
        return self._size > self.compact_bytes and not self.keeps_carried

    def _sync(self) -> None:
        """Make what was written so far durable (call holding _sync_lock, not _lock). fdatasync
        suffices: an append's new size is among what it writes; the times are not needed."""
        size = self._size
        if self._synced < size:
            _datasync(self._fd)
            self._synced = max(self._synced, size)

    def compact(self, state: MemoryState) -> None:
        """Write a snapshot of `state` atomically, then truncate the log (e.g. at shutdown)."""
        with self._sync_lock, self._lock:
            self._compact(state)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _append(self, record: dict) -> None:
        if self._fd is None:
            raise RuntimeFailure("usage journal written before replay(); call replay() at start")
        line = (json.dumps({"s": self._seq + 1, **record}, separators=(",", ":")) + "\n").encode()
        try:
            _write_all(self._fd, line)
        except OSError:
            try:
                os.ftruncate(self._fd, self._size)  # never leave half a line for the next append
                os.lseek(self._fd, self._size, os.SEEK_SET)
                self._allocated = self._size
            except OSError:
                pass
            raise
        self._seq += 1
        self._size += len(line)
        self._allocated = max(self._allocated, self._size)

    def _write_zeros_ahead(self) -> None:
        """Keep zeros written ahead of the log's end (call holding _lock, before the commit's
        sync, which then makes the new size durable too). Best effort: after a failure the
        next lines extend the file themselves, as appends."""
        if self._allocated >= min(self._size + _PREALLOC_AHEAD, self.compact_bytes):
            return
        target = min(self._size + _PREALLOC_STEP, self.compact_bytes)
        with contextlib.suppress(OSError):
            while self._allocated < target:
                self._allocated += os.pwrite(self._fd, bytes(target - self._allocated), self._allocated)

    def _compact(self, state: MemoryState) -> None:
        if self._fd is None:
            raise RuntimeFailure("usage journal compacted before replay(); call replay() at start")
        if self.keeps_carried:
            return   # the log holds the only copies of records its restore could not put back
        snap = state.export(drain=True)  # pending deltas are inside the snapshot now
        snap["seq"] = self._seq
        data = json.dumps(snap, separators=(",", ":")).encode()
        with atomic_file(self.snapshot_path) as fh:
            fh.write(data)
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.fsync(self._fd)
        self._size = self._synced = self._allocated = 0


def read_carried(path: str) -> list:
    """What the log at `path` carries (see UsageJournal), in order, read only: for the readers
    of the files it is carried for, since after a crash some of it may be nowhere else until a
    proxy replays the log. A torn or damaged line, or a log that cannot be read, gives nothing."""
    try:
        data = _read_optional(path) or b""
    except OSError:
        return []
    carried = []
    for line in data[:_log_end(data)].split(b"\n"):
        if b'"x":' not in line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "x" in rec:
            carried.append(rec["x"])
    return carried


class Handed(Protocol):
    """A file that commits with the usage journal (the session ledger): lines queued in memory,
    handed over to be carried in the journal's line, flushed (written and fsync'ed) by itself
    otherwise. Its methods log their own failures and raise nothing of their own."""

    def has_pending(self) -> bool: ...

    def handing_over(self) -> "contextlib.AbstractContextManager[object]": ...

    def sync(self) -> bool: ...

    def flush(self) -> None: ...


def _log_failure(exc: Exception) -> None:
    log.error("writing the usage journal failed (%s); settled usage stays in memory", exc)


class GroupCommit:
    """The durability of answered requests: the usage journal (reservations written ahead,
    settlements) and the ledger's request lines, group-committed with one fsync. The ledger's
    pending lines ride in the journal's line (its fsync makes them durable, and the journal's
    replay hands them back to be restored after a crash) and are then written to the ledger's
    own file without an fsync; that file is fsync'ed only before the journal compacts, that is
    forgets them. Without a journal (Redis keeps the counters) the ledger flushes itself with
    its own fsync; either may be absent.

    A request waits in sync() for the commit that covers it, so its settlement and ledger line
    (and its reservation, written ahead) are on disk before its response ends. Concurrent
    requests share one commit, done in a worker thread off the event loop; a request that is
    the only one in flight commits on the loop instead, which spares it the thread hand-off
    (nobody else is waiting for the loop). A commit already running may hold a request's
    records without having fsync'ed them yet: then the request waits for the next one."""

    def __init__(self, journal: "UsageJournal | None", state, ledger: "Handed | None" = None):
        self.journal, self.state, self.ledger = journal, state, ledger
        self._waiters: list = []
        self._task: asyncio.Task | None = None

    def write_ahead(self) -> None:
        """Reservations just opened go to the usage journal's file (one write(), no fsync, on the
        loop) before their request is forwarded: from then on a kill -9 cannot lose them. The
        fsync comes with the request's settlement, in sync()."""
        if self.journal is None or not self.state.has_pending():
            return
        try:
            self.journal.write_ahead(self.state)
        except OSError as exc:
            _log_failure(exc)

    def pending(self) -> bool:
        """Whether a commit has anything to make durable."""
        return ((self.journal is not None and self.journal.needs_commit(self.state))
                or (self.ledger is not None and self.ledger.has_pending()))

    def commit(self) -> None:
        """One commit of everything settled and recorded so far. Blocking I/O; logs its
        failures and never raises (one file failing must not keep the other from its commit)."""
        journal, ledger = self.journal, self.ledger
        carried = journal is not None
        if journal is not None:
            try:
                if ledger is None:
                    journal.commit(self.state, compact=False)
                else:
                    with ledger.handing_over() as carry:
                        journal.commit(self.state, carry, compact=False)
            except Exception as exc:
                carried = False
                _log_failure(exc)
        if ledger is not None and not carried:
            ledger.flush()  # no journal to carry its lines, or it failed: the ledger's own fsync
        if journal is not None and journal.wants_compaction() and (ledger is None or ledger.sync()):
            try:
                journal.compact(self.state)
            except Exception as exc:
                _log_failure(exc)

    async def sync(self, alone: bool) -> None:
        """Return once everything settled and recorded so far is on disk. `alone`: no other
        request is in flight, so the commit may run on the loop."""
        idle = self._task is None or self._task.done()
        if idle and alone and not self._waiters:
            self.commit()
            return
        if idle and not self.pending():
            return
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._waiters.append(done)
        if idle:
            self._task = loop.create_task(self._writer())
        await asyncio.shield(done)

    async def _writer(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiters:
            waiters, self._waiters = self._waiters, []
            # Every earlier commit has finished here, so with nothing pending there is nothing
            # of these waiters' left to make durable. Waking a thread costs about as much as an
            # fsync on a small VM: skip the hand-off when it would do nothing.
            if self.pending():
                await loop.run_in_executor(None, self.commit)
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
