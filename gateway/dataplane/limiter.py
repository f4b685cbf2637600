"""Rate limits (GCRA) and quotas (UTC day/month counters).

A rate rule of `limit` per window W with `burst` B is GCRA (the generic cell rate algorithm,
nginx's limit_req with burst): the emission interval is T = W / limit, a request is admitted
when the counter's theoretical arrival time is at most B * T ahead of now, and admitting moves
it T further. Hence in any interval of length W at most limit + B requests are admitted, and
under sustained demand exactly one every T, i.e. `limit` per window. There is no race to
over-admit: each check-and-update is atomic (one Lua script in Redis, one event loop in
process). Time comes from one clock: Redis `TIME` inside the script, so every node agrees.

Two stores with the same semantics: in process (the embedded default, one gateway worker) and
Redis (one EVALSHA per request for all of its limits, so workers and nodes share exact
counts; sent over the lean pipelined client of resp.py, not redis-py). A request is admitted
only if every rule admits it, and only then is anything counted: a request refused by the
rate limit does not use quota.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from gateway.dataplane.resp import RespClient, RespScript
from gateway.dataplane.snapshot import WINDOW_SECONDS, LimitRule

log = logging.getLogger("gateway.limiter")

PRUNE_EVERY = 50_000  # in-process rate counters: sweep the idle ones after this many new


@dataclass(slots=True)
class Decision:
    allowed: bool
    rule: LimitRule | None  # the rule that refused, else the one with the least left
    remaining: int
    reset: float  # seconds until that rule is fully replenished / its period ends
    retry_after: float = 0.0
    store_error: bool = False  # the store could not be asked; nothing was counted


class Limiter(Protocol):
    async def check(self, rules: tuple[LimitRule, ...], now: float) -> Decision: ...


def period_bounds(period: str, now: float) -> tuple[float, float]:
    """[start, end) in epoch seconds of the UTC day or month containing `now`."""
    if period == "day":
        start = now - now % 86400
        return start, start + 86400
    dt = datetime.fromtimestamp(now, UTC)
    start = datetime(dt.year, dt.month, 1, tzinfo=UTC)
    end = datetime(dt.year + (dt.month == 12), dt.month % 12 + 1, 1, tzinfo=UTC)
    return start.timestamp(), end.timestamp()


_current: dict[str, tuple[float, float]] = {}


def current_period(period: str, now: float) -> tuple[float, float]:
    """period_bounds(), remembered until the period ends (a month takes datetime arithmetic,
    ~1.5 µs, on every request otherwise)."""
    bounds = _current.get(period)
    if bounds is None or not bounds[0] <= now < bounds[1]:
        bounds = _current[period] = period_bounds(period, now)
    return bounds


def quota_counter_name(tag: str, subject: str, period_start: float) -> str:
    """The Redis key of a quota counter; the hash tag keeps a key's limits on one shard."""
    return f"apigw:q:{{{tag}}}:{subject}:{int(period_start)}"


def rate_counter_name(tag: str, subject: str) -> str:
    return f"apigw:r:{{{tag}}}:{subject}"


class MemoryLimiter:
    """In-process store. Correct only with a single gateway worker (the embedded default)."""

    def __init__(self) -> None:
        self._tat: dict[str, float] = {}
        self._quota: dict[tuple[str, float], int] = {}
        self._dirty: set[tuple[str, float]] = set()
        self._new_since_prune = 0

    async def check(self, rules: tuple[LimitRule, ...], now: float) -> Decision:
        return self.check_sync(rules, now)

    def check_sync(self, rules: tuple[LimitRule, ...], now: float) -> Decision:
        """Admit and count, or refuse and count nothing. The admitting pass is the hot one:
        a refusal is worked out again by `_refusal`, without the bookkeeping."""
        tats = self._tat
        quotas = self._quota
        best: LimitRule | None = None
        best_left = 0
        best_reset = 0.0
        writes: list = []
        for rule in rules:
            if rule.kind == "rate":
                tat = tats.get(rule.subject, now)
                if tat < now:
                    tat = now
                if tat - now > rule.tolerance + 1e-9:
                    return self._refusal(rules, now)
                interval = rule.interval
                reset = tat + interval - now
                left = math.floor((rule.tolerance - reset) / interval + 1e-9) + 1
                if left < 0:
                    left = 0
                writes.append((rule, tat + interval))
            else:
                start, end = current_period(rule.period, now)
                slot = (rule.subject, start)
                used = quotas.get(slot, 0)
                if used >= rule.limit:
                    return self._refusal(rules, now)
                left = rule.limit - used - 1
                reset = end - now
                writes.append((rule, slot))
            if best is None or left < best_left:
                best, best_left, best_reset = rule, left, reset
        for rule, value in writes:
            if rule.kind == "rate":
                if rule.subject not in tats:
                    self._new_since_prune += 1
                tats[rule.subject] = value
            else:
                quotas[value] = quotas.get(value, 0) + 1
                self._dirty.add(value)
        if self._new_since_prune >= PRUNE_EVERY:
            self.prune(now)
        if best is None:
            return Decision(True, None, 0, 0.0)
        return Decision(True, best, best_left, best_reset)

    def _refusal(self, rules: tuple[LimitRule, ...], now: float) -> Decision:
        """The refusing rule that frees up last (the longest Retry-After)."""
        worst: Decision | None = None
        for rule in rules:
            if rule.kind == "rate":
                tat = max(self._tat.get(rule.subject, now), now)
                if tat - now <= rule.tolerance + 1e-9:
                    continue
                d = Decision(False, rule, 0, tat - now, tat - now - rule.tolerance)
            else:
                start, end = current_period(rule.period, now)
                if self._quota.get((rule.subject, start), 0) < rule.limit:
                    continue
                d = Decision(False, rule, 0, end - now, end - now)
            if worst is None or d.retry_after > worst.retry_after:
                worst = d
        assert worst is not None
        return worst

    def prune(self, now: float) -> None:
        """Forget rate counters that are fully replenished (per-IP rules make many)."""
        self._tat = {s: t for s, t in self._tat.items() if t > now}
        self._new_since_prune = 0

    # Persistence of quota counters (the embedded gateway writes them to the database every
    # second so that the portal can show what is left and a restart keeps them).
    def take_dirty(self) -> list[tuple[str, float, int]]:
        """Quota counters changed since the last call, as (subject, period_start, used)."""
        out = [(s, start, self._quota[(s, start)]) for s, start in self._dirty]
        self._dirty.clear()
        return out

    def load(self, rows: list[tuple[str, float, int]]) -> None:
        for subject, start, used in rows:
            slot = (subject, start)
            self._quota[slot] = max(used, self._quota.get(slot, 0))


