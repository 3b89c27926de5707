"""The OpenAI-compatible Files and Batches in process (SQLite): shapes, validation errors with
their lines, 404s across tenants, pagination, cancel, delete, and OpenAI-shaped errors the
official SDK turns into its typed exceptions."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from sqlalchemy import select, update

from api.app import create_app
from pcq.db import make_engine, make_session_factory
from pcq.models import Job, Tenant, utcnow
from pcq.tenants import create_key_at
from tests.conftest import make_settings

BODY = '{"model": "lite", "messages": [{"role": "user", "content": "Hi ✓"}], "temperature": 1.0}'


def line(custom_id: str, body: str = BODY, **extra: str) -> str:
    fields = {"custom_id": json.dumps(custom_id), "method": '"POST"', "url": '"/v1/chat/completions"'}
    fields.update({k: json.dumps(v) for k, v in extra.items()})
    return "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + f', "body": {body}' + "}"


@dataclass
class Api:
    client: TestClient
    key: str
    other_key: str
    db_url: str

    def h(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    def sdk(self, key: str | None = None) -> OpenAI:
        return OpenAI(
            base_url="http://testserver/openai/v1",
            api_key=key or self.key,
            http_client=self.client,
            max_retries=0,
        )

    def upload(self, text: str, key: str | None = None, purpose: str = "batch") -> Any:
        return self.client.post(
            "/openai/v1/files",
            files={"file": ("in.jsonl", text.encode(), "application/jsonl")},
            data={"purpose": purpose},
            headers=self.h(key),
        )

    def batch(self, file_id: str, key: str | None = None, **extra: Any) -> Any:
        body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        return self.client.post("/openai/v1/batches", json={**body, **extra}, headers=self.h(key))

    def jobs(self, batch_id: str) -> list[Job]:
        engine = make_engine(self.db_url)
        with make_session_factory(engine)() as session:
            found = list(session.scalars(select(Job).where(Job.batch_id == batch_id)))
        engine.dispose()
        return found


@pytest.fixture
def api(sqlite_url: str) -> Iterator[Api]:
    settings = make_settings(DATABASE_URL=sqlite_url, PCQ_BROKER_URL="memory://", PCQ_MAX_BATCH_BYTES=4096)
    with TestClient(create_app(settings)) as client:
        yield Api(client, create_key_at(sqlite_url, "acme"), create_key_at(sqlite_url, "globex"), sqlite_url)


def test_a_file_is_uploaded_read_listed_and_deleted(api: Api) -> None:
    text = line("a") + "\n"
    r = api.upload(text)
    assert r.status_code == 200, r.text
    file = r.json()
    assert file["id"].startswith("file-")
    assert {k: file[k] for k in ("object", "bytes", "filename", "purpose", "status")} == {
        "object": "file",
        "bytes": len(text.encode()),
        "filename": "in.jsonl",
        "purpose": "batch",
        "status": "processed",
    }
    assert isinstance(file["created_at"], int)
    assert api.client.get(f"/openai/v1/files/{file['id']}", headers=api.h()).json() == file
    content = api.client.get(f"/openai/v1/files/{file['id']}/content", headers=api.h())
    assert content.content == text.encode()
    listed = api.client.get("/openai/v1/files", headers=api.h()).json()
    assert listed["object"] == "list"
    assert [f["id"] for f in listed["data"]] == [file["id"]]
    deleted = api.client.delete(f"/openai/v1/files/{file['id']}", headers=api.h())
    assert deleted.json() == {"id": file["id"], "object": "file", "deleted": True}
    assert api.client.get(f"/openai/v1/files/{file['id']}", headers=api.h()).status_code == 404


def test_the_sdk_uploads_and_lists_with_pages(api: Api) -> None:
    client = api.sdk()
    ids = [client.files.create(file=("x.jsonl", line(str(n)).encode()), purpose="batch").id for n in range(3)]
    page = client.files.list(limit=2)
    assert [f.id for f in page.data] == ids[::-1][:2]
    assert [f.id for f in client.files.list(limit=2)] == ids[::-1]  # the SDK follows has_more
    assert client.files.retrieve(ids[0]).bytes == len(line("0").encode())


def test_another_purpose_is_refused_with_an_openai_400(api: Api) -> None:
    r = api.upload(line("a"), purpose="fine-tune")
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "purpose"
    with pytest.raises(openai.BadRequestError):
        api.sdk().files.create(file=("x.jsonl", b"{}"), purpose="assistants")


def test_a_file_over_the_batch_limit_is_refused_413_in_openai_shape(api: Api) -> None:
    r = api.upload(line("a") * 100)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "too_large"
    assert "PCQ_MAX_BATCH_BYTES" in r.json()["error"]["message"]


def test_a_missing_key_is_an_openai_401(api: Api) -> None:
    r = api.client.get("/openai/v1/files")
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        api.sdk(key="pcq_nope").batches.list()


def test_a_batch_stores_each_body_verbatim_and_shows_in_v1(api: Api) -> None:
    odd = '{"temperature": 0.50, "model": "lite", "messages": [{"content": "\\u00e9 東京", "role": "user"}]}'
    file_id = api.upload(line("a") + "\n\n" + line("b", odd) + "\n").json()["id"]
    r = api.batch(file_id, metadata={"zeta": "1", "alpha": "2"})
    assert r.status_code == 200, r.text
    batch = r.json()
    assert batch["object"] == "batch"
    assert batch["status"] == "in_progress"
    assert batch["input_file_id"] == file_id
    assert batch["endpoint"] == "/v1/chat/completions"
    assert batch["completion_window"] == "24h"
    assert batch["request_counts"] == {"total": 2, "completed": 0, "failed": 0}
    assert batch["output_file_id"] is None
    assert batch["error_file_id"] is None
    assert list(batch["metadata"]) == ["zeta", "alpha"]
    requests = {j.custom_id: j.request_json for j in api.jobs(batch["id"])}
    assert requests == {"a": BODY, "b": odd}
    v1 = api.client.get(f"/v1/batches/{batch['id']}", headers=api.h()).json()
    assert v1["total"] == 2
    assert v1["metadata"] == {"zeta": "1", "alpha": "2"}
    assert api.sdk().batches.retrieve(batch["id"]).request_counts.total == 2  # type: ignore[union-attr]


BAD_LINES = [
    ("not json", "invalid_json_line", None),
    (line("a").replace('"custom_id": "a", ', ""), "missing_required_parameter", "custom_id"),
    (line("b").replace('"POST"', '"GET"'), "invalid_method", "method"),
    (line("c").replace("/v1/chat/completions", "/v1/embeddings"), "invalid_url", "url"),
    (line("d", body='"text"'), "invalid_body", "body"),
    (line("e", body=BODY.replace("lite", "gpt-4o")), "model_not_found", "body.model"),
    (line("f", body='{"model": "lite"}'), "invalid_request", None),
    (line("g"), None, None),
    (line("g"), "duplicate_custom_id", "custom_id"),
]


def test_a_bad_file_fails_the_batch_naming_each_line_and_stores_no_job(api: Api) -> None:
    file_id = api.upload("\n".join(text for text, _, _ in BAD_LINES)).json()["id"]
    batch = api.batch(file_id).json()
    assert batch["status"] == "failed"
    assert isinstance(batch["failed_at"], int)
    assert batch["errors"]["object"] == "list"
    found = [(e["line"], e["code"], e["param"]) for e in batch["errors"]["data"]]
    expected = [(n, code, param) for n, (_, code, param) in enumerate(BAD_LINES, 1) if code]
    assert found == expected
    assert all(e["message"] for e in batch["errors"]["data"])
    assert api.jobs(batch["id"]) == []
    assert api.client.get(f"/openai/v1/batches/{batch['id']}", headers=api.h()).json() == batch
    sdk_batch = api.sdk().batches.retrieve(batch["id"])
    assert sdk_batch.errors is not None
    assert sdk_batch.errors.data is not None
    assert sdk_batch.errors.data[0].line == 1


def test_an_empty_file_fails_the_batch(api: Api) -> None:
    file_id = api.upload("\n\n").json()["id"]
    batch = api.batch(file_id).json()
    assert batch["status"] == "failed"
    assert batch["errors"]["data"][0]["code"] == "empty_file"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"endpoint": "/v1/embeddings"}, "endpoint"),
        ({"completion_window": "1h"}, "completion_window"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"input_file_id": 7}, "input_file_id"),
        ({"webhook": "x"}, "webhook"),
        # pcq's own options, as POST /v1/batches checks them
        ({"max_cost": 0}, "max_cost"),
        ({"reuse": "forever"}, "reuse"),
        ({"webhook_url": "ftp://hooks.example.com/x"}, "webhook_url"),
        ({"webhook_events": ["job.exploded"]}, "webhook_events.0"),
    ],
)
def test_a_bad_batch_request_is_an_openai_400(api: Api, body: dict[str, Any], param: str) -> None:
    r = api.batch("file-x", **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_pcq_options_ride_along_through_the_sdks_extra_body(api: Api) -> None:
    """webhook_url, webhook_events, max_cost, reuse and priority, as a /v1 batch takes them."""
    file_id = api.upload(line("a") + "\n" + line("b") + "\n").json()["id"]
    created = api.sdk().batches.create(
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_body={
            "webhook_url": "https://hooks.example.com/pcq",
            "webhook_events": ["job.failed"],
            "max_cost": 0.5,
            "reuse": "24h",
            "priority": "high",
        },
    )
    v1 = api.client.get(f"/v1/batches/{created.id}", headers=api.h()).json()
    assert v1["webhook_url"] == "https://hooks.example.com/pcq"
    assert v1["webhook_events"] == ["job.failed"]
    assert v1["max_cost"] == 0.5
    jobs = api.jobs(created.id)
    assert {(j.reuse_seconds, j.priority) for j in jobs} == {(86400, 0)}


def test_a_webhook_url_to_a_private_address_is_refused_before_anything_is_stored(api: Api) -> None:
    file_id = api.upload(line("a") + "\n").json()["id"]
    r = api.batch(file_id, webhook_url="http://127.0.0.1:9/hook")
    assert r.status_code == 400, r.text
    assert api.client.get("/openai/v1/batches", headers=api.h()).json()["data"] == []


def test_another_tenants_file_and_batch_are_404(api: Api) -> None:
    file_id = api.upload(line("a")).json()["id"]
    batch_id = api.batch(file_id).json()["id"]
    other = api.other_key
    assert api.client.get(f"/openai/v1/files/{file_id}", headers=api.h(other)).status_code == 404
    assert api.client.get(f"/openai/v1/files/{file_id}/content", headers=api.h(other)).status_code == 404
    assert api.client.delete(f"/openai/v1/files/{file_id}", headers=api.h(other)).status_code == 404
    assert api.batch(file_id, key=other).status_code == 404
    assert api.client.get(f"/openai/v1/batches/{batch_id}", headers=api.h(other)).status_code == 404
    assert api.client.post(f"/openai/v1/batches/{batch_id}/cancel", headers=api.h(other)).status_code == 404
    for output in (f"file-{batch_id}-output", f"file-{batch_id}-errors", "file-nope"):
        assert api.client.get(f"/openai/v1/files/{output}", headers=api.h()).status_code == 404
    with pytest.raises(openai.NotFoundError):
        api.sdk(other).batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert api.client.get("/openai/v1/batches", headers=api.h(other)).json()["data"] == []


def test_batches_list_newest_first_a_page_at_a_time(api: Api) -> None:
    file_id = api.upload(line("a")).json()["id"]
    ids = [api.batch(file_id).json()["id"] for _ in range(3)]
    first = api.client.get("/openai/v1/batches?limit=2", headers=api.h()).json()
    assert [b["id"] for b in first["data"]] == ids[::-1][:2]
    assert first["has_more"] is True
    assert (first["first_id"], first["last_id"]) == (ids[2], ids[1])
    rest = api.client.get(f"/openai/v1/batches?limit=2&after={first['last_id']}", headers=api.h()).json()
    assert [b["id"] for b in rest["data"]] == [ids[0]]
    assert rest["has_more"] is False
    assert [b.id for b in api.sdk().batches.list(limit=1)] == ids[::-1]
    assert api.client.get("/openai/v1/batches?limit=0", headers=api.h()).status_code == 400
    assert api.client.get("/openai/v1/batches?limit=x", headers=api.h()).status_code == 400


def test_cancelling_a_queued_batch_cancels_its_jobs_into_the_error_file(api: Api) -> None:
    file_id = api.upload(line("a") + "\n" + line("b")).json()["id"]
    batch_id = api.batch(file_id).json()["id"]
    batch = api.sdk().batches.cancel(batch_id)
    assert batch.status == "cancelled"  # nothing was running: every job ended at once
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (0, 2)
    assert batch.cancelled_at is not None
    assert batch.cancelling_at is not None
    assert batch.error_file_id == f"file-{batch_id}-errors"
    assert {j.status for j in api.jobs(batch_id)} == {"cancelled"}
    lines = [json.loads(x) for x in api.sdk().files.content(batch.error_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == ["a", "b"]
    assert all(x["response"] is None and x["error"]["code"] == "batch_cancelled" for x in lines)
    assert api.sdk().files.content(batch.output_file_id or "").text == ""  # nothing succeeded
    assert api.sdk().batches.cancel(batch_id).status == "cancelled"  # again: unchanged


def test_a_failed_batch_cannot_be_cancelled(api: Api) -> None:
    batch_id = api.batch(api.upload("nope").json()["id"]).json()["id"]
    with pytest.raises(openai.ConflictError):
        api.sdk().batches.cancel(batch_id)


NASTY_BATCH_BODIES = [
    b"",
    b"\xff\xfe",
    b"[]",
    b'{"input_file_id": "\\ud800", "endpoint": "/v1/chat/completions", "completion_window": "24h"}',
    b'{"input_file_id": "file-\\u0000", "endpoint": "/v1/chat/completions", "completion_window": "24h"}',
    b'{"input_file_id": "f", "endpoint": "/v1/chat/completions", "completion_window": "24h", '
    b'"metadata": {"\\udc00": "x"}}',
    b'{"\\ud800": 1}',
]


@pytest.mark.parametrize("raw", NASTY_BATCH_BODIES)
def test_a_malformed_batch_request_is_a_400_never_a_5xx(api: Api, raw: bytes) -> None:
    r = api.client.post(
        "/openai/v1/batches", content=raw, headers={**api.h(), "content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_bad_lines_with_unpaired_surrogates_are_reported_not_a_5xx(api: Api) -> None:
    lines = [
        '{"custom_id": "\\ud800", "method": "POST", "url": "/v1/chat/completions", "body": ' + BODY + "}",
        line("x", body=BODY[:-1] + ', "\\udc00": 1}'),
        line("y", body=BODY[:-1] + ', "stream": true}'),
    ]
    batch = api.batch(api.upload("\n".join(lines)).json()["id"])
    assert batch.status_code == 200, batch.text
    assert [e["line"] for e in batch.json()["errors"]["data"]] == [1, 2, 3]


@pytest.mark.parametrize(
    ("content", "content_type"),
    [(b"{}", "application/json"), (b"--x\r\nbroken", "multipart/form-data; boundary=x"), (b"", "")],
)
def test_a_malformed_upload_is_a_400(api: Api, content: bytes, content_type: str) -> None:
    r = api.client.post(
        "/openai/v1/files", content=content, headers={**api.h(), "content-type": content_type}
    )
    assert r.status_code == 400, r.text


def test_odd_ids_in_paths_are_404_or_400_never_5xx(api: Api) -> None:
    for path in (
        "/openai/v1/files/file-%00",
        "/openai/v1/batches/%F0%9F%98%80",
        "/openai/v1/files/file--output",
    ):
        assert api.client.get(path, headers=api.h()).status_code in (400, 404)
    assert api.client.get("/openai/v1/files?after=%00", headers=api.h()).status_code == 400


def test_the_error_file_says_budget_exceeded_for_a_job_its_budget_stopped(api: Api) -> None:
    """A user's cancel is OpenAI's batch_cancelled; a budget's is pcq's budget_exceeded, with why."""
    file_id = api.upload(line("a") + "\n" + line("b") + "\n").json()["id"]
    batch_id = api.batch(file_id).json()["id"]
    engine = make_engine(api.db_url)
    with make_session_factory(engine)() as session, session.begin():
        for job, code, error in (
            ("a", "budget_exceeded", "the batch's max_cost leaves no room for this call"),
            ("b", "cancelled", "cancelled by the client"),
        ):
            session.execute(
                update(Job)
                .where(Job.batch_id == batch_id, Job.custom_id == job)
                .values(status="cancelled", error_code=code, error=error, finished_at=utcnow())
            )
    engine.dispose()
    shown = api.sdk().batches.retrieve(batch_id)
    assert shown.error_file_id is not None
    lines = {
        x["custom_id"]: x["error"]
        for x in map(json.loads, api.sdk().files.content(shown.error_file_id).text.splitlines())
    }
    assert lines["a"] == {
        "code": "budget_exceeded",
        "message": "the batch's max_cost leaves no room for this call",
    }
    assert lines["b"]["code"] == "batch_cancelled"


def test_creating_a_batch_takes_one_of_the_tenants_upload_slots(api: Api) -> None:
    """Its input file is read whole into the API: beyond the tenant's slots, an OpenAI 429."""
    file_id = api.upload(line("a") + "\n").json()["id"]
    engine = make_engine(api.db_url)
    with make_session_factory(engine)() as session:
        tenant = session.scalars(select(Tenant.id).where(Tenant.name == "acme")).one()
    engine.dispose()
    uploads = api.client.app.state.resources.submitter.uploads  # type: ignore[attr-defined]
    with ExitStack() as held:
        for _ in range(uploads.per_tenant):
            held.enter_context(uploads.hold(tenant))
        r = api.batch(file_id)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["message"]
    assert api.batch(file_id).status_code == 200


@pytest.mark.parametrize("piece", [7, 8, 4096, None])
def test_a_files_content_is_sent_a_piece_at_a_time_byte_for_byte(
    api: Api, piece: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.routes import openai_compat as routes

    text = line("a") + "\n" + line("b", BODY.replace("Hi", "é 東京")) + "\n"
    # None: the file is exactly one piece long (the last read finds nothing more)
    monkeypatch.setattr(routes, "CONTENT_PIECE", piece or len(text.encode()))
    file_id = api.upload(text).json()["id"]
    r = api.client.get(f"/openai/v1/files/{file_id}/content", headers=api.h())
    assert r.status_code == 200
    assert r.content == text.encode()
