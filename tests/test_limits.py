"""Limits and state: prices, windows, rate limits, budget reservations, usage journal."""
import calendar
import json
import math
import os
import stat
import subprocess
import sys
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import tokenomics
import tokenomics.limits.decide
from tokenomics.errors import RuntimeFailure, UsageError
from tokenomics.limits.decide import BudgetLine, RateRule, budget_event, estimate_tokens, parse_budget, parse_rate_limit, rate_event, window_bounds
from tokenomics.limits.journal import UsageJournal
from tokenomics.limits.prices import PRICES, Usage, cost_usd, parse_pricing, price_for
from tokenomics.limits.state import MemoryState
from tokenomics.limits.decide import Refusal
from tokenomics.pipeline import refusal_error


def utc(*args) -> float:
    return float(calendar.timegm(datetime(*args, tzinfo=timezone.utc).timetuple()))


T0 = utc(2026, 11, 27, 12, 0, 0)


class Refused:
    """What the client would see of a Refusal (the pipeline's mapping), and its event."""

    def __init__(self, refusal: Refusal):
        err = refusal_error(refusal)
        self.status, self.code, self.message, self.headers = err.status, err.code, err.message, err.headers
        self.event = refusal.event


def refused(fn, *args, **kwargs) -> Refused:
    out = fn(*args, **kwargs)
    assert isinstance(out, Refusal), out
    return Refused(out)


def admitted(out) -> bool:
    """A verb's verdict: True when admitted, False for a Refusal."""
    return not isinstance(out, Refusal)


# -- windows ------------------------------------------------------------------------------------

@pytest.mark.parametrize("now, start, end", [
    (utc(2026, 1, 31, 23, 59, 59), utc(2026, 1, 1), utc(2026, 2, 1)),
    (utc(2026, 2, 1), utc(2026, 2, 1), utc(2026, 3, 1)),              # first instant belongs to the new month
    (utc(2024, 2, 29, 12), utc(2024, 2, 1), utc(2024, 3, 1)),          # leap year
    (utc(2023, 2, 28, 23, 59, 59), utc(2023, 2, 1), utc(2023, 3, 1)),
    (utc(2000, 2, 15), utc(2000, 2, 1), utc(2000, 3, 1)),              # divisible by 400: leap
    (utc(2100, 2, 15), utc(2100, 2, 1), utc(2100, 3, 1)),              # divisible by 100: not leap
    (utc(2026, 12, 31, 23, 59, 59) + 0.999, utc(2026, 12, 1), utc(2027, 1, 1)),  # year end
    (utc(2027, 1, 1), utc(2027, 1, 1), utc(2027, 2, 1)),
    (utc(2026, 4, 30, 23, 59, 59), utc(2026, 4, 1), utc(2026, 5, 1)),  # 30-day month
])
def test_monthly_window_is_the_utc_calendar_month(now, start, end):
    assert window_bounds("monthly", now) == (start, end)


def test_month_lengths_over_a_leap_cycle():
    lengths = []
    for year in (2024, 2025):
        for month in range(1, 13):
            s, e = window_bounds("monthly", utc(year, month, 10))
            lengths.append(round((e - s) / 86400))
    assert lengths == [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31,
                       31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]


def test_hourly_daily_total_windows():
    now = utc(2026, 11, 27, 13, 45, 10) + 0.5
    assert window_bounds("hourly", now) == (utc(2026, 11, 27, 13), utc(2026, 11, 27, 14))
    assert window_bounds("daily", now) == (utc(2026, 11, 27), utc(2026, 11, 28))
    assert window_bounds("daily", utc(2026, 11, 28)) == (utc(2026, 11, 28), utc(2026, 11, 29))
    assert window_bounds("total", now) == (0.0, math.inf)
    with pytest.raises(ValueError):
        window_bounds("weekly", now)


@given(now=st.floats(0, 4102444800), period=st.sampled_from(["hourly", "daily", "monthly"]))
def test_windows_contain_now_and_tile_time(now, period):
    start, end = window_bounds(period, now)
    assert start <= now < end
    assert window_bounds(period, start) == (start, end)
    assert window_bounds(period, end)[0] == end  # the next window starts where this one ends
    dt = datetime.fromtimestamp(start, timezone.utc)
    assert (dt.minute, dt.second) == (0, 0)
    if period != "hourly":
        assert dt.hour == 0
    if period == "monthly":
        assert dt.day == 1


# -- prices ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, key", [
    ("gpt-4o", "gpt-4o"),
    ("gpt-4o-2024-08-06", "gpt-4o"),
    ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),       # an exact entry beats suffix stripping
    ("GPT-4o-Mini", "gpt-4o-mini"),
    ("openai/gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
    ("gpt-4o-mini-search-preview-2025-03-11", "gpt-4o-mini"),
    ("gpt-5.1-codex-max", "gpt-5.1"),
    ("o3-mini-2025-01-31", "o3-mini"),
    ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
    ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
    ("claude-opus-4-20250514", "claude-opus-4"),
    ("claude-opus-4-5-20251101", "claude-opus-4-5"),
    ("anthropic/claude-haiku-4-5", "claude-haiku-4-5"),
    ("us.anthropic.claude-3-5-sonnet-20241022-v2:0", "claude-3-5-sonnet"),
    ("claude-3-5-sonnet-v2@20241022", "claude-3-5-sonnet"),
    ("models/gemini-2.5-pro", "gemini-2.5-pro"),
    ("gemini-2.5-flash-preview-05-20", "gemini-2.5-flash"),
    ("gemini-2.0-flash-001", "gemini-2.0-flash"),
    ("gemini-3-pro-preview", "gemini-3-pro"),
    ("mistral-small-2506", "mistral-small"),
    ("mistral-large-latest", "mistral-large-latest"),
    ("codestral-latest", "codestral"),
    ("deepseek/deepseek-chat", "deepseek-chat"),
    ("groq/llama-3.3-70b-versatile", "llama-3.3-70b-versatile"),
    ("meta-llama/llama-4-scout-17b-16e-instruct", "llama-4-scout-17b-16e-instruct"),
])
def test_price_matching(model, key):
    assert price_for(model) == PRICES[key]


