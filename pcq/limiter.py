"""Request rate limiter shared by every worker process, one budget per upstream API key.

Why GCRA (the Generic Cell Rate Algorithm, as in redis-cell's ``CL.THROTTLE``) in one Lua script:

* **O(1) memory per key.** The whole state is one number, the *theoretical arrival time* (TAT):
  the instant the budget would be back to empty if no further request came. A moving-window log
  stores one entry per admitted request; GCRA stores a single integer.
* **Exact spacing.** With emission interval ``T = 60 / limit_per_minute`` seconds, each admission
  pushes the TAT ``T`` further. Steady traffic is therefore admitted exactly every ``T`` seconds,
  with no window-boundary double bursts (fixed window) and no approximation (sliding counter).
* **Burst as tolerance.** A request arriving at ``now`` is admitted iff ``now >= TAT - tau`` with
  ``tau = burst * T``. From idle that admits ``burst + 1`` requests back to back, then one per
  ``T``; in *any* interval of ``W`` seconds at most ``W / T + burst + 1`` requests pass.
* **Atomic, and on one clock.** The read-decide-write runs inside a single Lua script (Redis runs
  scripts atomically, so there is no GET-then-SET race between workers), and ``now`` comes from
  ``redis.call('TIME')``: every worker is judged on the Redis server's clock, so skewed worker
  clocks cannot change a decision. Since Redis 5, scripts are replicated by effects, which makes
  ``TIME`` in a writing script safe; the script calls ``redis.replicate_commands()`` when it exists
  for older servers. ``fakeredis`` (with ``lupa``) implements ``TIME`` too, so the same script
  serves the standalone, in-process mode.
* **No module needed.** redis-cell must be loaded as a Redis module (often impossible on managed
  Redis); a plain ``EVALSHA`` works everywhere.

The same script also honours a **shared cool-down** per key (set after an upstream 429 with
``Retry-After``): while it is active nothing is admitted and the remaining cool-down is returned.
``set_cooldown`` never shortens a cool-down that already ends later.

Keys (one hash tag per limiter key, so both keys live in one Redis Cluster slot)::

    {prefix}{<key>}:tat   TAT in integer microseconds of Redis time
    {prefix}{<key>}:cd    end of the cool-down, integer microseconds of Redis time

Both carry a TTL equal to the time until their value is in the past (plus 1 ms): by then the key
means exactly what a missing key means, so idle keys vanish without changing any decision.

All arithmetic is in integer microseconds (Lua 5.1 numbers are doubles, exact up to 2**53, and
epoch microseconds are ~2**51). ``T`` is rounded *up* to a whole microsecond, so rounding can only
make the limiter very slightly stricter, never looser.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import redis.asyncio

__all__ = ["RateLimiter", "limiter_key", "window_safe"]

_US: Final = 1_000_000

# ARGV[1] = mode: "acquire" | "reserve" | "cd_set" | "cd_get" | "penalize" | "factor"
#   acquire: ARGV[2] = T (us), ARGV[3] = tau (us)  -> {wait_us, now_us}; wait_us == 0 = admitted
#   reserve: ARGV[2] = T (us), ARGV[3] = tau (us)  -> {wait_us, now_us}; the slot at now+wait is taken
#   cd_set:  ARGV[2] = duration (us)               -> {remaining_us, now_us} after the call
#   cd_get:                                        -> {remaining_us, now_us}
#   penalize: ARGV[2] = step (x1e6), ARGV[3] = floor (x1e6) -> {factor x1e6, now_us}
#   factor:                                        -> {factor x1e6, now_us}
# KEYS[1] = TAT key, KEYS[2] = cool-down key, KEYS[3] = rate-factor key.
# The rate factor (1.0 = the configured limit) steps down on every reported 429 and climbs back
# linearly (RECOVERY per second) while no 429 comes; acquire/reserve space requests T / factor.
_SCRIPT: Final = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local mode = ARGV[1]
local RECOVERY = 20000  -- factor x1e6 regained per second: from 0.5 to 1.0 in 25 s

local function current_factor()
  local f = redis.call('HMGET', KEYS[3], 'f', 't')
  if not f[1] then return 1000000 end
  local v = tonumber(f[1]) + (now - tonumber(f[2])) / 1000000 * RECOVERY
  if v > 1000000 then v = 1000000 end
  return v
end

if mode == 'factor' then
  return {math.floor(current_factor()), now}
end

if mode == 'penalize' then
  local v = current_factor() * tonumber(ARGV[2]) / 1000000
  local floor = tonumber(ARGV[3])
  if v < floor then v = floor end
  redis.call('HSET', KEYS[3], 'f', string.format('%.0f', v), 't', string.format('%.0f', now))
  redis.call('PEXPIRE', KEYS[3], math.ceil((1000000 - v) / RECOVERY * 1000) + 1000)
  return {math.floor(v), now}
end

local cd_until = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
local cd_left = cd_until - now
if cd_left < 0 then cd_left = 0 end

if mode == 'cd_get' then
  return {cd_left, now}
end

if mode == 'cd_set' then
  local dur = tonumber(ARGV[2])
  local new_until = now + dur
  if new_until > cd_until then
    redis.call('SET', KEYS[2], string.format('%.0f', new_until), 'PX', math.ceil(dur / 1000) + 1)
    return {dur, now}
  end
  return {cd_left, now}
end

-- mode == 'acquire' or 'reserve': GCRA, at the rate scaled by the current factor
local factor = current_factor()
local T = math.ceil(tonumber(ARGV[2]) * 1000000 / factor)
local tau = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0

if mode == 'reserve' then
  -- The earliest instant this request conforms (never inside a cool-down); take it now,
  -- so the caller sleeps once instead of polling with every other waiter.
  local at = tat - tau
  if at < now then at = now end
  if at < cd_until then at = cd_until end
  local base = tat
  if base < at then base = at end
  local new_tat = base + T
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX',
    math.ceil((new_tat - now) / 1000) + 1)
  return {at - now, now}
end

if tat < now then tat = now end
local wait = (tat - tau) - now
if wait < cd_left then wait = cd_left end
if wait > 0 then
  return {wait, now}
end
local new_tat = tat + T
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX',
  math.ceil((new_tat - now) / 1000) + 1)
return {0, now}
"""


