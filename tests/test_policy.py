"""Policy section: validation with JSON paths, resolution per model (SPEC §4), upstream selection
and URL joining (SPEC §8)."""
import dataclasses

import pytest

import tokenomics
import tokenomics.config
import tokenomics.dialects
import tokenomics.errors
import tokenomics.forward
import tokenomics.http.client
import tokenomics.http.server
import tokenomics.pipeline
import tokenomics.providers
import tokenomics.records.exchange
import tokenomics.util
from tokenomics.errors import ProxyError, UsageError
from tokenomics.policy import parse_policy, resolve_policy, select_upstream

CATALOG = tokenomics.providers.Catalog(environ={})   # no *_BASE_URL from the machine leaks into the catalog
CONFIG = tokenomics.config.Config()


def config_with(**server) -> tokenomics.config.Config:
    return dataclasses.replace(CONFIG, server=dataclasses.replace(CONFIG.server, **server))


def parse(raw):
    return parse_policy(raw, catalog=CATALOG)


def error(raw) -> str:
    with pytest.raises(UsageError) as exc:
        parse(raw)
    return str(exc.value)


def resolve(raw, model, config=CONFIG, catalog=CATALOG, **kw):
    return resolve_policy(parse_policy(raw, catalog=catalog), model, catalog, config, **kw)


# --- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, path", [
    ({"modle": "gpt-4o"}, "modle"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_output_tokens": "big"}, "max_output_tokens"),
    ({"model": 4}, "model"),
    ({"base_key_env": ["A"]}, "base_key_env"),
    ({"model_regex": "gpt-(4"}, "model_regex"),
    ({"timeout": "soon"}, "timeout"),
    ({"timeout": "30 seconds"}, "timeout"),
    ({"timeout": -5}, "timeout"),
    ({"timeout": True}, "timeout"),
    ({"prompts": "be nice"}, "prompts"),
    ({"prompts": [{"role": "wizard", "content": "x"}]}, "prompts[0].role"),
    ({"prompts": [{"role": "system", "content": "ok"}, {"role": "user", "content": 5}]}, "prompts[1].content"),
    ({"prompts": [{"role": "system", "content": "x", "name": "n"}]}, "prompts[0].name"),
    ({"rules": "secret"}, "rules"),
    ({"providers": {"openai": [{"model_regex": "("}]}}, "providers.openai[0].model_regex"),
    ({"providers": {"openai": [{"model": "gpt-4o"}, {"max_tokens": "x"}]}}, "providers.openai[1].max_tokens"),
    ({"providers": {"openai": [{"bogus": 1}]}}, "providers.openai[0].bogus"),
    ({"providers": {"openai": [{"retry": {"max_retries": 1}}]}}, "providers.openai[0].retry"),
    ({"providers": {"openai": [{"timeout": "forever"}]}}, "providers.openai[0].timeout"),
    ({"providers": {"anthropic": [{"prompts": [{"role": "robot", "content": "x"}]}]}},
     "providers.anthropic[0].prompts[0].role"),
    ({"providers": {"opnai": [{"model": "gpt-4o"}]}}, "providers.opnai"),
    ({"providers": ["openai"]}, "providers"),
    ({"providers": {"openai": ["gpt-4o"]}}, "providers.openai[0]"),
    ({"provider": "opnai"}, "provider"),
    ({"retry": {"max_retries": "3"}}, "retry.max_retries"),
    ({"retry": {"max_retries": 2.5}}, "retry.max_retries"),
    ({"retry": {"retries": 3}}, "retry.retries"),
    ({"retry": {"fallbacks": ["gpt-4o", 7]}}, "retry.fallbacks[1]"),
    ({"retry": {"retry_on": [429, "500"]}}, "retry.retry_on[1]"),
    ({"retry": {"backoff": "later"}}, "retry.backoff"),
    ({"retry": 3}, "retry"),
    ({"memory": {"enabled": "yes"}}, "memory.enabled"),
    ({"memory": {"path": "/tmp"}}, "memory.path"),
    ({"metadata": {"team": ["a", "b"]}}, "metadata.team"),
    ({"metadata": "team=a"}, "metadata"),
])
def test_invalid_policy_names_the_json_path(raw, path):
    message = error(raw)
    assert path in message


