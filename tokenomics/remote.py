"""The central token server (`tokenomics remote`): one data dir's token store served over REST
to the proxies of other hosts, and signed push notifications to the proxies that registered a
callback, so that a change reaches them at once (SPEC §12)."""

import asyncio
import contextlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import time
import urllib.parse
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

from . import __version__
from .config import Config, validate_webhooks
from .errors import ProxyError, RuntimeFailure, TokenomicsError, UsageError
from .http.client import UpstreamClient
from .http.server import HTTPServer, Request, Response, error_response, json_response
from .http.sse import _deadline
from .providers import Catalog
from .records.events import WebhookDispatcher, make_event
from .store import TokenRecord, TokenStore, hash_key_check, parse_expiry
from .sync import (MAX_LABEL_CHARS, NONCE_HEADER, SECRET_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER,
                   _is_loopback_host, push_signature)
from .tls import server_tls_context
from .util import HASH_PREFIX, MiB, log, non_canonical, rfc3339_ms, utc_iso, write_private


DEFAULT_REMOTE_KEY_ENV = "TOKENOMICS_REMOTE_KEY"
REMOTE_MAX_BODY = 1 * MiB       # a request body: a policy with many rules is a few KB
MAX_CLIENTS = 64                # registered push callbacks; a fleet bigger than this polls
MAX_URL_CHARS = 2048
MAX_KEY_CHARS = 256             # a client's secret or signing key
WATCH_INTERVAL = 0.25           # seconds between looks at tokens.json for changes by the CLI
PUSH_COALESCE = 0.1             # seconds a change waits for the rest of its burst: one push per burst
PUSH_TIMEOUT = 5.0              # seconds per push attempt
PUSH_RETRIES = 2                # retries after the first attempt
PUSH_BACKOFF = 0.5              # seconds before the first retry; doubles
PUSH_ANSWER_BYTES = 64 * 1024   # what is read of a callback's answer
GRACE_PERIOD = 5.0              # seconds in-flight API calls get on SIGTERM

_TOKEN_PATH = re.compile(r"/api/v1/tokens/([^/]+)")
_CLIENT_PATH = re.compile(r"/api/v1/clients/([^/]+)")
_HEX = re.compile(r"[0-9a-fA-F]{8,64}")


def parse_addr(value: str) -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT) of --addr."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]") if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535 or \
            (":" in host and not value.startswith("[")):
        raise UsageError(f"--addr: {value!r} is not HOST:PORT; e.g. --addr 127.0.0.1:9090 or --addr [::1]:9090")
    return host, int(port)


