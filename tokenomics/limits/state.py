"""State: the atomic verbs (reserve, settle, release, admit, enter, leave) behind one interface,
and the in-process implementation."""

import json
import math
import threading
from typing import Any

from ..errors import ProxyError
from ..limits.decide import BudgetLine, RateRule, Reservation, _Bucket, _Fixed, _NANO, _PERIODS, _PERIOD_SECONDS, _Sliding, _fmt_usd, _fmt_window, _is_count, budget_event, rate_event, window_bounds
from ..util import utc_iso


_PERIOD_WORD = {"hourly": "hourly", "daily": "daily", "monthly": "monthly", "total": "lifetime"}


_SWEEP_EVERY = 60.0  # seconds between eviction sweeps: bounds memory, amortised to nothing per call


class State:
    """Counters behind one narrow interface: rate-limit windows, parallel slots, budget
    reservations. Every verb is atomic on its own; callers never read-then-write.
    MemoryState implements it in-process; a Redis implementation maps each verb to one Lua
    script over these keys (window starts are computed by the caller and passed in, because
    calendar months are awkward in Lua):
      admit   — per (key, rule): a ZSET of timestamps (sliding), INCR with EXPIREAT (fixed), or a
                hash {level, last} (bucket); check every rule, then write all or none.
      enter/leave — INCR/DECR of a per-key counter, refused at max_parallel.
      reserve — per counter a hash {ws, used, reserved}: reset `used` when ws changed, compute the
                grant across all lines, HINCRBY `reserved` on all; in-flight holds should also sit in
                a ZSET scored by deadline so a crashed worker's holds expire.
      settle/release — HINCRBY reserved by -hold (floored at 0) and used by +actual."""

    def admit(self, key: str, rules: tuple[RateRule, ...], now: float, tokens: int = 0) -> None:
        raise NotImplementedError

    def enter(self, key: str, max_parallel: int | None) -> None:
        raise NotImplementedError

    def leave(self, key: str) -> None:
        raise NotImplementedError

    def reserve(self, lines: list[BudgetLine], tokens: int, usd: float, now: float,
                min_tokens: int = 1, usd_per_token: float = 0.0) -> tuple[Reservation, int]:
        raise NotImplementedError

    def settle(self, reservation: Reservation, actual_tokens: int, actual_usd: float, now: float) -> None:
        raise NotImplementedError

    def release(self, reservation: Reservation) -> None:
        raise NotImplementedError

    def usage(self, line: BudgetLine, now: float) -> tuple[float, float]:
        raise NotImplementedError


