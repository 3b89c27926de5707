"""Fair dispatch: which waiting jobs the broker is given next, when the quota is the bottleneck.

The API commits a job and sends no message: the job waits in the database (``queued``,
``enqueued_at`` NULL). One dispatcher at a time (worker/dispatcher.py, elected through Redis)
sends the broker only what the shared quota can start within the admission horizon, less what
the broker already holds, picked in this order:

1. **Tenants, by weighted fair share.** Deficit round robin: each tenant with work waiting
   earns its ``weight`` per round, so over a backlog tenants get the quota in proportion to
   their weights, and a tenant that submits one job is served within a round whatever
   another's backlog. ``max_share`` caps a tenant's fraction of the quota even when every
   other tenant is idle (a token bucket at that fraction of the quota's rate).
2. **Within a tenant, by priority.** ``high`` first, then ``normal``; ``low`` takes only what
   ``normal`` leaves.
3. **Within a priority, round robin across the tenant's batches**, its single jobs counting
   as one more batch, so an urgent batch is not behind an older one of the same priority.
4. **Within a batch, by age** (``ORDER BY id``: ids are time-ordered).

The order's state (each ring's position and deficits, the token buckets) lives in the one
dispatcher's memory: a dispatcher that takes over starts with fresh rings and full buckets,
which costs at most one horizon of imperfect order, never a job (the database holds every
job; what was sent and not claimed is counted from it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar

from sqlalchemy.orm import Session

from pcq.repositories import jobs as job_rows
from pcq.repositories import tenants as tenant_rows

K = TypeVar("K", bound=Hashable)
MIN_SHARE = 0.001  # the smallest max_share the order honours


@dataclass(frozen=True)
class Group:
    """Jobs waiting for dispatch that share a tenant, a priority (its rank) and a batch (None:
    the tenant's single jobs)."""

    tenant_id: str
    priority: int
    batch_id: str | None
    waiting: int


@dataclass(frozen=True)
class Policy:
    """A tenant's terms (``pcq tenants set``): its weight and the largest share of the quota."""

    weight: int = 1
    max_share: float = 1.0


class Ring(Generic[K]):
    """Deficit round robin over keys, remembering where it stopped between calls.

    A key earns its weight (times a scale, so a large ``n`` takes few rounds) when the ring
    reaches it, and takes whole jobs against what it earned. A key with nothing waiting loses
    its deficit (DRR's rule: no saving up while idle). Stopping mid-turn (``n`` exhausted)
    keeps the turn, so the next call goes on from the same key without paying it again.
    """

    def __init__(self) -> None:
        self._order: list[K] = []
        self._pos = 0
        self._paid = False  # the key at _pos has already earned this turn
        self._deficit: dict[K, float] = {}

    def sync(self, active: Iterable[K]) -> None:
        """Keep the keys that still have work, in their places; new keys join at the end."""
        wanted = set(active)
        old, pos = self._order, self._pos
        kept = [k for k in old if k in wanted]
        kept += sorted((k for k in wanted if k not in self._deficit), key=str)
        self._deficit = {k: self._deficit.get(k, 0.0) for k in kept}
        self._order = kept
        # The key whose turn it is keeps it; if it left, the next one still here has it.
        following = [old[(pos + i) % len(old)] for i in range(len(old))]
        nxt = next((k for k in following if k in wanted), None)
        if nxt is None or (following and nxt != following[0]):
            self._paid = False
        self._pos = kept.index(nxt) if nxt is not None else 0

    def share(self, n: int, demand: dict[K, int], weight: Callable[[K], float]) -> dict[K, int]:
        """Hand out up to ``n`` jobs among the keys' ``demand``; call ``sync`` first."""
        out: dict[K, int] = {}
        left = {k: demand.get(k, 0) for k in self._order}
        total_weight = sum(weight(k) for k, d in left.items() if d > 0)
        if not total_weight:
            return out
        scale = max(1, n // int(4 * total_weight))  # a few rounds for a large n, not n rounds
        waiting = sum(left.values())
        while n > 0 and waiting > 0:
            key = self._order[self._pos]
            if left[key] <= 0:
                self._deficit[key] = 0.0
                self._next()
                continue
            if not self._paid:
                self._deficit[key] += weight(key) * scale
                self._paid = True
            take = min(int(self._deficit[key]), left[key], n)
            if take:
                out[key] = out.get(key, 0) + take
                left[key] -= take
                self._deficit[key] -= take
                n -= take
                waiting -= take
            if left[key] <= 0:
                self._deficit[key] = 0.0
                self._next()
            elif self._deficit[key] < 1:
                self._next()
        return out

    def _next(self) -> None:
        self._pos = (self._pos + 1) % len(self._order)
        self._paid = False


@dataclass
class Bucket:
    """A token bucket at a fraction of the quota's rate: a tenant's ``max_share``."""

    rate: float  # jobs per second
    capacity: float
    tokens: float
    at: float  # time.monotonic() of the last refill

    def available(self, now: float) -> int:
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        return int(self.tokens)


@dataclass
class FairOrder:
    """The dispatcher's order (the module docstring), with the state it keeps between picks.

    ``quota_per_second`` is the rate the upstream keys allow together (window-safe), which
    ``max_share`` is a fraction of; ``horizon`` the seconds of quota a bucket may hold.
    """

    quota_per_second: float
    horizon: float
    tenants: Ring[str] = field(default_factory=Ring)
    batches: dict[tuple[str, int], Ring[str]] = field(default_factory=dict)
    buckets: dict[str, Bucket] = field(default_factory=dict)

    def plan(
        self, groups: Sequence[Group], policies: dict[str, Policy], n: int, now: float
    ) -> list[tuple[Group, int]]:
        """How many jobs of each group to send now, at most ``n`` in all; ``now`` is monotonic."""
        by_tenant: dict[str, list[Group]] = {}
        for g in groups:
            by_tenant.setdefault(g.tenant_id, []).append(g)
        demand = {t: sum(g.waiting for g in gs) for t, gs in by_tenant.items()}
        for t in list(demand):
            cap = self._cap(t, policies.get(t, Policy()), now)
            if cap is not None:
                demand[t] = min(demand[t], cap)
        self.tenants.sync(t for t, d in demand.items() if d > 0)
        allotted = self.tenants.share(n, demand, lambda t: policies.get(t, Policy()).weight)
        self.batches = {k: r for k, r in self.batches.items() if k[0] in by_tenant}
        picks: list[tuple[Group, int]] = []
        for tenant, count in allotted.items():
            if tenant in self.buckets:
                self.buckets[tenant].tokens -= count
            picks += self._within(by_tenant[tenant], count)
        return picks

    def _cap(self, tenant: str, policy: Policy, now: float) -> int | None:
        if policy.max_share >= 1:
            self.buckets.pop(tenant, None)
            return None
        rate = policy.max_share * self.quota_per_second
        capacity = max(1.0, rate * self.horizon)
        bucket = self.buckets.get(tenant)
        if bucket is None or bucket.rate != rate:
            bucket = self.buckets[tenant] = Bucket(rate, capacity, capacity, now)
        return bucket.available(now)

    def _within(self, groups: list[Group], count: int) -> list[tuple[Group, int]]:
        """A tenant's allotment: by priority, then round robin over its batches."""
        picks: list[tuple[Group, int]] = []
        for rank in sorted({g.priority for g in groups}):
            if count <= 0:
                break
            level = {(g.batch_id or ""): g for g in groups if g.priority == rank}
            ring = self.batches.setdefault((groups[0].tenant_id, rank), Ring())
            ring.sync(level)
            shares = ring.share(count, {k: g.waiting for k, g in level.items()}, lambda _k: 1)
            for key, k in shares.items():
                picks.append((level[key], k))
                count -= k
        return picks


def backlog(session: Session, *, now: datetime) -> list[Group]:
    """Every group of jobs waiting for dispatch (queued, no message sent, due)."""
    return [Group(*row) for row in job_rows.dispatch_groups(session, now=now)]


def policies(session: Session, tenant_ids: Iterable[str]) -> dict[str, Policy]:
    """The tenants' terms, kept in range whatever the table holds (the CLI refuses a weight
    below 1 and a share outside (0, 1]; a row changed by hand must not stall the order)."""
    return {
        t: Policy(max(1, int(w)), min(1.0, max(MIN_SHARE, float(s))))
        for t, w, s in tenant_rows.policies(session, list(tenant_ids))
    }


def capped(session: Session, tenant_id: str) -> bool:
    """Whether the tenant has a ``max_share`` below 1 (its jobs must go through the order)."""
    return any(p.max_share < 1 for p in policies(session, [tenant_id]).values())


def sent_unclaimed(session: Session, *, since: datetime) -> int:
    """Jobs sent to the broker since ``since`` and not yet claimed: what it holds. Older ones
    are left out: a message a dead worker had reserved, or one the broker lost, would otherwise
    hold the room of every tenant until the sweeper sends it again."""
    return job_rows.count_sent_unclaimed(session, since=since)


def take(session: Session, picks: Sequence[tuple[Group, int]], *, now: datetime) -> list[str]:
    """The ids of the picked jobs, oldest first in each group, marked as sent ``now`` (rows
    another transaction holds are skipped, not waited for)."""
    ids: list[str] = []
    for g, k in picks:
        ids += job_rows.take_waiting(session, g.tenant_id, g.priority, g.batch_id, limit=k, now=now)
    return ids


def ahead_in_order(
    groups: Sequence[Group], policies: dict[str, Policy], tenant_id: str, batch_id: str
) -> int:
    """Jobs of other batches the order would dispatch before the first of ``batch_id``'s, from
    the backlog as it stands (an estimate: the live dispatcher's place in its rounds is not
    known here, and later submissions may go before it).

    Within its tenant: every job of a higher priority, and one job of each other batch of its
    priority (the round robin). Each other tenant: its weighted share of the rounds that
    takes, at least one job (its turn in the current round), at most what it has waiting.
    """
    mine = [g for g in groups if g.tenant_id == tenant_id]
    own = [g.priority for g in mine if g.batch_id == batch_id]
    if not own:
        return 0
    rank = min(own)
    within = sum(g.waiting for g in mine if g.priority < rank)
    within += sum(1 for g in mine if g.priority == rank and g.batch_id != batch_id)
    others: dict[str, int] = {}
    for g in groups:
        if g.tenant_id != tenant_id:
            others[g.tenant_id] = others.get(g.tenant_id, 0) + g.waiting
    weight = policies.get(tenant_id, Policy()).weight
    return within + sum(
        min(n, math.ceil((within + 1) * policies.get(t, Policy()).weight / weight)) for t, n in others.items()
    )


def position(session: Session, tenant_id: str, batch_id: str, *, now: datetime) -> int:
    """A batch none of whose jobs started yet: how many jobs of other batches go before its
    first. Those the broker holds already, then those the order picks first
    (``ahead_in_order``); if some of its jobs are in the broker, those sent before them."""
    sent_at = job_rows.first_sent(session, batch_id)
    if sent_at is not None:
        return job_rows.count_sent_unclaimed(session, other_than=batch_id, before=sent_at)
    groups = backlog(session, now=now)
    held = job_rows.count_sent_unclaimed(session, other_than=batch_id)
    return held + ahead_in_order(
        groups, policies(session, {g.tenant_id for g in groups}), tenant_id, batch_id
    )
