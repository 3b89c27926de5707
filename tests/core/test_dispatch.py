"""The dispatcher's order (pcq.jobs.dispatch): weighted fair share across tenants, priority,
round robin across a tenant's batches, age; and the statements that read and take the backlog."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import update

from pcq.db import SessionFactory, unit_of_work
from pcq.jobs import dispatch
from pcq.jobs.dispatch import MIN_SHARE, FairOrder, Group, Policy, Ring, ahead_in_order
from pcq.models import Job, Tenant, new_id, utcnow

HIGH, NORMAL, LOW = 0, 1, 2


def _run(
    order: FairOrder,
    groups: list[Group],
    policies: dict[str, Policy],
    per_tick: int,
    ticks: int,
    dt: float = 0.1,
) -> list[tuple[Group, int]]:
    """Dispatch ``per_tick`` at a time, taking picked jobs out of the groups as a dispatcher would."""
    waiting = {(g.tenant_id, g.priority, g.batch_id): g.waiting for g in groups}
    picked: list[tuple[Group, int]] = []
    for t in range(ticks):
        current = [Group(tn, p, b, w) for (tn, p, b), w in waiting.items() if w > 0]
        for g, k in order.plan(current, policies, per_tick, t * dt):
            assert 0 < k <= g.waiting
            waiting[(g.tenant_id, g.priority, g.batch_id)] -= k
            picked.append((g, k))
    return picked


def _by_tenant(picked: list[tuple[Group, int]]) -> Counter[str]:
    out: Counter[str] = Counter()
    for g, k in picked:
        out[g.tenant_id] += k
    return out


def test_a_single_job_goes_out_in_the_first_round_behind_any_backlog() -> None:
    order = FairOrder(10, 10)
    big = Group("a", NORMAL, "batch-a", 100_000)
    first = order.plan([big], {}, 1, 0)
    assert first == [(big, 1)]
    # B arrives with one job: it is in the next round, after at most one turn of A's (one job
    # at one slot per dispatch), not after A's 99,999.
    waiting = [Group("a", NORMAL, "batch-a", 99_999), Group("b", NORMAL, None, 1)]
    picks = order.plan(waiting, {}, 1, 0.1) + order.plan(waiting, {}, 1, 0.2)
    assert sorted(g.tenant_id for g, _ in picks) == ["a", "b"]


def test_tenants_share_in_proportion_to_their_weights() -> None:
    order = FairOrder(10, 10)
    groups = [
        Group("a", NORMAL, "x", 10_000),
        Group("b", NORMAL, "y", 10_000),
        Group("c", NORMAL, None, 10_000),
    ]
    policies = {"a": Policy(weight=1), "b": Policy(weight=3), "c": Policy(weight=1)}
    for per_tick in (1, 3, 50, 1000):
        shares = _by_tenant(_run(FairOrder(10, 10), groups, policies, per_tick, ticks=1000 // per_tick + 1))
        total = sum(shares.values())
        assert abs(shares["b"] / total - 0.6) < 0.02, (per_tick, shares)
        assert abs(shares["a"] - shares["c"]) <= max(2, per_tick), (per_tick, shares)
    assert order.plan(groups, policies, 0, 0) == []


def test_high_goes_first_and_low_takes_only_what_normal_leaves() -> None:
    order = FairOrder(10, 10)
    groups = [Group("a", LOW, "old", 500), Group("a", NORMAL, "bulk", 500), Group("a", HIGH, "urgent", 10)]
    picks = _run(order, groups, {}, 4, ticks=3)
    assert [g.batch_id for g, _ in picks][:3] == ["urgent"] * 3  # 10 high jobs: 4 + 4 + 2 ...
    assert sum(k for g, k in picks if g.batch_id == "urgent") == 10
    assert sum(k for g, k in picks if g.batch_id == "bulk") == 2  # ... then normal
    assert all(g.batch_id != "old" for g, _ in picks)
    rest = _run(order, [Group("a", LOW, "old", 500), Group("a", NORMAL, "bulk", 498)], {}, 100, ticks=5)
    assert sum(k for g, k in rest if g.batch_id == "bulk") == 498
    assert sum(k for g, k in rest if g.batch_id == "old") == 2


def test_batches_of_one_tenant_and_priority_take_turns() -> None:
    order = FairOrder(10, 10)
    groups = [Group("a", NORMAL, "first", 1000), Group("a", NORMAL, "second", 5), Group("a", NORMAL, None, 3)]
    picks = _run(order, groups, {}, 3, ticks=3)
    counts: Counter[str | None] = Counter()
    for g, k in picks:
        counts[g.batch_id] += k
    assert counts == Counter({"first": 3, "second": 3, None: 3})


def test_max_share_caps_a_tenant_even_when_no_one_else_waits() -> None:
    order = FairOrder(quota_per_second=10, horizon=2)
    groups = [Group("a", NORMAL, "x", 100_000)]
    policies = {"a": Policy(max_share=0.25)}
    # 60 s of dispatch ticks, 0.1 s apart, each offered the whole quota's tick (1 job per tick
    # would be 10/s): a may take 2.5/s, plus the bucket it starts with (2.5/s x 2 s).
    picks = _run(order, groups, policies, per_tick=50, ticks=600, dt=0.1)
    taken = sum(k for _, k in picks)
    assert 0.25 * 10 * 60 <= taken <= 0.25 * 10 * 60 + 0.25 * 10 * 2 + 1, taken
    # Another tenant with no cap is not held back by a's.
    both = _by_tenant(
        _run(FairOrder(10, 2), [*groups, Group("b", NORMAL, None, 100_000)], policies, per_tick=1, ticks=600)
    )
    assert both["a"] <= 0.25 * 10 * 60 + 6
    assert both["b"] >= 600 - both["a"]


@given(
    st.lists(
        st.tuples(
            st.sampled_from("abcd"),
            st.sampled_from([HIGH, NORMAL, LOW]),
            st.sampled_from(["b1", "b2", None]),
            st.integers(1, 40),
        ),
        min_size=1,
        max_size=12,
        unique_by=lambda t: t[:3],
    ),
    st.integers(1, 60),
    st.dictionaries(st.sampled_from("abcd"), st.integers(1, 5)),
)
@settings(max_examples=200, deadline=None)
def test_a_plan_never_takes_more_than_asked_or_waiting_and_wastes_no_slot(
    spec: list[tuple[str, int, str | None, int]], n: int, weights: dict[str, int]
) -> None:
    groups = [Group(*t) for t in spec]
    order = FairOrder(10, 10)
    policies = {t: Policy(weight=w) for t, w in weights.items()}
    for tick in range(3):
        picks = order.plan(groups, policies, n, tick)
        by_group: Counter[Group] = Counter()
        for g, k in picks:
            by_group[g] += k
        assert all(0 < k <= g.waiting for g, k in by_group.items())
        assert sum(by_group.values()) == min(n, sum(g.waiting for g in groups))  # work-conserving


def test_a_ring_keeps_its_place_when_keys_come_and_go() -> None:
    ring: Ring[str] = Ring()
    ring.sync(["a", "b", "c"])
    assert ring.share(1, {"a": 5, "b": 5, "c": 5}, lambda _k: 1) == {"a": 1}
    ring.sync(["b", "c"])  # a left: b is next
    assert ring.share(1, {"b": 5, "c": 5}, lambda _k: 1) == {"b": 1}
    ring.sync(["b", "c", "d"])  # d joins at the end
    assert ring.share(3, {"b": 5, "c": 5, "d": 5}, lambda _k: 1) == {"c": 1, "d": 1, "b": 1}


def test_weights_give_a_heavier_tenant_a_larger_share_of_the_rounds() -> None:
    groups = [Group("a", 1, "x", 100), Group("b", 1, "y", 100), Group("c", 1, "cb", 1)]
    even = ahead_in_order(groups, {}, "c", "cb")
    assert even == 2  # one turn each of a and b
    heavy = ahead_in_order(groups, {"a": Policy(weight=5)}, "c", "cb")
    assert heavy == 6
    # Within a tenant: higher priorities first, then one job of each other batch of its own.
    mine = [Group("a", 0, "u", 4), Group("a", 1, "x", 100), Group("a", 1, "z", 7), Group("a", 2, "w", 9)]
    assert ahead_in_order(mine, {}, "a", "z") == 4 + 1
    assert ahead_in_order(mine, {}, "a", "u") == 0
    assert ahead_in_order(mine, {}, "a", "absent") == 0


# --------------------------------------------------------------------- against the database


def _tenant(sessions: SessionFactory, name: str) -> str:
    with unit_of_work(sessions) as s:
        t = Tenant(id=new_id("ten"), name=f"{name}-{new_id('n')}")
        s.add(t)
        return t.id


def _jobs(
    sessions: SessionFactory,
    tenant: str,
    n: int,
    *,
    priority: int = NORMAL,
    batch: str | None = None,
    **values: object,
) -> list[str]:
    ids = []
    with unit_of_work(sessions) as s:
        for _ in range(n):
            j = Job(
                id=new_id("job"),
                tenant_id=tenant,
                request_json="{}",
                model="lite",
                priority=priority,
                **values,
            )
            s.add(j)
            ids.append(j.id)
    return ids


def test_the_backlog_in_groups_and_taking_the_oldest_of_each(sessions: SessionFactory) -> None:
    a, b = _tenant(sessions, "a"), _tenant(sessions, "b")
    a_old = _jobs(sessions, a, 3)
    _jobs(sessions, a, 2, priority=HIGH)
    b_jobs = _jobs(sessions, b, 1)
    _jobs(sessions, b, 2, enqueued_at=utcnow())  # sent already: the broker holds them
    _jobs(sessions, b, 1, enqueued_at=utcnow() - timedelta(hours=1))  # sent, lost with a worker
    _jobs(sessions, b, 1, next_attempt_at=utcnow() + timedelta(minutes=5))  # a retry not due
    now = utcnow()
    with unit_of_work(sessions) as s:
        groups = {(g.tenant_id, g.priority, g.batch_id): g.waiting for g in dispatch.backlog(s, now=now)}
        assert groups == {(a, NORMAL, None): 3, (a, HIGH, None): 2, (b, NORMAL, None): 1}
        recent = now - timedelta(seconds=30)
        assert dispatch.sent_unclaimed(s, since=recent) == 2  # the lost one holds no room
        taken = dispatch.take(s, [(Group(a, NORMAL, None, 3), 2), (Group(b, NORMAL, None, 1), 1)], now=now)
    assert taken == a_old[:2] + b_jobs  # the oldest of each group
    with unit_of_work(sessions) as s:
        assert dispatch.sent_unclaimed(s, since=recent) == 5
        left = {(g.tenant_id, g.priority): g.waiting for g in dispatch.backlog(s, now=now)}
        assert left == {(a, NORMAL): 1, (a, HIGH): 2}
        assert dispatch.policies(s, [a, b]) == {a: Policy(1, 1.0), b: Policy(1, 1.0)}
        assert not dispatch.capped(s, a)
        s.execute(update(Tenant).where(Tenant.id == a).values(weight=0, max_share=0))  # by hand
        assert dispatch.policies(s, [a]) == {a: Policy(1, MIN_SHARE)}  # kept in range
        assert dispatch.capped(s, a)
