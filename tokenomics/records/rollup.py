"""One rollup type: the sums over finished exchanges that the ledger's summaries, ``/stats``,
``/metrics`` and the session line of ``run`` all show, with one definition of an error.

An exchange's contribution (`Figures`) is computed once, from its record, whose cost was
computed once when the exchange was priced; it is then added to every rollup the exchange
belongs to. Cost is summed in integer nano-dollars, so a sum is exact and the same in any
order: rollups of the parts of a list of exchanges merge into the rollup of the whole."""

from typing import Any

from ..limits.decide import _NANO
from ..util import rfc3339_ms


RULE_VIOLATION_ERRORS = frozenset({"rule_violation", "output_rule_violation"})


RATE_LIMIT_ERRORS = frozenset({"rate_limited"})


BUDGET_ERRORS = frozenset({"budget_exceeded"})   # a spent budget is not a rate limit (§9)


# Refused by the proxy's own governance (rules, limits, budget, the policy's model list): what
# `run`'s session line counts as blocked. Every blocked request is also an error.
BLOCKING_ERRORS = RULE_VIOLATION_ERRORS | RATE_LIMIT_ERRORS | BUDGET_ERRORS | {"model_not_allowed"}


def is_error(status_code: int, error: str) -> bool:
    """THE definition of an error, for every rollup: the client was answered with an HTTP
    status of 400 or more, or the exchange carries an error code (a stream that began with 200
    and was ended by an error event carries the error's code and status)."""
    return status_code >= 400 or bool(error)


# The counts of a rollup, in the order `Figures` holds them (the ledger's §9 names); the cost
# in nano-dollars follows them.
COUNTS = ("request_count", "input_tokens", "output_tokens", "total_tokens", "cached_input_tokens",
          "cache_creation_tokens", "reasoning_tokens", "error_count", "retry_count", "rule_violation_count",
          "rate_limit_count", "budget_exceeded_count", "blocked_count")


_INDEX = {name: i for i, name in enumerate(COUNTS)}


_LEDGER_COUNTS = COUNTS[:-1]     # the ledger's summaries predate `blocked_count` and keep their shape


Figures = tuple    # one exchange's contribution: COUNTS in order, then nano-dollars


def figures(status_code: int, error: str, input_tokens: int, output_tokens: int, cost_usd: float,
            cached_input_tokens: int = 0, cache_creation_tokens: int = 0, reasoning_tokens: int = 0,
            retry_count: int = 0) -> Figures:
    """What one exchange adds to a rollup, from the figures its record carries."""
    error = error or ""
    return (1, input_tokens, output_tokens, input_tokens + output_tokens, cached_input_tokens,
            cache_creation_tokens, reasoning_tokens, int(is_error(status_code, error)), retry_count,
            int(error in RULE_VIOLATION_ERRORS), int(error in RATE_LIMIT_ERRORS), int(error in BUDGET_ERRORS),
            int(error in BLOCKING_ERRORS), round(cost_usd * _NANO))


NONE_KEY = "(none)"             # rollup key for an empty model, provider, token or branch


_FOLD_AT = 64    # exchanges a rollup holds unsummed: adding is an append, summing is done in C


class Rollup:
    """Sums over exchanges: requests, tokens, errors (see `is_error`), retries, refusals by kind
    and cost. A per-token rollup (`per_token`) also keeps the models used and the first and
    last request's time. `merge` adds another rollup in; merging is exact and commutative.
    Every exchange is added to about ten rollups and they are read rarely (a summary, a
    scrape), so `add` queues the exchange's figures and `sums` adds them up, column by column,
    when read or when _FOLD_AT are queued."""
    __slots__ = ("_sums", "_queued", "models", "first", "last")

    def __init__(self, per_token: bool = False):
        self._sums = [0] * (len(COUNTS) + 1)
        self._queued: list = []
        self.models: set | None = set() if per_token else None
        self.first: float | None = None
        self.last: float | None = None

    @property
    def sums(self) -> list:
        if self._queued:
            self._fold()
        return self._sums

    def _fold(self) -> None:
        self._sums = [sum(column) for column in zip(self._sums, *self._queued)]
        self._queued = []

    def add(self, deltas: Figures, model: str = "", ts: float | None = None) -> None:
        queued = self._queued
        queued.append(deltas)
        if len(queued) >= _FOLD_AT:
            self._fold()
        if self.models is not None:
            self.models.add(model or NONE_KEY)
            self._seen(ts, ts)

    def merge(self, other: "Rollup") -> None:
        self._queued.append(other.sums)
        self._fold()
        if self.models is not None and other.models is not None:
            self.models |= other.models
            self._seen(other.first, other.last)

    def _seen(self, first: float | None, last: float | None) -> None:
        if first is not None:
            self.first = first if self.first is None else min(self.first, first)
        if last is not None:
            self.last = last if self.last is None else max(self.last, last)

    def count(self, name: str) -> int:
        return self.sums[_INDEX[name]]

    @property
    def requests(self) -> int:
        return self.sums[0]

    @property
    def cost_usd(self) -> float:
        return self.sums[-1] / _NANO

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rollup) and (self.sums, self.models, self.first, self.last) == (
            other.sums, other.models, other.first, other.last)

    def __repr__(self) -> str:
        return f"Rollup({dict(zip(COUNTS, self.sums))}, cost_usd={self.cost_usd})"

    def as_dict(self) -> dict:
        """The ledger's shape (session summaries, `ledger` reports)."""
        out: dict[str, Any] = dict(zip(_LEDGER_COUNTS, self.sums))
        out["cost_usd"] = self.cost_usd
        if self.models is not None:
            out["models_used"] = sorted(self.models)
            out["first_seen"] = rfc3339_ms(self.first) if self.first is not None else ""
            out["last_seen"] = rfc3339_ms(self.last) if self.last is not None else ""
        return out

    def stats_json(self) -> dict:
        """The shape of a `/stats` bucket."""
        return {"requests": self.requests, "input_tokens": self.count("input_tokens"),
                "output_tokens": self.count("output_tokens"), "total_tokens": self.count("total_tokens"),
                "cost_usd": round(self.cost_usd, 8), "errors": self.count("error_count")}
