"""What the ledger commands and the admin page show of the ledger: the sessions `load_sessions`
reads back, filtered by token, summed over a time range and rendered as tables. Pure functions of
those session dicts; reading and writing the files is the ledger's."""

import contextlib
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import RuntimeFailure, UsageError
from ..records.ledger import _SESSION_PREFIX_MIN, _int, _num, _Rollups, _when
from ..records.rollup import NONE_KEY
from ..util import HASH_PREFIX, parse_duration, parse_rfc3339, printable, rfc3339_ms, usd_text


@dataclass(frozen=True, slots=True)
class TokenFilter:
    """`--token HASH-PREFIX` and `--label TEXT` of the ledger commands: which request rows to
    keep. `labelled` holds the HASH_PREFIX-char prefixes of the tokens carrying `label` (from the
    token store: the ledger itself records only hash prefixes). Both given: a row must pass both."""
    prefix: str | None = None
    label: str | None = None
    labelled: frozenset = frozenset()

    def keep(self, row: dict) -> bool:
        row_hash = str(row.get("token_hash") or "")
        if self.prefix is not None:  # rows keep a prefix of the hash, users may give the whole hash
            n = min(len(row_hash), len(self.prefix))
            if not row_hash or row_hash[:n] != self.prefix[:n]:
                return False
        return self.label is None or row_hash[:HASH_PREFIX] in self.labelled


def token_filter(prefix: str | None, label: str | None, labels: dict) -> TokenFilter | None:
    """The filter for `--token`/`--label` (None when neither is given); `labels` maps full token
    hashes to labels. A label no token carries is an error: it would silently match nothing."""
    if prefix is None and label is None:
        return None
    if prefix is not None:
        prefix = prefix.strip().lower()
        if prefix.startswith("tkn_"):
            raise UsageError("--token: give the token's hash (or a prefix of it, as `tokenomics token list` "
                             "shows), not the token itself")
        if not re.fullmatch(r"[0-9a-f]{4,64}", prefix):
            raise UsageError("--token: expected at least 4 hex characters of a token hash "
                             "(`tokenomics token list` shows them)")
    labelled: frozenset = frozenset()
    if label is not None:
        labelled = frozenset(h[:HASH_PREFIX] for h, text in labels.items() if text == label)
        if not labelled:
            known = sorted({text for text in labels.values() if text})
            hint = f" (labels in use: {', '.join(known[:10])}{', ...' if len(known) > 10 else ''})" if known else ""
            raise RuntimeFailure(f"--label: no token is labelled {label!r}{printable(hint)}; "
                                 "`tokenomics token list` shows the labels")
    return TokenFilter(prefix, label, labelled)


def token_names(labels: dict) -> dict:
    """{hash prefix as the ledger records it: name to show}: a token's label, with a short hash
    beside it when several tokens share the label. Tokens without a label are left out (tables
    show a 12-char hash prefix for them)."""
    counts: dict[str, int] = {}
    for text in labels.values():
        if text:
            counts[text] = counts.get(text, 0) + 1
    return {h[:HASH_PREFIX]: text if counts[text] == 1 else f"{text} {h[:8]}"
            for h, text in labels.items() if text}


def _token_name(row_hash: Any, names: dict | None) -> str:
    row_hash = str(row_hash or "")
    if not row_hash or row_hash == NONE_KEY:
        return "-"
    return (names or {}).get(row_hash[:HASH_PREFIX]) or row_hash[:12]


def filter_session(session: dict, tokens: TokenFilter | None) -> dict | None:
    """`session` with only the requests `tokens` keeps and its totals and rollups recomputed
    from them; None when no request is kept. Without a filter, the session as it is."""
    if tokens is None:
        return session
    kept = [row for row in session.get("requests") or () if tokens.keep(row)]
    if not kept:
        return None
    rollups = _Rollups()
    for row in kept:
        rollups.add(row, _when(row.get("timestamp")))
    return {**session, **rollups.as_dict(), "requests": kept}


def summarize(sessions: list, since: float | None = None, until: float | None = None,
              branch: str | None = None, tokens: TokenFilter | None = None) -> dict:
    """Totals and by_model/by_provider/by_token/by_branch over the requests with
    since <= timestamp < until in sessions on `branch` made with the `tokens` filter's tokens
    (each filter optional). `sessions` counts the sessions on the branch with a request in the
    window (or, without requests and without a token filter, started in it)."""

    def inside(ts: float | None) -> bool:
        return ts is None or ((since is None or ts >= since) and (until is None or ts < until))

    rollups = _Rollups()
    count = 0
    for session in sessions:
        session_branch = (session.get("git") or {}).get("branch", "")
        if branch is not None and session_branch != branch:
            continue
        requests = session.get("requests") or ()
        used = False
        for row in requests:
            ts = _when(row.get("timestamp"))
            if inside(ts) and (tokens is None or tokens.keep(row)):
                rollups.add(row, ts, session_branch)
                used = True
        count += used or (not requests and tokens is None and inside(_when(session.get("started_at"))))
    return {
        "sessions": count,
        "filters": {"since": rfc3339_ms(since) if since is not None else None,
                    "until": rfc3339_ms(until) if until is not None else None,
                    "branch": branch,
                    "token": tokens.prefix if tokens is not None else None,
                    "label": tokens.label if tokens is not None else None},
        **rollups.as_dict(with_branch=True),
    }


