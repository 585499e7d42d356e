"""A mistyped TOKENOMICS_* override is an error, and a real cost never reads as zero."""
import math

from hypothesis import given, strategies as st

from conftest import base_env
from tokenomics.limits.decide import _fmt_usd
from tokenomics.util import usd_text


def test_a_mistyped_override_is_named_with_the_field_it_resembles(cli, data_dir):
    proc = cli("token", "list", env=base_env(data_dir, TOKENOMICS_SERVER_HTP_PORT="1"))
    assert proc.returncode == 2, proc.stderr
    assert "TOKENOMICS_SERVER_HTP_PORT" in proc.stderr and "TOKENOMICS_SERVER_HTTP_PORT" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_documented_variables_are_not_taken_for_overrides(cli, data_dir):
    env = base_env(data_dir, TOKENOMICS_SERVER_HTTP_PORT="8123", TOKENOMICS_REMOTE_KEY="k",
                   TOKENOMICS_KEY="tkn_" + "0" * 32, TOKENOMICS_LOGGING_FORMAT="text")
    proc = cli("token", "list", env=env)
    assert proc.returncode == 0, proc.stderr


@given(st.floats(min_value=1e-12, max_value=1e6, allow_nan=False))
def test_a_real_cost_never_reads_as_zero(amount):
    text = usd_text(amount)
    assert float(text) > 0
    assert math.isclose(float(text), amount, rel_tol=0.06, abs_tol=0.00005)
    assert _fmt_usd(amount).lstrip("$").replace(",", "") not in ("0.00", "0.0000")


def test_cost_text_keeps_four_places_where_they_suffice():
    assert usd_text(0) == "0.0000"
    assert usd_text(1.23456) == "1.2346"
    assert usd_text(0.0000123) == "0.000012"


def test_run_usage_lines_show_a_small_cost_instead_of_zero():
    from tokenomics.cli import _usage_line
    from tokenomics.records.fanout import SessionTotals
    from tokenomics.records.rollup import figures
    totals = SessionTotals()
    totals.add(figures(200, "", input_tokens=12, output_tokens=3, cost_usd=0.0000123))
    assert "$0.000012," in totals.line()
    before = {"requests": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "errors": 0}
    after = dict(before, requests=1, input_tokens=12, output_tokens=3, cost_usd=0.0000123)
    assert "$0.000012," in _usage_line(before, after, "http://127.0.0.1:8080")
