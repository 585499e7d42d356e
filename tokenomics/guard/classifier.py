"""The `classifier` rule: an external classification service that speaks the OpenAI moderation
contract (`POST {url}` with `{"input": TEXT, "model"?}` -> `{"results": [{"flagged",
"categories", "category_scores"}]}`), such as Llama Guard or Prompt Guard behind a
moderation-compatible server, or a vendor's moderation endpoint.

Three parts: the rule's specification (validated with JSON paths when a policy is), the pure
verdict over a parsed answer, and `Classifier`, which owns the HTTP calls (through the upstream
client it is handed: no redirects followed, the key redacted from answers) and a bounded cache
of answers per text. Nothing here logs or echoes a text, a key or an answer's body."""

import hashlib
import json
import math
import re
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

from ..errors import ProxyError, RuntimeFailure, UsageError
from ..util import _json_type, log, parse_duration

if TYPE_CHECKING:
    import asyncio


DEFAULT_TIMEOUT = 2.0              # s per rule and request: a local classifier answers in tens of ms,
                                   # a hosted one in a few hundred; the proxy must not wait longer
MAX_TIMEOUT = 60.0                 # s; a policy asking more would let a dead service hold requests
ON_ERROR = ("fail", "allow")

MAX_ANSWER_BYTES = 256 * 1024      # an answer for one text is < 2 KB (OpenAI: 13 categories); more
                                   # is a broken or hostile service
MAX_RESULTS = 16                   # results in one answer (one input gives one)
MAX_CATEGORIES = 256               # categories in one result
MAX_RULE_CATEGORIES = 64           # names in a rule's `categories`
MAX_NAME = 128                     # chars of a category or model name
MAX_URL = 2048                     # chars

CACHE_ENTRIES = 4096               # answers kept: one per message of recent conversations, which
                                   # agents resend whole on every turn
MAX_INPUT_CHARS = 32 * 1024        # chars sent in one call; longer texts go in overlapping windows
                                   # (moderation models read a few thousand tokens at most)
WINDOW_OVERLAP = 512               # chars each window repeats from the previous one
MAX_CALLS_PER_CHECK = 512          # service calls one request may need (uncached windows per rule):
                                   # a body at server.max_body_bytes (10 MiB) is ~320 windows
MAX_CONCURRENT_CALLS = 16          # in flight at once for one request

_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True, slots=True)
class ClassifierSpec:
    """What a `classifier` rule asks of its service. `categories` empty: any flagged result
    counts; `threshold` None: the service's own flags decide, else a category score at or
    above it counts."""
    url: str
    model: str = ""
    api_key_env: str = ""
    categories: tuple = ()
    threshold: float | None = None
    timeout: float = DEFAULT_TIMEOUT
    on_error: str = "fail"


CLASSIFIER_FIELDS = ("url", "model", "api_key_env", "categories", "threshold", "timeout", "on_error")


