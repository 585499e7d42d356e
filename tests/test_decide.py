"""limits.decide: budget grants and rate waits as pure functions of data (no State involved)."""
import bisect
import calendar
import math
from datetime import datetime, timezone

from hypothesis import given, settings, strategies as st

from tokenomics.limits.decide import (SLIDING_EXACT_ENTRIES, SLIDING_SLOTS, BudgetLine, Counter, Grant, RateRule,
                                      Refusal, _Sliding, bucket_wait, counter_cap, decide_grant, fixed_wait,
                                      parallel_refusal, rate_refusal, rate_weight, sliding_wait, tightest_lines,
                                      unavailable)
from tokenomics.pipeline import refusal_error

T0 = float(calendar.timegm(datetime(2026, 11, 27, 12, tzinfo=timezone.utc).timetuple()))
DAILY = BudgetLine("k", "tokens", "daily", 1000)


def counter(line, used=0, reserved=0):
    return Counter(line, counter_cap(line), used, reserved)


def test_grant_is_all_when_room_and_clamped_to_what_is_left():
    assert decide_grant([counter(DAILY)], 600, 0.0, T0, min_tokens=101) == Grant(600, 0)
    assert decide_grant([counter(DAILY, used=300, reserved=300)], 600, 0.0, T0, min_tokens=101) == Grant(400, 0)


def test_refusal_when_less_than_the_minimum_is_left():
    r = decide_grant([counter(DAILY, used=930)], 600, 0.0, T0, min_tokens=101)
    assert isinstance(r, Refusal) and r.code == "budget_exceeded" and r.retry_after is None
    assert r.message.startswith("daily token budget has 70 left, this request needs at least 101 tokens")
    assert r.event[0] == "budget.exceeded" and r.event[1]["remaining"] == 70


def test_usd_line_clamps_the_output():
    usd = BudgetLine("k", "usd", "daily", 0.0015)
    # 1000 input + 1000 output at 1 micro-dollar each: 2000 micro-dollars wanted, 1500 left
    g = decide_grant([counter(usd)], 2000, 0.002, T0, min_tokens=1001, usd_per_token=1e-6)
    assert g == Grant(1500, 1_500_000)
    r = decide_grant([counter(usd, used=600_000)], 2000, 0.002, T0, min_tokens=1001, usd_per_token=1e-6)
    assert r.code == "budget_exceeded" and "needs at least its minimum cost" in r.message


def test_the_refusal_names_the_window_that_resets_last():
    monthly = BudgetLine("k", "tokens", "monthly", 10)
    r = decide_grant([counter(DAILY, used=1000), counter(monthly, used=10)], 5, 0.0, T0)
    assert r.message.startswith("monthly token budget exhausted")


def test_tightest_line_per_counter():
    a, b = BudgetLine("k", "tokens", "daily", 500), BudgetLine("k", "tokens", "daily", 300)
    assert tightest_lines([a, b, BudgetLine("j", "tokens", "daily", 1)]) == [b, BudgetLine("j", "tokens", "daily", 1)]


def test_refusals_map_to_client_errors_in_one_place():
    rule = RateRule("requests", 3, 60.0, "sliding")
    err = refusal_error(rate_refusal("k", rule, 30))
    assert (err.status, err.code, err.headers) == (429, "rate_limited", {"Retry-After": "30"})
    assert "3 requests per 1m (sliding); retry in 30s" in err.message
    assert refusal_error(parallel_refusal("k", 2)).headers == {"Retry-After": "1"}
    err = refusal_error(unavailable("Redis at 127.0.0.1:6379 is unreachable"))
    assert (err.status, err.code) == (503, "state_unavailable")
    err = refusal_error(decide_grant([counter(DAILY, used=1000)], 5, 0.0, T0))
    assert (err.status, err.code, err.headers) == (429, "budget_exceeded", {})


