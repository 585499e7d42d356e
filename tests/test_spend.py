"""Seeing spend, and a changed hash key (issue 13, SPEC §3 and §9): the key-check value in the
store, `token list`/`get` with used and left per budget window, the ledger's --token/--label
filters, labels in its tables, costs that never read as zero, and budget refusals counted
apart from rate limits."""
import hashlib
import hmac
import json
import re

import pytest

from conftest import base_env
from test_proxy import raw
from tokenomics.records.ledger_report import format_usd

OTHER_KEY = "a-different-hash-key-5f1c9e"
MISMATCH = "hash key does not match the one the stored tokens were made with"


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def fails(proc, code: int, *needles: str):
    assert proc.returncode == code, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in {proc.stderr!r}"
    return proc


def create(cli, policy: dict, *extra, env=None) -> dict:
    proc = ok(cli("token", "create", "--policy", json.dumps(policy), "--json", *extra, env=env))
    return json.loads(proc.stdout)


def chat(proxy, token: str, text: str = "hello there", model: str = "mock-1"):
    status, _, body = raw(proxy, "POST", "/v1/chat/completions",
                          {"model": model, "messages": [{"role": "user", "content": text}]},
                          {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    return status, json.loads(body)


def wrong_key_env(cli):
    return base_env(cli.data_dir, TOKENOMICS_HASH_KEY=OTHER_KEY)


# --- the hash key check ---------------------------------------------------------------------------

def test_store_keeps_a_check_of_the_hash_key_never_the_key(cli):
    env = base_env(cli.data_dir, TOKENOMICS_HASH_KEY="the-original-key-0123")
    create(cli, {"provider": "mock"}, env=env)
    text = (cli.data_dir / "tokens.json").read_text()
    doc = json.loads(text)
    expected = hmac.new(b"the-original-key-0123", b"tokenomics hash key check", hashlib.sha256).hexdigest()
    assert doc["hash_key_check"] == expected
    assert "the-original-key-0123" not in text


def test_run_names_a_changed_hash_key(cli, tmp_path):
    made = create(cli, {"provider": "mock"})
    marker = tmp_path / "ran"
    proc = cli("run", "--token", made["token"], "--", "python3", "-c", f"open({str(marker)!r}, 'w')",
               env=wrong_key_env(cli))
    fails(proc, 1, MISMATCH, "TOKENOMICS_HASH_KEY", "hash.key")
    assert "no token" not in proc.stderr
    assert OTHER_KEY not in proc.stderr and made["token"] not in proc.stderr
    assert not marker.exists(), "the command ran although no token could be accepted"


def test_token_commands_name_a_changed_hash_key(cli):
    made = create(cli, {"provider": "mock"}, "--label", "kept")
    before = (cli.data_dir / "tokens.json").read_bytes()
    env = wrong_key_env(cli)
    for args in (["token", "list"], ["token", "list", "--json"], ["token", "get", "--hash", made["hash"][:12]],
                 ["token", "update", "--hash", made["hash"][:12], "--label", "x"],
                 ["token", "delete", "--hash", made["hash"][:12]],
                 ["token", "create", "--policy", "{}"]):
        proc = fails(cli(*args, env=env), 1, MISMATCH, "TOKENOMICS_HASH_KEY")
        assert OTHER_KEY not in proc.stderr + proc.stdout
    assert (cli.data_dir / "tokens.json").read_bytes() == before  # nothing rewritten with the wrong key
    # the original key (the generated hash.key) still opens everything
    assert [t["label"] for t in json.loads(ok(cli("token", "list", "--json")).stdout)] == ["kept"]


def test_restored_hash_key_file_works_and_lost_one_is_named(cli):
    create(cli, {"provider": "mock"})
    key_file = cli.data_dir / "hash.key"
    key_file.unlink()  # lost: a new key is generated, which the tokens were not made with
    fails(cli("token", "list"), 1, MISMATCH, str(key_file))


def test_serve_refuses_a_changed_hash_key(cli):
    create(cli, {"provider": "mock"})
    proc = cli("serve", "--port", "0", "--https-port", "0", env=wrong_key_env(cli), timeout=30)
    fails(proc, 1, MISMATCH)
    assert "listening" not in proc.stderr


def test_status_names_a_changed_hash_key(cli):
    create(cli, {"provider": "mock"})
    proc = ok(cli("status", env=wrong_key_env(cli)))
    line = next(line for line in proc.stdout.splitlines() if line.startswith("tokens:"))
    assert MISMATCH in line and OTHER_KEY not in proc.stdout


def test_doctor_fails_on_a_changed_hash_key(cli):
    create(cli, {"provider": "mock"})
    proc = fails(cli("doctor", env=wrong_key_env(cli)), 1)
    line = next(line for line in proc.stdout.splitlines() if "hash key" in line)
    assert line.startswith("FAIL") and MISMATCH in line and OTHER_KEY not in proc.stdout
    report = json.loads(cli("doctor", "--json", env=wrong_key_env(cli)).stdout)
    (hash_check,) = [c for c in report["checks"] if c["name"] == "hash key"]
    assert hash_check["status"] == "fail" and report["ok"] is False
    assert not any(MISMATCH in c["detail"] for c in report["checks"] if c["name"] != "hash key")
    right = json.loads(cli("doctor", "--json").stdout)
    assert [c["status"] for c in right["checks"] if c["name"] == "hash key"] == ["warn"]  # from hash.key


def test_store_without_check_value_keeps_working_and_gets_one(cli):
    made = create(cli, {"provider": "mock"})
    path = cli.data_dir / "tokens.json"
    doc = json.loads(path.read_text())
    del doc["hash_key_check"]  # as written by a version without the check
    path.write_text(json.dumps(doc))
    assert len(json.loads(ok(cli("token", "list", "--json")).stdout)) == 1
    ok(cli("token", "update", "--hash", made["hash"][:12], "--label", "renamed"))
    key = (cli.data_dir / "hash.key").read_bytes().strip()
    assert json.loads(path.read_text())["hash_key_check"] == \
        hmac.new(key, b"tokenomics hash key check", hashlib.sha256).hexdigest()
    # from now on a changed key is recognised
    fails(cli("token", "list", env=wrong_key_env(cli)), 1, MISMATCH)


# --- token list / get -----------------------------------------------------------------------------

BIG_POLICY = {
    "provider": "mock", "base_key_env": "SOME_VERY_LONG_PROVIDER_KEY_VARIABLE_NAME",
    "model_regex": "^(mock-1|mock-mini|gpt-4o-mini|claude-sonnet-4-5|a-model-with-a-long-name)$",
    "max_tokens": 123456789,
    "budget": {"tokens": {"hourly": 1000000, "daily": 20000000, "monthly": 300000000, "total": 900000000},
               "usd": {"hourly": 1.5, "daily": 25, "monthly": 750.25, "total": 12345.678}},
    "providers": {"openai": [{"model": "gpt-4o-mini", "max_tokens": 5000000}],
                  "anthropic": [{"model_regex": "^claude-", "max_tokens": 7000000,
                                 "rules": [{"name": "r1", "type": "regex", "pattern": "x", "action": "fail"}]}]},
    "rules": [{"name": f"rule-{i}", "type": "regex", "pattern": f"secret{i}", "action": "fail"} for i in range(12)],
}
LONG_LABEL = "the-search-team-nightly-evaluation-pipeline-with-a-very-long-name"


def test_list_fits_100_columns_and_wide_shows_everything(cli):
    made = create(cli, BIG_POLICY, "--label", LONG_LABEL, "--expires", "30d")
    create(cli, {"provider": "mock"})
    out = ok(cli("token", "list")).stdout
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 100, "\n".join(f"{len(x):3} {x}" for x in lines)
    assert lines[0].split()[:5] == ["HASH", "LABEL", "CREATED", "EXPIRES", "STATUS"]
    row = next(line for line in lines if line.startswith(made["hash"][:12]))
    assert "active" in row and "…" in row and " 13" in row  # label cut; 12 + 1 rules
    assert LONG_LABEL[:10] in row
    # every budget window has its own line with used, left and cap
    windows = [line for line in lines if line.startswith("    ")]
    assert len(windows) == 10  # 4 token + 4 USD windows (max_tokens joins tokens total), 2 per-provider caps
    assert any("tokens per hour" in w and "used 0" in w and "left 1,000,000" in w and "of 1,000,000" in w
               for w in windows)
    assert any("USD per month" in w and "used $0 " in w and "left $750.2500" in w and w.endswith("of $750.25")
               for w in windows)
    assert any("(openai[0])" in w and "of 5,000,000" in w for w in windows)

    wide = ok(cli("token", "list", "--wide")).stdout
    assert made["hash"] in wide and LONG_LABEL in wide and BIG_POLICY["base_key_env"] in wide
    assert "resets " in wide


def test_used_and_left_come_from_the_counters_the_proxy_enforces(cli, start_proxy):
    policy = {"provider": "mock", "budget": {"tokens": {"daily": 10000, "total": 50000}, "usd": {"monthly": 1}}}
    made = create(cli, policy, "--label", "counted")
    idle = create(cli, {"provider": "mock", "budget": {"tokens": {"total": 777}}})
    proxy = start_proxy()
    spent, cost = 0, 0.0
    for text in ("hello there", "tell me something about the number seven"):
        status, body = chat(proxy, made["token"], text)
        assert status == 200, body
        spent += body["usage"]["total_tokens"]
        cost += body["usage"]["prompt_tokens"] * 1e-6 + body["usage"]["completion_tokens"] * 2e-6  # mock-1 price
    assert spent > 0

    journal = cli.data_dir / "usage.journal"
    before = journal.read_bytes()
    # read while the proxy runs: the numbers, and the proxy's files untouched
    listed = {t["hash"]: t for t in json.loads(ok(cli("token", "list", "--json")).stdout)}
    assert journal.read_bytes() == before and not (cli.data_dir / "usage.journal.snapshot").exists()
    usage = {(w["unit"], w["period"]): w for w in listed[made["hash"]]["usage"]}
    assert usage[("tokens", "daily")]["used"] == spent and usage[("tokens", "daily")]["left"] == 10000 - spent
    assert usage[("tokens", "total")]["used"] == spent and usage[("tokens", "total")]["left"] == 50000 - spent
    assert usage[("usd", "monthly")]["used"] == pytest.approx(cost, rel=1e-6)
    assert usage[("usd", "monthly")]["left"] == pytest.approx(1 - cost, rel=1e-6)
    assert [(w["used"], w["left"]) for w in listed[idle["hash"]]["usage"]] == [(0, 777)]
    assert set(listed[made["hash"]]) >= {"hash", "label", "created_at", "expires_at", "expired", "policy"}

    text = ok(cli("token", "list")).stdout
    assert re.search(rf"tokens per day\s+used {spent:,}\s+left {10000 - spent:,}\s+of 10,000", text), text

    proxy.stop()  # compacts the journal into a snapshot: the same numbers from there
    got = ok(cli("token", "get", "--hash", made["hash"][:10])).stdout
    assert re.search(rf"tokens total\s+used {spent:,}\s+left {50000 - spent:,}\s+of 50,000", got), got
    assert re.search(r"USD per month\s+used \$0\.0000[1-9]", got), got  # a real cost, not $0.0000
    as_json = json.loads(ok(cli("token", "get", "--hash", made["hash"][:10], "--json")).stdout)
    assert {(w["unit"], w["period"]): w["used"] for w in as_json["usage"]}[("tokens", "daily")] == spent


def test_get_says_when_there_is_no_budget(cli):
    made = create(cli, {"provider": "mock"})
    out = ok(cli("token", "get", "--hash", made["hash"][:8])).stdout
    assert re.search(r"Budget:\s+none", out), out


# --- the ledger -----------------------------------------------------------------------------------

@pytest.fixture
def two_tokens(cli, start_proxy):
    """alpha made 2 requests, beta 1 (mock-1, priced at $1/$2 per million: tiny real costs)."""
    alpha = create(cli, {"provider": "mock"}, "--label", "alpha")
    beta = create(cli, {"provider": "mock"}, "--label", "beta")
    proxy = start_proxy()
    for token in (alpha, alpha, beta):
        status, body = chat(proxy, token["token"])
        assert status == 200, body
    proxy.stop()
    return alpha, beta


def summary_json(cli, *args):
    return json.loads(ok(cli("ledger", "summary", "--json", *args)).stdout)


def test_ledger_filters_by_token_and_label(cli, two_tokens):
    alpha, beta = two_tokens
    assert summary_json(cli)["totals"]["request_count"] == 3
    by_label = summary_json(cli, "--label", "alpha")
    assert by_label["totals"]["request_count"] == 2 and list(by_label["by_token"]) == [alpha["hash"][:16]]
    assert by_label["filters"]["label"] == "alpha"
    by_hash = summary_json(cli, "--token", beta["hash"][:8])
    assert by_hash["totals"]["request_count"] == 1 and list(by_hash["by_token"]) == [beta["hash"][:16]]
    assert summary_json(cli, "--token", beta["hash"])["totals"]["request_count"] == 1  # the full hash too
    assert summary_json(cli, "--token", beta["hash"][:8], "--label", "alpha")["totals"]["request_count"] == 0

    sessions = json.loads(ok(cli("ledger", "sessions", "--json", "--label", "beta")).stdout)
    assert len(sessions) == 1 and sessions[0]["totals"]["request_count"] == 1
    sid = sessions[0]["session_id"]
    shown = json.loads(ok(cli("ledger", "show", sid, "--json", "--token", alpha["hash"][:8])).stdout)
    assert [r["token_hash"] for r in shown["requests"]] == [alpha["hash"][:16]] * 2
    assert shown["totals"]["request_count"] == 2
    text = ok(cli("ledger", "show", sid, "--label", "beta")).stdout
    assert "beta" in text and "alpha" not in text

    fails(cli("ledger", "summary", "--label", "gamma"), 1, "no token is labelled 'gamma'", "alpha, beta")
    fails(cli("ledger", "summary", "--token", "zz"), 2, "--token", "hex")
    proc = fails(cli("ledger", "sessions", "--token", alpha["token"]), 2, "not the token itself")
    assert alpha["token"] not in proc.stderr


def test_ledger_tables_name_tokens_by_label_and_keep_small_costs(cli, two_tokens):
    alpha, beta = two_tokens
    out = ok(cli("ledger", "summary")).stdout
    token_table = out[out.index("\nTOKEN") + 1:].split("\n\n")[0]
    assert "alpha" in token_table and "beta" in token_table
    assert alpha["hash"][:16] not in out and alpha["hash"][:12] not in token_table
    assert not re.search(r"\b0\.0000\b", out), out
    cost = summary_json(cli)["totals"]["cost_usd"]
    assert 0 < cost < 0.0001  # a real cost far below a cent
    assert format_usd(cost) in out and float(format_usd(cost)) == pytest.approx(cost, rel=0.05)

    session = json.loads(ok(cli("ledger", "sessions", "--json")).stdout)[0]["session_id"]
    shown = ok(cli("ledger", "show", session)).stdout
    assert "alpha" in shown and "beta" in shown and alpha["hash"][:8] not in shown
    assert not re.search(r"\b0\.0000\b", shown), shown
    # an unlabelled token shows a 12-char hash prefix
    ok(cli("token", "update", "--hash", beta["hash"][:12], "--label", ""))
    out = ok(cli("ledger", "summary")).stdout
    assert beta["hash"][:12] in out and beta["hash"][:13] not in out


def test_format_usd_keeps_digits_below_a_cent():
    assert format_usd(0) == "0.0000"
    assert format_usd(0.0115) == "0.0115"
    assert format_usd(12.5) == "12.5000"
    assert format_usd(0.00012345) == "0.00012"
    assert format_usd(0.0000031) == "0.0000031"
    assert format_usd(0.000000001) == "0.0000000010"


def test_budget_refusals_are_not_rate_limits(cli, start_proxy):
    broke = create(cli, {"provider": "mock", "budget": {"tokens": {"total": 1}}}, "--label", "broke")
    busy = create(cli, {"provider": "mock", "rate_limit": {"rules": [{"requests": 1, "window": "1h"}]}},
                  "--label", "busy")
    proxy = start_proxy()
    status, body = chat(proxy, broke["token"])
    assert status == 429 and body["error"]["code"] == "budget_exceeded", body
    assert chat(proxy, busy["token"])[0] == 200
    status, body = chat(proxy, busy["token"])
    assert status == 429 and body["error"]["code"] == "rate_limited", body
    proxy.stop()

    summary = summary_json(cli)
    t = summary["totals"]
    assert (t["request_count"], t["budget_exceeded_count"], t["rate_limit_count"]) == (3, 1, 1)
    assert summary["by_token"][broke["hash"][:16]]["budget_exceeded_count"] == 1
    assert summary["by_token"][broke["hash"][:16]]["rate_limit_count"] == 0
    assert summary["by_token"][busy["hash"][:16]]["rate_limit_count"] == 1
    assert summary["by_token"][busy["hash"][:16]]["budget_exceeded_count"] == 0
    for table in ("by_model", "by_provider", "by_token", "by_branch"):
        for entry in summary[table].values():
            assert "budget_exceeded_count" in entry, table
    session = json.loads(ok(cli("ledger", "sessions", "--json")).stdout)[0]
    assert session["totals"]["budget_exceeded_count"] == 1  # in the summary file the proxy wrote

    out = ok(cli("ledger", "summary")).stdout
    assert "over budget 1" in out and "rate limited 1" in out
    token_table = out[out.index("\nTOKEN") + 1:].split("\n\n")[0].splitlines()
    header = token_table[0].split("  ")
    header = [h.strip() for h in header if h.strip()]
    assert "OVER BUDGET" in header and "RATE LIMITED" in header
    broke_row = next(line for line in token_table if line.startswith("broke"))
    cells = broke_row.split()
    assert cells[header.index("OVER BUDGET")] == "1" and cells[header.index("RATE LIMITED")] == "0"