def find_session(sessions: list, prefix: str) -> dict:
    """The one session whose id starts with `prefix` (4+ chars; `<date>_<id>` prefixes of the file
    name work too, to tell apart two sessions that drew the same id)."""
    prefix = (prefix or "").strip().lower()
    if prefix.endswith((".jsonl", ".json")):
        prefix = prefix.rsplit(".", 1)[0]
    if len(prefix) < _SESSION_PREFIX_MIN:
        raise UsageError(f"session id: give at least {_SESSION_PREFIX_MIN} characters of it "
                         "(`tokenomics ledger sessions` lists them)")

    def stem(s: dict) -> str:
        started = _when(s.get("started_at")) or 0.0
        return f"{time.strftime('%Y-%m-%d', time.gmtime(started))}_{s.get('session_id', '')}"

    matches = [s for s in sessions
               if str(s.get("session_id", "")).startswith(prefix) or ("_" in prefix and stem(s).startswith(prefix))]
    if not matches:
        raise RuntimeFailure(f"no session id starts with {prefix!r}; `tokenomics ledger sessions` lists them")
    if len(matches) > 1:
        names = ", ".join(stem(s) for s in matches[:5]) + (", ..." if len(matches) > 5 else "")
        raise RuntimeFailure(f"{prefix!r} matches {len(matches)} sessions ({names}); give more characters "
                             "of the id, or <date>_<id>")
    return matches[0]


def parse_when(text: str, now: float, *, flag: str = "", end_of_day: bool = False) -> float:
    """--since/--until value -> Unix seconds: an RFC 3339 date (midnight UTC; the next midnight
    with end_of_day, so `--until 2026-01-31` includes that day) or datetime (naive = UTC), or a
    duration meaning that long ago (`7d`, `12h`, `30m`)."""
    value = (text or "").strip()
    with contextlib.suppress(ValueError):
        return now - parse_duration(value)
    try:
        ts = parse_rfc3339(value)
    except ValueError:
        where = f"{flag}: " if flag else ""
        raise UsageError(f"{where}{text!r} is not a time: expected a date (2026-01-31), a datetime "
                         "(2026-01-31T12:00:00Z) or a duration ago (30m, 12h, 7d)") from None
    if end_of_day and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        ts += 86400
    return ts