def test_error_path_is_specific():
    """The message points at the offending element, not just somewhere in the policy."""
    message = error({"providers": {"openai": [{"model": "gpt-4o"}, {"model_regex": "[unclosed"}]}})
    assert "providers.openai[1].model_regex" in message
    assert "providers.openai[0]" not in message


def test_policy_must_be_an_object():
    for raw in ([], "gpt-4o", None, 5):
        with pytest.raises(UsageError):
            parse(raw)


def test_empty_policy_is_valid():
    policy = parse({})
    assert policy.providers == () and policy.prompts == () and policy.rules == ()


def test_go_style_policy_parses_unchanged():
    raw = {
        "base_key_env": "OPENAI_API_KEY",
        "upstream_url": "https://api.openai.com",
        "max_tokens": 100000,
        "model_regex": "^gpt-4",
        "timeout": 60,
        "prompts": [{"role": "system", "content": "Be concise."}],
        "rules": ["(?i)password", "secret-[0-9]+"],
        "providers": {
            "openai": [{"base_key_env": "OPENAI_PROD_KEY", "model": "gpt-4o", "max_tokens": 5000},
                       {"base_key_env": "OPENAI_KEY", "model_regex": "^gpt-4o-mini"}],
            "anthropic": [{"base_key_env": "ANTHROPIC_API_KEY", "model_regex": "^claude",
                           "prompts": [{"role": "system", "content": "No code."}]}],
        },
        "retry": {"max_retries": 2, "fallbacks": ["gpt-4o-mini"], "retry_on": [429, 503], "backoff": "1s"},
        "metadata": {"team": "search", "cost_center": 42},
        "memory": {"enabled": True, "file_path": "/tmp/mem"},
    }
    policy = parse(raw)
    assert policy.raw == raw
    assert policy.max_tokens == 100000 and policy.timeout == 60.0
    assert [p.name for p in policy.providers] == ["openai", "openai", "anthropic"]
    assert policy.retry.max_retries == 2 and policy.retry.fallbacks == ("gpt-4o-mini",)
    assert policy.retry.retry_on == (429, 503) and policy.retry.backoff == 1.0
    assert policy.metadata == {"team": "search", "cost_center": 42}


def test_retry_defaults_to_no_retries():
    assert parse({}).retry.max_retries == 0


@pytest.mark.parametrize("value, seconds", [(15, 15.0), (2.5, 2.5), ("30s", 30.0), ("2m", 120.0),
                                            ("1h", 3600.0), ("500ms", 0.5)])
def test_timeout_accepts_seconds_and_durations(value, seconds):
    assert parse({"timeout": value}).timeout == seconds


def test_legacy_string_rules_are_accepted():
    policy = parse({"rules": ["(?i)password", "sk-[a-z0-9]{20,}"],
                    "providers": {"openai": [{"rules": ["internal-only"]}]}})
    assert len(policy.rules) == 2
    assert len(policy.providers[0].rules) == 1


def test_prompt_roles():
    roles = ["system", "developer", "user", "assistant"]
    policy = parse({"prompts": [{"role": r, "content": r} for r in roles]})
    assert [p.role for p in policy.prompts] == roles


def test_known_provider_names_are_accepted():
    policy = parse({"provider": "anthropic",
                    "providers": {"google_gemini": [{"model_regex": "^gemini"}], "mock": [{}]}})
    assert policy.provider == "anthropic"
    assert [p.name for p in policy.providers] == ["google_gemini", "mock"]


# --- resolution: which provider policy wins ----------------------------------------------------

