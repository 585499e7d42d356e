"""The admin app: who may reach /admin (loopback or basic auth, Host and Origin checks, the
X-Tokenomics-Admin header on changes), the embedded page, and the JSON API every tab reads.

Changes go through the same `TokenStore` writes as the CLI (same validation, so an invalid
policy is a 400 naming the JSON path) and emit the same token.* events."""

import asyncio
import importlib.resources
import ipaddress
import json
import os
import re
import time
import urllib.parse
from typing import Any, Callable, TYPE_CHECKING

from .. import __version__
from ..errors import ProxyError, RuntimeFailure, TokenomicsError, UsageError
from ..http.server import Request, Response, error_response, json_response
from ..limits.usage import budget_windows
from ..records.ledger import _when, load_sessions, row_figures
from ..records.ledger_report import find_session, parse_when, summarize
from ..records.rollup import Rollup
from ..router import ADMIN_PREFIX, basic_auth_ok, is_loopback_client
from ..util import HASH_PREFIX, TOKEN_PREFIX, log, parse_duration, parse_rfc3339, rfc3339_ms, utc_iso
from .feed import EventHub
from .memory import MemoryFiles

if TYPE_CHECKING:  # names used in annotations only
    from ..pipeline import Pipeline
    from ..store import TokenRecord


API = ADMIN_PREFIX + "/api"


MAX_API_BODY = 1024 * 1024      # bytes of a key create/update body: a policy with many rules is a few KB


MAX_SERIES_POINTS = 2000        # buckets in one analytics series (83 days by the hour)


# The page and its assets, by the name they are served under: nothing else is read from the package.
_ASSETS = {"index.html": "text/html; charset=utf-8", "app.css": "text/css; charset=utf-8",
           "app.js": "text/javascript; charset=utf-8"}


