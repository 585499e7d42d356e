"""What a token has used and has left in each budget window, from the counters the proxy
enforces: the one computation `token list` and the admin API both show."""

from typing import TYPE_CHECKING

from ..limits.decide import BudgetLine, window_bounds
from ..util import HASH_PREFIX, utc_iso

if TYPE_CHECKING:  # names used in annotations only
    from ..limits.state import State
    from ..store import TokenRecord


def budget_windows(record: "TokenRecord", state: "State | None", now: float) -> list[dict]:
    """Each budget window of the token with what is used and left, from the counters the
    proxy enforces. The lines are built as Pipeline.budget_lines builds them: `max_tokens` is a
    lifetime token cap (per matched provider policy when set there), `budget` windows are per
    token; lines sharing a counter are one window with the smallest cap."""
    key = record.hash[:HASH_PREFIX]
    policy = record.policy
    lines: list[tuple[str, BudgetLine]] = []
    if policy.max_tokens is not None:
        lines.append(("", BudgetLine(key, "tokens", "total", policy.max_tokens)))
    for pp in policy.providers:
        if pp.max_tokens is not None:
            lines.append((f"{pp.name}[{pp.index}]", BudgetLine(f"{key}:{pp.name}{pp.index}", "tokens", "total",
                                                              pp.max_tokens)))
    lines += [("", BudgetLine(key, unit, period, cap)) for unit, period, cap in policy.budget]
    windows: dict[tuple, dict] = {}
    for scope, line in lines:
        cid = (line.key, line.unit, line.period)
        if cid in windows and windows[cid]["cap"] <= line.cap:
            continue
        used = None
        if state is not None:
            settled, held = state.usage(line, now)
            used = settled + held if line.unit == "tokens" else round(settled + held, 9)  # whole nano-dollars
        end = window_bounds(line.period, now)[1]
        cap = int(line.cap) if line.unit == "tokens" else line.cap
        windows[cid] = {"scope": scope, "unit": line.unit, "period": line.period, "cap": cap,
                        "used": used, "left": None if used is None else max(0, round(cap - used, 9)),
                        "resets_at": utc_iso(end) if end != float("inf") else None}
    return list(windows.values())
