"""Configuration: config.yaml discovery, .env loading, ``TOKENOMICS_*`` overrides, and validation
into typed sections (including webhooks and provider entries)."""

import dataclasses
import difflib
import math
import os
import typing
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Iterator

from .errors import UsageError
from .limits.prices import parse_pricing
from .util import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_WRITE_TIMEOUT, HEADER_TIMEOUT, _json_type, _type_name, check_memory_file_name, memory_file_path, parse_duration


GRACE_PERIOD = 10.0                     # seconds in-flight requests get on SIGTERM


@dataclass(frozen=True, slots=True)
class TLSConfig:
    enabled: bool = True
    auto_gen: bool = True
    cert_dir: str = ""
    cert_file: str = ""
    key_file: str = ""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    http_port: int = 8080
    https_port: int = 8443
    host: str = "127.0.0.1"
    upstream_url: str = ""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    max_connections: int = 0        # 0: derived from the file-descriptor limit (default_max_connections)
    write_timeout: float = DEFAULT_WRITE_TIMEOUT
    header_timeout: float = HEADER_TIMEOUT
    grace_period: float = GRACE_PERIOD
    workers: int = 1                # processes on one port (SPEC §12); more than 1 needs session.backend: redis
    tls: TLSConfig = TLSConfig()


@dataclass(frozen=True, slots=True)
class AdminAuth:
    username: str = ""
    password: str = ""


@dataclass(frozen=True, slots=True)
class AdminConfig:
    enabled: bool = True
    auth: AdminAuth = AdminAuth()


@dataclass(frozen=True, slots=True)
class RedisConfig:
    addr: str = "127.0.0.1:6379"
    password: str = ""
    db: int = 0
    prefix: str = "tokenomics:"


@dataclass(frozen=True, slots=True)
class SessionConfig:
    backend: str = "memory"
    redis: RedisConfig = RedisConfig()


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    hash_key_env: str = "TOKENOMICS_HASH_KEY"
    encryption_key_env: str = "TOKENOMICS_ENCRYPTION_KEY"


@dataclass(frozen=True, slots=True)
class LogFileConfig:
    enabled: bool = False
    path: str = ""


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"
    format: str = "json"
    disable_request: bool = True
    hide_token_hash: bool = False
    request_body: bool = False
    response_body: bool = False
    file: LogFileConfig = LogFileConfig()


@dataclass(frozen=True, slots=True)
class EventsConfig:
    webhooks: list = field(default_factory=list)   # of Webhook once load_config has validated them


@dataclass(frozen=True, slots=True)
class RemoteWebhookConfig:
    """Push notifications from the central token server (SPEC §12)."""
    enabled: bool = False
    path: str = "/v1/webhook"      # where this proxy accepts pushes
    secret: str = ""               # sent back by the server in X-Tokenomics-Secret
    signing_key: str = ""          # HMAC-SHA256 key of X-Tokenomics-Signature (required when enabled)
    auto_register: bool = False    # register callback_url with the server at start
    callback_url: str = ""         # this proxy's push URL as the server reaches it
    insecure: bool = False         # the server may push to a self-signed HTTPS callback


@dataclass(frozen=True, slots=True)
class RemoteConfig:
    """Token sync from a central `tokenomics remote` server (SPEC §12)."""
    url: str = ""
    api_key: str = ""
    api_key_env: str = ""
    sync: int = 60                 # seconds between pulls; 0: at start (and on push) only
    insecure: bool = False         # accept a self-signed HTTPS certificate from the server
    webhook: RemoteWebhookConfig = RemoteWebhookConfig()


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    enabled: bool = True
    memory: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GuardrailsConfig:
    stream_holdback: int = 128


@dataclass(frozen=True, slots=True)
class Config:
    """The validated configuration: defaults < config.yaml < TOKENOMICS_* env < CLI flags."""
    dir: str = ""
    server: ServerConfig = ServerConfig()
    admin: AdminConfig = AdminConfig()
    session: SessionConfig = SessionConfig()
    security: SecurityConfig = SecurityConfig()
    logging: LoggingConfig = LoggingConfig()
    events: EventsConfig = EventsConfig()
    remote: RemoteConfig = RemoteConfig()
    cli_maps: dict = field(default_factory=dict)
    default_provider: str = ""
    ledger: LedgerConfig = LedgerConfig()
    providers: dict = field(default_factory=dict)
    pricing: dict = field(default_factory=dict)
    guardrails: GuardrailsConfig = GuardrailsConfig()
    source: str = ""          # the config file that was read, "" when none


