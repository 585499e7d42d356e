"""The token store: HMAC-hashed tokens in one JSON file, atomic writes under flock, 0600,
stat-based reload, optional AES-256-GCM encryption of each policy."""

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable, TYPE_CHECKING

from .config import Config
from .crypto import DecryptionError, derive_key, new_aead, seal, unseal
from .errors import RuntimeFailure, TokenomicsError, UsageError
from .policy import parse_policy
from .util import TOKEN_PREFIX, log, parse_duration, parse_rfc3339, utc_iso, write_private

if TYPE_CHECKING:  # names used in annotations only
    from .policy import Policy
    from .providers import Catalog


REMOTE_SOURCE = "remote"                # tokens.json entries mirrored from the central server carry
                                        # "source": "remote"; a sync replaces those and only those
_UNCHANGED = object()                   # a store change that found nothing to change: no write
STORE_RELOAD_INTERVAL = 0.25            # stat tokens.json at most this often; changes show within 1 s
_HASH_KEY_CHECK = b"tokenomics hash key check"  # HMAC'ed with the hash key into tokens.json's
                                                # "hash_key_check": names the key, reveals nothing


def hash_token(hash_key: bytes, token: str) -> str:
    return hmac.new(hash_key, token.encode("utf-8"), hashlib.sha256).hexdigest()


def hash_key_check(hash_key: bytes) -> str:
    """The value tokens.json keeps to recognise the hash key its tokens were made with (an HMAC
    of a fixed text, so neither the key nor any token can be recovered from it)."""
    return hmac.new(hash_key, _HASH_KEY_CHECK, hashlib.sha256).hexdigest()


class HashKeyMismatch(RuntimeFailure):
    """The hash key in use is not the one the stored tokens were hashed with: none of them
    would match, which must be said as such rather than as "no token matches"."""


def _hash_key_mismatch(config: Config, doc: dict, hash_key: bytes | None, from_env: bool) -> str | None:
    """The message for a store whose tokens were made with another hash key, else None.
    A store without a check value (written by an older version) or without tokens passes."""
    stored = doc.get("hash_key_check")
    count = len(doc.get("tokens") or ())
    if not isinstance(stored, str) or not count:
        return None
    if hash_key is not None and hmac.compare_digest(stored, hash_key_check(hash_key)):
        return None
    env_name, key_file = config.security.hash_key_env, os.path.join(config.dir, "hash.key")
    fix = (f"set {env_name} to the original, or unset it if they were made with {key_file}" if from_env
           else f"set {env_name} to the original or restore {key_file}")
    return (f"the hash key does not match the one the stored tokens were made with (none of the {count} "
            f"would be accepted): {fix}")


def hash_key_problem(config: Config, environ=None) -> str | None:
    """For `doctor`: why the current hash key cannot open the stored tokens, or None. Reads
    only; unlike load_hash_key it never generates a key file."""
    environ = os.environ if environ is None else environ
    try:
        with open(os.path.join(config.dir, "tokens.json"), "rb") as fh:
            doc = json.loads(fh.read() or b"{}")
    except (OSError, ValueError):
        return None  # no store yet, or one the store itself reports as unreadable
    if not isinstance(doc, dict):
        return None
    key = environ.get(config.security.hash_key_env, "").encode("utf-8") or None
    from_env = key is not None
    if key is None:
        try:
            with open(os.path.join(config.dir, "hash.key"), "rb") as fh:
                key = fh.read().strip() or None
        except OSError:
            key = None
    return _hash_key_mismatch(config, doc, key, from_env)


def stored_labels(data_dir: str) -> dict[str, str]:
    """{token hash: label} from {data_dir}/tokens.json, for naming tokens in the ledger. Labels
    are stored in the clear, so this needs neither the hash key nor the encryption key; an
    absent or unreadable store gives {} (the ledger then shows hash prefixes)."""
    try:
        with open(os.path.join(data_dir, "tokens.json"), "rb") as fh:
            doc = json.loads(fh.read() or b"{}")
    except (OSError, ValueError):
        return {}
    entries = doc.get("tokens") if isinstance(doc, dict) else None
    return {e["hash"]: e.get("label") or "" for e in entries or ()
            if isinstance(e, dict) and isinstance(e.get("hash"), str) and isinstance(e.get("label") or "", str)}


