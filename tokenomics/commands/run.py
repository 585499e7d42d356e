"""`tokenomics run` and `init`: point a command or a shell at a proxy with a wrapper token, and
the client variables both of them export."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from typing import TYPE_CHECKING

from ..errors import RuntimeFailure, TokenomicsError, UsageError
from . import PROVIDER_ALIASES, err, http_get, load, out, serve_overrides
from .serve import proxy_alive, read_pid

if TYPE_CHECKING:
    from ..config import Config
    from ..providers import Catalog
    from ..store import TokenRecord, TokenStore


def ca_bundle(config: Config) -> tuple[str, str]:
    """(our CA alone, the system trust store plus our CA): Node adds the first to its store;
    Python and OpenSSL replace theirs with SSL_CERT_FILE, so they get the second."""
    import ssl

    from ..tls import cert_dir, ensure_local_ca
    from ..util import write_private
    ca_file, _, _ = ensure_local_ca(config)
    bundle = os.path.join(cert_dir(config), "bundle.pem")
    paths = ssl.get_default_verify_paths()
    system = b""
    for candidate in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and os.path.isfile(candidate):
            with open(candidate, "rb") as fh:
                system = fh.read()
            break
    with open(ca_file, "rb") as fh:
        ours = fh.read()
    write_private(bundle, system.rstrip(b"\n") + b"\n" + ours)
    os.chmod(bundle, 0o644)
    return ca_file, bundle


_PROVIDER_ENV = {
    # Gemini's OpenAI-compatible endpoint is what the proxy serves (through OPENAI_BASE_URL);
    # native Gemini clients get the token as their key and so cannot bypass the proxy with it.
    "google_gemini": lambda url, token: {"GEMINI_API_KEY": token, "GOOGLE_API_KEY": token},
    "azure_openai": lambda url, token: {"AZURE_OPENAI_API_KEY": token, "AZURE_OPENAI_ENDPOINT": url,
                                        "AZURE_API_KEY": token, "AZURE_API_BASE": url},
}


def client_env(url: str, token: str, provider: str | None = None, ca: tuple[str, str] | None = None,
               insecure: bool = False) -> dict:
    """The variables the official SDKs and common agents read, pointed at the proxy."""
    url = url.rstrip("/")
    # Both Anthropic variables carry the token: clients read one or the other. The anthropic
    # Python SDK logs once that both are set whenever both are non-empty (no switch turns that
    # off); emptying either would break the clients that read only that one.
    env = {"OPENAI_API_KEY": token, "OPENAI_BASE_URL": url + "/v1", "OPENAI_API_BASE": url + "/v1",
           "ANTHROPIC_API_KEY": token, "ANTHROPIC_AUTH_TOKEN": token, "ANTHROPIC_BASE_URL": url}
    provider = PROVIDER_ALIASES.get(provider or "", provider)
    for name, extra in _PROVIDER_ENV.items():
        if provider in (name, "all"):
            env.update(extra(url, token))
    if ca is not None:
        env.update({"NODE_EXTRA_CA_CERTS": ca[0], "SSL_CERT_FILE": ca[1], "REQUESTS_CA_BUNDLE": ca[1]})
    if insecure:
        env["NODE_TLS_REJECT_UNAUTHORIZED"] = "0"
    return env


def _mask(token: str) -> str:
    return token[:8] + "…" if len(token) > 8 else "…"


def _check_token(store: TokenStore | None, token: str, proxy_url: str | None) -> None:
    from ..util import TOKEN_PREFIX, utc_iso
    if not token.startswith(TOKEN_PREFIX):
        raise UsageError("--token: expected a tkn_ wrapper token")
    if proxy_url:
        status, _ = http_get(proxy_url.rstrip("/") + "/v1/models", token)
        if status == 0:
            raise RuntimeFailure(f"--proxy-url: {proxy_url} is not reachable")
        if status == 401:
            raise UsageError("--token: the proxy does not accept this token (unknown, deleted or expired)")
        return
    record = store.lookup(token)
    if record is None:
        raise UsageError("--token: no token in this data dir matches; create one with `tokenomics token create`")
    if record.expired(time.time()):
        raise UsageError(f"--token: the token expired at {utc_iso(record.expires_at)}")


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _missing_provider_keys(record: TokenRecord, catalog: Catalog, config: Config, environ=None) -> list[tuple]:
    """(variable, provider) for each key the token's policy will need that is not set: every
    provider policy's, and the global route's when the policy names a provider or a key
    (otherwise the client's model picks the provider, which cannot be known up front)."""
    from ..policy import select_upstream
    environ = os.environ if environ is None else environ
    policy, missing = record.policy, []
    routes = list(policy.providers)
    if policy.provider or policy.base_key_env or config.default_provider:
        routes.insert(0, None)
    for matched in routes:
        try:
            provider, _ = select_upstream(policy, matched, catalog, config, "openai")
        except TokenomicsError:
            continue  # an unknown provider name is the policy validator's to report
        if provider.name == "mock":
            continue
        key_env = (matched.base_key_env if matched is not None else "") or policy.base_key_env or provider.api_key_env
        if key_env and not environ.get(key_env) and (key_env, provider.name) not in missing:
            missing.append((key_env, provider.name))
    return missing


def _token_usage(url: str, token_hash: str | None) -> dict | None:
    """This token's row of a running proxy's /stats, zeros when it has none yet, None when the
    proxy or the token's hash cannot be read."""
    from ..util import HASH_PREFIX
    if token_hash is None:
        return None
    status, body = http_get(url.rstrip("/") + "/stats")
    if status != 200:
        return None
    try:
        row = json.loads(body).get("by_token", {}).get(token_hash[:HASH_PREFIX], {})
    except (ValueError, AttributeError):
        return None
    return {k: row.get(k, 0) for k in ("requests", "input_tokens", "output_tokens", "cost_usd", "errors")}


def _usage_line(before: dict | None, after: dict | None, url: str) -> str:
    from ..util import usd_text
    if before is None or after is None:
        return f"tokenomics: usage of this token is not visible from here (see `tokenomics ledger` where {url} runs)"
    d = {k: after[k] - before[k] for k in after}
    return (f"tokenomics: {d['requests']} requests, {d['input_tokens']:,} tokens in / {d['output_tokens']:,} out, "
            f"${usd_text(d['cost_usd'])}, {d['errors']} errors (via {url})")


def cmd_run(args) -> int:
    import signal
    import subprocess

    from ..providers import Catalog
    from ..proxy import BackgroundProxy, Proxy, check_available
    from ..store import TokenStore, hash_token
    command = list(args.cmd or [])
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("run: give the command to wrap after --, e.g. tokenomics run -- claude")
    token = args.token or os.environ.get("TOKENOMICS_KEY", "")
    if not token:
        raise UsageError("--token: no token given; pass --token tkn_... or set TOKENOMICS_KEY")
    config = load(args, serve_overrides(args))
    check_available(config)
    if args.admin and not config.admin.enabled:
        raise UsageError("--admin: the config sets admin.enabled: false; set it to true (or drop --admin)")
    provider = args.provider or config.cli_maps.get(os.path.basename(command[0]))
    background = None
    with contextlib.suppress(RuntimeFailure):
        daemon = read_pid(config)
        if not args.proxy_url and not args.tls and proxy_alive(daemon) and daemon.get("url"):
            err(f"tokenomics: using the proxy already running for this data dir at {daemon['url']}")
            args.proxy_url = daemon["url"]
    token_hash = before = None
    if args.proxy_url:
        _check_token(None, token, args.proxy_url)
        url, ca = args.proxy_url, None
        with contextlib.suppress(TokenomicsError):  # knowing the hash needs this data dir's store and key
            store = TokenStore(config, Catalog(config)) if os.path.isfile(os.path.join(config.dir, "tokens.json")) \
                else None
            if store is not None and store.lookup(token) is not None:
                token_hash = hash_token(store.hash_key, token)
        before = _token_usage(url, token_hash)
    else:
        catalog = Catalog(config)
        store = TokenStore(config, catalog)
        _check_token(store, token, None)
        missing = _missing_provider_keys(store.lookup(token), catalog, config)
        if missing:
            names = ", ".join(f"{env} (provider {name})" for env, name in missing)
            raise RuntimeFailure(f"run: this token's policy needs the provider key variable {names}, which this "
                                 "shell does not set; export it (the proxy holds it, the command never sees it) "
                                 "and run again")
        proxy = Proxy(config, admin=args.admin)
        background = BackgroundProxy(proxy)
        url = background.start(tls=args.tls)[0]
        if args.admin:
            err(f"tokenomics admin UI: {url}/admin")
        ca = ca_bundle(config) if args.tls else None
    env = client_env(url, token, provider, ca)
    if args.print_env:
        for key, value in env.items():
            err(f"export {key}={_mask(value) if value == token else value}")
    child_env = {**_scrubbed_environ(config), **env}
    try:
        child = subprocess.Popen(command, env=child_env)
    except OSError as exc:
        if background is not None:
            background.stop()
        raise RuntimeFailure(f"run: cannot start {command[0]}: {exc.strerror or exc}") from None
    interactive = sys.stdin is not None and sys.stdin.isatty()

    def forward(signum, _frame):
        # From a terminal, Ctrl-C already reaches the child (same process group): do not double it.
        if signum != signal.SIGINT or not interactive:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        returncode = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if background is not None:
            background.stop()
            err(background.proxy.pipeline.records.totals.line())
        else:
            err(_usage_line(before, _token_usage(url, token_hash), url))
    return _exit_code(returncode)


def _scrubbed_environ(config: Config) -> dict:
    """The wrapped command's environment without the secrets the proxy holds for it: provider
    keys (catalog and every stored policy's base_key_env) and the store's hash/encryption keys."""
    from ..providers import Catalog
    from ..store import TokenStore
    secret = {config.security.hash_key_env, config.security.encryption_key_env}
    with contextlib.suppress(TokenomicsError):
        catalog = Catalog(config)
        secret |= {p.api_key_env for p in catalog.all() if p.api_key_env}
        stored = os.path.isfile(os.path.join(config.dir, "tokens.json"))
        for record in TokenStore(config, catalog).records() if stored else ():
            secret |= {pp.base_key_env for pp in (record.policy,) + record.policy.providers if pp.base_key_env}
    return {k: v for k, v in os.environ.items() if k not in secret}


def cmd_init(args) -> int:
    from ..tls import cert_dir
    from ..util import HAVE_TRUSTME, write_private
    config = load(args)
    token = args.token or os.environ.get("TOKENOMICS_KEY") or "tkn_REPLACE_ME"
    url = args.proxy_url or f"http://{config.server.host}:{config.server.http_port or 8080}"
    ca = None
    if url.startswith("https") and not args.insecure:
        if HAVE_TRUSTME or os.path.isfile(os.path.join(cert_dir(config), "ca.key")):
            ca = ca_bundle(config)  # creates the local CA the proxy will serve with, if needed
        else:
            err("init: no local CA (install the TLS extra); the CA variables are left out")
    env = client_env(url, token, args.provider, ca, insecure=args.insecure and url.startswith("https"))
    if args.output == "json":
        text = json.dumps(env, indent=2)
    elif args.output == "dotenv" or args.dotenv:
        text = "\n".join(f"{k}={_quote_env(v)}" for k, v in env.items())
    else:
        text = "\n".join(f"export {k}={_quote_env(v)}" for k, v in env.items())
    if args.dotenv:
        try:
            write_private(args.dotenv, (text + "\n").encode())
        except OSError as exc:
            raise RuntimeFailure(f"--dotenv: cannot write {args.dotenv}: {exc.strerror}; give a file path in "
                                 "a writable directory") from None
        err(f"wrote {len(env)} variables to {args.dotenv}")
    else:
        out(text)
    return 0


def _quote_env(value: str) -> str:
    return value if re.fullmatch(r"[A-Za-z0-9_./:@%+=,-]*", value) else "'" + value.replace("'", "'\\''") + "'"

