"""Records — /stats, /metrics, structured request logs, events and webhook delivery."""
import asyncio
import hashlib
import hmac
import http.server
import io
import json
import logging
import math
import os
import re
import socket
import ssl
import stat
import threading
import time
import types

import pytest
from hypothesis import given, settings, strategies as st

import tokenomics
import tokenomics.records.events
import tokenomics.records.ledger
import tokenomics.records.logs
import tokenomics.records.stats
from tokenomics.config import EVENT_TYPES, Webhook, validate_webhooks
from tokenomics.errors import UsageError
from tokenomics.records.events import WebhookDispatcher, deliver_once, event_matches, make_event
from tokenomics.records.logs import LogOptions, RequestLogger, redacting_filter
from tokenomics.records.stats import Metrics, Stats
from tokenomics.util import rfc3339_ms, scrub

TOKEN_HASH = "0123456789abcdef" * 4
REQUEST_ID = "tkn_" + "ab" * 16
RAW_TOKEN = "tkn_" + "5f" * 16
OPENAI_KEY = "sk-proj-" + "Z9y8X7w6V5u4T3s2R1q0" * 2
ANTHROPIC_KEY = "sk-ant-api03-" + "aB3_dE6-" * 5
AWS_KEY = "AKIA" + "ABCDEFGHIJ234567"
GOOGLE_KEY = "AIza" + "SyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q"
SECRETS = (RAW_TOKEN, OPENAI_KEY, ANTHROPIC_KEY, AWS_KEY, GOOGLE_KEY)


def record(**kw):
    base = dict(timestamp=1_700_000_000.5, request_id=REQUEST_ID, token_hash=TOKEN_HASH,
                model="gpt-4o", provider="openai", endpoint="/v1/chat/completions",
                input_tokens=10, output_tokens=5, cached_input_tokens=0, cache_creation_tokens=0,
                reasoning_tokens=0, cost_usd=0.001, duration_ms=12.34, status_code=200,
                stream=False, error="", upstream_id="chatcmpl-1", upstream_request_id="req_1",
                retry_count=0, fallback_model="", rule_matches=[], metadata={}, provider_meta={})
    base.update(kw)
    return tokenomics.records.ledger.RequestRecord(**base)


# -- /stats -------------------------------------------------------------------------------------

def test_stats_rolls_up_totals_models_key_envs_and_tokens():
    stats = Stats(started_at=1_700_000_000.0)
    other_hash = "fedcba9876543210" * 4
    stats.observe(record(input_tokens=100, output_tokens=20, cost_usd=0.5), "OPENAI_API_KEY")
    stats.observe(record(model="claude-sonnet-4", provider="anthropic", token_hash=other_hash,
                         input_tokens=7, output_tokens=3, cost_usd=0.25, status_code=500,
                         error="upstream_unreachable"), "ANTHROPIC_API_KEY")
    stats.observe(record(input_tokens=1, output_tokens=0, cost_usd=0.0, status_code=429,
                         error="rate_limited"), "OPENAI_API_KEY")
    snap = json.loads(json.dumps(stats.snapshot()))
    assert snap["totals"] == {"requests": 3, "input_tokens": 108, "output_tokens": 23,
                              "total_tokens": 131, "cost_usd": 0.75, "errors": 2}
    assert snap["by_model"]["gpt-4o"] == {"requests": 2, "input_tokens": 101, "output_tokens": 20,
                                          "total_tokens": 121, "cost_usd": 0.5, "errors": 1}
    assert snap["by_model"]["claude-sonnet-4"]["errors"] == 1
    assert snap["by_key_env"]["OPENAI_API_KEY"]["requests"] == 2
    assert snap["by_key_env"]["ANTHROPIC_API_KEY"]["cost_usd"] == 0.25
    assert set(snap["by_token"]) == {TOKEN_HASH[:16], other_hash[:16]}
    assert snap["by_token"][TOKEN_HASH[:16]]["requests"] == 2
    assert snap["started_at"] == "2023-11-14T22:13:20.000Z"


def test_stats_error_code_without_error_status_counts_as_error():
    stats = Stats()
    stats.observe(record(status_code=200, error="output_rule_violation"), "K")
    assert stats.snapshot()["totals"]["errors"] == 1


