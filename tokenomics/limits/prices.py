"""Prices per million tokens for common models, overridable in config, and cost arithmetic."""

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Iterator

from ..errors import UsageError
from ..limits.decide import _nonneg_number


# USD per million tokens: (input, cached input, output). Vendor list prices, standard tier,
# shortest context tier, as of 2026-11. Models released before 2025-12 from the vendors' pricing
# pages; later ones as listed by the models.dev registry (anomalyco/models.dev). Prices change:
# config `pricing:` overrides and extends this table. Where a vendor has no cached-input price,
# the input price is repeated. DeepSeek V4 bills peak hours at the rate shown (off-peak is half).
PRICES: dict[str, tuple[float, float, float]] = {
    # The built-in mock provider: nominal prices so the demo and offline tests show a cost.
    "mock-1": (1.00, 0.50, 2.00),
    "mock-mini": (0.10, 0.05, 0.20),
    # OpenAI
    "gpt-3.5-turbo": (0.50, 0.50, 1.50),
    "gpt-4": (30.00, 30.00, 60.00),
    "gpt-4-turbo": (10.00, 10.00, 30.00),
    "gpt-4o": (2.50, 1.25, 10.00),
    "gpt-4o-2024-05-13": (5.00, 5.00, 15.00),
    "gpt-4o-mini": (0.15, 0.075, 0.60),
    "gpt-4.1": (2.00, 0.50, 8.00),
    "gpt-4.1-mini": (0.40, 0.10, 1.60),
    "gpt-4.1-nano": (0.10, 0.025, 0.40),
    "gpt-5": (1.25, 0.125, 10.00),
    "gpt-5-mini": (0.25, 0.025, 2.00),
    "gpt-5-nano": (0.05, 0.005, 0.40),
    "gpt-5-pro": (15.00, 15.00, 120.00),
    "gpt-5.1": (1.25, 0.125, 10.00),
    "gpt-5.1-codex-mini": (0.25, 0.025, 2.00),
    "gpt-5.2": (1.75, 0.175, 14.00),
    "gpt-5.2-pro": (21.00, 21.00, 168.00),
    "gpt-5.3-codex": (1.75, 0.175, 14.00),
    "gpt-5.4": (2.50, 0.25, 15.00),
    "gpt-5.4-pro": (30.00, 30.00, 180.00),
    "gpt-5.5": (5.00, 0.50, 30.00),
    "gpt-5.5-pro": (30.00, 30.00, 180.00),
    "o1": (15.00, 7.50, 60.00),
    "o1-mini": (1.10, 0.55, 4.40),
    "o1-pro": (150.00, 150.00, 600.00),
    "o3": (2.00, 0.50, 8.00),
    "o3-mini": (1.10, 0.55, 4.40),
    "o3-pro": (20.00, 20.00, 80.00),
    "o4-mini": (1.10, 0.275, 4.40),
    "text-embedding-3-small": (0.02, 0.02, 0.0),
    "text-embedding-3-large": (0.13, 0.13, 0.0),
    "text-embedding-ada-002": (0.10, 0.10, 0.0),
    # Anthropic (cache writes are billed at 1.25x input, see _CACHE_WRITE_FACTOR)
    "claude-3-haiku": (0.25, 0.03, 1.25),
    "claude-3-sonnet": (3.00, 0.30, 15.00),
    "claude-3-opus": (15.00, 1.50, 75.00),
    "claude-3-5-haiku": (0.80, 0.08, 4.00),
    "claude-3-5-sonnet": (3.00, 0.30, 15.00),
    "claude-3-7-sonnet": (3.00, 0.30, 15.00),
    "claude-haiku-4-5": (1.00, 0.10, 5.00),
    "claude-sonnet-4": (3.00, 0.30, 15.00),
    "claude-sonnet-4-5": (3.00, 0.30, 15.00),
    "claude-sonnet-4-6": (3.00, 0.30, 15.00),
    "claude-sonnet-5": (2.00, 0.20, 10.00),
    "claude-sonnet-5-5": (2.00, 0.10, 10.00),
    "claude-opus-4": (15.00, 1.50, 75.00),
    "claude-opus-4-1": (15.00, 1.50, 75.00),
    "claude-opus-4-5": (5.00, 0.50, 25.00),
    "claude-opus-4-6": (5.00, 0.50, 25.00),
    "claude-opus-4-7": (5.00, 0.50, 25.00),
    "claude-opus-4-8": (5.00, 0.50, 25.00),
    "claude-opus-5": (5.00, 0.50, 25.00),
    "claude-opus-5-5": (4.00, 0.20, 20.00),
    # Google
    "gemini-1.5-flash-8b": (0.0375, 0.01, 0.15),
    "gemini-1.5-flash": (0.075, 0.01875, 0.30),
    "gemini-1.5-pro": (1.25, 0.3125, 5.00),
    "gemini-2.0-flash-lite": (0.075, 0.075, 0.30),
    "gemini-2.0-flash": (0.10, 0.025, 0.40),
    "gemini-2.5-flash-lite": (0.10, 0.01, 0.40),
    "gemini-2.5-flash": (0.30, 0.03, 2.50),
    "gemini-2.5-pro": (1.25, 0.125, 10.00),
    "gemini-3-flash": (0.50, 0.05, 3.00),
    "gemini-3-pro": (2.00, 0.20, 12.00),
    "gemini-3.1-flash-lite": (0.25, 0.025, 1.50),
    "gemini-3.1-pro": (2.00, 0.20, 12.00),
    "gemini-3.5-flash": (1.50, 0.15, 9.00),
    # Mistral ("-latest" aliases follow the newest release)
    "mistral-large-2411": (2.00, 2.00, 6.00),
    "mistral-large-2512": (0.50, 0.50, 1.50),
    "mistral-large-latest": (0.50, 0.50, 1.50),
    "mistral-medium-2505": (0.40, 0.40, 2.00),
    "mistral-medium-2508": (0.40, 0.40, 2.00),
    "mistral-medium-latest": (1.50, 1.50, 7.50),
    "mistral-small": (0.10, 0.10, 0.30),
    "codestral": (0.30, 0.30, 0.90),
    "ministral-8b": (0.10, 0.10, 0.10),
    "ministral-3b": (0.04, 0.04, 0.04),
    "open-mistral-nemo": (0.15, 0.15, 0.15),
    "pixtral-large": (2.00, 2.00, 6.00),
    # DeepSeek
    "deepseek-chat": (0.28, 0.028, 0.42),
    "deepseek-reasoner": (0.28, 0.028, 0.42),
    "deepseek-v4-pro": (1.32, 0.044, 3.96),
    "deepseek-v4-flash": (0.44, 0.014, 1.32),
    # Groq-hosted open models
    "llama-3.1-8b-instant": (0.05, 0.05, 0.08),
    "llama-3.3-70b-versatile": (0.59, 0.59, 0.79),
    "llama-4-scout-17b-16e-instruct": (0.11, 0.11, 0.34),
    "llama-4-maverick-17b-128e-instruct": (0.20, 0.20, 0.60),
    "gpt-oss-120b": (0.15, 0.075, 0.60),
    "gpt-oss-20b": (0.075, 0.0375, 0.30),
}