_CONFIG_CHOICES = {
    "session.backend": ("memory", "redis"),
    "logging.format": ("json", "text"),
    "logging.level": ("debug", "info", "warning", "error"),
}


def _coerce(value, tp, path: str):
    """Check one scalar or container against the dataclass field type; ints pass as floats."""
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (bool, str, dict, list) and isinstance(value, tp):
        return value
    if tp is str and value is None:
        return ""
    raise UsageError(f"config: {path}: expected {_type_name(tp)}, got {type(value).__name__}")


def _build_section(cls, data, path: str):
    """Build a config dataclass from a mapping, naming the first unknown key or wrong type."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise UsageError(f"config: {path or 'top level'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    values = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise UsageError(f"config: unknown key '{sub}'; known keys here: {', '.join(sorted(names))}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            values[key] = _build_section(tp, value, sub)
        else:
            values[key] = _coerce(value, tp, sub)
            if sub in _CONFIG_CHOICES and values[key] not in _CONFIG_CHOICES[sub]:
                raise UsageError(f"config: {sub}: must be one of {', '.join(_CONFIG_CHOICES[sub])}")
    return cls(**values)


def _config_leaves(cls, prefix: tuple = ()) -> Iterator[tuple[tuple, type]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _config_leaves(tp, prefix + (f.name,))
        else:
            yield prefix + (f.name,), tp


def _env_overrides(environ) -> dict:
    """TOKENOMICS_<SECTION>_<FIELD> for every scalar leaf, e.g. TOKENOMICS_SERVER_HTTP_PORT."""
    tree: dict = {}
    _refuse_unknown_overrides(environ)
    for path, tp in _config_leaves(Config):
        name = "TOKENOMICS_" + "_".join(path).upper()
        if name not in environ or tp in (dict, list):
            continue
        raw = environ[name]
        try:
            if tp is bool:
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError
                value = raw.lower() in ("1", "true", "yes", "on")
            else:
                value = tp(raw)
        except ValueError:
            raise UsageError(f"environment: {name}: expected {_type_name(tp)}") from None
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


# Variables named TOKENOMICS_* that are not config overrides (keys, data dir, debug, installer).
NON_CONFIG_ENV = frozenset({"TOKENOMICS_DIR", "TOKENOMICS_KEY", "TOKENOMICS_HASH_KEY", "TOKENOMICS_ENCRYPTION_KEY",
                            "TOKENOMICS_DEBUG", "TOKENOMICS_REMOTE_KEY", "TOKENOMICS_PYZ_URL"})


def _refuse_unknown_overrides(environ) -> None:
    """A TOKENOMICS_<SECTION>_<FIELD> naming no config leaf is a typo, not something to ignore."""
    leaves = {"TOKENOMICS_" + "_".join(path).upper() for path, _ in _config_leaves(Config)}
    sections = {f.name.upper() for f in dataclasses.fields(Config)}
    for name in sorted(environ):
        if not name.startswith("TOKENOMICS_") or name in leaves or name in NON_CONFIG_ENV:
            continue
        rest = name[len("TOKENOMICS_"):]
        if any(rest.startswith(sec + "_") for sec in sections):
            close = difflib.get_close_matches(name, sorted(leaves), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UsageError(f"environment: {name} is not a config override{hint} "
                             f"(unset it or use TOKENOMICS_<SECTION>_<FIELD> for a config key)")


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_dotenv(path: str, environ) -> None:
    """KEY=VALUE lines into the environment without overriding what is already set."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError):  # missing, a directory, unreadable, under a file: no .env
        return
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        key, value = key.strip(), value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if key and key not in environ:
            environ[key] = value


def default_data_dir(environ) -> str:
    return environ.get("TOKENOMICS_DIR") or os.path.join(os.path.expanduser("~"), ".tokenomics")


def _check_dir_arg(path: str, what: str = "--dir") -> None:
    """The data dir as given: not empty (which would silently mean ~/.tokenomics) and not a file."""
    if not path.strip():
        raise UsageError(f"{what}: the path is empty; give a directory, or leave it out to use "
                         "$TOKENOMICS_DIR or ~/.tokenomics")
    full = os.path.expanduser(path)
    if os.path.exists(full) and not os.path.isdir(full):
        raise UsageError(f"{what}: {path} is a file, not a directory; give a directory for the data "
                         "(it is created if missing)")