def test_stats_by_token_is_capped_and_the_rest_goes_to_other():
    stats = Stats(max_tokens=5)
    for i in range(8):
        stats.observe(record(token_hash=f"{i:016x}" * 4, input_tokens=1), "K")
    by_token = stats.snapshot()["by_token"]
    assert len(by_token) == 6
    assert by_token["other"]["requests"] == 3
    assert sum(v["requests"] for v in by_token.values()) == stats.snapshot()["totals"]["requests"] == 8


def test_stats_default_cap_bounds_memory():
    stats = Stats()
    for i in range(tokenomics.records.stats.STATS_MAX_TOKENS + 50):
        stats.observe(record(token_hash=f"{i:016x}" + "0" * 48), "K")
    by_token = stats.snapshot()["by_token"]
    assert len(by_token) == tokenomics.records.stats.STATS_MAX_TOKENS + 1
    assert by_token["other"]["requests"] == 50


# -- /metrics: a strict parser for the text exposition format 0.0.4 ------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE_RE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})? (\S+)$")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\\\|\\"|\\n)*)"')
_HELP_RE = re.compile(rf"^# HELP ({_NAME}) (.*)$")
_TYPE_RE = re.compile(rf"^# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)$")


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], value)


def _labels(text: str) -> dict:
    out, pos = {}, 0
    while pos < len(text):
        m = _LABEL_RE.match(text, pos)
        assert m, f"bad label set at {text[pos:]!r}"
        assert m.group(1) not in out, f"duplicate label {m.group(1)}"
        out[m.group(1)] = _unescape(m.group(2))
        pos = m.end()
        if pos < len(text):
            assert text[pos] == ",", f"expected ',' in {text!r}"
            pos += 1
    return out


