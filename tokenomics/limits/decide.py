"""Budget and rate-limit arithmetic: windows, budget lines, rate rules and their strategies.
Pure: data in, data out, ``now`` passed in as Unix seconds."""

import calendar
import collections
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import UsageError
from ..util import parse_duration, usd_text, utc_iso


# The arithmetic here is pure (data in, data out, `now` passed in as Unix seconds); the only
# effects are the in-process counters of MemoryState and the usage journal's files.

_NANO = 1_000_000_000  # USD counters are integers of nano-dollars: exact add/subtract (no float drift
                       # that could let used+reserved creep over a cap), and Redis HINCRBY-friendly.
_PERIODS = ("hourly", "daily", "monthly", "total")


_PERIOD_SECONDS = {"hourly": 3600, "daily": 86400}


_RATE_KINDS = ("requests", "tokens")


_RATE_STRATEGIES = ("sliding", "fixed", "bucket")

_CHARS_PER_TOKEN = 4  # the usual rule of thumb for English prose and code; settlement corrects it


def _nonneg_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UsageError(f"{where}: expected a number >= 0, got {json.dumps(value, default=str)[:40]}")
    return float(value)


def window_bounds(period: str, now: float) -> tuple[float, float]:
    """[start, end) of the UTC calendar window of `period` that contains `now`."""
    if period in _PERIOD_SECONDS:
        size = _PERIOD_SECONDS[period]
        start = now - now % size  # Unix time has no leap seconds, so UTC hours and days align
        return start, start + size
    if period == "monthly":
        tm = time.gmtime(now)
        y, m = tm.tm_year, tm.tm_mon
        ny, nm = (y + 1, 1) if m == 12 else (y, m + 1)
        return float(calendar.timegm((y, m, 1, 0, 0, 0))), float(calendar.timegm((ny, nm, 1, 0, 0, 0)))
    if period == "total":
        return 0.0, math.inf
    raise ValueError(f"unknown budget period {period!r} (expected hourly, daily, monthly or total)")


@dataclass(frozen=True, slots=True)
class BudgetLine:
    """One cap on one counter. `key` names who is counted (token hash prefix + scope, built by
    the caller); lines with equal (key, unit, period) share one counter; `cap` is tokens or USD."""
    key: str
    unit: str    # "tokens" | "usd"
    period: str  # "hourly" | "daily" | "monthly" | "total"
    cap: float


@dataclass(frozen=True, slots=True)
class RateRule:
    """At most `limit` requests (or estimated tokens) per `window` seconds."""
    kind: str      # "requests" | "tokens"
    limit: int
    window: float  # seconds
    strategy: str  # "sliding" | "fixed" | "bucket"


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_rate_rule(raw: Any, path: str) -> RateRule:
    if not isinstance(raw, dict):
        raise UsageError(f'{path}: expected an object like {{"requests": 60, "window": "1m"}}')
    for k in raw:
        if k not in ("requests", "tokens", "window", "strategy"):
            raise UsageError(f"{path}.{k}: unknown field (expected requests or tokens, window, strategy)")
    kinds = [k for k in _RATE_KINDS if k in raw]
    if len(kinds) != 1:
        raise UsageError(f"{path}: give exactly one of requests or tokens")
    kind = kinds[0]
    limit = raw[kind]
    if not _is_count(limit) or limit < 1:
        raise UsageError(f"{path}.{kind}: expected a whole number of at least 1")
    if "window" not in raw:
        raise UsageError(f"{path}.window: missing (a duration such as 1s, 1m, 1h, 24h, 7d)")
    window = raw["window"]
    if isinstance(window, bool):
        raise UsageError(f"{path}.window: expected a duration such as 1s, 1m, 1h, 24h, 7d")
    if isinstance(window, (int, float)):
        seconds = float(window)
    else:
        try:
            seconds = parse_duration(window)
        except ValueError as exc:
            raise UsageError(f"{path}.window: {exc}") from None
    if not (seconds > 0 and math.isfinite(seconds)):
        raise UsageError(f"{path}.window: must be longer than 0")
    strategy = raw.get("strategy", "sliding")
    if strategy not in _RATE_STRATEGIES:
        raise UsageError(f"{path}.strategy: expected sliding, fixed or bucket")
    return RateRule(kind, limit, seconds, strategy)


