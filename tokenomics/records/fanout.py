"""The fan-out: every finished exchange to the totals, ledger, stats, metrics, logs and events."""

import asyncio
import json
import secrets
import time
from typing import Any, Callable, TYPE_CHECKING

from ..config import RedisConfig
from ..errors import TokenomicsError
from ..limits.prices import Usage
from ..records.events import make_event
from ..records.ledger import RequestRecord
from ..records.memory import MemoryWriter, RedisMemory
from ..records.rollup import Rollup
from ..records.stats import Metrics, Stats, record_figures
from ..util import HASH_PREFIX, REDACTED, log, usd_text

if TYPE_CHECKING:  # names used in annotations only
    from ..records.events import WebhookDispatcher
    from ..records.exchange import Exchange
    from ..records.ledger import Ledger
    from ..records.logs import RequestLogger


class SessionTotals(Rollup):
    """The rollup of every governed exchange of this process (those refused before their token
    was known too), for the one-line summary `run` prints when the wrapped command ends."""
    __slots__ = ()

    def line(self) -> str:
        return (f"tokenomics: {self.requests} requests, {self.count('input_tokens'):,} tokens in / "
                f"{self.count('output_tokens'):,} out, ${usd_text(self.cost_usd)}, "
                f"{self.count('blocked_count')} blocked")


def _match_dict(m: Any) -> dict:
    """A guard's RuleMatch as recorded; `score` only where there is one (classifier rules)."""
    out = {"rule": m.rule, "type": m.type, "action": m.action, "scope": m.scope, "count": m.count}
    if m.score is not None:
        out["score"] = m.score
    return out


def request_record(ex: "Exchange", now: float) -> RequestRecord:
    usage = ex.usage or Usage()
    return RequestRecord(
        timestamp=ex.started, request_id=ex.request_id, token_hash=ex.token_hash, model=ex.model,
        provider=ex.provider, endpoint=ex.endpoint, input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens, cached_input_tokens=usage.cached_input_tokens,
        cache_creation_tokens=usage.cache_creation_tokens, reasoning_tokens=usage.reasoning_tokens,
        cost_usd=ex.cost_usd or 0.0, duration_ms=round((now - ex.started) * 1000, 3), status_code=ex.status,
        stream=ex.stream, error=ex.error, upstream_id=ex.upstream_id, upstream_request_id=ex.upstream_request_id,
        retry_count=ex.retry_count, fallback_model=ex.fallback_model,
        rule_matches=[m if isinstance(m, dict) else _match_dict(m) for m in ex.rule_matches],
        metadata=ex.metadata, provider_meta=ex.provider_meta)


_MIN_SCRUBBED_KEY = 8            # chars: a provider key shorter than this is not scrubbed by value


def _without(text: str, secrets_: list[str]) -> str:
    """`text` with each of `secrets_` (exact values, longest first) replaced by [REDACTED]."""
    for value in secrets_:
        if value in text:
            text = text.replace(value, REDACTED)
    return text


_RULE_EVENTS = {"fail": "rule.violation", "warn": "rule.warning", "log": "rule.match", "mask": "rule.mask",
                "anonymize": "rule.mask"}


