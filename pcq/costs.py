"""What calls cost, and the budgets that stop them: the one place these rules live.

- **Prices** are ``PCQ_PRICES`` (pcq.settings.ModelPrice per model, in USD): per 1,000 billed
  requests, and per million prompt and completion tokens where the upstream bills tokens.
- **Which calls are billed.** Parallel documents no rule for failed calls; it does say a
  retried POST can be billed twice (its SDK sends no idempotency header). So every call that
  got an HTTP answer counts as billed (an upper bound, the safe side for a budget) except the
  answers that refuse a call before any work: ``401`` and ``403`` (the key is refused) and
  ``429`` (rate limited; counting those would let throttling spend a budget). A call that got
  no answer (refused connection, timeout, cut stream) counts 0.
- **What an attempt cost** is computed as it is stored (``attempt_cost``, from the prices of
  that moment) and kept in ``attempts.cost``: a batch's ``spent`` is a sum of stored rows, and a
  price changed later does not rewrite history. A batch's ``estimated`` cost is one call per job
  at its model's request price, fixed at submission (tokens are not known in advance).
- **Budgets**, a batch's ``max_cost`` and a tenant's ``monthly_budget`` (calendar month, UTC),
  are checked where a call is about to start: the claim (``refuse_over_budget``, in the claim's
  transaction). A claim passes when the scope's spend so far, plus one call's price for each of
  its calls in flight (its running jobs), plus this call's price, stays within the budget.
  Claims of one scope take a transaction-scoped lock first, so two workers cannot both pass
  when only one call fits; the spend and the calls in flight are read in one statement (one
  snapshot), so a call whose outcome is being stored is counted once, as spend or as in flight.
  A claim that does not fit is not made: that job, and every queued job of the scope that
  could no longer fit, end ``cancelled`` with ``budget_exceeded``; at most ``CANCEL_AT_ONCE``
  of those per claim, so a claim holding a scope's lock stays short however large the scope:
  each later claim of one of the rest is refused too, and cancels the next ones. Calls in
  flight finish.
  The overshoot is bounded by token prices (not known when a call starts; 0 by default).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, NamedTuple, Protocol

from sqlalchemy.orm import Session

from pcq.repositories import budgets as budget_rows
from pcq.settings import PRICED_MODELS, ModelPrice
from pcq.views import BatchCost, BatchUsage
from pcq.wire import KNOWN_MODELS

assert PRICED_MODELS == KNOWN_MODELS

Prices = Mapping[str, ModelPrice]
BUDGET_EXCEEDED = "budget_exceeded"
CANCEL_AT_ONCE = 10_000  # queued jobs one claim cancels per scope without room (module docstring)
# Sums of float prices drift by far less than this; a call that exactly fits must pass.
EPSILON = 1e-9
MONEY_DIGITS = 6  # USD shown to a millionth of a dollar


def call_price(prices: Prices, model: str) -> float:
    """The price of one billed request of ``model`` (tokens aside)."""
    price = prices.get(model)
    return 0.0 if price is None else price.per_1k_requests / 1000


NOT_BILLED = frozenset({401, 403, 429})  # refused before any work: the key, or the rate limit


def billed(status_code: int | None) -> bool:
    """Whether a call counts as billed: it got an HTTP answer that was not a refusal before
    any work (see the module docstring)."""
    return status_code is not None and status_code not in NOT_BILLED


def attempt_cost(
    prices: Prices, model: str, status_code: int | None, usage: Mapping[str, Any] | None
) -> float:
    """What one call cost: its request price if billed, plus its tokens at their prices."""
    if not billed(status_code):
        return 0.0
    cost = call_price(prices, model)
    price = prices.get(model)
    if usage is not None and price is not None:
        for key, per_1m in (
            ("prompt_tokens", price.per_1m_prompt_tokens),
            ("completion_tokens", price.per_1m_completion_tokens),
        ):
            tokens = usage.get(key)
            if per_1m and isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0:
                cost += tokens * per_1m / 1_000_000
    return cost


def estimate(prices: Prices, jobs_per_model: Mapping[str, int]) -> float:
    """A batch's cost with no retries: one call per job at its model's request price."""
    return sum(call_price(prices, model) * n for model, n in jobs_per_model.items())


def money(usd: float) -> float:
    return round(usd, MONEY_DIGITS)


def month_of(at: datetime | date) -> date:
    """The calendar month (UTC) ``at`` falls in, as its first day."""
    return date(at.year, at.month, 1)


def batch_cost(session: Session, batch_id: str, estimated: float | None) -> tuple[BatchUsage, BatchCost]:
    """A batch's token usage (summed over its results) and cost: ``estimated`` as stored at
    submission, ``spent`` every billed attempt of its jobs, retries included. One aggregate
    over the batch's jobs and their attempts (indexes: ix_jobs_batch_status, then
    uq_attempts_job_id_number); shared by ``GET /v1/batches/{id}`` and the webhooks' bodies."""
    totals = budget_rows.batch_totals(session, batch_id)
    usage = BatchUsage(
        prompt_tokens=totals.prompt_tokens,
        completion_tokens=totals.completion_tokens,
        total_tokens=totals.total_tokens,
    )
    return usage, BatchCost(
        estimated=None if estimated is None else money(estimated), spent=money(totals.spent)
    )


