"""Which upstream serves a base URL: chosen by the URL's scheme, once, in one place."""

from .client import Upstream
from .mock import MockUpstream


def default_upstreams(client: Upstream) -> dict[str, Upstream]:
    """The upstreams by scheme: the pooled client for http(s), the in-process mock for a
    mock:// base URL."""
    return {"http": client, "https": client, "mock": MockUpstream()}


def upstream_for(upstreams: dict[str, Upstream], base_url: str, default: Upstream) -> Upstream:
    """The upstream that serves `base_url` (`default` when no scheme is known: the pooled
    client then reports the URL as unusable)."""
    scheme = base_url.partition("://")[0].lower() if "://" in base_url else ""
    return upstreams.get(scheme) or default
