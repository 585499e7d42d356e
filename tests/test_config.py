"""Configuration section: config.yaml discovery, .env loading, TOKENOMICS_* overrides, validation,
and the provider catalog overlays (providers.yaml beside the config, `providers:` inside it)."""
import pytest
import yaml

import tokenomics
import tokenomics.config
import tokenomics.policy
import tokenomics.providers
from tokenomics.errors import UsageError


@pytest.fixture(autouse=True)
def cwd(tmp_path, monkeypatch):
    """Every test runs in an empty working directory, so no stray ./config.yaml or ./.env leaks in."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def write_yaml(path, doc):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def load(data_dir, config_path=None, environ=None, overrides=None):
    return tokenomics.config.load_config(str(config_path) if config_path else None, str(data_dir),
                                  environ={} if environ is None else environ, overrides=overrides)


def usage_error(data_dir, config_path=None, environ=None, overrides=None) -> str:
    with pytest.raises(UsageError) as exc:
        load(data_dir, config_path, environ, overrides)
    return str(exc.value)


# --- discovery --------------------------------------------------------------------------------

def test_defaults_without_any_config_file(data_dir):
    config = load(data_dir)
    assert config.server.http_port == 8080
    assert config.server.https_port == 8443
    assert config.server.host == "127.0.0.1"
    assert config.session.backend == "memory"
    assert config.security.hash_key_env == "TOKENOMICS_HASH_KEY"
    assert config.security.encryption_key_env == "TOKENOMICS_ENCRYPTION_KEY"
    assert config.dir == str(data_dir)


def test_discovery_order_config_flag_then_cwd_then_data_dir(data_dir, cwd, tmp_path):
    explicit = write_yaml(tmp_path / "elsewhere" / "explicit.yaml", {"server": {"http_port": 1111}})
    in_cwd = write_yaml(cwd / "config.yaml", {"server": {"http_port": 2222}})
    in_dir = write_yaml(data_dir / "config.yaml", {"server": {"http_port": 3333}})

    assert load(data_dir, explicit).server.http_port == 1111
    assert load(data_dir).server.http_port == 2222
    in_cwd.unlink()
    assert load(data_dir).server.http_port == 3333
    in_dir.unlink()
    assert load(data_dir).server.http_port == 8080


def test_missing_config_flag_file_is_a_usage_error_naming_it(data_dir, cwd, tmp_path):
    write_yaml(cwd / "config.yaml", {"server": {"http_port": 2222}})  # must not be used as a fallback
    missing = tmp_path / "nope" / "missing.yaml"
    message = usage_error(data_dir, missing)
    assert str(missing) in message


def test_invalid_yaml_is_a_usage_error_naming_the_file(data_dir, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("server: [unclosed\n")
    assert str(path) in usage_error(data_dir, path)


def test_config_dir_key_is_overridden_by_the_dir_argument(data_dir, tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"dir": str(tmp_path / "from-config")})
    assert load(data_dir, path).dir == str(data_dir)
    assert tokenomics.config.load_config(str(path), None, environ={}).dir == str(tmp_path / "from-config")


# --- .env -------------------------------------------------------------------------------------

def test_dotenv_in_cwd_and_data_dir_fill_the_environment_without_overriding(data_dir, cwd):
    (cwd / ".env").write_text("# a comment\nFROM_CWD=cwd-value\nSHARED=cwd\nALREADY=from-file\n"
                              "export EXPORTED=yes\nQUOTED=\"two words\"\n")
    (data_dir / ".env").write_text("FROM_DIR=dir-value\nSHARED=dir\n")
    environ = {"ALREADY": "from-process"}
    load(data_dir, environ=environ)
    assert environ["FROM_CWD"] == "cwd-value"
    assert environ["FROM_DIR"] == "dir-value"
    assert environ["ALREADY"] == "from-process"  # what is set is never overridden
    assert environ["SHARED"] == "cwd"            # the first file loaded wins over the second
    assert environ["EXPORTED"] == "yes"
    assert environ["QUOTED"] == "two words"


def test_dotenv_can_carry_config_overrides(data_dir, cwd):
    (cwd / ".env").write_text("TOKENOMICS_SERVER_HTTP_PORT=9100\n")
    assert load(data_dir).server.http_port == 9100


def test_dotenv_in_data_dir_can_carry_config_overrides(data_dir):
    (data_dir / ".env").write_text("TOKENOMICS_SERVER_HOST=0.0.0.0\n")
    assert load(data_dir).server.host == "0.0.0.0"


# --- TOKENOMICS_* environment overrides ---------------------------------------------------------

def test_env_override_is_typed(data_dir):
    config = load(data_dir, environ={"TOKENOMICS_SERVER_HTTP_PORT": "9000",
                                     "TOKENOMICS_SERVER_TLS_ENABLED": "false",
                                     "TOKENOMICS_SESSION_BACKEND": "redis",
                                     "TOKENOMICS_SERVER_UPSTREAM_URL": "http://127.0.0.1:9"})
    assert config.server.http_port == 9000 and isinstance(config.server.http_port, int)
    assert config.server.tls.enabled is False
    assert config.session.backend == "redis"
    assert config.server.upstream_url == "http://127.0.0.1:9"


@pytest.mark.parametrize("name, value", [
    ("TOKENOMICS_SERVER_HTTP_PORT", "abc"),
    ("TOKENOMICS_SERVER_HTTP_PORT", "80.5"),
    ("TOKENOMICS_SERVER_TLS_ENABLED", "maybe"),
])
def test_bad_env_override_names_the_variable(data_dir, name, value):
    assert name in usage_error(data_dir, environ={name: value})


def test_env_choice_is_validated(data_dir):
    assert "session.backend" in usage_error(data_dir, environ={"TOKENOMICS_SESSION_BACKEND": "foo"})


def test_precedence_cli_over_env_over_file(data_dir, tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"server": {"http_port": 1111, "host": "10.0.0.1",
                                                       "https_port": 4443}})
    env = {"TOKENOMICS_SERVER_HTTP_PORT": "2222", "TOKENOMICS_SERVER_HOST": "10.0.0.2"}

    config = load(data_dir, path, environ=dict(env), overrides={"server": {"http_port": 3333}})
    assert config.server.http_port == 3333        # CLI flag beats env and file
    assert config.server.host == "10.0.0.2"       # env beats file
    assert config.server.https_port == 4443       # file beats default; siblings survive the merge

    config = load(data_dir, path, environ=dict(env))
    assert config.server.http_port == 2222
    assert load(data_dir, path).server.http_port == 1111


# --- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("doc, key_path", [
    ({"sever": {"http_port": 1}}, "sever"),
    ({"server": {"htp_port": 9000}}, "server.htp_port"),
    ({"server": {"tls": {"enabeld": True}}}, "server.tls.enabeld"),
    ({"session": {"redis": {"adr": "x:1"}}}, "session.redis.adr"),
    ({"admin": {"auth": {"user": "x"}}}, "admin.auth.user"),
])
def test_unknown_key_is_rejected_naming_its_path(data_dir, tmp_path, doc, key_path):
    path = write_yaml(tmp_path / "c.yaml", doc)
    assert key_path in usage_error(data_dir, path)


@pytest.mark.parametrize("doc, key_path", [
    ({"server": {"http_port": "abc"}}, "server.http_port"),
    ({"server": {"tls": {"enabled": "yes"}}}, "server.tls.enabled"),
    ({"server": {"http_port": True}}, "server.http_port"),
    ({"server": "8080"}, "server"),
    ({"session": {"redis": {"db": "zero"}}}, "session.redis.db"),
    ({"cli_maps": ["claude"]}, "cli_maps"),
])
def test_wrong_type_is_rejected_naming_its_path(data_dir, tmp_path, doc, key_path):
    path = write_yaml(tmp_path / "c.yaml", doc)
    assert key_path in usage_error(data_dir, path)


def test_config_file_in_data_dir_is_validated_too(data_dir):
    write_yaml(data_dir / "config.yaml", {"server": {"htp_port": 1}})
    assert "server.htp_port" in usage_error(data_dir)


def test_session_backend_must_be_memory_or_redis(data_dir, tmp_path):
    bad = write_yaml(tmp_path / "bad.yaml", {"session": {"backend": "foo"}})
    assert "session.backend" in usage_error(data_dir, bad)
    good = write_yaml(tmp_path / "good.yaml", {"session": {"backend": "redis",
                                                           "redis": {"addr": "10.1.1.1:6380", "db": 2}}})
    config = load(data_dir, good)
    assert config.session.backend == "redis"
    assert config.session.redis.addr == "10.1.1.1:6380" and config.session.redis.db == 2


def test_a_full_go_style_config_loads(data_dir, tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {
        "server": {"http_port": 18080, "https_port": 0, "host": "127.0.0.1",
                   "upstream_url": "https://api.openai.com", "max_body_bytes": 1048576,
                   "tls": {"enabled": False, "auto_gen": True, "cert_dir": "/tmp/certs"}},
        "admin": {"enabled": True, "auth": {"username": "admin", "password": "pw"}},
        "security": {"hash_key_env": "MY_HASH", "encryption_key_env": "MY_ENC"},
        "cli_maps": {"claude": "anthropic"},
        "default_provider": "anthropic",
        "ledger": {"enabled": True},
        "guardrails": {"stream_holdback": 64},
    })
    config = load(data_dir, path)
    assert config.server.https_port == 0
    assert config.server.max_body_bytes == 1048576
    assert config.security.hash_key_env == "MY_HASH"
    assert config.cli_maps == {"claude": "anthropic"}
    assert config.default_provider == "anthropic"
    assert config.guardrails.stream_holdback == 64


# --- providers in the config and providers.yaml -------------------------------------------------

def test_providers_entry_in_config_extends_and_overrides_the_catalog(data_dir, tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"providers": {
        "acme": {"upstream_url": "https://llm.acme.example/v1", "api_key_env": "ACME_KEY",
                 "dialect": "openai", "models": ["acme-large"]},
        "openai": {"upstream_url": "https://openai-gateway.example"},
    }})
    config = load(data_dir, path)
    catalog = tokenomics.providers.Catalog(config, environ={})
    acme = catalog.get("acme")
    assert acme.upstream_url == "https://llm.acme.example/v1"
    assert acme.api_key_env == "ACME_KEY"
    assert "acme-large" in acme.models
    openai = catalog.get("openai")
    assert openai.upstream_url == "https://openai-gateway.example"
    assert openai.api_key_env == "OPENAI_API_KEY"  # fields not overridden keep the built-in value
    assert "anthropic" in catalog.names()


@pytest.mark.parametrize("entry, key_path", [
    ({"upstream": "https://x.example"}, "providers.acme.upstream"),
    ({"models": "acme-large"}, "providers.acme.models"),
    ({"dialect": "grpc"}, "providers.acme.dialect"),
    ({"auth_scheme": "basic"}, "providers.acme.auth_scheme"),
])
def test_providers_entry_in_config_is_validated(data_dir, tmp_path, entry, key_path):
    path = write_yaml(tmp_path / "c.yaml", {"providers": {"acme": entry}})
    assert key_path in usage_error(data_dir, path)


def test_providers_yaml_beside_the_config_overlays_the_catalog(data_dir, tmp_path):
    config_dir = tmp_path / "etc"
    path = write_yaml(config_dir / "config.yaml", {"server": {"http_port": 1234}})
    write_yaml(config_dir / "providers.yaml", {
        "acme": {"upstream_url": "https://llm.acme.example", "api_key_env": "ACME_KEY",
                 "auth_scheme": "header", "auth_header": "x-acme-key"},
        "anthropic": {"upstream_url": "https://anthropic-gateway.example"},
    })
    config = load(data_dir, path)
    catalog = tokenomics.providers.Catalog(config, environ={})
    acme = catalog.get("acme")
    assert acme.upstream_url == "https://llm.acme.example"
    assert acme.auth_scheme == "header" and acme.auth_header == "x-acme-key"
    anthropic = catalog.get("anthropic")
    assert anthropic.upstream_url == "https://anthropic-gateway.example"
    assert anthropic.dialect == "anthropic"
    # a policy may now name the new provider
    policy = tokenomics.policy.parse_policy({"providers": {"acme": [{"model": "acme-1"}]}}, catalog=catalog)
    assert policy.providers[0].name == "acme"


def test_providers_yaml_beside_the_config_in_the_data_dir(data_dir):
    write_yaml(data_dir / "config.yaml", {})
    write_yaml(data_dir / "providers.yaml", {"acme": {"upstream_url": "https://llm.acme.example"}})
    catalog = tokenomics.providers.Catalog(load(data_dir), environ={})
    assert catalog.get("acme").upstream_url == "https://llm.acme.example"


def test_providers_yaml_beside_a_config_found_in_the_cwd(data_dir, cwd):
    write_yaml(cwd / "config.yaml", {})
    write_yaml(cwd / "providers.yaml", {"acme": {"upstream_url": "https://cwd.acme.example"}})
    catalog = tokenomics.providers.Catalog(load(data_dir), environ={})
    assert catalog.get("acme").upstream_url == "https://cwd.acme.example"


def test_providers_yaml_is_validated(data_dir, tmp_path):
    path = write_yaml(tmp_path / "etc" / "config.yaml", {})
    write_yaml(tmp_path / "etc" / "providers.yaml", {"acme": {"upstrem_url": "https://x.example"}})
    with pytest.raises(UsageError) as exc:
        tokenomics.providers.Catalog(load(data_dir, path), environ={})
    assert "upstrem_url" in str(exc.value)


def test_unknown_provider_is_not_in_the_builtin_catalog():
    catalog = tokenomics.providers.Catalog(environ={})
    for name in ("openai", "anthropic", "azure_openai", "google_gemini", "mistral", "cohere", "groq",
                 "together", "fireworks", "perplexity", "deepseek", "xai", "openrouter", "ollama",
                 "vllm", "generic", "mock"):
        assert name in catalog.names()
    with pytest.raises(UsageError) as exc:
        tokenomics.policy.parse_policy({"providers": {"acme": [{}]}}, catalog=catalog)
    assert "providers.acme" in str(exc.value)


def test_provider_base_url_env_overrides_the_catalog_url():
    catalog = tokenomics.providers.Catalog(environ={"OLLAMA_BASE_URL": "http://gpu-box:11434/v1"})
    assert catalog.get("ollama").url() == "http://gpu-box:11434/v1"
    assert tokenomics.providers.Catalog(environ={}).get("ollama").url() == "http://127.0.0.1:11434/v1"


def test_pricing_and_webhooks_are_parsed_once_into_typed_values(data_dir, tmp_path):
    path = write_yaml(tmp_path / "typed.yaml", {
        "pricing": {"openai/My-Model": {"input": 1, "output": 4}},
        "events": {"webhooks": [{"url": "http://127.0.0.1:9/hook", "events": ["budget.*"], "timeout": "2s"}]}})
    config = tokenomics.config.load_config(str(path), str(data_dir), environ={})
    assert config.pricing == {"my-model": (1.0, 1.0, 4.0)}
    (hook,) = config.events.webhooks
    assert isinstance(hook, tokenomics.config.Webhook)
    assert (hook.url, hook.events, hook.timeout) == ("http://127.0.0.1:9/hook", ("budget.*",), 2.0)
