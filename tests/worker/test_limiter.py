"""One upstream key's budget in worker.limiter's KeyPool, on fakeredis (in-process, fast).

Every test drives the pool as the engine does (``take``, the step of ``acquire`` that reserves
a slot, ``acquire`` itself, ``room``, ``report_429``). Most of them drive the *server* clock:
fakeredis answers Lua ``redis.call('TIME')`` and expires keys by ``time.time()``; the
``clock`` fixture swaps both for a manual clock, so GCRA decisions are exact and the tests never
sleep. The Python process's own clock is years behind it: decisions follow Redis's clock.
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
from fakeredis._socket import _base as fakeredis_socket
from fakeredis.commands_mixins import server_mixin

from pcq.settings import key_id
from worker.limiter import KeyPool, PoolKey, window_safe

KEY = key_id("sk-test-upstream-key")


class ManualClock:
    """Stands in for the ``time`` module where fakeredis reads the time (TIME, expiry)."""

    def __init__(self, start_s: int = 1_800_000_000) -> None:
        self._now_us = start_s * 1_000_000  # integer microseconds: no float drift

    @property
    def now(self) -> float:
        return self._now_us / 1_000_000

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self._now_us += round(seconds * 1_000_000)


def install_manual_clock(monkeypatch: pytest.MonkeyPatch) -> ManualClock:
    c = ManualClock()
    monkeypatch.setattr(server_mixin, "time", c)  # TIME
    monkeypatch.setattr(fakeredis_socket, "time", c)  # the clock keys expire by
    return c


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ManualClock:
    return install_manual_clock(monkeypatch)


def new_redis(**kwargs: Any) -> fakeredis.FakeAsyncRedis:
    return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), **kwargs)


def run(fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(fn())


def one_key(r: fakeredis.FakeAsyncRedis, limit: int, burst: int, key: str = KEY, **kw: Any) -> KeyPool:
    """A pool of one key, as the engine builds it for a single PARALLEL_API_KEY."""
    return KeyPool(r, [PoolKey(key, limit, burst, kw.pop("max_in_flight", 0))], **kw)


def interval(limit: int, burst: int, factor: float = 1.0) -> float:
    """Seconds between slots on a key of ``limit``/min and ``burst`` (made window-safe), at
    ``factor`` of its rate: the emission interval, rounded up to a whole microsecond."""
    rate, _ = window_safe(limit, burst)
    return math.ceil(math.ceil(60e6 / rate) * 1e6 / round(factor * 1e6)) / 1e6


async def waits(pool: KeyPool, n: int) -> list[float]:
    """Reserve ``n`` slots one after the other: the seconds until each."""
    return [(await pool.take())[1] for _ in range(n)]


async def spacing(pool: KeyPool) -> float:
    """The seconds between two slots reserved now, on a key with no burst: its interval."""
    first, second = await waits(pool, 2)
    return second - first


def test_fakeredis_lua_has_time() -> None:
    async def main() -> None:
        r = new_redis()
        script = r.register_script("return redis.call('TIME')")
        secs, micros = await script()
        assert abs(int(secs) + int(micros) / 1e6 - time.time()) < 5

    run(main)


def test_admits_burst_plus_one_then_spaces_at_interval(clock: ManualClock) -> None:
    async def main() -> None:
        pool = one_key(new_redis(), 600, 5)
        t = interval(600, 5)
        assert t == pytest.approx(60 / 589, abs=1e-6)  # window_safe(600, 5) = 589/min
        assert await waits(pool, 6) == [0.0] * 6
        # Then exactly one slot every interval, for as far ahead as callers reserve.
        assert await waits(pool, 100) == pytest.approx([k * t for k in range(1, 101)], abs=1e-6)

    run(main)


def test_burst_refills_after_idle(clock: ManualClock) -> None:
    async def main() -> None:
        pool = one_key(new_redis(), 60, 2)
        t = interval(60, 2)
        assert await waits(pool, 4) == pytest.approx([0.0, 0.0, 0.0, t], abs=1e-6)
        clock.advance(4 * t)  # every slot taken is past: fully refilled
        assert await waits(pool, 4) == pytest.approx([0.0, 0.0, 0.0, t], abs=1e-6)

    run(main)


def test_room_queries_and_refused_takes_take_no_slot(clock: ManualClock) -> None:
    async def main() -> None:
        pool = one_key(new_redis(), 120, 0, max_in_flight=1)
        t = interval(120, 0)
        index, wait, permit = await pool.take()
        assert (index, wait) == (0, 0.0)
        for _ in range(50):  # at its in-flight cap: refused, and nothing is taken
            assert (await pool.take())[0] == -1
            assert await pool.room(horizon=60) == (0, -1.0)
        pool.release(index, permit)
        await pool.flush_releases()
        for _ in range(50):  # asking how much room there is takes nothing either
            assert await pool.room(horizon=0) == (0, pytest.approx(t, abs=1e-6))
        clock.advance(0.3)
        # The next slot is still one interval after the first, not 100 intervals.
        assert (await pool.take())[1] == pytest.approx(t - 0.3, abs=1e-6)

    run(main)


def test_concurrent_callers_get_exactly_burst_plus_one(clock: ManualClock) -> None:
    async def main() -> None:
        pool = one_key(new_redis(), 300, 5)
        t = interval(300, 5)
        got = await asyncio.gather(*(pool.take() for _ in range(40)))
        # Atomic: 6 slots now, then one per interval, none given twice.
        expected = [0.0] * 6 + [k * t for k in range(1, 35)]
        assert sorted(w for _, w, _ in got) == pytest.approx(expected, abs=1e-6)

    run(main)


def test_keys_are_independent(clock: ManualClock) -> None:
    async def main() -> None:
        r = new_redis()
        a = one_key(r, 60, 0, key=key_id("key-a"))
        b = one_key(r, 60, 0, key=key_id("key-b"))
        assert await waits(a, 2) == [0.0, pytest.approx(interval(60, 0), abs=1e-6)]
        assert (await b.take())[1] == 0.0
        await a.report_429(0, pause=30)
        assert await b.cooldown_remaining(0) == 0.0
        assert await spacing(b) == pytest.approx(interval(60, 0), abs=1e-6)  # not stepped down

    run(main)


def test_cooldown_holds_slots_back_and_reports_remaining(clock: ManualClock) -> None:
    async def main() -> None:
        pool = one_key(new_redis(), 600, 5)
        assert await pool.cooldown_remaining(0) == 0.0
        await pool.report_429(0, pause=2.0)
        assert await pool.cooldown_remaining(0) == pytest.approx(2.0, abs=1e-6)
        # A full budget, yet nothing can start within a horizon shorter than the cool-down.
        assert await pool.room(horizon=1.5) == (0, pytest.approx(0.5, abs=1e-6))
        clock.advance(1.5)
        assert await pool.cooldown_remaining(0) == pytest.approx(0.5, abs=1e-6)
        # Slots reserved now lie at the end of the cool-down, never inside it: the burst
        # first, then at the rate the 429 stepped down (0.7, plus 0.02 per second since).
        t, tau = interval(600, 5, 0.73), 5 * interval(600, 5)
        expected = [max(0.5, 0.5 + k * t - tau) for k in range(8)]
        assert await waits(pool, 8) == pytest.approx(expected, abs=1e-6)
        clock.advance(0.5)
        assert await pool.cooldown_remaining(0) == 0.0

    run(main)


def test_cooldown_is_shared_between_worker_pools(clock: ManualClock) -> None:
    async def main() -> None:
        r = new_redis()
        worker_a, worker_b = one_key(r, 300, 5), one_key(r, 300, 5)
        await worker_a.report_429(0, pause=5)
        assert await worker_b.cooldown_remaining(0) == pytest.approx(5.0, abs=1e-6)
        assert (await worker_b.take())[1] == pytest.approx(5.0, abs=1e-6)

    run(main)


def test_a_429_never_shortens_a_cooldown(clock: ManualClock) -> None:
    async def main() -> None:
        pool = one_key(new_redis(), 300, 5)
        await pool.report_429(0, pause=10)
        clock.advance(1)
        await pool.report_429(0, pause=2)  # ends earlier: ignored
        assert await pool.cooldown_remaining(0) == pytest.approx(9.0, abs=1e-6)
        await pool.report_429(0, pause=0)
        await pool.report_429(0, pause=-5)
        assert await pool.cooldown_remaining(0) == pytest.approx(9.0, abs=1e-6)
        await pool.report_429(0, pause=20)  # ends later: extends
        assert await pool.cooldown_remaining(0) == pytest.approx(20.0, abs=1e-6)
        with pytest.raises(ValueError, match="finite"):
            await pool.report_429(0, pause=math.inf)

    run(main)


def test_keys_get_ttl_matching_their_state(clock: ManualClock) -> None:
    async def main() -> None:
        r = new_redis(decode_responses=True)
        pool = one_key(r, 600, 5, max_in_flight=10, prefix="t:rl:", permit_ttl=60)
        await waits(pool, 7)
        await pool.report_429(0, pause=3)
        names = {part: f"t:rl:{{{KEY}}}:{part}" for part in ("tat", "cd", "f", "fl")}
        assert sorted([k async for k in r.scan_iter("*")]) == sorted(names.values())
        # The TAT is 7 intervals ahead: it lives that long (+1 ms), then means "idle".
        assert await r.pttl(names["tat"]) == math.ceil(7 * interval(600, 5) * 1000) + 1
        assert await r.pttl(names["cd"]) == 3001
        assert await r.pttl(names["f"]) == 16_000  # 0.7 back to 1.0 at 0.02/s, + 1 s
        assert await r.pttl(names["fl"]) == 60_001  # the permits' ttl
        assert await r.zcard(names["fl"]) == 7

    run(main)


def test_idle_keys_vanish(clock: ManualClock) -> None:
    async def main() -> None:
        r = new_redis()
        pool = one_key(r, 6000, 0, max_in_flight=5, permit_ttl=30)
        await waits(pool, 2)
        await pool.report_429(0, pause=0.02)
        assert await r.dbsize() == 4
        clock.advance(1)
        assert await r.dbsize() == 2  # the rate factor and the permits are still in force
        clock.advance(15.001)
        assert await r.dbsize() == 1  # the factor is back to 1.0
        clock.advance(15)
        assert await r.dbsize() == 0  # unreleased permits (a dead worker's) expire too

    run(main)


def test_acquire_sleeps_until_its_slot() -> None:
    async def main() -> None:
        pool = one_key(new_redis(), 1200, 0)  # about 50 ms apart
        loop = asyncio.get_running_loop()
        started = loop.time()
        await pool.acquire()
        assert loop.time() - started < 0.01
        started = loop.time()
        await pool.acquire()
        assert 0.04 <= loop.time() - started < 0.5
        await pool.report_429(0, pause=0.2)
        started = loop.time()
        await pool.acquire()
        assert 0.19 <= loop.time() - started < 0.7

    run(main)


def test_a_cooldown_that_begins_during_the_sleep_moves_the_call_after_it() -> None:
    """Another worker sees a 429 while this call sleeps towards its slot: the call gives its
    permit back and starts after the cool-down instead."""

    async def main() -> None:
        r = new_redis()
        pool = one_key(r, 600, 0, max_in_flight=5)  # about 100 ms apart
        other_worker = one_key(r, 600, 0, max_in_flight=5)
        loop = asyncio.get_running_loop()
        first = await pool.acquire()
        waiting = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0.02)
        await other_worker.report_429(0, pause=0.4)
        reported = loop.time()
        index, permit = await asyncio.wait_for(waiting, 2.0)
        assert index == 0
        assert loop.time() - reported >= 0.39
        assert await pool.flush_releases() == 1  # the permit of the abandoned slot
        assert await pool.renew_permits() == 2  # the first call's and this one's
        assert permit != first[1]

    run(main)


def test_the_limiter_state_never_holds_the_api_key(clock: ManualClock) -> None:
    secret = "sk-live-0123456789abcdefSECRET"
    k = key_id(secret)
    assert k == hashlib.sha256(secret.encode()).hexdigest()[:16]
    assert all(c in "0123456789abcdef" for c in k)
    assert key_id(secret + "x") != k

    async def main() -> None:
        r = new_redis()
        pool = one_key(r, 60, 5, key=k, max_in_flight=3)
        await pool.take()
        await pool.report_429(0, pause=5)
        names = [n async for n in r.scan_iter("*")]
        assert len(names) == 4
        for name in names:
            assert b"SECRET" not in name
            assert b"SECRET" not in await r.dump(name)

    run(main)


def test_interval_rounds_up_never_looser(clock: ManualClock) -> None:
    async def main() -> None:
        pool = one_key(new_redis(), 9, 0)  # window_safe: 7/min, 8.5714285... s apart
        assert window_safe(9, 0) == (7, 0)
        _, second = await waits(pool, 2)
        assert second >= 60 / 7
        assert second - 60 / 7 < 1e-6

    run(main)


def test_reserved_slots_are_taken_for_every_later_caller(clock: ManualClock) -> None:
    async def main() -> None:
        pool = one_key(new_redis(), 600, 2)
        t = interval(600, 2)
        assert await waits(pool, 6) == pytest.approx([0.0, 0.0, 0.0, t, 2 * t, 3 * t], abs=1e-6)
        # Nothing is free now: the next slot is the one after those reserved.
        assert await pool.room(horizon=0) == (0, pytest.approx(4 * t, abs=1e-6))
        assert (await pool.take())[1] == pytest.approx(4 * t, abs=1e-6)

    run(main)


def test_429s_step_the_rate_down_and_it_recovers_gradually(clock: ManualClock) -> None:
    async def main() -> None:
        pool = one_key(new_redis(), 600, 0)
        assert await spacing(pool) == pytest.approx(interval(600, 0), abs=1e-6)
        clock.advance(1)
        await pool.report_429(0, pause=1)
        assert await spacing(pool) == pytest.approx(interval(600, 0, 0.7), abs=1e-6)
        await pool.report_429(0, pause=1)
        assert await spacing(pool) == pytest.approx(interval(600, 0, 0.49), abs=1e-6)
        for _ in range(10):
            await pool.report_429(0, pause=1)
        assert await spacing(pool) == pytest.approx(interval(600, 0, 0.2), abs=1e-6)  # the floor
        clock.advance(10)  # 0.02 per second without a 429
        assert await spacing(pool) == pytest.approx(interval(600, 0, 0.4), abs=1e-6)
        clock.advance(30)
        assert await spacing(pool) == pytest.approx(interval(600, 0), abs=1e-6)

    run(main)


def test_the_step_down_is_shared_by_every_worker_on_the_key(clock: ManualClock) -> None:
    async def main() -> None:
        r = new_redis()
        a, b = one_key(r, 600, 0), one_key(r, 600, 0)
        await a.report_429(0, pause=1)
        assert await spacing(b) == pytest.approx(interval(600, 0, 0.7), abs=1e-6)

    run(main)


@pytest.mark.parametrize(("limit", "burst"), [(600, 5), (300, 5), (60, 0), (10, 20), (3, 5)])
def test_window_safe_settings_never_exceed_the_quota_in_any_60_s(
    clock: ManualClock, limit: int, burst: int
) -> None:
    """Three minutes of a greedy caller against the sliding minute an upstream enforces."""

    async def main() -> None:
        pool = one_key(new_redis(), limit, burst)
        admitted: list[float] = []
        while clock.now < 1_800_000_180 and len(admitted) <= 4 * limit:
            _, wait, _ = await pool.take()
            clock.advance(wait)  # sleep until the slot, start, and ask for the next one at once
            admitted.append(clock.now)
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
