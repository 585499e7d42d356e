"""RedisState: the State verbs as atomic Lua scripts on a shared Redis, so that many proxy
processes on many hosts enforce one set of budgets, rate limits and parallel slots (SPEC §12).

Keys, all under `session.redis.prefix` (default ``tokenomics:``):
  rl:<key>:<rule>       rate window: ZSET of admissions (sliding), hash {index,count} (fixed) or
                        {level,last} (bucket), with a meta hash <..>:m {total,seq} for sliding;
                        each expires one window after its last use, so memory per rule is bounded
  par:<key>             parallel slots: ZSET slot id -> lease deadline (ms, Redis server time)
  b:<key>:<unit>:<period>  budget counter hash {ws, used, reserved}; expires a period after its
                        window ends (lifetime counters are kept)
  res:<id>              a write-ahead reservation: hash counter key -> hold
  leases                ZSET reservation id -> lease deadline (ms)
Leases are renewed by a background thread while their request runs; a reservation whose lease
ran out (its process died) is charged in full by whichever process reaps it next, and a dead
process's parallel slots simply expire. The arithmetic stays in limits.decide: scripts return
the raw facts (what fits, the instant room comes back) and Python decides the grant and the
Retry-After. Redis unreachable: admission verbs answer state_unavailable at once (fail closed)
while the thread reconnects with backoff; settlements wait in a bounded queue until it is back."""

import collections
import hashlib
import importlib.util
import itertools
import math
import os
import secrets
import threading
import time

from ..limits.decide import (BudgetLine, Counter, RateRule, Refusal, Reservation, _NANO, counter_cap,
                             decide_grant, fixed_wait, parallel_refusal, rate_refusal, rate_weight,
                             sliding_wait, bucket_wait, tightest_lines, unavailable, window_bounds)
from ..limits.state import State
from ..util import log

# Optional (the `redis` extra), and imported only by a proxy that uses it: redis-py costs about
# 0.1 s to import, which every other command and start would pay.
HAVE_REDIS = importlib.util.find_spec("redis") is not None

MISSING_REDIS = ("session.backend: redis needs the redis package: pip install 'tokenomics[redis]' "
                 "(or python3 -m pip install redis)")

LEASE_SECONDS = 10.0        # a slot or reservation of a dead process comes back within this
RENEWALS_PER_LEASE = 3     # so one slow round trip never loses a lease
BACKOFF_FIRST, BACKOFF_MAX = 0.05, 1.0   # seconds between reconnection attempts: recovery within ~1 s
SOCKET_TIMEOUT = 1.0        # seconds; a verb runs on the event loop, so a dead server must fail fast
MAX_UNSENT = 100_000        # settlements kept while Redis is down (~100 B each): ~10 MB at most
GRANT_ATTEMPTS = 32         # optimistic grant retries when another process took the room meanwhile
REAP_BATCH = 100            # expired reservations charged per reap call


def redis_client(config):
    """A redis-py client for `session.redis` (addr host:port or a redis:// URL), no retries of its
    own: reconnection is RedisState's job. RuntimeError with MISSING_REDIS without the package."""
    if not HAVE_REDIS:
        raise RuntimeError(MISSING_REDIS)
    import redis as _redis
    from redis.backoff import NoBackoff as _NoBackoff
    from redis.retry import Retry as _Retry
    opts = dict(socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT,
                retry=_Retry(_NoBackoff(), 0))
    addr = config.addr
    if "://" in addr:
        return _redis.Redis.from_url(addr, **opts)
    host, _, port = addr.rpartition(":")
    return _redis.Redis(host=host or "127.0.0.1", port=int(port or 6379), db=config.db,
                        password=config.password or None, **opts)


class _Script:
    """A Lua script run by EVALSHA. When Redis has forgotten it (a restart, SCRIPT FLUSH) it runs
    by EVAL, which caches it again in the same round trip. redis-py's own register_script loads
    it and retries EVALSHA instead, which fails again when the flush lands between the two, and
    any failure here reads as Redis being down."""

    def __init__(self, client, text: str):
        from redis.exceptions import NoScriptError
        self._client, self._text, self._missing = client, text, NoScriptError
        self._sha = hashlib.sha1(text.encode()).hexdigest()

    def __call__(self, keys: list, args: list):
        try:
            return self._client.evalsha(self._sha, len(keys), *keys, *args)
        except self._missing:
            return self._client.eval(self._text, len(keys), *keys, *args)


