"""The upstream rate limit every worker process shares through Redis: a pool of upstream keys.

Each key has its own GCRA budget (``pcq.gcra``: one number per key, decided atomically in one
Lua script on the Redis clock), its own shared cool-down and rate factor, and, optionally, a cap
on the calls in flight on it across every worker. A call *reserves* the earliest slot on the
key that can start it soonest and sleeps once towards it, so thousands of waiting calls cost
one Redis call each, not one per wake-up.

**Cool-down and step-down after a 429.** ``report_429`` sets the key's cool-down (no slot is
given inside it; a later 429 never shortens it) and scales the key's rate by ``step`` (0.7,
not below ``floor``, 0.2, of the limit); the factor climbs back linearly, 0.02 per second, so
from 0.7 to 1.0 in 15 s, while no 429 comes. Both hold for every worker.

Keys, with one hash tag per upstream key (a pool's script touches every key of the pool, so a
pool of several keys needs one Redis server, not a Redis Cluster)::

    {prefix}{<key id>}:tat   the key's TAT (integer microseconds of Redis time)
    {prefix}{<key id>}:cd    end of its cool-down (microseconds of Redis time)
    {prefix}{<key id>}:f     its rate factor (x1e6) and when it was set
    {prefix}{<key id>}:fl    its in-flight permits: a sorted set, permit -> expiry

Each expires when its value no longer matters (the TAT or the cool-down end is past, the factor
is back to 1.0, the permits have expired), so idle keys vanish without changing any decision.
``<key id>`` is ``pcq.settings.key_id(api_key)``, never the key.
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

from pcq.gcra import LUA_PRELUDE, interval_us

if TYPE_CHECKING:
    import redis.asyncio

__all__ = ["KeyPool", "PoolKey", "window_safe"]

log = logging.getLogger(__name__)
_US: Final = 1_000_000

# ARGV[1] = mode. The pool modes ("take", "room") span every key: KEYS holds 4 names per key
# (tat, cd, f, fl); ARGV[2] = n keys, then per key T (us), tau (us), cap (0 = no cap), then the
# mode's own arguments. The other modes act on one key: KEYS = its 4 names.
_SCRIPT: Final = (
    LUA_PRELUDE
    + """
local mode = ARGV[1]
local RECOVERY = 20000  -- factor x1e6 regained per second: from 0.5 to 1.0 in 25 s

local function factor_at(key)
  local f = redis.call('HMGET', key, 'f', 't')
  if not f[1] then return 1000000 end
  local v = tonumber(f[1]) + (now - tonumber(f[2])) / 1000000 * RECOVERY
  if v > 1000000 then v = 1000000 end
  return v
end
local function cooldown_end(key) return tonumber(redis.call('GET', key) or '0') or 0 end

-- take: ARGV[extra] = permit, ARGV[extra + 1] = its ttl (us) -> {key (1-based; 0 = every key is
--   at its cap), us until the slot, now}
-- room: ARGV[extra] = horizon (us) -> {calls that could start within it, us until one could
--   (-1 = unknown, every key is at its cap; meaningful when the room is 0), now}
if mode == 'take' or mode == 'room' then
  local n = tonumber(ARGV[2])
  local extra = 3 + 3 * n
  local best, best_at, best_tat = nil, nil, nil
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
      local tat = gcra_tat(KEYS[k + 1])
      local cd = cooldown_end(KEYS[k + 2])
      local not_before = now
      if not_before < cd then not_before = cd end
      local at, new_tat = gcra_slot(tat, T, tau, not_before)
      if best_at == nil or at < best_at then
        best, best_at, best_tat = i, at, new_tat
      end
      if mode == 'room' then
        local slots = 0
        if at - now <= horizon then
          -- slot j (from 0) lies at max(base + j*T - tau, not_before)
          local base = tat
          if base < not_before then base = not_before end
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
    return {0, -1, now}
  end
  local k = (best - 1) * 4
  gcra_store(KEYS[k + 1], best_tat)
  if tonumber(ARGV[best * 3 + 2]) > 0 then
    local expires = now + tonumber(ARGV[extra + 1])
    redis.call('ZADD', KEYS[k + 4], string.format('%.0f', expires), ARGV[extra])
    redis.call('PEXPIRE', KEYS[k + 4], math.ceil((expires - now) / 1000) + 1)
  end
  return {best, best_at - now, now}
end

