"""Files uploaded through the OpenAI-compatible API (``POST /openai/v1/files``)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from pcq.models.base import Base, UTCDateTime, utcnow


class File(Base):
    """An uploaded batch input file, its bytes in the row (``bytea`` on PostgreSQL): every API
    process can read it, and deleting the tenant deletes it. The cost is the file's size in the
    database, once, beside the jobs it becomes (their requests are copied out of it)."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_tenant_id_id", "tenant_id", "id"),)

    id: Mapped[str] = mapped_column(String(48), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column("bytes", BigInteger)  # OpenAI's "bytes"
    content: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
