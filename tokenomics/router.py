"""Routing: which handler answers a request target, and who may reach the operator routes
(/stats, /metrics, /admin). The governed story of a /v1 request stays in `Pipeline`.

Routes are a table: exact paths and path prefixes, each with the methods it answers and its
handler. Anything that adds a route (the admin app, a remote-sync webhook) calls `add`."""

import base64
import contextlib
import hmac
import ipaddress
from dataclasses import dataclass
from typing import Awaitable, Callable, TYPE_CHECKING

from . import __version__
from .config import Config
from .dialects import dialect_family
from .errors import ProxyError
from .http.server import Request, Response, error_response, json_response
from .policy import resolve_policy
from .util import new_id, non_canonical

if TYPE_CHECKING:  # names used in annotations only
    from .pipeline import Pipeline


Handler = Callable[[Request], Awaitable[Response]]


ADMIN_PREFIX = "/admin"


METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Route:
    """One entry of the table: `path` exactly, or everything below it when `prefix`."""
    path: str
    handler: Handler
    methods: tuple = ()       # empty: the handler checks methods itself
    prefix: bool = False
    refused: int = 400        # status for a non-canonical target below it (a file route says 404)


def is_loopback_client(req: Request) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(req.client).is_loopback
    return False


def basic_auth_ok(config: Config, req: Request) -> bool:
    """The request carries the configured admin.auth credentials (compared in constant time)."""
    auth = config.admin.auth
    header = req.headers.get("authorization", "")
    if not (auth.username and auth.password and header[:6].lower() == "basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    return hmac.compare_digest(user.encode(), auth.username.encode()) & \
        hmac.compare_digest(password.encode(), auth.password.encode())


def admin_allowed(config: Config, req: Request) -> bool:
    """/stats and /metrics: loopback clients, or anyone with the configured basic-auth credentials."""
    return is_loopback_client(req) or basic_auth_ok(config, req)


def _forbidden(path: str) -> Response:
    return error_response("openai", ProxyError(403, "forbidden", f"{path} is served to loopback clients, or "
                                               "with the admin credentials"))


class Router:
    """The server's handler: canonical-path check, then the first matching route of the table.
    It receives the pipeline (the /v1 story) and, when admin is enabled, the admin app."""

    def __init__(self, pipeline: "Pipeline", admin: "Handler | None" = None):
        self.pipeline = pipeline
        self.config: Config = pipeline.config
        self.admin = admin
        self._exact: dict[str, Route] = {}
        self._prefixes: list[Route] = []
        for path in ("/health", "/ping"):
            self.add(Route(path, self.health))
        self.add(Route("/stats", self.stats, ("GET", "HEAD")))
        self.add(Route("/metrics", self.metrics, ("GET", "HEAD")))
        self.add(Route("/", self.root))
        self.add(Route("/v1/models", self.models, ("GET", "HEAD")))
        if admin is not None:
            self.add(Route(ADMIN_PREFIX, admin, prefix=True, refused=404))
        self.add(Route("/v1/", pipeline, prefix=True))

    def add(self, route: Route) -> None:
        """Add a route; prefix routes are tried longest first, after the exact ones."""
        if route.prefix:
            self._prefixes.append(route)
            self._prefixes.sort(key=lambda r: len(r.path), reverse=True)
        else:
            self._exact[route.path] = route

    def match(self, path: str) -> Route | None:
        route = self._exact.get(path)
        if route is not None:
            return route
        for route in self._prefixes:  # "/admin" answers itself and below; "/v1/" only below
            below = route.path if route.path.endswith("/") else route.path + "/"
            if path.startswith(below) or path == route.path:
                return route
        return None

    async def __call__(self, req: Request) -> Response:
        path = req.path
        why = non_canonical(path, req.query)
        if why:  # before anything else: no route, no auth, no upstream, no charge
            route = self.match(path)
            if route is not None and route.refused == 404:
                return error_response("openai", ProxyError(404, "not_found", f"no such page: the target {why}"))
            return error_response(dialect_family(path), ProxyError(
                400, "invalid_request", f"the request target {why}; send the path in canonical form "
                                        "(as the API reference spells it, query string after '?')"))
        route = self.match(path or "/")
        if route is None:
            return error_response("openai", ProxyError(404, "not_found", f"no route for {req.method} {path}; "
                                                       "the proxy serves /v1/... and /health"))
        if route.methods and req.method not in route.methods:
            allow = ", ".join(route.methods)
            response = error_response(dialect_family(path), ProxyError(
                405, "method_not_allowed", f"{path} accepts {allow} only; send the request with "
                                           f"{route.methods[0]}", headers={"Allow": allow}))
            if path.startswith("/v1/"):
                response.headers.append(("x-tokenomics-request-id", new_id("req_")))
            return response
        return await route.handler(req)

    # -- the small routes ---------------------------------------------------------------------
    async def health(self, req: Request) -> Response:
        return json_response(200, {"status": "ok"})

    async def root(self, req: Request) -> Response:
        if req.method not in ("GET", "HEAD"):
            return error_response("openai", ProxyError(404, "not_found", f"no route for {req.method} /; "
                                                       "the proxy serves /v1/... and /health"))
        if req.method == "GET" and self.admin is not None:
            return Response(302, [("location", ADMIN_PREFIX), ("content-type", "text/plain; charset=utf-8")],
                            b"the admin page is at /admin\n")
        return json_response(200, {"name": "tokenomics", "version": __version__})

    async def stats(self, req: Request) -> Response:
        if not admin_allowed(self.config, req):
            return _forbidden(req.path)
        return json_response(200, self.pipeline.records.stats.snapshot())

    async def metrics(self, req: Request) -> Response:
        if not admin_allowed(self.config, req):
            return _forbidden(req.path)
        return Response(200, [("content-type", METRICS_CONTENT_TYPE)],
                        self.pipeline.records.metrics.render().encode())

    async def models(self, req: Request) -> Response:
        """GET /v1/models: the models the token may use, in the OpenAI list shape."""
        try:
            response = json_response(200, self.models_list(req))
        except ProxyError as err:
            response = error_response("openai", err)
        response.headers.append(("x-tokenomics-request-id", new_id("req_")))
        return response

    def models_list(self, req: Request) -> dict:
        pipeline = self.pipeline
        policy = pipeline.authenticate(req).policy
        config, catalog = self.config, pipeline.catalog
        names = {pp.name for pp in policy.providers} | {policy.provider or config.default_provider or "openai"}
        if not policy.providers and not policy.provider:
            names.add("anthropic")
        candidates: dict[str, str] = {}
        for name in sorted(names):
            try:
                provider = catalog.get(name)
            except KeyError as exc:  # UnknownProvider named by the policy or config
                raise ProxyError(500, "invalid_request", f"{exc}; fix the token's policy or the config") from None
            for m in provider.models:
                candidates.setdefault(m, name)
        for pp in (policy,) + policy.providers:
            if pp.model:
                candidates.setdefault(pp.model, pp.name or policy.provider or "openai")
        data = []
        for model_id, owner in candidates.items():
            try:
                resolve_policy(policy, model_id, catalog, config)
            except ProxyError:
                continue
            data.append({"id": model_id, "object": "model", "type": "model", "created": 0,
                         "created_at": "1970-01-01T00:00:00Z", "owned_by": owner, "display_name": model_id})
        return {"object": "list", "data": data, "has_more": False,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