FIRST_MATCH = {
    "base_key_env": "GLOBAL_KEY",
    "providers": {
        "openai": [
            {"model": "gpt-4o", "base_key_env": "EXACT_KEY"},
            {"model_regex": "^gpt-4", "base_key_env": "REGEX_KEY"},
            {"base_key_env": "CATCH_ALL_KEY"},
            {"model": "o3", "base_key_env": "SHADOWED_KEY"},
        ],
    },
}


@pytest.mark.parametrize("model, key_env", [
    ("gpt-4o", "EXACT_KEY"),
    ("gpt-4o-mini", "REGEX_KEY"),
    ("gpt-4.1", "REGEX_KEY"),
    ("o3", "CATCH_ALL_KEY"),         # the catch-all comes first, so it wins
    ("anything-else", "CATCH_ALL_KEY"),
])
def test_first_matching_provider_policy_wins(model, key_env):
    resolved = resolve(FIRST_MATCH, model)
    assert resolved.base_key_env == key_env
    assert resolved.model == model


def test_provider_policies_are_walked_in_declaration_order_across_providers():
    raw = {"providers": {
        "anthropic": [{"model_regex": "^claude", "base_key_env": "A_KEY"}],
        "openai": [{"base_key_env": "O_KEY"}],
    }}
    claude = resolve(raw, "claude-sonnet-4-5")
    assert claude.base_key_env == "A_KEY" and claude.provider.name == "anthropic"
    assert claude.matched.name == "anthropic"
    gpt = resolve(raw, "gpt-4o")
    assert gpt.base_key_env == "O_KEY" and gpt.provider.name == "openai"

    flipped = {"providers": {"openai": [{"base_key_env": "O_KEY"}],
                             "anthropic": [{"model_regex": "^claude", "base_key_env": "A_KEY"}]}}
    assert resolve(flipped, "claude-sonnet-4-5").base_key_env == "O_KEY"


def test_no_provider_policy_matches_leaves_the_global_fields():
    raw = {"base_key_env": "GLOBAL_KEY", "max_tokens": 50,
           "providers": {"anthropic": [{"model_regex": "^claude", "base_key_env": "A_KEY"}]}}
    resolved = resolve(raw, "gpt-4o")
    assert resolved.matched is None
    assert resolved.base_key_env == "GLOBAL_KEY" and resolved.max_tokens == 50


def test_provider_policy_matches_on_model_or_model_regex():
    """SPEC §4.2: a provider policy wins when its `model` equals M *or* its `model_regex` matches M."""
    raw = {"providers": {"openai": [
        {"model": "gpt-4o", "model_regex": "^gpt-4o-", "base_key_env": "BOTH_KEY"},
        {"base_key_env": "CATCH_ALL_KEY"},
    ]}}
    assert resolve(raw, "gpt-4o").base_key_env == "BOTH_KEY"
    assert resolve(raw, "gpt-4o-mini").base_key_env == "BOTH_KEY"
    assert resolve(raw, "o3").base_key_env == "CATCH_ALL_KEY"


# --- resolution: merge rules --------------------------------------------------------------------

MERGE = {
    "base_key_env": "GLOBAL_KEY",
    "upstream_url": "https://global.example",
    "max_tokens": 1000,
    "timeout": 10,
    "prompts": [{"role": "system", "content": "global prompt"}],
    "rules": ["global-rule-1", "global-rule-2"],
    "retry": {"max_retries": 3},
    "metadata": {"team": "core"},
    "providers": {
        "anthropic": [{"model_regex": "^claude", "base_key_env": "CLAUDE_KEY",
                       "upstream_url": "https://claude-gateway.example", "max_tokens": 200, "timeout": "90s",
                       "prompts": [{"role": "system", "content": "provider prompt"}],
                       "rules": ["provider-rule"]}],
        "openai": [{"model": "gpt-4o"}],  # sets nothing but the model: the global fields stay
    },
}


def test_provider_fields_replace_the_global_ones():
    resolved = resolve(MERGE, "claude-sonnet-4-5")
    assert resolved.base_key_env == "CLAUDE_KEY"
    assert resolved.upstream_url == "https://claude-gateway.example"
    assert resolved.max_tokens == 200
    assert resolved.timeout == 90.0