@pytest.mark.parametrize("model", ["", "my-local-model", "llama3", "ft:gpt-4o-mini:acme::abc", "gpt"])
def test_unknown_models_have_no_price(model):
    assert price_for(model) is None
    assert cost_usd(model, Usage(input_tokens=1000, output_tokens=1000)) == 0.0


def test_price_table_is_well_formed():
    for model, (inp, cached, out) in PRICES.items():
        assert model == model.lower() and "/" not in model
        assert 0 <= cached <= inp and out >= 0, model


def test_pricing_overrides_win_and_extend():
    overrides = parse_pricing({"gpt-4o": {"input": 1, "output": 2},
                               "Acme/House-Model": {"input": 3, "cached_input": 0.3, "output": 9}})
    assert overrides == {"gpt-4o": (1.0, 1.0, 2.0), "house-model": (3.0, 0.3, 9.0)}
    assert price_for("gpt-4o-2024-08-06", overrides) == (1.0, 1.0, 2.0)
    assert price_for("acme/house-model-2026-01-01", overrides) == (3.0, 0.3, 9.0)
    assert price_for("gpt-4o-mini", overrides) == PRICES["gpt-4o-mini"]
    # raw config values (dicts) work too
    assert price_for("x", {"x": {"input": 1.5, "output": 2}}) == (1.5, 1.5, 2.0)


def test_cost_openai_cached_input_at_cached_rate():
    u = Usage(input_tokens=1_000_000, output_tokens=100_000, cached_input_tokens=400_000)
    # 600k uncached at 2.50 + 400k cached at 1.25 + 100k out at 10.00
    assert cost_usd("gpt-4o", u) == pytest.approx(1.50 + 0.50 + 1.00)


def test_cost_anthropic_cache_write_premium():
    u = Usage(input_tokens=30_000, output_tokens=2_000, cached_input_tokens=10_000,
              cache_creation_tokens=10_000)
    expected = (10_000 * 3.0 + 10_000 * 0.30 + 10_000 * 3.75 + 2_000 * 15.0) / 1e6
    assert cost_usd("claude-sonnet-4-5-20250929", u) == pytest.approx(expected)
    assert u.total_tokens == 32_000


def test_cost_never_negative_on_inconsistent_usage():
    u = Usage(input_tokens=10, output_tokens=5, cached_input_tokens=50)
    assert cost_usd("gpt-4o", u) >= 0


@pytest.mark.parametrize("raw, where", [
    ([], "pricing:"),
    ({"m": 3}, "pricing.m:"),
    ({"m": {"input": 1}}, "pricing.m.output:"),
    ({"m": {"input": 1, "output": -1}}, "pricing.m.output:"),
    ({"m": {"input": "1", "output": 1}}, "pricing.m.input:"),
    ({"m": {"input": 1, "output": 1, "cache": 1}}, "pricing.m.cache:"),
])
def test_parse_pricing_errors_name_the_path(raw, where):
    with pytest.raises(UsageError, match="^" + where.replace(".", r"\.")):
        parse_pricing(raw)


# -- policy parsing -------------------------------------------------------------------------------

def test_parse_rate_limit_valid():
    rules, par = parse_rate_limit({"rules": [{"requests": 3, "window": "1m"},
                                             {"tokens": 10000, "window": "1h", "strategy": "bucket"},
                                             {"requests": 5, "window": 2.5, "strategy": "fixed"}],
                                   "max_parallel": 2})
    assert rules == (RateRule("requests", 3, 60.0, "sliding"), RateRule("tokens", 10000, 3600.0, "bucket"),
                     RateRule("requests", 5, 2.5, "fixed"))
    assert par == 2
    assert parse_rate_limit(None) == ((), None)
    assert parse_rate_limit({}) == ((), None)


@pytest.mark.parametrize("raw, message", [
    ([], "rate_limit: expected an object"),
    ({"rule": []}, "rate_limit.rule: unknown field"),
    ({"rules": {}}, "rate_limit.rules: expected a list"),
    ({"rules": [3]}, r"rate_limit.rules\[0\]: expected an object"),
    ({"rules": [{"requests": 1, "window": "1m"}, {"window": "1m"}]}, r"rate_limit.rules\[1\]: give exactly one"),
    ({"rules": [{"requests": 1, "tokens": 5, "window": "1m"}]}, r"rate_limit.rules\[0\]: give exactly one"),
    ({"rules": [{"requests": 0, "window": "1m"}]}, r"rate_limit.rules\[0\].requests: expected a whole number"),
    ({"rules": [{"requests": True, "window": "1m"}]}, r"rate_limit.rules\[0\].requests: expected a whole number"),
    ({"rules": [{"tokens": 1.5, "window": "1m"}]}, r"rate_limit.rules\[0\].tokens: expected a whole number"),
    ({"rules": [{"requests": 1}]}, r"rate_limit.rules\[0\].window: missing"),
    ({"rules": [{"requests": 1, "window": "1 minute"}]}, r"rate_limit.rules\[0\].window: not a duration"),
    ({"rules": [{"requests": 1, "window": "0s"}]}, r"rate_limit.rules\[0\].window: must be longer than 0"),
    ({"rules": [{"requests": 1, "window": -5}]}, r"rate_limit.rules\[0\].window: must be longer than 0"),
    ({"rules": [{"requests": 1, "window": "1m", "strategy": "leaky"}]}, r"rate_limit.rules\[0\].strategy: expected"),
    ({"rules": [{"requests": 1, "window": "1m", "burst": 3}]}, r"rate_limit.rules\[0\].burst: unknown field"),
    ({"max_parallel": 0}, "rate_limit.max_parallel: expected a whole number"),
    ({"max_parallel": "2"}, "rate_limit.max_parallel: expected a whole number"),
])
def test_parse_rate_limit_errors_name_the_path(raw, message):
    with pytest.raises(UsageError, match="^" + message):
        parse_rate_limit(raw)


