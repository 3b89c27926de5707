"""worker.limiter against a real Redis, shared by several real OS processes.

Each worker is a separate ``python -c`` process with its own event loop, connection and
``KeyPool``, and calls it as the engine does: ``acquire`` (reserve a slot, sleep towards it),
make a "call", ``release``; ``run`` renews and releases permits in the background. Some run
with a deliberately wrong client clock (``time.time`` skewed by up to +-60 s): the limiter must
not care, because every decision is made on Redis ``TIME``. Workers report the Redis time at
which each call started and ended, so the checks below use one clock.

Redis: ``redis://127.0.0.1:6379/14`` (the tests' db); every test uses its own key prefix and
deletes only its keys.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from pcq.settings import key_id
from tests import conftest
from worker.limiter import window_safe

REDIS_URL = conftest.REDIS_TEST_URL
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
    """4 processes x 5 callers on one key, with client clocks up to 60 s apart."""
    require_redis()
    limit, burst, duration = 600, 5, 3.0
    key = {"id": key_id(f"sk-{uuid.uuid4()}"), "limit": limit, "burst": burst, "cap": 0}
    base = {"url": REDIS_URL, "prefix": prefix, "keys": [key], "ttl": 30.0, "callers": 5}
    configs = [{**base, "skew": skew} for skew in (-60.0, 60.0, 0.0, 17.5)]
    results, start, end = run_pool_workers(configs, duration)

    starts = [s for r in results for _, s, _ in r["calls"] if s < end]
    assert all(s >= start for s in starts)
    assert all(r["calls"] for r in results)  # the budget really was shared
    # In every window of W seconds: at most rate * W + burst + 1 starts (GCRA's exact bound
    # on the window-safe rate), +1 because a start is read just after its slot.
    rate, safe_burst = window_safe(limit, burst)
    interval = 60 / rate
    for window in [interval * n for n in (1, 2, 3, 5, 10, 20, 30)] + [0.05, 0.35, 1.27, duration]:
        bound = rate / 60 * window + safe_burst + 2 + 1e-9
        assert max_in_window(starts, window) <= bound, (window, max_in_window(starts, window))
    # And the budget is used, not wasted: >= 90 % of rate * duration.
    assert len(starts) >= 0.9 * rate / 60 * duration, len(starts)


@pytest.mark.realservices
def test_cooldown_from_one_process_stops_all_others(prefix: str) -> None:
    """One process is told 429 (its clock 45 s off); 3 others (clocks -60, 0, +60 s) start
    nothing during the cool-down, and start again as soon as it ends."""
    require_redis()
    limit, burst, pause = 600, 5, 1.5
    key = {"id": key_id(f"sk-{uuid.uuid4()}"), "limit": limit, "burst": burst, "cap": 0}
    base = {"url": REDIS_URL, "prefix": prefix, "keys": [key], "ttl": 30.0}
    configs = [{**base, "callers": 0, "skew": 45.0, "report_429": {"delay": 0.4, "pause": pause}}]
    configs += [{**base, "callers": 2, "skew": skew} for skew in (-60.0, 0.0, 60.0)]
    (told, *others), start, end = run_pool_workers(configs, 2.5)

    until = told["until"]
    cd_start = until - pause
    assert start + 0.35 < cd_start < until < end - 0.3
    # Calls before the cool-down (which process wins the few slots of those 0.4 s depends on
    # how fast each one started, so only the total is asserted), none during it (a start is
    # read just after its slot: 50 ms of slack), and each process resumes after it.
    assert any(s < cd_start for o in others for _, s, _ in o["calls"])
    for o in others:
        assert not [s for _, s, _ in o["calls"] if cd_start + 0.05 <= s < until]
        assert [s for _, s, _ in o["calls"] if s >= until], "this worker never resumed"
    after = sorted(s for o in others for _, s, _ in o["calls"] if s >= until)
    assert after[0] - until < 0.1
    # The cool-down used none of the budget after it: the burst (as the 429 stepped the rate
    # down, 4 slots of 6) starts at once, not one call per interval.
    assert len([s for s in after if s < until + 0.2]) >= 4, [round(s - until, 3) for s in after[:8]]


def test_require_redis_fails_under_ci_and_skips_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    unreachable = "redis://127.0.0.1:1/15"
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_redis(unreachable)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="not reachable"):
        require_redis(unreachable)


POOL_WORKER = r"""
import asyncio, json, random, sys, time

