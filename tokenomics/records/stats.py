"""What an operator sees while the proxy runs: ``/stats`` rollups and ``/metrics`` in Prometheus
text format."""

import bisect
import math
import time
from typing import TYPE_CHECKING

from ..records.rollup import Figures, Rollup, figures
from ..util import HASH_PREFIX, rfc3339_ms

if TYPE_CHECKING:  # names used in annotations only
    from ..records.ledger import RequestRecord


# What an operator sees while the proxy runs: `/stats` (JSON rollups), `/metrics` (Prometheus
# text), one structured log line per request, and events delivered to webhooks. Everything
# here is fed a finished RequestRecord; none of it may slow a proxied request or fail it, and
# none of it may ever write a key or a raw token. All state lives on one event loop (no locks):
# with `serve --workers N` each process keeps its own stats and metrics.

STATS_MAX_TOKENS = 10_000       # /stats by_token entries. Tokens are created by people, so a real


                                # deployment has far fewer live ones; the cap only matters when
                                # tokens churn (CI minting one per job) and keeps memory flat
                                # over a long run: further tokens are summed under "other".
METRICS_MAX_MODELS = 200        # distinct `model` label values. The client names the model, so


                                # without a cap one client could grow /metrics (and the scraper's
                                # TSDB) without bound; beyond it, series are labelled "other".
METRICS_MAX_LABEL_VALUES = 100  # distinct values of any other free label (rule type, action)


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


_OTHER = "other"


def record_figures(rec: "RequestRecord") -> Figures:
    """What one finished request adds to a rollup, from its record (whose cost was computed
    once, when the exchange was priced)."""
    return figures(rec.status_code, rec.error, rec.input_tokens, rec.output_tokens, rec.cost_usd,
                   rec.cached_input_tokens, rec.cache_creation_tokens, rec.reasoning_tokens, rec.retry_count)


def _capped(value: str, seen: set, cap: int) -> str:
    """`value`, or "other" once `cap` distinct values have been seen: bounds label/key sets."""
    if value in seen:
        return value
    if len(seen) < cap:
        seen.add(value)
        return value
    return _OTHER


# --- /stats ------------------------------------------------------------------------------------

class Stats:
    """In-process usage rollups since start, served as JSON by `GET /stats`: totals, by model,
    by key env (the env var *name* the upstream key came from), by token hash prefix."""

    def __init__(self, started_at: float | None = None, max_tokens: int = STATS_MAX_TOKENS,
                 max_models: int = METRICS_MAX_MODELS):
        self.started_at = time.time() if started_at is None else started_at
        self.max_tokens, self.max_models = max_tokens, max_models
        self._totals = Rollup()
        self._by_model: dict[str, Rollup] = {}
        self._by_key_env: dict[str, Rollup] = {}
        self._by_token: dict[str, Rollup] = {}

    @staticmethod
    def _bucket(table: dict, key: str, cap: int) -> Rollup:
        roll = table.get(key)
        if roll is None:
            if len(table) >= cap:       # "other" itself may make it cap + 1 entries: still bounded
                key = _OTHER
                roll = table.get(key)
            if roll is None:
                roll = table[key] = Rollup()
        return roll

    def observe(self, rec: "RequestRecord", key_env: str, deltas: Figures | None = None) -> None:
        deltas = record_figures(rec) if deltas is None else deltas
        self._totals.add(deltas)
        self._bucket(self._by_model, rec.model or "unknown", self.max_models).add(deltas)
        self._bucket(self._by_key_env, key_env or "none", self.max_models).add(deltas)
        token = rec.token_hash[:HASH_PREFIX] or "anonymous"
        self._bucket(self._by_token, token, self.max_tokens).add(deltas)

    def snapshot(self) -> dict:
        return {"totals": self._totals.stats_json(),
                "by_model": {k: v.stats_json() for k, v in sorted(self._by_model.items())},
                "by_key_env": {k: v.stats_json() for k, v in sorted(self._by_key_env.items())},
                "by_token": {k: v.stats_json() for k, v in sorted(self._by_token.items())},
                "started_at": rfc3339_ms(self.started_at)}


# --- /metrics ----------------------------------------------------------------------------------

def _prom_label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _prom_number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


_METRIC_HELP = {
    "tokenomics_requests_total": ("counter", "Governed requests by HTTP status class and model."),
    "tokenomics_tokens_total": ("counter", "Tokens by direction (input, output) and model."),
    "tokenomics_cost_usd_total": ("counter", "Estimated spend in US dollars by model."),
    "tokenomics_upstream_latency_seconds": ("histogram", "Time from forwarding a request to the "
                                            "upstream's first response byte."),
    "tokenomics_guardrail_actions_total": ("counter", "Guardrail rule actions by action and rule type."),
    "tokenomics_rejections_total": ("counter", "Requests refused by a rate limit or a budget."),
    "tokenomics_requests_in_flight": ("gauge", "Proxied requests being served right now."),
    "tokenomics_webhook_events_dropped_total": ("counter", "Webhook events dropped because the "
                                                "delivery queue was full."),
}