# --- spend, as attempts are stored


class Spend(NamedTuple):
    """One stored attempt as the spend counters see it."""

    tenant_id: str
    batch_id: str | None
    cost: float
    at: datetime


def record_spend(session: Session, spent: Iterable[Spend]) -> None:
    """Add stored attempts' costs to their tenant's month and, for batches with a max_cost, to
    the batch's spend; in the storing transaction, after its job and batch locks (one order
    for every writer: jobs, batches, tenant months)."""
    by_month: dict[tuple[str, date], float] = defaultdict(float)
    by_batch: dict[str, float] = defaultdict(float)
    for s in spent:
        if s.cost > 0:
            by_month[(s.tenant_id, month_of(s.at))] += s.cost
            if s.batch_id is not None:
                by_batch[s.batch_id] += s.cost
    budget_rows.add_batch_spend(session, sorted(by_batch.items()))
    budget_rows.add_tenant_spend(session, sorted((t, m, c) for (t, m), c in by_month.items()))


# --- budgets, at the claim


class ClaimRow(Protocol):
    """A job just claimed, with the budgets that bound it."""

    id: str
    tenant_id: str
    batch_id: str | None
    model: str
    monthly_budget: float | None
    max_cost: float | None


@dataclass(frozen=True)
class Exhausted:
    """A budget scope left with less room than some calls need: its queued jobs of the
    ``models`` priced above the room are cancelled."""

    batch_id: str | None
    tenant_id: str | None
    models: tuple[str, ...]


def refuse_over_budget(
    session: Session, calling: list[Any], prices: Prices, *, now: datetime, claimed_ids: Sequence[str]
) -> tuple[dict[str, str], list[Exhausted]]:
    """Which of the jobs just claimed that would call must not be (their budget has no room for
    one more call), each with why, and the scopes left without room; ``calling`` are ClaimRows,
    in the claim's transaction. ``claimed_ids`` are every job this claim took, ``calling`` or
    not: all are ``running`` until the claim ends, but those that make no call (reused
    answers, waits, jobs given up) are no call in flight, so none of them counts as one.
    Jobs under no budget cost the claim two primary-key probes (their tenant's budget, their
    batch's max_cost), no more."""
    scoped: list[ClaimRow] = [r for r in calling if r.monthly_budget is not None or r.max_cost is not None]
    if not scoped:
        return {}, []
    mine = list(claimed_ids)
    batches = {r.batch_id: r.max_cost for r in scoped if r.batch_id is not None and r.max_cost is not None}
    tenants = {r.tenant_id: r.monthly_budget for r in scoped if r.monthly_budget is not None}
    budget_rows.lock_scopes(session, batches=sorted(batches), tenants=sorted(tenants))
    month = month_of(now)
    room: dict[tuple[str, str], float] = {}
    for batch_id, limit in batches.items():
        assert limit is not None
        spent, flying = budget_rows.batch_spend(session, batch_id, excluding=mine)
        room[(BATCH, batch_id)] = limit - spent - estimate(prices, flying)
    for tenant_id, limit in tenants.items():
        assert limit is not None
        spent, flying = budget_rows.tenant_spend(session, tenant_id, month, excluding=mine)
        room[(TENANT, tenant_id)] = limit - spent - estimate(prices, flying)
    refused: dict[str, str] = {}
    short: set[tuple[str, str]] = set()
    for r in sorted(scoped, key=lambda r: r.id):  # oldest first: submission order
        price = call_price(prices, r.model)
        keys = [k for k in ((BATCH, r.batch_id or ""), (TENANT, r.tenant_id)) if k in room]
        over = [k for k in keys if room[k] + EPSILON < price]
        if over:
            refused[r.id] = REASONS[over[0][0]]
            short.update(over)
        else:
            for k in keys:
                room[k] -= price
    exhausted = [
        Exhausted(
            batch_id=ident if kind == BATCH else None,
            tenant_id=ident if kind == TENANT else None,
            models=tuple(m for m in PRICED_MODELS if room[(kind, ident)] + EPSILON < call_price(prices, m)),
        )
        for kind, ident in sorted(short)
    ]
    return refused, exhausted


BATCH, TENANT = "batch", "tenant"
REASONS = {
    BATCH: "not started: the batch's max_cost has no room for another call",
    TENANT: "not started: the tenant's monthly budget has no room for another call",
}


def valid_budget(value: float, what: str) -> float:
    """A budget in USD: finite and not negative."""
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{what} must be a number of USD, 0 or more, not {value}")
    return value