def parse_rate_limit(raw: dict | None, path: str = "rate_limit") -> tuple[tuple[RateRule, ...], int | None]:
    """Validate a policy's `rate_limit` into (rules, max_parallel); errors name the JSON path."""
    if raw is None:
        return (), None
    if not isinstance(raw, dict):
        raise UsageError(f'{path}: expected an object like {{"rules": [...], "max_parallel": 4}}')
    for k in raw:
        if k not in ("rules", "max_parallel"):
            raise UsageError(f"{path}.{k}: unknown field (expected rules, max_parallel)")
    rules_raw = raw.get("rules")
    if rules_raw is None:
        rules_raw = []
    if not isinstance(rules_raw, list):
        raise UsageError(f"{path}.rules: expected a list of rules")
    rules = tuple(_parse_rate_rule(r, f"{path}.rules[{i}]") for i, r in enumerate(rules_raw))
    max_parallel = raw.get("max_parallel")
    if max_parallel is not None and (not _is_count(max_parallel) or max_parallel < 1):
        raise UsageError(f"{path}.max_parallel: expected a whole number of at least 1")
    return rules, max_parallel


def parse_budget(raw: dict | None, path: str = "budget") -> tuple[tuple[str, str, float], ...]:
    """Validate a policy's `budget` into (unit, period, cap) triples, e.g.
    ("tokens", "daily", 100000.0); the caller turns each into a BudgetLine with its key."""
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise UsageError(f'{path}: expected an object like {{"tokens": {{"daily": 100000}}, "usd": {{"monthly": 20}}}}')
    out = []
    for unit, caps in raw.items():
        if unit not in ("tokens", "usd"):
            raise UsageError(f"{path}.{unit}: unknown field (expected tokens, usd)")
        if caps is None:
            continue
        if not isinstance(caps, dict):
            raise UsageError(f"{path}.{unit}: expected an object with hourly, daily, monthly, total")
        for period, cap in caps.items():
            if period not in _PERIODS:
                raise UsageError(f"{path}.{unit}.{period}: unknown field (expected hourly, daily, monthly, total)")
            if cap is not None:
                out.append((unit, period, _nonneg_number(cap, f"{path}.{unit}.{period}")))
    return tuple(out)


@dataclass(slots=True)
class Reservation:
    """What one in-flight request holds: `tokens` and `usd_nano` on each counter of `lines`
    (one line per counter). Settled or released exactly once; later calls are no-ops.
    A reservation is not pinned to a window: when a window rolls over while the request is
    in flight, its hold moves into the new window, so settle() charges the window the usage
    happened in and release() frees the window that holds it."""
    id: int
    lines: tuple[BudgetLine, ...]
    tokens: int
    usd_nano: int
    created: float
    done: bool = False
    held: tuple = ()  # journal rows [key, unit, period, window_start, hold]: its charge after a crash

    @property
    def usd(self) -> float:
        return self.usd_nano / _NANO


def budget_event(line: BudgetLine, used: float, cap: float, now: float) -> dict:
    """`data` of budget.exceeded / budget.update: which counter, how full, when it resets."""
    start, end = window_bounds(line.period, now)
    return {"key": line.key, "unit": line.unit, "period": line.period,
            "used": used, "cap": cap, "remaining": max(0, cap - used),
            "percent": round(100.0 * used / cap, 1) if cap else 100.0,
            "window_start": utc_iso(start), "resets_at": None if end == math.inf else utc_iso(end)}


def rate_event(key: str, rule: RateRule | None, retry_after: int, limit: int | None = None) -> dict:
    """`data` of rate.exceeded; `rule` None means the max_parallel limit (given as `limit`)."""
    if rule is None:
        return {"key": key, "kind": "parallel", "limit": limit, "retry_after": retry_after}
    return {"key": key, "kind": rule.kind, "limit": rule.limit, "window": rule.window,
            "strategy": rule.strategy, "retry_after": retry_after}


