"""The commands of the CLI, one module per group, and what they share: output, config loading,
tables and policy arguments. A command module imports at its top only what is cheap; the rest
it imports inside the command, so each command loads only what it uses (`tokenomics --version`
and `serve` start fast)."""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any

from ..errors import UsageError

if TYPE_CHECKING:
    from ..config import Config

PROVIDER_ALIASES = {"gemini": "google_gemini", "google": "google_gemini", "azure": "azure_openai"}


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def err(text: str) -> None:
    sys.stderr.write(text + "\n")


def print_json(payload: Any) -> None:
    out(json.dumps(payload, indent=2))


def setup_logging(config: Config | None = None) -> None:
    import logging

    from ..records.logs import redacting_filter
    level = getattr(logging, (config.logging.level if config else "info").upper(), logging.INFO)
    root = logging.getLogger("tokenomics")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("tokenomics %(levelname)s: %(message)s"))
        handler.addFilter(redacting_filter())
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(level)


def load(args, overrides: dict | None = None) -> Config:
    from ..config import load_config
    from ..providers import Catalog, UnknownProvider
    config = load_config(getattr(args, "config", None), getattr(args, "dir", None), overrides=overrides)
    setup_logging(config)
    provider = vars(args).get("provider")
    if provider and provider != "all" and provider not in PROVIDER_ALIASES:
        catalog = Catalog(config)
        if provider not in catalog.names():  # `run`/`init --provider`: a typo would be silently ignored
            known = sorted(catalog.names() | set(PROVIDER_ALIASES) | {"all"})
            raise UsageError(f"--provider: {UnknownProvider(provider, known)}")
    return config


def table_lines(rows: list, limits: tuple | None = None) -> list[str]:
    """Left-aligned columns of printable() cells: labels, model names and upstream details
    are chosen by clients or providers, and must neither add rows nor drive the terminal.
    `limits` caps each column's width (a longer cell is cut with …)."""
    from ..util import printable
    cells = [[printable(cell) for cell in row] for row in rows]
    if limits:
        cells = [[c if len(c) <= n else c[:n - 1] + "…" for c, n in zip(row, limits)] for row in cells]
    if not cells:
        return []
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]


def print_table(rows: list[tuple]) -> None:
    for line in table_lines(rows):
        out(line)


def read_policy_arg(value: str) -> dict:
    source = "--policy"
    if value.startswith("@"):
        path = value[1:]
        if not path:
            raise UsageError("--policy: '@' needs a file name after it, e.g. --policy @policy.json")
        try:
            with open(path, encoding="utf-8") as fh:
                value = fh.read()
        except OSError as exc:
            raise UsageError(f"--policy: cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError(f"--policy: {path} is not UTF-8 text; give a JSON policy file") from None
        source = f"--policy @{path}"
    try:
        policy = json.loads(value)
    except ValueError as exc:
        hint = ""
        if source == "--policy" and (os.path.exists(value) or value.endswith((".json", ".yaml", ".yml"))):
            hint = f"; to read a file, write --policy @{value}"
        raise UsageError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}){hint}") \
            from None
    if not isinstance(policy, dict):
        raise UsageError(f"{source}: expected a JSON object, e.g. '{{\"model_regex\": \"^gpt-4o\"}}'")
    return policy


def serve_overrides(args) -> dict:
    server: dict = {}
    if getattr(args, "host", None):
        server["host"] = args.host
    if getattr(args, "port", None) is not None:
        server["http_port"] = args.port
    if getattr(args, "https_port", None) is not None:
        server["https_port"] = args.https_port
    if getattr(args, "no_tls", False):
        server["tls"] = {"enabled": False}
    if getattr(args, "upstream_url", None):
        server["upstream_url"] = args.upstream_url
    return {"server": server} if server else {}


def worker_count(args, config: Config) -> int:
    """How many worker processes: --workers, else server.workers from the config (flag wins)."""
    if getattr(args, "workers", None) is not None:
        return args.workers
    workers = config.server.workers
    if workers < 1:
        raise UsageError(f"config: server.workers: {workers} is not a number of processes; give 1 or more")
    return workers


def http_get(url: str, token: str | None = None, timeout: float = 2.0, cafile: str | None = None):
    """(status, body) of a GET, or (0, error text) when the proxy cannot be reached."""
    import ssl
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    ctx = ssl.create_default_context(cafile=cafile) if url.startswith("https") else None
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, ValueError) as exc:
        return 0, str(exc).encode()

