"""Tenants and their API keys (stored as prefix + hash, never in clear)."""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import Date, Float, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from pcq.models.base import Base, UTCDateTime, utcnow


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # Its share of the upstream quota against other tenants with work waiting (pcq.jobs.dispatch).
    weight: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # The largest fraction of the quota it may use, even when every other tenant is idle.
    max_share: Mapped[float] = mapped_column(Float, default=1.0, server_default="1")
    # USD per calendar month (UTC); no call starts that could take the month's spend past it.
    monthly_budget: Mapped[float | None] = mapped_column(Float, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    # The public part of the key, used to find the row; the secret part is only hashed.
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    # None: never expires (``pcq keys create --expires-in``).
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    # When a request last authenticated with it (written at most once a minute per key).
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)


class TenantSpend(Base):
    """What a tenant's calls were billed in one calendar month (UTC), added to as attempts are
    stored (pcq/costs.py): ``pcq tenants list`` and the monthly budget's check read one row,
    not the month's attempts."""

    __tablename__ = "tenant_spend"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    month: Mapped[date] = mapped_column(Date, primary_key=True)  # its first day
    spent: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
