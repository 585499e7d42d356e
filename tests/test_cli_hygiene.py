"""What the CLI prints and the memory log writes, handled as hostile input: control characters in
labels, model names and other client-chosen strings are shown escaped (never forging rows or
driving the terminal); memory logs stay inside the data dir and never hold a token or a key."""
import json
import logging
import time

import pytest
import yaml

from conftest import ANTHROPIC_KEY, OPENAI_KEY
from test_proxy import oa
from tokenomics.records.memory import MemoryWriter

EVIL = "evil\n\x1b[2J\rrow\u202e"          # a newline, a clear-screen, a carriage return, a bidi override
SHOWN = "evil\\n\\x1b[2J\\rrow\\u202e"     # how the terminal must see it
RAW_CONTROLS = ("\x1b", "\r", "\u202e")
HASH_A = "a" * 64
T0 = 1_795_000_000.0


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return proc


def assert_shown_escaped(text: str, rows: int | None = None):
    for ch in RAW_CONTROLS:
        assert ch not in text, f"raw {ch!r} in output:\n{text!r}"
    assert SHOWN in text, text
    if rows is not None:
        assert len(text.splitlines()) == rows, text


# --- terminal output ------------------------------------------------------------------------------

def test_printable_escapes_controls_and_keeps_ordinary_text():
    from tokenomics.util import printable
    assert printable(EVIL) == SHOWN
    assert printable("caf\u00e9 \u65e5\u672c gpt-4o ^gpt-4\\.") == "caf\u00e9 \u65e5\u672c gpt-4o ^gpt-4\\."
    assert printable("a\tb\x00c\x7fd\x9be\u2028f\u2066g\ud800") == "a\\tb\\x00c\\x7fd\\x9be\\u2028f\\u2066g\\ud800"
    assert printable(42) == "42"


def test_token_list_and_get_escape_labels_and_model_names(cli):
    clean = ok(cli("token", "create", "--policy", json.dumps({"model": "gpt-4o"}), "--label", "plain", "--json"))
    ok(cli("token", "create", "--policy", json.dumps({"model": "gpt" + EVIL}), "--label", EVIL, "--json"))
    narrow = ok(cli("token", "list")).stdout  # long cells are cut to fit 100 columns: escaped, then cut
    assert not any(ch in narrow for ch in RAW_CONTROLS) and len(narrow.splitlines()) == 3, narrow
    out = ok(cli("token", "list", "--wide")).stdout
    assert_shown_escaped(out, rows=3)  # header + two tokens, however the names try to add rows
    assert "gpt" + SHOWN in out
    evil_row = next(line for line in out.splitlines() if SHOWN in line)
    assert evil_row.split()[0] != "HASH" and len(evil_row.split()) >= 8
    # JSON stays exact: the label and the model come back byte for byte.
    records = json.loads(ok(cli("token", "list", "--json")).stdout)
    assert sorted(r["label"] for r in records) == sorted([EVIL, "plain"])
    evil_hash = next(r["hash"] for r in records if r["label"] == EVIL)
    shown = ok(cli("token", "get", "--hash", evil_hash[:12])).stdout
    assert_shown_escaped(shown)
    assert json.loads(ok(cli("token", "get", "--hash", evil_hash[:12], "--json")).stdout)["policy"]["model"] \
        == "gpt" + EVIL
    assert json.loads(clean.stdout)["token"]