def _expire_ms(ws: float, end: float, now: float) -> int:
    """How long a budget counter is kept: until a whole period after its window ended (0: for
    ever, a lifetime one). Relative to the caller's clock, not Redis's."""
    return 0 if end == math.inf else max(1000, int((2 * end - ws - now) * 1000))


def shown_addr(addr: str) -> str:
    """The address for messages: a redis:// URL's credentials never reach a log or a client."""
    scheme, sep, rest = addr.rpartition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}"


def _num(x: float) -> str:
    return repr(float(x))  # exact: Lua's tonumber and Redis's strtod read it back bit for bit


# -- scripts --------------------------------------------------------------------------------------
# Numbers go back to Python as strings ("%.17g" keeps a double exact); Lua numbers returned as
# such would be truncated to integers by Redis.

_ADMIT = r"""
local now = tonumber(ARGV[1])
local n = (#ARGV - 1) / 5
local out, refused, plan = {}, false, {}
local function f(x) return string.format('%.17g', x) end
for i = 1, n do
  local b = 1 + (i - 1) * 5
  local strategy, limit, window, w = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  local weighted = ARGV[b + 5] == '1'
  local k = KEYS[i]
  if strategy == 'sliding' then
    local m = k .. ':m'
    local total = tonumber(redis.call('HGET', m, 'total') or '0')
    local trimmed = false
    while true do
      local e = redis.call('ZRANGE', k, 0, 0, 'WITHSCORES')
      if #e == 0 or tonumber(e[2]) + window > now then break end
      redis.call('ZREM', k, e[1])
      local wt = 1
      if weighted then wt = tonumber(string.match(e[1], ':(%d+)$')) end
      total = total - wt
      trimmed = true
    end
    if trimmed then redis.call('HSET', m, 'total', total) end
    local excess = total + w - limit
    if excess > 0 then
      local ready
      if not weighted then
        local e = redis.call('ZRANGE', k, excess - 1, excess - 1, 'WITHSCORES')
        ready = tonumber(e[2]) + window
      else
        local all = redis.call('ZRANGE', k, 0, -1, 'WITHSCORES')
        local freed = 0
        ready = tonumber(all[#all]) + window
        for j = 1, #all, 2 do
          freed = freed + tonumber(string.match(all[j], ':(%d+)$'))
          if freed >= excess then ready = tonumber(all[j + 1]) + window break end
        end
      end
      refused = true
      out[#out + 1] = '1'; out[#out + 1] = f(ready); out[#out + 1] = ''
    else
      out[#out + 1] = '0'; out[#out + 1] = ''; out[#out + 1] = ''
      plan[i] = {strategy, k, w, window, total}
    end
  elseif strategy == 'fixed' then
    local index = math.floor(now / window)
    local cur = redis.call('HMGET', k, 'index', 'count')
    local count = 0
    if cur[1] and tonumber(cur[1]) >= index then index = tonumber(cur[1]); count = tonumber(cur[2]) end
    if count + w > limit then
      refused = true
      out[#out + 1] = '1'; out[#out + 1] = f(index); out[#out + 1] = ''
    else
      out[#out + 1] = '0'; out[#out + 1] = ''; out[#out + 1] = ''
      plan[i] = {strategy, k, w, window, index, count}
    end
  else
    local cur = redis.call('HMGET', k, 'level', 'last')
    local level, last = limit, now
    if cur[1] then level = tonumber(cur[1]); last = tonumber(cur[2]) end
    if now > last then
      level = math.min(limit, level + (now - last) * (limit / window)); last = now
    end
    if level < w then
      refused = true
      out[#out + 1] = '1'; out[#out + 1] = f(level); out[#out + 1] = f(last)
    else
      out[#out + 1] = '0'; out[#out + 1] = ''; out[#out + 1] = ''
      plan[i] = {strategy, k, w, window, level, last}
    end
  end
end
if refused then return out end
for i = 1, n do
  local p = plan[i]
  local strategy, k, w, window = p[1], p[2], p[3], p[4]
  local ttl = math.ceil(window * 1000) + 1000
  if strategy == 'sliding' then
    if w > 0 then
      local m = k .. ':m'
      local touched = tonumber(redis.call('HGET', m, 'touched') or '-1e308')
      local t = now
      if touched > now then t = touched end
      local seq = redis.call('HINCRBY', m, 'seq', 1)
      redis.call('ZADD', k, f(t), seq .. ':' .. w)
      redis.call('HSET', m, 'total', p[5] + w, 'touched', f(t))
      redis.call('PEXPIRE', k, ttl); redis.call('PEXPIRE', m, ttl)
    end
  elseif strategy == 'fixed' then
    redis.call('HSET', k, 'index', f(p[5]), 'count', p[6] + w)
    redis.call('PEXPIRE', k, ttl)
  else
    redis.call('HSET', k, 'level', f(p[5] - w), 'last', f(p[6]))
    redis.call('PEXPIRE', k, ttl)
  end
end
return {}
"""