def test_parse_rate_limit_custom_path():
    with pytest.raises(UsageError, match=r"^providers.openai\[0\].rate_limit.max_parallel:"):
        parse_rate_limit({"max_parallel": -1}, path="providers.openai[0].rate_limit")


def test_parse_budget():
    assert parse_budget({"tokens": {"daily": 100000, "total": 5e6}, "usd": {"monthly": 20.5, "hourly": None}}) == (
        ("tokens", "daily", 100000.0), ("tokens", "total", 5e6), ("usd", "monthly", 20.5))
    assert parse_budget(None) == ()
    assert parse_budget({"usd": {"daily": 0}}) == (("usd", "daily", 0.0),)


@pytest.mark.parametrize("raw, message", [
    ("10", "budget: expected an object"),
    ({"dollars": {}}, "budget.dollars: unknown field"),
    ({"tokens": 5}, "budget.tokens: expected an object"),
    ({"tokens": {"weekly": 5}}, "budget.tokens.weekly: unknown field"),
    ({"usd": {"daily": -1}}, "budget.usd.daily: expected a number >= 0"),
    ({"usd": {"daily": "5"}}, "budget.usd.daily: expected a number >= 0"),
    ({"tokens": {"total": True}}, "budget.tokens.total: expected a number >= 0"),
    ({"tokens": {"total": float("inf")}}, "budget.tokens.total: expected a number >= 0"),
])
def test_parse_budget_errors_name_the_path(raw, message):
    with pytest.raises(UsageError, match="^" + message.replace(".", r"\.")):
        parse_budget(raw)


# -- rate limits ----------------------------------------------------------------------------------

def test_sliding_window_exact_boundaries_and_retry_after():
    s, rule = MemoryState(), RateRule("requests", 3, 60.0, "sliding")
    for t in (0, 10, 20):
        s.admit("k", (rule,), T0 + t)
    err = refused(s.admit, "k", (rule,), T0 + 30)
    assert (err.status, err.code, err.headers) == (429, "rate_limited", {"Retry-After": "30"})
    assert "3 requests per 1m" in err.message
    assert err.event == ("rate.exceeded", {"key": "k", "kind": "requests", "limit": 3, "window": 60.0,
                                           "strategy": "sliding", "retry_after": 30})
    refused(s.admit, "k", (rule,), T0 + 59.999)
    s.admit("k", (rule,), T0 + 60)            # the request at T0 left the trailing window exactly now
    err = refused(s.admit, "k", (rule,), T0 + 60)
    assert err.headers["Retry-After"] == "10"  # next to leave: the one at T0+10
    s.admit("k", (rule,), T0 + 70)


def test_three_per_minute_fourth_is_refused_until_a_minute_passed():
    s, rule = MemoryState(), RateRule("requests", 3, 60.0, "sliding")
    for _ in range(3):
        s.admit("k", (rule,), T0)
    err = refused(s.admit, "k", (rule,), T0 + 0.25)
    assert err.headers["Retry-After"] == "60"  # 59.75 s, rounded up
    s.admit("k", (rule,), T0 + 60)


def test_keys_are_independent():
    s, rule = MemoryState(), RateRule("requests", 1, 60.0, "sliding")
    s.admit("a", (rule,), T0)
    s.admit("b", (rule,), T0)
    refused(s.admit, "a", (rule,), T0)


def test_fixed_window_is_aligned():
    s, rule = MemoryState(), RateRule("requests", 3, 60.0, "fixed")
    base = math.floor(T0 / 60) * 60
    for t in (50, 51, 52):
        s.admit("k", (rule,), base + t)
    err = refused(s.admit, "k", (rule,), base + 53)
    assert err.headers["Retry-After"] == "7"
    for _ in range(3):
        s.admit("k", (rule,), base + 60)   # a new aligned window: a full allowance at once
    refused(s.admit, "k", (rule,), base + 119.5)


def test_bucket_refills_continuously():
    s, rule = MemoryState(), RateRule("requests", 2, 10.0, "bucket")
    s.admit("k", (rule,), T0)
    s.admit("k", (rule,), T0)
    err = refused(s.admit, "k", (rule,), T0)
    assert err.headers["Retry-After"] == "5"  # one token per 5 s
    refused(s.admit, "k", (rule,), T0 + 4.9)
    s.admit("k", (rule,), T0 + 5)
    # idle long enough: the bucket is full again, but never more than its capacity
    s.admit("k", (rule,), T0 + 1000)
    s.admit("k", (rule,), T0 + 1000)
    refused(s.admit, "k", (rule,), T0 + 1000)


def test_token_rule_counts_the_estimate_and_caps_oversized_requests():
    s, rule = MemoryState(), RateRule("tokens", 1000, 60.0, "sliding")
    s.admit("k", (rule,), T0, tokens=600)
    s.admit("k", (rule,), T0 + 1, tokens=300)
    err = refused(s.admit, "k", (rule,), T0 + 2, tokens=200)
    assert err.headers["Retry-After"] == "58"
    assert "1000 tokens per 1m" in err.message
    s.admit("k", (rule,), T0 + 2, tokens=100)  # still fits
    s.admit("k", (rule,), T0 + 62, tokens=5000)  # larger than the limit: passes an empty window, fills it
    refused(s.admit, "k", (rule,), T0 + 63, tokens=1)
    s.admit("k", (rule,), T0 + 63, tokens=0)  # a zero estimate never waits on a token rule


