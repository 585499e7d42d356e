"""Token sync from a central `tokenomics remote` server: pull the token list, validate every
entry, mirror it into the local store (the on-disk last good copy), and accept signed push
notifications that ask for a re-sync at once (SPEC §12)."""

import asyncio
import collections
import contextlib
import hashlib
import hmac
import ipaddress
import json
import re
import time
import urllib.parse
from typing import Any, Callable, TYPE_CHECKING

from . import __version__
from .config import Config, RemoteWebhookConfig
from .errors import ProxyError, RuntimeFailure, TokenomicsError, UsageError
from .http.client import UpstreamClient
from .http.server import Request, Response, error_response, json_response
from .http.sse import _deadline
from .policy import parse_policy
from .store import hash_key_check
from .util import MiB, log, parse_rfc3339, utc_iso

if TYPE_CHECKING:  # names used in annotations only
    from .providers import Catalog
    from .store import TokenStore


SYNC_TIMEOUT = 10.0             # seconds for one whole pull (connect, answer, body): a server that
                                # drips its answer must not hold the sync task for longer
MAX_SYNC_BYTES = 32 * MiB       # a token list answer; 100k tokens with small policies is ~30 MB
MAX_SYNC_TOKENS = 100_000       # entries accepted in one list; beyond, the document is refused
MAX_LABEL_CHARS = 200           # a label is a name to recognise a token by, not a document
START_RETRY = 5.0               # seconds between attempts while the first pull or the registration
                                # has not succeeded (also with remote.sync: 0)
START_PULL_TIMEOUT = 5.0        # seconds the start waits for the first pull
RESTART_DELAY = 1.0             # seconds before a crashed sync task is started again
PUSH_DEBOUNCE = 0.1             # seconds a push waits for the rest of its burst: N pushes, one pull
PUSH_MAX_SKEW = 300             # seconds a push's timestamp may be off from our clock
PUSH_MAX_BODY = 64 * 1024       # bytes of a push body; a notification names a change, nothing more
PUSH_NONCES = 10_000            # nonces remembered (each for PUSH_MAX_SKEW s) to refuse replays;
                                # only verified pushes are remembered, so only the server fills it
SIGNATURE_HEADER = "x-tokenomics-signature"
TIMESTAMP_HEADER = "x-tokenomics-timestamp"
NONCE_HEADER = "x-tokenomics-nonce"
SECRET_HEADER = "x-tokenomics-secret"

_HASH_RE = re.compile(r"[0-9a-f]{64}")
_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")
_RFC3339_RE = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")


def push_signature(signing_key: str, timestamp: str, nonce: str, body: bytes) -> str:
    """`sha256=<hex>` of HMAC-SHA256(signing_key, "<timestamp>.<nonce>." + body): what the
    server sends in X-Tokenomics-Signature and the proxy checks."""
    message = f"{timestamp}.{nonce}.".encode("ascii") + body
    return "sha256=" + hmac.new(signing_key.encode("utf-8"), message, hashlib.sha256).hexdigest()


def _is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    return False


def remote_api_key(config: Config, environ) -> str:
    """The bearer key for remote.url: remote.api_key, else the env var remote.api_key_env
    names. A server beyond loopback without a key is refused: the token list is sensitive."""
    remote = config.remote
    if remote.api_key_env:
        key = environ.get(remote.api_key_env, "")
        if not key:
            raise UsageError(f"config: remote.api_key_env: {remote.api_key_env} is not set; export the central "
                             "server's API key in it")
        return key
    if remote.api_key:
        return remote.api_key
    host = urllib.parse.urlsplit(remote.url).hostname or ""
    if not _is_loopback_host(host):
        raise UsageError("config: remote.url: a token server on another host needs its API key: set "
                         "remote.api_key_env to the name of a variable that holds it (or remote.api_key)")
    return ""


