"""`tokenomics provider`: list the catalog's providers and models, and test their connectivity and
credentials without spending tokens."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from ..errors import ProxyError, UsageError
from . import load, print_json, print_table

if TYPE_CHECKING:
    from ..http.client import UpstreamClient
    from ..providers import Catalog, Provider


def provider_key_presence(catalog: Catalog, environ=None) -> dict:
    environ = os.environ if environ is None else environ
    return {p.name: bool(environ.get(p.api_key_env)) for p in catalog.all() if p.api_key_env}


async def probe_provider(provider: Provider, client: UpstreamClient, environ, timeout: float = 10.0,
                         upstreams: dict | None = None) -> dict:
    """The cheapest authenticated request a provider answers (its model list): ok, auth
    failure or unreachable, with the latency. Spends no tokens. The upstream is chosen as the
    pipeline chooses it; one that serves no passthrough path (the in-process mock) has no
    model list to ask and nothing to reach: it is built in."""
    import urllib.parse

    from ..http.upstreams import default_upstreams, upstream_for

    result = {"provider": provider.name, "status": "", "http_status": 0, "latency_ms": 0.0, "detail": ""}
    upstreams = default_upstreams(client) if upstreams is None else upstreams
    if not upstream_for(upstreams, provider.url(), client).serves_passthrough:
        return {**result, "status": "ok", "detail": "built in"}
    key = environ.get(provider.api_key_env, "") if provider.api_key_env else ""
    if provider.api_key_env and not key:
        return {**result, "status": "no_key", "detail": f"{provider.api_key_env} is not set"}
    if not provider.url():
        return {**result, "status": "unreachable", "detail": f"no URL: set {provider.base_url_env}"}
    auth, query = provider.credentials(key)
    url = provider.endpoint(provider.url(), "/v1/models", query)
    headers = [("host", urllib.parse.urlsplit(url).netloc), ("accept", "application/json")]
    headers += [(k, str(v)) for k, v in provider.headers.items()] + auth
    started = time.monotonic()
    try:
        upstream = await client.request("GET", url, headers, b"", timeout, insecure=provider.insecure)
        await upstream.read()
    except ProxyError as exc:
        return {**result, "status": "unreachable", "latency_ms": round((time.monotonic() - started) * 1000, 1),
                "detail": exc.message}
    latency = round((time.monotonic() - started) * 1000, 1)
    status = "ok" if upstream.status < 400 else "auth_failed" if upstream.status in (401, 403) else "error"
    return {**result, "status": status, "http_status": upstream.status, "latency_ms": latency,
            "detail": f"HTTP {upstream.status}"}


def cmd_provider(args) -> int:
    from ..providers import Catalog
    config = load(args)
    catalog = Catalog(config)
    if args.provider_cmd == "list":
        rows = [{"name": p.name, "dialect": p.dialect, "upstream_url": p.url(), "api_key_env": p.api_key_env,
                 "key_set": bool(os.environ.get(p.api_key_env)) if p.api_key_env else None,
                 "auth_scheme": p.auth_scheme, "models": len(p.models)} for p in catalog.all()]
        if args.json:
            print_json(rows)
        else:
            print_table([("PROVIDER", "DIALECT", "UPSTREAM", "KEY ENV", "KEY")] + [
                (r["name"], r["dialect"], r["upstream_url"] or "-", r["api_key_env"] or "-",
                 "-" if r["key_set"] is None else "set" if r["key_set"] else "missing") for r in rows])
        return 0
    if args.provider_cmd == "models":
        chosen = [catalog.get(args.name)] if args.name else catalog.all()
        rows = [{"provider": p.name, "model": m} for p in chosen for m in p.models]
        if args.json:
            print_json(rows)
        else:
            print_table([("PROVIDER", "MODEL")] + [(r["provider"], r["model"]) for r in rows])
        return 0
    names = args.names or [p.name for p in catalog.all() if p.api_key_env and os.environ.get(p.api_key_env)]
    if not names:
        raise UsageError("provider test: no provider key is set; name the providers to test")
    for name in names:
        catalog.get(name)  # UnknownProvider names close matches

    import asyncio

    from ..http.client import UpstreamClient

    async def run_all():
        from ..http.upstreams import default_upstreams

        client = UpstreamClient()
        upstreams = default_upstreams(client)
        try:
            return await asyncio.gather(*(probe_provider(catalog.get(n), client, os.environ, upstreams=upstreams)
                                          for n in names))
        finally:
            client.close()

    results = asyncio.run(run_all())
    if args.json:
        print_json(results)
    else:
        print_table([("PROVIDER", "STATUS", "LATENCY", "DETAIL")] + [
            (r["provider"], r["status"], f"{r['latency_ms']:.0f} ms" if r["latency_ms"] else "-", r["detail"])
            for r in results])
    return 0 if all(r["status"] == "ok" for r in results) else 1