# KEYS: one counter per rule. ARGV: per rule, kind ("r"/"q"), limit, then for "r" the window
# in ms and the burst, for "q" the period's end (epoch ms) and 0. Time comes from Redis, so
# every node shares one clock. Returns {allowed, index of the refusing rule or 0, retry ms,
# then per rule remaining and reset ms}.
LUA_CHECK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local allowed = 1
local refused = 0
local worst = -1
local out = {}
local writes = {}
for i = 1, #KEYS do
  local kind = ARGV[(i - 1) * 4 + 1]
  local limit = tonumber(ARGV[(i - 1) * 4 + 2])
  local p = tonumber(ARGV[(i - 1) * 4 + 3])
  local remaining, reset, retry
  if kind == 'r' then
    local interval = p / limit
    local tolerance = tonumber(ARGV[(i - 1) * 4 + 4]) * interval
    local tat = tonumber(redis.call('GET', KEYS[i]) or now)
    if tat < now then tat = now end
    if tat - now > tolerance + 0.001 then
      retry = tat - now - tolerance
      remaining = 0
      reset = tat - now
    else
      local new_tat = tat + interval
      remaining = math.floor((tolerance - (new_tat - now)) / interval + 0.000001) + 1
      if remaining < 0 then remaining = 0 end
      reset = new_tat - now
      writes[i] = new_tat
    end
  else
    local used = tonumber(redis.call('GET', KEYS[i]) or 0)
    reset = p - now
    if used + 1 > limit then
      retry = reset
      remaining = 0
    else
      remaining = limit - used - 1
      writes[i] = 1
    end
  end
  if retry then
    allowed = 0
    if retry > worst then worst = retry; refused = i end
  end
  out[#out + 1] = remaining
  out[#out + 1] = math.ceil(reset)
end
if allowed == 1 then
  for i = 1, #KEYS do
    if ARGV[(i - 1) * 4 + 1] == 'r' then
      redis.call('SET', KEYS[i], string.format('%.3f', writes[i]), 'PX',
                 math.ceil(writes[i] - now) + 1000)
    else
      local v = redis.call('INCR', KEYS[i])
      if v == 1 then
        redis.call('PEXPIREAT', KEYS[i], tonumber(ARGV[(i - 1) * 4 + 3]) + 86400000)
      end
    end
  end
end
local result = {allowed, refused, math.ceil(worst)}
for _, v in ipairs(out) do result[#result + 1] = v end
return result
"""


def redis_client(url: str, *, timeout: float, pool_size: int = 64):
    """An asyncio Redis client whose requests wait (up to `timeout`) for a free connection.

    redis-py's default pool raises "Too many connections" past 100 concurrent commands, which
    under load would turn into failing open; a blocking pool queues instead.
    """
    import redis.asyncio as aioredis

    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=pool_size,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
    )
    return aioredis.Redis(connection_pool=pool)


class RedisLimiter:
    """Shared store: all of a request's limits in one EVALSHA round trip.

    When Redis is unreachable the decision says so (store_error) and the limit stage applies
    the API's policy (admit or 503); the failure is counted and a warning logged at most once
    a second; the client reconnects on the next call, so limits resume as soon as Redis does.
    """

    def __init__(self, client: RespClient) -> None:
        self.client = client
        self.script = RespScript(client, LUA_CHECK)
        self.store_errors = 0
        self._last_warning = 0.0

    async def check(self, rules: tuple[LimitRule, ...], now: float) -> Decision:
        keys: list[str] = []
        args: list[object] = []
        for rule in rules:
            if rule.kind == "rate":
                keys.append(rate_counter_name(rule.tag, rule.subject))
                args += ["r", rule.limit, WINDOW_SECONDS[rule.period] * 1000, rule.burst]
            else:
                start, end = current_period(rule.period, now)
                keys.append(quota_counter_name(rule.tag, rule.subject, start))
                args += ["q", rule.limit, int(end * 1000), 0]
        try:
            res = await self.script(keys=keys, args=args)
        except Exception as exc:  # any store failure: fail open, never 500
            self.store_errors += 1
            mono = time.monotonic()
            if mono - self._last_warning >= 1.0:
                self._last_warning = mono
                log.warning("limiter store error: %s", exc)
            return Decision(True, None, 0, 0.0, store_error=True)
        allowed, refused, worst = int(res[0]), int(res[1]), int(res[2])
        if not allowed:
            rule = rules[refused - 1]
            return Decision(False, rule, 0, res[4 + 2 * (refused - 1)] / 1000, worst / 1000)
        best_i = min(range(len(rules)), key=lambda i: res[3 + 2 * i])
        return Decision(True, rules[best_i], int(res[3 + 2 * best_i]), res[4 + 2 * best_i] / 1000)
