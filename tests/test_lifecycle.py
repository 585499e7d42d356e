"""Daemon lifecycle and `run` (SPEC §2, §12): the pid file holds the pid alone, `stop` signals
only a verified proxy, `status` sees a foreground `serve`, refusals for what is not available,
and `run`'s up-front key check and usage line."""
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import yaml

from conftest import base_env, free_port


MOCK = {"provider": "mock"}


def _gone(pid: int) -> bool:
    """True when pid no longer exists or is a zombie nobody reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.02)
    return _gone(pid)


def _clean(proc) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


def _status(cli) -> dict:
    proc = cli("status", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def foreign():
    """A harmless process that is not the proxy; killed at teardown."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait(5)


@pytest.fixture
def daemon(cli):
    """`tokenomics start` on a free port; whatever is still alive at teardown is killed."""
    started = []

    def start(*extra) -> tuple[str, int]:
        proc = cli("start", "--port", str(free_port()), "--no-tls", *extra, timeout=30)
        assert proc.returncode == 0, proc.stderr
        pid = int((cli.data_dir / "tokenomics.pid").read_text())
        started.append(pid)
        return proc.stdout.strip(), pid

    yield start
    for pid in started:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5)


# --- pid file and stop ---------------------------------------------------------------------------

def test_pid_file_holds_the_pid_alone_and_state_sits_beside_it(cli, daemon):
    cli.token(MOCK)
    url, pid = daemon()
    pid_file, state_file = cli.data_dir / "tokenomics.pid", cli.data_dir / "tokenomics.state.json"
    assert pid_file.read_text().strip() == str(pid)  # what `kill $(cat tokenomics.pid)` needs
    state = json.loads(state_file.read_text())
    assert state["pid"] == pid and state["url"] == url and state["proc_start"] and "serve" in state["cmdline"]
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    info = _status(cli)
    assert info["running"] is True and info["pid"] == pid and info["url"] == url and info["tokens"] == 1

    stopped = cli("stop", timeout=30)
    assert stopped.returncode == 0 and f"stopped (pid {pid})" in _clean(stopped)
    assert _wait_gone(pid, 1.0)
    assert not pid_file.exists() and not state_file.exists()