def test_admission_is_all_or_nothing():
    s = MemoryState()
    loose, tight = RateRule("requests", 10, 60.0, "sliding"), RateRule("requests", 1, 60.0, "fixed")
    s.admit("k", (tight,), T0)
    for _ in range(5):
        refused(s.admit, "k", (loose, tight), T0 + 1)
    for _ in range(10):  # none of the refused attempts consumed the loose rule
        s.admit("k", (loose,), T0 + 1)


def test_retry_after_is_the_longest_wait_across_rules():
    s = MemoryState()
    a, b = RateRule("requests", 1, 10.0, "sliding"), RateRule("requests", 1, 100.0, "sliding")
    s.admit("k", (a, b), T0)
    assert refused(s.admit, "k", (a, b), T0).headers["Retry-After"] == "100"


gaps = st.lists(st.floats(0, 40, allow_nan=False, allow_infinity=False), min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(strategy=st.sampled_from(["sliding", "fixed", "bucket"]), limit=st.integers(1, 5),
       window=st.sampled_from([1.0, 2.5, 10.0, 60.0, 0.3]), gaps=gaps, data=st.data())
def test_retry_after_is_exact(strategy, limit, window, gaps, data):
    """Refused at t with Retry-After n: admitted at t+n, still refused at t+n-1 (n is minimal)."""
    s, rule = MemoryState(), RateRule("requests", limit, window, strategy)
    t = T0
    for g in gaps:
        t += g
        out = s.admit("k", (rule,), t)
        if admitted(out):
            continue
        n = int(Refused(out).headers["Retry-After"])
        assert n >= 1
        if n > 1 and data.draw(st.booleans()):
            refused(s.admit, "k", (rule,), t + n - 1)
            t += n - 1
        else:
            s.admit("k", (rule,), t + n)
            t += n


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(1, 6), window=st.sampled_from([1.0, 3.0, 60.0]), gaps=gaps)
def test_sliding_never_admits_more_than_n_in_any_trailing_window(limit, window, gaps):
    s, rule = MemoryState(), RateRule("requests", limit, window, "sliding")
    admitted, refused_at, t = [], [], T0
    for g in gaps:
        t += g
        if s.admit("k", (rule,), t) is None:
            admitted.append(t)
        else:
            refused_at.append(t)
    for a in admitted:  # at most N in the window ending at each admission
        assert sum(1 for x in admitted if x <= a and x + window > a) <= limit
    for r in refused_at:  # and exact: a refusal means the trailing window really was full
        assert sum(1 for x in admitted if x <= r and x + window > r) == limit


@settings(max_examples=200, deadline=None)
@given(limit=st.integers(1, 2000), window=st.sampled_from([1.0, 60.0]), data=st.data(), gaps=gaps)
def test_sliding_token_rule_never_exceeds_its_limit(limit, window, data, gaps):
    s, rule = MemoryState(), RateRule("tokens", limit, window, "sliding")
    admitted, t = [], T0
    for g in gaps:
        t += g
        w = data.draw(st.integers(0, limit))
        if s.admit("k", (rule,), t, tokens=w) is None:
            admitted.append((t, w))
        else:
            assert sum(x[1] for x in admitted if x[0] + window > t) + w > limit
    for a, _ in admitted:
        assert sum(w for x, w in admitted if x <= a and x + window > a) <= limit


@settings(max_examples=200, deadline=None)
@given(limit=st.integers(1, 6), window=st.sampled_from([1.0, 10.0, 60.0]), gaps=gaps)
def test_fixed_and_bucket_never_exceed_their_allowance(limit, window, gaps):
    fixed = (MemoryState(), RateRule("requests", limit, window, "fixed"), [])
    bucket = (MemoryState(), RateRule("requests", limit, window, "bucket"), [])
    t = T0
    for g in gaps:
        t += g
        for s, rule, log in (fixed, bucket):
            if s.admit("k", (rule,), t) is None:
                log.append(t)
    counts = {}
    for x in fixed[2]:
        counts[math.floor(x / window)] = counts.get(math.floor(x / window), 0) + 1
    assert all(c <= limit for c in counts.values())
    log = bucket[2]
    for i, a in enumerate(log):  # any interval holds at most capacity + refill
        for j in range(i, len(log)):
            assert j - i + 1 <= limit + (log[j] - a) * limit / window + 1e-9


def test_max_parallel():
    s = MemoryState()
    s.enter("k", 2)
    s.enter("k", 2)
    err = refused(s.enter, "k", 2)
    assert (err.status, err.code, err.headers) == (429, "rate_limited", {"Retry-After": "1"})
    assert err.event == ("rate.exceeded", {"key": "k", "kind": "parallel", "limit": 2, "retry_after": 1})
    s.enter("other", 2)
    s.leave("k")
    s.enter("k", 2)
    assert s.in_flight("k") == 2
    for _ in range(5):
        s.leave("k")  # extra leaves are harmless
    assert s.in_flight("k") == 0
    s.enter("k", None)  # unlimited, still counted
    assert s.in_flight("k") == 1


# -- budgets --------------------------------------------------------------------------------------