# Cache writes cost more than plain input on some vendors (Anthropic: 1.25x for the 5-minute
# cache); elsewhere cache creation is billed as input.
_CACHE_WRITE_FACTOR = (("claude", 1.25),)


# Suffixes that name a snapshot of a model rather than another model: dates, versions, aliases.
_MODEL_SUFFIX_RE = re.compile(
    r"-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4}|\d{3}|v\d+(?:\.\d+)*|latest"
    r"|preview(?:-\d{2}-\d{2,4})?|exp(?:-\d{2}-\d{2})?)$")


# Cloud catalogs prefix the vendor (Bedrock: `us.anthropic.claude-...`).
_VENDOR_PREFIX_RE = re.compile(
    r"^(?:[a-z]{2,6}\.)?(?:anthropic|meta|mistral|openai|deepseek|google|cohere|amazon)\.")


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one request as the provider reported them, normalised across dialects:
    `input_tokens` counts every input token, *including* cached and cache-creation ones
    (OpenAI's convention; an Anthropic adapter adds cache_read + cache_creation to its
    input_tokens), and `output_tokens` includes reasoning tokens."""
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_creation_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def charged_usage(reported: Usage, own_input: int, own_output: int, complete: bool) -> Usage:
    """What one answered request is charged (SPEC §7: what the upstream produced, whatever the
    client does). An answer that completed with usage is charged that usage. Otherwise (the
    client left, the stream broke, the provider reported nothing) each side is the larger of
    what the provider reported so far and the proxy's own count, so it is never 0."""
    if complete and reported.total_tokens:
        return reported
    return dataclasses.replace(reported, input_tokens=max(reported.input_tokens, own_input, 1),
                               output_tokens=max(reported.output_tokens, own_output, 0))