def parse_expiry(value: str, now: float, what: str = "--expires") -> float:
    """`24h`, `7d`, `30d`, `1y` (from now) or an RFC 3339 timestamp; must lie in the future."""
    try:
        when = now + parse_duration(value)
    except ValueError:
        try:
            when = parse_rfc3339(value)
        except ValueError:
            raise UsageError(f"{what}: '{value}' is neither a duration (24h, 7d, 30d, 1y) nor an "
                             "RFC 3339 time (2026-12-31T23:59:59Z)") from None
    if when <= now:
        raise UsageError(f"{what}: {value} is in the past; give a later time or a duration such as 30d")
    if when > now + 100 * 365.25 * 86400:  # beyond what a timestamp can print; nobody means it
        raise UsageError(f"{what}: {value} is more than 100 years away; leave {what} out for no expiry")
    return when


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_hex(16)


def ensure_data_dir(path: str) -> str:
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise RuntimeFailure(f"cannot create the data dir {path}: {exc.strerror}; choose another with "
                             "--dir or TOKENOMICS_DIR") from None
    return path


def load_hash_key(config: Config, environ=None) -> bytes:
    """The HMAC key: from the env var named by security.hash_key_env, else {dir}/hash.key,
    generated once (0600) so a fresh install works and stays unique per machine."""
    environ = os.environ if environ is None else environ
    value = environ.get(config.security.hash_key_env, "")
    if value:
        return value.encode("utf-8")
    path = os.path.join(ensure_data_dir(config.dir), "hash.key")
    try:
        with open(path, "rb") as fh:
            key = fh.read().strip()
        if key:
            return key
        raise RuntimeFailure(f"{path} is empty; delete it to generate a new hash key (tokens hashed "
                             f"with the old key stop working) or set {config.security.hash_key_env}")
    except FileNotFoundError:
        pass
    key = secrets.token_hex(32).encode("ascii")
    tmp = f"{path}.{os.getpid()}.tmp"
    write_private(tmp, key + b"\n")
    try:
        os.link(tmp, path)  # atomic create-if-absent: a reader never sees a half-written key
    except FileExistsError:  # another process won the race: use its key
        with open(path, "rb") as fh:
            key = fh.read().strip()
        if not key:
            raise RuntimeFailure(f"{path} is empty; delete it to generate a new hash key (tokens hashed "
                                 f"with the old key stop working) or set {config.security.hash_key_env}") from None
        return key
    finally:
        os.unlink(tmp)
    log.warning("%s is not set: generated a hash key in %s (keep it; tokens hashed with it stop "
                "working without it)", config.security.hash_key_env, path)
    return key


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """One wrapper token as stored: only its hash, never the token itself."""
    hash: str
    policy: "Policy"
    created_at: float
    expires_at: float | None = None
    label: str = ""

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def to_json(self, now: float) -> dict:
        return {"hash": self.hash, "label": self.label, "created_at": utc_iso(self.created_at),
                "expires_at": utc_iso(self.expires_at) if self.expires_at is not None else None,
                "expired": self.expired(now), "policy": self.policy.raw}


_KEY_CHECK = b"tokenomics key check"