def _number(text: str) -> float:
    assert re.fullmatch(r"[+-]?Inf|NaN|[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text), text
    return float(text.replace("Inf", "inf"))


def parse_prometheus(text: str) -> dict:
    """family -> {"type", "help", "samples": [(name, labels, value)]}; asserts the format."""
    assert text.endswith("\n") and "\n\n" not in text
    families: dict = {}
    current = None
    seen_series = set()
    for line in text[:-1].split("\n"):
        if m := _HELP_RE.match(line):
            assert m.group(1) not in families, f"family {m.group(1)} appears twice"
            current = families[m.group(1)] = {"help": m.group(2), "type": None, "samples": []}
            continue
        if m := _TYPE_RE.match(line):
            assert current is families.get(m.group(1)) and current["type"] is None and not current["samples"]
            current["type"] = m.group(2)
            continue
        assert not line.startswith("#"), line
        m = _SAMPLE_RE.match(line)
        assert m, f"bad sample line {line!r}"
        name, labels, value = m.group(1), _labels(m.group(2) or ""), _number(m.group(3))
        family = next(f for f in families if f == name or (
            families[f]["type"] == "histogram" and name in (f + "_bucket", f + "_sum", f + "_count")))
        assert families[family] is current, f"{name} outside its family block"
        key = (name, tuple(sorted(labels.items())))
        assert key not in seen_series, f"duplicate series {key}"
        seen_series.add(key)
        if current["type"] == "counter":
            assert value >= 0
        current["samples"].append((name, labels, value))
    for name, fam in families.items():
        assert fam["type"], f"{name} has no TYPE"
        if fam["type"] == "histogram":
            buckets = [(s[1]["le"], s[2]) for s in fam["samples"] if s[0] == name + "_bucket"]
            bounds = [_number(le) for le, _ in buckets]
            assert bounds == sorted(bounds) and bounds[-1] == math.inf
            counts = [c for _, c in buckets]
            assert all(a <= b for a, b in zip(counts, counts[1:])), "buckets must be cumulative"
            total = [s[2] for s in fam["samples"] if s[0] == name + "_count"]
            assert total == [counts[-1]]
            assert len([s for s in fam["samples"] if s[0] == name + "_sum"]) == 1
    return families


def values(families: dict, name: str, **match) -> dict:
    """{labels-tuple-without-matched: value} for a family's plain samples."""
    return {tuple(v for k, v in sorted(labels.items()) if k not in match): value
            for n, labels, value in families[name]["samples"]
            if n == name and all(labels.get(k) == v for k, v in match.items())}


def test_metrics_render_empty_registry_is_valid_and_complete():
    fams = parse_prometheus(Metrics().render())
    assert {name: f["type"] for name, f in fams.items()} == {
        "tokenomics_requests_total": "counter", "tokenomics_tokens_total": "counter",
        "tokenomics_cost_usd_total": "counter", "tokenomics_upstream_latency_seconds": "histogram",
        "tokenomics_guardrail_actions_total": "counter", "tokenomics_rejections_total": "counter",
        "tokenomics_requests_in_flight": "gauge", "tokenomics_webhook_events_dropped_total": "counter"}
    buckets = [s for s in fams["tokenomics_upstream_latency_seconds"]["samples"] if s[0].endswith("_bucket")]
    assert [s[1]["le"] for s in buckets][0] == "0.005" and buckets[-1][1]["le"] == "+Inf"
    assert len(buckets) == len(tokenomics.records.stats.LATENCY_BUCKETS) + 1
    assert values(fams, "tokenomics_requests_in_flight") == {(): 0}


def test_metrics_count_requests_tokens_cost_and_latency():
    m = Metrics()
    m.observe(record(input_tokens=10, output_tokens=5, cost_usd=0.25), 3.0)       # 3 ms
    m.observe(record(input_tokens=1, output_tokens=2, cost_usd=0.5), 7.0)         # 7 ms
    m.observe(record(model="claude-x", status_code=429, input_tokens=0, output_tokens=0, cost_usd=0), 0)
    m.observe(record(status_code=502, input_tokens=0, output_tokens=0, cost_usd=0), 100_000.0)  # 100 s
    fams = parse_prometheus(m.render())
    assert values(fams, "tokenomics_requests_total") == {
        ("gpt-4o", "2xx"): 2, ("claude-x", "4xx"): 1, ("gpt-4o", "5xx"): 1}
    assert values(fams, "tokenomics_tokens_total", model="gpt-4o") == {("input",): 11, ("output",): 7}
    assert values(fams, "tokenomics_cost_usd_total")[("gpt-4o",)] == pytest.approx(0.75)
    hist = {s[1].get("le", s[0]): s[2] for s in fams["tokenomics_upstream_latency_seconds"]["samples"]}
    assert hist["0.005"] == 1 and hist["0.01"] == 2 and hist["60.0"] == 2 and hist["+Inf"] == 3
    assert hist["tokenomics_upstream_latency_seconds_count"] == 3      # the unforwarded one is not observed
    assert hist["tokenomics_upstream_latency_seconds_sum"] == pytest.approx(100.010)


def test_metrics_guardrails_rejections_inflight_and_dropped():
    m = Metrics()
    m.inc_guardrail("mask", "pii")
    m.inc_guardrail("mask", "pii")
    m.inc_guardrail("fail", "jailbreak")
    m.inc_rejection("rate_limited")
    m.inc_rejection("budget_exceeded")
    m.inc_rejection("budget_exceeded")
    m.inflight(+1), m.inflight(+1), m.inflight(-1)
    m.inc_dropped_events()
    fams = parse_prometheus(m.render())
    assert values(fams, "tokenomics_guardrail_actions_total") == {("mask", "pii"): 2, ("fail", "jailbreak"): 1}
    assert values(fams, "tokenomics_rejections_total") == {("rate_limited",): 1, ("budget_exceeded",): 2}
    assert values(fams, "tokenomics_requests_in_flight") == {(): 1}
    assert values(fams, "tokenomics_webhook_events_dropped_total") == {(): 1}


def test_metrics_escape_label_values():
    weird = 'we"ird\\model\nname'
    m = Metrics()
    m.observe(record(model=weird), 1.0)
    fams = parse_prometheus(m.render())
    assert (weird,) in values(fams, "tokenomics_cost_usd_total")


def test_metrics_model_label_cardinality_is_capped():
    m = Metrics(max_models=3)
    for i in range(10):
        m.observe(record(model=f"model-{i}"), 1.0)
    models = {k[0] for k in values(parse_prometheus(m.render()), "tokenomics_cost_usd_total")}
    assert models == {"model-0", "model-1", "model-2", "other"}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0.001, max_value=200_000, allow_nan=False), max_size=40))
def test_metrics_histogram_is_cumulative_for_any_latencies(latencies_ms):
    m = Metrics()
    for ms in latencies_ms:
        m.observe(record(), ms)
    fams = parse_prometheus(m.render())       # asserts monotone buckets and +Inf == _count
    hist = {s[1].get("le", s[0]): s[2] for s in fams["tokenomics_upstream_latency_seconds"]["samples"]}
    assert hist["+Inf"] == len(latencies_ms)
    for le in tokenomics.records.stats.LATENCY_BUCKETS:
        assert hist[repr(float(le))] == sum(1 for ms in latencies_ms if ms / 1000 <= le)