def _model_candidates(model: str) -> Iterator[str]:
    """Names to try for a price, most specific first: as given, without provider prefix, then
    with date/version suffixes stripped one at a time, then shorter `-` prefixes."""
    name = model.strip().lower()
    yield name
    name = name.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]
    name = _VENDOR_PREFIX_RE.sub("", name)
    yield name
    while (m := _MODEL_SUFFIX_RE.search(name)) is not None:
        name = name[:m.start()]
        yield name
    cut = name.rfind("-")
    while cut > 0:
        yield name[:cut]
        cut = name.rfind("-", 0, cut)


def _price_tuple(value: Any) -> tuple[float, float, float]:
    if isinstance(value, dict):
        inp = float(value.get("input", 0.0))
        return (inp, float(value.get("cached_input", inp)), float(value.get("output", 0.0)))
    inp, cached, out = value
    return (float(inp), float(cached), float(out))


def price_for(model: str, overrides: dict | None = None) -> tuple[float, float, float] | None:
    """USD per million tokens (input, cached input, output) for `model`, or None if unknown.
    Names are tried most specific first: exact, then without provider prefix and version
    suffixes, then the longest known prefix (`gpt-4o-mini-search-preview` -> `gpt-4o-mini`).
    At each step `overrides` (ideally parse_pricing output) win over the built-in table, so
    an override of `gpt-4o` reprices `gpt-4o-2024-08-06` but not `gpt-4o-mini`."""
    if not model:
        return None
    for name in _model_candidates(model):
        hit = overrides.get(name) if overrides else None
        if hit is None:
            hit = PRICES.get(name)
        if hit is not None:
            return _price_tuple(hit)
    return None


def cost_usd(model: str, usage: Usage, overrides: dict | None = None) -> float:
    """Dollar cost of `usage` on `model`: uncached input at the input rate, cached input at
    the cached rate, cache creation at the input rate (x1.25 on Anthropic), output at the
    output rate. A model with no known price costs 0.0 (the caller flags it once)."""
    price = price_for(model, overrides)
    if price is None:
        return 0.0
    inp, cached, out = price
    write = inp
    low = model.lower()
    for needle, factor in _CACHE_WRITE_FACTOR:
        if needle in low:
            write = inp * factor
            break
    cached_n = max(0, usage.cached_input_tokens)
    created_n = max(0, usage.cache_creation_tokens)
    plain = max(0, usage.input_tokens - cached_n - created_n)
    return (plain * inp + cached_n * cached + created_n * write + max(0, usage.output_tokens) * out) / 1e6


def parse_pricing(raw: dict | None, path: str = "pricing") -> dict[str, tuple[float, float, float]]:
    """Validate config `pricing:` (model -> {input, cached_input, output}, USD per million
    tokens) into the overrides price_for() expects; keys are lower-cased and lose any
    provider prefix so `openai/gpt-4o` and `gpt-4o` are one entry."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a mapping of model name to {{input, cached_input, output}}")
    out: dict[str, tuple[float, float, float]] = {}
    for model, spec in raw.items():
        where = f"{path}.{model}"
        if not isinstance(spec, dict):
            raise UsageError(f"{where}: expected {{input, cached_input, output}} in USD per million tokens")
        for k in spec:
            if k not in ("input", "cached_input", "output"):
                raise UsageError(f"{where}.{k}: unknown field (expected input, cached_input, output)")
        for k in ("input", "output"):
            if k not in spec:
                raise UsageError(f"{where}.{k}: missing (USD per million tokens)")
        vals = {k: _nonneg_number(v, f"{where}.{k}") for k, v in spec.items()}
        key = str(model).strip().lower().rsplit("/", 1)[-1]
        out[key] = (vals["input"], vals.get("cached_input", vals["input"]), vals["output"])
    return out
