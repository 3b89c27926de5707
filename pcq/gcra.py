"""GCRA, the Generic Cell Rate Algorithm (as in redis-cell's ``CL.THROTTLE``), in Redis Lua.

Both rate limits run it: the API's per-tenant limit (``api.tenant_limits``) and the upstream
key pool all workers share (``worker.limiter``). Each edge's script begins with ``LUA_PRELUDE``
and adds its own rules (the API refuses a request whose slot is not now; the pool reserves the
earliest slot over several keys, behind cool-downs and in-flight caps).

* **O(1) memory per budget.** The whole state is one number, the *theoretical arrival time*
  (TAT): the instant the budget would be back to empty if no further request came.
* **Exact spacing.** With emission interval ``T = 60 / limit_per_minute`` seconds, each request
  pushes the TAT ``T`` further: steady traffic passes exactly every ``T`` seconds, with no
  window-boundary double bursts (fixed window) and no approximation (sliding counter).
* **Burst as tolerance.** A request's earliest slot is ``max(now, TAT - tau)`` with
  ``tau = burst * T``; taking it moves the TAT to ``max(TAT, slot) + T``. From idle that lets
  ``burst + 1`` requests through at once, then one per ``T``; in *any* interval of ``W``
  seconds at most ``W / T + burst + 1`` pass.
* **Atomic, and on one clock.** Read, decide and write run in one Lua script (Redis runs scripts
  atomically, so no GET-then-SET race between processes), and ``now`` is ``redis.call('TIME')``:
  skewed client clocks cannot change a decision. Scripts are replicated by effects (Redis 5+;
  ``redis.replicate_commands()`` is called where it exists), so ``TIME`` in a writing script is
  safe. ``fakeredis`` (with ``lupa``) runs the same scripts for the in-process modes.
* **No module needed.** redis-cell must be loaded as a Redis module (often impossible on managed
  Redis); a plain ``EVALSHA`` works everywhere.

The TAT is kept in integer microseconds of Redis time (Lua numbers are doubles, exact up to
2**53; epoch microseconds are ~2**51), in a key that expires once it is in the past (+1 ms):
a missing key then means exactly what an old one would, so idle budgets vanish. ``T`` is
rounded *up* to a whole microsecond, so rounding can only make a limit stricter, never looser.
"""

from __future__ import annotations

import math
from typing import Final

__all__ = ["LUA_PRELUDE", "interval_us"]

# Defines ``now`` (microseconds of Redis time) and three functions for the script that follows.
LUA_PRELUDE: Final = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

-- A budget's TAT; 0 for an idle budget (its key is gone).
local function gcra_tat(key)
  return tonumber(redis.call('GET', key) or '0') or 0
end

-- The earliest slot not before not_before (>= now), for interval T and tolerance tau, and
-- the TAT once that slot is taken.
local function gcra_slot(tat, T, tau, not_before)
  local slot = tat - tau
  if slot < not_before then slot = not_before end
  if tat < slot then tat = slot end
  return slot, tat + T
end

-- Store a TAT, with a key that lives until the TAT is in the past.
local function gcra_store(key, tat)
  redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
end
"""


def interval_us(limit_per_minute: int) -> int:
    """The emission interval ``T`` in microseconds, rounded up (never admits more)."""
    return math.ceil(60_000_000 / limit_per_minute)