def test_stop_kills_a_proxy_that_ignores_sigterm_after_the_grace_period(cli, daemon):
    (cli.cwd / "config.yaml").write_text(yaml.safe_dump({"server": {"grace_period": 1}}))
    _, pid = daemon()
    os.kill(pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM; SIGKILL still ends it
    began = time.monotonic()
    proc = cli("stop", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "did not stop within the grace period and was killed" in _clean(proc)
    assert _wait_gone(pid, 2.0) and time.monotonic() - began < 30
    assert not (cli.data_dir / "tokenomics.pid").exists()


def test_stop_leaves_a_foreign_process_named_by_the_pid_file_alone(cli, foreign):
    pid_file = cli.data_dir / "tokenomics.pid"
    pid_file.write_text(f"{foreign.pid}\n")  # no state file: nothing says this is our proxy
    proc = cli("stop", timeout=30)
    assert proc.returncode == 1, proc.stderr
    err = _clean(proc)
    assert str(foreign.pid) in err and "not signalled" in err and "remove" in err
    assert foreign.poll() is None, "stop signalled a process that is not the proxy"
    assert pid_file.exists(), "stop removed a pid file naming a live process it does not own"
    assert _status(cli)["running"] is False


def test_stop_checks_start_time_and_command_line_before_signalling(cli, foreign):
    with open(f"/proc/{foreign.pid}/stat") as fh:
        proc_start = fh.read().rsplit(")", 1)[1].split()[19]
    (cli.data_dir / "tokenomics.pid").write_text(f"{foreign.pid}\n")
    forged = {"pid": foreign.pid, "proc_start": proc_start, "url": "http://127.0.0.1:1",
              "cmdline": [sys.executable, "-m", "tokenomics", "serve"]}
    (cli.data_dir / "tokenomics.state.json").write_text(json.dumps(forged))
    proc = cli("stop", timeout=30)
    assert proc.returncode == 1 and "not signalled" in _clean(proc)
    assert foreign.poll() is None

    forged.update(cmdline=["sleep", "60"], proc_start="1")  # the right command line, a recycled pid
    (cli.data_dir / "tokenomics.state.json").write_text(json.dumps(forged))
    proc = cli("stop", timeout=30)
    assert proc.returncode == 1 and "not signalled" in _clean(proc)
    assert foreign.poll() is None


def test_stop_never_signals_pid_1(cli):
    (cli.data_dir / "tokenomics.pid").write_text("1\n")
    state = {"pid": 1, "proc_start": "1", "cmdline": ["tokenomics", "serve"], "url": "http://127.0.0.1:1"}
    (cli.data_dir / "tokenomics.state.json").write_text(json.dumps(state))
    proc = cli("stop", timeout=30)
    assert proc.returncode == 1 and "not signalled" in _clean(proc), proc.stderr


def test_pid_file_without_a_pid_is_named(cli):
    (cli.data_dir / "tokenomics.pid").write_text('{"pid": 1}')
    proc = cli("stop", timeout=30)
    assert proc.returncode == 1
    assert "does not hold a pid" in _clean(proc) and "nothing was signalled" in proc.stderr
    assert _status(cli)["running"] is False
    _clean(cli("doctor"))


# --- foreground serve ---------------------------------------------------------------------------

@pytest.mark.subprocess_proxy
def test_status_and_run_see_a_foreground_serve(cli, start_proxy):
    token = cli.token(MOCK)
    proxy = start_proxy()
    info = _status(cli)
    assert info["running"] is True and info["pid"] == proxy.proc.pid and info["url"] == proxy.url

    request = ("import json, os, urllib.request; req = urllib.request.Request("
               "os.environ['OPENAI_BASE_URL'] + '/chat/completions', data=json.dumps({'model': 'mock-1', "
               "'messages': [{'role': 'user', 'content': 'hi'}]}).encode(), headers={'Authorization': "
               "'Bearer ' + os.environ['OPENAI_API_KEY'], 'Content-Type': 'application/json'}); "
               "print(urllib.request.urlopen(req, timeout=10).status)")
    run = cli("run", "--token", token, "--", sys.executable, "-c", request, timeout=60)
    assert run.returncode == 0, run.stderr
    err = _clean(run)
    assert f"using the proxy already running for this data dir at {proxy.url}" in err
    assert "tokenomics: 1 requests" in err, err  # the usage line, read from the daemon's /stats
    assert run.stdout.strip() == "200"

    assert proxy.stop() == 0
    assert not (cli.data_dir / "tokenomics.pid").exists()
    assert not (cli.data_dir / "tokenomics.state.json").exists()
    assert _status(cli)["running"] is False


def test_run_with_proxy_url_prints_its_usage_line(cli, start_proxy):
    token = cli.token(MOCK)
    proxy = start_proxy()
    request = ("import json, os, urllib.request\nfor _ in range(2):\n"
               "    req = urllib.request.Request(os.environ['OPENAI_BASE_URL'] + '/chat/completions', "
               "data=json.dumps({'model': 'mock-1', 'messages': [{'role': 'user', 'content': 'hi'}]}).encode(), "
               "headers={'Authorization': 'Bearer ' + os.environ['OPENAI_API_KEY'], "
               "'Content-Type': 'application/json'})\n    urllib.request.urlopen(req, timeout=10).read()\n")
    run = cli("run", "--token", token, "--proxy-url", proxy.url, "--print-env", "--",
              sys.executable, "-c", request, timeout=60)
    assert run.returncode == 0, run.stderr
    err = _clean(run)
    assert "tokenomics: 2 requests" in err and f"(via {proxy.url})" in err, err
    assert token not in err and token[:8] + "…" in err


# --- version ------------------------------------------------------------------------------------

def test_version_flag_works_like_the_command(cli):
    flag, command = cli("--version"), cli("version")
    assert flag.returncode == 0 and command.returncode == 0, flag.stderr
    assert flag.stdout == command.stdout and flag.stdout.startswith("tokenomics ")


# --- what is not available is refused ------------------------------------------------------------

def test_workers_on_the_memory_backend_point_to_redis(cli):
    for command in ("serve", "start"):
        proc = cli(command, "--workers", "2", "--port", str(free_port()), "--no-tls", timeout=30)
        assert proc.returncode == 2, (command, proc.stderr)
        err = _clean(proc)
        assert "session.backend: redis" in err and "--workers" in err
        assert "not available" not in err  # never a pointer to something that then says it is unavailable
        assert not (cli.data_dir / "tokenomics.pid").exists()


def test_run_admin_is_refused_when_the_config_disables_admin(cli):
    token = cli.token(MOCK)
    marker = cli.cwd / "ran"
    (cli.cwd / "config.yaml").write_text(yaml.safe_dump({"admin": {"enabled": False}}))
    proc = cli("run", "--token", token, "--admin", "--", "touch", str(marker), timeout=30)
    assert proc.returncode == 2
    assert "--admin" in _clean(proc) and "admin.enabled" in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("command", ["serve", "run", "start"])
def test_a_remote_server_on_another_host_without_a_key_is_refused(cli, command):
    token = cli.token(MOCK)
    (cli.cwd / "config.yaml").write_text(yaml.safe_dump({"remote": {"url": "http://10.255.255.1:9"}}))
    marker = cli.cwd / "ran"
    args = {"serve": ["serve", "--port", str(free_port()), "--no-tls"],
            "start": ["start", "--port", str(free_port()), "--no-tls"],
            "run": ["run", "--token", token, "--", "touch", str(marker)]}[command]
    proc = cli(*args, timeout=30)
    assert proc.returncode == 2, proc.stderr
    err = _clean(proc)
    assert "remote.url" in err and "api_key_env" in err
    assert not marker.exists() and not (cli.data_dir / "tokenomics.pid").exists()


# --- run: provider keys up front -----------------------------------------------------------------

def test_run_names_a_missing_provider_key_before_starting_the_command(cli):
    token = cli.token({"providers": {"anthropic": [{"model_regex": "^claude-"}]}})
    marker = cli.cwd / "ran"
    env = base_env(cli.data_dir, ANTHROPIC_API_KEY=None)
    proc = cli("run", "--token", token, "--", "touch", str(marker), env=env, timeout=30)
    assert proc.returncode == 1, proc.stderr
    err = _clean(proc)
    assert "ANTHROPIC_API_KEY" in err and "anthropic" in err and "export" in err
    assert not marker.exists(), "the command started although its provider key is missing"


def test_run_checks_a_policy_base_key_env_and_mock_needs_none(cli):
    token = cli.token({"provider": "openai", "base_key_env": "MY_TEAM_OPENAI_KEY"})
    proc = cli("run", "--token", token, "--", "true", timeout=30)
    assert proc.returncode == 1 and "MY_TEAM_OPENAI_KEY" in _clean(proc)

    mock = cli.token(MOCK)
    env = base_env(cli.data_dir, OPENAI_API_KEY=None, ANTHROPIC_API_KEY=None)
    proc = cli("run", "--token", mock, "--", "true", env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "tokenomics: 0 requests" in _clean(proc)
