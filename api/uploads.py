"""Batch uploads that cannot hold the API's resources while a client sends them.

A batch body is received whole before anything else happens: it is hashed and spooled to a
temporary file (in memory up to ``SPOOL_IN_MEMORY`` bytes, then on disk), and only then parsed, in a
thread, and stored. So a slow or stalled client holds a socket, a slot and some disk, never a
database connection, a transaction or the event loop:

- authentication uses its own short session, closed before the body is read (api.deps);
- the body must arrive within ``PCQ_UPLOAD_TIMEOUT_SECONDS`` of its first read, or the client
  gets ``408`` and its connection is closed (api.errors.BodyLimit, for every request body);
- ``UploadSlots`` caps the uploads in progress per tenant (``PCQ_MAX_UPLOADS_PER_TENANT``) and in
  total (``PCQ_MAX_UPLOADS``); beyond them ``429`` with ``Retry-After``. The count is kept per API
  process: N processes admit N times as many.
"""

from __future__ import annotations

import hashlib
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

from starlette.concurrency import run_in_threadpool

from pcq.jobs.errors import TooManyUploads

SPOOL_IN_MEMORY = 1024 * 1024  # a body up to this size never touches the disk
WRITE_EVERY = 1024 * 1024  # received bytes are hashed and written in a thread, this many at a time
RETRY_AFTER_SECONDS = 5


class UploadSlots:
    """Counts the uploads in progress of each tenant and of all; ``hold`` raises TooManyUploads."""

    def __init__(self, per_tenant: int, total: int) -> None:
        self.per_tenant = per_tenant
        self.total = total
        self._by_tenant: dict[str, int] = {}
        self._in_use = 0
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, tenant_id: str) -> Iterator[None]:
        with self._lock:
            mine = self._by_tenant.get(tenant_id, 0)
            if mine >= self.per_tenant:
                raise TooManyUploads(
                    f"this tenant already has {mine} batch uploads in progress, the most allowed "
                    "(PCQ_MAX_UPLOADS_PER_TENANT); retry when one has finished",
                    retry_after=RETRY_AFTER_SECONDS,
                )
            if self._in_use >= self.total:
                raise TooManyUploads(
                    f"the API is receiving {self._in_use} batch uploads, the most it takes at once "
                    "(PCQ_MAX_UPLOADS); retry shortly",
                    retry_after=RETRY_AFTER_SECONDS,
                )
            self._by_tenant[tenant_id] = mine + 1
            self._in_use += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_use -= 1
                left = self._by_tenant[tenant_id] - 1
                if left:
                    self._by_tenant[tenant_id] = left
                else:
                    del self._by_tenant[tenant_id]

    def in_use(self, tenant_id: str | None = None) -> int:
        with self._lock:
            return self._in_use if tenant_id is None else self._by_tenant.get(tenant_id, 0)


@dataclass
class Spooled:
    """A received body: its bytes in ``file`` (positioned at the start), their size and sha256."""

    file: IO[bytes]
    size: int
    sha256: str

    def close(self) -> None:
        self.file.close()


async def spool(chunks: AsyncIterator[bytes]) -> Spooled:
    """Receive a whole body into a temporary file. The event loop only collects chunks; hashing
    and writing run in a thread, ``WRITE_EVERY`` bytes at a time."""
    file: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115
    hasher = hashlib.sha256()
    size = 0
    pending: list[bytes] = []
    pending_bytes = 0

    def write(parts: list[bytes]) -> None:
        for part in parts:
            hasher.update(part)
            file.write(part)

    try:
        async for chunk in chunks:
            if not chunk:
                continue
            pending.append(chunk)
            pending_bytes += len(chunk)
            size += len(chunk)
            if pending_bytes >= WRITE_EVERY:
                await run_in_threadpool(write, pending)
                pending, pending_bytes = [], 0
        await run_in_threadpool(write, pending)
        file.seek(0)
    except BaseException:
        file.close()
        raise
    return Spooled(file, size, hasher.hexdigest())