class _Cipher:
    """Seals and opens policies with the store's key; knows nothing about files."""

    def __init__(self, secret: str, env_name: str, header: dict | None):
        self.env_name = env_name
        if header:
            self.kdf = header.get("kdf", "scrypt")
            self.salt = base64.b64decode(header.get("salt", ""))
        else:
            self.kdf = "raw" if re.fullmatch(r"[0-9a-fA-F]{64}", secret) else "scrypt"
            self.salt = secrets.token_bytes(16)
        if self.kdf == "raw" and not re.fullmatch(r"[0-9a-fA-F]{64}", secret):
            raise RuntimeFailure(f"the token store was encrypted with a raw 64-hex-char key but "
                                 f"{env_name} holds a passphrase; set {env_name} to the key it was written with")
        self.aead = new_aead(_derive_cached(secret, self.salt))
        self.check = header.get("check") if header else seal(self.aead, _KEY_CHECK, b"check")
        if header:
            try:
                unseal(self.aead, self.check or "", b"check")
            except DecryptionError:
                raise RuntimeFailure(f"{env_name} does not match the key the token store was encrypted "
                                     f"with; set it to the original key or passphrase") from None

    def header(self) -> dict:
        return {"alg": "aes-256-gcm", "kdf": self.kdf,
                "salt": base64.b64encode(self.salt).decode("ascii"), "check": self.check}

    def seal_policy(self, token_hash: str, policy: dict) -> str:
        return seal(self.aead, json.dumps(policy, separators=(",", ":")).encode("utf-8"),
                    token_hash.encode("ascii"))

    def open_policy(self, token_hash: str, blob: str) -> dict:
        try:
            return json.loads(unseal(self.aead, blob, token_hash.encode("ascii")))
        except DecryptionError:
            raise RuntimeFailure(f"token {token_hash[:12]}: policy does not decrypt with {self.env_name}; "
                                 "the store was tampered with or written with another key") from None


_DERIVED: dict = {}


def _derive_cached(secret: str, salt: bytes) -> bytes:
    """scrypt costs ~0.1 s by design; do it once per (secret, salt) in a process."""
    digest = hashlib.sha256(secret.encode("utf-8") + b"\0" + salt).hexdigest()
    if digest not in _DERIVED:
        _DERIVED[digest] = derive_key(secret, salt)
    return _DERIVED[digest]


