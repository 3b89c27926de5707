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
import logging
import math
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from pcq.settings import key_id

if TYPE_CHECKING:
    import redis.asyncio

__all__ = ["KeyPool", "PoolKey", "RateLimiter", "limiter_key", "window_safe"]

log = logging.getLogger(__name__)
_US: Final = 1_000_000

# ARGV[1] = mode: "acquire" | "cd_set" | "cd_get" | "penalize" | "factor" | "take" | "room" | "renew"
#   acquire: ARGV[2] = T (us), ARGV[3] = tau (us)  -> {wait_us, now_us}; wait_us == 0 = admitted
#   cd_set:  ARGV[2] = duration (us)               -> {remaining_us, now_us} after the call
#   cd_get:                                        -> {remaining_us, now_us}
#   penalize: ARGV[2] = step (x1e6), ARGV[3] = floor (x1e6) -> {factor x1e6, now_us}
#   factor:                                        -> {factor x1e6, now_us}
#   take / room / renew: the pool modes, described where they begin below.
# KEYS[1] = TAT key, KEYS[2] = cool-down key, KEYS[3] = rate-factor key.
# The rate factor (1.0 = the configured limit) steps down on every reported 429 and climbs back
# linearly (RECOVERY per second) while no 429 comes; acquire and take space requests T / factor.
_SCRIPT: Final = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local mode = ARGV[1]
local RECOVERY = 20000  -- factor x1e6 regained per second: from 0.5 to 1.0 in 25 s

local function factor_at(key)
  local f = redis.call('HMGET', key, 'f', 't')
  if not f[1] then return 1000000 end
  local v = tonumber(f[1]) + (now - tonumber(f[2])) / 1000000 * RECOVERY
  if v > 1000000 then v = 1000000 end
  return v
end
local function current_factor() return factor_at(KEYS[3]) end

if mode == 'factor' then
  return {math.floor(current_factor()), now}
end

-- Pool modes span several upstream keys. KEYS holds 4 names per key: tat, cd, f, fl (the
-- in-flight permits: a sorted set of permit -> expiry). ARGV[2] = n keys; then per key
-- T (us), tau (us), cap (0 = no cap); then the mode's own arguments.
if mode == 'take' or mode == 'room' then
  local n = tonumber(ARGV[2])
  local extra = 3 + 3 * n
  local best, best_at, best_tat, best_T = nil, nil, nil, nil
  local room, next_open = 0, -1
  local horizon = tonumber(ARGV[extra] or '0')
  for i = 1, n do
    local k = (i - 1) * 4
    local T0, tau, cap = tonumber(ARGV[i * 3]), tonumber(ARGV[i * 3 + 1]), tonumber(ARGV[i * 3 + 2])
    local free = -1  -- no cap
    if cap > 0 then
      redis.call('ZREMRANGEBYSCORE', KEYS[k + 4], '-inf', now)  -- permits of dead workers
      free = cap - redis.call('ZCARD', KEYS[k + 4])
      if free < 0 then free = 0 end
    end
    if free ~= 0 then
      local T = math.ceil(T0 * 1000000 / factor_at(KEYS[k + 3]))
      local tat = tonumber(redis.call('GET', KEYS[k + 1]) or '0') or 0
      local at = tat - tau
      if at < now then at = now end
      local cd = tonumber(redis.call('GET', KEYS[k + 2]) or '0') or 0
      if at < cd then at = cd end
      if best_at == nil or at < best_at then
        best, best_at, best_tat, best_T = i, at, tat, T
      end
      if mode == 'room' then
        local slots = 0
        if at - now <= horizon then
          -- slot k (from 0) lies at max(base + k*T - tau, now, cool-down end)
          local base = tat
          if base < now then base = now end
          if base < cd then base = cd end
          slots = math.floor((now + horizon + tau - base) / T) + 1
        elseif next_open < 0 or at - now - horizon < next_open then
          next_open = at - now - horizon
        end
        if free > 0 and slots > free then slots = free end
        room = room + slots
      end
    end
  end
  if mode == 'room' then
    if room > 1000000000 then room = 1000000000 end
    return {room, next_open, now}
  end
  if best == nil then
    return {0, -1, now}  -- every key is at its in-flight cap
  end
  local base = best_tat
  if base < best_at then base = best_at end
  local new_tat = base + best_T
  local k = (best - 1) * 4
  redis.call('SET', KEYS[k + 1], string.format('%.0f', new_tat), 'PX',
    math.ceil((new_tat - now) / 1000) + 1)
  if tonumber(ARGV[best * 3 + 2]) > 0 then
    local expires = now + tonumber(ARGV[extra + 1])
    redis.call('ZADD', KEYS[k + 4], string.format('%.0f', expires), ARGV[extra])
    redis.call('PEXPIRE', KEYS[k + 4], math.ceil((expires - now) / 1000) + 1)
  end
  return {best, best_at - now, now}
end