def test_unset_provider_fields_keep_the_global_ones():
    resolved = resolve(MERGE, "gpt-4o")
    assert resolved.matched is not None and resolved.matched.name == "openai"
    assert resolved.base_key_env == "GLOBAL_KEY"
    assert resolved.max_tokens == 1000
    assert resolved.timeout == 10.0
    assert [p.content for p in resolved.prompts] == ["global prompt"]
    assert len(resolved.rules) == 2


def test_provider_prompts_come_before_global_prompts():
    resolved = resolve(MERGE, "claude-sonnet-4-5")
    assert [p.content for p in resolved.prompts] == ["provider prompt", "global prompt"]


def test_provider_rules_come_after_global_rules():
    policy = parse(MERGE)
    resolved = resolve_policy(policy, "claude-sonnet-4-5", CATALOG, CONFIG)
    anthropic = next(p for p in policy.providers if p.name == "anthropic")
    assert len(resolved.rules) == 3
    assert tuple(resolved.rules) == tuple(policy.rules) + tuple(anthropic.rules)


def test_global_only_parts_stay_global():
    resolved = resolve(MERGE, "claude-sonnet-4-5")
    assert resolved.policy.retry.max_retries == 3
    assert resolved.policy.metadata == {"team": "core"}


def test_defaults_when_nothing_is_set():
    resolved = resolve({}, "gpt-4o")
    assert resolved.timeout == tokenomics.util.DEFAULT_UPSTREAM_TIMEOUT == 30.0
    assert resolved.max_tokens is None
    assert resolved.prompts == () and resolved.rules == ()
    assert resolved.provider.name == "openai"
    assert resolved.base_key_env == "OPENAI_API_KEY"


def test_key_env_defaults_to_the_matched_providers_catalog_entry():
    resolved = resolve({"providers": {"anthropic": [{"model_regex": "^claude"}]}}, "claude-opus-4-1")
    assert resolved.base_key_env == "ANTHROPIC_API_KEY"
    assert resolved.provider.dialect == "anthropic"


# --- resolution: model restrictions -------------------------------------------------------------

def test_global_model_refuses_other_models_with_403():
    with pytest.raises(ProxyError) as exc:
        resolve({"model": "gpt-4o"}, "gpt-4o-mini")
    assert exc.value.status == 403 and exc.value.code == "model_not_allowed"
    assert "gpt-4o-mini" in exc.value.message
    assert resolve({"model": "gpt-4o"}, "gpt-4o").model == "gpt-4o"


def test_global_model_regex_refuses_non_matching_models():
    raw = {"model_regex": "^gpt-4o"}
    assert resolve(raw, "gpt-4o-mini").model == "gpt-4o-mini"
    with pytest.raises(ProxyError) as exc:
        resolve(raw, "claude-sonnet-4-5")
    assert exc.value.status == 403 and exc.value.code == "model_not_allowed"


def test_catch_all_provider_policy_does_not_lift_the_global_restriction():
    raw = {"model": "gpt-4o", "providers": {"openai": [{"max_tokens": 5}]}}
    assert resolve(raw, "gpt-4o").max_tokens == 5
    with pytest.raises(ProxyError) as exc:
        resolve(raw, "gpt-5")
    assert exc.value.status == 403 and exc.value.code == "model_not_allowed"


def test_no_matching_provider_policy_falls_back_to_the_global_restriction():
    raw = {"model_regex": "^gpt-", "providers": {"anthropic": [{"model_regex": "^claude"}]}}
    assert resolve(raw, "claude-sonnet-4-5").matched.name == "anthropic"
    assert resolve(raw, "gpt-4o").matched is None
    with pytest.raises(ProxyError) as exc:
        resolve(raw, "mistral-large-latest")
    assert exc.value.code == "model_not_allowed"


