"""Issue 13: the mistakes a new user makes are messages that say what to do, never a traceback.

Each test runs the CLI as a user would and asserts the exit code (2 usage, 1 runtime), the
helpful part of stderr, and that no Python traceback reached the user."""
import json
import os
import sys

import pytest

from conftest import ROOT, base_env

from tokenomics.errors import ProxyError, UsageError
from tokenomics.providers import Catalog, UnknownProvider


def assert_message(proc, code: int, *parts: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    for part in parts:
        assert part in proc.stderr, (part, proc.stderr)


@pytest.mark.parametrize("url, part", [
    ("not-a-url", "scheme http:// or https://"),
    ("http://[::1", "not a valid URL"),
])
def test_run_proxy_url_is_validated(cli, url, part):
    proc = cli("run", "--token", "tkn_x", "--proxy-url", url, "--", sys.executable, "-c", "pass")
    assert_message(proc, 2, "--proxy-url", part, "http://127.0.0.1:8080")


def test_init_proxy_url_needs_a_scheme(cli):
    proc = cli("init", "--proxy-url", "localhost:8080")
    assert_message(proc, 2, "--proxy-url", "http:// or https://")
    assert "OPENAI_BASE_URL" not in proc.stdout


@pytest.mark.parametrize("command", [["token", "list"], ["status"], ["provider", "list"], ["ledger", "summary"]])
def test_dir_pointing_at_a_file(cli, tmp_path, command):
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = cli("--dir", str(afile), *command)
    assert_message(proc, 2, "--dir", "is a file, not a directory")


def test_dir_that_cannot_be_created(cli, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = cli("--dir", str(afile / "sub"), "token", "list")
    assert_message(proc, 1, "cannot create the data dir", "choose another with --dir")


def test_doctor_reports_a_bad_dir_as_a_failed_check(cli, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = cli("--dir", str(afile / "sub"), "doctor", "--json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["data dir"]["status"] == "fail"
    assert "cannot create the data dir" in checks["data dir"]["detail"]
    proc = cli("--dir", str(afile), "doctor")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "FAIL  data dir: --dir:" in proc.stdout and "is a file" in proc.stdout


def test_empty_dir_is_refused(cli):
    proc = cli("--dir", "", "token", "list")
    assert_message(proc, 2, "--dir: the path is empty")


def test_empty_config_is_refused(cli):
    proc = cli("--config", "", "token", "list")
    assert_message(proc, 2, "--config: the path is empty")


def test_config_directory_says_to_name_the_file(cli):
    proc = cli("--config", ".", "token", "list")
    assert_message(proc, 2, "--config: . is a directory", "name the config file")


def test_provider_models_unknown_name_lists_close_matches(cli):
    proc = cli("provider", "models", "opneai")
    assert_message(proc, 2, "unknown provider 'opneai'", "did you mean openai")


def test_provider_test_unknown_name_lists_close_matches(cli):
    proc = cli("provider", "test", "antropic")
    assert_message(proc, 2, "unknown provider 'antropic'", "did you mean anthropic")


def test_catalog_get_raises_a_domain_error_not_an_http_error():
    with pytest.raises(UnknownProvider) as info:
        Catalog().get("opneai")
    assert isinstance(info.value, UsageError) and isinstance(info.value, KeyError)
    assert not isinstance(info.value, ProxyError)
    assert str(info.value).startswith("unknown provider 'opneai'; did you mean openai?")


def test_policy_path_without_at_hints_at_the_at_form(cli):
    proc = cli("token", "create", "--policy", str(ROOT / "examples" / "minimal.json"))
    assert_message(proc, 2, f"to read a file, write --policy @{ROOT / 'examples' / 'minimal.json'}")


def test_policy_file_that_is_not_json_names_the_file(cli, tmp_path):
    bad = tmp_path / "policy.json"
    bad.write_text("model: gpt-4o\n")
    proc = cli("token", "create", "--policy", f"@{bad}")
    assert_message(proc, 2, f"--policy @{bad}: not valid JSON")


def test_policy_file_unreadable(cli, tmp_path):
    proc = cli("token", "create", "--policy", f"@{tmp_path}")
    assert_message(proc, 2, f"--policy: cannot read {tmp_path}", "Is a directory")
    binary = tmp_path / "policy.bin"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    proc = cli("token", "create", "--policy", f"@{binary}")
    assert_message(proc, 2, "is not UTF-8 text")
    proc = cli("token", "create", "--policy", "@")
    assert_message(proc, 2, "needs a file name")


def test_policy_not_an_object(cli):
    proc = cli("token", "create", "--policy", "[1]")
    assert_message(proc, 2, "--policy: expected a JSON object, e.g.")


@pytest.mark.parametrize("command", [["run", "--token", "tkn_x", "--", sys.executable, "-c", "pass"], ["init"]])
def test_unknown_provider_option_lists_known_names(cli, command):
    proc = cli(*command[:1], "--provider", "gemeni", *command[1:])
    assert_message(proc, 2, "--provider: unknown provider 'gemeni'", "did you mean gemini", "google_gemini", "all")


def test_demo_uses_its_dir(cli, tmp_path):
    target = tmp_path / "demo-data"
    proc = cli("--dir", str(target), "demo", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert str(target) in proc.stdout
    assert (target / "tokens.json").is_file()
    assert any(name.endswith((".json", ".jsonl")) for name in os.listdir(target / "sessions"))


def test_demo_refuses_a_file_as_dir(cli, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = cli("demo", "--dir", str(afile))
    assert_message(proc, 2, "--dir", "is a file")


@pytest.mark.parametrize("value, part", [
    ("2020-01-01T00:00:00Z", "is in the past; give a later time"),
    ("99999999999999y", "more than 100 years away"),
])
def test_bad_expires(cli, value, part):
    proc = cli("token", "create", "--policy", "{}", f"--expires={value}")
    assert_message(proc, 2, "--expires", part)


@pytest.mark.parametrize("value, part", [
    ("tkn_0123456789abcdef", "that is a token itself"),
    ("my-label", "is not a token hash"),
])
def test_bad_hash(cli, value, part):
    for action in ("get", "delete"):
        proc = cli("token", action, "--hash", value)
        assert_message(proc, 2, "--hash", part, "token list")


@pytest.mark.parametrize("command", [["serve", "--port", "99999"], ["start", "--https-port", "abc"]])
def test_bad_port(cli, command):
    proc = cli(*command)
    assert_message(proc, 2, "is not a port number", "1 to 65535")


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_bad_workers(cli, value):
    proc = cli("serve", "--port", "0", "--https-port", "0", f"--workers={value}", timeout=20)
    assert_message(proc, 2, "--workers", "a whole number of at least 1")


def test_init_dotenv_unwritable(cli, tmp_path):
    proc = cli("init", "--dotenv", str(tmp_path))
    assert_message(proc, 1, "--dotenv: cannot write", "writable directory")


def test_internal_error_is_one_line_and_debug_shows_the_traceback(cli, tmp_path):
    """The safety net, exercised through a bug planted by a sitecustomize on the path."""
    plant = tmp_path / "plant"
    plant.mkdir()
    (plant / "sitecustomize.py").write_text(
        "import tokenomics.cli as c\n"
        "def boom(args):\n    raise ZeroDivisionError('planted')\n"
        "c.cmd_version = boom\n")
    env = base_env(cli.data_dir)
    env["PYTHONPATH"] = os.pathsep.join([str(plant), env["PYTHONPATH"]])
    proc = cli("version", env=env)
    assert_message(proc, 1, "tokenomics: internal error (ZeroDivisionError); run with TOKENOMICS_DEBUG=1")
    assert "planted" not in proc.stderr
    proc = cli("version", env={**env, "TOKENOMICS_DEBUG": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "planted" in proc.stderr
