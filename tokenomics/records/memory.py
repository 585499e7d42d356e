"""Conversation memory: markdown logs of what the model was sent and answered, to files or Redis."""

import contextlib
import errno
import gzip
import os
import shutil
import threading
import time
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..records.ledger import _num
from ..util import HASH_PREFIX, MiB, _MEMORY_DEFAULT_FILE, _inside, _write_all, atomic_file, check_memory_file_name, log, memory_file_path, printable, scrub, utc_iso

if TYPE_CHECKING:  # names used in annotations only
    from ..config import RedisConfig


# --- conversation memory ----------------------------------------------------------------------------

def memory_entry(token_hash: str, model: str, role: str, content: str, now: float) -> str:
    """One conversation-log entry: `## <time> | <token hash prefix> | <role> | <model>`, a blank
    line, the content. The content is scrubbed of token and key shapes as request logs are
    (Records also removes the configured keys' exact values); the client-chosen model name is
    printable(), so it cannot start a forged entry."""
    who = (token_hash or "")[:HASH_PREFIX] or "-"
    return f"## {utc_iso(now)} | {who} | {role} | {printable(scrub(model or '-'))}\n\n{scrub(content)}\n"


class RedisMemory:
    """The Redis list backend of the conversation log (`memory.redis: true`): the same markdown
    entries, RPUSHed to `<session.redis.prefix>memory:<session_id>` on the server in `session.redis`.
    Blocking (call it off the event loop) and never raising, like MemoryWriter."""

    enabled = True

    def __init__(self, config: "RedisConfig", session_id: str):
        self.key = f"{getattr(config, 'prefix', 'tokenomics:')}memory:{session_id}"
        self.config = config
        self._client = None
        self._lock = threading.Lock()
        self._failing = False

    def _connect(self):
        from ..limits.redis_state import redis_client  # the one place redis-py is imported
        return redis_client(self.config)

    def append(self, token_hash: str, model: str, entries: list[tuple[str, str]], now: float) -> None:
        if not entries:
            return
        items = [memory_entry(token_hash, model, role, content, now) for role, content in entries]
        try:
            with self._lock:
                if self._client is None:
                    self._client = self._connect()
                self._client.rpush(self.key, *items)
            self._failing = False
        except Exception as exc:  # a conversation log must never fail the request it records
            self._client = None
            if not self._failing:
                self._failing = True
                log.error("memory log: cannot write to Redis (session.redis.addr): %s; conversation entries "
                          "are dropped until it works again", exc.__class__.__name__)


