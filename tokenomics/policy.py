"""The per-token policy: its schema (validated with JSON paths) and its resolution per model."""

import re
from typing import TYPE_CHECKING
from dataclasses import dataclass, field

from .config import Config
from .errors import ProxyError, UsageError
from .guard.anonymize import Anonymizer
from .guard.rules import Guard, _translate_go_regex, compile_rules, guard_plan
from .limits.decide import parse_budget, parse_rate_limit
from .util import DEFAULT_UPSTREAM_TIMEOUT, _type_name, check_memory_file_name, memory_file_path, non_canonical, parse_duration

if TYPE_CHECKING:  # names used in annotations only
    from .providers import Catalog, Provider


PROMPT_ROLES = ("system", "developer", "user", "assistant")


_MEMORY_FIELDS = {"enabled": bool, "file_path": str, "file_name": str, "redis": bool,
                  "max_size_mb": (int, float), "compress_old": bool}


_RETRY_FIELDS = ("max_retries", "fallbacks", "retry_on", "backoff")


@dataclass(frozen=True, slots=True)
class Prompt:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class ProviderPolicy:
    """One entry of a policy's `providers` map: overrides for the models it matches."""
    name: str
    base_key_env: str = ""
    upstream_url: str = ""
    max_tokens: int | None = None
    max_output_tokens: int | None = None
    model: str = ""
    model_regex: "re.Pattern | None" = None
    timeout: float | None = None
    prompts: tuple = ()
    rules: tuple = ()
    index: int = 0

    def matches(self, model: str) -> bool:
        """§4 step 2: `model` equals M, or `model_regex` matches M, or neither is set."""
        if not self.model and self.model_regex is None:
            return True
        return self.model == model or (self.model_regex is not None and self.model_regex.search(model) is not None)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = 0
    fallbacks: tuple = ()
    retry_on: tuple = (429, 500, 502, 503, 504)
    backoff: float = 0.5


@dataclass(frozen=True, slots=True)
class Policy(ProviderPolicy):
    """A token's whole policy: the global fields plus provider policies and global-only parts."""
    raw: dict = field(default_factory=dict)
    providers: tuple = ()            # ProviderPolicy, in declaration order across provider names
    provider: str = ""
    rate_rules: tuple = ()           # RateRule
    max_parallel: int | None = None
    retry: RetryPolicy = RetryPolicy()
    metadata: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    budget: tuple = ()               # (unit, period, cap)
    endpoints: tuple = ()            # passthrough paths this token may reach: exact, or "prefix/*"
    # (model, native provider) -> (catalog, config, provider URL, ResolvedPolicy): a token's
    # resolutions, kept as long as this version of its policy (see resolve_policy)
    resolved: dict = field(default_factory=dict, compare=False, repr=False)


def _fail(path: str, message: str):
    raise UsageError(f"policy: {path}: {message}")


def _check_type(value, tp, path: str, what: str):
    ok = isinstance(value, tp) and not (isinstance(value, bool) and tp in (int, (int, float)))
    if not ok:
        _fail(path, f"expected {what}, got {type(value).__name__}")
    return value


def _compile_go_regex(pattern: str, path: str) -> "re.Pattern":
    """A policy regex in Go (RE2) or Python syntax, compiled with Python `re`."""
    try:
        return re.compile(_translate_go_regex(pattern))
    except (re.error, ValueError) as exc:
        _fail(path, f"invalid regular expression ({exc})")


