"""`tokenomics doctor`: check the set-up (config, data dir, keys, TLS, Redis, a running proxy)
and say what to fix."""

import os

from ..errors import TokenomicsError, UsageError
from . import http_get, load, out, print_json
from .serve import proxy_alive, read_pid


def cmd_doctor(args) -> int:
    import ssl

    from ..limits.redis_state import probe as redis_probe, shown_addr
    from ..providers import Catalog
    from ..store import TokenStore, ensure_data_dir, hash_key_problem
    from ..tls import cert_dir
    from ..util import HAVE_TRUSTME, printable, write_private
    checks: list[dict] = []

    def check(name: str, status: str, detail: str) -> None:
        checks.append({"name": name, "status": status, "detail": detail})

    try:
        config = load(args)
        check("config", "ok", f"read {config.source}" if config.source else "no config file; using defaults")
    except UsageError as exc:
        check("data dir" if str(exc).startswith(("--dir", "TOKENOMICS_DIR", "data dir", "config: dir")) else "config",
              "fail", str(exc))
        config = None
    if config is not None:
        try:
            ensure_data_dir(config.dir)
            probe = os.path.join(config.dir, f".doctor-{os.getpid()}")
            write_private(probe, b"ok")
            os.unlink(probe)
            check("data dir", "ok", f"{config.dir} is writable")
        except OSError as exc:
            check("data dir", "fail", f"{config.dir} is not writable: {exc.strerror}; choose another with --dir")
        except TokenomicsError as exc:
            check("data dir", "fail", str(exc))
            config = None
    if config is not None:
        env_name = config.security.hash_key_env
        mismatch = hash_key_problem(config)
        if mismatch:
            check("hash key", "fail", mismatch)
        elif os.environ.get(env_name):
            check("hash key", "ok", f"from {env_name}")
        elif os.path.isfile(os.path.join(config.dir, "hash.key")):
            check("hash key", "warn", f"{env_name} is not set; using {os.path.join(config.dir, 'hash.key')}")
        else:
            check("hash key", "warn", f"{env_name} is not set; a key file will be generated on first use")
        catalog = Catalog(config)
        store = None
        enc = config.security.encryption_key_env
        try:
            store = TokenStore(config, catalog, verify_hash_key=False)  # the hash key check is above
            if os.environ.get(enc):
                check("encryption", "ok", f"policies are encrypted with the key in {enc}")
            else:
                check("encryption", "warn", f"{enc} is not set; policies are stored in plain text")
        except TokenomicsError as exc:
            check("encryption", "fail", str(exc))
        needed: dict[str, set] = {}
        for record in store.records() if store else []:
            for pp in (record.policy,) + record.policy.providers:
                provider = catalog.get(pp.name or record.policy.provider or config.default_provider or "openai") \
                    if (pp.name or record.policy.provider or config.default_provider or "openai") in catalog.names() \
                    else None
                env = pp.base_key_env or record.policy.base_key_env or (provider.api_key_env if provider else "")
                if env and not (provider and provider.name == "mock"):
                    needed.setdefault(env, set()).add(record.hash[:12])
        for env_name, hashes in sorted(needed.items()):
            if os.environ.get(env_name):
                check(f"key {env_name}", "ok", "set")
            else:
                check(f"key {env_name}", "fail", f"not set, but token(s) {', '.join(sorted(hashes))} need it")
        for name in ("openai", "anthropic"):
            env_name = catalog.get(name).api_key_env
            if env_name not in needed:
                check(f"key {env_name}", "ok" if os.environ.get(env_name) else "warn",
                      "set" if os.environ.get(env_name) else f"not set; {name} requests will fail with upstream_key_missing")
        tls = config.server.tls
        if tls.cert_file or tls.key_file:
            try:
                ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                ctx.load_cert_chain(tls.cert_file, tls.key_file)
                check("tls", "ok", f"{tls.cert_file} loads")
            except (OSError, ssl.SSLError) as exc:
                check("tls", "fail", f"cannot load {tls.cert_file} / {tls.key_file}: {exc}")
        elif not HAVE_TRUSTME:
            check("tls", "warn", "the TLS extra is not installed (pip install 'tokenomics[tls]'); HTTPS is off")
        else:
            check("tls", "ok", "a local CA and certificate are generated in " + cert_dir(config))
        if config.session.backend == "redis":
            problem = redis_probe(config.session.redis)
            check("redis", "fail" if problem else "ok",
                  problem or f"{shown_addr(config.session.redis.addr)} answers; limits are shared there")
        info = read_pid(config)
        if proxy_alive(info) and info.get("url"):
            status, _ = http_get(info["url"] + "/health")
            check("proxy", "ok" if status == 200 else "fail",
                  f"{info['url']} answers" if status == 200 else f"{info['url']} does not answer")
        else:
            check("proxy", "warn", "no background proxy is running (tokenomics start)")
        if config.remote.url and store is not None:
            import asyncio

            from ..sync import RemoteSync
            try:
                check("remote", *asyncio.run(RemoteSync(config, store, os.environ).probe()))
            except UsageError as exc:
                check("remote", "fail", str(exc))
    failed = any(c["status"] == "fail" for c in checks)
    if args.json:
        print_json({"ok": not failed, "checks": checks})
    else:
        for c in checks:
            out(f"{c['status'].upper():5} {printable(c['name'])}: {printable(c['detail'])}")
    return 1 if failed else 0