def _bind_is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def _forbidden_address(addr: "ipaddress.IPv4Address | ipaddress.IPv6Address") -> bool:
    """Where a push must never go: link-local (cloud metadata at 169.254.169.254, fe80::/10),
    unspecified and multicast addresses, also when written as IPv4-mapped IPv6."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_link_local or addr.is_unspecified or addr.is_multicast


async def _resolves_forbidden(host: str, port: int) -> str:
    """Why `host` may not be pushed to ("" when it may): a forbidden literal, a name that
    resolves to a forbidden address, or a name that does not resolve."""
    try:
        return "a link-local or metadata address" if _forbidden_address(ipaddress.ip_address(host)) else ""
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return "a name that does not resolve here"
    for info in infos:
        with contextlib.suppress(ValueError):
            if _forbidden_address(ipaddress.ip_address(info[4][0].split("%")[0])):
                return "a name that resolves to a link-local or metadata address"
    return ""


def _host_name(header: str) -> str:
    """The name in a Host header: `name`, `name:port`, `[v6]` or `[v6]:port`."""
    header = header.strip()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    if header.count(":") > 1:
        return ""  # an IPv6 literal must be bracketed
    return header.partition(":")[0]


def _bad(message: str, status: int = 400, code: str = "invalid_request") -> ProxyError:
    return ProxyError(status, code, message)


@dataclass(frozen=True, slots=True)
class Client:
    """A proxy that registered a push callback."""
    id: str
    url: str
    signing_key: str
    secret: str = ""
    insecure: bool = False
    created_at: str = ""

    def public(self) -> dict:
        return {"id": self.id, "url": self.url, "insecure": self.insecure, "created_at": self.created_at}


class ClientRegistry:
    """The registered callbacks, kept in {dir}/remote_clients.json (0600: it holds their signing
    keys) so that pushes survive a restart of the server. At most MAX_CLIENTS."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, "remote_clients.json")
        self._clients: dict[str, Client] = {}
        try:
            with open(self.path, "rb") as fh:
                doc = json.loads(fh.read() or b"{}")
        except FileNotFoundError:
            doc = {}
        except (OSError, ValueError) as exc:
            log.error("remote: %s is unreadable (%s); starting with no registered clients", self.path,
                      type(exc).__name__)
            doc = {}
        for entry in (doc.get("clients") if isinstance(doc, dict) else None) or ():
            try:
                client = Client(**{k: entry[k] for k in ("id", "url", "signing_key", "secret", "insecure",
                                                         "created_at")})
            except (KeyError, TypeError):
                continue
            if len(self._clients) < MAX_CLIENTS:
                self._clients[client.url] = client

    def all(self) -> list[Client]:
        return list(self._clients.values())

    def _save(self) -> None:
        write_private(self.path, json.dumps({"version": 1, "clients": [asdict(c) for c in self._clients.values()]},
                                            indent=1).encode() + b"\n")

    def register(self, url: str, signing_key: str, secret: str, insecure: bool, may_replace: bool) -> tuple[Client, bool]:
        """(the client, whether it is new). Re-registering a URL with the same keys is a no-op;
        with other keys it needs an authenticated server (else anyone on the host could take
        over another proxy's pushes)."""
        old = self._clients.get(url)
        if old is not None:
            same = hmac.compare_digest(old.signing_key.encode(), signing_key.encode()) & \
                hmac.compare_digest(old.secret.encode(), secret.encode())
            if same and old.insecure == insecure:
                return old, False
            if not same and not may_replace:
                raise _bad("this callback URL is already registered with another signing key; the server runs "
                           "without an API key, so registrations cannot be replaced (restart it with "
                           "--api-key-env, or use another URL)", 409, "client_exists")
            client = replace(old, signing_key=signing_key, secret=secret, insecure=insecure)
        else:
            if len(self._clients) >= MAX_CLIENTS:
                raise _bad(f"{MAX_CLIENTS} clients are registered already, the most this server keeps; let "
                           "further proxies poll (remote.sync) instead", 409, "too_many_clients")
            client = Client(id="cl_" + secrets.token_hex(8), url=url, signing_key=signing_key, secret=secret,
                            insecure=insecure, created_at=utc_iso(time.time()))
        self._clients[url] = client
        self._save()
        return client, old is None

    def remove(self, client_id: str) -> Client | None:
        for url, client in list(self._clients.items()):
            if hmac.compare_digest(client.id.encode(), client_id.encode()):
                del self._clients[url]
                self._save()
                return client
        return None


