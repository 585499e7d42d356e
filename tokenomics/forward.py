"""Forwarding: one prepared request to the upstream that serves its base URL, with the real key
swapped in for the client's token, retried with backoff; the answer's headers as the client
gets them."""

import asyncio
import contextlib
import os
import secrets
import time
import urllib.parse
from typing import TYPE_CHECKING

from .dialects import Dialect
from .errors import ProxyError
from .http.client import Upstream, UpstreamCall, UpstreamResponse
from .http.sse import _deadline
from .http.upstreams import default_upstreams, upstream_for
from .providers import Provider

if TYPE_CHECKING:  # names used in annotations only
    from .http.server import Request
    from .policy import ResolvedPolicy
    from .records.exchange import Exchange


HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "proxy-connection",
})


# Client credentials: never forwarded, the real key is injected instead.
AUTH_HEADERS = frozenset({"authorization", "x-api-key", "x-goog-api-key", "api-key"})


_NOT_FORWARDED = frozenset(n.encode() for n in HOP_BY_HOP | AUTH_HEADERS | {"host", "content-length"})


_NOT_RELAYED = HOP_BY_HOP | {"content-length"}


RETRYABLE_CODES = frozenset({"upstream_unreachable", "upstream_timeout"})


MAX_RETRY_AFTER = 20.0      # seconds: a longer Retry-After is better answered by a fallback or the client


DISCARD_READ = 1.0          # seconds an answer that is not relayed is read for, so its connection is reused


def retry_delay(backoff: float, attempt: int, retry_after: str | None) -> float:
    """Exponential backoff with jitter (50-100% of backoff * 2^attempt); an upstream's
    Retry-After (seconds) wins when longer, capped at MAX_RETRY_AFTER."""
    delay = backoff * (2 ** attempt) * (0.5 + secrets.randbelow(1000) / 2000)
    if retry_after:
        with contextlib.suppress(ValueError):
            delay = max(delay, float(retry_after))
    return min(delay, MAX_RETRY_AFTER)


_RATE_LIMIT_HEADERS = (
    "x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens", "x-ratelimit-limit-requests", "x-ratelimit-limit-tokens",
    "anthropic-ratelimit-requests-remaining", "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-requests-reset", "anthropic-ratelimit-tokens-reset",
    "anthropic-ratelimit-input-tokens-remaining", "anthropic-ratelimit-output-tokens-remaining",
    "x-ratelimit-remaining", "retry-after")


def rate_limit_meta(headers: dict) -> dict:
    """The upstream's rate-limit headers (OpenAI, Azure, Anthropic), normalised to one dict."""
    found = {name: headers[name] for name in _RATE_LIMIT_HEADERS if name in headers}
    return {"rate_limit": found} if found else {}


def _strip_query_key(query: str) -> str:
    if "key=" not in query:
        return query
    return urllib.parse.urlencode([(k, v) for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True)
                                   if k != "key"])