def test_matching_provider_policy_replaces_the_global_restriction():
    raw = {"model": "gpt-4o", "providers": {"anthropic": [{"model_regex": "^claude-sonnet"}]}}
    assert resolve(raw, "claude-sonnet-4-5").provider.name == "anthropic"
    with pytest.raises(ProxyError):
        resolve(raw, "claude-opus-4-1")


def test_unrestricted_policy_allows_any_model():
    for model in ("gpt-4o", "claude-opus-4-1", "some/custom-model:latest"):
        assert resolve({}, model).model == model


# --- upstream URL and provider selection (SPEC §8) ---------------------------------------------

SERVER = config_with(upstream_url="http://server-upstream.example")


def test_matched_provider_policy_upstream_url_wins():
    raw = {"upstream_url": "https://global.example",
           "providers": {"anthropic": [{"model_regex": "^claude", "upstream_url": "https://pp.example"}]}}
    assert resolve(raw, "claude-x", config=SERVER).upstream_url == "https://pp.example"


def test_matched_provider_catalog_entry_beats_global_upstream_url():
    raw = {"upstream_url": "https://global.example", "providers": {"anthropic": [{"model_regex": "^claude"}]}}
    assert resolve(raw, "claude-x", config=SERVER).upstream_url == "https://api.anthropic.com"


def test_matched_provider_without_catalog_url_uses_global_then_server_url():
    # azure_openai and generic have no URL of their own unless their *_ENDPOINT/*_BASE_URL is set
    raw = {"upstream_url": "https://global.example", "providers": {"generic": [{}]}}
    assert resolve(raw, "m", config=SERVER).upstream_url == "https://global.example"
    raw = {"providers": {"generic": [{}]}}
    assert resolve(raw, "m", config=SERVER).upstream_url == "http://server-upstream.example"


def test_matched_provider_catalog_url_from_its_base_url_env():
    catalog = tokenomics.providers.Catalog(environ={"AZURE_OPENAI_ENDPOINT": "https://myco.openai.azure.com"})
    raw = {"upstream_url": "https://global.example", "providers": {"azure_openai": [{}]}}
    resolved = resolve(raw, "gpt-4o", config=SERVER, catalog=catalog)
    assert resolved.upstream_url == "https://myco.openai.azure.com"
    assert resolved.provider.auth_scheme == "header" and resolved.provider.auth_header == "api-key"


def test_no_match_global_upstream_url_wins():
    raw = {"upstream_url": "https://global.example", "provider": "anthropic",
           "providers": {"anthropic": [{"model_regex": "^claude"}]}}
    resolved = resolve(raw, "gpt-4o", config=SERVER)
    assert resolved.upstream_url == "https://global.example"
    assert resolved.provider.name == "anthropic"  # connection details from the policy's provider


def test_no_match_policy_provider_catalog_entry_is_next():
    resolved = resolve({"provider": "mistral"}, "mistral-large-latest", config=SERVER)
    assert resolved.upstream_url == "https://api.mistral.ai/v1"
    assert resolved.provider.name == "mistral"


def test_no_match_policy_provider_without_url_falls_back_to_server_url():
    assert resolve({"provider": "generic"}, "m", config=SERVER).upstream_url == "http://server-upstream.example"


def test_provider_without_url_is_refused_not_sent_elsewhere():
    """A provider with no URL of its own (generic, azure_openai without their env var) must not
    fall through to another provider's host with its key: the request is refused with 502 and a
    message naming the variable to set."""
    import asyncio
    for raw in ({"provider": "generic"}, {"providers": {"generic": [{}]}}, {"provider": "azure_openai"}):
        route = resolve(raw, "m", config=CONFIG)
        assert route.upstream_url == "", raw
        forwarder = tokenomics.forward.Forwarder(tokenomics.http.client.UpstreamClient(), environ={})
        ex = tokenomics.records.exchange.Exchange("tkn_x", "/v1/chat/completions", 0.0)
        req = tokenomics.http.server.Request("POST", "/v1/chat/completions", "", [], {}, b"{}")
        with pytest.raises(tokenomics.errors.ProxyError) as info:
            asyncio.run(forwarder.send(req, route.provider, route.upstream_url, route.base_key_env, b"{}", 5, ex,
                                       tokenomics.dialects.CHAT, {}))
        assert (info.value.status, info.value.code) == (502, "upstream_unreachable")
        assert route.provider.base_url_env in info.value.message


