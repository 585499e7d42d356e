"""The provider catalog: where upstreams live, how they authenticate, which dialect they speak."""

import base64
import difflib
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Iterator

from .config import Config, _validate_provider_entry
from .errors import UsageError


class UnknownProvider(UsageError, KeyError):
    """A provider name the catalog does not know. A usage error where a person typed it; the
    pipeline maps it to its HTTP error (a policy or config naming a missing provider)."""

    def __init__(self, name: str, known: list[str]):
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        super().__init__(f"unknown provider '{name}'; {hint}known providers: {', '.join(known)}")
        self.name, self.known = name, known

    __str__ = Exception.__str__   # not KeyError's, which would quote the message


@dataclass(frozen=True, slots=True)
class Provider:
    """One catalog entry. `dialect` is the wire format the upstream speaks."""
    name: str
    upstream_url: str = ""
    api_key_env: str = ""
    base_url_env: str = ""
    auth_scheme: str = "bearer"        # bearer | header | query
    auth_header: str = ""              # header name (header scheme) or query parameter (query scheme)
    headers: dict = field(default_factory=dict)
    chat_path: str = ""
    dialect: str = "openai"            # openai | anthropic
    models: tuple = ()
    insecure: bool = False
    environ: Any = field(default=None, compare=False, repr=False)

    def url(self) -> str:
        """The upstream URL, overridden by the provider's base-URL env var when that is set."""
        env = self.environ if self.environ is not None else os.environ
        return (env.get(self.base_url_env) if self.base_url_env else "") or self.upstream_url

    def endpoint(self, base: str, path: str, query: str = "", model: str = "") -> str:
        """The upstream URL of a request path, following each wire format's convention: an
        OpenAI-style base includes the version (…/v1, …/v1beta/openai) and replaces the client's
        leading /v1; an Anthropic-style base is a prefix to the whole path. `chat_path` replaces
        the chat endpoint and may carry `{model}` and a query (classic Azure deployments); an Azure
        endpoint given with a path (…/openai/v1) is used as an OpenAI-style base instead."""
        parts = urllib.parse.urlsplit(base)
        prefix = parts.path.rstrip("/")
        anthropic = self.dialect == "anthropic"
        native_chat = "/v1/messages" if anthropic else "/v1/chat/completions"
        extra = ""
        if self.chat_path and path == native_chat and not (prefix and "{model}" in self.chat_path):
            chat_path, _, extra = self.chat_path.replace("{model}", urllib.parse.quote(model, safe="")).partition("?")
            target = prefix + chat_path
        elif prefix and path.startswith("/v1/") and not anthropic:
            target = prefix + path[3:]
        else:
            target = prefix + path
        query = "&".join(q for q in (parts.query, extra, query) if q)
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, target, query, ""))

    def credentials(self, key: str, query: str = "") -> tuple[list[tuple[str, str]], str]:
        """(headers, query) that carry `key` the way this provider authenticates: a bearer or
        named header, or a query parameter added to `query`. Used by forwarding and by
        `provider test`, so both present a key alike."""
        if not key:
            return [], query
        if self.auth_scheme == "bearer":
            return [("authorization", f"Bearer {key}")], query
        if self.auth_scheme == "header":
            return [(self.auth_header or "x-api-key", key)], query
        if self.auth_scheme == "query":
            return [], "&".join(q for q in (query, urllib.parse.urlencode({self.auth_header or "key": key})) if q)
        return [], query


_OPENAI_MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o3", "o3-mini",
                  "o4-mini", "gpt-5", "gpt-5-mini", "gpt-5-nano", "text-embedding-3-small",
                  "text-embedding-3-large")


_ANTHROPIC_MODELS = ("claude-opus-5", "claude-sonnet-5", "claude-opus-4-7", "claude-opus-4-6", "claude-sonnet-4-6",
                     "claude-opus-4-5", "claude-sonnet-4-5", "claude-haiku-4-5")