def _parse_timeout(value, path: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError as exc:
            _fail(path, str(exc))
    _fail(path, "expected seconds (a positive number) or a duration such as 30s or 2m")


def _parse_prompts(value, path: str) -> tuple:
    _check_type(value, list, path, "a list of {role, content} messages")
    prompts = []
    for i, item in enumerate(value):
        p = f"{path}[{i}]"
        _check_type(item, dict, p, "an object with role and content")
        for key in item:
            if key not in ("role", "content"):
                _fail(f"{p}.{key}", "unknown field; a prompt has role and content")
        role = item.get("role", "system")
        if role not in PROMPT_ROLES:
            _fail(f"{p}.role", f"must be one of {', '.join(PROMPT_ROLES)}")
        content = _check_type(item.get("content"), str, f"{p}.content", "a string")
        prompts.append(Prompt(role, content))
    return tuple(prompts)


def _parse_rules(value, path: str) -> tuple:
    return compile_rules(_check_type(value, list, path, "a list of rules"), path)


_PROVIDER_POLICY_FIELDS = ("base_key_env", "upstream_url", "max_tokens", "max_output_tokens", "model",
                           "model_regex", "timeout", "prompts", "rules")


def _parse_common(raw: dict, path: str) -> dict:
    """The fields a provider policy shares with the global policy."""
    out: dict = {}
    for key in ("base_key_env", "upstream_url", "model"):
        if key in raw:
            out[key] = _check_type(raw[key], str, f"{path}{key}", "a string")
    if out.get("upstream_url") and not re.match(r"^(https?|mock)://", out["upstream_url"]):
        _fail(f"{path}upstream_url", "must start with http://, https:// or mock://")
    for key in ("max_tokens", "max_output_tokens"):
        if raw.get(key) is not None:
            n = _check_type(raw[key], int, f"{path}{key}", "an integer")
            if n < (0 if key == "max_tokens" else 1):
                _fail(f"{path}{key}", "must be positive")
            out[key] = n
    if raw.get("model_regex"):
        out["model_regex"] = _compile_go_regex(
            _check_type(raw["model_regex"], str, f"{path}model_regex", "a string"), f"{path}model_regex")
    if raw.get("timeout") is not None:
        out["timeout"] = _parse_timeout(raw["timeout"], f"{path}timeout")
    if raw.get("prompts") is not None:
        out["prompts"] = _parse_prompts(raw["prompts"], f"{path}prompts")
    if raw.get("rules") is not None:
        out["rules"] = _parse_rules(raw["rules"], f"{path}rules")
    return out


def _parse_retry(raw, path: str) -> RetryPolicy:
    _check_type(raw, dict, path, "an object")
    for key in raw:
        if key not in _RETRY_FIELDS:
            _fail(f"{path}.{key}", f"unknown field; retry has {', '.join(_RETRY_FIELDS)}")
    out = {}
    if raw.get("max_retries") is not None:
        out["max_retries"] = _check_type(raw["max_retries"], int, f"{path}.max_retries", "an integer")
        if not 0 <= out["max_retries"] <= 10:
            _fail(f"{path}.max_retries", "must be between 0 and 10")
    if raw.get("fallbacks") is not None:
        _check_type(raw["fallbacks"], list, f"{path}.fallbacks", "a list of model names")
        for i, m in enumerate(raw["fallbacks"]):
            _check_type(m, str, f"{path}.fallbacks[{i}]", "a model name")
        out["fallbacks"] = tuple(raw["fallbacks"])
    if raw.get("retry_on") is not None:
        _check_type(raw["retry_on"], list, f"{path}.retry_on", "a list of HTTP status codes")
        for i, s in enumerate(raw["retry_on"]):
            if not isinstance(s, int) or isinstance(s, bool) or not 100 <= s <= 599:
                _fail(f"{path}.retry_on[{i}]", "expected an HTTP status code")
        out["retry_on"] = tuple(raw["retry_on"])
    if raw.get("backoff") is not None:
        out["backoff"] = _parse_timeout(raw["backoff"], f"{path}.backoff")
    return RetryPolicy(**out)


def _parse_memory(raw, path: str) -> dict:
    _check_type(raw, dict, path, "an object")
    for key, value in raw.items():
        if key not in _MEMORY_FIELDS:
            _fail(f"{path}.{key}", f"unknown field; memory has {', '.join(_MEMORY_FIELDS)}")
        tp = _MEMORY_FIELDS[key]
        _check_type(value, tp, f"{path}.{key}", "a number" if tp == (int, float) else _type_name(tp))
    if not raw.get("redis"):
        memory_file_path(raw, None, path)
        if raw.get("file_name"):
            check_memory_file_name(raw["file_name"], path)
    return dict(raw)


def _parse_metadata(raw, path: str) -> dict:
    _check_type(raw, dict, path, "an object of tags")
    for key, value in raw.items():
        if not isinstance(value, (str, int, float, bool)) and value is not None:
            _fail(f"{path}.{key}", "tag values must be strings, numbers or booleans")
    return dict(raw)


def _parse_endpoints(raw, path: str) -> tuple:
    """`endpoints`: the /v1 paths beyond the governed ones a token may reach (passed through).
    Each entry is an exact canonical path, or `prefix/*` for every path below prefix/."""
    _check_type(raw, list, path, 'a list of paths such as "/v1/files" or "/v1/files/*"')
    out = []
    for i, entry in enumerate(raw):
        p = f"{path}[{i}]"
        _check_type(entry, str, p, 'a path such as "/v1/files" or "/v1/files/*"')
        base = entry[:-2] if entry.endswith("/*") else entry
        if not base.startswith("/v1/") and base != "/v1":
            _fail(p, 'must be a path under /v1/, such as "/v1/files" or "/v1/files/*"')
        if "*" in base or "?" in base:
            _fail(p, 'a * may only end an entry, as in "/v1/files/*"; a query string is not part of a path')
        why = non_canonical(base) or ("has an empty segment (a trailing /)" if base.endswith("/") else "")
        if why:
            _fail(p, f"{why}; write the path in canonical form, as clients send it")
        out.append(entry)
    return tuple(out)


def endpoint_listed(endpoints: tuple, path: str) -> bool:
    """Whether a policy's `endpoints` reach `path`: equal to an entry, or below a `prefix/*` one."""
    for entry in endpoints:
        if entry.endswith("/*"):
            if path.startswith(entry[:-1]) and len(path) > len(entry) - 1:
                return True
        elif path == entry:
            return True
    return False


_POLICY_FIELDS = _PROVIDER_POLICY_FIELDS + ("providers", "provider", "default_provider", "rate_limit", "retry", "metadata",
                                            "memory", "budget", "endpoints")


def parse_policy(raw, path: str = "", catalog: "Catalog | None" = None, data_dir: str | None = None) -> Policy:
    """Validate a policy document and compile it. Errors name the JSON path of the bad field.
    With `data_dir`, the memory log's file_path is also checked against it (§9 confinement)."""
    try:
        policy = _parse_policy(raw, path, catalog)
        if data_dir is not None and policy.memory and not policy.memory.get("redis"):
            memory_file_path(policy.memory, data_dir)
        return policy
    except UsageError as exc:
        text = str(exc)
        raise UsageError(text if text.startswith("policy:") else f"policy: {text}") from None


# Provider names of the Go project, accepted as aliases of the catalog names.
PROVIDER_ALIASES = {"azure": "azure_openai", "gemini": "google_gemini"}


def provider_name(name):
    return PROVIDER_ALIASES.get(name, name) if isinstance(name, str) else name


def _parse_policy(raw, path: str, catalog: "Catalog | None") -> Policy:
    if not isinstance(raw, dict):
        raise UsageError("policy: expected a JSON object")
    for key in raw:
        if key not in _POLICY_FIELDS:
            _fail(key, f"unknown field; known fields: {', '.join(_POLICY_FIELDS)}")
    fields_ = _parse_common(raw, path)
    known = catalog.names() if catalog is not None else None
    if raw.get("provider") and raw.get("default_provider") and raw["provider"] != raw["default_provider"]:
        _fail("default_provider", "is an alias of provider; give one of them, not both with different values")
    chosen_key = "provider" if raw.get("provider") else "default_provider"
    if raw.get(chosen_key):
        chosen = provider_name(_check_type(raw[chosen_key], str, chosen_key, "a provider name"))
        if known is not None and chosen not in known:
            _fail(chosen_key, f"unknown provider '{raw[chosen_key]}'; known: {', '.join(sorted(known))}")
        fields_["provider"] = chosen
    providers = []
    if raw.get("providers") is not None:
        _check_type(raw["providers"], dict, "providers", "an object of provider name -> list of policies")
        for name, entries in raw["providers"].items():
            name = provider_name(name)
            if known is not None and name not in known:
                _fail(f"providers.{name}", f"unknown provider; known: {', '.join(sorted(known))}")
            if isinstance(entries, dict):  # one policy written without the list
                entries = [entries]
            _check_type(entries, list, f"providers.{name}", "a list of provider policies")
            for i, entry in enumerate(entries):
                p = f"providers.{name}[{i}]"
                _check_type(entry, dict, p, "an object")
                for key in entry:
                    if key not in _PROVIDER_POLICY_FIELDS:
                        _fail(f"{p}.{key}", f"unknown field; a provider policy has "
                                            f"{', '.join(_PROVIDER_POLICY_FIELDS)}")
                providers.append(ProviderPolicy(name=name, index=len(providers),
                                                **_parse_common(entry, p + ".")))
    if raw.get("rate_limit") is not None:
        fields_["rate_rules"], fields_["max_parallel"] = parse_rate_limit(raw["rate_limit"], "rate_limit")
    if raw.get("budget") is not None:
        fields_["budget"] = parse_budget(raw["budget"], "budget")
    if raw.get("retry") is not None:
        fields_["retry"] = _parse_retry(raw["retry"], "retry")
    if raw.get("metadata") is not None:
        fields_["metadata"] = _parse_metadata(raw["metadata"], "metadata")
    if raw.get("memory") is not None:
        fields_["memory"] = _parse_memory(raw["memory"], "memory")
    if raw.get("endpoints") is not None:
        fields_["endpoints"] = _parse_endpoints(raw["endpoints"], "endpoints")
    return Policy(name="", raw=raw, providers=tuple(providers), **fields_)


# Model families (§8): the provider a model name belongs to when nothing else names one.
MODEL_FAMILIES = (("gpt-", "openai"), ("chatgpt-", "openai"), ("o1", "openai"), ("o3", "openai"),
                  ("o4", "openai"), ("text-embedding-", "openai"), ("claude-", "anthropic"),
                  ("gemini-", "google_gemini"))


def model_family_provider(model: str, catalog: "Catalog") -> str:
    """The catalog provider listing `model`, else the one its name prefix belongs to, else ''."""
    if not model:
        return ""
    for prov in catalog.all():
        if model in prov.models:
            return prov.name
    names = catalog.names()
    return next((name for prefix, name in MODEL_FAMILIES if model.startswith(prefix) and name in names), "")


def select_upstream(policy: Policy, matched: ProviderPolicy | None, catalog: "Catalog", config: Config,
                    native_provider: str, model: str = "") -> tuple["Provider", str]:
    """§8 precedence for the provider (auth scheme, headers, dialect) and the upstream URL."""
    explicit = matched.name if matched is not None else (policy.provider or config.default_provider)
    try:
        provider = catalog.get(explicit or model_family_provider(model, catalog) or native_provider)
    except KeyError as exc:  # UnknownProvider: the policy or config names a provider the catalog lacks
        raise ProxyError(500, "invalid_request", f"{exc}; fix the token's policy or the config") from None
    if matched is not None:
        upstream = matched.upstream_url or provider.url() or policy.upstream_url or config.server.upstream_url
    elif policy.upstream_url:
        upstream = policy.upstream_url
    elif policy.provider:
        upstream = provider.url() or config.server.upstream_url
    else:
        upstream = config.server.upstream_url or provider.url() or "https://api.openai.com"
    return provider, upstream


@dataclass(frozen=True, slots=True)
class ResolvedPolicy:
    """What governs one request for one model: the merged fields and the provider to use."""
    model: str
    provider: "Provider"
    base_key_env: str
    upstream_url: str
    max_tokens: int | None
    max_output_tokens: int | None
    timeout: float
    prompts: tuple
    rules: tuple
    matched: ProviderPolicy | None
    policy: Policy
    plans: dict = field(default_factory=dict, compare=False, repr=False)   # direction -> GuardPlan

    def guard(self, direction: str, anonymizer: Anonymizer, matches: list) -> Guard:
        """A Guard of this route's rules for one request; the rules are sorted out once per route."""
        plan = self.plans.get(direction)
        if plan is None:
            plan = self.plans[direction] = guard_plan(self.rules, direction)
        return Guard(self.rules, direction, anonymizer, matches, plan=plan)


_RESOLVED_PER_POLICY = 32   # resolutions one policy keeps (clients name models; the set stays bounded)


def resolve_policy(policy: Policy, model: str, catalog: "Catalog", config: Config,
                   native_provider: str = "openai") -> ResolvedPolicy:
    """§4 resolution: the first matching provider policy is merged on top of the global fields.
    `native_provider` is the provider the endpoint's own dialect suggests when nothing else picks one.
    Kept in the policy, so a token resolves each model once per version of its policy; reused
    only for the same catalog and config while the provider's URL (its env var) is unchanged."""
    key = (model, native_provider)
    hit = policy.resolved.get(key)
    if hit is not None and hit[0] is catalog and hit[1] is config and hit[3].provider.url() == hit[2]:
        return hit[3]
    route = _resolve_policy(policy, model, catalog, config, native_provider)
    if len(policy.resolved) >= _RESOLVED_PER_POLICY:
        policy.resolved.clear()
    policy.resolved[key] = (catalog, config, route.provider.url(), route)
    return route


def _resolve_policy(policy: Policy, model: str, catalog: "Catalog", config: Config,
                    native_provider: str) -> ResolvedPolicy:
    matched = next((pp for pp in policy.providers if pp.matches(model)), None)
    # A provider policy that named M (or matched it by regex) allows it; a catch-all one, or
    # none, leaves the decision to the global model / model_regex.
    if (matched is None or (not matched.model and matched.model_regex is None)) and not policy.matches(model):
        raise ProxyError(403, "model_not_allowed",
                         f"model '{model}' is not allowed for this token; ask its owner to allow it "
                         "or use /v1/models to list the models you may use")
    provider, upstream = select_upstream(policy, matched, catalog, config, native_provider, model)
    pick = (lambda name: getattr(matched, name) or getattr(policy, name)) if matched else \
        (lambda name: getattr(policy, name))
    return ResolvedPolicy(
        model=model, provider=provider,
        base_key_env=pick("base_key_env") or provider.api_key_env,
        upstream_url=upstream,
        max_tokens=matched.max_tokens if matched is not None and matched.max_tokens is not None else policy.max_tokens,
        max_output_tokens=pick("max_output_tokens"),
        timeout=pick("timeout") or DEFAULT_UPSTREAM_TIMEOUT,
        prompts=(matched.prompts if matched else ()) + policy.prompts,
        rules=policy.rules + (matched.rules if matched else ()),
        matched=matched, policy=policy)