def parse_classifier(raw: dict, where: str) -> ClassifierSpec:
    """The service fields of a `classifier` rule; UsageError naming the JSON path otherwise.
    Messages never echo a value that could be a secret (a URL's credentials, a key pasted where
    its variable's name belongs)."""
    url = raw.get("url")
    if not isinstance(url, str) or not url.strip():
        raise UsageError(f"{where}.url: expected the classification service's URL (http:// or https://), "
                         f"got {_json_type(url)}")
    url = url.strip()
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise UsageError(f"{where}.url: not a valid URL; write it as http://HOST:PORT/v1/moderations") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{where}.url: must start with http:// or https:// and name a host, "
                         "e.g. http://127.0.0.1:8000/v1/moderations")
    if parts.username is not None or parts.password is not None:
        raise UsageError(f"{where}.url: must not carry credentials; put the key in an environment variable "
                         "and name it in api_key_env")
    if parts.fragment or "#" in url:
        raise UsageError(f"{where}.url: must not have a #fragment")
    if len(url) > MAX_URL or any(c.isspace() or ord(c) < 0x20 for c in url):
        raise UsageError(f"{where}.url: too long or contains whitespace or control characters")
    model = raw.get("model", "")
    if not isinstance(model, str) or ("model" in raw and not model.strip()) or len(model) > MAX_NAME:
        raise UsageError(f"{where}.model: expected a model name (a non-empty string of at most {MAX_NAME} "
                         f"characters), got {_json_type(model)}")
    key_env = raw.get("api_key_env", "")
    if not isinstance(key_env, str) or ("api_key_env" in raw and not _ENV_NAME_RE.match(key_env)):
        raise UsageError(f"{where}.api_key_env: expected the name of an environment variable (letters, digits "
                         "and _), not the key itself; set the key in that variable on the proxy")
    categories = raw.get("categories")
    if categories is None:
        cats: tuple = ()
    else:
        if not isinstance(categories, list) or not categories:
            got = "an empty list" if categories == [] else _json_type(categories)
            raise UsageError(f"{where}.categories: expected a non-empty list of category names such as "
                             f"[\"violence\", \"S1\"], got {got}; leave it out to count any flagged result")
        if len(categories) > MAX_RULE_CATEGORIES:
            raise UsageError(f"{where}.categories: more than {MAX_RULE_CATEGORIES} names")
        for k, c in enumerate(categories):
            if not isinstance(c, str) or not c.strip() or len(c) > MAX_NAME:
                raise UsageError(f"{where}.categories[{k}]: expected a category name (a non-empty string of at "
                                 f"most {MAX_NAME} characters), got {_json_type(c)}")
        cats = tuple(dict.fromkeys(c.strip() for c in categories))
    threshold = raw.get("threshold")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                or not math.isfinite(threshold) or not 0 < threshold <= 1:
            raise UsageError(f"{where}.threshold: expected a category score above 0 and at most 1, got "
                             f"{threshold if isinstance(threshold, (int, float)) and not isinstance(threshold, bool) else _json_type(threshold)}")
        threshold = float(threshold)
    timeout = _parse_timeout(raw.get("timeout", DEFAULT_TIMEOUT), f"{where}.timeout")
    on_error = raw.get("on_error", "fail")
    if not isinstance(on_error, str) or on_error not in ON_ERROR:
        raise UsageError(f"{where}.on_error: expected \"fail\" (refuse with 500 guardrail_error when the service "
                         "cannot answer) or \"allow\" (let the text pass unchecked), got "
                         f"{repr(on_error) if isinstance(on_error, str) and len(on_error) <= 32 else _json_type(on_error)}")
    return ClassifierSpec(url, model.strip(), key_env, cats, threshold, timeout, on_error)


def _parse_timeout(value: Any, where: str) -> float:
    seconds = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = parse_duration(value)
        except ValueError:
            seconds = None
    if seconds is None or not math.isfinite(seconds) or not 0 < seconds <= MAX_TIMEOUT:
        raise UsageError(f"{where}: expected seconds above 0 and at most {MAX_TIMEOUT:g} (a number, or a "
                         f"duration such as 500ms or 2s); the default is {DEFAULT_TIMEOUT:g}")
    return seconds


# -- the answer and the verdict (pure) -------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ModerationResult:
    """One entry of an answer's `results`, as checked by `parse_answer`."""
    flagged: bool
    categories: tuple       # (name, bool)
    scores: tuple           # (name, float in [0, 1])


def parse_answer(data: bytes) -> tuple[ModerationResult, ...]:
    """The service's JSON answer, strictly: `results` a non-empty list of objects with a boolean
    `flagged`, `categories` mapping names to booleans, and optional `category_scores` mapping
    names to numbers in [0, 1]. Anything else is a RuntimeFailure whose message says what is
    wrong without quoting the answer."""
    if len(data) > MAX_ANSWER_BYTES:
        raise RuntimeFailure(f"its answer is larger than {MAX_ANSWER_BYTES // 1024} KiB")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RuntimeFailure("its answer is not JSON") from None
    results = doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(results, list) or not results or len(results) > MAX_RESULTS:
        raise RuntimeFailure("its answer has no `results` list (the OpenAI moderation shape)")
    out = []
    for r in results:
        if not isinstance(r, dict) or not isinstance(r.get("flagged"), bool):
            raise RuntimeFailure("a result in its answer has no boolean `flagged`")
        cats, scores = r.get("categories", {}), r.get("category_scores", {})
        if cats is None:
            cats = {}
        if scores is None:
            scores = {}
        if not isinstance(cats, dict) or not isinstance(scores, dict) \
                or len(cats) > MAX_CATEGORIES or len(scores) > MAX_CATEGORIES:
            raise RuntimeFailure("a result's `categories` / `category_scores` are not objects")
        for name, flag in cats.items():
            if not isinstance(flag, bool) or len(name) > MAX_NAME:
                raise RuntimeFailure("a result's `categories` has a value that is not true or false")
        for name, score in scores.items():
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) \
                    or not 0 <= score <= 1 or len(name) > MAX_NAME:
                raise RuntimeFailure("a result's `category_scores` has a value that is not a number from 0 to 1")
        out.append(ModerationResult(r["flagged"], tuple(cats.items()), tuple((k, float(v)) for k, v in scores.items())))
    return tuple(out)