_NOW_MS = "local t = redis.call('TIME'); local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"

_ENTER = _NOW_MS + r"""
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local max = tonumber(ARGV[1])
if max >= 0 and redis.call('ZCARD', KEYS[1]) >= max then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], 3 * tonumber(ARGV[3]))
return 1
"""

# KEYS: counters..., res, leases. ARGV: id, lease_ms, then per counter: ws, expire_ms (0: none),
# cap, hold. Holds everything when every counter still has room, else returns the counters.
_RESERVE = _NOW_MS + r"""
local n = #KEYS - 2
local rows, fits = {}, true
for i = 1, n do
  local b = 2 + (i - 1) * 4
  local ws, cap, hold = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  local c = redis.call('HMGET', KEYS[i], 'ws', 'used', 'reserved')
  local used, reserved = tonumber(c[2] or '0'), tonumber(c[3] or '0')
  if c[1] and tonumber(c[1]) < ws then used = 0 end
  rows[i] = {used, reserved}
  if hold > 0 and used + reserved + hold > cap then fits = false end
end
if not fits then
  local out = {0}
  for i = 1, n do out[#out + 1] = rows[i][1]; out[#out + 1] = rows[i][2] end
  return out
end
for i = 1, n do
  local b = 2 + (i - 1) * 4
  local ws, exp, hold = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 4])
  local c = redis.call('HGET', KEYS[i], 'ws')
  if (not c) or tonumber(c) < tonumber(ws) then redis.call('HSET', KEYS[i], 'ws', ws, 'used', 0) end
  redis.call('HINCRBY', KEYS[i], 'reserved', hold)
  if exp > 0 then redis.call('PEXPIRE', KEYS[i], exp) end
  redis.call('HSET', KEYS[n + 1], KEYS[i], hold)
end
redis.call('ZADD', KEYS[n + 2], now + tonumber(ARGV[2]), ARGV[1])
return {1}
"""

# KEYS: res, leases, counters... ARGV: id, then per counter: ws, spent, expire_ms (0: none). A reservation already
# reaped (its lease ran out) was charged in full: nothing more is charged.
_SETTLE = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 3, #KEYS do
  local b = 2 + (i - 3) * 3
  local ws, spent, exp = tonumber(ARGV[b]), tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local hold = tonumber(redis.call('HGET', KEYS[1], KEYS[i]) or '0')
  local c = redis.call('HMGET', KEYS[i], 'ws', 'reserved')
  if (not c[1]) or tonumber(c[1]) < ws then
    redis.call('HSET', KEYS[i], 'ws', ARGV[b], 'used', 0)
    if exp > 0 then redis.call('PEXPIRE', KEYS[i], exp) end
  end
  local left = tonumber(c[2] or '0') - hold
  if left < 0 then left = 0 end
  redis.call('HSET', KEYS[i], 'reserved', left)
  if spent > 0 then redis.call('HINCRBY', KEYS[i], 'used', spent) end
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# KEYS: leases. ARGV: prefix, batch. Charges expired reservations in full; returns {count, tokens}.
_REAP = _NOW_MS + r"""
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local tokens = 0
for _, id in ipairs(ids) do
  local rk = ARGV[1] .. 'res:' .. id
  local rows = redis.call('HGETALL', rk)
  for j = 1, #rows, 2 do
    local ck, hold = rows[j], tonumber(rows[j + 1])
    if redis.call('EXISTS', ck) == 1 then
    local left = tonumber(redis.call('HGET', ck, 'reserved') or '0') - hold
    if left < 0 then left = 0 end
    redis.call('HSET', ck, 'reserved', left)
    redis.call('HINCRBY', ck, 'used', hold)
    if string.find(ck, ':tokens:', 1, true) and hold > tokens then tokens = hold end
    end
  end
  redis.call('DEL', rk)
  redis.call('ZREM', KEYS[1], id)
end
return {#ids, tokens}
"""

