"""`tokenomics token`: create, list, get, update and delete wrapper tokens."""

from __future__ import annotations

import json
import os
import re
import time
from typing import TYPE_CHECKING, Any

from ..errors import TokenomicsError, UsageError
from . import err, load, out, print_json, read_policy_arg, table_lines

if TYPE_CHECKING:
    from ..config import Config
    from ..limits.state import MemoryState
    from ..policy import Policy
    from ..store import TokenRecord, TokenStore


def _check_hash_arg(value: str) -> None:
    """--hash: a hex hash (prefix), not the raw token and not a label."""
    from ..util import TOKEN_PREFIX, printable
    if value.strip().startswith(TOKEN_PREFIX):
        raise UsageError("--hash: that is a token itself; give its hash (`tokenomics token list` shows them)")
    if not re.fullmatch(r"[0-9a-fA-F]+", value.strip()):
        raise UsageError(f"--hash: {printable(value)!r} is not a token hash (hex digits); "
                         "`tokenomics token list` shows the hashes")


def _store(args) -> TokenStore:
    from ..providers import Catalog
    from ..store import TokenStore
    config = load(args)
    return TokenStore(config, Catalog(config))


def _policy_summary(policy: Policy) -> tuple[str, str, str]:
    """(key env, model restrictions, rule count) of a policy, as `token list` shows them."""
    key_env = policy.base_key_env or "-"
    models = policy.model or (policy.model_regex.pattern if policy.model_regex is not None else "")
    if policy.providers:
        models = (models + " " if models else "") + "+" + ",".join(sorted({p.name for p in policy.providers}))
    rules = len(policy.rules) + sum(len(p.rules) for p in policy.providers)
    return key_env, models or "any", str(rules)


def _read_usage(config: Config) -> MemoryState | None:
    """The budget counters the proxy enforces, without a proxy: the usage journal of the data dir
    replayed into a MemoryState, exactly as a starting proxy does (an unsettled reservation
    counts in full). The replay runs on a private copy, because replay() may trim and compact its
    files and a running proxy owns them. The log is copied before the snapshot: a compaction in
    between then only makes the snapshot newer, and replay skips the lines it already holds.
    None (and a warning) when the journal cannot be read."""
    import contextlib
    import shutil
    import tempfile

    from ..limits.journal import UsageJournal
    from ..limits.state import MemoryState
    live = UsageJournal(os.path.join(config.dir, "usage.journal"))  # the path Proxy uses
    state = MemoryState()
    try:
        with tempfile.TemporaryDirectory(prefix="tokenomics-usage-") as tmp:
            copy = UsageJournal(os.path.join(tmp, "usage.journal"))
            for source, target in ((live.path, copy.path), (live.snapshot_path, copy.snapshot_path)):
                with contextlib.suppress(FileNotFoundError):
                    shutil.copyfile(source, target)
            try:
                copy.replay(state)
            finally:
                copy.close()
    except (OSError, TokenomicsError) as exc:
        err(f"tokenomics: usage is not shown: cannot read the usage journal in {config.dir} ({exc})")
        return None
    return state


_WINDOW_NAMES = {"hourly": "per hour", "daily": "per day", "monthly": "per month", "total": "total"}


def _amount(unit: str, value: Any, cap: bool = False) -> str:
    """Tokens with thousands separators; dollars as the ledger shows them (never a real cost
    as $0.0000), a cap as written in the policy."""
    if value is None:
        return "?"
    if unit == "tokens":
        return f"{int(value):,}"
    if cap or value == 0:
        return "$" + (f"{value:f}".rstrip("0").rstrip(".") or "0")
    from ..records.ledger_report import format_usd
    return "$" + format_usd(value)


def _window_cells(w: dict, wide: bool) -> list[str]:
    name = f"{'tokens' if w['unit'] == 'tokens' else 'USD'} {_WINDOW_NAMES[w['period']]}"
    if w["scope"]:
        name += f" ({w['scope']})"
    cells = [name, f"used {_amount(w['unit'], w['used'])}", f"left {_amount(w['unit'], w['left'])}",
             f"of {_amount(w['unit'], w['cap'], cap=True)}"]
    if wide:
        cells.append(f"resets {w['resets_at'][:16].replace('T', ' ')}" if w["resets_at"] else "")
    return cells