def _origin(url: str) -> str:
    p = urllib.parse.urlsplit(url)
    return f"{p.scheme}://{p.netloc.rpartition('@')[2]}"


def _rfc3339(value: Any, what: str) -> str | None:
    """A pulled time, normalised; ValueError unless it is null or an RFC 3339 timestamp."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 40 or not _RFC3339_RE.fullmatch(value):
        raise ValueError(f"{what} is not an RFC 3339 time")
    try:
        return utc_iso(parse_rfc3339(value))
    except (ValueError, OverflowError, OSError):
        raise ValueError(f"{what} is not a valid time") from None


def _pulled_entry(entry: Any, catalog: "Catalog", data_dir: str) -> dict:
    """One token of a pulled list, validated as strictly as `token create` validates; or
    ValueError saying what is wrong (never echoing the entry)."""
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    token_hash = entry.get("hash", entry.get("token_hash"))
    if not isinstance(token_hash, str) or not _HASH_RE.fullmatch(token_hash):
        raise ValueError("its hash is not 64 lower-case hex characters")
    policy = entry.get("policy")
    if isinstance(policy, str):  # the Go project's server sends the policy as a JSON string
        try:
            policy = json.loads(policy)
        except ValueError:
            raise ValueError(f"token {token_hash[:12]}: its policy is not JSON") from None
    if not isinstance(policy, dict):
        raise ValueError(f"token {token_hash[:12]}: its policy is not a JSON object")
    try:
        parse_policy(policy, catalog=catalog, data_dir=data_dir)
    except UsageError as exc:
        raise ValueError(f"token {token_hash[:12]}: {exc}") from None
    label = entry.get("label")
    if label is None:
        label = ""
    if not isinstance(label, str) or len(label) > MAX_LABEL_CHARS:
        raise ValueError(f"token {token_hash[:12]}: its label is not a string of at most {MAX_LABEL_CHARS} characters")
    return {"hash": token_hash, "policy": policy, "label": label,
            "created_at": _rfc3339(entry.get("created_at"), f"token {token_hash[:12]}: created_at"),
            "expires_at": _rfc3339(entry.get("expires_at"), f"token {token_hash[:12]}: expires_at")}


def parse_pulled(doc: Any, catalog: "Catalog", data_dir: str, hash_key: bytes) -> list[dict]:
    """The validated entries of a pulled token list. A bad entry is skipped with a log line; a
    bad document (not a list, too many entries, made with another hash key) is a
    RuntimeFailure, and the caller keeps its last good copy."""
    if isinstance(doc, list):
        entries, check = doc, None
    elif isinstance(doc, dict) and isinstance(doc.get("tokens"), list):
        entries, check = doc["tokens"], doc.get("hash_key_check")
    else:
        raise RuntimeFailure("the answer is not a token list ({\"tokens\": [...]})")
    if len(entries) > MAX_SYNC_TOKENS:
        raise RuntimeFailure(f"the answer lists {len(entries)} tokens, more than the {MAX_SYNC_TOKENS} accepted")
    if check is not None and not (isinstance(check, str)
                                  and hmac.compare_digest(check.encode(), hash_key_check(hash_key).encode())):
        raise RuntimeFailure("the server's tokens were hashed with another hash key, so none would match here; "
                             "set the same hash key (TOKENOMICS_HASH_KEY, or security.hash_key_env) on the "
                             "server and on this proxy")
    pulled, seen = [], set()
    for i, entry in enumerate(entries):
        try:
            item = _pulled_entry(entry, catalog, data_dir)
        except ValueError as exc:
            log.warning("remote sync: entry %d skipped: %s", i, exc)
            continue
        if item["hash"] in seen:
            log.warning("remote sync: entry %d skipped: token %s is listed twice", i, item["hash"][:12])
            continue
        seen.add(item["hash"])
        pulled.append(item)
    return pulled


class RemoteSync:
    """Keeps the local store a mirror of the central server's tokens: a pull at start, then
    every `remote.sync` seconds and at once after a push; a failed pull keeps the last good
    copy (in memory and in tokens.json). Optionally registers this proxy's push callback."""

    def __init__(self, config: Config, store: "TokenStore", environ, client: UpstreamClient | None = None,
                 clock: Callable[[], float] = time.time):
        self.config, self.store, self.clock = config, store, clock
        self.api_key = remote_api_key(config, environ)
        self.base = config.remote.url.rstrip("/")
        self.origin = _origin(config.remote.url)
        self.interval = config.remote.sync
        self.insecure = config.remote.insecure
        self.client = client or UpstreamClient(max_response_bytes=MAX_SYNC_BYTES)
        hook = config.remote.webhook
        self.registering = hook.enabled and hook.auto_register
        self._wake = asyncio.Event()
        self.last_ok: float | None = None
        self.pulls = self.failures = self.restarts = 0
        self._last_error = ""

    # -- one exchange -----------------------------------------------------------------------
    def _headers(self, body: bytes = b"") -> list:
        netloc = urllib.parse.urlsplit(self.base).netloc
        headers = [("Host", netloc), ("Accept", "application/json"), ("User-Agent", f"tokenomics/{__version__}")]
        if self.api_key:
            headers.append(("Authorization", f"Bearer {self.api_key}"))
        if body:
            headers.append(("Content-Type", "application/json"))
            headers.append(("Content-Length", str(len(body))))
        return headers

    async def _exchange(self, method: str, path: str, payload: dict | None = None) -> tuple[int, bytes]:
        """(status, body) of one request to the server; RuntimeFailure when it cannot be had.
        Redirects are errors: the API key must not be re-sent elsewhere."""
        body = json.dumps(payload).encode() if payload is not None else b""
        try:
            async with _deadline(SYNC_TIMEOUT):
                resp = await self.client.request(method, self.base + path, self._headers(body), body,
                                                 SYNC_TIMEOUT, insecure=self.insecure, secret=self.api_key)
                data = await resp.read()
        except TimeoutError:
            raise RuntimeFailure(f"no complete answer within {SYNC_TIMEOUT:g} s") from None
        except ProxyError as err:
            if err.code == "upstream_redirect":
                raise RuntimeFailure("the server answered with a redirect; redirects are not followed (check "
                                     "remote.url)") from None
            if err.code == "upstream_response_too_large":
                raise RuntimeFailure(f"the answer is over {MAX_SYNC_BYTES} bytes; it was dropped") from None
            raise RuntimeFailure(err.message.replace("the upstream", "the server")) from None
        if resp.status in (401, 403):
            raise RuntimeFailure(f"the server refused the API key ({resp.status}); check remote.api_key_env "
                                 "against the server's --api-key-env")
        return resp.status, data

    def _apply(self, data: bytes) -> tuple[bool, int]:
        """Parse, validate and mirror a pulled answer (in a worker thread: big lists and policy
        validation must not stall the proxy's requests)."""
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            raise RuntimeFailure("the answer is not JSON") from None
        pulled = parse_pulled(doc, self.store.catalog, self.config.dir, self.store.hash_key)
        return self.store.mirror(pulled), len(pulled)

    async def pull(self) -> bool:
        """One sync; True when the store now mirrors the server. Never raises for a server
        that is down or hostile: that keeps the last good copy and is logged."""
        try:
            status, data = await self._exchange("GET", "/api/v1/tokens")
            if status != 200:
                raise RuntimeFailure(f"GET /api/v1/tokens answered {status}")
            changed, count = await asyncio.to_thread(self._apply, data)
        except TokenomicsError as exc:
            self.failures += 1
            if str(exc) != self._last_error:
                log.warning("remote sync from %s failed, keeping the last good copy (%d tokens): %s",
                            self.origin, len(self.store.records()), exc)
            self._last_error = str(exc)
            return False
        except OSError as exc:  # writing tokens.json (disk full, permissions)
            self.failures += 1
            log.error("remote sync: cannot write the local copy of the tokens: %s", exc.strerror or exc)
            return False
        if self._last_error:
            log.info("remote sync from %s works again", self.origin)
        self._last_error = ""
        self.pulls += 1
        self.last_ok = self.clock()
        if changed:
            log.info("remote sync: %d tokens from %s", count, self.origin)
        return True

    async def register(self) -> bool:
        """Register remote.webhook.callback_url with the server; False to try again later."""
        hook = self.config.remote.webhook
        try:
            status, data = await self._exchange("POST", "/api/v1/clients", {
                "url": hook.callback_url, "secret": hook.secret, "signing_key": hook.signing_key,
                "insecure": hook.insecure})
        except TokenomicsError as exc:
            log.warning("remote: registering the push callback with %s failed, will retry: %s", self.origin, exc)
            return False
        if status in (200, 201):
            self.registering = False
            log.info("remote: push callback registered with %s", self.origin)
            return True
        try:
            message = json.loads(data)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"status {status}"
        if 400 <= status < 500 and status != 429:
            self.registering = False  # our request is wrong; repeating it will not help
            log.error("remote: the server refused the push callback registration: %s", str(message)[:300])
        else:
            log.warning("remote: registering the push callback answered %d, will retry", status)
        return False

    # -- background task --------------------------------------------------------------------
    def poke(self) -> None:
        """A verified push arrived: pull soon (a burst of pokes makes one pull)."""
        self._wake.set()

    async def start(self) -> None:
        """The pull at start, bounded so that a silent server cannot delay the proxy's start by
        more than START_PULL_TIMEOUT; the proxy serves its last copy if it fails."""
        try:
            await asyncio.wait_for(self.pull(), START_PULL_TIMEOUT)
        except TimeoutError:
            log.warning("remote sync from %s: no answer within %g s at start; serving the last good copy "
                        "and retrying in the background", self.origin, START_PULL_TIMEOUT)

    async def run(self) -> None:
        """The sync task: restarted after a crash, so that a bug costs a log line, not the sync."""
        while True:
            try:
                await self._loop()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.restarts += 1
                log.exception("remote sync task failed; restarting it in %g s", RESTART_DELAY)
                await asyncio.sleep(RESTART_DELAY)

    async def _loop(self) -> None:
        while True:
            if self.registering:
                await self.register()
            pending = self.last_ok is None or self.registering
            wait = self.interval if self.interval > 0 else None
            if pending:
                wait = min(wait or START_RETRY, START_RETRY)
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
                await asyncio.sleep(PUSH_DEBOUNCE)  # let the rest of the burst arrive
            except TimeoutError:
                pass
            self._wake.clear()
            await self.pull()

    def close(self) -> None:
        self.client.close()

    async def probe(self) -> tuple[str, str]:
        """For `doctor`: (ok|fail, what was found)."""
        try:
            status, data = await self._exchange("GET", "/api/v1/tokens")
            if status != 200:
                return "fail", f"{self.origin} answered {status} to GET /api/v1/tokens"
            doc = json.loads(data)
            pulled = parse_pulled(doc, self.store.catalog, self.config.dir, self.store.hash_key)
        except ValueError:
            return "fail", f"{self.origin} did not answer with JSON; is remote.url a tokenomics remote server?"
        except TokenomicsError as exc:
            return "fail", f"{self.origin}: {exc}"
        finally:
            self.close()
        auth = "API key accepted" if self.api_key else "no API key (loopback)"
        return "ok", f"{self.origin} answers, {auth}, {len(pulled)} tokens"