cfg = json.loads(sys.argv[1])
_real_time = time.time
time.time = lambda: _real_time() + cfg.get("skew", 0.0)  # a wrong client clock, on purpose

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
    out = {"calls": []}  # [key index, start, end] on the Redis clock, strictly inside the permit

    async def redis_now():
        s, us = await r.time()
        return s + us / 1e6

    async def one():
        index, permit = await pool.acquire()
        start = await redis_now()
        await asyncio.sleep(random.uniform(0.02, 0.08))
        out["calls"].append([index, start, await redis_now()])
        pool.release(index, permit)
        return start

    async def caller():
        while await one() < go["end"]:
            pass

    if "report_429" in cfg:  # this process is told 429 on key 0 after a delay
        await asyncio.sleep(cfg["report_429"]["delay"])
        await pool.report_429(0, cfg["report_429"]["pause"])
        raw = await r.get(cfg["prefix"] + "{" + cfg["keys"][0]["id"] + "}:cd")
        out["until"] = int(raw) / 1e6
    await asyncio.gather(*(caller() for _ in range(cfg["callers"])))
    if cfg.get("die"):
        print(json.dumps(out), flush=True)
        held = [await pool.acquire() for _ in range(cfg["die"])]  # then killed holding them
        print(json.dumps({"holding": len(held)}), flush=True)
        await asyncio.sleep(3600)
    await pool.flush_releases()
    background.cancel()
    await r.aclose()
    print(json.dumps(out), flush=True)


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


def go_all(procs: list[subprocess.Popen[bytes]], run_for: float) -> tuple[float, float]:
    """Start the workers' ``run_for`` seconds now: their start and end on the Redis clock."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        secs, micros = client.time()
    finally:
        client.close()
    start = secs + micros / 1e6
    for p in procs:
        assert p.stdin is not None
        p.stdin.write((json.dumps({"end": start + run_for}) + "\n").encode())
        p.stdin.flush()
    return start, start + run_for


def run_pool_workers(
    configs: list[dict[str, Any]], run_for: float
) -> tuple[list[dict[str, Any]], float, float]:
    """One worker per config, started together for ``run_for`` seconds: what each reported, and
    the start and end on the Redis clock."""
    procs = start_pool_workers(configs)
    try:
        start, end = go_all(procs, run_for)
        results = []
        for p in procs:
            out, err = p.communicate(timeout=run_for + 15)
            assert p.returncode == 0, err.decode(errors="replace")
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
        return results, start, end
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=5)


@pytest.mark.realservices
def test_in_flight_cap_holds_across_processes_on_every_key(prefix: str) -> None:
    """4 processes x 10 callers on 2 keys, key A capped at 6 calls at once, key B at 3: no
    instant ever has more calls open on a key than its cap, and both caps are reached."""
    require_redis()
    keys = [
        {"id": key_id(f"sk-a-{uuid.uuid4()}"), "limit": 6000, "burst": 2, "cap": 6},
        {"id": key_id(f"sk-b-{uuid.uuid4()}"), "limit": 6000, "burst": 2, "cap": 3},
    ]
    cfg = {"url": REDIS_URL, "prefix": prefix, "keys": keys, "ttl": 30.0, "callers": 10}
    results, _, _ = run_pool_workers([cfg] * 4, 3.0)
    calls = [c for r in results for c in r["calls"]]
    by_key = {i: [(s, e) for k, s, e in calls if k == i] for i in (0, 1)}
    assert max_overlap(by_key[0]) <= 6
    assert max_overlap(by_key[1]) <= 3
    # The caps, not the rates, bound this run: each key kept close to its cap busy.
    assert max_overlap(by_key[0]) == 6
    assert max_overlap(by_key[1]) == 3


@pytest.mark.realservices
def test_permits_of_a_killed_process_expire_and_the_others_go_on(prefix: str) -> None:
    require_redis()
    key = {"id": key_id(f"sk-{uuid.uuid4()}"), "limit": 60000, "burst": 5, "cap": 4}
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
        {"id": key_id(f"sk-a-{uuid.uuid4()}"), "limit": 600, "burst": 5, "cap": 0},
        {"id": key_id(f"sk-b-{uuid.uuid4()}"), "limit": 1200, "burst": 2, "cap": 0},
    ]
    cfg = {"url": REDIS_URL, "prefix": prefix, "keys": keys, "ttl": 30.0, "callers": 20}
    duration = 3.0
    results, _, _ = run_pool_workers([cfg] * 3, duration)
    calls = [c for r in results for c in r["calls"]]
    for index, key in enumerate(keys):
        rate, burst = window_safe(key["limit"], key["burst"])
        starts = [s for k, s, _ in calls if k == index]
        for window in (0.1, 0.5, 1.0, 2.0):
            assert max_in_window(starts, window) <= rate / 60 * window + burst + 2, (index, window)
        assert len(starts) >= 0.9 * rate / 60 * duration, (index, len(starts))