def test_reserve_clamps_then_refuses():
    s = MemoryState()
    daily = BudgetLine("h1:global", "tokens", "daily", 1000)
    res1, g1 = s.reserve([daily], 600, 0.0, T0, min_tokens=101)
    assert g1 == 600
    res2, g2 = s.reserve([daily], 600, 0.0, T0, min_tokens=101)
    assert g2 == 400  # the caller lowers the output cap to 400 - input estimate
    assert s.usage(daily, T0) == (0, 1000)
    err = refused(s.reserve, [daily], 600, 0.0, T0, min_tokens=101)
    assert (err.status, err.code) == (429, "budget_exceeded")
    assert err.message == ("daily token budget exhausted (used 0 of 1,000, 1,000 held by requests in flight); "
                           "it resets at 2026-11-28T00:00:00Z")
    assert "h1" not in err.message
    s.settle(res1, 550, 0.0, T0)
    s.settle(res2, 380, 0.0, T0)
    assert s.usage(daily, T0) == (930, 0)
    err = refused(s.reserve, [daily], 600, 0.0, T0, min_tokens=101)
    assert err.message.startswith("daily token budget has 70 left, this request needs at least 101 tokens "
                                  "(used 930 of 1,000)")
    kind, data = err.event
    assert kind == "budget.exceeded"
    assert data == {"key": "h1:global", "unit": "tokens", "period": "daily", "used": 930, "cap": 1000,
                    "remaining": 70, "percent": 93.0, "window_start": "2026-11-27T00:00:00Z",
                    "resets_at": "2026-11-28T00:00:00Z"}
    res3, g3 = s.reserve([daily], 600, 0.0, T0, min_tokens=50)
    assert g3 == 70


def test_settle_and_release_are_exactly_once():
    s = MemoryState()
    line = BudgetLine("k", "tokens", "total", 100)
    res, _ = s.reserve([line], 60, 0.0, T0)
    s.settle(res, 50, 0.0, T0)
    s.settle(res, 50, 0.0, T0)
    s.release(res)
    assert s.usage(line, T0) == (50, 0)
    res, _ = s.reserve([line], 30, 0.0, T0)
    s.release(res)
    s.release(res)
    s.settle(res, 30, 0.0, T0)
    assert s.usage(line, T0) == (50, 0)
    assert s.drain() == [["k", "tokens", "total", 0.0, 50]]


def test_settle_may_exceed_the_hold_when_the_estimate_was_low():
    s = MemoryState()
    line = BudgetLine("k", "tokens", "total", 100)
    res, g = s.reserve([line], 80, 0.0, T0)
    s.settle(res, 120, 0.0, T0)
    assert s.usage(line, T0) == (120, 0)
    err = refused(s.reserve, [line], 1, 0.0, T0)
    assert "lifetime token budget exhausted (used 120 of 100); it does not reset" in err.message


def test_usd_lines_clamp_through_the_output_rate():
    s = MemoryState()
    usd = BudgetLine("k", "usd", "monthly", 1.00)
    # 1,000 input tokens at $2.50/M and up to 100,000 output tokens at $10/M: $1.0025 wanted
    res, g = s.reserve([usd], 101_000, 0.0025 + 1.0, T0, min_tokens=1001, usd_per_token=10 / 1e6)
    assert g == 100_750  # 99,750 output tokens: $0.0025 + $0.9975
    assert s.usage(usd, T0) == (0, pytest.approx(1.0))
    assert res.usd == pytest.approx(1.0)
    s.settle(res, 2000, 0.0125, T0)
    assert s.usage(usd, T0) == (pytest.approx(0.0125), 0)


def test_usd_budget_refuses_when_spent_even_for_unpriced_models():
    s = MemoryState()
    usd = BudgetLine("k", "usd", "daily", 0.5)
    res, _ = s.reserve([usd], 10, 0.5, T0)
    s.settle(res, 10, 0.5, T0)
    err = refused(s.reserve, [usd], 10, 0.0, T0)
    assert err.message == "daily USD budget exhausted (used $0.5000 of $0.5000); it resets at 2026-11-28T00:00:00Z"
    # not enough left for the minimum and no per-token rate to clamp with
    s2 = MemoryState()
    s2.reserve([usd], 10, 0.3, T0)
    assert "daily USD budget has $0.2000 left" in refused(s2.reserve, [usd], 10, 0.3, T0).message


def test_lines_sharing_a_counter_hold_once_at_the_smallest_cap():
    s = MemoryState()
    a = BudgetLine("k", "tokens", "total", 1000)   # e.g. max_tokens
    b = BudgetLine("k", "tokens", "total", 500)    # e.g. budget.tokens.total
    res, g = s.reserve([a, b], 800, 0.0, T0)
    assert g == 500
    assert s.usage(a, T0) == (0, 500)
    assert res.lines == (b,)


def test_refusal_names_the_budget_that_resets_last():
    s = MemoryState()
    daily = BudgetLine("k", "tokens", "daily", 100)
    monthly = BudgetLine("k", "tokens", "monthly", 100)
    res, _ = s.reserve([daily, monthly], 100, 0.0, T0)
    s.settle(res, 100, 0.0, T0)
    err = refused(s.reserve, [daily, monthly], 10, 0.0, T0)
    assert err.message.startswith("monthly token budget exhausted")
    assert err.message.endswith("it resets at 2026-12-01T00:00:00Z")


def test_daily_budget_resets_at_utc_midnight():
    s = MemoryState()
    line = BudgetLine("k", "tokens", "daily", 1000)
    res, _ = s.reserve([line], 1000, 0.0, utc(2026, 11, 27, 8))
    s.settle(res, 1000, 0.0, utc(2026, 11, 27, 8))
    err = refused(s.reserve, [line], 10, 0.0, utc(2026, 11, 27, 23, 59, 59) + 0.999)
    assert err.message.endswith("it resets at 2026-11-28T00:00:00Z")
    res, g = s.reserve([line], 10, 0.0, utc(2026, 11, 28))
    assert g == 10
    assert s.usage(line, utc(2026, 11, 28)) == (0, 10)