def _fmt_window(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _fmt_usd(x: float) -> str:
    return f"${x:,.2f}" if x >= 1 or x == 0 else f"${usd_text(x)}"


def _retry_seconds(now: float, ready_at: float, ready: Callable[[float], bool]) -> int:
    """Whole seconds from `now` until `ready(now + n)` holds, at least 1. Starts from the exact
    instant and steps past any float rounding, so a client that waits exactly Retry-After
    seconds is admitted (if nobody else took the room meanwhile)."""
    n = max(1, math.ceil(ready_at - now))
    for _ in range(4):
        if ready(now + n):
            break
        n += 1
    return n


def sliding_wait(ready_at: float, now: float) -> int:
    """Retry-After of a sliding-log rule whose room comes back when the entry that frees enough
    of it leaves the window, at `ready_at`."""
    return _retry_seconds(now, ready_at, lambda t: ready_at <= t)


def fixed_wait(rule: RateRule, index: int, now: float) -> int:
    """Retry-After of a fixed-window rule whose current window (number `index`) is full."""
    window = rule.window
    return _retry_seconds(now, (index + 1) * window, lambda t: math.floor(t / window) > index)


def bucket_wait(rule: RateRule, level: float, last: float, w: int, now: float) -> int:
    """Retry-After of a token bucket holding `level` (as of `last`) when `w` is asked for."""
    rate, cap = rule.limit / rule.window, float(rule.limit)
    return _retry_seconds(now, now + (w - level) / rate, lambda t: min(cap, level + (t - last) * rate) >= w)


def rate_weight(rule: RateRule, tokens: int) -> int:
    """What one request counts against `rule`: 1 for request rules; for token rules the estimate,
    capped at the limit so an oversized request still passes through an empty window."""
    return 1 if rule.kind == "requests" else max(0, min(int(tokens), rule.limit))


# A sliding log keeps one entry per admission up to SLIDING_EXACT_ENTRIES (so a limit of up to that
# many requests is exact to the microsecond); past it, an admission in the same slot as the newest
# entry (slots: the window's length / SLIDING_SLOTS, aligned on the epoch) joins that entry, whose
# time moves to the later admission but never out of its slot. A log then holds at most
# SLIDING_EXACT_ENTRIES + SLIDING_SLOTS + 1 entries whatever the limit and the rate: a
# 10**9-per-minute rule at 2,000 req/s held 120,000 entries (~4 MB) and now holds ~1,300.
# Joining only moves admissions later, so they leave the window later: the log never admits more
# than the exact one would, and a Retry-After is late by at most window / SLIDING_SLOTS.
SLIDING_EXACT_ENTRIES = 1024
SLIDING_SLOTS = 256


class _Sliding:
    """Sliding log: times and weights (1 per request for request rules; a joined entry carries
    several) of the admissions still inside the window. A request is admitted while the trailing
    window holds room for it; entries leave when `t + window <= now`."""
    __slots__ = ("times", "weights", "total", "touched", "join", "exact")

    def __init__(self, rule: RateRule, exact: int = SLIDING_EXACT_ENTRIES):
        self.exact = exact
        self.join = rule.window / SLIDING_SLOTS  # past SLIDING_EXACT_ENTRIES, one entry per slot this long
        self.times: collections.deque = collections.deque()
        self.weights: collections.deque = collections.deque()
        self.total = 0
        self.touched = -math.inf

    def retry_after(self, rule: RateRule, w: int, now: float) -> int:
        times, weights, window = self.times, self.weights, rule.window
        while times and times[0] + window <= now:
            times.popleft()
            self.total -= weights.popleft()
        excess = self.total + w - rule.limit
        if excess <= 0:
            return 0
        ready_at = times[-1] + window  # unreachable: rate_weight caps w at the limit
        freed = 0
        for t, wt in zip(times, weights):
            freed += wt
            if freed >= excess:
                ready_at = t + window
                break
        return sliding_wait(ready_at, now)

    def take(self, w: int, now: float) -> None:
        if w <= 0:
            return
        t = now if now > self.touched else self.touched  # keep the log sorted if the clock steps back
        times = self.times
        if len(times) >= self.exact and t // self.join == times[-1] // self.join:
            times[-1] = t
            self.weights[-1] += w
        else:
            times.append(t)
            self.weights.append(w)
        self.total += w
        self.touched = t


class _Fixed:
    """Fixed windows aligned on multiples of the window length since the epoch."""
    __slots__ = ("index", "count", "touched")

    def __init__(self):
        self.index = -math.inf
        self.count = 0
        self.touched = -math.inf

    def retry_after(self, rule: RateRule, w: int, now: float) -> int:
        index = math.floor(now / rule.window)
        if index > self.index:
            self.index, self.count = index, 0
        if self.count + w <= rule.limit:
            return 0
        return fixed_wait(rule, self.index, now)

    def take(self, w: int, now: float) -> None:
        self.count += w
        if now > self.touched:
            self.touched = now


class _Bucket:
    """Token bucket: capacity `limit`, refilled continuously at limit/window per second."""
    __slots__ = ("level", "last", "touched")

    def __init__(self, rule: RateRule, now: float):
        self.level = float(rule.limit)
        self.last = now
        self.touched = -math.inf

    def retry_after(self, rule: RateRule, w: int, now: float) -> int:
        rate = rule.limit / rule.window
        if now > self.last:
            self.level = min(float(rule.limit), self.level + (now - self.last) * rate)
            self.last = now
        if self.level >= w:
            return 0
        return bucket_wait(rule, self.level, self.last, w, now)

    def take(self, w: int, now: float) -> None:
        self.level -= w
        if now > self.touched:
            self.touched = now


# -- verdicts -------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Refusal:
    """A request not admitted, as data: a stable `code` (budget_exceeded, rate_limited,
    state_unavailable), a message for the client, the seconds after which it would be admitted
    (None when waiting is no answer), and the event that reports it. The pipeline alone turns
    it into an HTTP error."""
    code: str
    message: str
    retry_after: int | None = None
    event: tuple[str, dict] | None = None


@dataclass(frozen=True, slots=True)
class Grant:
    """What a budget allows one request: `tokens` held on every token counter (the caller lowers
    the upstream output cap to tokens - input estimate) and `usd_nano` on every USD counter."""
    tokens: int
    usd_nano: int


@dataclass(frozen=True, slots=True)
class Counter:
    """One budget counter as a grant sees it: the tightest `line` on it, its `cap` and what is
    `used` (settled) and `reserved` (held in flight) in its current window, in tokens or
    nano-dollars."""
    line: BudgetLine
    cap: int
    used: int
    reserved: int

    @property
    def left(self) -> int:
        return self.cap - self.used - self.reserved


_PERIOD_WORD = {"hourly": "hourly", "daily": "daily", "monthly": "monthly", "total": "lifetime"}


def counter_id(line: BudgetLine) -> tuple[str, str, str]:
    return line.key, line.unit, line.period


def counter_cap(line: BudgetLine) -> int:
    """The cap in counter units: whole tokens, or nano-dollars."""
    return int(line.cap) if line.unit == "tokens" else round(line.cap * _NANO)


def tightest_lines(lines: list[BudgetLine]) -> list[BudgetLine]:
    """One line per counter, the one with the smallest cap (lines on one counter share it)."""
    plan: dict[tuple[str, str, str], BudgetLine] = {}
    for line in lines:
        cid = counter_id(line)
        if cid not in plan or counter_cap(line) < counter_cap(plan[cid]):
            plan[cid] = line
    return list(plan.values())


def usd_nano(usd: float) -> int:
    return max(0, math.ceil(usd * _NANO - 1e-6))  # ceil, but 0.1 * 1e9 stays 100000000


def decide_grant(counters: list[Counter], tokens: int, usd: float, now: float,
                 min_tokens: int = 1, usd_per_token: float = 0.0) -> "Grant | Refusal":
    """How much of `tokens` (the input estimate plus the output allowance, costing `usd`) the
    counters can hold, or why none.

    Each token counter clamps the grant to what it has left; `usd_per_token` is the price of each
    token that may be cut (the output rate), so a USD counter clamps too: granting g tokens holds
    usd - (tokens - g) * usd_per_token. Refused when a counter cannot grant `min_tokens` (input
    estimate + 1 is the natural choice) or a USD counter has nothing left; the refusal names the
    counter whose window resets last."""
    tokens = max(0, int(tokens))
    floor_ = min(max(1, int(min_tokens)), tokens)
    usd_n = usd_nano(usd)
    rate_n = max(0.0, usd_per_token) * _NANO

    def need(g: int) -> int:  # nano-dollars to hold when granting g tokens
        return max(0, usd_n - math.floor((tokens - g) * rate_n))

    granted = tokens
    blocked: tuple[float, Counter] | None = None
    for c in counters:
        left = c.left
        if c.line.unit == "tokens":
            if left < max(1, floor_):
                blocked = _later(blocked, c, now)
            elif left < granted:
                granted = left
        elif left <= 0 or need(floor_) > left:
            blocked = _later(blocked, c, now)
        elif need(granted) > left:
            g = tokens - math.ceil((usd_n - left) / rate_n)  # rate_n > 0 here, else need(floor_) > left
            while g > floor_ and need(g) > left:
                g -= 1
            while g < granted and need(g + 1) <= left:
                g += 1
            granted = min(granted, g)
    if blocked is not None:
        return budget_refusal(blocked[1], floor_, now)
    return Grant(granted, need(granted))


def _later(blocked: "tuple[float, Counter] | None", c: Counter, now: float) -> "tuple[float, Counter]":
    """Keep the counter whose window resets last: naming the daily budget when the monthly one
    is also spent would send the user back too early."""
    end = window_bounds(c.line.period, now)[1]
    return blocked if blocked is not None and blocked[0] >= end else (end, c)


def budget_refusal(c: Counter, floor_: int, now: float) -> Refusal:
    line, left = c.line, c.left
    end = window_bounds(line.period, now)[1]
    tokens = line.unit == "tokens"
    show = (lambda v: f"{v:,}") if tokens else (lambda v: _fmt_usd(v / _NANO))
    what = f"{_PERIOD_WORD[line.period]} {'token' if tokens else 'USD'} budget"
    held = f", {show(c.reserved)} held by requests in flight" if c.reserved else ""
    status = f"used {show(c.used)} of {show(c.cap)}{held}"
    if left > 0:
        wanted = f"{floor_:,} tokens" if tokens else "its minimum cost"
        head = f"{what} has {show(left)} left, this request needs at least {wanted} ({status})"
    else:
        head = f"{what} exhausted ({status})"
    tail = "it does not reset; ask for a higher cap" if end == math.inf else f"it resets at {utc_iso(end)}"
    scale = 1 if tokens else _NANO
    return Refusal("budget_exceeded", f"{head}; {tail}",
                   event=("budget.exceeded", budget_event(line, (c.used + c.reserved) / scale, c.cap / scale, now)))


def rate_refusal(key: str, rule: RateRule, wait: int) -> Refusal:
    what = "requests" if rule.kind == "requests" else "tokens"
    return Refusal("rate_limited", f"rate limit reached: {rule.limit} {what} per {_fmt_window(rule.window)} "
                                   f"({rule.strategy}); retry in {wait}s",
                   retry_after=wait, event=("rate.exceeded", rate_event(key, rule, wait)))


def parallel_refusal(key: str, max_parallel: int) -> Refusal:
    return Refusal("rate_limited", f"too many requests in flight for this token (max_parallel {max_parallel}); "
                                   "retry when one finishes",
                   retry_after=1, event=("rate.exceeded", rate_event(key, None, 1, limit=max_parallel)))


def unavailable(what: str) -> Refusal:
    """The shared state cannot be reached: fail closed (nothing is forwarded ungoverned)."""
    return Refusal("state_unavailable", f"the proxy cannot reach its shared limits store ({what}), so it cannot "
                                        "enforce this token's budgets and rate limits; retry shortly, and if "
                                        "this persists check session.redis in the proxy's config (tokenomics "
                                        "doctor)", retry_after=1)


def estimate_tokens(text_len_chars: int) -> int:
    """Fast pre-flight estimate: characters / 4, rounded up. Per-message overhead is the
    caller's; the provider's reported usage settles the difference."""
    return -(-max(0, text_len_chars) // _CHARS_PER_TOKEN)
