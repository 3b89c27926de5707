"""pcq.costs: which calls are billed, and what one costs."""

from __future__ import annotations

import pytest

from pcq import costs
from pcq.settings import load_settings

PRICES = load_settings({}).prices


@pytest.mark.parametrize(
    ("status", "billed"),
    [
        (200, True),
        (400, True),  # no documented rule: counted, the safe side for a budget
        (500, True),
        (503, True),
        (401, False),  # the key refused: no work done
        (403, False),
        (429, False),  # rate limited: throttling must not spend a budget
        (None, False),  # no answer at all (a timeout, a refused connection)
    ],
)
def test_which_calls_are_billed(status: int | None, billed: bool) -> None:
    assert costs.billed(status) is billed
    expected = costs.call_price(PRICES, "base") if billed else 0.0
    assert costs.attempt_cost(PRICES, "base", status, None) == expected


def test_the_default_prices_are_parallels_per_1000_requests() -> None:
    assert {m: costs.call_price(PRICES, m) * 1000 for m in ("speed", "lite", "base", "core")} == {
        "speed": 5,
        "lite": 5,
        "base": 10,
        "core": 25,
    }
