"""worker.limiter against a real Redis, shared by several real OS processes.

Each worker is a separate ``python -c`` process with its own event loop and connection, and with a
deliberately wrong client clock (``time.time`` skewed by up to +-60 s): the limiter must not care,
because every decision is made on Redis ``TIME``. Workers report the Redis time of each decision
(``RateLimiter.try_acquire_timed``), so the checks below use one exact clock.

Redis: ``redis://127.0.0.1:6379/15``; every test uses its own key prefix and deletes only its keys.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests import conftest
from worker.limiter import limiter_key, window_safe

REDIS_URL = "redis://127.0.0.1:6379/15"
REPO_ROOT = Path(__file__).resolve().parents[2]


def require_redis(url: str = REDIS_URL) -> None:
    """Skip when Redis is unreachable, except under CI=true, where that is a failure."""
    conftest.require_redis(url)


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix unique to this test; its keys (and only those) are deleted afterwards."""
    p = f"pcq:test:rl:{uuid.uuid4().hex[:12]}:"
    yield p
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
        try:
            keys = list(client.scan_iter(match=f"{p}*", count=500))
            if keys:
                client.delete(*keys)
        finally:
            client.close()
    except (redis.RedisError, OSError):
        pass  # unreachable: the test was skipped/failed and wrote nothing


WORKER = r"""
import asyncio, json, sys, time

cfg = json.loads(sys.argv[1])
_real_time = time.time
time.time = lambda: _real_time() + cfg["skew"]  # wrong client clock on purpose

import redis.asyncio as aioredis
from worker.limiter import RateLimiter


async def main():
    r = aioredis.Redis.from_url(cfg["url"])
    lim = RateLimiter(r, limit_per_minute=cfg["limit"], burst=cfg["burst"], prefix=cfg["prefix"])
    await lim.cooldown_remaining(cfg["key"])  # connect and load the script before the start
    print("ready", flush=True)
    go = json.loads(await asyncio.to_thread(sys.stdin.readline))
    out = {"admitted": [], "denied": [], "calls": 0}
    if cfg["role"] == "setter":
        await asyncio.sleep(go["delay"])
        await lim.set_cooldown(cfg["key"], cfg["cooldown"])
        raw = await r.get(cfg["prefix"] + "{" + cfg["key"] + "}:cd")
        out["until"] = int(raw) / 1e6
    elif cfg["role"] == "acquirer":
        # What the worker engine does: reserve a slot, sleep until it, go.
        while True:
            await lim.acquire(cfg["key"])
            secs, micros = await r.time()
            now = secs + micros / 1e6
            if now >= go["end"]:
                break
            out["calls"] += 1
            out["admitted"].append(now)
    else:
        while True:
            wait, now = await lim.try_acquire_timed(cfg["key"])
            if now >= go["end"]:
                break
            out["calls"] += 1
            if wait == 0:
                out["admitted"].append(now)
            elif cfg["record_denied"]:
                out["denied"].append([now, wait])
    await r.aclose()
    print(json.dumps(out), flush=True)


asyncio.run(main())
"""


