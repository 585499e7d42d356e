"""Agent integration and distribution, end to end through real subprocesses (issue 6):
`run -- CMD` with the official openai / anthropic SDKs configured purely from the environment,
`run --tls` with the SDK verifying the generated CA, `start`/`status`/`stop`, `init`, `doctor`,
`version`/`completion`, the zipapp under `python -S`, and the installed console script.

Every wait is bounded: subprocesses have timeouts, readiness and process exit are polled
against deadlines, and background daemons are killed at teardown if a test left one behind."""
import json
import os
import re
import select
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import tokenomics
import tokenomics.cli
import tokenomics.config
import tokenomics.tls
from conftest import ANTHROPIC_KEY, OPENAI_KEY, ROOT, TOKENOMICS, base_env, free_port
from stub_upstream import DEFAULT_REPLY
from test_cli import ok, one_json

MOCK = {"provider": "mock"}
SUMMARY = re.compile(r"^tokenomics: (\d+) requests, ([\d,]+) tokens in / ([\d,]+) out, \$([\d.]+), (\d+) blocked$",
                     re.MULTILINE)
UNKNOWN_TOKEN = "tkn_" + "0123456789abcdef" * 2


def script(tmp_path: Path, name: str, body: str, executable: bool = False) -> Path:
    """Write a Python script into tmp; `executable` gives it a shebang and +x so it runs by name."""
    path = tmp_path / name
    text = textwrap.dedent(body).lstrip("\n")
    if executable:
        text = f"#!{sys.executable}\n" + text
    path.write_text(text)
    if executable:
        path.chmod(0o755)
    return path


ENV_DUMP = """
    import json, os, urllib.request
    names = ["OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN",
             "ANTHROPIC_BASE_URL", "GEMINI_API_KEY", "AZURE_OPENAI_API_KEY", "SSL_CERT_FILE",
             "NODE_EXTRA_CA_CERTS", "REQUESTS_CA_BUNDLE"]
    out = {n: os.environ.get(n) for n in names}
    # prove the proxy behind the URL is up while the command runs
    with urllib.request.urlopen(os.environ["ANTHROPIC_BASE_URL"].rstrip("/") + "/health", timeout=5) as r:
        out["health"] = r.status
    print(json.dumps(out))
"""

OPENAI_SCRIPT = """
    import sys
    import openai
    client = openai.OpenAI(max_retries=0, timeout=20)
    r = client.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": "say hello"}])
    print("ANSWER:" + r.choices[0].message.content)
    sys.exit(7)
"""

ANTHROPIC_SCRIPT = """
    import sys
    import anthropic
    client = anthropic.Anthropic(max_retries=0, timeout=20)
    m = client.messages.create(model="claude-3-5-haiku-latest", max_tokens=100,
                               messages=[{"role": "user", "content": "say hello"}])
    print("ANSWER:" + m.content[0].text)
    sys.exit(7)
"""


def summary(stderr: str) -> tuple:
    found = SUMMARY.findall(stderr)
    assert len(found) == 1, f"expected one summary line on stderr, got:\n{stderr}"
    req, tin, tout, cost, blocked = found[0]
    return int(req), int(tin.replace(",", "")), int(tout.replace(",", "")), float(cost), int(blocked)


def run_env(cli, tmp_path, token, *extra, name="env.py", executable=False):
    path = script(tmp_path, name, ENV_DUMP, executable=executable)
    cmd = [str(path)] if executable else [sys.executable, str(path)]
    proc = ok(cli("run", "--token", token, *extra, "--", *cmd, timeout=30))
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- run: the official SDKs from the environment ---------------------------------------------

def test_run_openai_sdk_mock_answers_exit_code_and_summary(cli, tmp_path):
    token = cli.token(MOCK)
    path = script(tmp_path, "ask.py", OPENAI_SCRIPT)
    proc = cli("run", "--token", token, "--", sys.executable, str(path), timeout=30)
    assert proc.returncode == 7, proc.stderr
    answers = [line for line in proc.stdout.splitlines() if line.startswith("ANSWER:")]
    assert answers and "say hello" in answers[0], proc.stdout  # the mock echoes the prompt
    requests, tokens_in, tokens_out, cost, blocked = summary(proc.stderr)
    assert (requests, blocked) == (1, 0)
    assert tokens_in > 0 and tokens_out > 0 and cost >= 0
    assert token not in proc.stderr  # the one-time token is never echoed