def test_no_match_nothing_set_uses_server_upstream_url():
    assert resolve({}, "gpt-4o", config=SERVER).upstream_url == "http://server-upstream.example"
    assert resolve({}, "gpt-4o", config=CONFIG).upstream_url == "https://api.openai.com"


def test_provider_selection_falls_back_to_default_provider_then_openai():
    default_anthropic = dataclasses.replace(SERVER, default_provider="anthropic")
    resolved = resolve({}, "claude-sonnet-4-5", config=default_anthropic)
    assert resolved.provider.name == "anthropic" and resolved.provider.dialect == "anthropic"
    assert resolve({}, "gpt-4o", config=SERVER).provider.name == "openai"
    # the policy's provider beats default_provider
    assert resolve({"provider": "groq"}, "llama", config=default_anthropic).provider.name == "groq"


def test_select_upstream_directly():
    policy = parse({"upstream_url": "https://global.example",
                    "providers": {"anthropic": [{"model_regex": "^claude"}]}})
    provider, url = select_upstream(policy, policy.providers[0], CATALOG, SERVER, "openai")
    assert (provider.name, url) == ("anthropic", "https://api.anthropic.com")
    provider, url = select_upstream(policy, None, CATALOG, SERVER, "openai")
    assert (provider.name, url) == ("openai", "https://global.example")
    bare = parse({})
    provider, url = select_upstream(bare, None, CATALOG, SERVER, "openai")
    assert (provider.name, url) == ("openai", "http://server-upstream.example")


# --- joining the upstream URL -------------------------------------------------------------------

@pytest.mark.parametrize("base, provider, path, query, expected", [
    ("https://api.openai.com", "openai", "/v1/chat/completions", "",
     "https://api.openai.com/v1/chat/completions"),
    ("https://api.openai.com/", "openai", "/v1/models", "", "https://api.openai.com/v1/models"),
    ("http://127.0.0.1:9999", "openai", "/v1/embeddings", "", "http://127.0.0.1:9999/v1/embeddings"),
    # a base that ends in /v1 (or another API root) replaces the client's leading /v1
    ("https://api.groq.com/openai/v1", "groq", "/v1/chat/completions", "",
     "https://api.groq.com/openai/v1/chat/completions"),
    ("https://api.mistral.ai/v1/", "mistral", "/v1/models", "", "https://api.mistral.ai/v1/models"),
    ("https://generativelanguage.googleapis.com/v1beta/openai", "google_gemini", "/v1/chat/completions", "",
     "https://generativelanguage.googleapis.com/v1beta/openai/chat/completions"),
    # chat_path replaces the chat endpoint only
    ("https://api.perplexity.ai", "perplexity", "/v1/chat/completions", "",
     "https://api.perplexity.ai/chat/completions"),
    ("https://api.anthropic.com", "anthropic", "/v1/messages", "", "https://api.anthropic.com/v1/messages"),
    ("https://api.anthropic.com", "anthropic", "/v1/messages/count_tokens", "",
     "https://api.anthropic.com/v1/messages/count_tokens"),
    # queries from the base and the client are merged
    ("https://myco.openai.azure.com/openai/v1?api-version=preview", "azure_openai", "/v1/chat/completions",
     "foo=1", "https://myco.openai.azure.com/openai/v1/chat/completions?api-version=preview&foo=1"),
    ("https://api.openai.com", "openai", "/v1/models", "limit=5", "https://api.openai.com/v1/models?limit=5"),
    ("https://x.example/v1?a=1", "openai", "/v1/models", "", "https://x.example/v1/models?a=1"),
])
def test_upstream_url_for(base, provider, path, query, expected):
    assert CATALOG.get(provider).endpoint(base, path, query) == expected