def _validate_server_limits(server: ServerConfig) -> None:
    """Ranges the type check cannot express; the message names the key and what it accepts."""
    if server.max_response_bytes < 1:
        raise UsageError(f"config: server.max_response_bytes: must be a positive number of bytes, "
                         f"got {server.max_response_bytes}")
    if server.max_connections < 0:
        raise UsageError(f"config: server.max_connections: must be 0 (derived from the file-descriptor "
                         f"limit) or a positive number, got {server.max_connections}")
    if not server.write_timeout > 0:
        raise UsageError(f"config: server.write_timeout: must be a positive number of seconds, "
                         f"got {server.write_timeout:g}")


def _go_config_keys(raw: dict) -> dict:
    """The Go project's config.yaml keys: map those this product has, name the replacement of the rest."""
    def refuse(key: str, instead: str):
        raise UsageError(f"config: {key} is a key of the Go project that this version does not have; {instead}")
    if "storage" in raw:
        refuse("storage", "the store lives in the data dir: set `dir:` (or --dir / TOKENOMICS_DIR) instead")
    logging_ = raw.get("logging")
    if isinstance(logging_, dict):
        if "proxy_log_file" in logging_:
            refuse("logging.proxy_log_file", "use logging.file.enabled: true with logging.file.path")
        if isinstance(logging_.get("file"), dict) and "level" in logging_["file"]:
            refuse("logging.file.level", "the log file uses logging.level; remove logging.file.level")
        if logging_.get("level") == "warn":
            raw = {**raw, "logging": {**logging_, "level": "warning"}}
    ledger = raw.get("ledger")
    if isinstance(ledger, dict):
        if "dir" in ledger:
            refuse("ledger.dir", "the ledger lives in the data dir: set `dir:` (or --dir / TOKENOMICS_DIR) instead")
        if "event_ledger" in ledger:
            refuse("ledger.event_ledger", "every event is in the ledger when ledger.enabled is true; "
                                          "use events.webhooks to deliver events elsewhere")
        if isinstance(ledger.get("memory"), bool):
            refuse("ledger.memory", "it is a mapping here, not true/false: remove it, or give a mapping "
                                    "as described in the README's memory section")
    return raw


def load_config(config_path: str | None = None, data_dir: str | None = None,
                environ=None, overrides: dict | None = None) -> Config:
    """Find and validate the configuration. `overrides` are CLI flags as a nested mapping."""
    environ = os.environ if environ is None else environ
    if data_dir is not None:
        _check_dir_arg(data_dir)
    if config_path is not None and not config_path.strip():
        raise UsageError("--config: the path is empty; name the config file, or leave --config out to use "
                         "./config.yaml or {dir}/config.yaml")
    early_dir = data_dir or default_data_dir(environ)
    load_dotenv(os.path.join(os.getcwd(), ".env"), environ)
    load_dotenv(os.path.join(early_dir, ".env"), environ)
    candidates = [config_path] if config_path else ["config.yaml", os.path.join(early_dir, "config.yaml")]
    raw, source = {}, ""
    for candidate in candidates:
        if config_path and os.path.isdir(candidate):
            raise UsageError(f"--config: {config_path} is a directory; name the config file, e.g. "
                             f"--config {os.path.join(config_path, 'config.yaml')}")
        if candidate and os.path.isfile(candidate):
            import yaml  # only with a config file: a proxy without one starts without the parser
            try:
                with open(candidate, encoding="utf-8") as fh:
                    raw = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise UsageError(f"config: {candidate} is not valid YAML: {exc}") from None
            except UnicodeDecodeError:
                raise UsageError(f"config: {candidate} is not UTF-8 text; is it the config file?") from None
            except OSError as exc:
                raise UsageError(f"config: cannot read {candidate}: {exc.strerror}; check its permissions") from None
            source = candidate
            break
        if config_path:
            raise UsageError(f"--config: {config_path} does not exist; name an existing config.yaml")
    if not isinstance(raw, dict):
        raise UsageError(f"config: {source}: expected a mapping at the top level")
    raw = _go_config_keys(raw)
    merged = _deep_merge(_deep_merge(raw, _env_overrides(environ)), overrides or {})
    config = _build_section(Config, merged, "")
    resolved_dir = data_dir or config.dir or early_dir
    if not data_dir:
        _check_dir_arg(resolved_dir, "config: dir" if config.dir else
                       "TOKENOMICS_DIR" if environ.get("TOKENOMICS_DIR") else "data dir")
    config = dataclasses.replace(config, dir=os.path.abspath(os.path.expanduser(resolved_dir)),
                                 source=source)
    _validate_server_limits(config.server)
    for name, entry in config.providers.items():
        _validate_provider_entry(name, entry, f"providers.{name}")
    try:
        # Parsed once here; every reader takes the typed values (price tuples, Webhook records).
        config = dataclasses.replace(config, pricing=parse_pricing(config.pricing),
                                     events=EventsConfig(webhooks=validate_webhooks(config.events.webhooks)))
        validate_remote(config.remote)
        memory = config.ledger.memory
        if isinstance(memory, dict) and memory and not memory.get("redis"):  # SPEC §9: confined
            memory_file_path(memory, config.dir, "ledger.memory")
            if memory.get("file_name"):
                check_memory_file_name(str(memory["file_name"]), "ledger.memory")
    except UsageError as exc:
        raise UsageError(f"config: {exc}") from None
    return config