def test_run_openai_sdk_against_stub_sends_real_key_upstream(cli, tmp_path, stub):
    token = cli.token({})
    path = script(tmp_path, "ask.py", OPENAI_SCRIPT)
    proc = cli("run", "--token", token, "--upstream-url", stub.url, "--", sys.executable, str(path), timeout=30)
    assert proc.returncode == 7, proc.stderr
    assert f"ANSWER:{DEFAULT_REPLY}" in proc.stdout.splitlines()
    chats = [r for r in stub.requests if r.path.endswith("/chat/completions")]
    assert len(chats) == 1, [r.path for r in stub.requests]
    assert chats[0].headers.get("authorization") == f"Bearer {OPENAI_KEY}"
    for rec in stub.requests:
        # look for the token itself, wherever it might have been copied
        seen = json.dumps(rec.headers) + rec.body.decode("utf-8", "replace") + rec.query
        assert token not in seen and token[4:] not in seen
        for name in ("authorization", "x-api-key", "api-key"):
            assert "tkn_" not in rec.headers.get(name, ""), name
    requests, tokens_in, tokens_out, _, blocked = summary(proc.stderr)
    assert (requests, blocked) == (1, 0)
    assert tokens_out == len(DEFAULT_REPLY.split())  # the stub's usage figures reach the summary


def test_run_anthropic_sdk_mock(cli, tmp_path):
    token = cli.token(MOCK)
    path = script(tmp_path, "ask_claude.py", ANTHROPIC_SCRIPT)
    proc = cli("run", "--token", token, "--", sys.executable, str(path), timeout=30)
    assert proc.returncode == 7, proc.stderr
    answers = [line for line in proc.stdout.splitlines() if line.startswith("ANSWER:")]
    assert answers and "say hello" in answers[0], proc.stdout
    requests, tokens_in, tokens_out, _, blocked = summary(proc.stderr)
    assert (requests, blocked) == (1, 0) and tokens_in > 0 and tokens_out > 0


def test_run_streaming_sdks_are_counted(cli, tmp_path):
    token = cli.token(MOCK)
    path = script(tmp_path, "streams.py", """
        import anthropic, openai
        oa = openai.OpenAI(max_retries=0, timeout=20)
        chunks = oa.chat.completions.create(model="gpt-4o-mini", stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "stream one"}])
        print("CHAT:" + "".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
        with anthropic.Anthropic(max_retries=0, timeout=20).messages.stream(
                model="claude-3-5-haiku-latest", max_tokens=100,
                messages=[{"role": "user", "content": "stream two"}]) as stream:
            print("CLAUDE:" + "".join(stream.text_stream))
        print("RESP:" + oa.responses.create(model="gpt-4o-mini", input="stream three").output_text)
    """)
    proc = ok(cli("run", "--token", token, "--", sys.executable, str(path), timeout=30))
    lines = proc.stdout.splitlines()
    for prefix, prompt in (("CHAT:", "stream one"), ("CLAUDE:", "stream two"), ("RESP:", "stream three")):
        assert any(line.startswith(prefix) and prompt in line for line in lines), proc.stdout
    requests, tokens_in, tokens_out, _, blocked = summary(proc.stderr)
    assert (requests, blocked) == (3, 0) and tokens_in > 0 and tokens_out >= 3


def test_run_child_killed_by_signal_exits_128_plus_n(cli, tmp_path):
    token = cli.token(MOCK)
    proc = cli("run", "--token", token, "--", sys.executable, "-c",
               "import os, signal; os.kill(os.getpid(), signal.SIGKILL)", timeout=30)
    assert proc.returncode == 128 + signal.SIGKILL, proc.stderr
    assert summary(proc.stderr)[0] == 0


# --- run: the exported environment ------------------------------------------------------------

def test_run_exports_sdk_variables(cli, tmp_path):
    token = cli.token(MOCK)
    env = run_env(cli, tmp_path, token)
    assert env["OPENAI_API_KEY"] == token
    assert env["ANTHROPIC_API_KEY"] == token and env["ANTHROPIC_AUTH_TOKEN"] == token
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", env["OPENAI_BASE_URL"]), env
    assert env["ANTHROPIC_BASE_URL"].rstrip("/") == env["OPENAI_BASE_URL"][:-len("/v1")]
    assert env["health"] == 200
    assert env["GEMINI_API_KEY"] is None  # only with --provider
    for name in ("SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS", "REQUESTS_CA_BUNDLE"):  # only with --tls
        assert env[name] == cli.env.get(name), name
    assert OPENAI_KEY not in json.dumps(env) and ANTHROPIC_KEY not in json.dumps(env)


