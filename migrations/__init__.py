"""Alembic migrations (``pcq migrate``, run by ``migrations.migrate``), and the type comparison
they and the tests share. This package imports the core (``pcq``); the core never imports it."""

from __future__ import annotations

from typing import Any


def compare_type(
    context: object,  # noqa: ARG001  (signature fixed by Alembic)
    inspected_column: object,  # noqa: ARG001
    metadata_column: object,  # noqa: ARG001
    inspected_type: object,
    metadata_type: object,
) -> bool | None:
    """Alembic's type comparison, except that SQLite's JSON and TEXT columns are the same.

    Revision 0003 turned three jsonb columns into text on PostgreSQL. On SQLite a JSON column
    already stores text (TEXT affinity); only its declared name differs, and renaming it would
    mean rebuilding the jobs table, which with foreign keys on cascades into every child row.
    """
    from sqlalchemy import JSON, Text

    if isinstance(inspected_type, JSON) and isinstance(metadata_type, Text):
        return False
    return None  # the default comparison


def include_object_on(dialect: str) -> Any:
    """Alembic's ``include_object`` for a database of this dialect: leaves out an index the
    models build on another dialect only (``Index.ddl_if(dialect=...)``), which autogenerate
    would otherwise ask to add."""

    def include_object(
        obj: object,
        name: str | None,  # noqa: ARG001  (signature fixed by Alembic)
        type_: str,
        reflected: bool,  # noqa: ARG001
        compare_to: object,  # noqa: ARG001
    ) -> bool:
        only_on = getattr(getattr(obj, "_ddl_if", None), "dialect", None)
        return type_ != "index" or only_on is None or only_on == dialect

    return include_object