-- renew: ARGV[2] = ttl (us); ARGV[3..] = this worker's permits on the key -> {count, now}
if mode == 'renew' then
  local expires = string.format('%.0f', now + tonumber(ARGV[2]))
  for i = 3, #ARGV do
    redis.call('ZADD', KEYS[4], 'XX', expires, ARGV[i])
  end
  redis.call('PEXPIRE', KEYS[4], math.ceil(tonumber(ARGV[2]) / 1000) + 1)
  return {#ARGV - 2, now}
end

-- cooldown: -> {us left in the key's cool-down, now}
if mode == 'cooldown' then
  local left = cooldown_end(KEYS[2]) - now
  if left < 0 then left = 0 end
  return {left, now}
end

-- 429: ARGV[2] = cool-down (us; never shortens one that ends later), ARGV[3] = step,
--   ARGV[4] = floor (x1e6) -> {the new factor x1e6, now}
if mode == '429' then
  local dur = tonumber(ARGV[2])
  if dur > 0 and now + dur > cooldown_end(KEYS[2]) then
    redis.call('SET', KEYS[2], string.format('%.0f', now + dur), 'PX', math.ceil(dur / 1000) + 1)
  end
  local v = factor_at(KEYS[3]) * tonumber(ARGV[3]) / 1000000
  if v < tonumber(ARGV[4]) then v = tonumber(ARGV[4]) end
  redis.call('HSET', KEYS[3], 'f', string.format('%.0f', v), 't', string.format('%.0f', now))
  redis.call('PEXPIRE', KEYS[3], math.ceil((1000000 - v) / RECOVERY * 1000) + 1000)
  return {math.floor(v), now}
end

return redis.error_reply('unknown limiter mode ' .. tostring(mode))
"""
)


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


@dataclass(frozen=True)
class PoolKey:
    """One upstream key's budget: ``id`` is ``pcq.settings.key_id(api_key)``, never the key."""

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
        self.permit_ttl = permit_ttl
        self.poll = poll
        self._redis = redis
        self._script = redis.register_script(_SCRIPT)
        self._params: list[int] = []
        for k in self.keys:
            rate, burst = window_safe(k.limit_per_minute, k.burst)
            interval = interval_us(rate)
            self._params += [interval, burst * interval, k.max_in_flight]
        # Per key: tat, cd, f, fl (see the module docstring).
        self._names = [f"{prefix}{{{k.id}}}:{part}" for k in self.keys for part in ("tat", "cd", "f", "fl")]
        self._tag = uuid.uuid4().hex[:12]  # this process's permits carry it
        self._seq = 0
        self._held: list[set[str]] = [set() for _ in self.keys]
        self._to_release: list[list[str]] = [[] for _ in self.keys]
        self._release_due = asyncio.Event()
        self._released = asyncio.Event()
        self._full_gate = asyncio.Lock()

    @property
    def capped(self) -> bool:
        return any(k.max_in_flight > 0 for k in self.keys)

    def _key_names(self, index: int) -> list[str]:
        return self._names[4 * index : 4 * index + 4]

    async def room(self, horizon: float) -> tuple[int, float]:
        """How many calls the pool could start within ``horizon`` seconds (over every key,
        within every cap), and, when that is 0, the seconds until it may not be (-1: unknown,
        every key is at its cap). Takes nothing."""
        args: list[str | int] = ["room", len(self.keys), *self._params, math.ceil(horizon * _US)]
        result: Any = await self._script(keys=self._names, args=args)
        opens_in = int(result[1])
        return int(result[0]), opens_in / _US if opens_in >= 0 else -1.0

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
        Jitter on that wait (<= 10 %, at most 0.25 s) keeps the calls a cool-down released
        from all asking Redis in the same millisecond.
        """
        while True:
            index, wait, permit = await self.take()
            if index < 0:
                index, wait, permit = await self._take_when_room()
            if wait <= 0:
                return index, permit
            await asyncio.sleep(wait)
            cooling = await self.cooldown_remaining(index)
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

    async def cooldown_remaining(self, index: int) -> float:
        """Seconds left in key ``index``'s shared cool-down (0.0 when none is active)."""
        result: Any = await self._script(keys=self._key_names(index), args=["cooldown"])
        return int(result[0]) / _US

    async def report_429(self, index: int, pause: float, step: float = 0.7, floor: float = 0.2) -> None:
        """Key ``index`` was told 429: every worker pauses it for ``pause`` seconds (a longer
        cool-down already set stays) and then uses it at ``step`` times its current rate, not
        below ``floor`` of its limit, climbing back while no 429 comes."""
        if not math.isfinite(pause):
            raise ValueError("cool-down seconds must be finite")
        args: list[str | int] = ["429", max(0, math.ceil(pause * _US)), round(step * _US), round(floor * _US)]
        await self._script(keys=self._key_names(index), args=args)

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
                pipe.zrem(self._key_names(i)[3], *batch)
            await pipe.execute()
        self._released.set()
        return sum(len(b) for _, b in pending)

    async def renew_permits(self) -> int:
        """Push the expiry of every permit this process holds ``permit_ttl`` ahead; returns
        how many it holds."""
        renewed = 0
        for i, held in enumerate(self._held):
            members = list(held)
            for start in range(0, len(members), 1000):
                chunk = members[start : start + 1000]
                await self._script(
                    keys=self._key_names(i), args=["renew", math.ceil(self.permit_ttl * _US), *chunk]
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
