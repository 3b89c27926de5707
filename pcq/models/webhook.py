"""Webhook signing secrets: one row per secret a tenant has had, while it may still sign.

A tenant's *current* secret has ``retired_at`` NULL; a partial unique index allows one per
tenant, so two first uses at once cannot both create one (pcq.repositories.webhooks inserts
with ON CONFLICT DO NOTHING and reads back the winner). Rotating sets the current one's
``retired_at`` to the end of its grace period and inserts the new current one: until then both
sign. A row whose ``retired_at`` has passed signs nothing, and the next rotation deletes it.

One row per secret, rather than two columns (current, previous) on the tenant: a rotation
during another's grace period keeps both earlier secrets signing until their own ends, and the
concurrency rule is one index instead of row locks on ``tenants``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, text
from sqlalchemy.orm import Mapped, mapped_column

from pcq.models.base import Base, UTCDateTime, utcnow

_CURRENT = text("retired_at IS NULL")


class WebhookSecret(Base):
    __tablename__ = "webhook_secrets"
    __table_args__ = (
        # At most one current secret per tenant (SQLite and PostgreSQL both index a WHERE).
        Index(
            "uq_webhook_secrets_tenant_current",
            "tenant_id",
            unique=True,
            sqlite_where=_CURRENT,
            postgresql_where=_CURRENT,
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    # "whsec_" + base64 of 32 bytes (50 characters). Kept in clear: signing needs the key itself.
    secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # When it stops signing: NULL while current, the end of its grace period once rotated out.
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