BUILTIN_PROVIDERS: dict[str, dict] = {
    "openai": dict(upstream_url="https://api.openai.com", api_key_env="OPENAI_API_KEY", models=_OPENAI_MODELS),
    "anthropic": dict(upstream_url="https://api.anthropic.com", api_key_env="ANTHROPIC_API_KEY",
                      auth_scheme="header", auth_header="x-api-key", dialect="anthropic",
                      headers={"anthropic-version": "2023-06-01"}, chat_path="/v1/messages",
                      models=_ANTHROPIC_MODELS),
    # Azure names deployments in the path; the model name is taken as the deployment name.
    "azure_openai": dict(api_key_env="AZURE_OPENAI_API_KEY", base_url_env="AZURE_OPENAI_ENDPOINT",
                         auth_scheme="header", auth_header="api-key",
                         chat_path="/openai/deployments/{model}/chat/completions?api-version=2024-10-21"),
    "google_gemini": dict(upstream_url="https://generativelanguage.googleapis.com/v1beta/openai",
                          api_key_env="GEMINI_API_KEY",
                          models=("gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.0-flash")),
    "mistral": dict(upstream_url="https://api.mistral.ai/v1", api_key_env="MISTRAL_API_KEY",
                    models=("mistral-large-latest", "mistral-small-latest", "codestral-latest")),
    "cohere": dict(upstream_url="https://api.cohere.ai/compatibility/v1", api_key_env="COHERE_API_KEY",
                   models=("command-r-plus", "command-r", "command-a-03-2025")),
    "groq": dict(upstream_url="https://api.groq.com/openai/v1", api_key_env="GROQ_API_KEY",
                 models=("llama-3.3-70b-versatile", "llama-3.1-8b-instant")),
    "together": dict(upstream_url="https://api.together.xyz/v1", api_key_env="TOGETHER_API_KEY"),
    "fireworks": dict(upstream_url="https://api.fireworks.ai/inference/v1", api_key_env="FIREWORKS_API_KEY"),
    "perplexity": dict(upstream_url="https://api.perplexity.ai", api_key_env="PERPLEXITY_API_KEY",
                       chat_path="/chat/completions", models=("sonar", "sonar-pro")),
    "deepseek": dict(upstream_url="https://api.deepseek.com/v1", api_key_env="DEEPSEEK_API_KEY",
                     models=("deepseek-chat", "deepseek-reasoner")),
    "xai": dict(upstream_url="https://api.x.ai/v1", api_key_env="XAI_API_KEY", models=("grok-4", "grok-3")),
    "openrouter": dict(upstream_url="https://openrouter.ai/api/v1", api_key_env="OPENROUTER_API_KEY"),
    "ollama": dict(upstream_url="http://127.0.0.1:11434/v1", base_url_env="OLLAMA_BASE_URL"),
    "vllm": dict(upstream_url="http://127.0.0.1:8000/v1", base_url_env="VLLM_BASE_URL"),
    "generic": dict(api_key_env="GENERIC_API_KEY", base_url_env="GENERIC_BASE_URL"),
    "mock": dict(upstream_url="mock://", models=("mock-1", "mock-mini")),
}


class Catalog:
    """Built-in providers, overridden and extended by providers.yaml and config `providers:`."""

    def __init__(self, config: Config | None = None, environ=None):
        self.environ = os.environ if environ is None else environ
        entries = {name: dict(spec) for name, spec in BUILTIN_PROVIDERS.items()}
        overlays = []
        if config is not None:
            side = os.path.join(os.path.dirname(config.source) if config.source else config.dir,
                                "providers.yaml")
            if os.path.isfile(side):
                import yaml  # only with a providers.yaml (see config.load_config)
                try:
                    with open(side, encoding="utf-8") as fh:
                        doc = yaml.safe_load(fh) or {}
                except yaml.YAMLError as exc:
                    raise UsageError(f"config: {side} is not valid YAML: {exc}") from None
                doc = doc.get("providers", doc) if isinstance(doc, dict) else doc
                if not isinstance(doc, dict):
                    raise UsageError(f"config: {side}: expected a mapping of provider name -> fields")
                for name, entry in doc.items():
                    _validate_provider_entry(name, entry, f"{side}: {name}")
                overlays.append(doc)
            overlays.append(config.providers)
        for overlay in overlays:
            for name, entry in overlay.items():
                entries[name] = {**entries.get(name, {}), **{k: v for k, v in entry.items() if v is not None}}
        if config is not None and config.default_provider and config.default_provider not in entries:
            raise UsageError(f"config: default_provider: unknown provider '{config.default_provider}'; known: "
                             f"{', '.join(sorted(entries))}")
        self._providers = {
            name: Provider(name=name, **{**spec, "models": tuple(spec.get("models", ())),
                                         "headers": dict(spec.get("headers", {}))}, environ=self.environ)
            for name, spec in entries.items()}

    def names(self) -> set:
        return set(self._providers)

    def get(self, name: str) -> Provider:
        try:
            return self._providers[name]
        except KeyError:
            raise UnknownProvider(name, sorted(self._providers)) from None

    def all(self) -> list[Provider]:
        return list(self._providers.values())


# Where the text is. Known part/block/item types are read field by field; any other is walked
# and every string leaf is a text, except the keys below, which carry structure, not content
# (ids, roles, types, opaque signatures). Base64 payloads are decoded when their media type
# says text, and skipped otherwise (an image or a PDF is not text a rule can read).
_STRUCTURAL_KEYS = frozenset((
    "type", "id", "role", "name", "tool_call_id", "tool_use_id", "call_id", "item_id", "file_id",
    "index", "status", "media_type", "mime_type", "format", "detail", "cache_control", "signature",
    "encrypted_content", "model", "object", "finish_reason", "stop_reason", "output_index",
    "content_index", "summary_index", "sequence_number"))


_TEXT_PART_TYPES = frozenset(("text", "input_text", "output_text"))


_TEXT_MEDIA_RE = re.compile(r"(?i)(?:text/[\w.+-]+|application/(?:json|xml|x-yaml|yaml|csv|x-ndjson"
                            r"|javascript|x-sh|sql|[\w.+-]*\+(?:json|xml)))(?:;.*)?")


_DATA_URL_RE = re.compile(r"data:([^,;]*)((?:;[^,;]*)*?);base64,", re.IGNORECASE)