def test_run_takes_token_from_TOKENOMICS_KEY(cli, tmp_path):
    token = cli.token(MOCK)
    path = script(tmp_path, "env.py", ENV_DUMP)
    proc = ok(cli("run", "--print-env", "--", sys.executable, str(path),
                  env=base_env(cli.data_dir, TOKENOMICS_KEY=token), timeout=30))
    env = json.loads(proc.stdout.strip().splitlines()[-1])
    assert env["OPENAI_API_KEY"] == token
    assert f"OPENAI_BASE_URL={env['OPENAI_BASE_URL']}" in proc.stderr  # --print-env shows the variables
    assert token not in proc.stderr  # ... with the token masked


def test_run_provider_gemini_adds_gemini_key(cli, tmp_path):
    token = cli.token(MOCK)
    env = run_env(cli, tmp_path, token, "--provider", "gemini")
    assert env["GEMINI_API_KEY"] == token
    assert env["OPENAI_API_KEY"] == token  # the defaults stay


def test_cli_maps_pick_provider_from_command_name(cli, tmp_path):
    (cli.cwd / "config.yaml").write_text("cli_maps:\n  myagent: google_gemini\n")
    token = cli.token(MOCK)
    mapped = run_env(cli, tmp_path, token, name="myagent", executable=True)
    assert mapped["GEMINI_API_KEY"] == token
    other = run_env(cli, tmp_path, token, name="otheragent", executable=True)
    assert other["GEMINI_API_KEY"] is None


# --- run --tls --------------------------------------------------------------------------------

TLS_SCRIPT = """
    import json, os, ssl, sys, urllib.request
    import certifi, openai
    base = os.environ["OPENAI_BASE_URL"]
    # the certificate is not publicly trusted: without our CA, verification must fail
    try:
        urllib.request.urlopen(base + "/models", timeout=10,
                               context=ssl.create_default_context(cafile=certifi.where()))
        public = "accepted"
    except urllib.error.URLError as exc:
        public = "rejected" if isinstance(exc.reason, ssl.SSLCertVerificationError) else repr(exc)
    client = openai.OpenAI(max_retries=0, timeout=20)   # verifies through SSL_CERT_FILE
    r = client.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": "over tls"}])
    print(json.dumps({"base": base, "answer": r.choices[0].message.content, "public": public,
                      "SSL_CERT_FILE": os.environ.get("SSL_CERT_FILE"),
                      "NODE_EXTRA_CA_CERTS": os.environ.get("NODE_EXTRA_CA_CERTS"),
                      "REQUESTS_CA_BUNDLE": os.environ.get("REQUESTS_CA_BUNDLE")}))
"""


def test_run_tls_sdk_verifies_generated_ca(cli, tmp_path):
    token = cli.token(MOCK)
    path = script(tmp_path, "tls.py", TLS_SCRIPT)
    proc = ok(cli("run", "--tls", "--token", token, "--", sys.executable, str(path), timeout=40))
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["base"].startswith("https://"), out
    assert "over tls" in out["answer"]
    assert out["public"] == "rejected", out
    assert out["SSL_CERT_FILE"] and os.path.isfile(out["SSL_CERT_FILE"])
    assert out["NODE_EXTRA_CA_CERTS"] and os.path.isfile(out["NODE_EXTRA_CA_CERTS"])
    assert out["REQUESTS_CA_BUNDLE"] and os.path.isfile(out["REQUESTS_CA_BUNDLE"])
    certs = cli.data_dir / "certs"
    for name in ("ca.key", "server.key"):
        assert stat.S_IMODE((certs / name).stat().st_mode) == 0o600, name
    for name in ("ca.crt", "server.crt"):
        assert (certs / name).is_file()
    ca = (certs / "ca.crt").read_text().strip()
    for name in ("SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS", "REQUESTS_CA_BUNDLE"):
        assert ca in Path(out[name]).read_text(), f"{name} does not carry the generated CA"
    assert summary(proc.stderr)[0] == 1

    # a second run reuses the same CA, and a plain stdlib client trusts it through SSL_CERT_FILE
    before = {name: (certs / name).read_bytes() for name in ("ca.crt", "ca.key")}
    env = run_env(cli, tmp_path, token, "--tls")
    assert env["health"] == 200 and env["OPENAI_BASE_URL"].startswith("https://")
    assert {name: (certs / name).read_bytes() for name in ("ca.crt", "ca.key")} == before


