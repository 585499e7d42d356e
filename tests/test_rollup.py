"""The one rollup type: what an exchange adds, the one definition of an error, exact cost, and
merging rollups of the parts of a list of exchanges into the rollup of the whole."""
import pytest
from hypothesis import given, settings, strategies as st

from tokenomics.records.fanout import Records, SessionTotals
from tokenomics.records.ledger import RequestRecord, _request_row, row_figures
from tokenomics.records.rollup import BLOCKING_ERRORS, COUNTS, Rollup, figures, is_error
from tokenomics.records.stats import Metrics, Stats, record_figures
from tokenomics.records.exchange import Exchange
from tokenomics.limits.prices import Usage


@pytest.mark.parametrize("status, error, expected", [
    (200, "", False), (204, "", False), (399, "", False),
    (400, "", True), (429, "", True), (502, "", True),
    (200, "output_rule_violation", True),        # a stream that began with 200, ended by an error event
    (403, "rule_violation", True), (0, "internal_error", True), (0, "", False),
])
def test_one_definition_of_an_error(status, error, expected):
    assert is_error(status, error) is expected
    assert Rollup_of([(status, error)]).count("error_count") == int(expected)


def Rollup_of(outcomes) -> Rollup:
    roll = Rollup()
    for status, error in outcomes:
        roll.add(figures(status, error, 1, 1, 0.0))
    return roll


def test_refusals_are_counted_by_kind_and_as_blocked():
    roll = Rollup_of([(403, "rule_violation"), (403, "output_rule_violation"), (429, "rate_limited"),
                      (429, "budget_exceeded"), (403, "model_not_allowed"), (502, "upstream_timeout"), (200, "")])
    assert (roll.requests, roll.count("error_count"), roll.count("rule_violation_count"),
            roll.count("rate_limit_count"), roll.count("budget_exceeded_count"), roll.count("blocked_count")) \
        == (7, 6, 2, 1, 1, 5)
    assert "upstream_timeout" not in BLOCKING_ERRORS


def test_cost_is_exact_in_any_order():
    costs = [0.1, 0.2, 0.3, 1e-9, 0.000012345]
    forward, backward = Rollup(), Rollup()
    for c in costs:
        forward.add(figures(200, "", 0, 0, c))
    for c in reversed(costs):
        backward.add(figures(200, "", 0, 0, c))
    assert forward == backward and forward.cost_usd == 0.600012346
    assert forward.stats_json()["cost_usd"] == 0.60001235


def test_shapes_the_ledger_and_stats_show():
    roll = Rollup(per_token=True)
    roll.add(figures(200, "", 10, 5, 0.5, cached_input_tokens=2, reasoning_tokens=1, retry_count=1), "m", 1.7e9)
    roll.add(figures(500, "upstream_error", 1, 0, 0.25), "", 1.7e9 - 60)
    ledger = roll.as_dict()
    assert list(ledger)[:12] == list(COUNTS[:12]) and "blocked_count" not in ledger
    assert (ledger["request_count"], ledger["total_tokens"], ledger["error_count"], ledger["retry_count"],
            ledger["cost_usd"]) == (2, 16, 1, 1, 0.75)
    assert ledger["models_used"] == ["(none)", "m"]
    assert ledger["first_seen"] < ledger["last_seen"]
    assert roll.stats_json() == {"requests": 2, "input_tokens": 11, "output_tokens": 5, "total_tokens": 16,
                                 "cost_usd": 0.75, "errors": 1}


def record(i: int, status: int, error: str, cost: float) -> RequestRecord:
    return RequestRecord(timestamp=1.7e9 + i, request_id=f"req_{i}", token_hash="a" * 64, model="gpt-x",
                         provider="openai", endpoint="/v1/chat/completions", input_tokens=i, output_tokens=2 * i,
                         cost_usd=cost, status_code=status, error=error, retry_count=i % 2)


def test_a_request_adds_the_same_figures_from_its_record_and_its_journal_row():
    rec = record(7, 429, "budget_exceeded", 0.000123)
    assert record_figures(rec) == row_figures(_request_row(rec))


