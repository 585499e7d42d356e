"""CLI section through a real subprocess: help, global options, exit codes, `token ...` and
`version`, and the one-JSON-document rule for --json."""
import datetime as dt
import json
import re

import pytest
import yaml

import tokenomics

RECORD_KEYS = {"hash", "label", "created_at", "expires_at", "expired", "policy", "usage"}  # §3, + budget windows
DAY = 86400


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return proc


def one_json(proc):
    """--json prints exactly one JSON document on stdout and nothing else (json.loads rejects extras)."""
    ok(proc)
    return json.loads(proc.stdout)


def no_traceback(proc):
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def rfc3339(when: float) -> str:
    return dt.datetime.fromtimestamp(when, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def create(cli, policy=None, *extra):
    return one_json(cli("token", "create", "--policy", json.dumps(policy or {}), "--json", *extra))


def listing(cli, *extra):
    return one_json(cli("token", "list", "--json", *extra))


# --- help, version, basic exit codes -------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--help"], ["token", "serve", "--dir", "--config"]),
    (["-h"], ["token"]),
    (["token", "--help"], ["create", "list", "get", "update", "delete"]),
    (["token", "create", "--help"], ["--policy", "--expires", "--label", "--json"]),
])
def test_help_exits_0(cli, args, words):
    proc = ok(cli(*args))
    for word in words:
        assert word in proc.stdout


def test_version(cli):
    proc = ok(cli("version"))
    assert tokenomics.__version__ in proc.stdout
    data = one_json(cli("version", "--json"))
    assert data["version"] == tokenomics.__version__


def test_no_command_and_unknown_command_exit_2(cli):
    assert cli().returncode == 2
    proc = cli("frobnicate")
    assert proc.returncode == 2 and "frobnicate" in proc.stderr
    proc = cli("token", "create", "--policy", "{}", "--bogus-flag")
    assert proc.returncode == 2 and "--bogus-flag" in proc.stderr


def test_create_requires_a_policy(cli):
    proc = no_traceback(cli("token", "create"))
    assert proc.returncode == 2 and "--policy" in proc.stderr


# --- global options -----------------------------------------------------------------------------

def test_dir_accepted_before_and_after_the_command_words(cli, tmp_path):
    other = tmp_path / "other-dir"
    made = one_json(cli("--dir", str(other), "token", "create", "--policy", "{}", "--json"))
    assert (other / "tokens.json").exists()
    assert listing(cli) == []  # the default data dir ($TOKENOMICS_DIR) is untouched
    for args in (["--dir", str(other), "token", "list", "--json"],
                 ["token", "list", "--json", "--dir", str(other)],
                 ["token", "--dir", str(other), "list", "--json"]):
        items = one_json(cli(*args))
        assert [i["hash"] for i in items] == [made["hash"]], args


def test_config_accepted_before_and_after_the_command_words(cli, tmp_path):
    other = tmp_path / "from-config"
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"dir": str(other)}))
    env = {k: v for k, v in cli.env.items() if k != "TOKENOMICS_DIR"}
    made = one_json(cli("--config", str(config), "token", "create", "--policy", "{}", "--json", env=env))
    assert (other / "tokens.json").exists()
    items = one_json(cli("token", "list", "--json", "--config", str(config), env=env))
    assert [i["hash"] for i in items] == [made["hash"]]


def test_bad_config_exits_2_naming_the_key(cli, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"server": {"htp_port": 9000}}))
    proc = no_traceback(cli("token", "list", "--config", str(config)))
    assert proc.returncode == 2 and "server.htp_port" in proc.stderr
    proc = no_traceback(cli("--config", str(tmp_path / "missing.yaml"), "token", "list"))
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr


def test_bad_env_override_exits_2_naming_the_variable(cli):
    env = dict(cli.env, TOKENOMICS_SERVER_HTTP_PORT="eighty")
    proc = no_traceback(cli("token", "list", env=env))
    assert proc.returncode == 2 and "TOKENOMICS_SERVER_HTTP_PORT" in proc.stderr


# --- token create ---------------------------------------------------------------------------------

def test_create_json_prints_token_hash_and_expiry(cli):
    made = create(cli, {"model": "gpt-4o"})
    assert set(made) == {"token", "hash", "expires_at"}
    assert re.fullmatch(r"tkn_[0-9a-f]{32}", made["token"])
    assert re.fullmatch(r"[0-9a-f]{64}", made["hash"])
    assert made["expires_at"] is None
    assert made["token"] not in (cli.data_dir / "tokens.json").read_text()


def test_create_human_output(cli):
    proc = ok(cli("token", "create", "--policy", '{"model": "gpt-4o"}', "--label", "laptop"))
    token = re.search(r"^Token: (tkn_[0-9a-f]{32})$", proc.stdout, re.M)
    digest = re.search(r"^Hash: ([0-9a-f]{64})$", proc.stdout, re.M)
    assert token and digest, proc.stdout
    items = listing(cli)
    assert [(i["hash"], i["label"]) for i in items] == [(digest.group(1), "laptop")]
    assert token.group(1) not in (cli.data_dir / "tokens.json").read_text()


