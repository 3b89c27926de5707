"""A small synchronous client of pcq's own HTTP API, for the CLI and the demo."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx


class ApiError(Exception):
    """The API refused a request; the message is its own error text."""


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
            raise ApiError(f"HTTP {resp.status_code} {detail}")
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

    def wait(
        self,
        batch_id: str,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        poll: float = 0.5,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.batch(batch_id)
            if on_progress:
                on_progress(state)
            if state["done"]:
                return state
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} not done after {timeout} s")
            time.sleep(poll)