def spawn_scripts(script: str, configs: list[dict[str, Any]]) -> list[subprocess.Popen[bytes]]:
    """One ``python -c script <config json>`` process per config, with pipes, in the repo."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    return [
        subprocess.Popen(
            [sys.executable, "-c", script, json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO_ROOT,
            env=env,
        )
        for cfg in configs
    ]


def run_workers(configs: list[dict[str, Any]], go: dict[str, Any]) -> list[dict[str, Any]]:
    """Start one process per config, wait until all are ready, start them together, collect.

    ``go["run_for"]`` seconds become Redis-clock ``start``/``end`` values sent to every worker.
    """
    procs = spawn_scripts(WORKER, configs)
    try:
        deadline = time.monotonic() + 8
        for p in procs:
            assert p.stdout is not None
            ready, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = p.stdout.readline() if ready else b""
            if line.strip() != b"ready":
                p.kill()
                _, err = p.communicate(timeout=5)
                pytest.fail(f"worker did not start: {line!r} {err.decode(errors='replace')}")
        client = redis.Redis.from_url(REDIS_URL)
        try:
            secs, micros = client.time()
        finally:
            client.close()
        now = secs + micros / 1e6
        go = {**go, "start": now, "end": now + go["run_for"]}
        for p in procs:
            assert p.stdin is not None
            p.stdin.write((json.dumps(go) + "\n").encode())
            p.stdin.flush()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=go["run_for"] + 8)
            assert p.returncode == 0, err.decode(errors="replace")
            result = json.loads(out.decode().strip().splitlines()[-1])
            result["start"], result["end"] = go["start"], go["end"]
            results.append(result)
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=5)


def max_in_window(times: list[float], window: float) -> int:
    """Most timestamps in any closed interval of length ``window``."""
    ts = sorted(times)
    best, j = 0, 0
    for i in range(len(ts)):
        while ts[i] - ts[j] > window:
            j += 1
        best = max(best, i - j + 1)
    return best


@pytest.mark.realservices
def test_many_processes_share_one_budget(prefix: str) -> None:
    require_redis()
    limit, burst, duration = 600, 5, 3.0
    per_second = limit / 60
    key = limiter_key(f"sk-{uuid.uuid4()}")
    skews = [-60.0, 60.0, 0.0, 17.5]
    configs = [
        {
            "url": REDIS_URL,
            "prefix": prefix,
            "key": key,
            "limit": limit,
            "burst": burst,
            "role": "hammer",
            "skew": skew,
            "record_denied": False,
        }
        for skew in skews
    ]
    results = run_workers(configs, {"run_for": duration})

    admitted = [t for r in results for t in r["admitted"]]
    start, end = results[0]["start"], results[0]["end"]
    assert all(start - 0.05 <= t < end for t in admitted)
    assert all(r["calls"] > 50 for r in results), [r["calls"] for r in results]  # really hammered
    assert sum(1 for r in results if r["admitted"]) >= 2  # the budget really was shared

    # In every window of W seconds: at most rate * W + burst + 1 admissions (GCRA's exact bound).
    interval = 60 / limit
    for window in [interval * n for n in (1, 2, 3, 5, 10, 20, 30)] + [0.05, 0.35, 1.27, duration]:
        bound = per_second * window + burst + 1 + 1e-9
        assert max_in_window(admitted, window) <= bound, (window, max_in_window(admitted, window))
    # And the budget is used, not wasted: >= 90 % of limit * duration.
    assert len(admitted) >= 0.9 * per_second * duration, len(admitted)


@pytest.mark.realservices
def test_cooldown_from_one_process_stops_all_others(prefix: str) -> None:
    require_redis()
    limit, burst, cooldown = 600, 5, 1.5
    key = limiter_key(f"sk-{uuid.uuid4()}")
    base = {"url": REDIS_URL, "prefix": prefix, "key": key, "limit": limit, "burst": burst}
    configs = [{**base, "role": "setter", "skew": 45.0, "cooldown": cooldown, "record_denied": False}]
    configs += [
        {**base, "role": "hammer", "skew": skew, "record_denied": True} for skew in (-60.0, 0.0, 60.0)
    ]
    setter, *hammers = run_workers(configs, {"run_for": 2.5, "delay": 0.4})

    until = setter["until"]
    cd_start = until - cooldown
    assert setter["start"] + 0.35 < cd_start < until < setter["end"] - 0.3
    # Admissions before the cool-down (which process wins the few tokens of those 0.4 s depends
    # on how fast each one started, so only the total is asserted), nothing during it.
    assert any(t < cd_start for h in hammers for t in h["admitted"])
    for h in hammers:
        assert not [t for t in h["admitted"] if cd_start <= t < until]
        during = [(t, w) for t, w in h["denied"] if cd_start <= t < until]
        assert during, "this worker made no call during the cool-down"
        # Each answer during the cool-down is at least the remaining cool-down (clock: Redis).
        assert all(w >= until - t - 1e-6 for t, w in during)
        assert all(w <= until - t + 60 / limit + 1e-6 for t, w in during)
    after = sorted(t for h in hammers for t in h["admitted"] if t >= until)
    assert after, "nothing admitted after the cool-down ended"
    assert after[0] - until < 0.1
    # Denials during the cool-down took no tokens: the full burst is available right after it.
    assert len([t for t in after if t < until + 0.05]) >= burst + 1


@pytest.mark.realservices
def test_processes_that_reserve_and_sleep_never_exceed_the_limit(prefix: str) -> None:
    """The engine's way: ``acquire`` reserves a slot and sleeps once (no polling herd)."""
    require_redis()
    limit, burst, duration = 600, 5, 3.0
    key = limiter_key(f"sk-{uuid.uuid4()}")
    base = {"url": REDIS_URL, "prefix": prefix, "key": key, "limit": limit, "burst": burst}
    results = run_workers(
        [{**base, "role": "acquirer", "skew": skew, "record_denied": False} for skew in (-30.0, 0.0, 30.0)],
        {"run_for": duration},
    )
    admitted = [t for r in results for t in r["admitted"]]
    per_second = limit / 60
    for window in (0.1, 0.5, 1.0, 2.0):
        # +1 over the GCRA bound: a time is read just after the slot, so two neighbours can be
        # recorded slightly closer together than their slots were.
        assert max_in_window(admitted, window) <= per_second * window + burst + 2, window
    assert len(admitted) >= 0.9 * per_second * duration
    # Each process made about one Redis call per admission, not one per wake-up.
    assert all(r["calls"] > 0 for r in results)