def test_create_policy_from_file(cli):
    policy = {"model_regex": "^gpt-4", "max_tokens": 500, "prompts": [{"role": "system", "content": "hi"}]}
    (cli.cwd / "policy.json").write_text(json.dumps(policy))
    made = create_from(cli, "@policy.json")
    (item,) = listing(cli)
    assert item["hash"] == made["hash"] and item["policy"] == policy


def create_from(cli, policy_arg):
    return one_json(cli("token", "create", "--policy", policy_arg, "--json"))


def test_create_policy_from_missing_file_exits_2(cli):
    proc = no_traceback(cli("token", "create", "--policy", "@nope.json"))
    assert proc.returncode == 2 and "nope.json" in proc.stderr


@pytest.mark.parametrize("spec, seconds", [("24h", DAY), ("7d", 7 * DAY), ("30d", 30 * DAY), ("1y", 365 * DAY)])
def test_create_with_relative_expiry(cli, spec, seconds):
    import time
    before = time.time()
    made = create(cli, {}, "--expires", spec)
    after = time.time()
    expires = ts(made["expires_at"])
    assert before + seconds - 2 <= expires <= after + seconds + 2
    (item,) = listing(cli)
    assert item["expires_at"] == made["expires_at"] and item["expired"] is False


def test_create_with_rfc3339_expiry(cli):
    import time
    when = rfc3339(time.time() + 10 * DAY)
    made = create(cli, {}, "--expires", when)
    assert ts(made["expires_at"]) == ts(when)
    offset = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=3)).replace(microsecond=0)
    text = offset.astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat()  # +02:00 offset form
    made = create(cli, {}, "--expires", text)
    assert ts(made["expires_at"]) == offset.timestamp()


@pytest.mark.parametrize("value", ["2020-01-01T00:00:00Z", "soon", "-1d"])
def test_create_with_past_or_invalid_expiry_exits_2(cli, value):
    proc = no_traceback(cli("token", "create", "--policy", "{}", "--expires", value))
    assert proc.returncode == 2, proc.stderr
    assert "--expires" in proc.stderr
    assert proc.stdout == ""
    assert listing(cli) == []


@pytest.mark.parametrize("policy, path", [
    ('{"model": "gpt-4o",', "--policy"),
    ('["not", "an", "object"]', "--policy"),
    ('{"modle": "gpt-4o"}', "modle"),
    ('{"max_tokens": "10"}', "max_tokens"),
    ('{"providers": {"openai": [{"model_regex": "("}]}}', "providers.openai[0].model_regex"),
    ('{"prompts": [{"role": "wizard", "content": "x"}]}', "prompts[0].role"),
    ('{"retry": {"max_retries": "3"}}', "retry.max_retries"),
    ('{"timeout": "whenever"}', "timeout"),
    ('{"providers": {"opnai": [{}]}}', "providers.opnai"),
])
def test_create_with_invalid_policy_exits_2_naming_the_path(cli, policy, path):
    proc = no_traceback(cli("token", "create", "--policy", policy, "--json"))
    assert proc.returncode == 2
    assert path in proc.stderr
    assert proc.stdout == ""
    assert listing(cli) == []


# --- token list ---------------------------------------------------------------------------------

def test_list_json_shape(cli):
    assert listing(cli) == []
    a = create(cli, {"model": "gpt-4o"}, "--label", "alpha")
    b = create(cli, {"max_tokens": 10}, "--expires", "7d")
    items = listing(cli)
    assert len(items) == 2
    for item in items:
        assert set(item) == RECORD_KEYS
        ts(item["created_at"])
    by_hash = {i["hash"]: i for i in items}
    assert by_hash[a["hash"]]["label"] == "alpha"
    assert by_hash[a["hash"]]["policy"] == {"model": "gpt-4o"}
    assert by_hash[a["hash"]]["expires_at"] is None and by_hash[a["hash"]]["expired"] is False
    assert by_hash[b["hash"]]["expires_at"] == b["expires_at"]
    assert by_hash[b["hash"]]["policy"] == {"max_tokens": 10}


def expire_in_file(cli, token_hash):
    path = cli.data_dir / "tokens.json"
    doc = json.loads(path.read_text())
    for entry in doc["tokens"]:
        if entry["hash"] == token_hash:
            entry["expires_at"] = "2020-01-01T00:00:00Z"
    path.write_text(json.dumps(doc))


def test_list_human_shows_prefix_label_and_status(cli):
    live = create(cli, {"model": "gpt-4o"}, "--label", "live-one")
    dead = create(cli, {}, "--label", "dead-one", "--expires", "24h")
    expire_in_file(cli, dead["hash"])

    items = {i["hash"]: i for i in listing(cli)}
    assert items[dead["hash"]]["expired"] is True
    assert items[live["hash"]]["expired"] is False

    proc = ok(cli("token", "list"))
    lines = proc.stdout.splitlines()
    live_line = next(line for line in lines if live["hash"][:8] in line)
    dead_line = next(line for line in lines if dead["hash"][:8] in line)
    assert "live-one" in live_line and "active" in live_line and "EXPIRED" not in live_line
    assert "dead-one" in dead_line and "EXPIRED" in dead_line
    assert "gpt-4o" in live_line  # model restriction shown
    assert live["hash"] not in proc.stdout  # a prefix, not the whole hash


