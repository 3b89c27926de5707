"""A small synchronous client of pcq's own HTTP API, for the CLI and the demo."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx


class ApiError(Exception):
    """The API refused a request; the message is its own error text."""

    def __init__(self, message: str, status: int = 0, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class PcqClient:
    def __init__(self, base_url: str, api_key: str, timeout: float = 60.0) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
        )

    def close(self) -> None:
        self._http.close()

    def _check(self, resp: httpx.Response) -> Any:
        if resp.status_code >= 400:
            try:
                body = resp.json()
                detail = f"{body.get('error')}: {body.get('detail')}"
            except ValueError:
                detail = resp.text[:300]
            retry_after = resp.headers.get("retry-after", "")
            raise ApiError(
                f"HTTP {resp.status_code} {detail}",
                status=resp.status_code,
                retry_after=float(retry_after) if retry_after.isdigit() else None,
            )
        return resp.json()

    def submit_batch_jsonl(self, data: bytes, idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Content-Type": "application/x-ndjson"}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        result: dict[str, Any] = self._check(self._http.post("/v1/batches", content=data, headers=headers))
        return result

    def batch(self, batch_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._check(self._http.get(f"/v1/batches/{batch_id}"))
        return result

    def citations(self, **filters: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        params: dict[str, str | int] = {**filters, "limit": 1000}
        while True:
            page = self._check(self._http.get("/v1/citations", params=params))
            rows.extend(page["data"])
            if not page["next_cursor"]:
                return rows
            params["cursor"] = page["next_cursor"]

    def results(self, batch_id: str) -> Iterator[str]:
        """The batch's export (``GET /v1/batches/{id}/results``), one JSON line at a time, as it
        streams. Lines are split at ``\n`` only: httpx's ``iter_lines`` (``str.splitlines``)
        would also split inside a JSON string holding U+2028, U+2029 or U+0085, which JSON
        leaves unescaped."""
        with self._http.stream("GET", f"/v1/batches/{batch_id}/results") as resp:
            if resp.status_code >= 400:
                resp.read()
                self._check(resp)
            rest = b""
            for chunk in resp.iter_bytes():
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    yield line.decode()
            if rest:
                yield rest.decode()

    @contextmanager
    def batch_events(self, batch_id: str, last_event_id: str | None = None) -> Iterator[httpx.Response]:
        """The batch's event stream (``GET /v1/batches/{id}/events``), resumed after
        ``last_event_id``; an error answer raises ApiError, a 204 is handed back as it is."""
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        with self._http.stream("GET", f"/v1/batches/{batch_id}/events", headers=headers) as resp:
            if resp.status_code >= 400:
                resp.read()
                self._check(resp)
            yield resp
