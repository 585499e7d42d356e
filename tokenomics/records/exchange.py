"""One exchange, from the request that came in to the answer that went out: what every record is
made from."""

from dataclasses import dataclass, field
from typing import Any, TYPE_CHECKING

if TYPE_CHECKING:  # names used in annotations only
    from ..limits.prices import Usage


@dataclass(slots=True)
class Exchange:
    """What is known about one proxied request as it moves through the pipeline; the records
    (ledger, logs, events) are written from this."""
    request_id: str
    endpoint: str
    started: float
    token_hash: str = ""
    metadata: dict = field(default_factory=dict)
    model: str = ""
    provider: str = ""
    stream: bool = False
    status: int = 0
    error: str = ""
    usage: "Usage | None" = None
    cost_usd: float | None = None                   # set once, when the exchange is priced
    upstream_request_id: str = ""
    upstream_id: str = ""
    upstream_latency_ms: float = 0.0
    key_env: str = ""
    retry_count: int = 0
    fallback_model: str = ""
    provider_meta: dict = field(default_factory=dict)
    rule_matches: list = field(default_factory=list)
    events: list = field(default_factory=list)      # (type, data) raised along the way
    memory: dict | None = None                      # the memory spec, when this conversation is logged
    memory_entries: list = field(default_factory=list)  # (role, text) as sent upstream / received
    request_body: bytes | None = None               # kept only when body logging is on
    response_body: bytes | None = None
    governed: bool = False                          # recorded: past routing, governed or passed through
    end_stream: Any = None                          # async: settles a streamed answer however it ends
