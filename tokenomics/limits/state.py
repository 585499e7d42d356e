"""State: the atomic verbs (reserve, settle, release, admit, enter, leave) behind one interface,
and the in-process implementation."""

import json
import math
import threading
from typing import Any

from ..limits.decide import (BudgetLine, Counter, RateRule, Refusal, Reservation, _Bucket, _Fixed, _NANO, _PERIODS,
                             _PERIOD_SECONDS, _Sliding, _is_count, counter_cap, counter_id, decide_grant,
                             parallel_refusal, rate_refusal, rate_weight, tightest_lines, window_bounds)


_SWEEP_EVERY = 60.0  # seconds between eviction sweeps: bounds memory, amortised to nothing per call


class State:
    """Counters and leases behind one narrow interface: rate-limit windows, parallel slots,
    budget reservations. Every verb is atomic on its own; callers never read-then-write. The
    arithmetic (what fits, what is granted, how long to wait, what the refusal says) lives in
    `limits.decide`; a verb that cannot admit returns that module's Refusal, never raises it.
    MemoryState implements it in-process, RedisState (limits.redis_state) with one Lua script
    per verdict, shared by every proxy on the same Redis."""

    def admit(self, key: str, rules: tuple[RateRule, ...], now: float, tokens: int = 0) -> Refusal | None:
        """Count one request under every rule, or under none (the Refusal of the longest wait)."""
        raise NotImplementedError

    def enter(self, key: str, max_parallel: int | None) -> Refusal | None:
        """Take a parallel slot (a lease: given back by leave(), or when its holder dies)."""
        raise NotImplementedError

    def leave(self, key: str) -> None:
        raise NotImplementedError

    def reserve(self, lines: list[BudgetLine], tokens: int, usd: float, now: float,
                min_tokens: int = 1, usd_per_token: float = 0.0) -> "tuple[Reservation, int] | Refusal":
        """Hold what decide_grant() allows on every counter of `lines`: (reservation, granted tokens)."""
        raise NotImplementedError

    def settle(self, reservation: Reservation, actual_tokens: int, actual_usd: float, now: float) -> None:
        raise NotImplementedError

    def release(self, reservation: Reservation) -> None:
        raise NotImplementedError

    def usage(self, line: BudgetLine, now: float) -> tuple[float, float]:
        raise NotImplementedError

    def has_pending(self) -> bool:
        """Whether records wait for a usage journal (only the in-process state keeps one)."""
        return False

    def close(self) -> None:
        """Stop background work and let go of connections; the in-process state has none."""


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

    def admit(self, key: str, rules: tuple[RateRule, ...], now: float, tokens: int = 0) -> Refusal | None:
        """Admit one request under every rule or refuse it (rate_limited); all or nothing.
        Request rules count 1, token rules count `tokens` (an estimate), see rate_weight()."""
        if not rules:
            return None
        with self._lock:
            self._maybe_sweep(now)
            plan = []
            wait, refusing = 0, None
            for rule in rules:
                sk = (key, rule)
                st = self._rates.get(sk)
                if st is None:
                    if rule.strategy == "sliding":
                        st = _Sliding(rule)
                    elif rule.strategy == "fixed":
                        st = _Fixed()
                    else:
                        st = _Bucket(rule, now)
                    self._rates[sk] = st
                w = rate_weight(rule, tokens)
                r = st.retry_after(rule, w, now)
                if r > wait:
                    wait, refusing = r, rule
                plan.append((st, w))
            if refusing is not None:
                return rate_refusal(key, refusing, wait)
            for st, w in plan:
                st.take(w, now)
            return None

    def enter(self, key: str, max_parallel: int | None) -> Refusal | None:
        """Take a parallel slot (always counted; refused only at max_parallel). Pair with leave()."""
        with self._lock:
            n = self._parallel.get(key, 0)
            if max_parallel is not None and n >= max_parallel:
                return parallel_refusal(key, max_parallel)
            self._parallel[key] = n + 1
            return None

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
                min_tokens: int = 1, usd_per_token: float = 0.0) -> "tuple[Reservation, int] | Refusal":
        """Hold what decide_grant() allows on every line: (reservation, granted tokens), or its
        Refusal (budget_exceeded). The caller lowers the upstream output limit to granted - input
        estimate."""
        with self._lock:
            self._maybe_sweep(now)
            plan = [(line, self._counter(counter_id(line), now)) for line in tightest_lines(lines)]
            verdict = decide_grant([Counter(line, counter_cap(line), c[1], c[2]) for line, c in plan],
                                   tokens, usd, now, min_tokens, usd_per_token)
            if isinstance(verdict, Refusal):
                return verdict
            held = []
            for line, c in plan:
                hold = verdict.tokens if line.unit == "tokens" else verdict.usd_nano
                c[2] += hold
                held.append([line.key, line.unit, line.period, c[0], hold])
            self._next_id += 1
            res = Reservation(self._next_id, tuple(line for line, _ in plan), verdict.tokens, verdict.usd_nano,
                              now, held=tuple(held))
            if self.write_ahead:
                self._open[res.id] = res
                self._opened.append([res.id, [row for row in held if row[4]]])
            return res, verdict.tokens

    def _closing(self, reservation: Reservation) -> None:
        if self._open.pop(reservation.id, None) is not None:
            self._closed.append(reservation.id)

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