class Forwarder:
    """Sends requests to upstreams: the upstream chosen by the base URL's scheme (the pooled
    client, the in-process mock), the address and headers built only for one on the network
    (the provider's key read from `environ` then, never before), retries with backoff."""

    def __init__(self, client: Upstream, upstreams: "dict[str, Upstream] | None" = None, environ=None):
        self.client = client
        self.upstreams = upstreams if upstreams is not None else default_upstreams(client)
        self.environ = os.environ if environ is None else environ

    def upstream_for(self, base_url: str) -> Upstream:
        """The upstream that serves a base URL (the pooled client when no scheme is known: it
        then reports the URL as unusable)."""
        return upstream_for(self.upstreams, base_url, self.client)

    async def forward(self, req: "Request", route: "ResolvedPolicy", payload: bytes, ex: "Exchange",
                      dialect: Dialect, body: dict) -> UpstreamResponse:
        """Send, retrying connection failures and `retry_on` statuses with exponential backoff
        and jitter (Retry-After honoured, capped). Nothing has reached the client yet."""
        retry = route.policy.retry
        for n in range(retry.max_retries + 1):
            started = time.monotonic()
            try:
                upstream = await self.send(req, route.provider, route.upstream_url, route.base_key_env,
                                           payload, route.timeout, ex, dialect, body)
            except ProxyError as err:
                if err.code not in RETRYABLE_CODES or n == retry.max_retries:
                    raise
                delay = retry_delay(retry.backoff, n, None)
            else:
                ex.upstream_latency_ms = round((time.monotonic() - started) * 1000, 3)
                if upstream.status not in retry.retry_on or n == retry.max_retries:
                    return upstream
                delay = retry_delay(retry.backoff, n, upstream.header_map.get("retry-after"))
                await self.discard(upstream)
            ex.retry_count += 1
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def send(self, req: "Request", provider: Provider, base_url: str, key_env: str, body: bytes,
                   timeout: float, ex: "Exchange", dialect: Dialect | None = None,
                   parsed: dict | None = None) -> UpstreamResponse:
        """Forward to the base URL's upstream with the real key swapped in."""
        def address() -> tuple[str, list, str, bool]:
            return self.upstream_address(req, provider, base_url, key_env, len(body), ex, dialect, parsed)
        call = UpstreamCall(req.method, req.path, body, timeout, ex.request_id, dialect, parsed, address)
        return await self.upstream_for(base_url).send(call)

    @staticmethod
    async def discard(upstream: UpstreamResponse) -> None:
        """Drop an answer we will not relay; read small ones so the connection can be reused."""
        try:
            async with _deadline(DISCARD_READ):
                await upstream.read()
        except (ProxyError, TimeoutError):
            upstream.close()

    def upstream_key(self, key_env: str) -> str:
        if not key_env:
            return ""
        key = self.environ.get(key_env, "")
        if not key:
            raise ProxyError(500, "upstream_key_missing", f"the provider key variable {key_env} is not set "
                                                          "on the proxy; set it and restart the proxy")
        return key

    def upstream_address(self, req: "Request", provider: Provider, base_url: str, key_env: str, body_len: int,
                         ex: "Exchange", dialect: Dialect | None, parsed: dict | None) -> tuple[str, list, str, bool]:
        """(url, headers, key, insecure) of a request to a network upstream."""
        if not base_url:
            hint = f"set {provider.base_url_env}" if provider.base_url_env else "set upstream_url in the policy"
            raise ProxyError(502, "upstream_unreachable", f"provider '{provider.name}' has no upstream URL; "
                                                          f"{hint} on the proxy")
        key = self.upstream_key(key_env)
        auth, query = provider.credentials(key, _strip_query_key(req.query))
        path = req.path
        if dialect and path != dialect.path:  # translated: the upstream's own endpoint
            path = dialect.path
        url = provider.endpoint(base_url, path, query, (parsed or {}).get("model", "") if dialect else "")
        host = urllib.parse.urlsplit(url).netloc
        headers = self.upstream_headers(req, provider, auth, ex, body_len, host, translated=path != req.path)
        return url, headers, key, provider.insecure

    @staticmethod
    def upstream_headers(req: "Request", provider: Provider, auth: list, ex: "Exchange", body_len: int,
                         host: str, translated: bool = False) -> list:
        headers = [("host", host)]
        sent = set()
        for name, value in req.raw_headers:
            lower = name.lower()
            if lower in _NOT_FORWARDED or lower == b"accept-encoding":
                continue
            if translated and lower.startswith((b"anthropic-", b"openai-")):
                continue  # the other provider's protocol headers mean nothing (or harm) upstream
            sent.add(lower)
            headers.append((name, value))
        for name, value in provider.headers.items():
            if name.lower().encode("latin-1") not in sent:
                headers.append((name, str(value)))
        headers += auth
        # Uncompressed answers only (passthrough too): the key is redacted from, and the size limit
        # applies to, bytes the proxy can read; a body it cannot decode could hide either.
        headers.append(("accept-encoding", "identity"))
        headers.append(("x-client-request-id", ex.request_id))
        headers.append(("content-length", str(body_len)))
        return headers

    @staticmethod
    def client_headers(upstream: UpstreamResponse, ex: "Exchange", decoded: bool) -> list:
        """The upstream answer's headers as the client gets them: hop-by-hop and length dropped
        (the server frames the answer), the model the proxy chose added."""
        out = []
        for name, value in upstream.headers:
            key = name.decode("latin-1") if isinstance(name, bytes) else name
            lower = key.lower()
            if lower in _NOT_RELAYED or (decoded and lower == "content-encoding"):
                continue
            out.append((key, value.decode("latin-1") if isinstance(value, bytes) else value))
        ex.upstream_request_id = upstream.header_map.get("x-request-id") or upstream.header_map.get("request-id", "")
        if ex.model:
            out.append(("x-tokenomics-model", ex.model))
        return out