# -- structured request logs --------------------------------------------------------------------

def log_line(rec=None, key_env="OPENAI_API_KEY", request_body=None, response_body=None, **opts) -> str:
    out = io.StringIO()
    RequestLogger(LogOptions(**opts), stream=out).log(rec or record(), key_env, request_body, response_body)
    return out.getvalue()


def test_request_log_json_fields():
    rec = record(rule_matches=[{"rule": "pii", "type": "pii", "action": "mask", "scope": "input", "count": 2}],
                 metadata={"team": "search"}, stream=True, retry_count=1)
    text = log_line(rec)
    assert text.endswith("\n") and text.count("\n") == 1
    entry = json.loads(text)
    assert entry["timestamp"] == "2023-11-14T22:13:20.500Z"
    assert entry["method"] == "POST" and entry["path"] == "/v1/chat/completions"
    assert entry["token_hash"] == TOKEN_HASH[:12]
    assert (entry["model"], entry["provider"], entry["status"]) == ("gpt-4o", "openai", 200)
    assert entry["duration_ms"] == 12.3
    assert entry["tokens"] == {"input": 10, "output": 5}
    assert entry["cost_usd"] == 0.001 and entry["stream"] is True and entry["retries"] == 1
    assert entry["rule_matches"] == rec.rule_matches
    assert entry["request_id"] == REQUEST_ID and entry["upstream_request_id"] == "req_1"
    assert entry["metadata"] == {"team": "search"} and entry["key_env"] == "OPENAI_API_KEY"
    assert "request_body" not in entry and "response_body" not in entry and "error" not in entry


def test_request_log_error_and_fallback_fields():
    entry = json.loads(log_line(record(status_code=403, error="rule_violation", fallback_model="gpt-4o-mini")))
    assert entry["error"] == "rule_violation" and entry["fallback_model"] == "gpt-4o-mini"


def test_request_log_disabled_writes_nothing(tmp_path):
    path = tmp_path / "req.log"
    assert log_line(disable_request=True, file_path=str(path)) == ""
    assert not path.exists()


def test_request_log_hide_token_hash():
    text = log_line(hide_token_hash=True)
    assert "token_hash" not in json.loads(text)
    assert TOKEN_HASH[:8] not in text


def test_request_log_text_format_is_one_human_line():
    rec = record(model="odd model\nname", metadata={"team": "a b"},
                 rule_matches=[{"rule": "emails", "type": "pii", "action": "mask", "scope": "input", "count": 1}])
    text = log_line(rec, format="text")
    assert text.count("\n") == 1 and not text.startswith("{")
    assert text.startswith("2023-11-14T22:13:20.500Z POST /v1/chat/completions 200 12.3ms ")
    assert 'model="odd model\\nname"' in text
    assert "tokens=10/5" in text and "rules=emails:mask" in text and f"request_id={REQUEST_ID}" in text
    assert f"token_hash={TOKEN_HASH[:12]}" in text


def body_line(req: bytes, resp: bytes, **opts) -> dict:
    out = io.StringIO()
    RequestLogger(stream=out, **opts).log(record(), "K", req, resp)
    return json.loads(out.getvalue())


def test_request_log_bodies_only_when_enabled():
    req, resp = b'{"messages":[{"role":"user","content":"hi <EMAIL_1>"}]}', b'{"id":"x"}'
    off = body_line(req, resp)
    assert "request_body" not in off and "response_body" not in off
    only_req = body_line(req, resp, request_body=True)
    assert only_req["request_body"] == req.decode() and "response_body" not in only_req
    only_resp = body_line(req, resp, response_body=True)
    assert only_resp["response_body"] == resp.decode() and "request_body" not in only_resp
    both = body_line(req, resp, request_body=True, response_body=True)
    assert (both["request_body"], both["response_body"]) == (req.decode(), resp.decode())


def test_request_log_body_is_truncated_at_the_cap(monkeypatch):
    monkeypatch.setattr(tokenomics.records.logs, "LOG_BODY_MAX_BYTES", 10)
    entry = body_line(b"x" * 25, b"", request_body=True)
    assert entry["request_body"] == "x" * 10 + "...[truncated 15 bytes]"