class Records:
    """Fan-out of finished exchanges to every record keeper: session totals, the ledger, /stats,
    /metrics, the request log and webhook events. None of them may fail or slow a request."""

    def __init__(self, ledger: "Ledger | None" = None, logger: "RequestLogger | None" = None,
                 dispatcher: "WebhookDispatcher | None" = None, clock: Callable[[], float] = time.time):
        self.totals = SessionTotals()
        self.ledger = ledger
        self.stats = Stats(started_at=clock())
        self.metrics = Metrics()
        self.logger = logger
        self.dispatcher = dispatcher
        self.clock = clock
        self.data_dir = ""
        self.redis = RedisConfig()
        self.session_id = secrets.token_hex(4)
        self._memory: dict[str, MemoryWriter | RedisMemory | None] = {}
        # Where the provider keys live (the proxy sets both): their exact values are scrubbed
        # from memory logs too, since a key need not have any shape scrub() knows.
        self.environ: Any = {}
        self.key_envs: frozenset = frozenset()

    def key_values(self, key_env: str = "") -> list[str]:
        """The values of the configured provider key env vars (and `key_env`), longest first;
        values shorter than _MIN_SCRUBBED_KEY are left alone (they would shred ordinary text)."""
        names = self.key_envs | {key_env} if key_env else self.key_envs
        values = {self.environ.get(name) or "" for name in names}
        return sorted((v for v in values if len(v) >= _MIN_SCRUBBED_KEY), key=len, reverse=True)

    def memory_writer(self, spec: dict) -> "MemoryWriter | RedisMemory | None":
        key = json.dumps(spec, sort_keys=True)
        if key not in self._memory:
            try:
                self._memory[key] = RedisMemory(self.redis, self.session_id) if spec.get("redis") \
                    else MemoryWriter(self.data_dir, spec)
            except TokenomicsError as exc:
                log.error("memory log disabled for a policy: %s", exc)
                self._memory[key] = None
        return self._memory[key]

    def write_memory(self, ex: "Exchange", now: float) -> None:
        writer = self.memory_writer(ex.memory)
        if writer is None or not writer.enabled:
            return
        keys = self.key_values(ex.key_env)
        entries = [(role, _without(text, keys)) for role, text in ex.memory_entries if text]
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            writer.append(ex.token_hash, ex.model, entries, now)
        else:  # rotation may gzip: keep it off the event loop
            loop.run_in_executor(None, writer.append, ex.token_hash, ex.model, entries, now)

    @property
    def listening(self) -> bool:
        """Whether events are wanted: a dispatcher is set and, for the live feed's hub, someone
        is there to receive them. Building an event nobody receives costs a request ~10 us."""
        dispatcher = self.dispatcher
        return dispatcher is not None and getattr(dispatcher, "listening", True)

    def emit(self, type_: str, data: dict) -> None:
        if self.listening:
            self.dispatcher.emit(make_event(type_, data, self.clock()))

    def complete(self, ex: "Exchange", now: float) -> None:
        if not ex.governed:
            return
        self.metrics.inflight(-1)
        rec = request_record(ex, now)
        deltas = record_figures(rec)    # once: the same figures go to every rollup below
        self.totals.add(deltas)
        if not ex.token_hash:
            return  # refused before authentication: counted in /metrics only via status
        if self.ledger is not None:
            self.ledger.record(rec)
        self.stats.observe(rec, ex.key_env, deltas)
        self.metrics.observe(rec, ex.upstream_latency_ms, deltas)
        for match in rec.rule_matches:
            self.metrics.inc_guardrail(match["action"], match["type"])
        if ex.error in ("rate_limited", "budget_exceeded"):
            self.metrics.inc_rejection(ex.error)
        if self.logger is not None:
            self.logger.log(rec, ex.key_env, ex.request_body, ex.response_body)
        if ex.memory is not None and ex.memory_entries and self.data_dir:
            self.write_memory(ex, now)
        if self.listening:
            base = {"token_hash": ex.token_hash[:HASH_PREFIX], "request_id": ex.request_id, "model": ex.model,
                    "metadata": ex.metadata}
            for match in rec.rule_matches:
                self.emit(_RULE_EVENTS.get(match["action"], "rule.match"), {**base, **match})
            for type_, data in ex.events:
                self.emit(type_, {**base, **data})
            self.emit("request.completed", {**base, "provider": ex.provider, "status": ex.status,
                                            "error": ex.error, "stream": ex.stream,
                                            "input_tokens": rec.input_tokens, "output_tokens": rec.output_tokens,
                                            "cost_usd": rec.cost_usd, "duration_ms": rec.duration_ms})