class MemoryState(State):
    """In-process State. Verbs are synchronous and never await, so under asyncio each is
    atomic by construction; a threading.Lock (uncontended: well under a microsecond) also makes
    them safe when a journal commit runs in a worker thread.

    Budget counters are [window_start, used, reserved] per (key, unit, period), in tokens or
    nano-dollars. When a window rolls over, `used` restarts at 0 and `reserved` carries over
    (the requests holding it are still running). Settled deltas queue in a pending list that
    UsageJournal.commit() drains. Once a journal has replayed into it (`write_ahead`), opened
    and closed reservations queue too, and the open ones are part of every snapshot, so a
    reservation that was never settled can be charged in full after a crash.

    Memory stays bounded: rate states idle for a whole window (hence indistinguishable from
    fresh ones) and counters of windows that have passed with nothing reserved are swept
    every _SWEEP_EVERY seconds; lifetime ('total') counters are kept."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, str, str], list] = {}
        self._rates: dict[tuple[str, RateRule], Any] = {}
        self._parallel: dict[str, int] = {}
        self._pending: list[list] = []
        self._next_id = 0
        self.write_ahead = False                     # set by UsageJournal.replay()
        self._open: dict[int, Reservation] = {}      # journaled reservations not yet settled
        self._opened: list[list] = []                # [id, rows] not yet drained to the journal
        self._closed: list[int] = []                 # ids settled or released, not yet drained
        self._next_sweep = -math.inf
        self._month = (0.0, 0.0)

    # -- windows and counters ------------------------------------------------------------------

    def _window_start(self, period: str, now: float) -> float:
        size = _PERIOD_SECONDS.get(period)
        if size is not None:
            return now - now % size
        if period == "total":
            return 0.0
        start, end = self._month  # monthly: cached, the calendar arithmetic is the slow part
        if not start <= now < end:
            self._month = start, end = window_bounds("monthly", now)
        return start

    def _counter(self, cid: tuple[str, str, str], now: float) -> list:
        ws = self._window_start(cid[2], now)
        c = self._counters.get(cid)
        if c is None:
            c = self._counters[cid] = [ws, 0, 0]
        elif ws > c[0]:
            c[0], c[1] = ws, 0
        return c

    def _maybe_sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_EVERY
        for sk in [sk for sk, st in self._rates.items() if now - st.touched >= sk[1].window]:
            del self._rates[sk]
        for cid in [cid for cid, c in self._counters.items()
                    if c[2] == 0 and cid[2] != "total" and c[0] < self._window_start(cid[2], now)]:
            del self._counters[cid]

    # -- rate limits ---------------------------------------------------------------------------

    def admit(self, key: str, rules: tuple[RateRule, ...], now: float, tokens: int = 0) -> None:
        """Admit one request under every rule or raise 429 rate_limited; all or nothing.
        Request rules count 1, token rules count `tokens` (an estimate), capped at the rule's
        limit so an oversized request still passes through an empty window."""
        if not rules:
            return
        with self._lock:
            self._maybe_sweep(now)
            plan = []
            wait, refusing = 0, None
            for rule in rules:
                sk = (key, rule)
                st = self._rates.get(sk)
                if st is None:
                    if rule.strategy == "sliding":
                        st = _Sliding(rule.kind == "tokens")
                    elif rule.strategy == "fixed":
                        st = _Fixed()
                    else:
                        st = _Bucket(rule, now)
                    self._rates[sk] = st
                w = 1 if rule.kind == "requests" else max(0, min(tokens, rule.limit))
                r = st.retry_after(rule, w, now)
                if r > wait:
                    wait, refusing = r, rule
                plan.append((st, w))
            if refusing is not None:
                what = "requests" if refusing.kind == "requests" else "tokens"
                err = ProxyError(429, "rate_limited",
                                 f"rate limit reached: {refusing.limit} {what} per "
                                 f"{_fmt_window(refusing.window)} ({refusing.strategy}); retry in {wait}s",
                                 headers={"Retry-After": str(wait)})
                err.event = ("rate.exceeded", rate_event(key, refusing, wait))
                raise err
            for st, w in plan:
                st.take(w, now)

    def enter(self, key: str, max_parallel: int | None) -> None:
        """Take a parallel slot (always counted; refused only at max_parallel). Pair with leave()."""
        with self._lock:
            n = self._parallel.get(key, 0)
            if max_parallel is not None and n >= max_parallel:
                err = ProxyError(429, "rate_limited",
                                 f"too many requests in flight for this token (max_parallel {max_parallel}); "
                                 "retry when one finishes", headers={"Retry-After": "1"})
                err.event = ("rate.exceeded", rate_event(key, None, 1, limit=max_parallel))
                raise err
            self._parallel[key] = n + 1

    def leave(self, key: str) -> None:
        with self._lock:
            n = self._parallel.get(key, 0)
            if n <= 1:
                self._parallel.pop(key, None)
            else:
                self._parallel[key] = n - 1

    def in_flight(self, key: str) -> int:
        return self._parallel.get(key, 0)

    # -- budgets -------------------------------------------------------------------------------

    def reserve(self, lines: list[BudgetLine], tokens: int, usd: float, now: float,
                min_tokens: int = 1, usd_per_token: float = 0.0) -> tuple[Reservation, int]:
        """Hold `tokens` (and `usd`) on every line, or fewer when a line has less left.

        `tokens` is the input estimate plus the output allowance; `usd` its estimated cost;
        `usd_per_token` the price of each token that may be cut (the output rate), so a USD
        line can clamp too: granting g tokens holds usd - (tokens - g) * usd_per_token.
        Returns (reservation, granted tokens); the caller lowers the upstream output limit to
        granted - input estimate. Raises 429 budget_exceeded when a line cannot grant
        `min_tokens` (input estimate + 1 is the natural choice), or a USD line has nothing left.
        """
        tokens = max(0, int(tokens))
        floor_ = min(max(1, int(min_tokens)), tokens)
        usd_n = max(0, math.ceil(usd * _NANO - 1e-6))  # ceil, but 0.1 * 1e9 stays 100000000
        rate_n = max(0.0, usd_per_token) * _NANO

        def need(g: int) -> int:  # nano-dollars to hold when granting g tokens
            return max(0, usd_n - math.floor((tokens - g) * rate_n))

        with self._lock:
            self._maybe_sweep(now)
            plan: dict[tuple[str, str, str], list] = {}
            for line in lines:
                cid = (line.key, line.unit, line.period)
                cap = int(line.cap) if line.unit == "tokens" else round(line.cap * _NANO)
                p = plan.get(cid)
                if p is None:
                    plan[cid] = [self._counter(cid, now), cap, line]
                elif cap < p[1]:
                    p[1], p[2] = cap, line
            granted = tokens
            blocked = None
            for c, cap, line in plan.values():
                left = cap - c[1] - c[2]
                if line.unit == "tokens":
                    if left < max(1, floor_):
                        blocked = self._worse(blocked, line, c, cap, left, floor_, now)
                    elif left < granted:
                        granted = left
                elif left <= 0 or need(floor_) > left:
                    blocked = self._worse(blocked, line, c, cap, left, floor_, now)
                elif need(granted) > left:
                    g = tokens - math.ceil((usd_n - left) / rate_n)  # rate_n > 0 here, else need(floor_) > left
                    while g > floor_ and need(g) > left:
                        g -= 1
                    while g < granted and need(g + 1) <= left:
                        g += 1
                    granted = min(granted, g)
            if blocked is not None:
                raise blocked[1]
            hold_usd = need(granted)
            for c, cap, line in plan.values():
                c[2] += granted if line.unit == "tokens" else hold_usd
            self._next_id += 1
            held = tuple([line.key, line.unit, line.period, c[0], granted if line.unit == "tokens" else hold_usd]
                         for c, cap, line in plan.values())
            res = Reservation(self._next_id, tuple(p[2] for p in plan.values()), granted, hold_usd, now, held=held)
            if self.write_ahead:
                self._open[res.id] = res
                self._opened.append([res.id, [row for row in held if row[4]]])
            return res, granted

    def _closing(self, reservation: Reservation) -> None:
        if self._open.pop(reservation.id, None) is not None:
            self._closed.append(reservation.id)

    def _worse(self, blocked, line: BudgetLine, c: list, cap: int, left: int, floor_: int, now: float):
        """Keep the refusal whose window resets last: naming the daily budget when the monthly
        one is also spent would send the user back too early."""
        end = window_bounds(line.period, now)[1]
        if blocked is not None and blocked[0] >= end:
            return blocked
        tokens = line.unit == "tokens"
        show = (lambda v: f"{v:,}") if tokens else (lambda v: _fmt_usd(v / _NANO))
        what = f"{_PERIOD_WORD[line.period]} {'token' if tokens else 'USD'} budget"
        held = f", {show(c[2])} held by requests in flight" if c[2] else ""
        status = f"used {show(c[1])} of {show(cap)}{held}"
        if left > 0:
            wanted = f"{floor_:,} tokens" if tokens else "its minimum cost"
            head = f"{what} has {show(left)} left, this request needs at least {wanted} ({status})"
        else:
            head = f"{what} exhausted ({status})"
        tail = "it does not reset; ask for a higher cap" if end == math.inf else f"it resets at {utc_iso(end)}"
        scale = 1 if tokens else _NANO
        err = ProxyError(429, "budget_exceeded", f"{head}; {tail}")
        err.event = ("budget.exceeded", budget_event(line, (c[1] + c[2]) / scale, cap / scale, now))
        return end, err

    def settle(self, reservation: Reservation, actual_tokens: int, actual_usd: float, now: float) -> None:
        """Replace the hold by what the provider reported (may exceed the hold when the input
        estimate was low). Queues the settled deltas for the journal. Idempotent."""
        spent_t = max(0, int(actual_tokens))
        spent_u = max(0, round(actual_usd * _NANO))
        with self._lock:
            if reservation.done:
                return
            reservation.done = True
            self._closing(reservation)
            for line in reservation.lines:
                cid = (line.key, line.unit, line.period)
                c = self._counter(cid, now)
                hold, spent = (reservation.tokens, spent_t) if line.unit == "tokens" else (reservation.usd_nano, spent_u)
                c[2] = c[2] - hold if c[2] > hold else 0
                if spent:
                    c[1] += spent
                    self._pending.append([line.key, line.unit, line.period, c[0], spent])

    def release(self, reservation: Reservation) -> None:
        """Drop the hold (error, cancel, disconnect): nothing is charged. Idempotent."""
        with self._lock:
            if reservation.done:
                return
            reservation.done = True
            self._closing(reservation)
            for line in reservation.lines:
                c = self._counters.get((line.key, line.unit, line.period))
                if c is not None:
                    hold = reservation.tokens if line.unit == "tokens" else reservation.usd_nano
                    c[2] = c[2] - hold if c[2] > hold else 0

    def usage(self, line: BudgetLine, now: float) -> tuple[float, float]:
        """(used, reserved) of the line's current window, in tokens or USD."""
        with self._lock:
            c = self._counters.get((line.key, line.unit, line.period))
            if c is None:
                return 0, 0
            used = c[1] if self._window_start(line.period, now) <= c[0] else 0
            if line.unit == "tokens":
                return used, c[2]
            return used / _NANO, c[2] / _NANO

    # -- persistence (UsageJournal) ------------------------------------------------------------

    def has_pending(self) -> bool:
        """Whether settled deltas (or opened / closed reservations) wait for the journal."""
        return bool(self._pending or self._opened or self._closed)

    def drain_journal(self) -> dict:
        """Everything the journal has not seen yet, as one journal record: settled deltas "d",
        reservations opened "o" ([id, rows]) and closed "c" (ids). A reservation opened and closed
        within the same batch needs no record of its own: its deltas say it all."""
        with self._lock:
            deltas, opened, closed = self._pending, self._opened, self._closed
            self._pending, self._opened, self._closed = [], [], []
        both = {rid for rid, _ in opened} & set(closed)
        out: dict = {}
        if deltas:
            out["d"] = deltas
        if opened := [o for o in opened if o[0] not in both]:
            out["o"] = opened
        if closed := [rid for rid in closed if rid not in both]:
            out["c"] = closed
        return out

    def skip_ids(self, last: int) -> None:
        """Number new reservations after `last` (the highest id a replayed journal holds)."""
        with self._lock:
            self._next_id = max(self._next_id, last)

    def drain(self) -> list[list]:
        """Settled deltas not yet journaled: [key, unit, period, window_start, amount] with
        amount in tokens or nano-dollars. The caller owns them from here on."""
        with self._lock:
            out, self._pending = self._pending, []
            return out

    def export(self, drain: bool = False) -> dict:
        """Settled counters as JSON-ready data, and under "open" the journaled reservations not
        settled yet (as [id, rows]; their holds are not counters). With drain=True, the pending
        journal records are dropped in the same atomic step, because the export already
        contains them (that is what a journal snapshot needs)."""
        with self._lock:
            rows = [[k, u, p, c[0], c[1]] for (k, u, p), c in self._counters.items() if c[1]]
            if drain:
                self._pending, self._opened, self._closed = [], [], []
            out: dict = {"version": 1, "counters": rows}
            if self._open:
                out["open"] = [[rid, [row for row in res.held if row[4]]] for rid, res in self._open.items()]
            return out

    def load(self, data: dict) -> None:
        """Restore counters from export() output (a journal snapshot). ValueError if malformed."""
        rows = data.get("counters") if isinstance(data, dict) else None
        self._merge(_check_rows(rows), add=False)

    def apply(self, deltas: list) -> None:
        """Add settled deltas (journal lines) to the counters. ValueError if malformed; then
        nothing is applied."""
        self._merge(_check_rows(deltas), add=True)

    def _merge(self, rows: list, add: bool) -> None:
        with self._lock:
            for key, unit, period, ws, amount in rows:
                cid = (key, unit, period)
                c = self._counters.get(cid)
                if c is None:
                    self._counters[cid] = [ws, amount, 0]
                elif ws > c[0]:
                    c[0], c[1] = ws, amount
                elif ws == c[0]:
                    c[1] = c[1] + amount if add else amount


                # rows of an older window than the counter's are history: ignored


def _check_rows(rows: Any) -> list:
    if not isinstance(rows, list):
        raise ValueError("expected a list of counters")
    for row in rows:
        if not (isinstance(row, list) and len(row) == 5 and isinstance(row[0], str)
                and row[1] in ("tokens", "usd") and row[2] in _PERIODS
                and isinstance(row[3], (int, float)) and not isinstance(row[3], bool)
                and _is_count(row[4]) and row[4] >= 0):
            raise ValueError(f"bad counter row {json.dumps(row, default=str)[:80]}")
    return rows