def test_waits():
    assert sliding_wait(T0 + 30, T0) == 30
    assert sliding_wait(T0 + 0.25, T0) == 1  # at least a second
    fixed = RateRule("requests", 3, 60.0, "fixed")
    index = math.floor((T0 + 53) / 60)
    assert fixed_wait(fixed, index, index * 60 + 53) == 7
    bucket = RateRule("requests", 2, 10.0, "bucket")
    assert bucket_wait(bucket, 0.0, T0, 1, T0) == 5
    assert rate_weight(RateRule("tokens", 100, 1.0, "sliding"), 5000) == 100
    assert rate_weight(RateRule("requests", 100, 1.0, "sliding"), 5000) == 1


@settings(max_examples=200, deadline=None)
@given(window=st.sampled_from([0.3, 1.0, 2.5, 60.0]), offset=st.floats(0, 100, allow_nan=False),
       gap=st.floats(0.0001, 50, allow_nan=False))
def test_sliding_wait_is_minimal_and_enough(window, offset, gap):
    now = T0 + offset
    ready_at = now + gap
    n = sliding_wait(ready_at, now)
    assert n >= 1 and ready_at <= now + n
    assert n == 1 or ready_at > now + n - 1


@settings(max_examples=200, deadline=None)
@given(window=st.sampled_from([0.3, 1.0, 7.0, 60.0]), t=st.floats(0, 10_000, allow_nan=False))
def test_fixed_wait_lands_in_the_next_window(window, t):
    rule = RateRule("requests", 1, window, "fixed")
    now = T0 + t
    index = math.floor(now / window)
    n = fixed_wait(rule, index, now)
    assert math.floor((now + n) / window) > index
    assert n == 1 or math.floor((now + n - 1) / window) <= index


@settings(max_examples=200, deadline=None)
@given(limit=st.integers(1, 50), window=st.sampled_from([1.0, 10.0, 60.0]), level=st.floats(0, 1, allow_nan=False),
       data=st.data())
def test_bucket_wait_refills_enough(limit, window, level, data):
    rule = RateRule("requests", limit, window, "bucket")
    level *= limit
    w = data.draw(st.integers(1, limit))
    if level >= w:
        return
    n = bucket_wait(rule, level, T0, w, T0)
    rate = limit / window
    assert min(limit, level + n * rate) >= w
    assert n == 1 or min(limit, level + (n - 1) * rate) < w