def test_hold_in_flight_across_midnight_moves_to_the_new_day():
    s = MemoryState()
    line = BudgetLine("k", "tokens", "daily", 1000)
    res, _ = s.reserve([line], 900, 0.0, utc(2026, 11, 27, 23, 59, 50))
    after = utc(2026, 11, 28, 0, 0, 10)
    assert s.usage(line, after) == (0, 900)       # the new day cannot oversell what is in flight
    assert s.reserve([line], 500, 0.0, after)[1] == 100
    s.settle(res, 300, 0.0, after)
    assert s.usage(line, after) == (300, 100)
    assert s.drain() == [["k", "tokens", "daily", utc(2026, 11, 28), 300]]


LINES = [BudgetLine("k", "tokens", "daily", 1500), BudgetLine("k", "tokens", "total", 4000),
         BudgetLine("k", "usd", "hourly", 0.004), BudgetLine("j", "tokens", "hourly", 700)]


def check_invariants(s, now):
    for line in LINES:
        used, held = s.usage(line, now)
        assert used >= 0 and held >= 0
        assert used + held <= line.cap + 1e-12, (line, used, held)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_reserve_settle_release_never_negative_never_over_cap(data):
    s, now, open_ = MemoryState(), T0, []
    for _ in range(data.draw(st.integers(1, 60))):
        op = data.draw(st.sampled_from(["reserve", "reserve", "settle", "release", "tick"]))
        if op == "reserve":
            lines = data.draw(st.lists(st.sampled_from(LINES), min_size=1, max_size=4, unique=True))
            tokens = data.draw(st.integers(0, 900))
            rate = data.draw(st.sampled_from([0.0, 1e-6, 4e-6]))
            floor_ = data.draw(st.integers(1, 100))
            out = s.reserve(lines, tokens, tokens * rate, now, min_tokens=floor_, usd_per_token=rate)
            if not admitted(out):
                assert out.code == "budget_exceeded"
            else:
                res, g = out
                assert min(floor_, tokens) <= g <= tokens and res.tokens == g
                assert res.usd <= tokens * rate + 1e-9
                open_.append(res)
        elif op in ("settle", "release") and open_:
            res = open_.pop(data.draw(st.integers(0, len(open_) - 1)))
            if op == "settle":
                s.settle(res, data.draw(st.integers(0, res.tokens)),
                         data.draw(st.integers(0, res.usd_nano)) / 1e9, now)
            else:
                s.release(res)
            if data.draw(st.booleans()):  # a second settle/release is a no-op
                s.settle(res, res.tokens, res.usd, now)
                s.release(res)
        elif op == "tick":
            now += data.draw(st.sampled_from([0.5, 60, 1800, 3600, 43200, 86400]))
        check_invariants(s, now)
    for res in open_:
        s.release(res)
    for line in LINES:
        assert s.usage(line, now)[1] == 0


