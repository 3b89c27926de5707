"""OpenAI-compatible Files and Batches (``/openai/v1``): the routes OpenAI's SDK calls, with a
pcq key as its ``api_key``. Views over pcq's batches and jobs (api.openai_compat).

Out of the OpenAPI document: they answer OpenAI's shapes and errors, which OpenAI documents."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api import openai_compat as oai
from api.deps import ResourcesDep, SessionDep, StreamingSessionDep, TenantDep
from pcq import logs
from pcq.db import unit_of_work
from pcq.repositories import openai as rows

router = APIRouter(prefix=oai.PREFIX, include_in_schema=False)
MAX_FILES_PAGE = 10_000
MAX_BATCHES_PAGE = 100


CONTENT_PIECE = 1024 * 1024  # bytes of an uploaded file read and sent at a time


class JsonlResponse(StreamingResponse):
    media_type = "application/jsonl"


@router.post("/files")
async def create_file(request: Request, res: ResourcesDep, tenant: TenantDep) -> dict[str, Any]:
    """Upload a batch input file (multipart: ``file``, ``purpose=batch``); up to PCQ_MAX_BATCH_BYTES."""
    with res.submitter.uploads.hold(tenant):
        async with request.form(max_files=1, max_fields=8) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise oai.OpenAIError(400, "file is required (a multipart file part)", param="file")
            filename = oai.check_upload(form.get("purpose"), upload.filename)
            content = await run_in_threadpool(upload.file.read)
        file = await run_in_threadpool(oai.store_file, res.sessions, tenant, filename, content)
    return oai.file_object(file)


@router.get("/files")
def list_files(
    session: SessionDep,
    tenant: TenantDep,
    after: str | None = None,
    limit: int | None = None,
    order: str = "desc",
    purpose: str | None = None,
) -> dict[str, Any]:
    """The tenant's uploaded files, newest first unless ``order=asc``."""
    if order not in ("asc", "desc"):
        raise oai.OpenAIError(400, "order must be 'asc' or 'desc'", param="order", code="invalid_value")
    size = oai.list_limit(limit, MAX_FILES_PAGE, MAX_FILES_PAGE)
    files = rows.files_of_tenant(
        session, tenant, purpose=purpose, after=after, newest_first=order == "desc", limit=size + 1
    )
    data = [oai.file_object(f) for f in files[:size]]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(files) > size,
    }


@router.get("/files/{file_id}")
def get_file(file_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    """An uploaded file, or a batch's generated output or error file."""
    generated = oai.generated_file(session, tenant, file_id)
    if generated is not None:
        return oai.output_file_object(*generated)
    file = rows.file_of(session, tenant, file_id)
    if file is None:
        raise oai.not_found("file", file_id)
    return oai.file_object(file)


@router.get("/files/{file_id}/content")
def file_content(
    file_id: str, res: ResourcesDep, session: StreamingSessionDep, tenant: TenantDep
) -> StreamingResponse:
    """The file's bytes; a batch's output or error file is generated from its stored answers."""
    generated = oai.generated_file(session, tenant, file_id)
    if generated is not None:
        batch, errors = generated
        return JsonlResponse(oai.output_lines(oai.output_pages(res.sessions, batch.id, errors)))
    first = rows.content_piece(session, tenant, file_id, 0, CONTENT_PIECE)
    if first is None:
        raise oai.not_found("file", file_id)

    def pieces() -> Iterator[bytes]:
        """A piece at a time, each read in a session of its own (none is held while the client
        reads), so the API holds one piece of a 256 MiB file, not the file."""
        piece: bytes | None = first
        start = 0
        while piece:
            yield piece
            if len(piece) < CONTENT_PIECE:
                return
            start += len(piece)
            with res.sessions() as session:
                piece = rows.content_piece(session, tenant, file_id, start, CONTENT_PIECE)

    return JsonlResponse(pieces())


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, res: ResourcesDep, tenant: TenantDep) -> dict[str, Any]:
    """Delete an uploaded file (the batches made from it keep their jobs)."""

    def delete() -> bool:
        with unit_of_work(res.sessions) as session:
            return rows.delete_file(session, tenant, file_id)

    if oai.output_file_of(file_id) is not None or not await run_in_threadpool(delete):
        raise oai.not_found("file", file_id)
    return {"id": file_id, "object": "file", "deleted": True}


@router.post("/batches")
async def create_batch(request: Request, res: ResourcesDep, tenant: TenantDep) -> dict[str, Any]:
    """Create a batch from an uploaded file; a bad file gives a batch already ``failed``."""
    body = oai.BatchCreate.read(await request.body())
    # The input file is read whole into this process to be checked and stored: in one of the
    # tenant's upload slots, as a batch body is (PCQ_MAX_UPLOADS_PER_TENANT, PCQ_MAX_UPLOADS), so
    # concurrent creates from big files cannot take the process's memory.
    with res.submitter.uploads.hold(tenant):
        batch = await run_in_threadpool(oai.create_batch, res.submitter, tenant, body)
    logs.bind(batch_id=batch.id)  # for the access line

    def shown() -> dict[str, Any]:
        with res.sessions() as session:
            return oai.batch_objects(session, [batch])[0]

    return await run_in_threadpool(shown)


@router.get("/batches/{batch_id}")
def get_batch(batch_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    """A batch as OpenAI shows one: status, request counts, output and error files."""
    return oai.batch_objects(session, [oai.get_batch(session, tenant, batch_id)])[0]


@router.post("/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, res: ResourcesDep, tenant: TenantDep) -> dict[str, Any]:
    """Cancel a batch: ``cancelling`` while calls in flight finish, then ``cancelled``."""

    def cancel() -> dict[str, Any]:
        batch = oai.cancel_batch(res.sessions, tenant, batch_id)
        with res.sessions() as session:
            return oai.batch_objects(session, [oai.get_batch(session, tenant, batch.id)])[0]

    return await run_in_threadpool(cancel)


@router.get("/batches")
def list_batches(
    session: SessionDep,
    tenant: TenantDep,
    after: Annotated[str | None, Query()] = None,
    limit: Annotated[int | None, Query()] = None,
) -> dict[str, Any]:
    """The tenant's batches created here, newest first, ``limit`` (1-100, default 20) after ``after``."""
    size = oai.list_limit(limit, 20, MAX_BATCHES_PAGE)
    batches = rows.openai_batches(session, tenant, before=after, limit=size + 1)
    data = oai.batch_objects(session, batches[:size])
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(batches) > size,
    }
