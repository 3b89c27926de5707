"""Unit tests for worker.limiter on fakeredis (in-process, fast).

Most tests drive the *server* clock: fakeredis answers Lua ``redis.call('TIME')`` from
``time.time()`` in ``fakeredis.commands_mixins.server_mixin``; we swap that module's ``time`` for a
manual clock so GCRA decisions are exact and the tests never sleep.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any

import fakeredis
import pytest
from fakeredis.commands_mixins import server_mixin

from worker.limiter import RateLimiter, limiter_key

KEY = limiter_key("sk-test-upstream-key")


class ManualClock:
    """Stands in for the ``time`` module inside fakeredis's TIME command."""

    def __init__(self, start_s: int = 1_800_000_000) -> None:
        self._now_us = start_s * 1_000_000  # integer microseconds: no float drift

    @property
    def now(self) -> float:
        return self._now_us / 1_000_000

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self._now_us += round(seconds * 1_000_000)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ManualClock:
    c = ManualClock()
    monkeypatch.setattr(server_mixin, "time", c)
    return c


def new_redis(**kwargs: Any) -> fakeredis.FakeAsyncRedis:
    return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), **kwargs)


def run(fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(fn())


def test_fakeredis_lua_has_time() -> None:
    async def main() -> None:
        r = new_redis()
        script = r.register_script("return redis.call('TIME')")
        secs, micros = await script()
        assert abs(int(secs) + int(micros) / 1e6 - time.time()) < 5

    run(main)


def test_admits_burst_plus_one_then_spaces_at_interval(clock: ManualClock) -> None:
    async def main() -> None:
        lim = RateLimiter(new_redis(), limit_per_minute=600, burst=5)
        assert lim.interval == pytest.approx(0.1)
        assert [await lim.try_acquire(KEY) for _ in range(6)] == [0.0] * 6
        assert await lim.try_acquire(KEY) == pytest.approx(0.1, abs=1e-6)

        # Steady state: exactly one admission every 60/limit seconds, polled every 10 ms.
        admitted_at = []
        for _ in range(1000):  # 10 s of server time
            clock.advance(0.01)
            if await lim.try_acquire(KEY) == 0.0:
                admitted_at.append(clock.now)
        assert len(admitted_at) == 100
        gaps = [b - a for a, b in zip(admitted_at, admitted_at[1:], strict=False)]
        assert all(g == pytest.approx(0.1, abs=1e-6) for g in gaps)

    run(main)


def test_burst_refills_after_idle(clock: ManualClock) -> None:
    async def main() -> None:
        lim = RateLimiter(new_redis(), limit_per_minute=60, burst=2)
        assert [await lim.try_acquire(KEY) for _ in range(4)] == [0.0, 0.0, 0.0, 1.0]
        clock.advance(3.0)  # (burst + 1) * T: fully refilled
        assert [await lim.try_acquire(KEY) for _ in range(4)] == [0.0, 0.0, 0.0, 1.0]

    run(main)


def test_try_acquire_wait_is_exact_and_denials_take_nothing(clock: ManualClock) -> None:
    async def main() -> None:
        lim = RateLimiter(new_redis(), limit_per_minute=120, burst=0)  # T = 0.5 s
        assert await lim.try_acquire(KEY) == 0.0
        # Hammering while denied must not push the next slot further away.
        waits = [await lim.try_acquire(KEY) for _ in range(50)]
        assert waits == [pytest.approx(0.5, abs=1e-6)] * 50
        clock.advance(0.3)
        assert await lim.try_acquire(KEY) == pytest.approx(0.2, abs=1e-6)
        clock.advance(0.2)
        assert await lim.try_acquire(KEY) == 0.0

    run(main)


def test_concurrent_callers_get_exactly_burst_plus_one(clock: ManualClock) -> None:
    async def main() -> None:
        lim = RateLimiter(new_redis(), limit_per_minute=300, burst=5)
        waits = await asyncio.gather(*(lim.try_acquire(KEY) for _ in range(40)))
        assert sum(1 for w in waits if w == 0.0) == 6
        assert all(0 < w <= 0.2 + 1e-6 for w in waits if w != 0.0)

    run(main)


def test_keys_are_independent(clock: ManualClock) -> None:
    async def main() -> None:
        lim = RateLimiter(new_redis(), limit_per_minute=60, burst=0)
        a, b = limiter_key("key-a"), limiter_key("key-b")
        assert await lim.try_acquire(a) == 0.0
        assert await lim.try_acquire(a) > 0
        assert await lim.try_acquire(b) == 0.0
        await lim.set_cooldown(a, 30)
        assert await lim.cooldown_remaining(b) == 0.0

    run(main)


def test_cooldown_blocks_and_reports_remaining(clock: ManualClock) -> None:
    async def main() -> None:
        lim = RateLimiter(new_redis(), limit_per_minute=600, burst=5)
        assert await lim.cooldown_remaining(KEY) == 0.0
        await lim.set_cooldown(KEY, 2.0)
        assert await lim.cooldown_remaining(KEY) == pytest.approx(2.0, abs=1e-6)
        # Full bucket, yet nothing is admitted, and each answer is the remaining cool-down.
        assert await lim.try_acquire(KEY) == pytest.approx(2.0, abs=1e-6)
        clock.advance(1.5)
        assert await lim.try_acquire(KEY) == pytest.approx(0.5, abs=1e-6)
        assert await lim.cooldown_remaining(KEY) == pytest.approx(0.5, abs=1e-6)
        clock.advance(0.5)
        assert await lim.cooldown_remaining(KEY) == 0.0
        # Denials during the cool-down took no tokens: the whole burst is available.
        assert [await lim.try_acquire(KEY) for _ in range(6)] == [0.0] * 6
        assert await lim.try_acquire(KEY) > 0

    run(main)


def test_cooldown_is_shared_between_limiter_instances(clock: ManualClock) -> None:
    async def main() -> None:
        r = new_redis()
        worker_a = RateLimiter(r, limit_per_minute=300)
        worker_b = RateLimiter(r, limit_per_minute=300)
        await worker_a.set_cooldown(KEY, 5)
        assert await worker_b.try_acquire(KEY) == pytest.approx(5.0, abs=1e-6)

    run(main)


def test_set_cooldown_never_shortens(clock: ManualClock) -> None:
    async def main() -> None:
        lim = RateLimiter(new_redis(), limit_per_minute=300)
        await lim.set_cooldown(KEY, 10)
        clock.advance(1)
        await lim.set_cooldown(KEY, 2)  # ends earlier: ignored
        assert await lim.cooldown_remaining(KEY) == pytest.approx(9.0, abs=1e-6)
        await lim.set_cooldown(KEY, 0)
        await lim.set_cooldown(KEY, -5)
        assert await lim.cooldown_remaining(KEY) == pytest.approx(9.0, abs=1e-6)
        await lim.set_cooldown(KEY, 20)  # ends later: extends
        assert await lim.cooldown_remaining(KEY) == pytest.approx(20.0, abs=1e-6)
        with pytest.raises(ValueError, match="finite"):
            await lim.set_cooldown(KEY, math.inf)

    run(main)


def test_keys_get_ttl_matching_their_state(clock: ManualClock) -> None:
    async def main() -> None:
        r = new_redis(decode_responses=True)
        lim = RateLimiter(r, limit_per_minute=600, burst=5, prefix="t:rl:")
        for _ in range(6):
            await lim.try_acquire(KEY)
        await lim.set_cooldown(KEY, 3)
        tat_key, cd_key = f"t:rl:{{{KEY}}}:tat", f"t:rl:{{{KEY}}}:cd"
        assert sorted([k async for k in r.scan_iter("*")]) == sorted([tat_key, cd_key])
        # TAT is 6 * T = 600 ms ahead: the key lives that long (+1 ms), then means "idle".
        assert 590 <= await r.pttl(tat_key) <= 601
        assert 2990 <= await r.pttl(cd_key) <= 3001

    run(main)


def test_idle_keys_vanish() -> None:
    async def main() -> None:
        r = new_redis()
        lim = RateLimiter(r, limit_per_minute=6000, burst=0)  # T = 10 ms
        assert await lim.try_acquire(KEY) == 0.0
        await lim.set_cooldown(KEY, 0.02)
        assert await r.dbsize() == 2
        await asyncio.sleep(0.06)
        assert await r.dbsize() == 0

    run(main)


def test_acquire_sleeps_until_admitted() -> None:
    async def main() -> None:
        lim = RateLimiter(new_redis(), limit_per_minute=1200, burst=0)  # T = 50 ms
        assert await lim.acquire(KEY) < 0.01
        waited = await lim.acquire(KEY)
        assert 0.04 <= waited < 0.5
        await lim.set_cooldown(KEY, 0.2)
        waited = await lim.acquire(KEY)
        assert 0.19 <= waited < 0.7

    run(main)


def test_limiter_key_hides_the_api_key() -> None:
    secret = "sk-live-0123456789abcdefSECRET"
    k = limiter_key(secret)
    assert k == hashlib.sha256(secret.encode()).hexdigest()[:16]
    assert len(k) == 16
    assert all(c in "0123456789abcdef" for c in k)
    assert limiter_key(secret) == k
    assert limiter_key(secret + "x") != k
    assert "SECRET" not in k

    async def main() -> None:
        r = new_redis(decode_responses=True)
        lim = RateLimiter(r, limit_per_minute=60)
        await lim.try_acquire(k)
        await lim.set_cooldown(k, 5)
        for name in [n async for n in r.scan_iter("*")]:
            assert "SECRET" not in name
            assert "SECRET" not in (await r.get(name) or "")

    run(main)


def test_rejects_bad_settings() -> None:
    r = new_redis()
    with pytest.raises(ValueError, match="limit_per_minute"):
        RateLimiter(r, limit_per_minute=0)
    with pytest.raises(ValueError, match="burst"):
        RateLimiter(r, limit_per_minute=10, burst=-1)


def test_interval_rounds_up_never_looser() -> None:
    lim = RateLimiter(new_redis(), limit_per_minute=7, burst=0)
    assert lim.interval >= 60 / 7
    assert lim.interval - 60 / 7 < 1e-6


def test_reserve_takes_future_slots_at_the_interval(clock: ManualClock) -> None:
    async def main() -> None:
        lim = RateLimiter(new_redis(), limit_per_minute=600, burst=2)
        waits = [await lim.reserve(KEY) for _ in range(6)]
        assert waits == pytest.approx([0.0, 0.0, 0.0, 0.1, 0.2, 0.3], abs=1e-6)
        # A polling caller now finds nothing free: the reserved slots are taken.
        assert await lim.try_acquire(KEY) == pytest.approx(0.4, abs=1e-6)

    run(main)


def test_reserve_never_lands_inside_a_cooldown(clock: ManualClock) -> None:
    async def main() -> None:
        lim = RateLimiter(new_redis(), limit_per_minute=600, burst=0)
        await lim.set_cooldown(KEY, 2.0)
        assert await lim.reserve(KEY) == pytest.approx(2.0, abs=1e-6)
        assert await lim.reserve(KEY) == pytest.approx(2.1, abs=1e-6)

    run(main)


def test_429s_step_the_rate_down_and_it_recovers_gradually(clock: ManualClock) -> None:
    async def main() -> None:
        lim = RateLimiter(new_redis(), limit_per_minute=600, burst=0)
        assert await lim.rate_factor(KEY) == 1.0
        assert await lim.penalize(KEY) == pytest.approx(0.7)
        assert await lim.penalize(KEY) == pytest.approx(0.49)
        for _ in range(10):
            await lim.penalize(KEY)
        assert await lim.rate_factor(KEY) == pytest.approx(0.2)  # the floor
        # Spacing follows the factor: 0.1 s / 0.2 = 0.5 s between slots.
        assert [await lim.reserve(KEY) for _ in range(3)] == pytest.approx([0.0, 0.5, 1.0], abs=1e-5)
        clock.advance(10)
        assert await lim.rate_factor(KEY) == pytest.approx(0.4)
        clock.advance(30)
        assert await lim.rate_factor(KEY) == 1.0

    run(main)


def test_penalty_is_shared_by_every_limiter_on_the_key(clock: ManualClock) -> None:
    async def main() -> None:
        r = new_redis()
        a = RateLimiter(r, limit_per_minute=600)
        b = RateLimiter(r, limit_per_minute=600)
        await a.penalize(KEY)
        assert await b.rate_factor(KEY) == pytest.approx(0.7)

    run(main)


@pytest.mark.parametrize(("limit", "burst"), [(600, 5), (300, 5), (60, 0), (10, 20), (3, 5)])
def test_window_safe_settings_never_exceed_the_quota_in_any_60_s(
    clock: ManualClock, limit: int, burst: int
) -> None:
    """Three minutes of a greedy caller against the sliding minute an upstream enforces."""
    from worker.limiter import window_safe

    async def main() -> None:
        rate, safe_burst = window_safe(limit, burst)
        lim = RateLimiter(new_redis(), limit_per_minute=rate, burst=safe_burst)
        admitted: list[float] = []
        while clock.now < 1_800_000_180:
            wait = await lim.try_acquire(KEY)  # jump straight to each next admission
            if wait == 0.0:
                admitted.append(clock.now)
            else:
                clock.advance(wait)
        assert max_in_window(admitted, 60) <= limit
        if limit >= 60:  # the carve-out costs (burst + 1) / limit of the steady rate
            late = [t for t in admitted if t >= admitted[0] + 60]
            assert len(late) / ((late[-1] - late[0]) / 60) >= 0.95 * limit

    run(main)


def max_in_window(times: list[float], window: float) -> int:
    """Most admissions in any half-open interval [t, t + window)."""
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best
