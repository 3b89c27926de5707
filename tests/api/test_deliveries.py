"""The deliveries API and a batch's webhook_events, at the edge: what is accepted, what is a 422
or a 404, and what another tenant sees. Deliveries themselves: tests/e2e/test_webhooks.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.api.test_webhook_secrets import Api, _api

REQUEST = {"model": "lite", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def api(db_url: str) -> Iterator[Api]:
    yield from _api(db_url, PCQ_WEBHOOK_ALLOW_PRIVATE="true")


def batch(api: Api, **extra: object) -> tuple[int, dict[str, object]]:
    body = {"requests": [{"custom_id": "a", "body": REQUEST}], **extra}
    r = api.client.post("/v1/batches", json=body, headers=api.h())
    return r.status_code, r.json()


def test_a_batch_keeps_the_job_events_it_asks_for_once_each_in_order(api: Api) -> None:
    status, shown = batch(
        api,
        webhook_url="http://127.0.0.1:9/hook",
        webhook_events=["job.failed", "job.succeeded", "job.failed"],
    )
    assert status == 202, shown
    assert shown["webhook_events"] == ["job.failed", "job.succeeded"]
    got = api.client.get(f"/v1/batches/{shown['id']}", headers=api.h()).json()
    assert got["webhook_events"] == ["job.failed", "job.succeeded"]
    status, shown = batch(api)
    assert shown["webhook_events"] is None


@pytest.mark.parametrize("events", [["batch.completed"], ["job.done"], "job.failed", [1], [None]])
def test_unknown_webhook_events_are_refused_and_nothing_is_stored(api: Api, events: object) -> None:
    status, shown = batch(api, webhook_url="http://127.0.0.1:9/hook", webhook_events=events)
    assert status == 422, shown
    assert "webhook_events" in str(shown["detail"])
    assert api.client.get("/v1/jobs", headers=api.h()).json()["data"] == []


def test_the_deliveries_list_checks_its_filters_and_scopes_them_to_the_tenant(api: Api) -> None:
    status, shown = batch(api, webhook_url="http://127.0.0.1:9/hook")
    assert status == 202
    page = api.client.get("/v1/webhooks/deliveries", headers=api.h())
    assert page.status_code == 200
    assert page.json() == {"data": [], "next_cursor": None}
    assert api.client.get("/v1/webhooks/deliveries?status=sent", headers=api.h()).status_code == 422
    assert api.client.get("/v1/webhooks/deliveries?limit=0", headers=api.h()).status_code == 422
    # Another tenant's batch is a 404, not an empty page.
    theirs = api.client.get(f"/v1/webhooks/deliveries?batch_id={shown['id']}", headers=api.h(api.other_key))
    assert theirs.status_code == 404
    assert api.client.get("/v1/webhooks/deliveries", headers={}).status_code == 401


def test_redelivering_an_unknown_event_is_a_404(api: Api) -> None:
    r = api.client.post("/v1/webhooks/deliveries/msg_nope/redeliver", headers=api.h())
    assert r.status_code == 404
    assert r.json()["error"] == "not_found"