class MemoryWriter:
    """Conversation log as markdown: `## <time> | <token hash prefix> | <role> | <model>`, a blank
    line, the content, a blank line. `file_path` (relative to the data dir when relative) is a
    directory, with `file_name` a pattern using {token_hash} (16-char prefix) and {date}
    (UTC YYYY-MM-DD) that may create subdirectories but never leave `file_path`; without
    `file_name`, `file_path` is the single file when it has an extension and is not a directory,
    else `{file_path}/memory.md`. A spec without `enabled` is on when it has any other key.

    A file that would grow past `max_size_mb` (absent or 0: never) is renamed to
    `<stem>.<YYYYmmddTHHMMSS>.<ext>` first and gzipped when `compress_old`. append() is
    blocking (rotation gzips) and thread-safe: call it through asyncio.to_thread. It never raises:
    a failure is logged once (until a write succeeds again) and the entries are dropped. It only
    ever sees role/content pairs, so no header or key can reach the file. With `redis: true`
    the Redis list backend (RedisMemory) is used instead."""

    def __init__(self, data_dir: str, spec: dict):
        spec = dict(spec or {})
        self.enabled = bool(spec.get("enabled", bool(spec)))
        self.data_dir = os.path.abspath(data_dir)
        file_path = memory_file_path(spec, self.data_dir)
        self.file_name = str(spec.get("file_name") or "")
        if self.file_name:
            self.directory = file_path
            check_memory_file_name(self.file_name)
            self.single_file = ""
        elif os.path.splitext(file_path)[1] and not os.path.isdir(file_path):
            self.directory, self.single_file = os.path.dirname(file_path), file_path
        else:
            self.directory, self.single_file = file_path, os.path.join(file_path, _MEMORY_DEFAULT_FILE)
        max_mb = _num(spec.get("max_size_mb"))
        self.max_bytes = int(max_mb * MiB) if max_mb > 0 else 0
        self.compress_old = bool(spec.get("compress_old", False))
        self._lock = threading.Lock()
        self._failing = False

    def path_for(self, token_hash: str, now: float) -> str:
        """The file this token's entries go to at `now`."""
        if self.single_file:
            return self.single_file
        name = self.file_name.replace("{token_hash}", (token_hash or "")[:HASH_PREFIX] or "unknown") \
            .replace("{date}", time.strftime("%Y-%m-%d", time.gmtime(now)))
        path = os.path.normpath(os.path.join(self.directory, name))
        if os.path.commonpath([self.directory, path]) != self.directory or path == self.directory:
            raise UsageError("memory.file_name: the resolved path leaves memory.file_path")
        return path

    def append(self, token_hash: str, model: str, entries: list[tuple[str, str]], now: float) -> None:
        """Append one markdown entry per (role, content) pair; rotate first if the file would
        pass max_size_mb. Never raises."""
        if not self.enabled or not entries:
            return
        data = "".join(memory_entry(token_hash, model, role, content, now) + "\n"
                       for role, content in entries).encode("utf-8", "replace")
        path = ""
        try:
            path = self.path_for(token_hash, now)
            with self._lock:
                self._confine(os.path.dirname(path))
                os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
                self._confine(os.path.dirname(path))  # again: the tree may have changed meanwhile
                if os.path.islink(path):
                    raise PermissionError(errno.EPERM, "it is a symlink; the memory log writes only regular files")
                if self.max_bytes:
                    with contextlib.suppress(FileNotFoundError):
                        size = os.lstat(path).st_size
                        if size and size + len(data) > self.max_bytes:
                            self._rotate(path, now)
                # O_NOFOLLOW: a symlink put where the log file goes is refused, not followed.
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW,
                             0o600)
                try:
                    _write_all(fd, data)
                finally:
                    os.close(fd)
        except Exception as exc:  # a conversation log must never fail the request it records
            if not self._failing:
                self._failing = True
                reason = getattr(exc, "strerror", None) or exc.__class__.__name__
                log.error("memory log: cannot write %s: %s; conversation entries are dropped until "
                          "it works again", path or self.directory, reason)
            return
        self._failing = False

    def _confine(self, directory: str) -> None:
        """Refuse a write whose directory resolves outside the data dir: validation ran when the
        policy was stored, but a symlink made since (by anyone who can write below the data
        dir) must not carry conversation text elsewhere."""
        if not _inside(os.path.realpath(self.data_dir), os.path.realpath(directory)):
            raise PermissionError(errno.EPERM, "it resolves outside the data dir (a symlink?); "
                                  "refusing to write there")

    def _rotate(self, path: str, now: float) -> None:
        stem, ext = os.path.splitext(path)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
        for n in range(10_000):
            target = f"{stem}.{stamp}{'-' + str(n) if n else ''}{ext or '.md'}"
            if not os.path.exists(target) and not os.path.exists(target + ".gz"):
                break
        else:
            raise FileExistsError(f"no free rotation name for {path}")
        os.replace(path, target)
        if not self.compress_old:
            return
        with atomic_file(target + ".gz") as raw, gzip.GzipFile(filename=os.path.basename(target), mode="wb",
                                                                fileobj=raw, mtime=int(now)) as gz:
            with open(target, "rb") as src:
                shutil.copyfileobj(src, gz, 1 << 20)
        os.unlink(target)
