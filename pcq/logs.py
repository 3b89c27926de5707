"""Logs: one event per line through the stdlib ``logging``, as JSON or text, each line carrying
the ids of the request or job it is about.

Why the stdlib and one root handler: uvicorn, Celery and SQLAlchemy log through ``logging``, so
a single handler on the root logger (``configure``) gives their lines and ours the same shape;
uvicorn (``log_config=None``) and Celery (its ``setup_logging`` signal) are told to leave it in
place. Why contextvars: the API serves each request in its own asyncio task and the worker runs
each job in one, so ids bound there (``bind``) reach every line logged on that request's or
job's behalf, from any module, without passing them around; ``ContextFilter`` adds them to each
record (a field given with ``extra=`` wins, for a line about one job among many).

A line never holds a secret: callers log ids, hosts and classes of errors, never keys, headers,
bodies or full URLs (see the README's "Logs").
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, Literal, TextIO

import orjson

LogFormat = Literal["json", "text"]

# The ids bound where they are known (API request, worker job), in this order on text lines.
FIELDS = ("request_id", "tenant", "job_id", "batch_id", "attempt")

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_bound: ContextVar[Mapping[str, Any]] = ContextVar("pcq_log_fields")

# Loggers that say too much at INFO: one line per upstream request, or per migration plugin.
NOISY = ("httpx", "httpcore", "alembic.runtime.plugins")

# Attributes every LogRecord has: anything else on a record came from ``extra=`` or the filter.
# uvicorn's ``color_message`` is its message again, with terminal colour codes.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


def bind(**fields: Any) -> None:
    """Add ``fields`` to every line logged from now on in this context (this asyncio task, or
    this thread); a field given as None is removed. A task started later inherits them; one
    already running does not see them."""
    new = dict(_bound.get(_EMPTY))
    for name, value in fields.items():
        if value is None:
            new.pop(name, None)
        else:
            new[name] = value
    _bound.set(new)


def bound() -> Mapping[str, Any]:
    """The fields bound in this context."""
    return _bound.get(_EMPTY)


class ContextFilter(logging.Filter):
    """Puts the bound fields on each record that passes its handler, unless the record already
    has one by that name (``extra=``: a line about another job than the context's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _bound.get(_EMPTY)
        if fields:
            attrs = record.__dict__
            for name, value in fields.items():
                attrs.setdefault(name, value)
        return True


def extras(record: logging.LogRecord) -> dict[str, Any]:
    """The record's own fields: bound ids first (in FIELDS order), then any other ``extra=``."""
    attrs = record.__dict__
    out = {name: attrs[name] for name in FIELDS if name in attrs}
    for name, value in attrs.items():
        if name not in _STANDARD and name not in out:
            out[name] = value
    return out


def iso_utc(created: float) -> str:
    """``2026-11-30T12:00:00.123Z``: ISO-8601, UTC, milliseconds."""
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{millis:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, the bound ids and other
    fields, and ``exc_info`` (the traceback as one string) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in extras(record).items():
            event.setdefault(name, value)
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            event["exc_info"] = record.exc_text
        if record.stack_info:
            event["stack_info"] = self.formatStack(record.stack_info)
        try:
            return orjson.dumps(event, default=str).decode()
        except TypeError:  # an int beyond 64 bits, a dict with non-str keys: as text then
            return orjson.dumps({k: v if isinstance(v, str) else repr(v) for k, v in event.items()}).decode()


class TextFormatter(logging.Formatter):
    """``<ts> <LEVEL> <logger>: <msg> key=value ...``, the traceback on the lines below."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{iso_utc(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
        fields = extras(record)
        if fields:
            line += " " + " ".join(f"{name}={value}" for name, value in fields.items())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def resolve_format(fmt: LogFormat | None, stream: TextIO) -> LogFormat:
    """``fmt``, or by default text for a person at a terminal and JSON for anything else."""
    if fmt is not None:
        return fmt
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # a closed or odd stream
        return "json"


HANDLER_NAME = "pcq"  # the root handler configure() installs, and replaces on a second call


def configure(
    fmt: LogFormat | None = None, level: str | int = "INFO", stream: TextIO | None = None
) -> LogFormat:
    """Send every logger's lines, through the root logger, to ``stream`` (stderr) in ``fmt``
    (PCQ_LOG_FORMAT; None: ``resolve_format``) at ``level`` (PCQ_LOG_LEVEL; an unknown name is
    INFO). Replaces the handler an earlier call installed; any other (a test runner's capture)
    stays. Returns the format chosen."""
    stream = stream if stream is not None else sys.stderr
    chosen = resolve_format(fmt, stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    handler.set_name(HANDLER_NAME)
    root = logging.getLogger()
    for old in root.handlers[:]:
        if old.get_name() == HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    try:
        root.setLevel(level.upper() if isinstance(level, str) else level)
    except ValueError:
        root.setLevel(logging.INFO)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.captureWarnings(True)  # a warning is a line like the others, not raw stderr text
    return chosen


def current_format() -> LogFormat | None:
    """The format of the root logger's handler, if ``configure`` installed it."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, JsonFormatter):
            return "json"
        if isinstance(handler.formatter, TextFormatter):
            return "text"
    return None