def window_safe(limit_per_minute: int, burst: int) -> tuple[int, int]:
    """The GCRA rate and burst that never exceed ``limit_per_minute`` in ANY 60 s window.

    GCRA admits at most ``W / T + burst + 1`` requests in a window of ``W`` seconds, so a
    limiter set to the quota itself overshoots a sliding-window enforcer by ``burst + 1``
    (measured: two 429s per 1,600 calls at 600/min). Carving the burst out of the minute's
    budget instead (rate ``limit - burst - 1``) keeps every window within the quota at a
    steady-state cost of ``(burst + 1) / limit`` (1% at 600/min with burst 5).
    """
    burst = max(0, min(burst, limit_per_minute - 2))
    return max(1, limit_per_minute - burst - 1), burst


def limiter_key(api_key: str) -> str:
    """Stable short id for an upstream API key (sha256 hex, first 16 chars); never the key."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:16]


class RateLimiter:
    """GCRA limiter in Redis: ``limit_per_minute`` requests per key, ``burst`` extra at once.

    ``key`` arguments are ``limiter_key(api_key)`` values. Works with ``redis.asyncio.Redis`` and
    ``fakeredis.FakeAsyncRedis`` (``decode_responses`` either way).
    """

    def __init__(
        self,
        redis: redis.asyncio.Redis,
        *,
        limit_per_minute: int,
        burst: int = 5,
        prefix: str = "pcq:rl:",
    ) -> None:
        if limit_per_minute < 1:
            raise ValueError("limit_per_minute must be >= 1")
        if burst < 0:
            raise ValueError("burst must be >= 0")
        self.limit_per_minute = limit_per_minute
        self.burst = burst
        self.prefix = prefix
        # Emission interval, rounded up so rounding never admits more than the limit.
        self._interval_us = math.ceil(60 * _US / limit_per_minute)
        self._tolerance_us = burst * self._interval_us
        self._redis = redis
        self._script = redis.register_script(_SCRIPT)

    @property
    def interval(self) -> float:
        """Seconds between admissions at the steady rate (60 / limit_per_minute)."""
        return self._interval_us / _US

    def _keys(self, key: str) -> list[str]:
        base = f"{self.prefix}{{{key}}}"
        return [f"{base}:tat", f"{base}:cd", f"{base}:f"]

    async def _run(self, key: str, *args: str | int) -> tuple[int, int]:
        result: Any = await self._script(keys=self._keys(key), args=list(args))
        return int(result[0]), int(result[1])

    async def try_acquire_timed(self, key: str) -> tuple[float, float]:
        """Like ``try_acquire`` but also returns the Redis server time (epoch seconds) of the
        decision: ``(wait_seconds, server_time)``. Useful for metrics and tests."""
        wait_us, now_us = await self._run(key, "acquire", self._interval_us, self._tolerance_us)
        return wait_us / _US, now_us / _US

    async def try_acquire(self, key: str) -> float:
        """Take one request slot if allowed.

        Returns 0.0 when admitted (the slot is taken), otherwise the seconds to wait before
        trying again (nothing is taken): the GCRA delay or the remaining cool-down, the larger.
        """
        wait, _ = await self.try_acquire_timed(key)
        return wait

    async def reserve(self, key: str) -> float:
        """Take the earliest slot this request may use; returns the seconds until it (0 = now).

        Unlike ``try_acquire`` the slot is taken even when it lies in the future, so a caller
        sleeps once instead of polling: thousands of waiting calls cost one Redis call each,
        not one per wake-up each.
        """
        wait_us, _ = await self._run(key, "reserve", self._interval_us, self._tolerance_us)
        return wait_us / _US

    async def acquire(self, key: str) -> float:
        """Wait (``asyncio.sleep``) until admitted; return the total seconds waited.

        Reserves a slot and sleeps until it; if a cool-down began meanwhile (another worker saw
        a 429), it reserves again after it. Jitter on a cool-down wait (<= 10 %, at most 0.25 s)
        keeps workers released by the same cool-down from all retrying in the same millisecond.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        wait = await self.reserve(key)
        while wait > 0:
            await asyncio.sleep(wait)
            cooling = await self.cooldown_remaining(key)
            if cooling <= 0:
                break
            await asyncio.sleep(cooling + random.uniform(0, min(0.25, cooling * 0.1)))
            wait = await self.reserve(key)
        return loop.time() - started

    async def penalize(self, key: str, step: float = 0.7, floor: float = 0.2) -> float:
        """A 429 was seen: scale the effective rate by ``step`` (not below ``floor`` of the
        limit) for every worker; it climbs back linearly while no 429 comes. Returns the factor."""
        factor, _ = await self._run(key, "penalize", round(step * _US), round(floor * _US))
        return factor / _US

    async def rate_factor(self, key: str) -> float:
        """The share of the configured limit currently in force (1.0 = all of it)."""
        factor, _ = await self._run(key, "factor")
        return factor / _US

    async def set_cooldown(self, key: str, seconds: float) -> None:
        """Admit nothing for ``key`` during the next ``seconds`` (Redis clock), in every worker.

        Never shortens a cool-down that already ends later; ``seconds <= 0`` does nothing.
        """
        if not math.isfinite(seconds):
            raise ValueError("cool-down seconds must be finite")
        duration_us = math.ceil(seconds * _US)
        if duration_us <= 0:
            return
        await self._run(key, "cd_set", duration_us)

    async def cooldown_remaining(self, key: str) -> float:
        """Seconds left in the shared cool-down for ``key`` (0.0 when none is active)."""
        remaining_us, _ = await self._run(key, "cd_get")
        return remaining_us / _US