class _DecodedSlot:
    """A base64 text payload (a data: URL, a base64 document source) as the text it encodes:
    rules read what the model reads, and a rewritten text is encoded back in place."""
    __slots__ = ("_holder", "_key", "_prefix", "_text")

    def __init__(self, holder: Any, key: Any, prefix: str, text: str) -> None:
        self._holder, self._key, self._prefix, self._text = holder, key, prefix, text

    def __getitem__(self, _key: Any) -> str:
        return self._text

    def __setitem__(self, _key: Any, text: str) -> None:
        self._text = text
        self._holder[self._key] = self._prefix + base64.b64encode(text.encode("utf-8")).decode("ascii")


def _decoded_slot(holder: Any, key: Any, prefix: str, payload: str) -> tuple[Any, Any] | None:
    try:
        text = base64.b64decode(payload, validate=False).decode("utf-8")
    except ValueError:                                         # binascii.Error, UnicodeDecodeError
        return None
    return (_DecodedSlot(holder, key, prefix, text), 0) if text else None


def _string_slot(holder: Any, key: Any) -> tuple[Any, Any] | None:
    """The slot of one string leaf: itself, its decoded text, or None for a binary payload."""
    value = holder[key]
    if value.startswith(("data:", "DATA:")):
        m = _DATA_URL_RE.match(value)
        if m:
            if not _TEXT_MEDIA_RE.fullmatch(m.group(1)):
                return None
            return _decoded_slot(holder, key, value[:m.end()], value[m.end():])
    return holder, key


def _walk_slots(value: Any, skip: frozenset = _STRUCTURAL_KEYS) -> Iterator[tuple[Any, Any]]:
    """Every string leaf of a JSON value in document order (keys in `skip` left out).
    Iterative, so nesting depth costs memory, not the interpreter's stack."""
    stack: list = [(None, None, value)]
    while stack:
        holder, key, node = stack.pop()
        if isinstance(node, str):
            if node:
                slot = _string_slot(holder, key)
                if slot:
                    yield slot
            continue
        children: list = []
        if isinstance(node, dict):
            # base64 sources, input_audio {"data", "format"}, output audio {"data", "transcript"}
            binary_source = "data" in node and (node.get("type") == "base64" or "format" in node
                                                or "transcript" in node)
            if binary_source and isinstance(node.get("data"), str):
                media = node.get("media_type") or node.get("mime_type") or ""
                if isinstance(media, str) and _TEXT_MEDIA_RE.fullmatch(media):
                    slot = _decoded_slot(node, "data", "", node["data"])
                    if slot:
                        yield slot
            children = [(node, k, v) for k, v in node.items()
                        if k not in skip and not (binary_source and k == "data")]
        elif isinstance(node, list):
            children = [(node, i, v) for i, v in enumerate(node)]
        stack.extend(c for c in reversed(children) if isinstance(c[2], (str, dict, list)))


def _field_groups(holder: dict, key: Any) -> Iterator[list]:
    """One group per text found in holder[key] (a string, or any JSON value walked)."""
    value = holder.get(key) if isinstance(holder, dict) else None
    if isinstance(value, str):
        slot = _string_slot(holder, key) if value else None
        if slot:
            yield [slot]
    elif isinstance(value, (dict, list)):
        for slot in _walk_slots(value):
            yield [slot]


def _block_groups(part: dict) -> Iterator[list]:
    """The texts of one non-text part or block: tool results recursively, a tool call's input
    entirely (its keys are the tool's own, not structure), anything else walked."""
    kind = part.get("type")
    if kind == "tool_result":
        inner = part.get("content")
        if isinstance(inner, str):
            yield [(part, "content")]
        else:
            yield from _parts_groups(inner)
        for key in part:
            if key not in ("content", "tool_use_id", "type", "is_error", "cache_control"):
                yield from _field_groups(part, key)
    elif kind in ("tool_use", "server_tool_use") and isinstance(part.get("input"), (dict, list)):
        for slot in _walk_slots(part["input"], frozenset()):
            yield [slot]
    elif kind == "redacted_thinking":
        return                                  # encrypted by the provider: nothing readable
    else:
        for slot in _walk_slots(part):
            yield [slot]


def _parts_groups(content: Any) -> Iterator[list]:
    """Text slots of a list of typed parts/blocks, grouped: adjacent text parts form one group
    (scanned as one text, so a value split across them is still caught)."""
    if not isinstance(content, list):
        return
    run: list = []
    for i, part in enumerate(content):
        if isinstance(part, dict) and part.get("type") in _TEXT_PART_TYPES and isinstance(part.get("text"), str):
            run.append((part, "text"))
            continue
        if run:
            yield run
            run = []
        if isinstance(part, str):
            if part:
                yield [(content, i)]
        elif isinstance(part, dict):
            yield from _block_groups(part)
    if run:
        yield run


def _content_groups(holder: dict, key: str = "content") -> Iterator[list]:
    value = holder.get(key)
    if isinstance(value, str):
        yield [(holder, key)]
    else:
        yield from _parts_groups(value)