@settings(max_examples=300, deadline=None)
@given(data=st.data(), cap=st.integers(100, 5000), n=st.integers(1, 20))
def test_concurrent_requests_cannot_jointly_overrun(data, cap, n):
    """Interleave reserve/settle of n requests in any order: the provider-reported total stays
    within the cap, plus only the underestimate of the input when there was one."""
    s = MemoryState()
    line = BudgetLine("k", "tokens", "daily", cap)
    pending = list(range(n))
    in_flight, used, slack = {}, 0, 0
    while pending or in_flight:
        options = [("r", i) for i in pending] + [("s", i) for i in in_flight]
        kind, i = options[data.draw(st.integers(0, len(options) - 1))]
        if kind == "r":
            pending.remove(i)
            est = data.draw(st.integers(1, 400))
            want = data.draw(st.integers(1, 800))
            out = s.reserve([line], est + want, 0.0, T0, min_tokens=est + 1)
            if not admitted(out):
                continue
            res, g = out
            in_flight[i] = (res, est, g - est)  # the upstream output cap becomes g - est
        else:
            res, est, out_cap = in_flight.pop(i)
            real_in = est + data.draw(st.integers(-est // 2, 50))  # the estimate may be off either way
            real_out = data.draw(st.integers(0, out_cap))
            slack += max(0, real_in - est)
            used += real_in + real_out
            s.settle(res, real_in + real_out, 0.0, T0)
    assert s.usage(line, T0) == (used, 0)
    assert used <= cap + slack


def test_memory_is_bounded_idle_state_is_swept():
    s = MemoryState()
    rule = RateRule("requests", 5, 60.0, "sliding")
    for i in range(500):
        s.admit(f"key{i}", (rule,), T0)
        res, _ = s.reserve([BudgetLine(f"key{i}", "tokens", "hourly", 10),
                            BudgetLine(f"key{i}", "tokens", "total", 10)], 5, 0.0, T0)
        s.settle(res, 5, 0.0, T0)
    later = T0 + 7200
    s.admit("fresh", (rule,), later)
    assert len(s._rates) == 1
    assert len(s._counters) == 500  # lifetime counters are kept; passed hourly windows are gone
    assert s.usage(BudgetLine("key7", "tokens", "total", 10), later) == (5, 0)


# -- journal --------------------------------------------------------------------------------------

def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def spend(s, line, tokens, now):
    res, _ = s.reserve([line], tokens, 0.0, now)
    s.settle(res, tokens, 0.0, now)


def test_journal_round_trip_and_file_modes(tmp_path):
    old = os.umask(0)
    try:
        j = UsageJournal(tmp_path / "usage.jsonl")
        s = MemoryState()
        j.replay(s)
        line = BudgetLine("k", "tokens", "total", 10**6)
        usd = BudgetLine("k", "usd", "daily", 10)
        res, _ = s.reserve([line, usd], 100, 0.25, T0)
        s.settle(res, 90, 0.2, T0)
        j.commit(s)
        j.commit(s)  # nothing pending: nothing written
        assert s.drain() == []
        assert mode(j.path) == 0o600
        assert len((tmp_path / "usage.jsonl").read_bytes().partition(b"\0")[0].splitlines()) == 1
        j.compact(s)
        assert mode(j.snapshot_path) == 0o600
    finally:
        os.umask(old)
    s2 = MemoryState()
    UsageJournal(tmp_path / "usage.jsonl").replay(s2)
    assert s2.usage(line, T0) == (90, 0)
    assert s2.usage(usd, T0) == (pytest.approx(0.2), 0)


def test_journal_replay_ignores_a_torn_last_line(tmp_path):
    path = tmp_path / "usage.jsonl"
    line = BudgetLine("k", "tokens", "total", 10**6)
    j, s = UsageJournal(path), MemoryState()
    j.replay(s)
    for _ in range(3):
        spend(s, line, 10, T0)
        j.commit(s)
    j.close()
    with open(path, "ab") as f:  # kill -9 in the middle of a write
        f.write(b'{"s":4,"d":[["k","tokens","total",0.0,1')
    j, s = UsageJournal(path), MemoryState()
    j.replay(s)
    assert s.usage(line, T0) == (30, 0)
    spend(s, line, 5, T0)
    j.commit(s)  # must not glue onto the fragment
    j.close()
    s = MemoryState()
    UsageJournal(path).replay(s)
    assert s.usage(line, T0) == (35, 0)


def test_journal_lines_overwrite_zeros_written_ahead_so_most_commits_keep_the_file_size(tmp_path, monkeypatch):
    """A commit writes zeros ahead of the log (never past compact_bytes), so the next commits'
    lines land on them and leave the file's size alone: their fdatasync has no size to commit.
    Replay reads the log up to its first NUL, cuts a torn line there, and appends after it."""
    path = tmp_path / "usage.jsonl"
    line = BudgetLine("k", "tokens", "total", 10**9)
    j, s = UsageJournal(path, compact_bytes=200_000), MemoryState()
    j.replay(s)
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
    sizes = []
    for n in range(1, 51):
        spend(s, line, n, T0)
        j.commit(s)
        sizes.append(os.path.getsize(path))
    assert synced == [j._fd] * 50   # one fdatasync per commit, nothing else
    assert len(set(sizes)) == 1 and 100_000 < sizes[0] <= 200_000   # written ahead once, then overwritten
    data = path.read_bytes()
    log, zeros = data[:data.index(b"\0")], data[data.index(b"\0"):]
    assert len(log.splitlines()) == 50 and zeros.strip(b"\0") == b""
    j.close()
    with open(path, "r+b") as f:  # kill -9 in the middle of a write over the zeros
        f.seek(len(log))
        f.write(b'{"s":51,"d":[["k","tokens","total",0.0,1')
    j, s = UsageJournal(path), MemoryState()
    j.replay(s)
    assert s.usage(line, T0) == (sum(range(51)), 0)
    spend(s, line, 1000, T0)
    j.commit(s)     # after the last whole line, not glued onto the fragment
    j.close()
    s = MemoryState()
    UsageJournal(path).replay(s)
    assert s.usage(line, T0) == (sum(range(51)) + 1000, 0)
    assert len(path.read_bytes().partition(b"\0")[0].splitlines()) == 51


def test_journal_compaction_keeps_totals_and_bounds_the_log(tmp_path):
    path = tmp_path / "usage.jsonl"
    lines = [BudgetLine(f"k{i}", "tokens", "total", 10**9) for i in range(5)]
    j, s = UsageJournal(path, compact_bytes=2000), MemoryState()
    j.replay(s)
    for n in range(400):
        spend(s, lines[n % 5], n, T0 + n)
        j.commit(s)
    assert os.path.getsize(path) <= 2000 + 200
    assert os.path.exists(j.snapshot_path)
    j.close()
    s2 = MemoryState()
    UsageJournal(path).replay(s2)
    for i, line in enumerate(lines):
        assert s2.usage(line, T0) == (sum(range(i, 400, 5)), 0)


def test_crash_between_snapshot_and_truncation_counts_nothing_twice(tmp_path):
    path = tmp_path / "usage.jsonl"
    line = BudgetLine("k", "tokens", "total", 10**6)
    j, s = UsageJournal(path), MemoryState()
    j.replay(s)
    for _ in range(4):
        spend(s, line, 25, T0)
        j.commit(s)
    log_before = path.read_bytes()
    spend(s, line, 7, T0)  # settled, still pending when the snapshot is taken
    j.compact(s)
    path.write_bytes(log_before)  # as if the process died before truncating the log
    s2 = MemoryState()
    UsageJournal(path).replay(s2)
    assert s2.usage(line, T0) == (107, 0)


def test_compaction_absorbs_pending_deltas(tmp_path):
    path = tmp_path / "usage.jsonl"
    line = BudgetLine("k", "tokens", "total", 10**6)
    j, s = UsageJournal(path), MemoryState()
    j.replay(s)
    spend(s, line, 10, T0)
    j.commit(s)
    spend(s, line, 7, T0)  # settled but not committed yet
    j.compact(s)           # the snapshot holds it ...
    j.commit(s)            # ... so the next commit must not journal it again
    spend(s, line, 1, T0)
    j.commit(s)
    j.close()
    s2 = MemoryState()
    UsageJournal(path).replay(s2)
    assert s2.usage(line, T0) == (18, 0)


def test_journal_drops_windows_that_have_passed(tmp_path):
    path = tmp_path / "usage.jsonl"
    daily = BudgetLine("k", "tokens", "daily", 1000)
    j, s = UsageJournal(path), MemoryState()
    j.replay(s)
    spend(s, daily, 400, T0)
    j.commit(s)
    spend(s, daily, 50, T0 + 86400)
    j.commit(s)
    j.close()
    s2 = MemoryState()
    UsageJournal(path).replay(s2)
    assert s2.usage(daily, T0 + 86400) == (50, 0)


def test_journal_errors(tmp_path):
    with pytest.raises(RuntimeFailure, match="before replay"):
        UsageJournal(tmp_path / "a.jsonl").append([["k", "tokens", "total", 0.0, 1]])
    (tmp_path / "b.jsonl.snapshot").write_text("{not json")
    with pytest.raises(RuntimeFailure, match="b.jsonl.snapshot is unreadable"):
        UsageJournal(tmp_path / "b.jsonl").replay(MemoryState())
    # damaged lines in the middle are skipped (the negative delta is not applied), the rest still
    # loads, and lines committed after them load at the next replay too
    good = json.dumps({"s": 1, "d": [["k", "tokens", "total", 0.0, 5]]})
    bad = json.dumps({"s": 2, "d": [["k", "tokens", "total", 0.0, -5]]})
    (tmp_path / "c.jsonl").write_text(good + "\n" + bad + "\n" + "garbage\n")
    j, s = UsageJournal(tmp_path / "c.jsonl"), MemoryState()
    j.replay(s)
    line = BudgetLine("k", "tokens", "total", 10)
    assert s.usage(line, T0) == (5, 0)
    spend(s, line, 3, T0)
    j.commit(s)
    j.close()
    s = MemoryState()
    UsageJournal(tmp_path / "c.jsonl").replay(s)
    assert s.usage(line, T0) == (8, 0)


def test_settled_usage_survives_kill_9(tmp_path):
    """A real process settles, commits, and is SIGKILLed: the next start sees every settled token."""
    code = f"""
import os, signal
from tokenomics.limits.decide import BudgetLine
from tokenomics.limits.journal import UsageJournal
from tokenomics.limits.state import MemoryState
j, s = UsageJournal({str(tmp_path / 'usage.jsonl')!r}), MemoryState()
j.replay(s)
line = BudgetLine('k', 'tokens', 'total', 10**9)
for i in range(50):
    res, _ = s.reserve([line], 10, 0.0, {T0})
    s.settle(res, 10, 0.0, {T0})
    j.commit(s)
s.reserve([line], 999, 0.0, {T0})  # in flight when killed: must count nothing
os.kill(os.getpid(), signal.SIGKILL)
"""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(tokenomics.__file__)))
    proc = subprocess.run([sys.executable, "-c", code], env=env, timeout=60)
    assert proc.returncode == -9
    s = MemoryState()
    UsageJournal(tmp_path / "usage.jsonl").replay(s)
    assert s.usage(BudgetLine("k", "tokens", "total", 10**9), T0) == (500, 0)