if mode == 'renew' then
  -- KEYS[1] = a permits set; ARGV[2] = ttl (us); ARGV[3..] = this worker's permits on it
  local expires = string.format('%.0f', now + tonumber(ARGV[2]))
  for i = 3, #ARGV do
    redis.call('ZADD', KEYS[1], 'XX', expires, ARGV[i])
  end
  redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) / 1000) + 1)
  return {#ARGV - 2, now}
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

-- mode == 'acquire': GCRA, at the rate scaled by the current factor; takes a slot only if it is now
local factor = current_factor()
local T = math.ceil(tonumber(ARGV[2]) * 1000000 / factor)
local tau = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0

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


def window_safe(limit_per_minute: int, burst: int, slack_seconds: float = 0.5) -> tuple[int, int]:
    """The GCRA rate and burst that never exceed ``limit_per_minute`` in ANY 60 s window.

    GCRA admits at most ``W / T + burst + 1`` requests in a window of ``W`` seconds, so a
    limiter set to the quota itself overshoots a sliding-window enforcer by ``burst + 1``
    (measured: two 429s per 1,600 calls at 600/min). Carving the burst out of the minute's
    budget (rate ``limit - burst - 1``) keeps every window of the *limiter's* clock within the
    quota. The upstream counts arrivals, though, and a call leaves up to a few hundred ms after
    its slot (event-loop lag, connection set-up): arrivals in one upstream minute can come from
    slots spread over ``60 + slack`` seconds. So the rate is scaled by ``60 / (60 + slack)``
    as well. Steady-state cost at 600/min with burst 5 and 0.5 s of slack: 11 of 600 (1.8%).
    """
    burst = max(0, min(burst, limit_per_minute - 2))
    carved = limit_per_minute - burst - 1
    return max(1, math.floor(carved * 60 / (60 + slack_seconds))), burst


# The limiter's id for an upstream API key is the one settings and attempts use.
limiter_key = key_id


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
        # The pool's ``take`` on a pool of this one key, with no in-flight cap: one
        # reservation rule for both.
        result: Any = await self._script(
            keys=[*self._keys(key), f"{self.prefix}{{{key}}}:fl"],
            args=["take", 1, self._interval_us, self._tolerance_us, 0, "", 0],
        )
        return int(result[1]) / _US

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


@dataclass(frozen=True)
class PoolKey:
    """One upstream key's budget: ``id`` is ``limiter_key(api_key)``, never the key."""

    id: str
    limit_per_minute: int
    burst: int = 5
    max_in_flight: int = 0  # calls in flight on this key across every worker; 0 = no cap


class KeyPool:
    """Several upstream keys, each with its own quota and in-flight cap, shared by all workers.

    Every call takes a slot on whichever key can start it soonest (one script, atomic), so
    calls spread over the keys in proportion to their quotas. Each key's rate is made
    ``window_safe``; 429s cool down and slow only the key that saw them.

    **In-flight cap.** A key with ``max_in_flight`` counts *permits*: a member per call in a
    sorted set, scored with its expiry on the Redis clock. ``take`` skips a key at its cap,
    and adds the permit in the same script that takes the rate slot; ``release`` removes it
    (batched: one round trip for every permit released meanwhile). This process renews its
    permits every ``permit_ttl / 4``, so the permits of a worker that died expire after at
    most ``permit_ttl`` and its calls stop counting. A permit is taken with the rate slot, so
    a call waiting for its slot (at most about the admission horizon) already counts as in
    flight. With no cap, no permit is kept and nothing is released or renewed: the cap costs
    nothing when it is not used.

    **Waiting when every key is full.** One waiter per process asks Redis again, after a
    local release or every ``poll`` seconds (releases by other workers); the others queue
    behind it, so thousands of waiting calls do not poll Redis.
    """

    def __init__(
        self,
        redis: redis.asyncio.Redis,
        keys: Sequence[PoolKey],
        *,
        prefix: str = "pcq:rl:",
        permit_ttl: float = 60.0,
        poll: float = 0.1,
    ) -> None:
        if not keys:
            raise ValueError("a key pool needs at least one key")
        self.keys = list(keys)
        self.prefix = prefix
        self.permit_ttl = permit_ttl
        self.poll = poll
        self._redis = redis
        self._script = redis.register_script(_SCRIPT)
        self.limiters: list[RateLimiter] = []
        params: list[int] = []
        for k in self.keys:
            rate, burst = window_safe(k.limit_per_minute, k.burst)
            lim = RateLimiter(redis, limit_per_minute=rate, burst=burst, prefix=prefix)
            self.limiters.append(lim)
            params += [lim._interval_us, lim._tolerance_us, k.max_in_flight]
        self._params = params
        self._names = [name for k in self.keys for name in [*self._key_names(k.id), self._permits_name(k.id)]]
        self._tag = uuid.uuid4().hex[:12]  # this process's permits carry it
        self._seq = 0
        self._held: list[set[str]] = [set() for _ in self.keys]
        self._to_release: list[list[str]] = [[] for _ in self.keys]
        self._release_due = asyncio.Event()
        self._released = asyncio.Event()
        self._full_gate = asyncio.Lock()

    def _key_names(self, ident: str) -> list[str]:
        base = f"{self.prefix}{{{ident}}}"
        return [f"{base}:tat", f"{base}:cd", f"{base}:f"]

    def _permits_name(self, ident: str) -> str:
        return f"{self.prefix}{{{ident}}}:fl"

    @property
    def capped(self) -> bool:
        return any(k.max_in_flight > 0 for k in self.keys)

    def held(self, index: int) -> int:
        """Permits this process holds on key ``index`` (calls it has in flight there)."""
        return len(self._held[index])

    async def room(self, horizon: float) -> tuple[int, float]:
        """How many calls the pool could start within ``horizon`` seconds (over every key,
        within every cap), and, when that is 0, the seconds until it may not be (-1: unknown,
        every key is at its cap). Takes nothing."""
        args: list[str | int] = ["room", len(self.keys), *self._params, math.ceil(horizon * _US)]
        result: Any = await self._script(keys=self._names, args=args)
        return int(result[0]), int(result[1]) / _US

    async def take(self) -> tuple[int, float, str]:
        """Take a slot (and a permit, on a capped key) on the key that can start a call
        soonest: ``(index, seconds until the slot, permit)``; index -1 = every key is full."""
        self._seq += 1
        permit = f"{self._tag}:{self._seq}"
        args: list[str | int] = [
            "take",
            len(self.keys),
            *self._params,
            permit,
            math.ceil(self.permit_ttl * _US),
        ]
        result: Any = await self._script(keys=self._names, args=args)
        index = int(result[0]) - 1
        if index >= 0 and self.keys[index].max_in_flight > 0:
            self._held[index].add(permit)
        return index, int(result[1]) / _US, permit

    async def acquire(self) -> tuple[int, str]:
        """Wait until a call may start; returns ``(key index, permit)`` for ``release``.

        The slot is reserved at once and slept towards; if the key's cool-down began in the
        meantime (a 429 elsewhere), the permit goes back and a new slot is taken after it.
        """
        while True:
            index, wait, permit = await self.take()
            if index < 0:
                index, wait, permit = await self._take_when_room()
            if wait <= 0:
                return index, permit
            await asyncio.sleep(wait)
            cooling = await self.limiters[index].cooldown_remaining(self.keys[index].id)
            if cooling <= 0:
                return index, permit
            self.release(index, permit)
            await asyncio.sleep(cooling + random.uniform(0, min(0.25, cooling * 0.1)))

    async def _take_when_room(self) -> tuple[int, float, str]:
        async with self._full_gate:  # one poller per process; the rest queue here
            while True:
                self._released.clear()
                index, wait, permit = await self.take()
                if index >= 0:
                    return index, wait, permit
                try:
                    await asyncio.wait_for(self._released.wait(), self.poll)
                except TimeoutError:
                    pass

    def release(self, index: int, permit: str) -> None:
        """The call on key ``index`` is over: its permit goes back (batched, see ``run``)."""
        if permit in self._held[index]:
            self._held[index].discard(permit)
            self._to_release[index].append(permit)
            self._release_due.set()

    async def flush_releases(self) -> int:
        """Send every pending release in one round trip; returns how many."""
        pending = [(i, batch) for i, batch in enumerate(self._to_release) if batch]
        if not pending:
            return 0
        self._to_release = [[] for _ in self.keys]
        async with self._redis.pipeline(transaction=False) as pipe:
            for i, batch in pending:
                pipe.zrem(self._permits_name(self.keys[i].id), *batch)
            await pipe.execute()
        self._released.set()
        return sum(len(b) for _, b in pending)

    async def renew_permits(self) -> int:
        """Push the expiry of every permit this process holds ``permit_ttl`` ahead."""
        renewed = 0
        for i, held in enumerate(self._held):
            members = list(held)
            for start in range(0, len(members), 1000):
                chunk = members[start : start + 1000]
                await self._script(
                    keys=[self._permits_name(self.keys[i].id)],
                    args=["renew", math.ceil(self.permit_ttl * _US), *chunk],
                )
                renewed += len(chunk)
        return renewed

    async def run(self) -> None:
        """Background duty while the process runs: flush releases promptly, renew permits.

        Needed only when some key is capped; a failed round trip is retried on the next turn
        (releases stay pending; unrenewed permits expire, which only frees capacity).
        """
        if not self.capped:
            return
        loop = asyncio.get_running_loop()
        next_renewal = loop.time() + self.permit_ttl / 4
        while True:
            try:
                await asyncio.wait_for(self._release_due.wait(), max(0.0, next_renewal - loop.time()))
            except TimeoutError:
                pass
            self._release_due.clear()
            try:
                await self.flush_releases()
                if loop.time() >= next_renewal:
                    await self.renew_permits()
                    next_renewal = loop.time() + self.permit_ttl / 4
            except Exception as exc:  # Redis away: keep what is pending, try again soon
                log.warning("limiter permits: %s; retrying", type(exc).__name__)
                self._release_due.set()
                await asyncio.sleep(1.0)

    async def report_429(self, index: int, pause: float, step: float = 0.7, floor: float = 0.2) -> None:
        """Key ``index`` was told 429: every worker pauses it and then uses it more slowly."""
        lim, ident = self.limiters[index], self.keys[index].id
        await lim.set_cooldown(ident, pause)
        await lim.penalize(ident, step, floor)
