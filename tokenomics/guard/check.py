"""`guard check`: a policy's guardrail rules run offline on texts, so a policy can be measured
on one's own traffic before it is deployed.

Owns the input formats (JSON lines with `text` and an optional `label`, or one text per plain
line), the label vocabulary, the verdict on one text (what the proxy would do with it) and the
tally (verdict counts, hits per rule and, over labelled texts, the confusion counts, recall,
false-positive rate and precision). Detection is the proxy's own: the compiled rules go through
`Guard`, the jailbreak detector and `Classifier`. Nothing here prints, logs or keeps a text; a
verdict names rules, types, actions, counts and scores, never a matched value."""

import asyncio
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, BinaryIO, Iterable, Iterator

from ..errors import ProxyError, RuntimeFailure, UsageError
from ..guard.anonymize import Anonymizer
from ..guard.classifier import MAX_CONCURRENT_CALLS, Classifier, Finding
from ..guard.jailbreak import jailbreak_score
from ..guard.rules import Guard, Rule, RuleMatch
from ..util import DEFAULT_MAX_BODY_BYTES, MiB, _json_type, printable


MAX_LINE_BYTES = DEFAULT_MAX_BODY_BYTES + MiB   # a text the proxy could receive fits in a request
                                                # body (10 MiB), so its JSON line fits in this;
                                                # a longer line is refused before it is held whole

# Texts whose classifier calls run at once: as many as keep each text's calls (one per classifier
# rule) within MAX_CONCURRENT_CALLS, so that no call waits for a slot while its timeout runs.
BATCH_CHARS = 4 * MiB                           # chars held at once while a batch waits on calls

POSITIVE_LABELS = ("attack", "malicious", "unsafe", "flag", "positive", "true", "1")
NEGATIVE_LABELS = ("benign", "safe", "pass", "negative", "false", "0")

# What the proxy does with a text, most decisive first: the verdict on a text is the first of
# these that one of its hits calls for. `error`: a classifier rule's service failed and the rule
# says on_error: fail, so the proxy would refuse the text with 500 guardrail_error.
VERDICTS = ("fail", "error", "anonymize", "mask", "warn", "log", "pass")


@dataclass(frozen=True, slots=True)
class Sample:
    """One text to check: its 1-based position, the input line it came from (0 for a text given
    as an argument) and its label (True: an attack, False: benign, None: unlabelled)."""
    index: int
    line: int
    text: str
    label: bool | None = None


@dataclass(frozen=True, slots=True)
class Hit:
    """One rule's outcome on one text: how many matches (1 for a document-level rule), its
    score (jailbreak and classifier rules) or the reason its service could not decide.
    `position` is the rule's place among the rules checked."""
    position: int
    rule: str
    type: str
    action: str
    count: int
    score: float | None = None
    error: str = ""

    def to_json(self) -> dict:
        out: dict[str, Any] = {"rule": self.rule, "type": self.type, "action": self.action, "count": self.count}
        if self.score is not None:
            out["score"] = self.score
        if self.error:
            out["error"] = self.error
        return out


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the policy does with one text. `jailbreak_score` is the built-in detector's score
    when a jailbreak rule applies (so thresholds can be tuned from it), else None."""
    index: int
    line: int
    label: bool | None
    verdict: str
    hits: tuple
    jailbreak_score: float | None
    chars: int

    @property
    def flagged(self) -> bool:
        """Whether any rule acted on the text (or the proxy would refuse it on a service error)."""
        return self.verdict != "pass"

    def to_json(self) -> dict:
        out: dict[str, Any] = {"index": self.index, "line": self.line or None, "verdict": self.verdict,
                               "label": None if self.label is None else ("attack" if self.label else "benign"),
                               "chars": self.chars, "rules": [h.to_json() for h in self.hits]}
        if self.jailbreak_score is not None:
            out["jailbreak_score"] = self.jailbreak_score
        return out


# -- input -----------------------------------------------------------------------------------------

def parse_label(value: Any, where: str) -> bool | None:
    """A label from the accepted vocabulary (case-insensitive strings, JSON booleans, 1 and 0;
    null or absent: unlabelled). UsageError naming `where` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in POSITIVE_LABELS:
            return True
        if word in NEGATIVE_LABELS:
            return False
        shown = repr(printable(value)) if len(value) <= 32 else "a string"
    else:
        shown = _json_type(value)
    raise UsageError(f"{where}: label {shown} is not one of the accepted labels: "
                     f"{', '.join(POSITIVE_LABELS)} (an attack) or {', '.join(NEGATIVE_LABELS)} (benign)")


