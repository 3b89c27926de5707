"""KeyPool on fakeredis with a manual server clock: key choice, in-flight caps, admission room.

One key's budget (rate, burst, cool-down, step-down) is tested in test_limiter.py.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter

import pytest

from pcq.settings import key_id
from tests.worker.test_limiter import ManualClock, install_manual_clock, interval, new_redis, run
from worker.limiter import KeyPool, PoolKey, window_safe

A, B = key_id("sk-key-a"), key_id("sk-key-b")


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ManualClock:
    return install_manual_clock(monkeypatch)


def test_calls_spread_over_keys_in_proportion_to_their_quotas(clock: ManualClock) -> None:
    async def main() -> None:
        pool = KeyPool(new_redis(), [PoolKey(A, 600, burst=0), PoolKey(B, 1800, burst=0)])
        waits: list[float] = []
        used: Counter[int] = Counter()
        for _ in range(400):
            index, wait, _ = await pool.take()
            used[index] += 1
            waits.append(wait)
        # Each key's safe rate: 600 -> 594/min, 1800 -> 1784/min; slots interleave by time.
        share_b = used[1] / 400
        assert abs(share_b - 1784 / (1784 + 594)) < 0.02, used
        # Taken slots are spaced at the pool's combined rate: 400 slots in 400/2378 min.
        assert waits == sorted(waits)
        assert math.isclose(waits[-1], 399 * 60 / 2378, rel_tol=0.02)

    run(main)


def test_a_429_moves_calls_to_the_other_key(clock: ManualClock) -> None:
    async def main() -> None:
        r = new_redis()
        pool = KeyPool(r, [PoolKey(A, 600, burst=0), PoolKey(B, 600, burst=0)])
        other_worker = KeyPool(r, [PoolKey(A, 600, burst=0), PoolKey(B, 600, burst=0)])
        await pool.report_429(0, pause=1)
        assert await other_worker.cooldown_remaining(0) == pytest.approx(1.0, abs=1e-6)
        # Every worker's calls go to key B, at its full rate, until A's cool-down ends; then
        # to both, A at the rate its 429 stepped down to.
        slots = [(await other_worker.take())[:2] for _ in range(20)]
        on_a = [wait for index, wait in slots if index == 0]
        on_b = [wait for index, wait in slots if index == 1]
        assert on_b == pytest.approx([k * interval(600, 0) for k in range(len(on_b))], abs=1e-6)
        assert on_a[0] == pytest.approx(1.0, abs=1e-6)
        t_a = interval(600, 0, 0.7)
        assert on_a == pytest.approx([1.0 + k * t_a for k in range(len(on_a))], abs=1e-6)
        assert len(on_b) > 10
        assert len(on_a) >= 3

    run(main)


def test_in_flight_cap_holds_and_released_permits_free_room(clock: ManualClock) -> None:
    async def main() -> None:
        r = new_redis()
        pool = KeyPool(r, [PoolKey(A, 6000, burst=10, max_in_flight=3)])
        other = KeyPool(r, [PoolKey(A, 6000, burst=10, max_in_flight=3)])  # another worker
        taken = [await pool.take() for _ in range(2)] + [await other.take()]
        assert [t[0] for t in taken] == [0, 0, 0]
        assert (await pool.take())[0] == -1
        assert (await other.take())[0] == -1
        assert await pool.renew_permits() == 2  # each worker holds its own permits
        assert await other.renew_permits() == 1
        other.release(0, taken[0][2])  # not its permit: nothing goes back
        assert await other.flush_releases() == 0
        pool.release(0, taken[0][2])
        assert (await other.take())[0] == -1  # not yet sent
        assert await pool.flush_releases() == 1
        index, _, _ = await other.take()
        assert index == 0
        assert (await pool.take())[0] == -1

    run(main)


def test_permits_of_a_dead_worker_expire(clock: ManualClock) -> None:
    async def main() -> None:
        r = new_redis()
        dead = KeyPool(r, [PoolKey(A, 6000, burst=10, max_in_flight=2)], permit_ttl=20)
        live = KeyPool(r, [PoolKey(A, 6000, burst=10, max_in_flight=2)], permit_ttl=20)
        await dead.take()
        await dead.take()
        clock.advance(10)
        assert (await live.take())[0] == -1
        clock.advance(10.001)  # the dead process never renewed: its permits are gone
        assert (await live.take())[0] == 0

    run(main)


def test_renewal_keeps_a_live_workers_permits(clock: ManualClock) -> None:
    async def main() -> None:
        r = new_redis()
        busy = KeyPool(r, [PoolKey(A, 6000, burst=10, max_in_flight=1)], permit_ttl=20)
        other = KeyPool(r, [PoolKey(A, 6000, burst=10, max_in_flight=1)], permit_ttl=20)
        await busy.take()
        for _ in range(5):
            clock.advance(15)
            assert await busy.renew_permits() == 1
            assert (await other.take())[0] == -1

    run(main)


def test_full_pool_waits_for_a_release_then_proceeds() -> None:
    async def main() -> None:
        pool = KeyPool(new_redis(), [PoolKey(A, 60_000, burst=10, max_in_flight=2)], poll=5.0)
        background = asyncio.create_task(pool.run())
        held = [await pool.acquire() for _ in range(2)]
        waiter = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0.05)
        assert not waiter.done()
        pool.release(*held[0])  # a local release wakes the waiter long before the 5 s poll
        index, _ = await asyncio.wait_for(waiter, 1.0)
        assert index == 0
        assert await pool.renew_permits() == 2
        background.cancel()

    run(main)


def test_room_counts_what_starts_within_the_horizon(clock: ManualClock) -> None:
    async def main() -> None:
        pool = KeyPool(new_redis(), [PoolKey(A, 600, burst=5), PoolKey(B, 300, burst=0, max_in_flight=4)])
        rate_a, burst_a = window_safe(600, 5)
        rate_b, _ = window_safe(300, 0)
        room, _ = await pool.room(horizon=10)
        # A: burst + 1 at once, then one per interval; B: one per interval, at most its cap.
        expected_a = math.floor(10 / math.ceil(60e6 / rate_a) * 1e6) + 1 + burst_a
        assert room == expected_a + min(4, math.floor(10 * rate_b / 60) + 1)
        for _ in range(200):  # book well past the horizon
            await pool.take()
        room, opens_in = await pool.room(horizon=10)
        assert room == 0
        assert opens_in > 0
        clock.advance(opens_in + 0.001)
        assert (await pool.room(horizon=10))[0] >= 1

    run(main)


def test_room_is_zero_while_a_cooldown_outlasts_the_horizon(clock: ManualClock) -> None:
    async def main() -> None:
        pool = KeyPool(new_redis(), [PoolKey(A, 600, burst=5)])
        await pool.report_429(0, pause=30)
        room, opens_in = await pool.room(horizon=10)
        assert room == 0
        assert math.isclose(opens_in, 20, abs_tol=0.01)

    run(main)
