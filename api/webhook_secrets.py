"""The tenant's webhook signing secret: read it (created on first use) or rotate it.

Each in one unit of work (a first read writes the secret it creates). The rules of secrets,
their grace period and concurrent first uses are pcq.repositories.webhooks'; this module only
names the transaction and the clock. The secrets are answered to their tenant, never logged.
"""

from __future__ import annotations

from pcq.db import SessionFactory, unit_of_work
from pcq.models import utcnow
from pcq.repositories import webhooks as webhook_rows


def current(sessions: SessionFactory, tenant_id: str) -> str:
    """The tenant's current secret, created now if it has none."""
    with unit_of_work(sessions) as session:
        return webhook_rows.current_secret(session, tenant_id, now=utcnow())


def rotate(sessions: SessionFactory, tenant_id: str, *, grace_seconds: float) -> str:
    """A new current secret; the one it replaces keeps signing for ``grace_seconds``."""
    with unit_of_work(sessions) as session:
        return webhook_rows.rotate_secret(session, tenant_id, now=utcnow(), grace_seconds=grace_seconds)