# --- run: errors before the command starts ----------------------------------------------------

def marker_script(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "ran.marker"
    path = script(tmp_path, "touch.py", f"open({str(marker)!r}, 'w').write('ran')\n")
    return path, marker


def test_run_without_token_is_usage_error_before_command(cli, tmp_path):
    path, marker = marker_script(tmp_path)
    proc = cli("run", "--", sys.executable, str(path), timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "--token" in proc.stderr or "TOKENOMICS_KEY" in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("token", [UNKNOWN_TOKEN, "not-a-wrapper-token"])
def test_run_unknown_token_is_usage_error_before_command(cli, tmp_path, token):
    cli.token(MOCK)  # the data dir has a token, just not this one
    path, marker = marker_script(tmp_path)
    proc = cli("run", "--token", token, "--", sys.executable, str(path), timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and token not in proc.stderr
    assert not marker.exists()


def test_run_proxy_url_uses_running_proxy(cli, tmp_path, stub, start_proxy):
    token = cli.token({})
    proxy = start_proxy(upstream_url=stub.url)
    # `run` gets a different, empty data dir: it can only succeed through the given proxy
    other_dir = tmp_path / "other-data"
    other_dir.mkdir()
    path = script(tmp_path, "both.py", ENV_DUMP.replace("print(json.dumps(out))", "") + """
    import openai
    r = openai.OpenAI(max_retries=0, timeout=20).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    out["answer"] = r.choices[0].message.content
    print(json.dumps(out))
    """)
    proc = ok(cli("run", "--token", token, "--proxy-url", proxy.url, "--", sys.executable, str(path),
                  env=base_env(other_dir), timeout=30))
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["OPENAI_BASE_URL"] == proxy.url + "/v1"
    assert out["ANTHROPIC_BASE_URL"].rstrip("/") == proxy.url
    assert out["answer"] == DEFAULT_REPLY
    assert len([r for r in stub.requests if r.path.endswith("/chat/completions")]) == 1
    assert not any(other_dir.iterdir()), list(other_dir.iterdir())  # no local proxy, store or journal

    marker_path, marker = marker_script(tmp_path)
    refused = cli("run", "--token", UNKNOWN_TOKEN, "--proxy-url", proxy.url, "--", sys.executable,
                  str(marker_path), env=base_env(other_dir), timeout=30)
    assert refused.returncode == 2, refused.stderr
    assert not marker.exists()


def test_run_proxy_url_unreachable_is_exit_1(cli, tmp_path):
    token = cli.token(MOCK)
    path, marker = marker_script(tmp_path)
    proc = cli("run", "--token", token, "--proxy-url", f"http://127.0.0.1:{free_port()}",
               "--", sys.executable, str(path), timeout=30)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


# --- run forwards SIGTERM ---------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_run_forwards_signal_to_child(cli, tmp_path, sig):
    token = cli.token(MOCK)
    marker = tmp_path / "term.marker"
    path = script(tmp_path, "trap.py", f"""
        import signal, sys, time
        def on_term(signum, frame):
            open({str(marker)!r}, "w").write(signal.Signals(signum).name)
            sys.exit(3)
        signal.signal({int(sig)}, on_term)
        print("ready", flush=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.05)
        sys.exit(0)
    """)
    proc = subprocess.Popen([*TOKENOMICS, "run", "--token", token, "--", sys.executable, str(path)],
                            cwd=cli.cwd, env=cli.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        line = ""
        while time.monotonic() < deadline and line != "ready":
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            raw = proc.stdout.readline()
            if not raw:
                break
            line = raw.strip()
        assert line == "ready", f"the child never started: {proc.stderr.read() if proc.poll() is not None else ''}"
        proc.send_signal(sig)  # to `tokenomics run` only, not its process group
        assert proc.wait(timeout=15) == 3
        assert marker.read_text() == sig.name
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        proc.stdout.close()
        proc.stderr.close()


# --- start / status / stop --------------------------------------------------------------------

def _gone(pid: int) -> bool:
    """True when pid no longer exists or is a zombie nobody reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.02)
    return _gone(pid)


def _health(url: str) -> int:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=3) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@pytest.fixture
def daemons():
    """Pids of background proxies a test started; any still alive at teardown is killed."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5)


def _status(cli) -> dict:
    return one_json(cli("status", "--json"))


def _start(cli, daemons, port: int) -> tuple[str, float]:
    began = time.monotonic()
    proc = cli("start", "--port", str(port), "--no-tls", timeout=30)
    elapsed = time.monotonic() - began
    health = _health(proc.stdout.strip())  # right after start returns: no polling allowed
    info = _status(cli)
    if info.get("pid"):
        daemons.append(info["pid"])
    ok(proc)
    url = proc.stdout.strip()
    assert url == f"http://127.0.0.1:{port}", proc.stdout
    assert health == 200, "start returned before the proxy was ready"
    return url, elapsed


def test_start_status_stop_cycle(cli, daemons):
    cli.token(MOCK)
    port = free_port()
    url, elapsed = _start(cli, daemons, port)
    print(f"\ntokenomics start -> ready in {elapsed * 1000:.0f} ms")
    assert elapsed < 5, f"start took {elapsed:.2f} s"

    info = _status(cli)
    assert {"running", "pid", "url", "tokens", "providers"} <= set(info)
    assert info["running"] is True and info["url"] == url and info["tokens"] == 1
    assert isinstance(info["pid"], int) and not _gone(info["pid"])
    assert info["providers"].get("openai") is True and info["providers"].get("anthropic") is True
    pid = info["pid"]

    pid_files = list(cli.data_dir.glob("*.pid"))
    log_files = list(cli.data_dir.glob("*.log"))
    assert len(pid_files) == 1 and str(pid) in pid_files[0].read_text()
    assert len(log_files) == 1 and "listening on" in log_files[0].read_text()
    assert stat.S_IMODE(log_files[0].stat().st_mode) & 0o077 == 0

    again = ok(cli("start", "--port", str(free_port()), "--no-tls", timeout=30))
    assert again.stdout.strip() == url and _status(cli)["pid"] == pid  # no second daemon

    stopped = cli("stop", timeout=30)
    ok(stopped)
    assert _wait_gone(pid, 1.0), "stop returned but the proxy process is still alive"
    assert _health(url) == 0
    after = _status(cli)
    assert after["running"] is False and after["pid"] is None


def test_stale_pid_file_is_handled_by_stop_and_start(cli, daemons):
    url, _ = _start(cli, daemons, free_port())
    pid = _status(cli)["pid"]
    pid_file = next(cli.data_dir.glob("*.pid"))
    stale = pid_file.read_text()
    os.kill(pid, signal.SIGKILL)  # a crash leaves the pid file behind
    assert _wait_gone(pid, 5)

    assert _status(cli)["running"] is False
    ok(cli("stop", timeout=30))
    assert not pid_file.exists(), "stop left the stale pid file"

    pid_file.write_text(stale)
    new_url, _ = _start(cli, daemons, free_port())
    info = _status(cli)
    assert info["running"] is True and info["url"] == new_url != url and info["pid"] != pid
    ok(cli("stop", timeout=30))
    assert _wait_gone(info["pid"], 1.0)


def test_start_on_busy_port_fails_cleanly(cli, daemons):
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = cli("start", "--port", str(port), "--no-tls", timeout=30)
        info = _status(cli)
    if info.get("pid"):
        daemons.append(info["pid"])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert str(port) in proc.stderr and "Traceback" not in proc.stderr
    assert info["running"] is False
    assert not list(cli.data_dir.glob("*.pid")), "a failed start left a pid file"


# --- init ---------------------------------------------------------------------------------------

PROXY_URL = "http://127.0.0.1:18080"
INIT_TOKEN = "tkn_" + "ab" * 16


def _parse_init(output: str, fmt: str) -> dict:
    if fmt == "json":
        return json.loads(output)
    env = {}
    for line in output.strip().splitlines():
        words = shlex.split(line)
        if fmt == "shell":
            assert len(words) == 2 and words[0] == "export", line
            words = words[1:]
        assert len(words) == 1 and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]), line
        key, value = words[0].split("=", 1)
        env[key] = value
    return env


@pytest.mark.parametrize("fmt", ["shell", "dotenv", "json"])
def test_init_outputs_parse(cli, fmt):
    proc = ok(cli("init", "--output", fmt, "--proxy-url", PROXY_URL, "--token", INIT_TOKEN))
    env = _parse_init(proc.stdout, fmt)
    assert env["OPENAI_BASE_URL"] == PROXY_URL + "/v1"
    assert env["OPENAI_API_KEY"] == INIT_TOKEN
    assert env["ANTHROPIC_BASE_URL"].rstrip("/") == PROXY_URL
    assert env["ANTHROPIC_API_KEY"] == INIT_TOKEN and env["ANTHROPIC_AUTH_TOKEN"] == INIT_TOKEN
    assert "NODE_TLS_REJECT_UNAUTHORIZED" not in env


def test_init_shell_output_evaluates_in_sh(cli):
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no sh")
    text = ok(cli("init", "--proxy-url", PROXY_URL, "--token", INIT_TOKEN)).stdout
    proc = subprocess.run([sh, "-c", text + '\nprintf "%s\\n" "$OPENAI_BASE_URL" "$OPENAI_API_KEY"'],
                          capture_output=True, text=True, timeout=10)
    assert proc.returncode == 0 and proc.stdout.split() == [PROXY_URL + "/v1", INIT_TOKEN], proc


def test_init_dotenv_file_is_private(cli, tmp_path):
    target = tmp_path / "agent.env"
    proc = ok(cli("init", "--dotenv", str(target), "--proxy-url", PROXY_URL, "--token", INIT_TOKEN))
    assert INIT_TOKEN not in proc.stdout
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    env = _parse_init(target.read_text(), "dotenv")
    assert env["OPENAI_BASE_URL"] == PROXY_URL + "/v1" and env["OPENAI_API_KEY"] == INIT_TOKEN


def test_init_provider_all_includes_gemini_and_azure(cli):
    env = one_json(cli("init", "--output", "json", "--provider", "all", "--proxy-url", PROXY_URL,
                       "--token", INIT_TOKEN))
    assert env["GEMINI_API_KEY"] == INIT_TOKEN
    assert env["AZURE_OPENAI_API_KEY"] == INIT_TOKEN
    assert env["AZURE_OPENAI_ENDPOINT"].startswith(PROXY_URL)
    plain = one_json(cli("init", "--output", "json", "--proxy-url", PROXY_URL, "--token", INIT_TOKEN))
    assert "GEMINI_API_KEY" not in plain and "AZURE_OPENAI_API_KEY" not in plain


def test_init_insecure_https_disables_node_verification(cli):
    env = one_json(cli("init", "--output", "json", "--insecure", "--proxy-url", "https://127.0.0.1:18443",
                       "--token", INIT_TOKEN))
    assert env["NODE_TLS_REJECT_UNAUTHORIZED"] == "0"
    assert env["OPENAI_BASE_URL"] == "https://127.0.0.1:18443/v1"


# --- doctor -------------------------------------------------------------------------------------

def test_doctor_flags_missing_provider_key(cli):
    cli.token({"base_key_env": "MISSING_PROVIDER_KEY"})
    proc = cli("doctor", env=base_env(cli.data_dir, MISSING_PROVIDER_KEY=None))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    fails = [line for line in proc.stdout.splitlines() if re.match(r"\s*fail\b", line, re.IGNORECASE)]
    assert any("MISSING_PROVIDER_KEY" in line for line in fails), proc.stdout

    report = json.loads(cli("doctor", "--json", env=base_env(cli.data_dir, MISSING_PROVIDER_KEY=None)).stdout)
    assert report["ok"] is False


def test_doctor_json_with_key_set(cli):
    cli.token({"base_key_env": "MISSING_PROVIDER_KEY"})
    secret = "sk-doctor-secret-value-42"
    proc = cli("doctor", "--json", env=base_env(cli.data_dir, MISSING_PROVIDER_KEY=secret))
    report = json.loads(proc.stdout)  # one JSON document, nothing else
    assert set(report) >= {"checks", "ok"} and isinstance(report["checks"], list) and report["checks"]
    for check in report["checks"]:
        assert set(check) >= {"name", "status", "detail"} and check["status"] in ("ok", "warn", "fail"), check
    mine = [c for c in report["checks"] if "MISSING_PROVIDER_KEY" in c["name"] + c["detail"]]
    assert mine and all(c["status"] == "ok" for c in mine), mine
    assert report["ok"] == (not any(c["status"] == "fail" for c in report["checks"]))
    assert proc.returncode == (0 if report["ok"] else 1)
    assert report["ok"] is True, [c for c in report["checks"] if c["status"] == "fail"]
    assert secret not in proc.stdout + proc.stderr


# --- version and completion ----------------------------------------------------------------------

def test_version(cli):
    proc = ok(cli("version"))
    assert tokenomics.__version__ in proc.stdout


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_mentions_subcommands(cli, shell):
    proc = ok(cli("completion", shell))
    for word in ("serve", "token", "run", "start", "stop", "status", "init", "doctor"):
        assert re.search(rf"\b{word}\b", proc.stdout), word
    if shell == "bash" and shutil.which("bash"):
        check = subprocess.run(["bash", "-n"], input=proc.stdout, capture_output=True, text=True, timeout=10)
        assert check.returncode == 0, check.stderr


# --- zipapp ------------------------------------------------------------------------------------

def _build_pyz(source_dir: Path, target: Path) -> Path:
    """build_zipapp as the Makefile runs it, from a snapshot of the package in source_dir
    (so that an edit to the working copy mid-run cannot make two builds differ)."""
    proc = subprocess.run([sys.executable, "-c", f"import tokenomics.cli; tokenomics.cli.build_zipapp({str(target)!r})"],
                          cwd=source_dir, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert target.is_file()
    return target


_BUILT: dict = {}


@pytest.fixture(scope="module")
def pyz(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("pyz-src")
    shutil.copytree(ROOT / "tokenomics", source / "tokenomics", ignore=shutil.ignore_patterns("__pycache__"))
    target = _build_pyz(source, tmp_path_factory.mktemp("pyz") / "tokenomics.pyz")
    _BUILT[target] = (source, time.time())
    return target


def _bare_env(data_dir: Path, **extra) -> dict:
    env = base_env(data_dir, **extra)
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE"):
        env.pop(name, None)
    return env


def _run_pyz(pyz: Path, data_dir: Path, cwd: Path, *args, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-S", str(pyz), *args], cwd=cwd, env=_bare_env(data_dir, **extra),
                          capture_output=True, text=True, timeout=60)


def test_pyz_runs_without_site_packages(pyz, data_dir, tmp_path):
    bare = subprocess.run([sys.executable, "-S", "-c", "import h11"], env=_bare_env(data_dir),
                          capture_output=True, timeout=30)
    if bare.returncode == 0:
        pytest.skip("h11 is importable without site-packages here; -S proves nothing")
    ok(_run_pyz(pyz, data_dir, tmp_path, "--help"))
    version = ok(_run_pyz(pyz, data_dir, tmp_path, "version"))
    assert tokenomics.__version__ in version.stdout
    created = json.loads(ok(_run_pyz(pyz, data_dir, tmp_path, "token", "create", "--policy", "{}",
                                     "--json")).stdout)
    assert created["token"].startswith("tkn_")
    assert (data_dir / "tokens.json").is_file()
    bad = _run_pyz(pyz, data_dir, tmp_path, "no-such-command")
    assert bad.returncode == 2, bad.stderr
    assert "Traceback" not in bad.stderr


def test_pyz_encrypted_store_interoperates_with_module(pyz, cli, tmp_path):
    key = "correct horse battery staple"
    policy = {"base_key_env": "ZIPAPP_MARKER_KEY", "max_tokens": 64}
    made = json.loads(ok(_run_pyz(pyz, cli.data_dir, tmp_path, "token", "create", "--policy", json.dumps(policy),
                                  "--json", TOKENOMICS_ENCRYPTION_KEY=key)).stdout)
    stored = (cli.data_dir / "tokens.json").read_text()
    assert "ZIPAPP_MARKER_KEY" not in stored and made["token"] not in stored
    env = base_env(cli.data_dir, TOKENOMICS_ENCRYPTION_KEY=key)
    got = one_json(cli("token", "get", "--hash", made["hash"], "--json", env=env))
    assert got["policy"]["base_key_env"] == "ZIPAPP_MARKER_KEY" and got["policy"]["max_tokens"] == 64
    # and the other way: the module (cryptography) writes, the pyz (pure-Python AES) reads
    second = json.loads(ok(cli("token", "create", "--policy", json.dumps({"max_tokens": 32}), "--json",
                               env=env)).stdout)
    listed = json.loads(ok(_run_pyz(pyz, cli.data_dir, tmp_path, "token", "list", "--json",
                                    TOKENOMICS_ENCRYPTION_KEY=key)).stdout)
    by_hash = {r["hash"]: r["policy"] for r in listed}
    assert by_hash[made["hash"]]["base_key_env"] == "ZIPAPP_MARKER_KEY"
    assert by_hash[second["hash"]]["max_tokens"] == 32


def test_pyz_start_status_stop_under_another_name(pyz, data_dir, tmp_path, daemons):
    """The zipapp is one file users copy and rename (e.g. ~/bin/llm-proxy): the background
    proxy it starts must still be recognised by `status` and stopped by `stop`."""
    renamed = tmp_path / "llm-proxy.pyz"
    shutil.copy(pyz, renamed)
    port = free_port()
    started = _run_pyz(renamed, data_dir, tmp_path, "start", "--port", str(port), "--no-tls")
    pid_file = next(iter(data_dir.glob("*.pid")), None)
    if pid_file is not None:  # whatever happens next, the daemon is killed at teardown
        text = pid_file.read_text()
        daemons.append(json.loads(text)["pid"] if text.lstrip().startswith("{") else int(text))
    ok(started)
    url = started.stdout.strip()
    assert _health(url) == 200
    status = json.loads(ok(_run_pyz(renamed, data_dir, tmp_path, "status", "--json")).stdout)
    assert status["running"] is True and status["url"] == url, status
    ok(_run_pyz(renamed, data_dir, tmp_path, "stop"))
    assert daemons and _wait_gone(daemons[0], 1.0), "stop left the renamed zipapp's proxy running"
    assert _health(url) == 0


def test_pyz_build_is_reproducible(pyz, tmp_path):
    # zip timestamps have 2 s resolution: build the second archive on a later clock reading so
    # that any wall-clock or file-mtime leak into the archive shows up as a difference
    source, built_at = _BUILT[pyz]
    time.sleep(max(0.0, 2.1 - (time.time() - built_at)))
    again = _build_pyz(source, tmp_path / "again.pyz")
    assert again.read_bytes() == pyz.read_bytes()
    assert os.access(again, os.X_OK)


# --- the installed console script ---------------------------------------------------------------

def test_console_script_installed(tmp_path):
    # pip puts the script beside the interpreter it installed into, on PATH or not
    exe = shutil.which("tokenomics", path=os.path.dirname(sys.executable)) or shutil.which("tokenomics")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs the package with pip -e, but no `tokenomics` is on PATH")
        pytest.skip("the `tokenomics` console script is not installed (pip install -e .)")
    proc = subprocess.run([exe, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=30,
                          env=base_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "serve" in proc.stdout


# --- the demo -------------------------------------------------------------------------------------

def test_demo_walkthrough_exits_0_and_shows_each_step(cli):
    proc = cli("demo", timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "HTTP 200: 'Mock reply: What is the capital of France?'" in out
    assert "chunks" in out and "provider saw: 'Email <EMAIL_1> about card <CREDIT_CARD_1>.'" in out
    assert "HTTP 403 rule_violation" in out and "HTTP 403 model_not_allowed" in out
    assert "HTTP 429 budget_exceeded" in out
    assert "Ledger summary: 1 session(s)" in out
    assert "jane.doe@example.com" in out.split("provider saw")[0]  # restored for the client
    assert list(cli.data_dir.iterdir()) == []  # the demo works in its own temporary data dir


def test_demo_runs_from_the_zipapp_without_site_packages(tmp_path, cli):
    import subprocess
    import sys
    import tokenomics
    import tokenomics.cli
    import tokenomics.config
    import tokenomics.tls
    target = tokenomics.cli.build_zipapp(str(tmp_path / "tokenomics.pyz"))
    proc = subprocess.run([sys.executable, "-S", target, "demo"], capture_output=True, text=True, timeout=60,
                          env=cli.env, cwd=cli.cwd)
    assert proc.returncode == 0, proc.stderr
    assert "HTTP 429 budget_exceeded" in proc.stdout


def test_local_server_certificate_is_reissued_before_it_expires(tmp_path):
    import datetime
    import trustme
    config = tokenomics.config.load_config(None, str(tmp_path), environ={})
    ca_file, cert_file, key_file = tokenomics.tls.ensure_local_ca(config)
    ca_before = open(ca_file, "rb").read()
    # replace the server certificate with one that expires in 10 days, issued by the same CA
    ca = trustme.CA.from_pem(ca_before, open(tmp_path / "certs" / "ca.key", "rb").read())
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=10)
    leaf = ca.issue_cert("localhost", not_after=soon)
    (tmp_path / "certs" / "server.crt").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    assert tokenomics.tls._expires_soon(cert_file)
    tokenomics.tls.ensure_local_ca(config)
    assert not tokenomics.tls._expires_soon(cert_file)
    assert open(ca_file, "rb").read() == ca_before  # the CA clients trust is kept
    assert os.stat(key_file).st_mode & 0o777 == 0o600