def test_get_reports_expired(cli):
    dead = create(cli, {}, "--expires", "24h")
    expire_in_file(cli, dead["hash"])
    item = one_json(cli("token", "get", "--hash", dead["hash"][:8], "--json"))
    assert item["expired"] is True
    assert "EXPIRED" in ok(cli("token", "get", "--hash", dead["hash"][:8])).stdout


# --- token get / update / delete -----------------------------------------------------------------

def test_get_by_prefix(cli):
    made = create(cli, {"model": "gpt-4o"}, "--label", "x")
    item = one_json(cli("token", "get", "--hash", made["hash"][:8], "--json"))
    assert set(item) == RECORD_KEYS
    assert item["hash"] == made["hash"] and item["policy"] == {"model": "gpt-4o"}
    item = one_json(cli("token", "get", "--hash", made["hash"], "--json"))
    assert item["hash"] == made["hash"]
    human = ok(cli("token", "get", "--hash", made["hash"][:10]))
    assert made["hash"] in human.stdout and "gpt-4o" in human.stdout


@pytest.mark.parametrize("action", ["get", "update", "delete"])
def test_prefix_errors(cli, action):
    create(cli, {})
    extra = ["--label", "x"] if action == "update" else []
    proc = no_traceback(cli("token", action, "--hash", "00000000dead", *extra))  # hex, matches nothing
    assert proc.returncode == 1, proc.stderr
    assert "00000000dead" in proc.stderr
    proc = no_traceback(cli("token", action, "--hash", "abc1234", *extra))
    assert proc.returncode == 2, proc.stderr
    assert "--hash" in proc.stderr


def test_update_expiry_label_and_policy(cli):
    made = create(cli, {"model": "gpt-4o"}, "--expires", "7d", "--label", "before")
    prefix = made["hash"][:8]

    item = one_json(cli("token", "update", "--hash", prefix, "--label", "after", "--json"))
    assert item["label"] == "after" and item["expires_at"] == made["expires_at"]

    item = one_json(cli("token", "update", "--hash", prefix, "--expires", "clear", "--json"))
    assert item["expires_at"] is None
    assert one_json(cli("token", "get", "--hash", prefix, "--json"))["expires_at"] is None

    import time
    before = time.time()
    item = one_json(cli("token", "update", "--hash", prefix, "--expires", "24h", "--json"))
    assert abs(ts(item["expires_at"]) - (before + DAY)) < 5

    ok(cli("token", "update", "--hash", prefix, "--policy", '{"model": "o3"}'))
    (item,) = listing(cli)
    assert item["policy"] == {"model": "o3"} and item["label"] == "after"
    assert "after" in ok(cli("token", "list")).stdout


def test_update_rejects_bad_input_and_changes_nothing(cli):
    made = create(cli, {"model": "gpt-4o"}, "--label", "keep")
    prefix = made["hash"][:8]
    proc = no_traceback(cli("token", "update", "--hash", prefix, "--policy", '{"max_tokens": "x"}'))
    assert proc.returncode == 2 and "max_tokens" in proc.stderr
    proc = no_traceback(cli("token", "update", "--hash", prefix, "--expires", "2020-01-01T00:00:00Z"))
    assert proc.returncode == 2 and "--expires" in proc.stderr
    proc = no_traceback(cli("token", "update", "--hash", prefix))
    assert proc.returncode == 2
    (item,) = listing(cli)
    assert item["policy"] == {"model": "gpt-4o"} and item["label"] == "keep"


def test_delete_removes_the_token(cli):
    gone = create(cli, {}, "--label", "gone")
    kept = create(cli, {}, "--label", "kept")
    data = one_json(cli("token", "delete", "--hash", gone["hash"][:8], "--json"))
    assert gone["hash"] in json.dumps(data)
    assert [i["hash"] for i in listing(cli)] == [kept["hash"]]
    proc = cli("token", "delete", "--hash", gone["hash"][:8])
    assert proc.returncode == 1
    proc = ok(cli("token", "delete", "--hash", kept["hash"][:12]))
    assert kept["hash"] in proc.stdout
    assert listing(cli) == []


def test_json_outputs_stay_clean_on_a_fresh_data_dir(cli):
    """The first run generates the hash key and warns; the warning goes to stderr, never stdout."""
    made = create(cli, {})
    assert "hash" in made
    assert cli.data_dir.joinpath("hash.key").exists()
    for args in (["token", "list", "--json"],
                 ["token", "get", "--hash", made["hash"][:8], "--json"],
                 ["token", "update", "--hash", made["hash"][:8], "--label", "x", "--json"],
                 ["version", "--json"],
                 ["token", "delete", "--hash", made["hash"][:8], "--json"]):
        one_json(cli(*args))