# -- token counting and events ----------------------------------------------------------------------

def test_estimate_tokens():
    assert [estimate_tokens(n) for n in (0, 1, 4, 5, 400, -3)] == [0, 1, 1, 2, 100, 0]


def test_event_payloads():
    line = BudgetLine("3f2a9c1d0b7e4a55", "usd", "total", 20.0)
    assert budget_event(line, 5.0, 20.0, T0) == {
        "key": "3f2a9c1d0b7e4a55", "unit": "usd", "period": "total", "used": 5.0, "cap": 20.0,
        "remaining": 15.0, "percent": 25.0, "window_start": "1970-01-01T00:00:00Z", "resets_at": None}
    assert rate_event("3f2a9c1d", RateRule("tokens", 100, 60.0, "bucket"), 3) == {
        "key": "3f2a9c1d", "kind": "tokens", "limit": 100, "window": 60.0, "strategy": "bucket", "retry_after": 3}


# -- durable files (util): the journal's snapshot and every other atomic write -------------------

def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    from tokenomics.util import atomic_file
    path = tmp_path / "usage.jsonl.snapshot"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(str(path)) as fh:
            fh.write(b"half of the new")
            raise RuntimeError("crash mid-write")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == [path.name]  # no temp file left
    with atomic_file(str(path)) as fh:
        fh.write(b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == [path.name]
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("durable", [True, False])
def test_a_write_for_files_that_need_no_durability_is_atomic_private_and_skips_the_fsyncs(tmp_path, monkeypatch,
                                                                                          durable):
    """A running proxy's pid and state files are written without fsyncs (they mean nothing
    once the machine is down); they are still private and replaced whole."""
    from tokenomics import util
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(util.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    path = tmp_path / "tokenomics.pid"
    path.write_bytes(b"123\n")
    util.write_private(str(path), b"456\n", durable=durable)
    assert path.read_bytes() == b"456\n" and os.listdir(tmp_path) == [path.name]
    assert path.stat().st_mode & 0o777 == 0o600
    assert (len(synced) == 2) if durable else (synced == [])   # the file and its directory, or neither


def test_write_all_reports_how_much_a_failed_write_wrote(tmp_path, monkeypatch):
    from tokenomics import util
    fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT, 0o600)
    real_write, calls = os.write, []

    def short_then_full_disk(fd_, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd_, bytes(data[:3]))
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(util.os, "write", short_then_full_disk)
    try:
        with pytest.raises(util.PartialWrite) as caught:
            util._write_all(fd, b"0123456789")
    finally:
        monkeypatch.undo()
        os.close(fd)
    assert caught.value.written == 3 and caught.value.errno == 28 and calls == [10, 7]
    assert (tmp_path / "log").read_bytes() == b"012"