def _table(headers: list[str], rows: list[list], numeric: set[int]) -> str:
    """Fixed-width columns: text left-aligned, numbers right-aligned, two spaces apart. Cells
    are printable(): a label or model name cannot add a row or move the cursor."""
    cells = [[printable(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    return "\n".join([line(headers)] + [line(r) for r in cells])


def format_usd(value: Any) -> str:
    """Dollars for tables; a real cost never reads as 0 (see util.usd_text)."""
    return usd_text(_num(value))


_usd = format_usd


def _span(ms: Any) -> str:
    """Milliseconds -> `850ms`, `12.3s`, `4m05s`, `2h03m`."""
    ms = _num(ms)
    if ms < 1000:
        return f"{ms:.0f}ms"
    s = ms / 1000
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _short_time(value: Any) -> str:
    ts = _when(value)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts is not None else "-"


def _totals_line(t: dict) -> str:
    return (f"requests {_int(t.get('request_count'))}  input {_int(t.get('input_tokens'))}  "
            f"output {_int(t.get('output_tokens'))}  total {_int(t.get('total_tokens'))}  "
            f"cached {_int(t.get('cached_input_tokens'))}  errors {_int(t.get('error_count'))}  "
            f"rule violations {_int(t.get('rule_violation_count'))}  "
            f"rate limited {_int(t.get('rate_limit_count'))}  "
            f"over budget {_int(t.get('budget_exceeded_count'))}  retries {_int(t.get('retry_count'))}  "
            f"cost ${_usd(t.get('cost_usd'))}")


def _rollup_table(title: str, table: dict, name: Callable[[str], str] = str) -> str:
    headers = [title, "REQUESTS", "INPUT", "OUTPUT", "CACHED", "ERRORS", "RATE LIMITED", "OVER BUDGET",
               "COST USD"]
    ordered = sorted(table.items(), key=lambda kv: (-_num(kv[1].get("cost_usd")), kv[0]))
    rows = [[name(key), _int(t.get("request_count")), _int(t.get("input_tokens")), _int(t.get("output_tokens")),
             _int(t.get("cached_input_tokens")), _int(t.get("error_count")), _int(t.get("rate_limit_count")),
             _int(t.get("budget_exceeded_count")), _usd(t.get("cost_usd"))]
            for key, t in ordered]
    return _table(headers, rows, numeric={1, 2, 3, 4, 5, 6, 7, 8})


def render_summary(summary: dict, names: dict | None = None) -> str:
    """`ledger summary` for people: totals, then one table per model/provider/token/branch.
    `names` (token_names()) shows a token by its label."""
    f = summary.get("filters") or {}
    lines = [f"Ledger summary: {summary.get('sessions', 0)} session(s)"]
    shown = [f"{name} {f[name]}" for name in ("since", "until", "branch", "token", "label")
             if f.get(name) is not None]
    if shown:
        lines.append("filters: " + printable(", ".join(shown)))
    lines += ["", "Totals: " + _totals_line(summary.get("totals") or {})]
    for title, key in (("MODEL", "by_model"), ("PROVIDER", "by_provider"), ("TOKEN", "by_token"),
                       ("BRANCH", "by_branch")):
        if summary.get(key):
            name = (lambda h: _token_name(h, names)) if key == "by_token" else str
            lines += ["", _rollup_table(title, summary[key], name)]
    return "\n".join(lines) + "\n"


def _commits(git: dict) -> str:
    start, end = git.get("commit_start", ""), git.get("commit_end", "")
    if start and end and start != end:
        return f"{start}..{end}"
    return start or end or "-"


def render_sessions(sessions: list) -> str:
    """`ledger sessions` for people: one row per session, oldest first."""
    if not sessions:
        return "no sessions recorded yet\n"
    headers = ["SESSION", "STARTED (UTC)", "DURATION", "BRANCH", "COMMIT", "REQUESTS", "TOKENS",
               "ERRORS", "COST USD", "STATE"]
    rows = []
    for s in sessions:
        t, git = s.get("totals") or {}, s.get("git") or {}
        rows.append([s.get("session_id", "?"), _short_time(s.get("started_at")), _span(s.get("duration_ms")),
                     git.get("branch") or "-", _commits(git), _int(t.get("request_count")),
                     _int(t.get("total_tokens")), _int(t.get("error_count")), _usd(t.get("cost_usd")),
                     "closed" if s.get("closed", True) else "open"])
    out = _table(headers, rows, numeric={5, 6, 7, 8})
    if any(not s.get("closed", True) for s in sessions):
        out += ("\n\nopen: no summary yet (still running, or stopped without a graceful shutdown); "
                "read from its journal")
    return out + "\n"


def render_session(session: dict, names: dict | None = None) -> str:
    """`ledger show ID` for people: the session, its totals, per-model costs and every request;
    `names` (token_names()) shows a token by its label."""
    git, t = session.get("git") or {}, session.get("totals") or {}
    state = "closed" if session.get("closed", True) else "open: rebuilt from the journal"
    where = git.get("branch") or "-"
    if git.get("repo_root"):
        where += f" @ {_commits(git)} in {git['repo_root']}"
    lines = [  # a journal is data anyone with the data dir could have edited: show it, never run it
        f"Session {printable(session.get('session_id', '?'))} ({state})",
        f"started   {printable(session.get('started_at', '-'))}",
        f"ended     {printable(session.get('ended_at', '-'))}  ({_span(session.get('duration_ms'))})",
        f"git       {printable(where)}",
        f"totals    {_totals_line(t)}",
    ]
    if session.get("by_model"):
        lines += ["", _rollup_table("MODEL", session["by_model"])]
    requests = session.get("requests") or []
    if requests:
        headers = ["TIME (UTC)", "TOKEN", "MODEL", "PROVIDER", "STATUS", "STREAM", "INPUT", "OUTPUT",
                   "DURATION", "RETRIES", "COST USD", "ERROR"]
        rows = [[_short_time(r.get("timestamp")), _token_name(r.get("token_hash"), names), r.get("model") or "-",
                 r.get("provider") or "-", _int(r.get("status_code")), "yes" if r.get("stream") else "no",
                 _int(r.get("input_tokens")), _int(r.get("output_tokens")), _span(r.get("duration_ms")),
                 _int(r.get("retry_count")), _usd(r.get("cost_usd")),
                 r.get("error") or ("fallback " + r["fallback_model"] if r.get("fallback_model") else "")]
                for r in requests]
        lines += ["", _table(headers, rows, numeric={4, 6, 7, 8, 9, 10})]
    return "\n".join(lines) + "\n"