def _write_session(data_dir, model: str, provider: str, branch: str, session_id: str = "abcd1234"):
    sessions = data_dir / "sessions"
    sessions.mkdir(exist_ok=True)
    rows = [{"type": "session", "session_id": session_id, "started_at": "2026-11-27T12:00:00.000Z",
             "git": {"branch": branch, "commit_start": "abc1234", "repo_root": "/repo" + branch}, "pid": 1}]
    for i, (m, p) in enumerate([(model, provider), ("gpt-4o", "openai")]):
        rows.append({"type": "request", "timestamp": f"2026-11-27T12:00:0{i + 1}.000Z",
                     "request_id": f"req_{i}", "token_hash": "ab" * 8, "model": m, "provider": p,
                     "endpoint": "/v1/chat/completions", "input_tokens": 10, "output_tokens": 5,
                     "cost_usd": 0.001, "duration_ms": 12.0, "status_code": 200, "stream": False,
                     "error": "", "retry_count": 0, "rule_matches": [], "metadata": {}, "provider_meta": {}})
    (sessions / f"2026-11-27_{session_id}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("args", [("ledger", "summary"), ("ledger", "sessions"), ("ledger", "show", "abcd")])
def test_ledger_tables_escape_model_provider_and_branch(cli, data_dir, tmp_path, args):
    from conftest import CLI
    _write_session(data_dir, "m" + EVIL, "p" + EVIL, "b" + EVIL)
    out = ok(cli(*args)).stdout
    assert_shown_escaped(out)
    # Same ledger with harmless names: exactly as many lines, so no row was forged.
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    _write_session(plain_dir, "m" + "x" * len(SHOWN), "p" + "x" * len(SHOWN), "b" + "x" * len(SHOWN))
    plain = ok(CLI(plain_dir, cli.cwd)(*args)).stdout
    assert len(out.splitlines()) == len(plain.splitlines())
    if args[1] != "sessions":
        assert "m" + SHOWN in out
    # --json keeps the exact strings.
    data = json.loads(ok(cli(*args, "--json")).stdout)
    if args[1] == "summary":
        assert "m" + EVIL in data["by_model"] and "b" + EVIL in data["by_branch"]
    elif args[1] == "sessions":
        assert data[0]["git"]["branch"] == "b" + EVIL
    else:
        assert data["requests"][0]["model"] == "m" + EVIL


def test_provider_and_status_output_escape_catalog_strings(cli, data_dir):
    (data_dir / "providers.yaml").write_text(yaml.safe_dump(
        {"local": {"upstream_url": "http://127.0.0.1:9/" + EVIL, "models": ["model" + EVIL]},
         "odd" + EVIL: {"upstream_url": "http://127.0.0.1:9", "api_key_env": "ODD_KEY"}}))
    listing = ok(cli("provider", "list")).stdout
    assert_shown_escaped(listing)
    models = ok(cli("provider", "models", "local")).stdout
    assert_shown_escaped(models, rows=2)
    status = ok(cli("status")).stdout
    assert_shown_escaped(status, rows=4)
    assert json.loads(ok(cli("status", "--json")).stdout)["providers"]["odd" + EVIL] is False


# --- memory log confinement -----------------------------------------------------------------------

def test_token_create_refuses_memory_paths_outside_the_data_dir(cli, data_dir, tmp_path):
    outside = tmp_path / "outside-dir"
    outside.mkdir()
    (data_dir / "link").symlink_to(outside, target_is_directory=True)
    refused = [
        ({"file_path": "../outside"}, "memory.file_path"),
        ({"file_path": "mem/../../outside", "file_name": "{token_hash}.md"}, "memory.file_path"),
        ({"file_path": "/tmp/x"}, "memory.file_path"),
        ({"file_path": "~/x"}, "memory.file_path"),
        ({"file_path": str(outside / "x")}, "memory.file_path"),
        ({"file_path": "link"}, "memory.file_path"),                       # a symlink out
        ({"file_path": "link/sub", "file_name": "{token_hash}/{date}.md"}, "memory.file_path"),
        ({"file_path": "mem", "file_name": "../../escape.md"}, "memory.file_name"),
    ]
    for memory, field in refused:
        proc = cli("token", "create", "--policy", json.dumps({"memory": {"enabled": True, **memory}}))
        assert proc.returncode == 2, (memory, proc.stdout, proc.stderr)
        assert field in proc.stderr and "Traceback" not in proc.stderr, (memory, proc.stderr)
        assert "tkn_" not in proc.stdout
    assert json.loads(ok(cli("token", "list", "--json")).stdout) == []
    # update is validated the same way
    token_hash = json.loads(ok(cli("token", "create", "--policy", "{}", "--json")).stdout)["hash"]
    for memory, field in (refused[0], refused[5]):
        proc = cli("token", "update", "--hash", token_hash, "--policy", json.dumps({"memory": memory}))
        assert proc.returncode == 2 and field in proc.stderr, proc.stderr
    assert list(outside.iterdir()) == []
    # Inside the data dir, by a relative or an absolute path, with placeholders and subdirectories: fine.
    for good in ({"file_path": "mem", "file_name": "{token_hash}/{date}.md"},
                 {"file_path": str(data_dir / "abs" / "log.md")}, {"file_path": "notes/conv.md"}):
        ok(cli("token", "create", "--policy", json.dumps({"memory": {"enabled": True, **good}})))


def test_config_ledger_memory_is_confined_too(cli, tmp_path):
    config = cli.cwd / "config.yaml"
    config.write_text(yaml.safe_dump({"ledger": {"memory": {"enabled": True, "file_path": str(tmp_path / "out")}}}))
    proc = cli("--config", str(config), "token", "list")
    assert proc.returncode == 2 and "ledger.memory.file_path" in proc.stderr, proc.stderr
    config.write_text(yaml.safe_dump({"ledger": {"memory": {"enabled": True, "file_path": "convo"}}}))
    ok(cli("--config", str(config), "token", "list"))


def test_memory_writes_do_not_follow_a_symlink_made_later(tmp_path, caplog):
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    writer = MemoryWriter(str(data), {"enabled": True, "file_path": "mem", "file_name": "{token_hash}/{date}.md"})
    single = MemoryWriter(str(data), {"enabled": True, "file_path": "one/conv.md"})
    writer.append(HASH_A, "m", [("user", "before")], T0)
    assert list((data / "mem").rglob("*.md"))
    # After validation, someone swaps the directory for a link out, and plants a link as the file.
    (data / "mem").rename(data / "mem-old")
    (data / "mem").symlink_to(outside, target_is_directory=True)
    (data / "one").mkdir()
    (data / "one" / "conv.md").symlink_to(outside / "planted.md")
    with caplog.at_level(logging.ERROR, logger="tokenomics"):
        writer.append(HASH_A, "m", [("user", "secret after the swap")], T0 + 60)
        single.append(HASH_A, "m", [("user", "secret through the file link")], T0 + 60)
    assert [p for p in outside.rglob("*")] == [], "a write followed a symlink out of the data dir"
    assert sum("memory log" in r.getMessage() for r in caplog.records) == 2
    assert "secret" not in caplog.text


# --- memory log scrubbing -------------------------------------------------------------------------

CUSTOM_KEY = "plain-custom-provider-secret-0042"   # no known key shape: only its value betrays it


def test_memory_log_never_holds_a_token_or_a_provider_key(cli, stub, start_proxy, data_dir):
    other_token = "tkn_" + "0123456789abcdef" * 2
    token = cli.token({"base_key_env": "CUSTOM_PROVIDER_KEY",
                       "memory": {"enabled": True, "file_path": "mem", "file_name": "{token_hash}.md"}})
    stub.set_reply_text(f"Echo: {OPENAI_KEY} {CUSTOM_KEY} {other_token} sk-ant-api03-{'Z' * 24} done")
    proxy = start_proxy(upstream_url=stub.url, env={"CUSTOM_PROVIDER_KEY": CUSTOM_KEY})
    answer = oa(proxy, token).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": (
        f"my token is {token}, another {other_token}, keys {OPENAI_KEY} / {ANTHROPIC_KEY} / {CUSTOM_KEY} "
        "and sk-proj-ABCDEFGHIJKLMNOPQRSTUVWX; thanks")}])
    assert answer.choices[0].message.content
    assert stub.last.headers  # the upstream was reached
    assert proxy.stop() == 0
    root = data_dir / "mem"
    deadline = time.monotonic() + 5
    text = ""
    while time.monotonic() < deadline and "| assistant |" not in text:
        text = "".join(p.read_text() for p in root.rglob("*.md")) if root.exists() else ""
        time.sleep(0.05)
    assert "| user | gpt-4o" in text and "| assistant | gpt-4o" in text
    for secret in (token, other_token, OPENAI_KEY, ANTHROPIC_KEY, CUSTOM_KEY, "sk-proj-ABCDEFGHIJKLMNOPQRSTUVWX",
                   "sk-ant-api03-" + "Z" * 24, token[4:]):
        assert secret not in text, secret
    assert text.count("[REDACTED]") >= 8
    assert "my token is [REDACTED]" in text and "thanks" in text and "done" in text
    assert "Bearer" not in text and "authorization" not in text.lower()