def judge(spec: ClassifierSpec, results: Iterable[ModerationResult]) -> tuple[bool, float | None]:
    """(whether the rule counts the answer as a hit, the highest score among the categories it
    considers, or None when the service gave none). RuntimeFailure when the answer cannot
    decide: the rule names categories the service never mentions (a misspelt name must not
    pass everything), or a threshold is set and the answer has no scores."""
    hit, best, seen = False, None, False
    for r in results:
        flags, scores = dict(r.categories), dict(r.scores)
        names = spec.categories or tuple(dict.fromkeys((*flags, *scores)))
        for name in names:
            flag, score = flags.get(name), scores.get(name)
            if flag is None and score is None:
                continue
            seen = True
            if score is not None:
                best = score if best is None else max(best, score)
            if spec.threshold is not None:
                hit |= score is not None and score >= spec.threshold
            else:
                hit |= bool(flag)
        if not spec.categories and spec.threshold is None:
            hit |= r.flagged
        if spec.threshold is not None and not scores:
            raise RuntimeFailure("its answer has no `category_scores`, which the rule's threshold needs")
    if spec.categories and not seen:
        raise RuntimeFailure("its answer names none of the rule's categories; check their spelling "
                               "against the service's category names")
    return hit, None if best is None else round(best, 4)


def windows(text: str) -> list[str]:
    """The pieces of a text sent in separate calls: the text itself when short, else windows of
    MAX_INPUT_CHARS overlapping by WINDOW_OVERLAP, so a phrase at a cut is seen whole."""
    if len(text) <= MAX_INPUT_CHARS:
        return [text]
    step = MAX_INPUT_CHARS - WINDOW_OVERLAP
    return [text[i:i + MAX_INPUT_CHARS] for i in range(0, len(text) - WINDOW_OVERLAP, step)]


@dataclass(frozen=True, slots=True)
class Finding:
    """One classifier rule's outcome over the texts of a request: a hit (and the score), a pass,
    or `error`, the reason the service could not decide (then `on_error` applies)."""
    hit: bool
    score: float | None = None
    error: str = ""


# -- the service ----------------------------------------------------------------------------------