_SECURITY_HEADERS = [
    ("cache-control", "no-store"),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("content-security-policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    ("cross-origin-resource-policy", "same-origin"),
]


_MUTATING = frozenset({"POST", "PUT", "DELETE", "PATCH"})


_HASH_PREFIX_RE = re.compile(r"[0-9a-f]{8,64}")


def _asset(name: str) -> bytes:
    return importlib.resources.files(__package__).joinpath("assets", name).read_bytes()


def _refuse(status: int, code: str, message: str, headers: dict | None = None) -> ProxyError:
    return ProxyError(status, code, message, headers=headers)


def _host_name(host: str) -> str:
    """The host of a Host header (no port, no brackets), lower-case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def loopback_name(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def parse_expires(value: Any, now: float) -> float | None:
    """`expires` of a key create/update: a duration from now (24h, 7d, 30d, 1y) or an RFC 3339
    time in the future; null, "", "clear" or "never" for none."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "clear", "never", "none")):
        return None
    if not isinstance(value, str):
        raise UsageError("expires: expected a string such as \"30d\" or \"2026-12-31T23:59:59Z\", or null")
    try:
        when = now + parse_duration(value)
    except ValueError:
        try:
            when = parse_rfc3339(value)
        except ValueError:
            raise UsageError(f"expires: {value!r} is neither a duration (24h, 7d, 30d, 1y) nor an RFC 3339 "
                             "time (2026-12-31T23:59:59Z)") from None
    if when <= now:
        raise UsageError(f"expires: {value} is in the past; give a later time or a duration such as 30d")
    if when > now + 100 * 365.25 * 86400:
        raise UsageError(f"expires: {value} is more than 100 years away; leave it out for no expiry")
    return when


class AdminApp:
    """The handler of every /admin target. It receives the pipeline (store, state, records,
    config) and the event hub that feeds the live view."""

    def __init__(self, pipeline: "Pipeline", hub: EventHub | None = None, clock: Callable[[], float] = time.time):
        self.pipeline = pipeline
        self.config = pipeline.config
        self.store = pipeline.store
        self.hub = hub if hub is not None else EventHub()
        self.clock = clock
        self.started = clock()
        self.memory = MemoryFiles(self.config.dir)
        self._sessions_cache: tuple[Any, list] = (None, [])
        # (method, first path segment below /admin/api) -> handler(req, rest)
        self._api = {
            ("GET", "health"): self.health,
            ("GET", "analytics"): self.analytics,
            ("GET", "keys"): self.keys,
            ("POST", "keys"): self.keys_create,
            ("PUT", "keys"): self.keys_update,
            ("DELETE", "keys"): self.keys_delete,
            ("GET", "sessions"): self.sessions,
            ("GET", "memory"): self.memory_files,
            ("GET", "events"): self.events,
        }

    async def __call__(self, req: Request) -> Response:
        try:
            self.check_access(req)
            response = await self.dispatch(req)
        except ProxyError as err:
            response = error_response("openai", err)
        except TokenomicsError as err:  # a store or ledger problem the operator can act on
            response = error_response("openai", _refuse(500, "admin_error", str(err)))
        except Exception:
            log.exception("admin request %s %s failed", req.method, req.path)
            response = error_response("openai", _refuse(500, "internal_error", "the admin API failed on this "
                                                         "request; see the proxy log"))
        response.headers.extend(_SECURITY_HEADERS)
        return response

    # -- access ----------------------------------------------------------------------------------
    def check_access(self, req: Request) -> None:
        """Loopback only unless admin.auth is set, then basic auth on every route; without auth
        the Host must be a loopback name or the configured host (DNS rebinding); changes need
        X-Tokenomics-Admin: 1 and, from a browser, an Origin matching the Host."""
        auth = self.config.admin.auth
        host = req.headers.get("host", "")
        if auth.username and auth.password:
            if not basic_auth_ok(self.config, req):
                raise _refuse(401, "admin_auth_required", "the admin UI needs the admin.auth username and "
                              "password (HTTP basic auth)", {"WWW-Authenticate": 'Basic realm="tokenomics admin"'})
        else:
            if not is_loopback_client(req):
                raise _refuse(403, "forbidden", "the admin UI answers loopback clients only; open it on the "
                              "proxy's machine, or set admin.auth {username, password} in the config")
            name = _host_name(host)
            configured = _host_name(self.config.server.host)
            if not (loopback_name(name) or (name and name == configured and configured not in ("0.0.0.0", "::"))):
                raise _refuse(403, "forbidden", "the admin UI answers requests for localhost or a loopback "
                              "address only (this Host header names another site); open http://127.0.0.1:PORT/admin")
        if req.method in _MUTATING:
            if req.headers.get("x-tokenomics-admin", "").strip() != "1":
                raise _refuse(403, "admin_header_required", "changes through the admin API need the header "
                              "X-Tokenomics-Admin: 1")
            origin = req.headers.get("origin")
            if origin is not None and urllib.parse.urlsplit(origin).netloc.lower() != host.strip().lower():
                raise _refuse(403, "forbidden", "the request comes from another site (its Origin does not match "
                              "the Host); change keys from the admin page itself")
            if req.headers.get("sec-fetch-site", "").lower() == "cross-site":
                raise _refuse(403, "forbidden", "cross-site requests may not change keys")

    # -- routing ---------------------------------------------------------------------------------
    async def dispatch(self, req: Request) -> Response:
        path = req.path
        if path in (ADMIN_PREFIX, ADMIN_PREFIX + "/", ADMIN_PREFIX + "/index.html"):
            if req.method not in ("GET", "HEAD"):
                raise self._method(path, ("GET", "HEAD"))
            if path != ADMIN_PREFIX:
                return Response(302, [("location", ADMIN_PREFIX)])
            return Response(200, [("content-type", _ASSETS["index.html"])], _asset("index.html"))
        if path.startswith(ADMIN_PREFIX + "/assets/"):
            name = path[len(ADMIN_PREFIX + "/assets/"):]
            if name not in _ASSETS or name == "index.html":
                raise _refuse(404, "not_found", f"no admin asset {name!r}")
            if req.method not in ("GET", "HEAD"):
                raise self._method(path, ("GET", "HEAD"))
            return Response(200, [("content-type", _ASSETS[name])], _asset(name))
        if path.startswith(API + "/"):
            first, _, rest = path[len(API) + 1:].partition("/")
            handler = self._api.get((req.method, first))
            if handler is None:
                allowed = tuple(m for m, name in self._api if name == first)
                if allowed:
                    raise self._method(path, allowed)
                raise _refuse(404, "not_found", f"no admin API route {path}; see /admin/api/health")
            return await handler(req, rest)
        raise _refuse(404, "not_found", f"no admin page {path}; the admin UI is at /admin")

    @staticmethod
    def _method(path: str, methods: tuple) -> ProxyError:
        allow = ", ".join(methods)
        return _refuse(405, "method_not_allowed", f"{path} accepts {allow} only", {"Allow": allow})

    @staticmethod
    def _no_rest(rest: str, path: str) -> None:
        if rest:
            raise _refuse(404, "not_found", f"no admin API route {path}")

    @staticmethod
    def _query(req: Request) -> dict:
        return dict(urllib.parse.parse_qsl(req.query, keep_blank_values=True))

    @staticmethod
    def _body(req: Request) -> dict:
        if len(req.body) > MAX_API_BODY:
            raise _refuse(413, "request_too_large", f"the body is over {MAX_API_BODY} bytes")
        try:
            body = json.loads(req.body or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise _refuse(400, "invalid_request", "the body is not valid JSON; send a JSON object such as "
                          '{"policy": {}, "label": "ci"}') from None
        if not isinstance(body, dict):
            raise _refuse(400, "invalid_request", "the body must be a JSON object")
        return body

    # -- health and analytics -------------------------------------------------------------------
    async def health(self, req: Request, rest: str) -> Response:
        self._no_rest(rest, req.path)
        return json_response(200, {"status": "ok", "version": __version__,
                                   "uptime_s": round(self.clock() - self.started, 3),
                                   "backend": self.config.session.backend,
                                   "session_id": self.pipeline.records.session_id})

    def load_sessions(self) -> list:
        """The ledger's sessions, read again only when a session file changed."""
        directory = os.path.join(self.config.dir, "sessions")
        try:
            stamp = tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(directory)))
        except OSError:
            stamp = ()
        if stamp != self._sessions_cache[0]:
            self._sessions_cache = (stamp, load_sessions(self.config.dir))
        return self._sessions_cache[1]

    def _window(self, query: dict) -> tuple:
        now = self.clock()
        try:
            since = parse_when(query["since"], now, flag="since") if query.get("since") else None
            until = parse_when(query["until"], now, flag="until", end_of_day=True) if query.get("until") else None
        except UsageError as exc:
            raise _refuse(400, "invalid_request", str(exc)) from None
        return since, until

    async def analytics(self, req: Request, rest: str) -> Response:
        if rest != "summary":
            raise _refuse(404, "not_found", f"no admin API route {req.path}; try /admin/api/analytics/summary")
        query = self._query(req)
        bucket = query.get("bucket") or "hour"
        if bucket not in ("hour", "day"):
            raise _refuse(400, "invalid_request", f"bucket: {bucket!r} is not hour or day")
        since, until = self._window(query)
        sessions = await asyncio.to_thread(self.load_sessions)
        summary = summarize(sessions, since=since, until=until)
        labels = {r.hash[:HASH_PREFIX]: r.label for r in self.store.records()}
        for key, entry in summary["by_token"].items():
            entry["label"] = labels.get(key, "")
        summary["series"] = self.series(sessions, since, until, 3600 if bucket == "hour" else 86400)
        summary["bucket"] = bucket
        return json_response(200, summary)

    @staticmethod
    def series(sessions: list, since: float | None, until: float | None, size: int) -> list[dict]:
        points: dict[int, Rollup] = {}
        for session in sessions:
            for row in session.get("requests") or ():
                ts = _when(row.get("timestamp"))
                if ts is None or (since is not None and ts < since) or (until is not None and ts >= until):
                    continue
                t = int(ts - ts % size)
                roll = points.get(t)
                if roll is None:
                    roll = points[t] = Rollup()
                roll.add(row_figures(row))
        return [{"t": rfc3339_ms(t), "requests": roll.requests, "input_tokens": roll.count("input_tokens"),
                 "output_tokens": roll.count("output_tokens"), "cost_usd": round(roll.cost_usd, 9)}
                for t, roll in sorted(points.items())][-MAX_SERIES_POINTS:]

    # -- keys -------------------------------------------------------------------------------------
    def key_json(self, record: "TokenRecord", spent: dict, now: float) -> dict:
        windows = budget_windows(record, self.pipeline.state, now)
        budget: dict[str, dict] = {}
        for w in windows:
            if not w["scope"]:
                budget.setdefault(w["unit"], {})[w["period"]] = {k: w[k] for k in ("cap", "used", "left", "resets_at")}
        row = spent.get(record.hash[:HASH_PREFIX], {})
        return {**record.to_json(now), "usage": {"tokens": row.get("total_tokens", 0),
                                                 "requests": row.get("request_count", 0),
                                                 "cost_usd": row.get("cost_usd", 0.0),
                                                 "budget": budget, "windows": windows}}

    async def _spent(self) -> dict:
        sessions = await asyncio.to_thread(self.load_sessions)
        return summarize(sessions)["by_token"]

    def _find(self, rest: str) -> "TokenRecord":
        prefix = urllib.parse.unquote(rest).strip().lower()
        if prefix.startswith(TOKEN_PREFIX):
            raise _refuse(400, "invalid_request", "give the token's hash (or a prefix of 8+ characters), "
                          "not the token itself")
        if not _HASH_PREFIX_RE.fullmatch(prefix):
            raise _refuse(400, "invalid_request", "expected at least 8 hex characters of a token hash")
        self.store.refresh(self.clock())
        try:
            return self.store.find(prefix)
        except UsageError as exc:
            raise _refuse(400, "invalid_request", str(exc)) from None
        except RuntimeFailure as exc:
            status = 409 if "ambiguous" in str(exc) else 404
            raise _refuse(status, "not_found" if status == 404 else "ambiguous_hash", str(exc)) from None

    async def keys(self, req: Request, rest: str) -> Response:
        now = self.clock()
        spent = await self._spent()
        if rest:
            return json_response(200, self.key_json(self._find(rest), spent, now))
        self.store.refresh(now)
        return json_response(200, {"keys": [self.key_json(r, spent, now) for r in self.store.records()]})

    def _token_event(self, type_: str, record: "TokenRecord") -> None:
        self.pipeline.records.emit(type_, {
            "token_hash": record.hash[:HASH_PREFIX], "label": record.label,
            "expires_at": utc_iso(record.expires_at) if record.expires_at else None,
            "metadata": record.policy.metadata})

    @staticmethod
    def _fields(body: dict, allowed: tuple) -> None:
        unknown = sorted(set(body) - set(allowed))
        if unknown:
            raise _refuse(400, "invalid_request", f"{unknown[0]}: unknown field; send {', '.join(allowed)}")
        if "label" in body and not isinstance(body["label"], str):
            raise _refuse(400, "invalid_request", "label: expected a string")
        if "label" in body and len(body["label"]) > 200:
            raise _refuse(400, "invalid_request", "label: at most 200 characters")
        if "policy" in body and not isinstance(body["policy"], dict):
            raise _refuse(400, "invalid_request", "policy: expected a JSON object, e.g. {\"model_regex\": \"^gpt-4o\"}")

    async def keys_create(self, req: Request, rest: str) -> Response:
        self._no_rest(rest, req.path)
        body = self._body(req)
        self._fields(body, ("policy", "label", "expires"))
        now = self.clock()
        try:
            expires = parse_expires(body.get("expires"), now)
            token, record = await asyncio.to_thread(self.store.create, body.get("policy") or {}, expires,
                                                    body.get("label") or "")
        except UsageError as exc:  # names the JSON path of the bad policy field
            raise _refuse(400, "invalid_policy", str(exc)) from None
        self._token_event("token.created", record)
        return json_response(201, {"token": token, "hash": record.hash,
                                   "expires_at": record.to_json(now)["expires_at"]})

    async def keys_update(self, req: Request, rest: str) -> Response:
        record = self._find(rest)
        body = self._body(req)
        self._fields(body, ("policy", "label", "expires"))
        if not body:
            raise _refuse(400, "invalid_request", "nothing to change; send policy, label or expires")
        now = self.clock()
        try:
            expires = parse_expires(body["expires"], now) if "expires" in body else ...
            record = await asyncio.to_thread(self.store.update, record.hash, body.get("policy"), expires,
                                             body.get("label"))
        except UsageError as exc:
            raise _refuse(400, "invalid_policy", str(exc)) from None
        except RuntimeFailure as exc:
            raise _refuse(404, "not_found", str(exc)) from None
        self._token_event("token.updated", record)
        return json_response(200, self.key_json(record, await self._spent(), now))

    async def keys_delete(self, req: Request, rest: str) -> Response:
        record = self._find(rest)
        try:
            await asyncio.to_thread(self.store.delete, record.hash)
        except RuntimeFailure as exc:
            raise _refuse(404, "not_found", str(exc)) from None
        self._token_event("token.deleted", record)
        return json_response(200, {"deleted": record.hash})

    # -- sessions and memory --------------------------------------------------------------------
    async def sessions(self, req: Request, rest: str) -> Response:
        sessions = await asyncio.to_thread(self.load_sessions)
        if not rest:
            since, until = self._window(self._query(req))
            chosen = [s for s in sessions if (since is None or (_when(s.get("ended_at")) or _when(s.get("started_at"))
                                                                or 0.0) >= since)
                      and (until is None or (_when(s.get("started_at")) or 0.0) < until)]
            return json_response(200, [{k: v for k, v in s.items() if k != "requests"} for s in chosen])
        try:
            return json_response(200, find_session(sessions, urllib.parse.unquote(rest)))
        except UsageError as exc:
            raise _refuse(400, "invalid_request", str(exc)) from None
        except RuntimeFailure as exc:
            raise _refuse(404, "not_found", str(exc)) from None

    def _memory_specs(self) -> list[dict]:
        specs = [self.config.ledger.memory] if isinstance(self.config.ledger.memory, dict) else []
        for record in self.store.records():
            specs.append(record.policy.memory)
            specs.extend(pp.memory for pp in record.policy.providers if getattr(pp, "memory", None))
        return specs

    async def memory_files(self, req: Request, rest: str) -> Response:
        if rest == "files":
            files = await asyncio.to_thread(self.memory.listing, self._memory_specs())
            return json_response(200, {"files": files})
        if rest.startswith("files/"):
            try:
                text = await asyncio.to_thread(self.memory.read, rest[len("files/"):], self._memory_specs())
            except (ValueError, UnicodeDecodeError):
                text = None
            if text is None:
                raise _refuse(404, "not_found", "no such memory file; /admin/api/memory/files lists them")
            return Response(200, [("content-type", "text/plain; charset=utf-8"),
                                  ("content-security-policy", "sandbox")], text.encode("utf-8"))
        raise _refuse(404, "not_found", f"no admin API route {req.path}; try /admin/api/memory/files")

    async def events(self, req: Request, rest: str) -> Response:
        self._no_rest(rest, req.path)
        stream = self.hub.subscribe()
        if stream is None:
            raise _refuse(503, "overloaded", "too many live feeds are open; close another admin tab")
        return Response(200, [("content-type", "text/event-stream"), ("x-accel-buffering", "no")], stream=stream)