def test_request_log_file_is_0600_and_appended(tmp_path, capsys):
    path = tmp_path / "logs" / "requests.log"
    logger = RequestLogger(LogOptions(file_path=str(path)))
    logger.log(record(), "K")
    logger.log(record(request_id="tkn_" + "cd" * 16), "K")
    logger.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    lines = path.read_text().splitlines()
    assert [json.loads(x)["request_id"] for x in lines] == [REQUEST_ID, "tkn_" + "cd" * 16]
    assert capsys.readouterr().err.splitlines() == lines       # stderr gets the same lines
    os.chmod(path, 0o644)
    again = RequestLogger(LogOptions(file_path=str(path)), stream=io.StringIO())
    again.log(record(), "K")
    again.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(path.read_text().splitlines()) == 3


def test_request_log_write_failure_does_not_raise(caplog):
    out = io.StringIO()
    logger = RequestLogger(stream=out)
    out.close()
    logger.log(record(), "K")
    logger.log(record(), "K")
    assert len([r for r in caplog.records if "request log write failed" in r.getMessage()]) == 1


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_request_log_scrubs_tokens_and_keys_everywhere(fmt, tmp_path):
    path = tmp_path / "r.log"
    body = json.dumps({"messages": [{"role": "user", "content": " ".join(SECRETS)}]}).encode()
    rec = record(metadata={"note": f"token {RAW_TOKEN}", "k": OPENAI_KEY}, model=RAW_TOKEN,
                 upstream_request_id=ANTHROPIC_KEY)
    out = io.StringIO()
    logger = RequestLogger(LogOptions(format=fmt, request_body=True, response_body=True,
                                      file_path=str(path)), stream=out)
    logger.log(rec, "OPENAI_API_KEY", body, b"data: " + GOOGLE_KEY.encode() + b" " + AWS_KEY.encode())
    logger.close()
    for written in (out.getvalue(), path.read_text()):
        for secret in SECRETS:
            assert secret not in written
        assert written.count("[REDACTED]") >= len(SECRETS) + 3
        assert REQUEST_ID in written        # the line's own request id has the token shape but is kept


def test_scrub_shapes():
    assert scrub(f"a {RAW_TOKEN} b") == "a [REDACTED] b"
    assert scrub(f"{REQUEST_ID} {RAW_TOKEN}", keep=(REQUEST_ID,)) == f"{REQUEST_ID} [REDACTED]"
    assert scrub("sk-short and tkn_notatoken") == "sk-short and tkn_notatoken"
    for secret in SECRETS:
        assert scrub(f"x={secret};") == "x=[REDACTED];"


def test_redacting_filter_scrubs_messages_args_and_tracebacks():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(redacting_filter())
    logger = logging.getLogger("tokenomics")
    child = logging.getLogger("tokenomics.test_telemetry")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        logger.debug("lookup of %s failed", RAW_TOKEN)
        child.warning("upstream said: %s", OPENAI_KEY)
        logger.info("request %s done", REQUEST_ID, extra={"request_id": REQUEST_ID})
        try:
            raise RuntimeError(f"bad key {ANTHROPIC_KEY}")
        except RuntimeError:
            logger.exception("failed with %s", GOOGLE_KEY)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    text = out.getvalue()
    for secret in SECRETS:
        assert secret not in text
    assert "lookup of [REDACTED] failed" in text and "upstream said: [REDACTED]" in text
    assert f"request {REQUEST_ID} done" in text
    assert "RuntimeError: bad key [REDACTED]" in text       # the traceback was scrubbed too


def test_log_options_from_config():
    cfg = types.SimpleNamespace(format="text", disable_request=False, hide_token_hash=True, request_body=True,
                                response_body=False, file=types.SimpleNamespace(enabled=True, path="logs/r.log"))
    opts = LogOptions.from_config(cfg, data_dir="/data")
    assert opts == LogOptions(format="text", disable_request=False, hide_token_hash=True, request_body=True,
                              response_body=False, file_path="/data/logs/r.log")
    cfg.file.enabled = False
    assert LogOptions.from_config(cfg, "/data").file_path == ""


