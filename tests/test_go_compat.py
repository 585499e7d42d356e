"""Coming from the Go project (issue 13): its provider names and `default_provider` in policies,
and TOKENOMICS_* environment overrides that name no config key (SPEC §4, §10)."""
import pytest

import tokenomics.config
import tokenomics.providers
from tokenomics.errors import UsageError
from tokenomics.policy import parse_policy

CATALOG = tokenomics.providers.Catalog(environ={})


@pytest.mark.parametrize("go_name, ours", [("azure", "azure_openai"), ("gemini", "google_gemini")])
def test_go_provider_names_are_aliases(go_name, ours):
    policy = parse_policy({"provider": go_name, "providers": {go_name: [{"model": "m"}]}}, catalog=CATALOG)
    assert policy.provider == ours
    assert [p.name for p in policy.providers] == [ours]


def test_default_provider_is_an_alias_of_provider():
    assert parse_policy({"default_provider": "gemini"}, catalog=CATALOG).provider == "google_gemini"
    assert parse_policy({"default_provider": "openai"}, catalog=CATALOG).provider == "openai"


def test_default_provider_conflicting_with_provider_is_refused():
    with pytest.raises(UsageError, match="default_provider.*alias of provider"):
        parse_policy({"provider": "openai", "default_provider": "anthropic"}, catalog=CATALOG)


def test_unknown_default_provider_is_refused():
    with pytest.raises(UsageError, match="unknown provider 'opneai'"):
        parse_policy({"default_provider": "opneai"}, catalog=CATALOG)


def test_unknown_env_override_is_refused_naming_it(tmp_path):
    with pytest.raises(UsageError, match="TOKENOMICS_SERVER_HTP_PORT.*did you mean TOKENOMICS_SERVER_HTTP_PORT"):
        tokenomics.config.load_config(None, str(tmp_path), environ={"TOKENOMICS_SERVER_HTP_PORT": "1"})


def test_non_config_variables_are_not_overrides(tmp_path):
    env = {name: "x" for name in tokenomics.config.NON_CONFIG_ENV}
    env["TOKENOMICS_SERVER_HTTP_PORT"] = "9999"
    assert tokenomics.config.load_config(None, str(tmp_path), environ=env).server.http_port == 9999