_PROVIDER_FIELDS = {"upstream_url": str, "api_key_env": str, "base_url_env": str, "auth_scheme": str,
                    "auth_header": str, "headers": dict, "chat_path": str, "dialect": str,
                    "models": list, "insecure": bool}


def _validate_provider_entry(name: str, entry, path: str) -> None:
    if not isinstance(entry, dict):
        raise UsageError(f"config: {path}: expected a mapping of provider fields")
    for key, value in entry.items():
        if key not in _PROVIDER_FIELDS:
            raise UsageError(f"config: unknown key '{path}.{key}'; known keys: {', '.join(_PROVIDER_FIELDS)}")
        tp = _PROVIDER_FIELDS[key]
        if value is not None and not isinstance(value, tp):
            raise UsageError(f"config: {path}.{key}: expected {_type_name(tp)}")
    if entry.get("auth_scheme", "bearer") not in ("bearer", "header", "query"):
        raise UsageError(f"config: {path}.auth_scheme: must be bearer, header or query")
    if entry.get("dialect", "openai") not in ("openai", "anthropic"):
        raise UsageError(f"config: {path}.dialect: must be openai or anthropic")


WEBHOOK_TIMEOUT = 5.0           # seconds per attempt unless the webhook sets `timeout`


EVENT_TYPES = (
    "token.created", "token.updated", "token.deleted", "token.expired",
    "rule.violation", "rule.warning", "rule.match", "rule.mask",
    "budget.exceeded", "budget.update",
    "rate.exceeded",
    "request.completed",
    "server.start",
)


_EVENT_FAMILIES = frozenset(t.split(".", 1)[0] for t in EVENT_TYPES)


@dataclass(frozen=True, slots=True)
class Webhook:
    """One validated `events.webhooks[]` entry."""
    url: str
    secret: str = ""
    signing_key: str = ""
    events: tuple = ()
    timeout: float = WEBHOOK_TIMEOUT
    insecure: bool = False


_WEBHOOK_KEYS = ("url", "secret", "signing_key", "events", "timeout", "insecure")


def _valid_event_filter(f: Any) -> bool:
    if not isinstance(f, str):
        return False
    if f == "*" or f in EVENT_TYPES:
        return True
    return f.endswith(".*") and f[:-2] in _EVENT_FAMILIES