def test_rfc3339_ms():
    assert rfc3339_ms(0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339_ms(1_700_000_000.999) == "2023-11-14T22:13:20.999Z"


# -- events -------------------------------------------------------------------------------------

def test_event_types_are_the_thirteen_of_the_spec():
    assert set(EVENT_TYPES) == {
        "token.created", "token.updated", "token.deleted", "token.expired", "rule.violation",
        "rule.warning", "rule.match", "rule.mask", "budget.exceeded", "budget.update", "rate.exceeded",
        "request.completed", "server.start"}
    assert len(EVENT_TYPES) == 13


def test_make_event_shape():
    a = make_event("token.created", {"hash": "abc"}, 1_700_000_000.25)
    b = make_event("token.created", {"hash": "abc"}, 1_700_000_000.25)
    assert set(a) == {"id", "type", "timestamp", "data"}
    assert re.fullmatch(r"evt_[0-9a-f]{32}", a["id"]) and a["id"] != b["id"]
    assert a["type"] == "token.created" and a["data"] == {"hash": "abc"}
    assert a["timestamp"] == "2023-11-14T22:13:20.250Z"
    with pytest.raises(ValueError):
        make_event("token.create", {}, 0)


@pytest.mark.parametrize("filters, type_, expected", [
    ([], "rule.mask", True),
    (["*"], "server.start", True),
    (["token.created"], "token.created", True),
    (["token.created"], "token.deleted", False),
    (["token.*"], "token.deleted", True),
    (["token.*"], "rule.violation", False),
    (["rule.*", "budget.exceeded"], "budget.exceeded", True),
    (["rule.*", "budget.exceeded"], "budget.update", False),
    (["rate.*"], "rate.exceeded", True),
    (["request.*"], "rate.exceeded", False),
    (["budget.*"], "budgetx.update", False),
    (["token"], "token.created", False),
])
def test_event_matches(filters, type_, expected):
    assert event_matches(filters, type_) is expected


def test_validate_webhooks_defaults_and_durations():
    hooks = validate_webhooks([{"url": "https://example.com/hook"},
                               {"url": "http://127.0.0.1:9/x?y=1", "secret": "s", "signing_key": "k",
                                "events": ["token.*", "rule.violation", "*"], "timeout": "2s", "insecure": True},
                               {"url": "http://h/", "timeout": 0.5, "events": "server.start"}])
    assert hooks[0] == Webhook(url="https://example.com/hook", secret="", signing_key="", events=(),
                               timeout=5.0, insecure=False)
    assert hooks[1].timeout == 2.0 and hooks[1].events == ("token.*", "rule.violation", "*") and hooks[1].insecure
    assert hooks[2].timeout == 0.5 and hooks[2].events == ("server.start",)
    assert validate_webhooks(None) == []


@pytest.mark.parametrize("raw, where", [
    ({"url": "http://x"}, "events.webhooks:"),
    (["http://x"], "events.webhooks[0]:"),
    ([{"url": "ftp://x/"}], "events.webhooks[0].url"),
    ([{}], "events.webhooks[0].url"),
    ([{"url": "http://"}], "events.webhooks[0].url"),
    ([{"url": "http://x:99999/"}], "events.webhooks[0].url"),
    ([{"url": "http://x", "events": ["token.create"]}], "events.webhooks[0].events[0]"),
    ([{"url": "http://x", "events": ["tok.*"]}], "events.webhooks[0].events[0]"),
    ([{"url": "http://x", "events": [3]}], "events.webhooks[0].events[0]"),
    ([{"url": "http://x", "events": {"a": 1}}], "events.webhooks[0].events"),
    ([{"url": "http://x"}, {"url": "http://y", "timeout": 0}], "events.webhooks[1].timeout"),
    ([{"url": "http://x", "timeout": -1}], "events.webhooks[0].timeout"),
    ([{"url": "http://x", "timeout": "soon"}], "events.webhooks[0].timeout"),
    ([{"url": "http://x", "timeout": True}], "events.webhooks[0].timeout"),
    ([{"url": "http://x", "insecure": "yes"}], "events.webhooks[0].insecure"),
    ([{"url": "http://x", "secret": 12}], "events.webhooks[0].secret"),
    ([{"url": "http://x", "secrte": "s"}], "events.webhooks[0].secrte"),
])
def test_validate_webhooks_names_the_bad_field(raw, where):
    with pytest.raises(UsageError) as info:
        validate_webhooks(raw)
    assert str(info.value).startswith(where)


# -- webhook delivery against a real HTTP receiver ----------------------------------------------

class Receiver:
    """A stdlib HTTP server on 127.0.0.1 that records POSTs and answers with scripted statuses
    (200 once the script runs out); `hang` makes it hold every request until closed."""

    def __init__(self, script=(), hang=False, tls_context=None):
        self.requests: list = []
        self.script = list(script)
        self.hang = hang
        self.release = threading.Event()
        self.got = threading.Condition()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with owner.got:
                    owner.requests.append((self.path, dict(self.headers), body))
                    status = owner.script.pop(0) if owner.script else 200
                    owner.got.notify_all()
                if owner.hang:
                    owner.release.wait(10)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls_context is not None:
            self.server.socket = tls_context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        scheme = "https" if tls_context else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"

    def wait_for(self, n: int, timeout: float = 5.0) -> bool:
        with self.got:
            return self.got.wait_for(lambda: len(self.requests) >= n, timeout)

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made = []

    def make(**kw) -> Receiver:
        r = Receiver(**kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def deliver(hooks, events, close_timeout=5.0, **kw) -> WebhookDispatcher:
    """Emit `events` and let close() deliver them; returns the dispatcher for its counters."""
    async def go():
        d = WebhookDispatcher(hooks, backoff=kw.pop("backoff", 0.01), **kw)
        for e in events:
            d.emit(e)
        await d.close(close_timeout)
        return d
    return asyncio.run(go())


def ev(type_="request.completed", n=0) -> dict:
    return make_event(type_, {"n": n}, 1_700_000_000.0)


def test_webhook_signature_and_secret_headers(receiver):
    r = receiver()
    event = ev()

    async def go():
        d = WebhookDispatcher([{"url": r.url + "/hook", "secret": "s3cret", "signing_key": "k3y"}])
        runner = asyncio.create_task(d.run())
        d.emit(event)
        for _ in range(500):                     # bounded: at most ~5 s
            if d.delivered:
                break
            await asyncio.sleep(0.01)
        await d.close(2)
        await asyncio.wait_for(runner, 2)
        return d

    d = asyncio.run(go())
    assert d.delivered == 1 and len(r.requests) == 1
    path, headers, body = r.requests[0]
    assert path == "/hook"
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Webhook-Secret"] == "s3cret"
    expected = hmac.new(b"k3y", body, hashlib.sha256).hexdigest()
    assert headers["X-Webhook-Signature"] == "sha256=" + expected
    assert hmac.compare_digest(headers["X-Webhook-Signature"], "sha256=" + expected)
    assert json.loads(body) == event


def test_webhook_without_secret_or_key_sends_neither_header(receiver):
    r = receiver()
    deliver([{"url": r.url}], [ev()])
    headers = r.requests[0][1]
    assert "X-Webhook-Secret" not in headers and "X-Webhook-Signature" not in headers


def test_webhook_filters_are_honoured(receiver):
    r = receiver()
    hooks = [{"url": r.url + "/a", "events": ["token.*"]},
             {"url": r.url + "/b", "events": ["request.completed"]},
             {"url": r.url + "/c"}]
    deliver(hooks, [ev("token.created"), ev("request.completed"), ev("rule.mask")])
    got = sorted((path, json.loads(body)["type"]) for path, _, body in r.requests)
    assert got == [("/a", "token.created"), ("/b", "request.completed"), ("/c", "request.completed"),
                   ("/c", "rule.mask"), ("/c", "token.created")]


@pytest.mark.parametrize("script, attempts, delivered", [
    ([500, 500, 200], 3, 1),          # retried on 5xx, then accepted
    ([503] * 10, 4, 0),               # 1 attempt + 3 retries, then given up
    ([429, 200], 2, 1),               # 429 is retried
    ([400], 1, 0),                    # other 4xx are not
    ([404, 200], 1, 0),
])
def test_webhook_retries(receiver, script, attempts, delivered):
    r = receiver(script=script)
    d = deliver([{"url": r.url}], [ev()])
    assert len(r.requests) == attempts == d.attempts
    assert (d.delivered, d.failed) == (delivered, 1 - delivered)
    bodies = {body for _, _, body in r.requests}
    assert len(bodies) == 1                 # every retry sends the same event


def test_webhook_backoff_is_exponential(receiver):
    r = receiver(script=[500, 500, 500, 200])
    t0 = time.monotonic()
    d = deliver([{"url": r.url}], [ev()], backoff=0.05)
    elapsed = time.monotonic() - t0
    assert d.delivered == 1 and len(r.requests) == 4
    assert elapsed >= 0.05 + 0.1 + 0.2


def test_webhook_connection_refused_is_retried_then_given_up(caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = deliver([{"url": f"http://127.0.0.1:{port}/hooks/T0PSECRETPATH"}], [ev()])
    assert (d.attempts, d.delivered, d.failed) == (4, 0, 1)
    warnings = [rec.getMessage() for rec in caplog.records if "webhook" in rec.getMessage()]
    assert warnings and f"127.0.0.1:{port}" in warnings[0]
    assert "T0PSECRETPATH" not in caplog.text       # webhook paths can be secrets: never logged


def test_webhook_timeout_per_attempt(receiver):
    r = receiver(hang=True)
    t0 = time.monotonic()
    d = deliver([{"url": r.url, "timeout": 0.2}], [ev()], retries=1)
    assert (d.attempts, d.failed) == (2, 1)
    assert time.monotonic() - t0 < 2.0


def test_webhook_full_queue_drops_the_oldest_and_counts(receiver):
    r = receiver()
    metrics = Metrics()
    events = [ev(n=i) for i in range(5)]
    d = deliver([{"url": r.url}], events, queue_size=3, concurrency=1, on_drop=metrics.inc_dropped_events)
    assert d.dropped == 2
    assert [json.loads(body)["data"]["n"] for _, _, body in r.requests] == [2, 3, 4]
    fams = parse_prometheus(metrics.render())
    assert values(fams, "tokenomics_webhook_events_dropped_total") == {(): 2}


def test_hanging_webhook_never_blocks_emit_and_close_is_bounded(receiver):
    r = receiver(hang=True)

    async def go():
        d = WebhookDispatcher([{"url": r.url, "timeout": 30}], queue_size=1000)
        runner = asyncio.create_task(d.run())
        d.emit(ev())
        for _ in range(500):                     # until the receiver holds the first delivery
            if r.requests:
                break
            await asyncio.sleep(0.01)
        assert r.requests
        for i in range(1600):                    # synchronous: the loop cannot run meanwhile
            d.emit(ev(n=i))
        pending, dropped = d.pending(), d.dropped
        held = len(r.requests)
        t0 = time.perf_counter()
        await d.close(0.3)
        close_seconds = time.perf_counter() - t0
        await asyncio.wait_for(runner, 2)
        return held, pending, dropped, close_seconds

    held, pending, dropped, close_seconds = asyncio.run(go())
    assert not asyncio.iscoroutinefunction(WebhookDispatcher.emit)  # emitting never waits on a delivery
    assert held == 1  # 1,600 emits returned while the receiver still held the first delivery
    assert pending <= 1000 and dropped >= 1601 - 1000 - tokenomics.records.events.WEBHOOK_CONCURRENCY
    assert close_seconds < 2.0


def test_emit_after_close_is_ignored(receiver):
    r = receiver()

    async def go():
        d = WebhookDispatcher([{"url": r.url}])
        await d.close(1)
        d.emit(ev())
        return d.pending()

    assert asyncio.run(go()) == 0 and r.requests == []


def test_close_with_nothing_queued_is_immediate():
    async def go():
        d = WebhookDispatcher([{"url": "http://127.0.0.1:9/"}])
        t0 = time.perf_counter()
        await d.close(5)
        return time.perf_counter() - t0
    assert asyncio.run(go()) < 0.5


def test_webhook_https_verifies_unless_insecure(receiver):
    import trustme
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    r = receiver(tls_context=ctx)
    d = deliver([{"url": r.url + "/tls", "insecure": True}], [ev()])
    assert d.delivered == 1 and r.requests[0][0] == "/tls"
    d = deliver([{"url": r.url + "/tls"}], [ev()], retries=0)     # self-signed CA: not trusted
    assert (d.delivered, d.failed) == (0, 1) and len(r.requests) == 1


def test_deliver_once(receiver):
    r = receiver()
    assert deliver_once([{"url": r.url, "events": ["token.*"]}], ev("token.deleted"), timeout=5) == 1
    assert json.loads(r.requests[0][2])["type"] == "token.deleted"
    assert deliver_once([{"url": r.url, "events": ["rule.*"]}], ev("token.deleted"), timeout=5) == 0
    assert len(r.requests) == 1
    assert deliver_once([{"url": "ftp://nope"}], ev(), timeout=1) == 0       # bad config: swallowed


def test_deliver_once_is_bounded_when_the_receiver_hangs(receiver):
    r = receiver(hang=True)
    t0 = time.monotonic()
    assert deliver_once([{"url": r.url, "timeout": 30}], ev(), timeout=0.3) == 0
    assert time.monotonic() - t0 < 2.5