def test_every_record_keeper_counts_the_same_exchange_the_same_way():
    records = Records(clock=lambda: 1.7e9)
    outcomes = [(200, "", Usage(10, 5), 0.01), (403, "rule_violation", None, None), (502, "upstream_timeout",
                Usage(3, 0), 0.002)]
    for i, (status, error, usage, cost) in enumerate(outcomes):
        ex = Exchange(request_id=f"req_{i}", endpoint="/v1/chat/completions", started=1.7e9, token_hash="b" * 64,
                      model="gpt-x", status=status, error=error, usage=usage, cost_usd=cost, governed=True)
        records.metrics.inflight(+1)
        records.complete(ex, 1.7e9 + 1)
    stats = records.stats.snapshot()["totals"]
    assert stats == {"requests": 3, "input_tokens": 13, "output_tokens": 5, "total_tokens": 18,
                     "cost_usd": 0.012, "errors": 2}
    assert records.totals.line() == "tokenomics: 3 requests, 13 tokens in / 5 out, $0.0120, 1 blocked"
    text = records.metrics.render()
    assert 'tokenomics_cost_usd_total{model="gpt-x"} 0.012' in text
    assert 'tokenomics_tokens_total{direction="input",model="gpt-x"} 13' in text


def test_session_totals_count_exchanges_refused_before_their_token_was_known():
    records = Records(clock=lambda: 1.7e9)
    ex = Exchange(request_id="req_x", endpoint="/v1/chat/completions", started=1.7e9, status=401,
                  error="invalid_token", governed=True)
    records.metrics.inflight(+1)
    records.complete(ex, 1.7e9)
    assert records.totals.requests == 1 and records.stats.snapshot()["totals"]["requests"] == 0
    assert isinstance(records.totals, SessionTotals) and records.totals.count("error_count") == 1


_OUTCOMES = st.sampled_from([(200, ""), (200, "output_rule_violation"), (403, "rule_violation"),
                             (429, "rate_limited"), (429, "budget_exceeded"), (502, "upstream_timeout"),
                             (500, ""), (403, "model_not_allowed")])
_EXCHANGES = st.lists(st.tuples(_OUTCOMES, st.integers(0, 10 ** 6), st.integers(0, 10 ** 5),
                                st.floats(0, 50, allow_nan=False), st.sampled_from(["", "m1", "m2"]),
                                st.floats(1.6e9, 1.8e9, allow_nan=False), st.integers(0, 3)), max_size=40)


def _rollup(rows, per_token: bool) -> Rollup:
    roll = Rollup(per_token)
    for (status, error), inp, out, cost, model, ts, retries in rows:
        roll.add(figures(status, error, inp, out, cost, retry_count=retries), model, ts)
    return roll


@settings(max_examples=200, deadline=None)
@given(_EXCHANGES, st.data())
def test_merging_the_rollups_of_any_split_equals_the_rollup_of_the_whole(rows, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(rows)), max_size=6)))
    bounds = [0, *cuts, len(rows)]
    order = data.draw(st.permutations(range(len(bounds) - 1)))
    for per_token in (False, True):
        merged = Rollup(per_token)
        for i in order:                        # in any order of the parts, too
            merged.merge(_rollup(rows[bounds[i]:bounds[i + 1]], per_token))
        whole = _rollup(rows, per_token)
        assert merged == whole
        assert merged.as_dict() == whole.as_dict() and merged.stats_json() == whole.stats_json()


@settings(max_examples=100, deadline=None)
@given(_EXCHANGES)
def test_stats_metrics_and_totals_agree_on_every_list_of_exchanges(rows):
    stats, metrics, totals = Stats(started_at=0), Metrics(), SessionTotals()
    for i, ((status, error), inp, out, cost, _, _, _) in enumerate(rows):
        rec = record(i, status, error, cost)
        rec.input_tokens, rec.output_tokens = inp, out
        deltas = record_figures(rec)
        stats.observe(rec, "KEY", deltas)
        metrics.observe(rec, 0.0, deltas)
        totals.add(deltas)
    snap = stats.snapshot()["totals"]
    assert snap == totals.stats_json()
    assert snap["errors"] == sum(is_error(s, e) for (s, e), *_ in rows)
    if rows:
        assert metrics._by_model["gpt-x"] == totals


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(_OUTCOMES, st.integers(0, 10 ** 6), st.integers(0, 10 ** 5),
                          st.floats(0, 50, allow_nan=False)), max_size=300), st.sets(st.integers(0, 300)))
def test_queued_figures_sum_to_the_same_rollup_whenever_it_is_read(rows, reads_at):
    """A rollup queues what it is given and sums it later (when read, or every so many): the
    sums read at any moment are the column sums of everything added up to then."""
    roll, added = Rollup(), []
    for i, ((status, error), inp, out, cost) in enumerate(rows):
        deltas = figures(status, error, inp, out, cost)
        roll.add(deltas)
        added.append(deltas)
        if i in reads_at:
            assert roll.sums == [sum(column) for column in zip(*added)]
    assert roll.sums == ([sum(column) for column in zip(*added)] if added else [0] * (len(COUNTS) + 1))
    assert roll.requests == len(rows)