class Notifier:
    """Pushes one signed notification per burst of changes to every registered client, from a
    background task: an API call never waits on a push."""

    def __init__(self, registry: ClientRegistry, count: Callable[[], int]):
        self.registry, self.count = registry, count
        self.client = UpstreamClient(max_response_bytes=PUSH_ANSWER_BYTES)
        self._dirty = asyncio.Event()
        self.sent = self.failed = 0
        self._failing: set[str] = set()

    def changed(self) -> None:
        self._dirty.set()

    async def run(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(PUSH_COALESCE)
            self._dirty.clear()
            body = json.dumps({"id": "evt_" + secrets.token_hex(16), "type": "tokens.changed",
                               "timestamp": rfc3339_ms(time.time()), "data": {"tokens": self.count()}},
                              separators=(",", ":")).encode()
            await asyncio.gather(*(self._deliver(c, body) for c in self.registry.all()))

    async def _deliver(self, client: Client, body: bytes) -> bool:
        p = urllib.parse.urlsplit(client.url)
        origin = f"{p.scheme}://{p.netloc}"
        why = await _resolves_forbidden(p.hostname or "", p.port or (443 if p.scheme == "https" else 80))
        if why:
            log.warning("remote: push to %s skipped: it is %s", origin, why)
            return False
        reason = ""
        for attempt in range(PUSH_RETRIES + 1):
            if attempt:
                await asyncio.sleep(PUSH_BACKOFF * 2 ** (attempt - 1))
            timestamp, nonce = str(int(time.time())), secrets.token_hex(16)
            headers = [("Host", p.netloc), ("Content-Type", "application/json"),
                       ("User-Agent", f"tokenomics-remote/{__version__}"), (TIMESTAMP_HEADER, timestamp),
                       (NONCE_HEADER, nonce), (SIGNATURE_HEADER, push_signature(client.signing_key, timestamp,
                                                                                  nonce, body)),
                       ("Content-Length", str(len(body)))]
            if client.secret:
                headers.append((SECRET_HEADER, client.secret))
            try:
                async with _deadline(PUSH_TIMEOUT):
                    resp = await self.client.request("POST", client.url, headers, body, PUSH_TIMEOUT,
                                                     insecure=client.insecure, secret=client.signing_key)
                    await resp.read()
            except (TimeoutError, ProxyError) as exc:
                reason = getattr(exc, "code", "timeout")
                continue
            if 200 <= resp.status < 300:
                self.sent += 1
                if client.url in self._failing:
                    self._failing.discard(client.url)
                    log.info("remote: pushes to %s work again", origin)
                return True
            reason = f"status {resp.status}"
            if 400 <= resp.status < 500 and resp.status != 429:
                break  # refused (bad key, unknown path): repeating the same push will not help
        self.failed += 1
        if client.url not in self._failing:
            self._failing.add(client.url)
            log.warning("remote: push to %s failed (%s); that proxy picks the change up at its next sync",
                        origin, reason)
        return False

    def close(self) -> None:
        self.client.close()


def _parse_json(req: Request) -> dict:
    ctype = req.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype != "application/json":
        raise _bad("send the body as JSON with Content-Type: application/json", 415, "unsupported_media_type")

    def unique(pairs):
        obj = dict(pairs)
        if len(obj) != len(pairs):
            raise ValueError("duplicate key")
        return obj
    try:
        body = json.loads(req.body, object_pairs_hook=unique)
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise _bad("the request body is not valid JSON (UTF-8, each key once)") from None
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    return body


def _only(body: dict, known: tuple) -> None:
    for key in body:
        if key not in known:
            raise _bad(f"unknown field {key!r}; known fields: {', '.join(known)}")


def _label(body: dict) -> str | None:
    label = body.get("label")
    if label is not None and (not isinstance(label, str) or len(label) > MAX_LABEL_CHARS):
        raise _bad(f"label: expected a string of at most {MAX_LABEL_CHARS} characters")
    return label


class RemoteServer:
    """The REST API over one data dir's TokenStore: the same validation and events as the CLI's
    `token` commands. Bearer auth with the API key (constant-time); without a key only loopback
    clients naming a loopback Host are served (a DNS-rebinding page cannot name one)."""

    ROUTES = {"/api/v1/tokens": ("GET", "POST"), "/api/v1/clients": ("GET", "POST")}

    def __init__(self, config: Config, store: TokenStore, api_key: str, registry: ClientRegistry,
                 dispatcher: WebhookDispatcher | None = None, clock: Callable[[], float] = time.time):
        self.config, self.store, self.registry, self.clock = config, store, registry, clock
        self.api_key = api_key.encode("utf-8")
        self.dispatcher = dispatcher
        self.notifier = Notifier(registry, lambda: len(self.store.records()))

    async def __call__(self, req: Request) -> Response:
        try:
            return await self._route(req)
        except ProxyError as err:
            return error_response("openai", err)
        except TokenomicsError as exc:  # a store failure (unreadable file, wrong key): say it, no traceback
            log.error("remote: %s %s failed: %s", req.method, req.path, exc)
            return error_response("openai", ProxyError(500, "store_error", str(exc)))
        except Exception:
            log.exception("remote: %s %s failed", req.method, req.path)
            return error_response("openai", ProxyError(500, "internal_error", "the token server failed on this "
                                                       "request; see its log"))

    def _authorize(self, req: Request) -> None:
        if not self.api_key:
            if not _is_loopback_host(_host_name(req.headers.get("host", ""))):
                raise _bad("this server runs without an API key and answers only requests addressed to a "
                           "loopback name (localhost, 127.0.0.1, [::1])", 403, "forbidden")
            return
        header = req.headers.get("authorization", "")
        if not header:
            raise ProxyError(401, "missing_api_key", "send the server's API key as Authorization: Bearer KEY",
                             {"WWW-Authenticate": "Bearer"})
        given = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode("utf-8", "replace"), self.api_key):
            raise ProxyError(401, "invalid_api_key", "the API key is not this server's; check the key in "
                             "--api-key-env (default TOKENOMICS_REMOTE_KEY)", {"WWW-Authenticate": "Bearer"})

    async def _route(self, req: Request) -> Response:
        path, method = req.path, req.method
        why = non_canonical(path, req.query)
        if why:
            raise _bad(f"the request target {why}; send the path in canonical form")
        if path == "/health" and method in ("GET", "HEAD"):
            return json_response(200, {"status": "ok", "version": __version__})
        if not path.startswith("/api/v1/"):
            raise _bad(f"no route for {method} {path}; the token server serves /api/v1/tokens, "
                       "/api/v1/clients and /health", 404, "not_found")
        self._authorize(req)
        self.store.refresh(self.clock())
        if path in self.ROUTES:
            methods = self.ROUTES[path]
        elif _TOKEN_PATH.fullmatch(path):
            methods = ("GET", "PUT", "DELETE")
        elif _CLIENT_PATH.fullmatch(path):
            methods = ("DELETE",)
        else:
            raise _bad(f"no route for {method} {path}", 404, "not_found")
        if method not in methods:
            raise ProxyError(405, "method_not_allowed", f"{path} accepts {', '.join(methods)}",
                             {"Allow": ", ".join(methods)})
        if path == "/api/v1/tokens":
            return self.list_tokens() if method == "GET" else self.create_token(_parse_json(req))
        if path == "/api/v1/clients":
            return self.list_clients() if method == "GET" else await self.register_client(_parse_json(req))
        if m := _TOKEN_PATH.fullmatch(path):
            record = self._find(m.group(1))
            if method == "GET":
                return json_response(200, record.to_json(self.clock()))
            if method == "PUT":
                return self.update_token(record, _parse_json(req))
            return self.delete_token(record)
        client = self.registry.remove(_CLIENT_PATH.fullmatch(path).group(1))
        if client is None:
            raise _bad("no registered client has this id", 404, "not_found")
        return json_response(200, {"deleted": client.id})

    # -- tokens --------------------------------------------------------------------------------
    def _find(self, prefix: str) -> TokenRecord:
        if not _HEX.fullmatch(prefix):
            raise _bad("give the token's hash (or a unique prefix of 8+ hex characters), not the token")
        prefix = prefix.lower()
        found = [r for r in self.store.records() if r.hash.startswith(prefix)]
        if not found:
            raise _bad(f"no token matches hash prefix {prefix}", 404, "not_found")
        if len(found) > 1:
            raise _bad(f"hash prefix {prefix} is ambiguous ({len(found)} tokens); give more characters", 409,
                       "ambiguous_hash")
        return found[0]

    def _expiry(self, value: Any, allow_clear: bool) -> Any:
        if value is None or (allow_clear and isinstance(value, str) and value.lower() in ("clear", "never", "none")):
            return None
        if not isinstance(value, str):
            raise _bad("expires: expected a duration (24h, 7d, 30d, 1y) or an RFC 3339 time")
        try:
            return parse_expiry(value, self.clock(), "expires")
        except UsageError as exc:
            raise _bad(str(exc)) from None

    def _event(self, type_: str, record: TokenRecord) -> None:
        self.notifier.changed()
        if self.dispatcher is not None:
            self.dispatcher.emit(make_event(type_, {
                "token_hash": record.hash[:HASH_PREFIX], "label": record.label,
                "expires_at": utc_iso(record.expires_at) if record.expires_at else None,
                "metadata": record.policy.metadata}, self.clock()))

    def list_tokens(self) -> Response:
        now = self.clock()
        tokens = [r.to_json(now) for r in self.store.records()]
        return json_response(200, {"tokens": tokens, "count": len(tokens),
                                   "hash_key_check": hash_key_check(self.store.hash_key)})

    def create_token(self, body: dict) -> Response:
        _only(body, ("policy", "label", "expires"))
        policy = body.get("policy")
        if not isinstance(policy, dict):
            raise _bad("policy: expected a JSON object (the token's policy; {} allows everything)")
        expires = self._expiry(body.get("expires"), allow_clear=False)
        try:
            token, record = self.store.create(policy, expires, _label(body) or "")
        except UsageError as exc:
            raise _bad(str(exc)) from None
        self._event("token.created", record)
        return json_response(201, {"token": token, "hash": record.hash,
                                   "expires_at": utc_iso(record.expires_at) if record.expires_at else None})

    def update_token(self, record: TokenRecord, body: dict) -> Response:
        _only(body, ("policy", "label", "expires"))
        if not body:
            raise _bad("nothing to change; give policy, label or expires")
        policy = body.get("policy")
        if "policy" in body and not isinstance(policy, dict):
            raise _bad("policy: expected a JSON object")
        expires = self._expiry(body["expires"], allow_clear=True) if "expires" in body else ...
        try:
            updated = self.store.update(record.hash, policy, expires, _label(body))
        except UsageError as exc:
            raise _bad(str(exc)) from None
        except RuntimeFailure as exc:
            raise _bad(str(exc), 404, "not_found") from None
        self._event("token.updated", updated)
        return json_response(200, updated.to_json(self.clock()))

    def delete_token(self, record: TokenRecord) -> Response:
        try:
            self.store.delete(record.hash)
        except RuntimeFailure as exc:
            raise _bad(str(exc), 404, "not_found") from None
        self._event("token.deleted", record)
        return json_response(200, {"deleted": record.hash})

    # -- clients -------------------------------------------------------------------------------
    def list_clients(self) -> Response:
        return json_response(200, {"clients": [c.public() for c in self.registry.all()]})

    async def register_client(self, body: dict) -> Response:
        _only(body, ("url", "signing_key", "secret", "insecure"))
        url = body.get("url")
        if not isinstance(url, str) or len(url) > MAX_URL_CHARS:
            raise _bad("url: expected the proxy's push URL, e.g. http://10.0.0.7:8080/v1/webhook")
        try:
            p = urllib.parse.urlsplit(url)
            port = p.port
        except ValueError:
            raise _bad("url: not a valid URL (check the port)") from None
        if p.scheme not in ("http", "https") or not p.hostname:
            raise _bad("url: expected an http:// or https:// URL with a host")
        if "@" in p.netloc:
            raise _bad("url: credentials in the URL are refused; the push is signed with signing_key instead")
        if p.fragment or any(ord(c) < 33 or ord(c) == 127 for c in url):
            raise _bad("url: remove the fragment and any spaces or control characters")
        why = await _resolves_forbidden(p.hostname, port or (443 if p.scheme == "https" else 80))
        if why:
            raise _bad(f"url: pushes are not sent to {why}")
        signing_key, secret, insecure = body.get("signing_key"), body.get("secret") or "", body.get("insecure", False)
        if not isinstance(signing_key, str) or not signing_key or len(signing_key) > MAX_KEY_CHARS:
            raise _bad(f"signing_key: required, a string of at most {MAX_KEY_CHARS} characters (the proxy's "
                       "remote.webhook.signing_key)")
        if not isinstance(secret, str) or len(secret) > MAX_KEY_CHARS:
            raise _bad(f"secret: expected a string of at most {MAX_KEY_CHARS} characters")
        if not isinstance(insecure, bool):
            raise _bad("insecure: expected true or false")
        client, new = self.registry.register(url, signing_key, secret, insecure, may_replace=bool(self.api_key))
        if new:
            log.info("remote: registered push client %s (%s://%s)", client.id, p.scheme, p.netloc)
        return json_response(201 if new else 200, client.public())

    # -- background ----------------------------------------------------------------------------
    async def watch(self) -> None:
        """Changes made by `tokenomics token ... --dir` on this data dir are pushed too."""
        seen = self.store.version
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            self.store.refresh(self.clock())
            if self.store.version != seen:
                seen = self.store.version
                self.notifier.changed()