def test_require_redis_fails_under_ci_and_skips_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    unreachable = "redis://127.0.0.1:1/15"
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_redis(unreachable)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="not reachable"):
        require_redis(unreachable)


POOL_WORKER = r"""
import asyncio, json, random, sys

cfg = json.loads(sys.argv[1])
import redis.asyncio as aioredis
from worker.limiter import KeyPool, PoolKey


async def main():
    r = aioredis.Redis.from_url(cfg["url"])
    keys = [PoolKey(k["id"], k["limit"], k["burst"], k["cap"]) for k in cfg["keys"]]
    pool = KeyPool(r, keys, prefix=cfg["prefix"], permit_ttl=cfg["ttl"], poll=0.02)
    await pool.room(1.0)  # connect and load the script before the start
    print("ready", flush=True)
    go = json.loads(await asyncio.to_thread(sys.stdin.readline))
    background = asyncio.create_task(pool.run())
    calls = []  # [key index, start, end] on the Redis clock, strictly inside the permit

    async def one():
        index, permit = await pool.acquire()
        s, us = await r.time()
        start = s + us / 1e6
        await asyncio.sleep(random.uniform(0.02, 0.08))
        s, us = await r.time()
        calls.append([index, start, s + us / 1e6])
        pool.release(index, permit)
        return start

    async def caller():
        while True:
            if await one() >= go["end"]:
                return

    await asyncio.gather(*(caller() for _ in range(cfg["callers"])))
    if cfg.get("die"):
        print(json.dumps({"calls": calls}), flush=True)
        held = [await pool.acquire() for _ in range(cfg["die"])]  # then killed holding them
        print(json.dumps({"holding": len(held)}), flush=True)
        await asyncio.sleep(3600)
    await pool.flush_releases()
    background.cancel()
    await r.aclose()
    print(json.dumps({"calls": calls}), flush=True)


asyncio.run(main())
"""


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = now = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def start_pool_workers(configs: list[dict[str, Any]]) -> list[subprocess.Popen[bytes]]:
    procs = spawn_scripts(POOL_WORKER, configs)
    for p in procs:
        assert p.stdout is not None
        ready, _, _ = select.select([p.stdout], [], [], 10)
        line = p.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            p.kill()
            pytest.fail(f"pool worker did not start: {line!r} {p.communicate(timeout=5)[1]!r}")
    return procs


def go_all(procs: list[subprocess.Popen[bytes]], run_for: float) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        secs, micros = client.time()
    finally:
        client.close()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write((json.dumps({"end": secs + micros / 1e6 + run_for}) + "\n").encode())
        p.stdin.flush()