class Metrics:
    """A tiny Prometheus registry (no client library): counters, one gauge and one histogram
    held as dicts keyed by label tuples, rendered in text exposition format 0.0.4."""

    def __init__(self, max_models: int = METRICS_MAX_MODELS, buckets: tuple = LATENCY_BUCKETS):
        self.max_models = max_models
        self.buckets = tuple(sorted(float(b) for b in buckets))
        self._models: set = set()
        self._actions: set = set()
        self._types: set = set()
        self._requests: dict[tuple, int] = {}
        self._by_model: dict[str, Rollup] = {}      # tokens and cost
        self._guardrail: dict[tuple, int] = {}
        self._rejections: dict[tuple, int] = {}
        self._latency_counts = [0] * (len(self.buckets) + 1)   # per bucket, last one is +Inf
        self._latency_sum = 0.0
        self._in_flight = 0
        self._dropped = 0

    def observe(self, rec: "RequestRecord", upstream_latency_ms: float = 0.0, deltas: Figures | None = None) -> None:
        """Count one finished request. Latency is observed only when the request was forwarded
        (`upstream_latency_ms` > 0); guardrail actions and rejections have their own calls."""
        model = _capped(rec.model or "unknown", self._models, self.max_models)
        code = rec.status_code
        status_class = f"{code // 100}xx" if 100 <= code < 600 else _OTHER
        key = (status_class, model)
        self._requests[key] = self._requests.get(key, 0) + 1
        roll = self._by_model.get(model)
        if roll is None:
            roll = self._by_model[model] = Rollup()
        roll.add(record_figures(rec) if deltas is None else deltas)
        if upstream_latency_ms > 0:
            seconds = upstream_latency_ms / 1000.0
            self._latency_counts[bisect.bisect_left(self.buckets, seconds)] += 1
            self._latency_sum += seconds

    def inc_guardrail(self, action: str, rule_type: str) -> None:
        key = (_capped(action, self._actions, METRICS_MAX_LABEL_VALUES),
               _capped(rule_type, self._types, METRICS_MAX_LABEL_VALUES))
        self._guardrail[key] = self._guardrail.get(key, 0) + 1

    def inc_rejection(self, kind: str) -> None:
        """`kind`: "rate_limited" or "budget_exceeded" (the error code of the 429)."""
        key = (kind if kind in ("rate_limited", "budget_exceeded") else _OTHER,)
        self._rejections[key] = self._rejections.get(key, 0) + 1

    def inflight(self, delta: int) -> None:
        self._in_flight += delta

    def inc_dropped_events(self, n: int = 1) -> None:
        self._dropped += n

    def render(self) -> str:
        out: list[str] = []

        def family(name: str, labels: tuple, series: dict) -> None:
            kind, text = _METRIC_HELP[name]
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")
            for values, number in sorted(series.items()):
                pairs = ",".join(f'{k}="{_prom_label(v)}"' for k, v in zip(labels, values))
                out.append(f"{name}{{{pairs}}} {_prom_number(number)}" if pairs
                           else f"{name} {_prom_number(number)}")

        family("tokenomics_requests_total", ("status_class", "model"), self._requests)
        rolls = self._by_model.items()
        family("tokenomics_tokens_total", ("direction", "model"),
               {(direction, model): roll.count(direction + "_tokens") for model, roll in rolls
                for direction in ("input", "output")})
        family("tokenomics_cost_usd_total", ("model",), {(model,): roll.cost_usd for model, roll in rolls})
        name = "tokenomics_upstream_latency_seconds"
        family(name, (), {})
        cumulative = 0
        for bound, count in zip(self.buckets + (math.inf,), self._latency_counts):
            cumulative += count
            out.append(f'{name}_bucket{{le="{_prom_number(bound)}"}} {cumulative}')
        out.append(f"{name}_sum {_prom_number(self._latency_sum)}")
        out.append(f"{name}_count {cumulative}")
        family("tokenomics_guardrail_actions_total", ("action", "type"), self._guardrail)
        family("tokenomics_rejections_total", ("reason",), self._rejections)
        family("tokenomics_requests_in_flight", (), {(): self._in_flight})
        family("tokenomics_webhook_events_dropped_total", (), {(): self._dropped})
        return "\n".join(out) + "\n"