def remote_key(environ, env_name: str | None, host: str) -> str:
    """The API key from --api-key-env (default TOKENOMICS_REMOTE_KEY). Without one only a
    loopback address may be served: the token list is what every proxy trusts."""
    name = env_name or DEFAULT_REMOTE_KEY_ENV
    key = environ.get(name, "")
    if key:
        return key
    if env_name:
        raise UsageError(f"--api-key-env: {name} is not set; export the API key in it")
    if not _bind_is_loopback(host):
        raise UsageError(f"--addr {host}: serving tokens beyond this machine needs an API key; set "
                         f"{DEFAULT_REMOTE_KEY_ENV} (or name another variable with --api-key-env), or bind to "
                         "127.0.0.1")
    log.warning("remote: %s is not set: no API key; only loopback clients are served", name)
    return ""


async def serve_remote(config: Config, host: str, port: int, api_key: str, tls: bool = False,
                       ready: Callable[[str], None] | None = None) -> None:
    """Run the token server until SIGINT/SIGTERM."""
    store = TokenStore(config, Catalog(config))
    webhooks = validate_webhooks(config.events.webhooks)
    dispatcher = WebhookDispatcher(webhooks) if webhooks else None
    app = RemoteServer(config, store, api_key, ClientRegistry(config.dir), dispatcher)
    context = server_tls_context(config) if tls else None
    if tls and context is None:
        raise UsageError("--tls: HTTPS needs the TLS extra: pip install 'tokenomics[tls]'")
    server = HTTPServer(app, max_body_bytes=REMOTE_MAX_BODY, max_connections=1024)
    try:
        listener = await server.listen(host, port, context)
    except OSError as exc:
        raise RuntimeFailure(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(app.notifier.run()), loop.create_task(app.watch())]
    if dispatcher is not None:
        tasks.append(loop.create_task(dispatcher.run()))
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bound = listener.sockets[0].getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    if ready is not None:
        ready(f"{'https' if context else 'http'}://{shown}:{bound}")
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.shutdown(GRACE_PERIOD)
        if dispatcher is not None:
            await dispatcher.close(timeout=3.0)
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        app.notifier.close()

