"""Declarative base, naming convention and the column types every table shares."""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Integer, MetaData, TypeDecorator
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# JSONB on PostgreSQL (indexable, compact), plain JSON text elsewhere.
JSONType = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments INTEGER PRIMARY KEY columns.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored as UTC and always returned timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:  # noqa: ARG002  (signature fixed by SQLAlchemy)
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def utcnow() -> datetime:
    return datetime.now(UTC)


_id_lock = threading.Lock()
_id_state = {"ms": 0, "seq": 0}


def new_id(prefix: str) -> str:
    """A sortable id: milliseconds, a per-process sequence, 48 random bits.

    ``ORDER BY id`` is creation order within a process (a batch's jobs export in the order
    they were submitted) and close to it across processes; the random tail keeps ids from
    different processes apart.
    """
    with _id_lock:
        ms = int(time.time() * 1000)
        if ms > _id_state["ms"]:
            _id_state["ms"], _id_state["seq"] = ms, 0
        else:
            _id_state["seq"] += 1
            if _id_state["seq"] > 0xFFFF:  # more than 65,536 ids in one ms: borrow the next ms
                _id_state["ms"], _id_state["seq"] = _id_state["ms"] + 1, 0
        ms, seq = _id_state["ms"], _id_state["seq"]
    return f"{prefix}_{ms:012x}{seq:04x}{os.urandom(6).hex()}"
