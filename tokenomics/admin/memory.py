"""The memory tab: the conversation-log files under the data dir, listed and read, confined.

Default deny: a file is served only when the listing shows it, and the listing holds only
regular files (no symlinks) below a memory log's directory inside the data dir, never the
store, keys, certificates, journals, ledger, pid, state or config files."""

import fnmatch
import gzip
import os
import stat
import urllib.parse

from ..errors import TokenomicsError
from ..records.memory import MemoryWriter
from ..util import MiB, _inside


MAX_LISTED_FILES = 1000         # files one listing shows; a memory dir is a handful per day
MAX_WALK_DEPTH = 8              # subdirectory levels below a memory dir ({date}/{token_hash}/... patterns)
MAX_VIEW_BYTES = 4 * MiB        # text one view returns (after gunzip); the tab shows the start of a bigger file


# Names never served, wherever they lie: the store and its lock, keys, certificates, the usage
# and session journals, pid/state/lock files and configuration.
_NEVER = ("tokens.json*", "hash.key", "*.key", "*.crt", "*.pem", "usage.journal*", "*.pid", "*.lock",
          "*.state", "*.json", "*.jsonl", "*.yaml", "*.yml", ".env", "*.env", "*.tmp")
_NEVER_DIRS = frozenset({"certs", "sessions"})


def _never(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in _NEVER)


class MemoryFiles:
    """The memory files of one data dir; `specs` are the memory specs in use (config and every
    stored policy), read again on each call since policies change."""

    def __init__(self, data_dir: str):
        self.data_dir = os.path.abspath(data_dir)

    def roots(self, specs: list[dict]) -> tuple[list[str], tuple]:
        """The memory directories inside the data dir, and the file endings memory logs there
        have (`.md` unless a file_name or single file says otherwise; rotated copies keep it)."""
        real = os.path.realpath(self.data_dir)
        found, endings = {os.path.join(real, "memory")}, {".md"}
        for spec in specs:
            if not spec or spec.get("redis"):
                continue
            try:
                writer = MemoryWriter(self.data_dir, spec)
            except TokenomicsError:
                continue
            found.add(os.path.realpath(writer.directory))
            ext = os.path.splitext(writer.single_file or writer.file_name)[1]
            if ext and ext.lower() not in (".gz", ".json", ".jsonl", ".key", ".yaml", ".yml"):
                endings.add(ext)
        ends = tuple(endings) + tuple(e + ".gz" for e in endings)
        return sorted(r for r in found if _inside(real, r)), ends

    def listing(self, specs: list[dict]) -> list[dict]:
        real = os.path.realpath(self.data_dir)
        files: dict[str, dict] = {}
        roots, ends = self.roots(specs)
        for root in roots:
            self._walk(real, root, 0, files, ends)
            if len(files) >= MAX_LISTED_FILES:
                break
        return sorted(files.values(), key=lambda f: f["path"])[:MAX_LISTED_FILES]

    def _walk(self, real: str, directory: str, depth: int, files: dict, ends: tuple) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if len(files) >= MAX_LISTED_FILES:
                return
            if entry.name.startswith(".") or _never(entry.name):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(info.st_mode):
                if depth < MAX_WALK_DEPTH and entry.name not in _NEVER_DIRS:
                    self._walk(real, entry.path, depth + 1, files, ends)
            elif stat.S_ISREG(info.st_mode) and entry.name.endswith(ends):
                rel = os.path.relpath(entry.path, real)
                if rel.split(os.sep)[0] in _NEVER_DIRS:
                    continue
                files[rel] = {"path": rel.replace(os.sep, "/"), "size": info.st_size,
                              "modified": int(info.st_mtime), "compressed": entry.name.endswith(".gz")}

    def read(self, raw_path: str, specs: list[dict]) -> str | None:
        """The text of a listed file named by its path relative to the data dir (URL-escaped as
        sent), or None for anything else: traversal, absolute paths, NUL, symlinks, unlisted."""
        path = urllib.parse.unquote(raw_path, errors="strict") if "%" in raw_path else raw_path
        if not path or "\0" in path or "\\" in path or path.startswith("/") or \
                any(part in ("", ".", "..") for part in path.split("/")):
            return None
        listed = {f["path"] for f in self.listing(specs)}
        if path not in listed:
            return None
        real = os.path.realpath(self.data_dir)
        full = os.path.join(real, *path.split("/"))
        if os.path.realpath(full) != full or not _inside(real, full):
            return None
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                return None
            if path.endswith(".gz"):
                try:
                    data = gzip.GzipFile(fileobj=fh).read(MAX_VIEW_BYTES)
                except (OSError, EOFError):
                    return None
            else:
                data = fh.read(MAX_VIEW_BYTES)
        return data.decode("utf-8", "replace")
