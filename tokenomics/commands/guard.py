"""`tokenomics guard check`: run a policy's rules offline on texts or labelled JSON lines, with a
verdict per text and recall, false-positive rate and a confusion table."""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any

from ..errors import ProxyError, TokenomicsError, UsageError
from . import err, load, out, print_table, read_policy_arg

if TYPE_CHECKING:
    from ..guard.check import Hit, Verdict


def _guard_samples(args) -> tuple[Any, Any]:
    """(a function giving a fresh iterator of the samples to check, the stream to close).
    A named file is read twice: once to validate every line before anything is printed,
    once to check; stdin is read once."""
    from ..guard.check import Sample, jsonl_samples, read_lines, text_samples
    if args.texts and (args.jsonl or args.text_file):
        raise UsageError("guard check: give texts as arguments, or --jsonl FILE or --text-file FILE, not both")
    if args.texts:
        samples = [Sample(i, 0, t) for i, t in enumerate(args.texts, 1)]
        return (lambda: iter(samples)), None
    if not (args.jsonl or args.text_file):
        raise UsageError("guard check: no texts; give them as arguments, or --jsonl FILE (JSON lines with "
                         "text and label) or --text-file FILE (one per line); - reads stdin")
    flag, path = ("--jsonl", args.jsonl) if args.jsonl else ("--text-file", args.text_file)
    source = "stdin" if path == "-" else path

    def parse(stream):
        lines = read_lines(stream, source)
        return jsonl_samples(lines, source) if args.jsonl else text_samples(lines)
    if path == "-":
        return (lambda: parse(sys.stdin.buffer)), None
    try:
        stream = open(path, "rb")
    except OSError as exc:
        raise UsageError(f"{flag}: cannot read {path}: {exc.strerror}") from None
    try:
        for _ in parse(stream):
            pass
    except BaseException:
        stream.close()
        raise

    def again():
        stream.seek(0)
        return parse(stream)
    return again, stream


def _hit_text(h: Hit) -> str:
    from ..util import printable
    text = f"{printable(h.rule)} {h.type}/{h.action}"
    if h.error:
        return f"{text} error: {h.error}"
    if h.score is not None:
        return f"{text} score {h.score:.2f}"
    return f"{text} x{h.count}" if h.type not in ("jailbreak", "classifier") else text


def _verdict_line(v: Verdict) -> str:
    where = [f"line {v.line}"] if v.line else []
    if v.label is not None:
        where.append("attack" if v.label else "benign")
    head = f"#{v.index}" + (f" ({', '.join(where)})" if where else "") + f" {v.verdict}"
    if v.hits:
        return head + ": " + "; ".join(_hit_text(h) for h in v.hits)
    return head + (f" (jailbreak score {v.jailbreak_score:.2f})" if v.jailbreak_score is not None else "")


def _check_summary(summary: dict) -> None:
    counts = ", ".join(f"{k} {n}" for k, n in summary["verdicts"].items() if n)
    out(f"{summary['texts']} texts, {summary['chars']} chars" + (f": {counts}" if counts else ""))
    if summary["rules"]:
        print_table([("RULE", "TYPE", "ACTION", "TEXTS", "ERRORS")] + [
            (r["rule"], r["type"], r["action"], r["texts"], r["errors"]) for r in summary["rules"]])
    if not summary["labelled"]:
        return
    c = summary["confusion"]

    def figure(value):
        return "-" if value is None else f"{value:.3f}"
    out(f"labelled {summary['labelled']} ({c['tp'] + c['fn']} attack, {c['fp'] + c['tn']} benign): "
         f"recall {figure(summary['recall'])}, false-positive rate {figure(summary['false_positive_rate'])}, "
         f"precision {figure(summary['precision'])}")
    print_table([("", "FLAGGED", "PASSED"), ("attack", f"TP {c['tp']}", f"FN {c['fn']}"),
                  ("benign", f"FP {c['fp']}", f"TN {c['tn']}")])


def cmd_guard(args) -> int:
    import asyncio

    from ..guard.check import Checker, Tally
    from ..guard.classifier import Classifier
    from ..http.client import UpstreamClient
    from ..policy import parse_policy, resolve_policy
    from ..providers import Catalog
    from ..util import printable
    policy = parse_policy(read_policy_arg(args.policy))
    rules = policy.rules
    if args.model:
        config = load(args)
        try:
            rules = resolve_policy(policy, args.model, Catalog(config), config).rules
        except ProxyError as exc:
            raise UsageError(f"--model: {exc.message}") from None
    if args.rule:
        unknown = sorted(set(args.rule) - {r.name for r in rules})
        if unknown:
            raise UsageError(f"--rule: the policy has no rule named {printable(unknown[0])!r}; its rules: "
                             f"{', '.join(printable(r.name) for r in rules) or 'none'}")
        rules = tuple(r for r in rules if r.name in args.rule)
    samples, stream = _guard_samples(args)
    client = UpstreamClient() if any(r.type == "classifier" for r in rules) else None
    checker = Checker(rules, args.scope, Classifier(client, os.environ) if client is not None else None)
    tally = Tally(checker.rules)
    listing = not args.summary

    def close_json(extra: dict) -> None:
        """The end of the one JSON document --json prints (results were streamed into it)."""
        results = ("[]" if not tally.texts else "]") + ",\n" if listing else ""
        out(results + '"summary": ' + json.dumps(tally.summary(), indent=2)
             + "".join(f", {json.dumps(k)}: {json.dumps(v)}" for k, v in extra.items()) + "}")

    async def run() -> None:
        async for verdict in checker.verdicts(samples()):
            tally.add(verdict)
            if listing and args.json:
                out(("[" if tally.texts == 1 else ",") + json.dumps(verdict.to_json()))
            elif listing:
                out(_verdict_line(verdict))
    if args.json:
        out('{"results":' if listing else "{")
    try:
        asyncio.run(run())
    except TokenomicsError as exc:
        if args.json:    # stdout stays one JSON document
            close_json({"error": str(exc)})
        raise
    finally:
        if client is not None:
            client.close()
        if stream is not None:
            stream.close()
    for name, n in tally.service_errors():
        err(f"tokenomics: classifier rule '{printable(name)}': its service failed on {n} of {tally.texts} texts")
    if args.json:
        close_json({})
    else:
        _check_summary(tally.summary())
    return 0

