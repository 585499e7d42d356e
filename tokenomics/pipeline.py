"""The governed story of one request: authenticate, parse, resolve, admit, guard, forward,
relay, settle, record."""

import asyncio
import contextlib
import json
import os
import re
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, TYPE_CHECKING

from .config import Config
from .dialects import Dialect, GOVERNED, check_model_name, dialect_family
from .errors import ProxyError
from .forward import RETRYABLE_CODES, Forwarder, rate_limit_meta
from .guard.anonymize import Anonymizer
from .guard.classifier import Classifier, input_texts, output_texts
from .guard.rules import Guard, json_bytes_in_pieces, scan_off_loop
from .guard.stream import GuardStage, StreamGuard
from .http.client import Upstream, UpstreamClient, UpstreamResponse
from .http.server import Request, Response, answer_output_bytes, error_response
from .http.sse import _deadline
from .limits.decide import BudgetLine, Refusal, budget_event, estimate_tokens
from .limits.prices import Usage, charged_usage, cost_usd, price_for
from .limits.journal import GroupCommit, UsageJournal
from .limits.state import MemoryState
from .policy import ResolvedPolicy, endpoint_listed, resolve_policy, select_upstream
from .providers import Catalog
from .records.exchange import Exchange
from .records.fanout import Records
from .relay import ObserveStage, StreamRelay, usage_meta
from .store import TokenRecord, TokenStore
from .translate import TranslateStage
from .util import DEFAULT_UPSTREAM_TIMEOUT, HASH_PREFIX, log, new_id, utc_iso

if TYPE_CHECKING:  # names used in annotations only
    from .limits.state import State


DEFAULT_OUTPUT_ALLOWANCE = 8192         # output tokens reserved when the client names no limit


                                        # unique in practice, short enough for tables
REQUEST_ID_PREFIX = "req_"              # never the tkn_ shape of a token: secret scanners flag those


MAX_JSON_DEPTH = 128                    # nesting levels in a request body; tool schemas use < 20, and


                                        # deeper bodies would exhaust the recursion of later walks

_OFF_LOOP_BYTES = 64 * 1024        # bodies above this are scanned in a worker thread: the


class _DuplicateKey(ValueError):
    """A JSON object in a request body names the same key twice."""


