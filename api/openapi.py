"""The OpenAPI document: FastAPI's, completed where FastAPI cannot see what the API does.

- ``POST /v1/batches`` reads its body itself (it streams JSONL), so FastAPI never sees BatchCreate
  or BatchLine; the batch results are JSONL lines FastAPI does not model either; errors are
  documented by api.errors.error_responses as ErrorOut. They are added to ``components`` here,
  so every ``$ref`` in the document resolves.
- FastAPI adds a ``422`` with its own HTTPValidationError body to every route with parameters;
  this API renders those errors as ErrorOut (api.errors) and declares ``422`` itself where a
  route can answer it, so FastAPI's are removed.
- api.errors.RejectNul answers ``422`` for a NUL character in any path or query parameter: each
  such string parameter gets a pattern saying so, and its operation a ``422``.
- Every authenticated operation counts against its tenant's rate limit (api.tenant_limits,
  applied by the dependency that authenticates), so each operation with ``security`` gets a
  ``429`` with ``Retry-After``; the submission and retry routes can answer it for the queued-jobs
  cap as well.
- An optional parameter is absent, never null (a query string has no null): FastAPI's
  ``anyOf: [..., {"type": "null"}]`` for ``str | None`` becomes the schema of its value.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from api.errors import error_responses
from api.schemas import NO_NUL, BatchCreate, BatchLine, ErrorOut, ExportLine

EXTRA_SCHEMAS: tuple[tuple[type[BaseModel], JsonSchemaMode], ...] = (
    (BatchCreate, "validation"),
    (BatchLine, "validation"),
    (ExportLine, "serialization"),
    (ErrorOut, "serialization"),
)
REF_TEMPLATE = "#/components/schemas/{model}"
_FASTAPI_422 = "#/components/schemas/HTTPValidationError"


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    openapi_version=app.openapi_version,
                    summary=app.summary,
                    description=app.description,
                    routes=app.routes,
                )
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def complete(doc: dict[str, Any]) -> dict[str, Any]:
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for operations in doc.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            body = responses.get("422", {}).get("content", {}).get("application/json", {})
            if body.get("schema", {}).get("$ref") == _FASTAPI_422:
                del responses["422"]
            parameters = [p for p in operation.get("parameters", []) if p["in"] in ("path", "query")]
            for parameter in parameters:
                parameter["schema"] = _not_null(parameter["schema"])
            nul_checked = [_refuse_nul(p["schema"]) for p in parameters]
            if any(nul_checked) and "422" not in responses:
                responses["422"] = error_responses(422)[422]
            if operation.get("security") and "429" not in responses:
                responses["429"] = error_responses(429)[429]
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    _, extra = models_json_schema(list(EXTRA_SCHEMAS), ref_template=REF_TEMPLATE)
    for name, schema in extra.get("$defs", {}).items():
        schemas.setdefault(name, schema)
    return doc


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    branches = schema.get("anyOf")
    if not isinstance(branches, list):
        return schema
    values = [b for b in branches if b != {"type": "null"}]
    if len(values) != 1 or len(values) == len(branches):
        return schema
    rest = {k: v for k, v in schema.items() if k != "anyOf"}
    return {**values[0], **rest}


def _refuse_nul(schema: dict[str, Any]) -> bool:
    """Add NO_NUL to the free-form string branches of a parameter's schema; whether there were any."""
    found = False
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "string" and "enum" not in branch and "pattern" not in branch:
            branch["pattern"] = NO_NUL
            found = True
    return found
