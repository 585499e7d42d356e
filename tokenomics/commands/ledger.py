"""`tokenomics ledger`: the session ledger's summary, sessions and one session's requests."""

import os
import sys
import time

from ..errors import RuntimeFailure
from . import load, print_json


def cmd_ledger(args) -> int:
    from ..records.ledger import load_sessions
    from ..records.ledger_report import (filter_session, find_session, parse_when, render_session, render_sessions,
                                         render_summary, summarize, token_filter, token_names)
    from ..limits.journal import read_carried
    from ..store import stored_labels
    config = load(args)
    now = time.time()
    sessions = load_sessions(config.dir, read_carried(os.path.join(config.dir, "usage.journal")))
    since = parse_when(args.since, now, flag="--since") if getattr(args, "since", None) else None
    until = parse_when(args.until, now, flag="--until", end_of_day=True) if getattr(args, "until", None) else None
    branch = getattr(args, "branch", None)
    labels = stored_labels(config.dir)
    names = token_names(labels)
    tokens = token_filter(getattr(args, "token", None), getattr(args, "label", None), labels)
    if args.ledger_cmd == "show":
        session = find_session(sessions, args.id)
        chosen = filter_session(session, tokens)
        if chosen is None:
            raise RuntimeFailure(f"session {session.get('session_id', '?')} has no request by the tokens "
                                 "--token/--label name; `tokenomics ledger sessions` with the same filter "
                                 "lists the sessions that have")
        if args.json:
            print_json(chosen)
        else:
            sys.stdout.write(render_session(chosen, names))
        return 0
    if args.ledger_cmd == "sessions":
        chosen = [s for s in (filter_session(s, tokens) for s in sessions if _session_in(s, since, until, branch))
                  if s is not None]
        if args.json:
            print_json([{k: v for k, v in s.items() if k != "requests"} for s in chosen])
        else:
            sys.stdout.write(render_sessions(chosen))
        return 0
    summary = summarize(sessions, since=since, until=until, branch=branch, tokens=tokens)
    if args.json:
        print_json(summary)
    else:
        sys.stdout.write(render_summary(summary, names))
    return 0


def _session_in(session: dict, since: float | None, until: float | None, branch: str | None) -> bool:
    from ..records.ledger import _when
    if branch is not None and (session.get("git") or {}).get("branch", "") != branch:
        return False
    started = _when(session.get("started_at")) or 0.0
    ended = _when(session.get("ended_at")) or started
    return (since is None or ended >= since) and (until is None or started < until)