def _unique_keys(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey()
    return obj


_SURROGATE = re.compile("[\ud800-\udfff]")


def _json_tree_problem(value: Any) -> str:
    """What makes a parsed body unusable (too deep, a lone surrogate), or "". Iterative: the
    depth it is checking for must not cost a recursion of its own."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return f"nests deeper than {MAX_JSON_DEPTH} levels; flatten it"
        for key, item in (node.items() if isinstance(node, dict) else enumerate(node)):
            if isinstance(key, str) and not key.isascii() and _SURROGATE.search(key):
                return "has a lone UTF-16 surrogate (\\ud800-\\udfff) in a key; send valid Unicode"
            if isinstance(item, str):
                if not item.isascii() and _SURROGATE.search(item):
                    return "has a lone UTF-16 surrogate (\\ud800-\\udfff) in a string; send valid Unicode"
            elif isinstance(item, (dict, list)):
                stack.append((item, depth + 1))
    return ""


def _plainly_fine(raw: bytes) -> bool:
    """Whether the raw body cannot hold what _json_tree_problem looks for, so its walk can be
    skipped: in ASCII without NUL (which json reads as UTF-8) a lone surrogate needs a \\u
    escape, and nesting deeper than MAX_JSON_DEPTH needs more brackets than that."""
    return (isinstance(raw, bytes) and raw.isascii() and b"\\u" not in raw and b"\x00" not in raw
            and raw.count(b"{") + raw.count(b"[") <= MAX_JSON_DEPTH)


def credential(req: Request) -> str:
    """The client's token, from the places SDKs put it (§5 order)."""
    h = req.headers
    if h.get("x-api-key"):
        return h["x-api-key"].strip()
    auth = h.get("authorization", "").strip()
    if auth:
        return auth[7:].strip() if auth[:7].lower() == "bearer " else auth
    if h.get("x-goog-api-key"):
        return h["x-goog-api-key"].strip()
    if "key=" in req.query:
        for name, value in urllib.parse.parse_qsl(req.query, keep_blank_values=True):
            if name == "key":
                return value.strip()
    return ""


# What reading a body of a shape no adapter foresaw (a number where a list goes) raises: still
# the client's mistake, so a 400, never a 500.
_SHAPE_ERRORS = (TypeError, AttributeError, KeyError, IndexError, ValueError)


def shape_error(dialect: Dialect) -> ProxyError:
    return ProxyError(400, "invalid_request", f"the request body does not have the shape of a {dialect.name} "
                                              "request; check its field types against the API reference")


def check_request(dialect: Dialect, body: dict) -> None:
    """The adapter's shape check, before anything is decided."""
    try:
        dialect.check(body)
    except _SHAPE_ERRORS:
        raise shape_error(dialect) from None


COUNT_TOKENS_PATH = "/v1/messages/count_tokens"


# Paths with a fixed treatment (SPEC §5) -> the methods they answer; another method is a 405.
ROUTE_METHODS = {**{path: ("POST",) for path in GOVERNED}, COUNT_TOKENS_PATH: ("POST",),
                 "/v1/models": ("GET", "HEAD")}


STREAM_LEFT_READ = 0.05     # seconds a stream whose client left is still read (not relayed) before the
                            # upstream is cancelled: what it already sent (often its usage event) is on
                            # the wire within a round trip; longer would pay for output nobody reads
STREAM_LEFT_CAP = 1.0       # seconds that take-in may last in all, whatever the stages do (an output
                            # classifier judging an answer nobody receives must not hold the slot)


@dataclass(slots=True)
class Attempt:
    """One model's prepared request: where it goes, the bytes that go there, and the guards
    its answer passes through on the way back."""
    route: ResolvedPolicy
    admission: "Admission"
    upstream_dialect: Dialect
    upstream_body: dict
    payload: bytes
    strip_usage: bool
    wants_usage: bool
    anonymizer: "Anonymizer"
    guard_out: "Guard"

    def quiet_output(self) -> "Guard":
        """The output rules once more, their matches not counted again: for a text the answer
        repeats (Responses *.done events) and for what the conversation log keeps of it."""
        return self.route.guard("output", self.anonymizer, [])   # the route's plan: no sorting again


async def _tap(chunks: AsyncIterator[bytes], ex: "Exchange") -> AsyncIterator[bytes]:
    """Keep a copy of a streamed upstream body for the request log (only when it logs bodies)."""
    kept = []
    try:
        async for chunk in chunks:
            kept.append(chunk)
            yield chunk
    finally:
        ex.response_body = b"".join(kept)


class Admission:
    """What a request holds while it runs (a parallel slot, a budget reservation); `close`
    settles to the reported usage, or releases when there is none, exactly once."""

    def __init__(self, pipeline: "Pipeline", model: str, parallel_key: str | None, ex: "Exchange"):
        self.pipeline, self.model, self.parallel_key, self.ex = pipeline, model, parallel_key, ex
        self.reservation = None
        self.lines: list = []
        self.cap_changed = False
        self.closed = False

    def close(self, usage: "Usage | None", now: float) -> None:
        if self.closed:
            return
        self.closed = True
        p = self.pipeline
        if self.parallel_key is not None:
            p.state.leave(self.parallel_key)
        if self.reservation is None:
            return
        if usage is None:
            p.state.release(self.reservation)
            return
        p.state.settle(self.reservation, usage.total_tokens, p.price(self.ex, usage), now)
        self._budget_events(now)

    def abandon(self, err: BaseException, now: float) -> None:
        """Close after a failure once the request may have reached the upstream. Cancelled (the
        client left, the proxy is stopping) the outcome is unknown: charged in full, as after a
        crash; any other failure (nothing was answered) releases the hold."""
        if not isinstance(err, asyncio.CancelledError) or self.closed or self.reservation is None:
            self.close(None, now)
            return
        self.closed = True
        p = self.pipeline
        if self.parallel_key is not None:
            p.state.leave(self.parallel_key)
        p.state.settle(self.reservation, self.reservation.tokens, self.reservation.usd, now)
        self._budget_events(now)

    def _budget_events(self, now: float) -> None:
        p = self.pipeline
        if p.records.listening:
            for line in self.lines:
                used, _ = p.state.usage(line, now)
                self.ex.events.append(("budget.update", budget_event(line, used, line.cap, now)))


class _CompletingStream:
    """The client's stream with the exchange's ending attached: however it ends (read to the end,
    the client leaving mid-way, or never started because the client left first, when an async
    generator's own `finally` would never run), the answer is settled, recorded and made
    durable exactly once, before the stream's last chunk goes out."""

    def __init__(self, pipeline: "Pipeline", inner: AsyncIterator[bytes], ex: Exchange):
        self.pipeline, self.inner, self.ex = pipeline, inner, ex
        self.closed = False

    def __aiter__(self) -> "_CompletingStream":
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.inner.__anext__()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            await self.inner.aclose()
        if self.ex.end_stream is not None:
            with contextlib.suppress(Exception):
                await self.ex.end_stream()
        self.pipeline.complete(self.ex)
        if self.ex.governed:
            await self.pipeline.sync()  # before the last chunk: kill -9 loses no answered request


REFUSAL_STATUS = {"budget_exceeded": 429, "rate_limited": 429, "state_unavailable": 503}


def refusal_error(refusal: Refusal) -> ProxyError:
    """The HTTP error of a limits Refusal: its status by code, Retry-After when waiting helps."""
    headers = {"Retry-After": str(refusal.retry_after)} if refusal.retry_after is not None else None
    return ProxyError(REFUSAL_STATUS[refusal.code], refusal.code, refusal.message, headers=headers)


class Pipeline:
    """The proxy's request handler. It receives its collaborators (store, catalog, upstream
    client and the upstreams by scheme, state, usage journal, records), builds from them its
    Forwarder and its GroupCommit, and owns no I/O of its own beyond calling them."""

    def __init__(self, config: Config, store: TokenStore, catalog: Catalog, client: UpstreamClient,
                 state: "State | None" = None, journal: "UsageJournal | None" = None,
                 environ=None, clock: Callable[[], float] = time.time, records: "Records | None" = None,
                 upstreams: "dict[str, Upstream] | None" = None, classifier: "Classifier | None" = None):
        self.config, self.store, self.catalog, self.client = config, store, catalog, client
        self.state = state if state is not None else MemoryState()
        self.journal = journal
        self.pricing = config.pricing   # parsed by load_config
        self.environ = os.environ if environ is None else environ
        # Classification services of `classifier` rules, through the same client (no redirects, key redacted).
        self.classifier = classifier if classifier is not None else Classifier(client, self.environ)
        self.clock = clock
        self.records = records if records is not None else Records()
        self._in_flight = 0     # governed exchanges begun and not completed
        self.log_bodies = (config.logging.request_body, config.logging.response_body)
        self._expired_seen: set = set()
        self._unpriced: set = set()
        self.forwarder = Forwarder(client, upstreams, self.environ)
        self.commits = GroupCommit(journal, self.state, self.records.ledger)

    async def __call__(self, req: Request) -> Response:
        """One /v1 request, routed here by the Router (which has checked the path is canonical)."""
        path = req.path
        family = dialect_family(path)
        ex = Exchange(request_id=new_id(REQUEST_ID_PREFIX), endpoint=path, started=self.clock())
        try:
            methods = ROUTE_METHODS.get(path)
            if methods is not None and req.method not in methods:
                allow = ", ".join(methods)
                raise ProxyError(405, "method_not_allowed", f"{path} accepts {allow} only; send the request "
                                                            f"with {methods[0]}", headers={"Allow": allow})
            if dialect := GOVERNED.get(path):
                response = await self.governed(req, dialect, ex)
            else:
                response = await self.passthrough(req, ex)
        except ProxyError as err:
            ex.status, ex.error = err.status, err.code
            response = error_response(family, err)
        except Exception:  # a bug must cost one request, never the connection or the server
            log.exception("request %s failed", ex.request_id)
            ex.status, ex.error = 500, "internal_error"
            response = error_response(family, ProxyError(500, "internal_error", "the proxy failed on this "
                                                         "request; it was not forwarded. See the proxy log."))
        except BaseException:
            # Cancelled (the client left, the proxy is stopping): no longer in flight. Left
            # counted, every later request would take the group commit's thread hand-off, even alone.
            if ex.governed:
                self._in_flight -= 1
                self.records.metrics.inflight(-1)
            raise
        response.headers.append(("x-tokenomics-request-id", ex.request_id))
        if response.stream is None:
            self.complete(ex)
            if ex.governed:
                await self.sync()  # settlement and ledger line on disk before the answer leaves
        else:
            response.stream = _CompletingStream(self, response.stream, ex)
        return response

    def _begin(self, ex: Exchange) -> None:
        """Count a governed exchange in flight until complete()."""
        ex.governed = True
        self._in_flight += 1
        self.records.metrics.inflight(+1)

    async def sync(self) -> None:
        """Settlement and ledger line of every finished exchange on disk (the group commit)."""
        await self.commits.sync(alone=self._in_flight == 0)

    def complete(self, ex: Exchange) -> None:
        """Hand a finished exchange to the records; a failing record never fails the request."""
        if ex.governed:
            self._in_flight -= 1
        if ex.usage is not None and ex.cost_usd is None:   # not settled: priced here, once
            self.price(ex, ex.usage)
        try:
            self.records.complete(ex, self.clock())
        except Exception:
            log.exception("recording request %s failed", ex.request_id)

    def price(self, ex: Exchange, usage: Usage) -> float:
        """The exchange's usage and its cost, computed once: the settlement, the ledger, /stats,
        /metrics and the session totals all use this figure."""
        ex.usage, ex.cost_usd = usage, cost_usd(ex.model, usage, self.pricing)
        if usage.total_tokens and ex.model not in self._unpriced and price_for(ex.model, self.pricing) is None:
            if len(self._unpriced) < 1000:
                self._unpriced.add(ex.model)
                log.warning("model %r has no price: its requests count 0 USD; add it under `pricing:` in the "
                            "config", ex.model)
        return ex.cost_usd

    # -- steps ------------------------------------------------------------------------------------
    def authenticate(self, req: Request, ex: Exchange | None = None) -> TokenRecord:
        token = credential(req)
        if not token:
            raise ProxyError(401, "missing_token", "no API key was sent; pass your tkn_ token as the API key "
                                                   "(Authorization: Bearer or x-api-key)")
        now = self.clock()
        record = self.store.authenticate(token, now)
        if record is None:
            raise ProxyError(401, "invalid_token", "the API key is not a valid tokenomics token; it may have "
                                                   "been deleted; ask for a new one")
        if record.expired(now):
            if record.hash not in self._expired_seen and len(self._expired_seen) < 100_000:
                self._expired_seen.add(record.hash)
                self.records.emit("token.expired", {"token_hash": record.hash[:HASH_PREFIX],
                                                    "expires_at": utc_iso(record.expires_at)})
            raise ProxyError(401, "token_expired", f"this token expired at {utc_iso(record.expires_at)}; "
                                                   "ask its owner to renew it")
        if ex is not None:
            ex.token_hash, ex.metadata = record.hash, record.policy.metadata
        return record

    @staticmethod
    def parse_body(raw: bytes) -> dict:
        """The body as one JSON object, or a 400. Refused as well: a key repeated in an object
        (the upstream might read another copy than the guard did), a lone UTF-16 surrogate (it
        cannot be re-encoded for the upstream) and nesting deeper than MAX_JSON_DEPTH."""
        try:
            body = json.loads(raw, object_pairs_hook=_unique_keys)
        except _DuplicateKey:
            raise ProxyError(400, "invalid_request", "the request body repeats a key inside one JSON object; "
                                                     "send each key once") from None
        except RecursionError:
            raise ProxyError(400, "invalid_request", f"the request body nests deeper than {MAX_JSON_DEPTH} "
                                                     "levels; flatten it") from None
        except (ValueError, UnicodeDecodeError):
            raise ProxyError(400, "invalid_request", "the request body is not valid JSON (UTF-8)") from None
        if not isinstance(body, dict):
            raise ProxyError(400, "invalid_request", "the request body must be a JSON object")
        problem = "" if _plainly_fine(raw) else _json_tree_problem(body)
        if problem:
            raise ProxyError(400, "invalid_request", f"the request body {problem}")
        return body

    async def governed(self, req: Request, dialect: Dialect, ex: Exchange) -> Response:
        """The story of a governed request: authenticate, parse, then for the model and each
        fallback: resolve, guard, admit, forward with retries; relay and settle the answer."""
        self._begin(ex)
        record = self.authenticate(req, ex)
        body = self.parse_body(req.body)
        ex.model = model = dialect.model(body)
        ex.stream = dialect.is_stream(body)
        check_request(dialect, body)
        models = (model,) + tuple(m for m in record.policy.retry.fallbacks if m != model)
        for index, candidate in enumerate(models):
            last = index == len(models) - 1
            try:
                attempt = await self.prepare(req, record, dialect,
                                             body if index == 0 else self.parse_body(req.body), candidate, ex)
            except ProxyError:
                if index == 0 or last:
                    raise
                continue  # this fallback is not allowed or has no budget left: try the next one
            ex.fallback_model = candidate if index else ""
            self.commits.write_ahead()  # the reservation is in the journal before anything leaves
            try:
                upstream = await self.forwarder.forward(req, attempt.route, attempt.payload, ex,
                                                        attempt.upstream_dialect, attempt.upstream_body)
            except BaseException as err:
                attempt.admission.abandon(err, self.clock())
                if isinstance(err, ProxyError) and err.code in RETRYABLE_CODES and not last:
                    continue
                raise
            if upstream.status in record.policy.retry.retry_on and not last:
                await self.forwarder.discard(upstream)
                attempt.admission.close(None, self.clock())
                continue
            try:
                return await self.respond(attempt, upstream, dialect, ex)
            except BaseException as err:
                attempt.admission.abandon(err, self.clock())
                raise
        raise AssertionError("unreachable: the last model always returns or raises")

    async def prepare(self, req: Request, record: TokenRecord, dialect: Dialect, body: dict, model: str,
                      ex: Exchange) -> "Attempt":
        """Everything decided before a model's request leaves: route, limits, prompts, dialect."""
        renamed = body.get("model") != model
        if renamed:
            body["model"] = model
        route = resolve_policy(record.policy, model, self.catalog, self.config,
                               native_provider="anthropic" if dialect.family == "anthropic" else "openai")
        ex.model, ex.provider, ex.key_env = model, route.provider.name, route.base_key_env
        upstream_dialect = self.upstream_dialect(dialect, route)
        admission = self.admit(record, route, dialect, body, len(req.body), ex)
        try:
            changed = admission.cap_changed or renamed
            ex.rule_matches.clear()  # a fallback rescans the same content: count it once
            anonymizer = Anonymizer()
            guard = route.guard("input", anonymizer, ex.rule_matches)
            if guard.active and len(req.body) > _OFF_LOOP_BYTES:   # a long scan must not stall the loop
                changed |= await scan_off_loop(self.guard_input, guard, dialect, body)
            else:
                changed |= self.guard_input(guard, dialect, body)
            if guard.classifiers:   # after the local rules: masked and anonymized values never reach the service
                await self.classifier.check(guard, input_texts(dialect, body))
            spec = route.policy.memory or self.config.ledger.memory
            if spec and spec.get("enabled", True):
                ex.memory = spec
                ex.memory_entries = [("user", dialect.last_user_text(body))]
            if route.prompts:
                dialect.inject_prompts(body, route.prompts)
                changed = True
            wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            strip_usage = False
            upstream_body = self.translate_request(dialect, upstream_dialect, body, route)
            if upstream_body is not None:
                payload = json.dumps(upstream_body, ensure_ascii=False).encode("utf-8")
            else:
                if ex.stream and dialect.ask_stream_usage(body):
                    strip_usage = changed = True
                upstream_body = body
                if changed and len(req.body) > _OFF_LOOP_BYTES:
                    payload = await scan_off_loop(json_bytes_in_pieces, body)
                else:
                    payload = json.dumps(body, ensure_ascii=False).encode("utf-8") if changed else req.body
        except BaseException:
            admission.close(None, self.clock())
            raise
        if self.log_bodies[0]:
            ex.request_body = payload
        return Attempt(route, admission, upstream_dialect, upstream_body, payload, strip_usage, wants_usage,
                       anonymizer, route.guard("output", anonymizer, ex.rule_matches))

    @staticmethod
    def guard_input(guard: "Guard", dialect: Dialect, body: dict) -> bool:
        """Input rules over every text the model will read; True when a text was rewritten.
        Runs before the policy's prompts are injected: those are not inspected."""
        if not guard.active:
            return False
        changed = False
        try:
            for group in dialect.input_groups(body):
                texts = [holder[key] for holder, key in group]
                for (holder, key), old, new in zip(group, texts, guard.scan_parts(texts)):
                    if new != old:
                        holder[key] = new
                        changed = True
        except ProxyError:
            raise
        except Exception as exc:                 # fail closed: nothing unchecked leaves
            raise guard._internal_error(None) from exc
        return changed

    @staticmethod
    def guard_output(attempt: "Attempt", dialect: Dialect, answer: dict) -> tuple[bool, list[str]]:
        """Output rules and restoration over every text of a non-streamed answer:
        (whether a text was rewritten, the texts as the conversation log keeps them)."""
        changed, said = False, []
        guard = attempt.guard_out if attempt.guard_out.active else None
        try:
            for holder, key in dialect.output_slots(answer):
                text = holder[key]
                scanned = guard.scan(text) if guard is not None else text
                said.append(scanned)  # the conversation log keeps masks and placeholders
                new = attempt.anonymizer.restore(scanned)
                if new != text:
                    holder[key] = new
                    changed = True
        except ProxyError:
            raise
        except Exception as exc:                 # fail closed
            raise attempt.guard_out._internal_error(None) from exc
        return changed, said

    @staticmethod
    def masked_output(attempt: "Attempt") -> Callable[[str], str]:
        """What the conversation log keeps of an answer: output rules applied, placeholders kept."""
        if not attempt.guard_out.active:
            return lambda text: text
        quiet = attempt.quiet_output()

        def mask(text: str) -> str:
            try:
                return quiet.scan(text)
            except ProxyError:
                return "[withheld: an output rule blocked this answer]"
        return mask

    def stream_relay(self, attempt: "Attempt", dialect: Dialect, ex: Exchange, channel: Callable | None,
                     whole: Callable[[str], str] | None) -> StreamRelay:
        """The stages a streamed answer passes through on its way to the client: observe the
        upstream's usage, translate when the upstream speaks the other dialect, guard when
        output rules or restoration apply (`channel`, `whole`: see output_guards) or the text is
        collected; parsed before, written after."""
        upstream_dialect = attempt.upstream_dialect
        translator = dialect.stream_translator(upstream_dialect, ex.model, attempt.wants_usage)
        observe = ObserveStage(upstream_dialect, count_usage=translator is None, strip_usage=attempt.strip_usage)
        end_check = self.stream_classifiers(attempt)
        collect = ex.memory is not None or end_check is not None
        guard = GuardStage(dialect, channel, whole, collect) if channel is not None or collect else None
        return StreamRelay(dialect, ex, observe, TranslateStage(translator) if translator is not None else None,
                           guard, log_text=self.masked_output(attempt), end_check=end_check)

    def output_guards(self, attempt: "Attempt", ex: Exchange):
        """(stream channel factory, whole-text transformer) for output rules and restoration,
        or (None, None) when the answer passes untouched."""
        guard = attempt.guard_out if attempt.guard_out.active else None
        anonymizer = attempt.anonymizer if attempt.anonymizer.max_placeholder_len else None
        if guard is None and anonymizer is None:
            return None, None
        holdback = self.config.guardrails.stream_holdback
        # Events that repeat a whole text (Responses *.done) are rewritten the same way, with
        # their matches not counted twice.
        quiet = attempt.quiet_output() if guard is not None else None

        def whole(text: str) -> str:
            text = quiet.scan(text) if quiet is not None else text
            return anonymizer.restore(text) if anonymizer is not None else text
        return (lambda: StreamGuard(guard, anonymizer, holdback)), whole

    def stream_classifiers(self, attempt: "Attempt") -> "Callable[[str], Any] | None":
        """Output classifier rules of a stream: run once on the whole text when the upstream's
        stream ends, before the relay's last flush (the text before it has been relayed)."""
        guard = attempt.guard_out
        if not guard.classifiers:
            return None
        return lambda text: self.classifier.check(guard, [text])

    async def respond(self, attempt: "Attempt", upstream: UpstreamResponse, dialect: Dialect,
                      ex: Exchange) -> Response:
        """Relay the upstream's answer in the client's dialect and settle the reservation."""
        model, upstream_dialect, admission = ex.model, attempt.upstream_dialect, attempt.admission
        headers = self.forwarder.client_headers(upstream, ex, upstream.decoded)
        ex.status = upstream.status
        ex.provider_meta = rate_limit_meta(upstream.header_map)
        if upstream.status != 200:
            data = dialect.translate_error(await upstream.read(), upstream_dialect)
            admission.close(None, self.clock())
            return Response(upstream.status, headers, data)
        channel, whole = self.output_guards(attempt, ex)
        if ex.stream:
            relay = self.stream_relay(attempt, dialect, ex, channel, whole)
            stream = self._finish_stream(relay, upstream, admission, len(attempt.payload))

            async def end_stream() -> None:
                await stream.aclose()  # runs its ending if it started ...
                self._settle_stream(relay, upstream, admission, len(attempt.payload))  # ... else this does
            ex.end_stream = end_stream
            # Pull the first bytes before answering, so that an output rule that fails this early
            # (or an oversized first event) is a plain error rather than an error event in a 200 stream.
            try:
                first = await stream.__anext__()
            except StopAsyncIteration:
                return Response(200, headers, b"")
            return Response(200, headers, first, stream=stream)   # `first` leaves with the status line
        data = await upstream.read()
        if self.log_bodies[1]:
            ex.response_body = data
        answer, rewrite = None, False   # rewrite: `data` is written anew from `answer`, once, at the end
        if "json" in upstream.header_map.get("content-type", "application/json"):
            with contextlib.suppress(ValueError):
                answer = json.loads(data)
        if isinstance(answer, dict):
            ex.usage = upstream_dialect.usage(answer)
            ex.upstream_id = str(answer.get("id", ""))
            ex.provider_meta.update(upstream_dialect.response_meta(answer))
            translated = dialect.translate_response(answer, upstream_dialect, model)
            if translated is not None:
                answer, rewrite = translated, True
        if ex.usage is not None:
            ex.provider_meta.update(usage_meta(ex.usage))
        # An answer without usage is charged the proxy's own count of the text in and out.
        ex.usage = charged_usage(ex.usage or Usage(), estimate_tokens(len(attempt.payload)),
                                 estimate_tokens(answer_output_bytes(answer) if isinstance(answer, dict)
                                                 else len(data)), complete=True)
        admission.close(ex.usage, self.clock())  # the tokens were spent, whatever the output rules say
        if whole is not None and not isinstance(answer, dict):
            # Fail closed: the output rules read JSON documents; an answer that is not one would
            # reach the client unchecked.
            raise ProxyError(500, "guardrail_error", "the upstream's answer is not a JSON object, so the output "
                                                     "rules could not check it; it was not relayed")
        if isinstance(answer, dict) and attempt.guard_out.classifiers:
            await self.classifier.check(attempt.guard_out, output_texts(dialect, answer))
        if isinstance(answer, dict) and (whole is not None or ex.memory is not None):
            if len(data) > _OFF_LOOP_BYTES and whole is not None:   # a long scan must not stall the loop
                changed, said = await scan_off_loop(self.guard_output, attempt, dialect, answer)
            else:
                changed, said = self.guard_output(attempt, dialect, answer)
            if ex.memory is not None:
                ex.memory_entries.append(("assistant", "".join(said)))
            # Guarded, the answer goes out as parsed and scanned, never as received: JSON that
            # repeats a key parses to its last copy, while the client might read the first.
            rewrite = rewrite or changed or whole is not None
        if rewrite:
            data = json.dumps(answer, ensure_ascii=False).encode("utf-8")
        return Response(200, headers, data)

    def upstream_dialect(self, dialect: Dialect, route: ResolvedPolicy) -> Dialect:
        """The dialect the upstream speaks for this request: the client's own, or the other one
        of chat ⇄ messages when the model's provider speaks the other family."""
        if self.forwarder.upstream_for(route.upstream_url).speaks_every_dialect:
            return dialect
        upstream = dialect.speaking(route.provider.dialect)
        if upstream is not None:
            return upstream
        raise ProxyError(400, "invalid_request",
                         f"model '{route.model}' is served by provider '{route.provider.name}' "
                         f"({route.provider.dialect} dialect); {dialect.name} requests can only be translated "
                         "between /v1/chat/completions and /v1/messages")

    @staticmethod
    def translate_request(dialect: Dialect, upstream: Dialect, body: dict, route: ResolvedPolicy) -> dict | None:
        """The body in the upstream's dialect; None when it speaks the client's."""
        try:
            return dialect.translate_request(body, upstream, route.provider.name)
        except _SHAPE_ERRORS:
            raise shape_error(dialect) from None

    async def _finish_stream(self, relay: "StreamRelay", upstream: UpstreamResponse, admission: "Admission",
                             sent_bytes: int) -> AsyncIterator[bytes]:
        """The client's stream; the reservation is settled (and journaled) before it ends."""
        chunks = upstream.chunks()
        if self.log_bodies[1]:
            chunks = _tap(chunks, relay.ex)
        run = relay.run(chunks)
        try:
            async for out in run:
                yield out
        finally:
            if not relay.complete:
                await self._read_what_was_sent(run, upstream)
            await run.aclose()  # its own finally (usage into the exchange) must run now, not at GC
            self._settle_stream(relay, upstream, admission, sent_bytes)

    def _settle_stream(self, relay: "StreamRelay", upstream: UpstreamResponse, admission: "Admission",
                       sent_bytes: int) -> None:
        """Cancel the upstream if its stream had not ended and settle, once. Charged what the
        upstream produced: its usage when the stream ended with one, else the larger of what it
        reported so far and the proxy's own count of the input and of every output text
        received (relayed to the client or not)."""
        upstream.close()
        if admission.closed:
            return
        relay.ex.usage = usage = charged_usage(relay.usage, estimate_tokens(sent_bytes),
                                               estimate_tokens(relay.output_bytes), relay.complete)
        admission.close(usage, self.clock())

    @staticmethod
    async def _read_what_was_sent(run: AsyncIterator[bytes], upstream: UpstreamResponse) -> None:
        """The client left (or the relay failed) before the upstream's stream ended: take in, without
        relaying, what the upstream sends for STREAM_LEFT_READ seconds more (its usage event is often
        among it), then what has already arrived, so the charge is the upstream's own figure where
        it can be, and never less than what it sent before the proxy stopped reading."""
        upstream.read_until(STREAM_LEFT_READ)
        with contextlib.suppress(Exception):  # StreamStopped, the upstream breaking, an output rule
            async with _deadline(STREAM_LEFT_CAP):
                async for _ in run:
                    pass

    def budget_lines(self, record: TokenRecord, route: ResolvedPolicy) -> list:
        key = record.hash[:HASH_PREFIX]
        lines = []
        if route.max_tokens is not None:
            scoped = route.matched is not None and route.matched.max_tokens is not None
            lines.append(BudgetLine(f"{key}:{route.matched.name}{route.matched.index}" if scoped else key,
                                    "tokens", "total", route.max_tokens))
        lines += [BudgetLine(key, unit, period, cap) for unit, period, cap in route.policy.budget]
        return lines

    def admit(self, record: TokenRecord, route: ResolvedPolicy, dialect: Dialect, body: dict,
              body_len: int, ex: Exchange) -> "Admission":
        """Rate limits, parallel slots and the budget reservation, before anything is forwarded.
        Lowers the request's output cap to what the budget (or the policy) allows."""
        now = self.clock()
        policy = route.policy
        key = record.hash[:HASH_PREFIX]
        # The policy's prompts are injected after admission: count them in the estimate too.
        estimate = estimate_tokens(body_len + sum(len(p.content) + 32 for p in route.prompts))
        if policy.rate_rules:
            self.check(self.state.admit(key, policy.rate_rules, now, tokens=estimate), ex)
        if policy.max_parallel is not None:
            self.check(self.state.enter(key, policy.max_parallel), ex)
        admission = Admission(self, route.model, key if policy.max_parallel is not None else None, ex)
        try:
            requested = dialect.requested_output(body)
            allowance = requested or DEFAULT_OUTPUT_ALLOWANCE
            cap = None
            if route.max_output_tokens is not None and allowance > route.max_output_tokens:
                allowance = cap = route.max_output_tokens
            elif route.max_output_tokens is not None and requested is None:
                cap = allowance = route.max_output_tokens
            lines = self.budget_lines(record, route)
            if not dialect.produces_output:
                allowance, cap = 0, None
            if lines:
                price = price_for(route.model, self.pricing) or (0.0, 0.0, 0.0)
                usd = (estimate * price[0] + allowance * price[2]) / 1e6
                verdict = self.state.reserve(lines, estimate + allowance, usd, now,
                                             min_tokens=estimate + (1 if allowance else 0),
                                             usd_per_token=price[2] / 1e6)
                res, granted = self.check(verdict, ex)
                admission.reservation, admission.lines = res, lines
                if dialect.produces_output:
                    cap = min(granted - estimate, cap or granted)  # a hard cap needs a bound upstream
            if cap is not None and cap != requested:
                dialect.set_output_cap(body, max(1, cap), route.provider)
                admission.cap_changed = True
        except BaseException:
            admission.close(None, now)
            raise
        return admission

    @staticmethod
    def check(verdict, ex: Exchange):
        """A State verb's verdict: a Refusal becomes the client's error here, and only here (its
        event goes to the exchange's records); anything else is handed back."""
        if not isinstance(verdict, Refusal):
            return verdict
        if verdict.event is not None:
            ex.events.append(verdict.event)
        raise refusal_error(verdict)

    async def passthrough(self, req: Request, ex: Exchange) -> Response:
        """Any other /v1 path: only count_tokens and what the token's policy lists in `endpoints`;
        model-checked when a JSON body names a model, rate-limited, recorded, and forwarded
        with the real key swapped in."""
        self._begin(ex)
        record = self.authenticate(req, ex)
        policy, path = record.policy, req.path
        # Another spelling of a fixed path (a trailing '/', capitals, a ';param' some servers drop)
        # never passes through, whatever pattern covers it.
        spelled = path.partition(";")[0].rstrip("/").lower()
        if path != COUNT_TOKENS_PATH and (spelled in ROUTE_METHODS or not endpoint_listed(policy.endpoints, path)):
            raise ProxyError(403, "endpoint_not_allowed", "this token may not call this path: beyond the governed "
                             "endpoints, /v1/models and /v1/messages/count_tokens it reaches only the paths its "
                             "policy lists in `endpoints`; ask the token's owner to add it")
        native = "anthropic" if dialect_family(path) == "anthropic" else "openai"
        body = self.passthrough_json(req)
        if body is not None and "model" in body:
            ex.model = check_model_name(body["model"])
            resolve_policy(policy, ex.model, self.catalog, self.config, native_provider=native)
        request_rules = tuple(rule for rule in policy.rate_rules if rule.kind == "requests")
        if request_rules:
            self.check(self.state.admit(record.hash[:HASH_PREFIX], request_rules, self.clock()), ex)
        provider, base_url = select_upstream(policy, None, self.catalog, self.config, native)
        if not self.forwarder.upstream_for(base_url).serves_passthrough:
            raise ProxyError(404, "not_found", f"the mock provider does not serve {req.path}")
        key_env = record.policy.base_key_env or provider.api_key_env
        ex.provider, ex.key_env = provider.name, key_env
        upstream = await self.forwarder.send(req, provider, base_url, key_env, req.body,
                                             record.policy.timeout or DEFAULT_UPSTREAM_TIMEOUT, ex)
        headers = self.forwarder.client_headers(upstream, ex, decoded=upstream.decoded)
        ex.status = upstream.status
        return Response(upstream.status, headers, stream=upstream.chunks())

    def passthrough_json(self, req: Request) -> dict | None:
        """A passthrough body the upstream may read as JSON (declared so, or shaped so), parsed as
        strictly as a governed one; None for other bodies (multipart uploads, audio)."""
        declared = "json" in req.headers.get("content-type", "").lower() and req.body.strip()
        if not declared and req.body.lstrip()[:1] != b"{":
            return None
        return self.parse_body(req.body)


                                # seconds to the upstream's first byte: a local stub answers in
                                # ms, a hosted reasoning model can take a minute