@settings(max_examples=300, deadline=None)
@given(data=st.data(), cap=st.integers(50, 3000), n=st.integers(1, 25))
def test_n_concurrent_reservations_never_overrun_the_cap_beyond_the_input_error(data, cap, n):
    """Grants decided one after the other on the counter as it stands (as any State does
    atomically), settled in any order to real usage that never exceeds the output cap given but
    may exceed the input estimate: the total stays within cap + the input underestimates."""
    line = BudgetLine("k", "tokens", "total", cap)
    used = reserved = slack = 0
    pending, flight = list(range(n)), {}
    while pending or flight:
        options = [("r", i) for i in pending] + [("s", i) for i in flight]
        kind, i = options[data.draw(st.integers(0, len(options) - 1))]
        if kind == "r":
            pending.remove(i)
            est, want = data.draw(st.integers(1, 300)), data.draw(st.integers(1, 600))
            verdict = decide_grant([counter(line, used, reserved)], est + want, 0.0, T0, min_tokens=est + 1)
            if isinstance(verdict, Refusal):
                assert cap - used - reserved < est + 1
                continue
            assert est + 1 <= verdict.tokens <= min(est + want, cap - used - reserved)
            reserved += verdict.tokens
            flight[i] = (verdict.tokens, est)
        else:
            hold, est = flight.pop(i)
            real_in = est + data.draw(st.integers(-est // 2, 40))
            real_out = data.draw(st.integers(0, hold - est))
            slack += max(0, real_in - est)
            reserved -= hold
            used += real_in + real_out
    assert reserved == 0
    assert used <= cap + slack


# -- the sliding log's bound ----------------------------------------------------------------------

class _ExactLog:
    """The reference: every admission kept, to the microsecond, with running sums."""

    def __init__(self):
        self.times: list[float] = []
        self.sums: list[int] = [0]  # sums[i]: the weight of the first i admissions

    def add(self, t, w):
        self.times.append(t)
        self.sums.append(self.sums[-1] + w)

    def _first_inside(self, window, now):
        return bisect.bisect_right(self.times, now, key=lambda t: t + window)  # t + window > now: inside

    def held(self, window, now):
        return self.sums[-1] - self.sums[self._first_inside(window, now)]

    def wait(self, rule, w, now):
        first = self._first_inside(rule.window, now)
        excess = self.sums[-1] - self.sums[first] + w - rule.limit
        last = bisect.bisect_left(self.sums, self.sums[first] + excess) - 1  # the admission that frees enough
        return sliding_wait(self.times[last] + rule.window, now)


@settings(max_examples=80, deadline=None)
@given(kind=st.sampled_from(["requests", "tokens"]), limit=st.integers(1, 1000), window=st.sampled_from([1.0, 60.0]),
       entries=st.integers(1, 40), gap=st.sampled_from([3, 50]), rng=st.randoms(use_true_random=False))
def test_a_bounded_sliding_log_never_admits_more_than_the_exact_log(kind, limit, window, entries, gap, rng):
    # gaps in thousandths of the window: up to 3 keeps every admission inside one slot of the last;
    # a run long enough (800-1,500 requests) to go past `entries` and through several windows
    steps = [(rng.randint(0, gap) / 1000, rng.randint(1, 40)) for _ in range(rng.randint(800, 1500))]
    # `entries` stands for SLIDING_EXACT_ENTRIES, small so that a short run goes past it
    rule, exact, now = RateRule(kind, limit, window, "sliding"), _ExactLog(), T0
    bounded = _Sliding(rule, entries)
    for gap, tokens in steps:
        now += gap * window
        w = rate_weight(rule, tokens)
        r = bounded.retry_after(rule, w, now)
        free = rule.limit - exact.held(window, now) >= w
        if r == 0:
            assert free, "the bounded log admitted what the exact log refuses"
            bounded.take(w, now)
            exact.add(now, w)
        else:
            assert 0 < r <= math.ceil(window), r
            if not free:
                assert r >= exact.wait(rule, w, now)  # never sends a client back before the exact log would
        assert len(bounded.times) <= entries + SLIDING_SLOTS + 1
        assert bounded.total == sum(bounded.weights)
        # and it holds admissions at most one slot longer than the exact log: it refuses no more
        # than a log whose window were window / SLIDING_SLOTS longer would
        bounded.retry_after(rule, 0, now)
        assert bounded.total <= exact.held(window * (1 + 1 / SLIDING_SLOTS), now)


def test_up_to_the_exact_entries_the_sliding_log_is_exact_and_past_them_it_stays_small():
    exact_rule = RateRule("requests", SLIDING_EXACT_ENTRIES, 60.0, "sliding")
    log = _Sliding(exact_rule)
    for i in range(SLIDING_EXACT_ENTRIES):
        assert log.retry_after(exact_rule, 1, T0 + i * 1e-6) == 0
        log.take(1, T0 + i * 1e-6)
    assert log.retry_after(exact_rule, 1, T0 + 60) == 0  # the first admission left exactly a minute on
    huge = RateRule("requests", 10 ** 9, 60.0, "sliding")
    log = _Sliding(huge)
    for i in range(200_000):  # 2,000 req/s for 100 s
        now = T0 + i / 2000
        assert log.retry_after(huge, 1, now) == 0
        log.take(1, now)
    assert len(log.times) <= SLIDING_EXACT_ENTRIES + SLIDING_SLOTS + 1
    # the last minute's 120,000 admissions, each counted, plus at most the one joined entry that
    # straddles the window's start (held up to window / SLIDING_SLOTS longer: 2,000 * 60 / 256)
    assert 120_000 <= log.total <= 120_000 + math.ceil(2000 * 60 / SLIDING_SLOTS)