class TokenStore:
    """tokens.json in the data dir. Reads are cached and refreshed when the file changes on disk
    (any process may write it); every write is read-modify-write under an exclusive flock."""

    def __init__(self, config: Config, catalog: "Catalog", environ=None, hash_key: bytes | None = None,
                 verify_hash_key: bool = True):
        self.environ = os.environ if environ is None else environ
        self.config = config
        self.catalog = catalog
        self.dir = ensure_data_dir(config.dir)
        self.path = os.path.join(self.dir, "tokens.json")
        self.lock_path = os.path.join(self.dir, "tokens.lock")
        self.hash_key = hash_key if hash_key is not None else load_hash_key(config, self.environ)
        self.env_name = config.security.encryption_key_env
        self.verify_hash_key = verify_hash_key  # False: read anyway (doctor reports the mismatch itself)
        self._records: dict[str, TokenRecord] = {}
        self._stamp = None
        self._checked = 0.0
        self._unreadable = None          # the stamp of a tokens.json that failed to load: not retried
        self.reload()

    # -- reading -----------------------------------------------------------------------------
    def _file_stamp(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _read_document(self) -> dict:
        try:
            with open(self.path, "rb") as fh:
                doc = json.loads(fh.read() or b"{}")
        except FileNotFoundError:
            return {"version": 1, "tokens": []}
        except ValueError:
            raise RuntimeFailure(f"{self.path} is not valid JSON; restore it from a backup") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("tokens", []), list):
            raise RuntimeFailure(f"{self.path} does not look like a tokenomics token store")
        doc.setdefault("tokens", [])
        return doc

    def _cipher(self, doc: dict) -> "_Cipher | None":
        secret = self.environ.get(self.env_name, "")
        header = doc.get("encryption")
        if not secret:
            if header:
                raise RuntimeFailure(f"the token store is encrypted: set {self.env_name} to its key "
                                     "or passphrase")
            return None
        return _Cipher(secret, self.env_name, header)

    def _decode(self, doc: dict, cipher) -> dict[str, TokenRecord]:
        records = {}
        for entry in doc["tokens"]:
            token_hash = entry.get("hash", "")
            if "policy_enc" in entry:
                if cipher is None:
                    raise RuntimeFailure(f"the token store is encrypted: set {self.env_name}")
                raw_policy = cipher.open_policy(token_hash, entry["policy_enc"])
            else:
                raw_policy = entry.get("policy", {})
            try:
                policy = parse_policy(raw_policy, catalog=self.catalog)
            except UsageError as exc:
                log.error("token %s skipped: its stored policy is invalid: %s", token_hash[:12], exc)
                continue
            records[token_hash] = TokenRecord(
                hash=token_hash, policy=policy,
                created_at=parse_rfc3339(entry["created_at"]) if entry.get("created_at") else 0.0,
                expires_at=parse_rfc3339(entry["expires_at"]) if entry.get("expires_at") else None,
                label=entry.get("label", "") or "")
        return records

    def _check_hash_key(self, doc: dict, writing: bool = False) -> None:
        if not (self.verify_hash_key or writing):  # a write would stamp the wrong key: never skip it
            return
        from_env = bool(self.environ.get(self.config.security.hash_key_env))
        problem = _hash_key_mismatch(self.config, doc, self.hash_key, from_env)
        if problem:
            raise HashKeyMismatch(problem)

    def reload(self) -> None:
        stamp = self._file_stamp()
        doc = self._read_document()
        self._check_hash_key(doc)
        self._records = self._decode(doc, self._cipher(doc))
        self._stamp = stamp

    def refresh(self, now: float, at_once: bool = False) -> None:
        """Pick up changes other processes made; cheap enough to call on every request. `at_once`
        looks at tokens.json whatever the reload interval (one stat when it did not change)."""
        if not at_once and now - self._checked < STORE_RELOAD_INTERVAL:
            return
        self._checked = now
        stamp = self._file_stamp()
        if stamp != self._stamp and stamp != self._unreadable:
            try:
                self.reload()
            except TokenomicsError as exc:
                self._unreadable = stamp
                log.error("token store reload failed, keeping the previous tokens: %s", exc)

    @property
    def version(self):
        """Changes whenever tokens.json does (any writer): what the remote server watches."""
        return self._stamp

    def lookup(self, token: str) -> TokenRecord | None:
        token_hash = hash_token(self.hash_key, token)
        record = self._records.get(token_hash)
        if record is not None and hmac.compare_digest(record.hash, token_hash):
            return record
        return None

    def authenticate(self, token: str, now: float) -> TokenRecord | None:
        """The token's record as tokens.json holds it now. A miss looks at the file again at once:
        a token `token create` wrote a moment ago in another process is found on its first use,
        not after the reload interval (a stream of unknown tokens costs a stat each, no reload)."""
        self.refresh(now)
        record = self.lookup(token)
        if record is None:
            self.refresh(now, at_once=True)
            record = self.lookup(token)
        return record

    def records(self) -> list[TokenRecord]:
        return sorted(self._records.values(), key=lambda r: (r.created_at, r.hash))

    def find(self, prefix: str) -> TokenRecord:
        prefix = prefix.strip().lower()
        if len(prefix) < 8:
            raise UsageError("--hash: give at least 8 characters of the token hash")
        found = [r for h, r in self._records.items() if h.startswith(prefix)]
        if not found:
            raise RuntimeFailure(f"no token matches hash prefix {prefix}")
        if len(found) > 1:
            raise RuntimeFailure(f"hash prefix {prefix} is ambiguous ({len(found)} tokens); give more characters")
        return found[0]

    # -- writing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _mutate(self, change: Callable[[list, "_Cipher | None"], Any]):
        """Read the current file under the lock, apply `change` to its entries, write it back."""
        with self._locked():
            doc = self._read_document()
            self._check_hash_key(doc, writing=True)
            cipher = self._cipher(doc)
            entries = doc["tokens"]
            if cipher is not None:  # (re-)encrypt everything with the current key
                for entry in entries:
                    if "policy" in entry:
                        entry["policy_enc"] = cipher.seal_policy(entry["hash"], entry.pop("policy"))
            result = change(entries, cipher)
            if result is _UNCHANGED:
                return result
            doc = {"version": 1, "hash_key_check": hash_key_check(self.hash_key), "tokens": entries}
            if cipher is not None:
                doc["encryption"] = cipher.header()
            write_private(self.path, json.dumps(doc, indent=1).encode("utf-8") + b"\n")
            self.reload()
        return result

    def create(self, raw_policy: dict, expires_at: float | None = None, label: str = "") -> tuple[str, TokenRecord]:
        parse_policy(raw_policy, catalog=self.catalog, data_dir=self.config.dir)
        token = new_token()
        token_hash = hash_token(self.hash_key, token)

        def change(entries, cipher):
            entry = {"hash": token_hash, "created_at": utc_iso(time.time()),
                     "expires_at": utc_iso(expires_at) if expires_at is not None else None,
                     "label": label}
            if cipher is not None:
                entry["policy_enc"] = cipher.seal_policy(token_hash, raw_policy)
            else:
                entry["policy"] = raw_policy
            entries.append(entry)

        self._mutate(change)
        return token, self._records[token_hash]

    def update(self, prefix: str, raw_policy: dict | None = None, expires_at: Any = ...,
               label: str | None = None) -> TokenRecord:
        """`expires_at=None` clears the expiry; leaving it `...` keeps it."""
        token_hash = self.find(prefix).hash
        if raw_policy is not None:
            parse_policy(raw_policy, catalog=self.catalog, data_dir=self.config.dir)

        def change(entries, cipher):
            for entry in entries:
                if entry.get("hash") != token_hash:
                    continue
                if raw_policy is not None:
                    entry.pop("policy", None)
                    entry.pop("policy_enc", None)
                    if cipher is not None:
                        entry["policy_enc"] = cipher.seal_policy(token_hash, raw_policy)
                    else:
                        entry["policy"] = raw_policy
                if expires_at is not ...:
                    entry["expires_at"] = utc_iso(expires_at) if expires_at is not None else None
                if label is not None:
                    entry["label"] = label
                return
            raise RuntimeFailure(f"token {token_hash[:12]} was deleted meanwhile")

        self._mutate(change)
        return self._records[token_hash]

    def delete(self, prefix: str) -> TokenRecord:
        record = self.find(prefix)

        def change(entries, cipher):
            entries[:] = [e for e in entries if e.get("hash") != record.hash]

        self._mutate(change)
        return record

    def mirror(self, pulled: list[dict]) -> bool:
        """Make the entries pulled from the central server (marked "source": "remote") exactly
        `pulled`: new ones appear, changed ones change, those the server no longer has go.
        Entries made here are kept unless the server has the same hash. `pulled` holds
        validated {"hash", "policy", "created_at", "expires_at", "label"}. Returns whether
        tokens.json changed (it is written only then)."""
        incoming = {e["hash"]: e for e in pulled}

        def same(entry: dict, new: dict, cipher) -> bool:
            if "policy_enc" in entry:
                policy = cipher.open_policy(entry["hash"], entry["policy_enc"]) if cipher else None
            else:
                policy = entry.get("policy")
            return policy == new["policy"] and all(entry.get(k) == new[k] for k in ("created_at", "expires_at", "label"))

        def change(entries, cipher):
            current = {e.get("hash"): e for e in entries if e.get("source") == REMOTE_SOURCE}
            shadowed = any(e.get("hash") in incoming and e.get("source") != REMOTE_SOURCE for e in entries)
            if not shadowed and current.keys() == incoming.keys() and \
                    all(same(current[h], new, cipher) for h, new in incoming.items()):
                return _UNCHANGED
            kept = [e for e in entries if e.get("source") != REMOTE_SOURCE and e.get("hash") not in incoming]
            for token_hash, new in incoming.items():
                entry = {"hash": token_hash, "created_at": new["created_at"], "expires_at": new["expires_at"],
                         "label": new["label"], "source": REMOTE_SOURCE}
                if cipher is not None:
                    entry["policy_enc"] = cipher.seal_policy(token_hash, new["policy"])
                else:
                    entry["policy"] = new["policy"]
                kept.append(entry)
            entries[:] = kept

        return self._mutate(change) is not _UNCHANGED