def read_lines(stream: BinaryIO, source: str, limit: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str]]:
    """(line number, text without its line ending) of each line of a binary stream, holding one
    line at a time; a line longer than `limit` bytes or not UTF-8 is a UsageError naming it."""
    number = 0
    while True:
        raw = stream.readline(limit + 1)
        if not raw:
            return
        number += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            raise UsageError(f"{source}: line {number} is longer than {limit // MiB} MiB, more than a request "
                             "body the proxy accepts; split the text")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"{source}: line {number} is not UTF-8 text") from None
        yield number, text.rstrip("\r\n") if text.endswith("\n") else text


def jsonl_samples(lines: Iterable[tuple[int, str]], source: str) -> Iterator[Sample]:
    """Samples from JSON lines: each non-blank line an object with a string `text` and an
    optional `label`; other fields are ignored. A line that is not such an object is a
    UsageError naming it (never treated as plain text, which would measure the wrong thing)."""
    index = 0
    for number, line in lines:
        if not line.strip():
            continue
        where = f"{source}: line {number}"
        try:
            doc = json.loads(line)
        except ValueError as exc:
            raise UsageError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); each line is an "
                             "object such as {\"text\": \"...\", \"label\": \"attack\"} (plain lines: "
                             "--text-file)") from None
        except RecursionError:
            raise UsageError(f"{where}: JSON nested too deeply") from None
        if not isinstance(doc, dict):
            raise UsageError(f"{where}: expected a JSON object with a \"text\" string, got {_json_type(doc)}")
        text = doc.get("text")
        if not isinstance(text, str):
            raise UsageError(f"{where}: \"text\": expected a string, got {_json_type(text)}")
        index += 1
        yield Sample(index, number, text, parse_label(doc.get("label"), where))


def text_samples(lines: Iterable[tuple[int, str]]) -> Iterator[Sample]:
    """Samples from plain lines, one unlabelled text per non-blank line."""
    index = 0
    for number, line in lines:
        if line.strip():
            index += 1
            yield Sample(index, number, line)


# -- the verdicts ----------------------------------------------------------------------------------