def test_unknown_env_override_exits_2_without_traceback(cli):
    proc = cli("token", "list", env={**cli.env, "TOKENOMICS_SERVER_HTP_PORT": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "TOKENOMICS_SERVER_HTP_PORT" in proc.stderr and "Traceback" not in proc.stderr


# Routing when nothing matched (SPEC §8): the model family picks the provider's dialect and auth.

def test_anthropic_sdk_gpt_model_with_global_upstream_is_translated(cli, stub, start_proxy):
    from conftest import OPENAI_KEY
    from test_proxy import an
    token = cli.token({"upstream_url": stub.url})
    proxy = start_proxy()
    msg = an(proxy, token).messages.create(model="gpt-4o-mini", max_tokens=50,
                                           messages=[{"role": "user", "content": "hello"}])
    assert msg.content[0].text
    rec = stub.last
    assert rec.path == "/v1/chat/completions"
    assert rec.json["model"] == "gpt-4o-mini" and rec.json["messages"][-1]["role"] == "user"
    assert rec.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert not any(h.startswith("anthropic-") for h in rec.headers)


def test_claude_client_with_global_anthropic_upstream_is_forwarded_as_is(cli, stub, start_proxy):
    from conftest import ANTHROPIC_KEY
    from test_proxy import an
    token = cli.token({"upstream_url": stub.url})
    proxy = start_proxy()
    an(proxy, token).messages.create(model="claude-sonnet-4-6", max_tokens=50, system="terse",
                                     messages=[{"role": "user", "content": "hello"}])
    rec = stub.last
    assert rec.path == "/v1/messages"
    assert rec.json["system"] == "terse" and rec.json["max_tokens"] == 50
    assert rec.headers["x-api-key"] == ANTHROPIC_KEY


def test_default_provider_gemini_policy_routes_with_bearer(cli, stub, start_proxy):
    from test_proxy import oa
    token = cli.token({"default_provider": "gemini", "upstream_url": stub.url})
    proxy = start_proxy(env={"GEMINI_API_KEY": "gk-test"})
    oa(proxy, token).chat.completions.create(model="claude-sonnet-4-6",
                                             messages=[{"role": "user", "content": "hi"}])
    assert stub.last.path.endswith("/chat/completions")   # the policy's provider beats the model family
    assert stub.last.headers["authorization"] == "Bearer gk-test"


# The Go project's config.yaml keys (issue 13): mapped, or refused naming what to use instead.

# docs/CONFIGURATION.md "Full Reference" of the Go project, without the keys refused below.
GO_FULL_REFERENCE = """
server: {http_port: 8080, https_port: 8443, upstream_url: "https://api.openai.com", tls: {enabled: true, auto_gen: true, cert_dir: "./certs", cert_file: "", key_file: ""}}
session: {backend: memory, redis: {addr: "localhost:6379", password: "", db: 0}}
security: {hash_key_env: TOKENOMICS_HASH_KEY, encryption_key_env: TOKENOMICS_ENCRYPTION_KEY}
logging: {level: warn, format: json, request_body: false, response_body: false, hide_token_hash: false, disable_request: false}
events: {webhooks: [{url: "http://localhost:9999/webhook", secret: "", signing_key: "", events: [], timeout: 10, insecure: false}]}
remote: {url: "", api_key: "", sync: 0, insecure: false, webhook: {enabled: false, path: "/v1/webhook", secret: "", signing_key: "", auto_register: false, callback_url: "", insecure: false}}
cli_maps: {claude: anthropic, python: generic}
default_provider: ""
ledger: {enabled: true}
"""


def test_go_full_reference_config_loads(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(GO_FULL_REFERENCE)
    config = tokenomics.config.load_config(str(path), str(tmp_path), environ={})
    assert config.logging.level == "warning" and config.remote.webhook.path == "/v1/webhook"


GO_CONFIG_OK = """
server:
  http_port: 8080
logging:
  level: warn
  format: json
remote:
  insecure: false
  webhook:
    enabled: false
    auto_register: false
    callback_url: ""
    insecure: false
ledger:
  enabled: true
"""


def test_go_config_keys_that_map_load(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(GO_CONFIG_OK)
    config = tokenomics.config.load_config(str(path), str(tmp_path), environ={})
    assert config.logging.level == "warning"
    assert config.remote.webhook.enabled is False and config.remote.insecure is False


@pytest.mark.parametrize("snippet, key, instead", [
    ("storage:\n  db_path: x.db\n", "storage", "dir:"),
    ("ledger:\n  memory: true\n", "ledger.memory", "mapping"),
    ("ledger:\n  dir: .tokenomics\n", "ledger.dir", "dir:"),
    ("ledger:\n  event_ledger: true\n", "ledger.event_ledger", "events.webhooks"),
    ("logging:\n  proxy_log_file: p.log\n", "logging.proxy_log_file", "logging.file.path"),
    ("logging:\n  file:\n    level: debug\n", "logging.file.level", "logging.level"),
])
def test_go_config_keys_without_equivalent_name_the_replacement(tmp_path, cli, snippet, key, instead):
    path = tmp_path / "config.yaml"
    path.write_text(snippet)
    with pytest.raises(UsageError, match="Go project") as exc:
        tokenomics.config.load_config(str(path), str(tmp_path), environ={})
    assert key in str(exc.value) and instead in str(exc.value)
    proc = cli("token", "list", "--config", str(path))
    assert proc.returncode == 2 and key in proc.stderr and "Traceback" not in proc.stderr


# Every field the Go project's policy reference documents, in one policy of its schema.
GO_FULL_POLICY = {
    "base_key_env": "OPENAI_PAT", "upstream_url": "https://api.openai.com", "max_tokens": 100000,
    "model": "gpt-4o", "model_regex": "^gpt-4", "timeout": 60,
    "prompts": [{"role": "system", "content": "You are a helpful assistant."}],
    "providers": {
        "openai": [{"model": "gpt-4o", "base_key_env": "OPENAI_PAT", "max_tokens": 4096, "timeout": 30},
                   {"model_regex": "^gpt-4o-mini", "base_key_env": "OPENAI_PAT"}],
        "anthropic": [{"model_regex": "^claude-", "base_key_env": "ANTHROPIC_PAT",
                       "upstream_url": "https://api.anthropic.com",
                       "prompts": [{"role": "system", "content": "Be concise."}]}],
    },
    "rules": [
        {"name": "no-secrets", "type": "keyword", "keywords": ["internal use only"], "action": "fail", "scope": "input"},
        {"type": "regex", "pattern": "(?i)project\\s+falcon", "action": "warn", "scope": "both"},
        {"type": "pii", "detect": ["ssn", "credit_card", "email", "phone", "ip_address", "aws_key", "api_key",
                                   "jwt", "private_key", "connection_string", "github_token"],
         "action": "mask", "scope": "input"},
        {"type": "jailbreak", "action": "fail", "scope": "input"},
    ],
    "rate_limit": {"max_parallel": 4, "rules": [
        {"requests": 60, "window": "1m", "strategy": "sliding"},
        {"tokens": 100000, "window": "1h", "strategy": "fixed"}]},
    "retry": {"max_retries": 2, "fallbacks": ["gpt-4o-mini"], "retry_on": [429, 500, 502, 503]},
    "memory": {"enabled": True, "file_path": ".tokenomics/memory", "file_name": "{date}/{token_hash}.md",
               "max_size_mb": 10, "compress_old": True},
    "metadata": {"team": "platform", "project": "agents", "env": "prod", "cost_center": "1234"},
}


def test_a_policy_with_every_go_documented_field_loads_and_keeps_them():
    policy = parse_policy(GO_FULL_POLICY, catalog=CATALOG)
    assert [p.name for p in policy.providers] == ["openai", "openai", "anthropic"]
    assert len(policy.rules) == 4 and policy.max_tokens == 100000 and policy.timeout == 60
    assert {r.kind for r in policy.rate_rules} == {"requests", "tokens"}


def test_a_go_pii_name_without_a_detector_is_refused_with_what_to_use():
    with pytest.raises(UsageError, match=r"rules\[0\].detect\[0\]: unknown PII type 'passport'.*regex"):
        parse_policy({"rules": [{"type": "pii", "detect": ["passport"], "action": "mask"}]}, catalog=CATALOG)