# KEYS: leases, slot zsets... ARGV: lease_ms, n_res, res ids..., then slot ids (one per slot key).
_RENEW = _NOW_MS + r"""
local lease = tonumber(ARGV[1])
local nres = tonumber(ARGV[2])
for i = 1, nres do redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[2 + i]) end
for i = 2, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now + lease, ARGV[2 + nres + i - 1])
  redis.call('PEXPIRE', KEYS[i], 3 * lease)
end
return 1
"""


def _rule_id(rule: RateRule) -> str:
    return f"{rule.kind}:{rule.limit}:{rule.window!r}:{rule.strategy}"


class RedisState(State):
    """State on a shared Redis (see the module docstring). `RedisState(config.session.redis)`;
    call close() when done."""

    def __init__(self, config, lease_seconds: float = LEASE_SECONDS):
        self.config = config
        self.prefix = config.prefix
        self._addr = shown_addr(config.addr)
        self.lease_ms = int(lease_seconds * 1000)
        self.client = redis_client(config)
        self._admit, self._enter, self._reserve, self._settle, self._reap, self._renew = (
            _Script(self.client, text) for text in (_ADMIT, _ENTER, _RESERVE, _SETTLE, _REAP, _RENEW))
        self._origin = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._slots: dict[str, list[str]] = {}        # key -> slot ids this process holds
        self._live: dict[str, Reservation] = {}       # reservation id -> reservation in flight
        self._unsent: collections.deque = collections.deque(maxlen=MAX_UNSENT)  # settlements to replay
        self._down = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.charged_in_flight = (0, 0)
        self._thread = threading.Thread(target=self._run, name="tokenomics-redis-leases", daemon=True)
        self._thread.start()

    # -- connection health -----------------------------------------------------------------------

    @property
    def available(self) -> bool:
        return not self._down

    def _failed(self, exc: BaseException) -> Refusal:
        with self._lock:
            first, self._down = not self._down, True
        if first:
            log.error("session.redis: cannot reach Redis at %s (%s); governed requests get 503 "
                      "state_unavailable until it is back", self._addr, exc.__class__.__name__)
            self._wake.set()
        return unavailable(f"Redis at {self._addr} is unreachable")

    def _run(self) -> None:
        """Renew leases, reap the expired reservations of dead processes, and reconnect."""
        backoff = BACKOFF_FIRST
        first = True
        while not self._stop.is_set():
            try:
                if self._down:
                    self.client.ping()
                self._flush_unsent()
                reaped = self._reap_expired()
                if first:
                    self.charged_in_flight, first = reaped, False
                    if reaped[0]:
                        log.warning("session.redis: %d reservations of proxies that stopped without settling "
                                    "them were charged in full (%d tokens in all)", *reaped)
                self._renew_leases()
                if self._down:
                    self._down = False
                    log.warning("session.redis: Redis at %s is reachable again; governed requests are admitted",
                                self._addr)
                backoff = BACKOFF_FIRST
                self._wake.wait(self.lease_ms / 1000 / RENEWALS_PER_LEASE)
                self._wake.clear()
            except Exception as exc:  # any Redis failure: fail closed and try again soon
                if not self._down:
                    self._failed(exc)
                self._stop.wait(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)

    def _reap_expired(self) -> tuple[int, int]:
        count = tokens = 0
        while True:
            n, t = self._reap(keys=[self.prefix + "leases"], args=[self.prefix, REAP_BATCH])
            count, tokens = count + n, tokens + t
            if n < REAP_BATCH:
                return count, tokens

    def _renew_leases(self) -> None:
        with self._lock:
            res_ids = list(self._live)
            slots = [(key, sid) for key, ids in self._slots.items() for sid in ids]
        if not res_ids and not slots:
            return
        keys = [self.prefix + "leases"] + [self.prefix + "par:" + key for key, _ in slots]
        self._renew(keys=keys, args=[self.lease_ms, len(res_ids), *res_ids, *[sid for _, sid in slots]])

    def _flush_unsent(self) -> None:
        while self._unsent:
            keys, args = self._unsent[0]
            self._settle(keys=keys, args=args)
            self._unsent.popleft()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(5)
        try:
            self._flush_unsent()
        except Exception:
            if self._unsent:
                log.error("session.redis: %d settlements could not be written before stopping; their "
                          "reservations are charged in full when their leases run out", len(self._unsent))
        with self._lock:
            slots = [(key, sid) for key, ids in self._slots.items() for sid in ids]
            self._slots.clear()
        for key, sid in slots:
            try:
                self.client.zrem(self.prefix + "par:" + key, sid)
            except Exception:
                break
        self.client.close()

    # -- rate limits -----------------------------------------------------------------------------

    def admit(self, key: str, rules: tuple[RateRule, ...], now: float, tokens: int = 0) -> Refusal | None:
        if not rules:
            return None
        if self._down:
            return unavailable(f"Redis at {self._addr} is unreachable")
        keys, args = [], [_num(now)]
        weights = [rate_weight(rule, tokens) for rule in rules]
        for rule, w in zip(rules, weights):
            keys.append(f"{self.prefix}rl:{key}:{_rule_id(rule)}")
            args += [rule.strategy, rule.limit, _num(rule.window), w, "1" if rule.kind == "tokens" else "0"]
        try:
            out = self._admit(keys=keys, args=args)
        except Exception as exc:
            return self._failed(exc)
        if not out:
            return None
        wait, refusing = 0, None
        for i, (rule, w) in enumerate(zip(rules, weights)):
            flag, a, b = (x.decode() if isinstance(x, bytes) else x for x in out[3 * i:3 * i + 3])
            if flag != "1":
                continue
            if rule.strategy == "sliding":
                r = sliding_wait(float(a), now)
            elif rule.strategy == "fixed":
                r = fixed_wait(rule, int(float(a)), now)
            else:
                r = bucket_wait(rule, float(a), float(b), w, now)
            if r > wait:
                wait, refusing = r, rule
        return rate_refusal(key, refusing, wait)

    def enter(self, key: str, max_parallel: int | None) -> Refusal | None:
        if self._down:
            return unavailable(f"Redis at {self._addr} is unreachable")
        sid = f"{self._origin}:{next(self._ids)}"
        with self._lock:  # listed before the script runs, so a renewal never misses it
            self._slots.setdefault(key, []).append(sid)
        try:
            ok = self._enter(keys=[self.prefix + "par:" + key],
                             args=[-1 if max_parallel is None else max_parallel, sid, self.lease_ms])
        except Exception as exc:
            self._forget_slot(key, sid)
            return self._failed(exc)
        if not ok:
            self._forget_slot(key, sid)
            return parallel_refusal(key, max_parallel)
        return None

    def _forget_slot(self, key: str, sid: str | None = None) -> str | None:
        with self._lock:
            ids = self._slots.get(key)
            if not ids:
                return None
            if sid is None:
                sid = ids.pop()
            elif sid in ids:
                ids.remove(sid)
            if not ids:
                del self._slots[key]
            return sid

    def leave(self, key: str) -> None:
        sid = self._forget_slot(key)
        if sid is None or self._down:
            return  # not renewed any more: the lease runs out by itself
        try:
            self.client.zrem(self.prefix + "par:" + key, sid)
        except Exception as exc:
            self._failed(exc)

    def in_flight(self, key: str) -> int:
        """Slots held for `key` across every process (live leases)."""
        now_ms = int(time.time() * 1000)
        return self.client.zcount(self.prefix + "par:" + key, now_ms, "+inf")

    # -- budgets ---------------------------------------------------------------------------------

    def _counter_key(self, line: BudgetLine) -> str:
        return f"{self.prefix}b:{line.key}:{line.unit}:{line.period}"

    def reserve(self, lines: list[BudgetLine], tokens: int, usd: float, now: float,
                min_tokens: int = 1, usd_per_token: float = 0.0) -> "tuple[Reservation, int] | Refusal":
        if self._down:
            return unavailable(f"Redis at {self._addr} is unreachable")
        plan = tightest_lines(lines)
        ckeys = [self._counter_key(line) for line in plan]
        bounds = [window_bounds(line.period, now) for line in plan]
        rid = f"{self._origin}:{next(self._ids)}"
        try:
            snapshot = [self._read_counter(k, ws) for k, (ws, _) in zip(ckeys, bounds)]
            for _ in range(GRANT_ATTEMPTS):
                counters = [Counter(line, counter_cap(line), used, reserved)
                            for line, (used, reserved) in zip(plan, snapshot)]
                verdict = decide_grant(counters, tokens, usd, now, min_tokens, usd_per_token)
                if isinstance(verdict, Refusal):
                    return verdict
                args = [rid, self.lease_ms]
                for line, (ws, end) in zip(plan, bounds):
                    hold = verdict.tokens if line.unit == "tokens" else verdict.usd_nano
                    args += [_num(ws), _expire_ms(ws, end, now), counter_cap(line), hold]
                res = Reservation(rid, tuple(plan), verdict.tokens, verdict.usd_nano, now,
                                  held=tuple(zip(ckeys, (_num(ws) for ws, _ in bounds))))
                with self._lock:
                    self._live[rid] = res
                out = self._reserve(keys=[*ckeys, self.prefix + "res:" + rid, self.prefix + "leases"], args=args)
                if int(out[0]) == 1:
                    return res, verdict.tokens
                with self._lock:
                    self._live.pop(rid, None)
                snapshot = [(int(out[1 + 2 * i]), int(out[2 + 2 * i])) for i in range(len(plan))]
        except Exception as exc:
            with self._lock:
                self._live.pop(rid, None)
            return self._failed(exc)
        return unavailable("too many proxies competing for this token's budget; no grant settled")

    def _read_counter(self, key: str, ws: float) -> tuple[int, int]:
        stored, used, reserved = self.client.hmget(key, "ws", "used", "reserved")
        used = int(used or 0) if stored is not None and float(stored) >= ws else 0
        return used, int(reserved or 0)

    def settle(self, reservation: Reservation, actual_tokens: int, actual_usd: float, now: float) -> None:
        spent_t = max(0, int(actual_tokens))
        spent_u = max(0, round(actual_usd * _NANO))
        self._close(reservation, [spent_t if line.unit == "tokens" else spent_u for line in reservation.lines], now)

    def release(self, reservation: Reservation) -> None:
        self._close(reservation, [0] * len(reservation.lines), time.time())

    def _close(self, reservation: Reservation, spent: list[int], now: float) -> None:
        with self._lock:
            if reservation.done:
                return
            reservation.done = True
            self._live.pop(reservation.id, None)
        ckeys = [ck for ck, _ in reservation.held]
        keys = [self.prefix + "res:" + reservation.id, self.prefix + "leases", *ckeys]
        args = [reservation.id]
        for line, s in zip(reservation.lines, spent):
            ws, end = window_bounds(line.period, now)
            args += [_num(ws), s, _expire_ms(ws, end, now)]
        if self._down or self._unsent:
            self._unsent.append((keys, args))  # in order, after what is already waiting
            return
        try:
            self._settle(keys=keys, args=args)
        except Exception as exc:
            self._unsent.append((keys, args))
            self._failed(exc)

    def usage(self, line: BudgetLine, now: float) -> tuple[float, float]:
        try:
            used, reserved = self._read_counter(self._counter_key(line), window_bounds(line.period, now)[0])
        except Exception:
            return 0, 0
        if line.unit == "tokens":
            return used, reserved
        return used / _NANO, reserved / _NANO

    def has_pending(self) -> bool:
        return False


def probe(config) -> str | None:
    """None when the Redis of `session.redis` answers a PING, else what is wrong (for doctor)."""
    if not HAVE_REDIS:
        return MISSING_REDIS
    client = None
    try:
        client = redis_client(config)
        client.ping()
        return None
    except Exception as exc:
        what = "authentication failed (check session.redis.password)" \
            if exc.__class__.__name__ in ("AuthenticationError", "AuthenticationWrongNumberOfArgsError") \
            else f"no answer ({exc.__class__.__name__})"
        return f"Redis at {shown_addr(config.addr)}: {what}; start it or fix session.redis.addr"
    finally:
        if client is not None:
            client.close()