@pytest.mark.realservices
def test_in_flight_cap_holds_across_processes_on_every_key(prefix: str) -> None:
    """4 processes x 10 callers on 2 keys, key A capped at 6 calls at once, key B at 3: no
    instant ever has more calls open on a key than its cap, and both caps are reached."""
    require_redis()
    keys = [
        {"id": limiter_key(f"sk-a-{uuid.uuid4()}"), "limit": 6000, "burst": 2, "cap": 6},
        {"id": limiter_key(f"sk-b-{uuid.uuid4()}"), "limit": 6000, "burst": 2, "cap": 3},
    ]
    cfg = {"url": REDIS_URL, "prefix": prefix, "keys": keys, "ttl": 30.0, "callers": 10}
    procs = start_pool_workers([cfg] * 4)
    try:
        go_all(procs, 3.0)
        calls = []
        for p in procs:
            out, err = p.communicate(timeout=20)
            assert p.returncode == 0, err.decode(errors="replace")
            calls += json.loads(out.decode().strip().splitlines()[-1])["calls"]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    by_key = {i: [(s, e) for k, s, e in calls if k == i] for i in (0, 1)}
    assert max_overlap(by_key[0]) <= 6
    assert max_overlap(by_key[1]) <= 3
    # The caps, not the rates, bound this run: each key kept close to its cap busy.
    assert max_overlap(by_key[0]) == 6
    assert max_overlap(by_key[1]) == 3


@pytest.mark.realservices
def test_permits_of_a_killed_process_expire_and_the_others_go_on(prefix: str) -> None:
    require_redis()
    key = {"id": limiter_key(f"sk-{uuid.uuid4()}"), "limit": 60000, "burst": 5, "cap": 4}
    base = {"url": REDIS_URL, "prefix": prefix, "keys": [key], "ttl": 2.0}
    doomed, survivor = start_pool_workers([{**base, "callers": 0, "die": 4}, {**base, "callers": 2}])
    client = redis.Redis.from_url(REDIS_URL)
    try:
        go_all([doomed], 60)
        assert doomed.stdout is not None
        doomed.stdout.readline()  # its (no) calls
        assert json.loads(doomed.stdout.readline())["holding"] == 4  # the whole cap
        assert client.zcard(f"{prefix}{{{key['id']}}}:fl") == 4
        doomed.kill()  # SIGKILL: no release, no goodbye
        doomed.wait(5)
        secs, micros = client.time()
        killed_at = secs + micros / 1e6
        go_all([survivor], 3.0)
        out, err = survivor.communicate(timeout=20)
        assert survivor.returncode == 0, err.decode(errors="replace")
        calls = json.loads(out.decode().strip().splitlines()[-1])["calls"]
        starts = sorted(s for _, s, _ in calls)
        # Nothing started while the dead permits held the cap (they were taken just before the
        # kill, with a 2 s ttl); then the survivor's callers got through instead of waiting for ever.
        assert starts[0] > killed_at + 1.5
        assert len(starts) >= 10
        assert max_overlap([(s, e) for _, s, e in calls]) <= 4
    finally:
        client.close()
        for p in (doomed, survivor):
            if p.poll() is None:
                p.kill()


@pytest.mark.realservices
def test_pool_processes_never_exceed_any_keys_limit_plus_burst(prefix: str) -> None:
    """The engine's path (``KeyPool.acquire``): 3 processes x 20 callers on 2 keys with
    different quotas. In every window each key admits at most its window-safe rate plus its
    burst (+1 for reading the time just after the slot), and each key's quota is used."""
    require_redis()
    keys = [
        {"id": limiter_key(f"sk-a-{uuid.uuid4()}"), "limit": 600, "burst": 5, "cap": 0},
        {"id": limiter_key(f"sk-b-{uuid.uuid4()}"), "limit": 1200, "burst": 2, "cap": 0},
    ]
    cfg = {"url": REDIS_URL, "prefix": prefix, "keys": keys, "ttl": 30.0, "callers": 20}
    procs = start_pool_workers([cfg] * 3)
    duration = 3.0
    try:
        go_all(procs, duration)
        calls = []
        for p in procs:
            out, err = p.communicate(timeout=20)
            assert p.returncode == 0, err.decode(errors="replace")
            calls += json.loads(out.decode().strip().splitlines()[-1])["calls"]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for index, key in enumerate(keys):
        rate, burst = window_safe(key["limit"], key["burst"])
        starts = [s for k, s, _ in calls if k == index]
        for window in (0.1, 0.5, 1.0, 2.0):
            assert max_in_window(starts, window) <= rate / 60 * window + burst + 2, (index, window)
        assert len(starts) >= 0.9 * rate / 60 * duration, (index, len(starts))