def _token_event(config: Config, type_: str, record: TokenRecord) -> None:
    """The CLI emits token.* itself (SPEC §9): best effort, bounded wait."""
    from ..config import validate_webhooks
    from ..records.events import deliver_once, make_event
    from ..util import HASH_PREFIX, utc_iso
    webhooks = validate_webhooks(config.events.webhooks)
    if webhooks:
        deliver_once(webhooks, make_event(type_, {"token_hash": record.hash[:HASH_PREFIX], "label": record.label,
                                                  "expires_at": utc_iso(record.expires_at) if record.expires_at
                                                  else None, "metadata": record.policy.metadata}, time.time()),
                     timeout=3.0)


def cmd_token(args) -> int:
    from ..limits.usage import budget_windows
    from ..store import parse_expiry
    from ..util import printable, utc_iso
    if getattr(args, "hash", None) is not None:
        _check_hash_arg(args.hash)
    store = _store(args)
    now = time.time()
    action = args.token_cmd
    if action == "create":
        policy = read_policy_arg(args.policy)
        expires = parse_expiry(args.expires, now) if args.expires else None
        token, record = store.create(policy, expires, args.label or "")
        _token_event(store.config, "token.created", record)
        if args.json:
            print_json({"token": token, "hash": record.hash, "expires_at": record.to_json(now)["expires_at"]})
        else:
            out(f"Token: {token}")
            out(f"Hash: {record.hash}")
            if expires:
                out(f"Expires: {utc_iso(expires)}")
            err("Store the token now: it is shown only once.")
        return 0
    if action == "list":
        records = store.records()
        state = _read_usage(store.config) if records else None
        usage = {r.hash: budget_windows(r, state, now) for r in records}
        if args.json:
            print_json([{**r.to_json(now), "usage": usage[r.hash]} for r in records])
            return 0
        wide = args.wide

        def when(ts: float) -> str:
            return utc_iso(ts)[:16].replace("T", " ") if wide else utc_iso(ts)[:10]

        rows: list[tuple] = [("HASH", "LABEL", "CREATED", "EXPIRES", "STATUS", "KEY ENV", "MODELS", "RULES")]
        for r in records:
            rows.append((r.hash if wide else r.hash[:12], r.label or "-", when(r.created_at),
                         when(r.expires_at) if r.expires_at else "never",
                         "EXPIRED" if r.expired(now) else "active") + _policy_summary(r.policy))
        # Budget windows go on lines of their own under their token, so a big policy makes the
        # listing longer, not wider: the main columns stay within 100 (cut with … unless --wide).
        lines = table_lines(rows, None if wide else (12, 14, 10, 10, 7, 12, 14, 5))
        budget = table_lines([_window_cells(w, wide) for r in records for w in usage[r.hash]],
                              None if wide else (28, 20, 20, 20))
        out(lines[0])
        for r, line in zip(records, lines[1:]):
            out(line)
            for _ in usage[r.hash]:
                out("    " + budget.pop(0))
        if not records:
            err("no tokens yet: create one with `tokenomics token create --policy '{}'`")
        return 0
    if action == "get":
        record = store.find(args.hash)
        windows = budget_windows(record, _read_usage(store.config), now)
        if args.json:
            print_json({**record.to_json(now), "usage": windows})
        else:
            data = record.to_json(now)
            for key in ("hash", "label", "created_at", "expires_at"):
                out(f"{key.replace('_', ' ').capitalize() + ':':12} {printable(data[key] or '-')}")
            out(f"{'Status:':12} {'EXPIRED' if data['expired'] else 'active'}")
            if windows:
                out("Budget:")
                for line in table_lines([_window_cells(w, True) for w in windows]):
                    out("  " + line)
            else:
                out(f"{'Budget:':12} none (the policy sets no max_tokens or budget)")
            out("Policy:")
            out(json.dumps(record.policy.raw, indent=2))
        return 0
    if action == "update":
        policy = read_policy_arg(args.policy) if args.policy is not None else None
        expires: Any = ...
        if args.expires is not None:
            expires = None if args.expires.lower() in ("clear", "never", "none") else parse_expiry(args.expires, now)
        if policy is None and expires is ... and args.label is None:
            raise UsageError("token update: nothing to change; give --policy, --expires or --label")
        record = store.update(args.hash, policy, expires, args.label)
        _token_event(store.config, "token.updated", record)
        if args.json:
            print_json(record.to_json(now))
        else:
            out(f"Updated {record.hash}")
        return 0
    if action == "delete":
        record = store.delete(args.hash)
        _token_event(store.config, "token.deleted", record)
        if args.json:
            print_json({"deleted": record.hash})
        else:
            out(f"Deleted {record.hash}")
        return 0
    raise UsageError(f"token: unknown action {action}")