def validate_webhooks(raw: Any, path: str = "events.webhooks") -> list[Webhook]:
    """Config `events.webhooks` -> Webhooks; UsageError naming the first bad field."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise UsageError(f"{path}: expected a list of webhooks, got {_json_type(raw)}")
    hooks = []
    for i, entry in enumerate(raw):
        where = f"{path}[{i}]"
        if isinstance(entry, Webhook):
            hooks.append(entry)
            continue
        if not isinstance(entry, dict):
            raise UsageError(f"{where}: expected a mapping with at least `url`, got {_json_type(entry)}")
        for key in entry:
            if key not in _WEBHOOK_KEYS:
                raise UsageError(f"{where}.{key}: unknown key (known: {', '.join(_WEBHOOK_KEYS)})")
        url = entry.get("url")
        parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"{where}.url: expected an http:// or https:// URL")
        try:
            parts.port
        except ValueError:
            raise UsageError(f"{where}.url: the port is not a number from 0 to 65535") from None
        for key in ("secret", "signing_key"):
            if not isinstance(entry.get(key, ""), str):
                raise UsageError(f"{where}.{key}: expected a string")
        events = entry.get("events", [])
        if isinstance(events, str):
            events = [events]
        if not isinstance(events, list):
            raise UsageError(f"{where}.events: expected a list of event names or patterns")
        for j, f in enumerate(events):
            if not _valid_event_filter(f):
                raise UsageError(f"{where}.events[{j}]: {f!r} is not an event name, `prefix.*` or "
                                 f"`*` (events: {', '.join(EVENT_TYPES)})")
        timeout = entry.get("timeout", WEBHOOK_TIMEOUT)
        if isinstance(timeout, str):
            try:
                timeout = parse_duration(timeout)
            except ValueError as exc:
                raise UsageError(f"{where}.timeout: {exc}") from None
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0 \
                or timeout == math.inf:
            raise UsageError(f"{where}.timeout: expected a positive number of seconds (e.g. 5 or 5s)")
        insecure = entry.get("insecure", False)
        if not isinstance(insecure, bool):
            raise UsageError(f"{where}.insecure: expected true or false")
        hooks.append(Webhook(url=url, secret=entry.get("secret", ""),
                             signing_key=entry.get("signing_key", ""), events=tuple(events),
                             timeout=float(timeout), insecure=insecure))
    return hooks


def _check_remote_url(value: str, where: str) -> None:
    parts = urllib.parse.urlsplit(value)
    try:
        parts.port
    except ValueError:
        raise UsageError(f"{where}: the port is not a number from 0 to 65535") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{where}: expected an http:// or https:// URL with a host, e.g. http://10.0.0.5:9090")
    if parts.username is not None or parts.password is not None:
        raise UsageError(f"{where}: credentials in the URL are refused (they would end up in logs); "
                         "remove the user:password@ part")
    if parts.query or parts.fragment:
        raise UsageError(f"{where}: remove the query string or fragment")


def validate_remote(remote: RemoteConfig) -> None:
    """The `remote:` section: every key set must be usable, nothing silently ignored."""
    hook = remote.webhook
    if not remote.url:
        stray = [k for k, v in (("api_key", remote.api_key), ("api_key_env", remote.api_key_env),
                                ("insecure", remote.insecure), ("webhook.enabled", hook.enabled),
                                ("webhook.auto_register", hook.auto_register)) if v]
        if stray:
            raise UsageError(f"remote.{stray[0]}: set remote.url (the central token server) too, or remove it")
        return
    _check_remote_url(remote.url, "remote.url")
    if remote.api_key and remote.api_key_env:
        raise UsageError("remote.api_key and remote.api_key_env are both set; keep one (api_key_env keeps the "
                         "key out of the config file)")
    if remote.sync < 0:
        raise UsageError(f"remote.sync: must be 0 (at start only) or a number of seconds, got {remote.sync}")
    if hook.enabled:
        if not hook.path.startswith("/") or len(hook.path) > 256 or any(c in hook.path for c in "?#% \\"):
            raise UsageError("remote.webhook.path: expected a plain path such as /v1/webhook")
        if hook.path in ("/health", "/ping", "/stats", "/metrics", "/") or hook.path.startswith("/admin"):
            raise UsageError(f"remote.webhook.path: {hook.path} is a path the proxy serves itself; choose "
                             "another, e.g. /v1/webhook")
        if not hook.signing_key:
            raise UsageError("remote.webhook.signing_key: required when remote.webhook.enabled is true (pushes "
                             "are verified with it); set a long random string, the same the server signs with")
    else:
        stray = [k for k, v in (("auto_register", hook.auto_register), ("secret", hook.secret),
                                ("signing_key", hook.signing_key), ("callback_url", hook.callback_url),
                                ("insecure", hook.insecure)) if v]
        if stray:
            raise UsageError(f"remote.webhook.{stray[0]}: only used when remote.webhook.enabled is true; "
                             "enable the webhook or remove it")
    if hook.auto_register:
        if not hook.callback_url:
            raise UsageError("remote.webhook.callback_url: required with auto_register; the URL the server "
                             "reaches this proxy's webhook at, e.g. http://10.0.0.7:8080/v1/webhook")
        _check_remote_url(hook.callback_url, "remote.webhook.callback_url")
    elif hook.callback_url:
        raise UsageError("remote.webhook.callback_url: only used with remote.webhook.auto_register: true; "
                         "set that or remove callback_url")