class PushReceiver:
    """The proxy's endpoint for push notifications at remote.webhook.path: the shared secret
    and the HMAC signature are checked in constant time, the timestamp must be within
    PUSH_MAX_SKEW seconds and the nonce new; a valid push calls `on_push` (a re-sync)."""

    def __init__(self, hook: RemoteWebhookConfig, on_push: Callable[[], None], clock: Callable[[], float] = time.time):
        self.path = hook.path
        self.secret = hook.secret.encode("utf-8")
        self.signing_key = hook.signing_key
        self.on_push, self.clock = on_push, clock
        self._nonces: "collections.OrderedDict[str, float]" = collections.OrderedDict()
        self.accepted = self.refused = 0

    def _refuse(self, status: int, code: str, message: str, headers: dict | None = None) -> Response:
        self.refused += 1
        return error_response("openai", ProxyError(status, code, message, headers))

    def _signed(self, sig: str, timestamp: str, nonce: str, body: bytes) -> bool:
        given = sig.strip().removeprefix("sha256=").lower().encode("ascii", "replace")
        ok = False
        for message in (f"{timestamp}.{nonce}.".encode() + body, f"{timestamp}{nonce}".encode() + body):
            expected = hmac.new(self.signing_key.encode("utf-8"), message, hashlib.sha256).hexdigest().encode()
            ok |= hmac.compare_digest(given, expected)
        return ok

    def _remember(self, nonce: str, timestamp: int, now: float) -> bool:
        """Record a verified nonce until its timestamp is out of the window; False when the
        memory is full of live nonces (more pushes than a server sends in PUSH_MAX_SKEW)."""
        if len(self._nonces) >= PUSH_NONCES:
            for key in [k for k, until in self._nonces.items() if until < now]:
                del self._nonces[key]
            if len(self._nonces) >= PUSH_NONCES:
                return False
        self._nonces[nonce] = timestamp + PUSH_MAX_SKEW + 1
        return True

    async def __call__(self, req: Request) -> Response:
        if req.method != "POST":
            return self._refuse(405, "method_not_allowed", f"{self.path} accepts POST only (push notifications "
                                "from the token server)", {"Allow": "POST"})
        if len(req.body) > PUSH_MAX_BODY:
            return self._refuse(413, "request_too_large", f"a push notification is at most {PUSH_MAX_BODY} bytes")
        h = req.headers
        if self.secret:
            given = (h.get(SECRET_HEADER) or h.get("x-webhook-secret") or "").encode("utf-8", "replace")
            if not hmac.compare_digest(given, self.secret):
                return self._refuse(401, "invalid_signature", "the push does not carry the shared secret "
                                    "(remote.webhook.secret)")
        sig, timestamp, nonce = h.get(SIGNATURE_HEADER, ""), h.get(TIMESTAMP_HEADER, "").strip(), \
            h.get(NONCE_HEADER, "").strip()
        if not sig or not (timestamp.isdigit() and len(timestamp) <= 12) or not _NONCE_RE.fullmatch(nonce):
            return self._refuse(401, "invalid_signature", "the push is not signed: it needs X-Tokenomics-Signature, "
                                "X-Tokenomics-Timestamp and X-Tokenomics-Nonce")
        now = self.clock()
        if abs(now - int(timestamp)) > PUSH_MAX_SKEW:
            return self._refuse(401, "stale_timestamp", f"the push's timestamp is more than {PUSH_MAX_SKEW} s "
                                "away from this proxy's clock; check both clocks (NTP)")
        if not self._signed(sig, timestamp, nonce, req.body):
            return self._refuse(401, "invalid_signature", "the push's signature does not verify with "
                                "remote.webhook.signing_key")
        if nonce in self._nonces:
            return self._refuse(401, "replayed_push", "this push was received before (its nonce was seen); "
                                "it is not applied twice")
        if not self._remember(nonce, int(timestamp), now):
            return self._refuse(503, "overloaded", "too many pushes; retry in a moment", {"Retry-After": "5"})
        self.accepted += 1
        self.on_push()
        return json_response(202, {"status": "accepted"})