class Checker:
    """The rules of one direction (`input` or `output`) applied to texts as the proxy applies
    them: the local rules through a Guard, the jailbreak detector once per text, then the
    classifier rules on the text as the local rules left it (masked and anonymized values never
    reach a service). Unlike the proxy it does not stop at the first `fail` rule: every rule's
    outcome is reported, and the verdict is the most decisive action among them."""

    def __init__(self, rules: tuple[Rule, ...], scope: str = "input", classifier: Classifier | None = None) -> None:
        if scope not in ("input", "output"):
            raise UsageError(f"--scope: expected input or output, got {printable(scope)!r}")
        self.rules = tuple(r for r in rules if r.scope in (scope, "both"))
        self._scope = scope
        self._jailbreak = any(r.type == "jailbreak" for r in self.rules)
        self._classifier_positions = tuple(i for i, r in enumerate(self.rules) if r.type == "classifier")
        self._classifiers = tuple(self.rules[i] for i in self._classifier_positions)
        self._batch_texts = max(1, MAX_CONCURRENT_CALLS // max(1, len(self._classifiers)))
        # The Guard gets the local rules under their position as name and with fail deferred to
        # log, so it scans with every rule and raises for none. Mask and anonymize edit only
        # when a classifier will read the edited text (editing a 10 MB text costs memory).
        kept = ("mask", "anonymize") if self._classifiers else ()
        self._local = tuple(dataclasses.replace(r, name=str(i), action=r.action if r.action in kept else "log")
                            for i, r in enumerate(self.rules) if r.type not in ("jailbreak", "classifier"))
        if self._classifiers and classifier is None:
            raise ValueError("classifier rules need a Classifier")
        self._classifier = classifier

    @property
    def calls_services(self) -> bool:
        return bool(self._classifiers)

    def _local_pass(self, sample: Sample) -> tuple[dict[int, Hit], str, float | None]:
        """(hits of the local and jailbreak rules by position, the text as the local rules left
        it, the jailbreak score or None)."""
        matches: list[RuleMatch] = []
        text = sample.text
        try:
            if self._local:
                text = Guard(self._local, self._scope, Anonymizer(), matches).scan(sample.text)
            score = round(jailbreak_score(sample.text)[0], 4) if self._jailbreak else None
        except ProxyError:
            raise RuntimeFailure(f"text {sample.index}: a guardrail failed while scanning it; "
                                 "check the policy's rules") from None
        hits: dict[int, Hit] = {}
        for m in matches:
            i = int(m.rule)
            rule = self.rules[i]
            hits[i] = Hit(i, rule.name, rule.type, rule.action, m.count)
        if score is not None:
            for i, rule in enumerate(self.rules):
                if rule.type == "jailbreak" and score >= rule.threshold:
                    hits[i] = Hit(i, rule.name, rule.type, rule.action, 1, score)
        return hits, text, score

    def _verdict(self, sample: Sample, hits: dict[int, Hit], score: float | None) -> Verdict:
        called: set[str] = set()
        for i, h in hits.items():
            if not h.error:
                called.add(h.action)
            elif self.rules[i].classifier.on_error == "fail":
                called.add("error")
        verdict = next(v for v in VERDICTS if v in called or v == "pass")
        return Verdict(sample.index, sample.line, sample.label, verdict, tuple(hits[i] for i in sorted(hits)),
                       score, len(sample.text))

    async def _classify(self, text: str, limit: asyncio.Semaphore) -> list[Finding]:
        assert self._classifier is not None
        return list(await asyncio.gather(*(self._classifier.classify(r.classifier, [text], limit)
                                           for r in self._classifiers)))

    async def verdicts(self, samples: Iterable[Sample]) -> AsyncIterator[Verdict]:
        """One Verdict per sample, in order. The classifier calls of several texts (up to
        BATCH_CHARS chars) run concurrently; without classifier rules one text is held at a time."""
        batch: list[tuple[Sample, dict[int, Hit], str, float | None]] = []
        held = 0
        for sample in samples:
            hits, text, score = self._local_pass(sample)
            if not self._classifiers:
                yield self._verdict(sample, hits, score)
                continue
            batch.append((sample, hits, text, score))
            held += len(sample.text)
            if len(batch) >= self._batch_texts or held >= BATCH_CHARS:
                for v in await self._finish(batch):
                    yield v
                batch, held = [], 0
        if batch:
            for v in await self._finish(batch):
                yield v

    async def _finish(self, batch: list) -> list[Verdict]:
        limit = asyncio.Semaphore(MAX_CONCURRENT_CALLS)
        found = await asyncio.gather(*(self._classify(text, limit) for _, _, text, _ in batch))
        out = []
        for (sample, hits, _, score), findings in zip(batch, found):
            for i, f in zip(self._classifier_positions, findings):
                rule = self.rules[i]
                if f.error:
                    hits[i] = Hit(i, rule.name, rule.type, rule.action, 0, error=f.error)
                elif f.hit:
                    hits[i] = Hit(i, rule.name, rule.type, rule.action, 1, f.score)
            out.append(self._verdict(sample, hits, score))
        return out


# -- the tally -------------------------------------------------------------------------------------

def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


class Tally:
    """Counts over the verdicts of a run: per verdict, texts each rule hit, service errors per
    rule and, over labelled texts (flagged = any verdict but pass), TP/FP/FN/TN with recall
    (TP / attacks), false-positive rate (FP / benign) and precision (TP / flagged)."""

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self._rules = rules
        self.texts = 0
        self.chars = 0
        self.verdicts = dict.fromkeys(VERDICTS, 0)
        self._hits = [0] * len(rules)
        self._errors = [0] * len(rules)
        self.tp = self.fp = self.fn = self.tn = 0

    def add(self, v: Verdict) -> None:
        self.texts += 1
        self.chars += v.chars
        self.verdicts[v.verdict] += 1
        for h in v.hits:
            if h.error:
                self._errors[h.position] += 1
            else:
                self._hits[h.position] += 1
        if v.label is None:
            return
        if v.label:
            if v.flagged:
                self.tp += 1
            else:
                self.fn += 1
        elif v.flagged:
            self.fp += 1
        else:
            self.tn += 1

    @property
    def labelled(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    def service_errors(self) -> list[tuple[str, int]]:
        """(rule name, texts its service failed on) of each classifier rule that failed."""
        return [(r.name, n) for r, n in zip(self._rules, self._errors) if n]

    def summary(self) -> dict:
        out: dict[str, Any] = {
            "texts": self.texts, "chars": self.chars, "verdicts": dict(self.verdicts),
            "rules": [{"rule": r.name, "type": r.type, "action": r.action, "texts": n, "errors": e}
                      for r, n, e in zip(self._rules, self._hits, self._errors)],
            "labelled": self.labelled}
        if self.labelled:
            out.update({
                "confusion": {"tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn},
                "recall": _ratio(self.tp, self.tp + self.fn),
                "false_positive_rate": _ratio(self.fp, self.fp + self.tn),
                "precision": _ratio(self.tp, self.tp + self.fp)})
        return out