class Classifier:
    """Calls classification services for `classifier` rules. Handed the HTTP client (the
    proxy's pooled upstream client: it never follows a redirect and redacts the key it is given
    from answers) and the environment the keys are read from. Keeps the last CACHE_ENTRIES
    answers, keyed by a hash of url, model and text, so a conversation's earlier messages are
    not classified again on every turn. Failures are never cached."""

    def __init__(self, client: Any, environ: Any, cache_entries: int = CACHE_ENTRIES) -> None:
        self._client, self._environ = client, environ
        self._cache: "OrderedDict[bytes, tuple]" = OrderedDict()
        self._cache_entries = max(0, int(cache_entries))
        self.calls = 0           # service calls made (cache misses), for tests and figures

    @staticmethod
    def _key(spec: ClassifierSpec, text: str) -> bytes:
        h = hashlib.sha256()
        for part in (spec.url, spec.model, text):
            data = part.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "big"))
            h.update(data)
        return h.digest()

    def _cached(self, key: bytes) -> tuple | None:
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
        return found

    def _remember(self, key: bytes, results: tuple) -> None:
        if not self._cache_entries:
            return
        self._cache[key] = results
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_entries:
            self._cache.popitem(last=False)

    async def classify(self, spec: ClassifierSpec, texts: Iterable[str],
                       limit: "asyncio.Semaphore | None" = None) -> Finding:
        """One rule over texts: every window of every non-blank text, uncached ones called
        concurrently, the whole bounded by the rule's timeout."""
        keyed: dict[bytes, str] = {}
        for text in texts:
            if text and not text.isspace():
                for piece in windows(text):
                    keyed.setdefault(self._key(spec, piece), piece)
        if not keyed:
            return Finding(False)
        answers = {k: r for k in keyed if (r := self._cached(k)) is not None}
        missing = [k for k in keyed if k not in answers]
        if len(missing) > MAX_CALLS_PER_CHECK:
            return Finding(False, error=f"the request needs more than {MAX_CALLS_PER_CHECK} classification calls")
        if missing:
            key = ""
            if spec.api_key_env:
                key = self._environ.get(spec.api_key_env, "")
                if not key:
                    return Finding(False, error=f"the key variable {spec.api_key_env} is not set on the proxy")
            import asyncio  # not at the top: policies compile (rules.py) in commands that run no loop
            limit = limit or asyncio.Semaphore(MAX_CONCURRENT_CALLS)
            tasks = [asyncio.ensure_future(self._call(spec, keyed[k], key, limit)) for k in missing]
            try:
                done, pending = await asyncio.wait(tasks, timeout=spec.timeout, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for task in tasks:       # on a failure, a timeout or our own cancellation
                    task.cancel()
            failed = next(iter([t for t in done if t.exception() is not None]), None)   # each one retrieved
            if failed is not None:
                exc = failed.exception()
                if not isinstance(exc, RuntimeFailure):
                    raise exc
                return Finding(False, error=str(exc))
            if pending:
                return Finding(False, error=f"it did not answer within {spec.timeout:g} s")
            got = [t.result() for t in tasks]
            for k, results in zip(missing, got):
                self._remember(k, results)
                answers[k] = results
        try:
            hit, best = False, None
            for results in answers.values():
                h, score = judge(spec, results)
                hit |= h
                if score is not None:
                    best = score if best is None else max(best, score)
        except RuntimeFailure as exc:
            return Finding(False, error=str(exc))
        return Finding(hit, best)

    async def _call(self, spec: ClassifierSpec, text: str, key: str, limit: "asyncio.Semaphore") -> tuple:
        body = {"input": text}
        if spec.model:
            body["model"] = spec.model
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        parts = urllib.parse.urlsplit(spec.url)
        headers = [("host", parts.netloc), ("content-type", "application/json"), ("accept", "application/json"),
                   ("accept-encoding", "identity"), ("user-agent", "tokenomics-classifier"),
                   ("content-length", str(len(payload)))]
        if key:
            headers.append(("authorization", f"Bearer {key}"))
        async with limit:
            self.calls += 1
            try:
                answer = await self._client.request("POST", spec.url, headers, payload, spec.timeout, secret=key)
            except ProxyError as err:
                raise RuntimeFailure({"upstream_redirect": "it answered with a redirect (not followed)",
                                        "upstream_timeout": f"it did not answer within {spec.timeout:g} s"}
                                       .get(err.code, "it could not be reached")) from None
            data = await self._read(answer)
        if answer.status != 200:
            raise RuntimeFailure(f"it answered HTTP {answer.status}")
        return parse_answer(data)

    @staticmethod
    async def _read(answer: Any) -> bytes:
        """The answer's body, at most MAX_ANSWER_BYTES (a longer one is cut off and refused)."""
        pieces, size = [], 0
        chunks = answer.chunks()
        try:
            async for piece in chunks:
                size += len(piece)
                if size > MAX_ANSWER_BYTES:
                    answer.close()
                    raise RuntimeFailure(f"its answer is larger than {MAX_ANSWER_BYTES // 1024} KiB")
                pieces.append(piece)
        except ProxyError:
            raise RuntimeFailure("its answer broke off or could not be read") from None
        finally:
            await chunks.aclose()
        return b"".join(pieces)

    async def check(self, guard: Any, texts: list[str]) -> None:
        """Apply the classifier rules of a Guard (one direction) to the texts of one request or
        answer: all rules at once, then their actions in policy order. A hit is recorded with its
        score; `fail` raises the guard's violation; a service failure is a 500 guardrail_error
        unless the rule says `on_error: allow` (then it is logged and the text passes)."""
        rules = guard.classifiers
        if not rules:
            return
        import asyncio
        limit = asyncio.Semaphore(MAX_CONCURRENT_CALLS)
        findings = await asyncio.gather(*(self.classify(r.classifier, texts, limit) for r in rules))
        for rule, found in zip(rules, findings):
            if found.error:
                where = urllib.parse.urlsplit(rule.classifier.url).hostname
                if rule.classifier.on_error == "allow":
                    log.warning("classifier rule '%s': the service at %s failed (%s); the text passed unchecked "
                                "(on_error: allow)", rule.name, where, found.error)
                    continue
                log.warning("classifier rule '%s': the service at %s failed (%s); refused (on_error: fail)",
                            rule.name, where, found.error)
                what = "request" if guard._direction == "input" else "response"
                raise ProxyError(500, "guardrail_error",
                                 f"the classification service of rule '{rule.name}' failed ({found.error}); "
                                 f"nothing unchecked was forwarded, the {what} was refused. Retry; if it persists, "
                                 "check the service, or set the rule's on_error to allow")
            if found.hit:
                guard._record(rule, 1, found.score)
                if rule.action == "fail":
                    raise guard._violation(rule)


def input_texts(dialect: Any, body: dict) -> list[str]:
    """Every text the model reads, one per group of the dialect's input slots (adjacent text
    parts of a message joined, as the other rules scan them)."""
    return ["".join(holder[key] for holder, key in group) for group in dialect.input_groups(body)]


def output_texts(dialect: Any, answer: dict) -> list[str]:
    """Every text of a non-streamed answer."""
    return [holder[key] for holder, key in dialect.output_slots(answer)]
