"""pcq.logs: the JSON and text formatters, the filter that adds bound ids, and the format chosen
by default. Fast: records go through a real handler into a StringIO."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pcq import logs
from pcq.settings import load_settings


@pytest.fixture
def capture() -> Iterator[Callable[[str], tuple[logging.Logger, io.StringIO]]]:
    """A logger of its own, its lines through pcq.logs' handler (as ``configure`` builds it)."""
    made: list[logging.Logger] = []

    def make(fmt: str) -> tuple[logging.Logger, io.StringIO]:
        out = io.StringIO()
        handler = logging.StreamHandler(out)
        handler.setFormatter(logs.JsonFormatter() if fmt == "json" else logs.TextFormatter())
        handler.addFilter(logs.ContextFilter())
        logger = logging.getLogger(f"pcq.test.{fmt}.{len(made)}")
        logger.handlers = [handler]
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        made.append(logger)
        return logger, out

    yield make
    for logger in made:
        logger.handlers = []


def in_context(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a context of its own, as a request's or job's task does."""
    return contextvars.copy_context().run(fn)


def test_a_json_line_has_the_base_fields_the_bound_ids_and_extras(capture: Any) -> None:
    logger, out = capture("json")

    def run() -> None:
        logs.bind(request_id="r-1", tenant="ten_a", job_id="job_1", attempt=2)
        logger.info("upstream call done: %s", "ok", extra={"status_code": 200, "latency_ms": 31})

    in_context(run)
    (line,) = out.getvalue().splitlines()
    event = json.loads(line)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["ts"])
    assert event == {
        "ts": event["ts"],
        "level": "INFO",
        "logger": logger.name,
        "msg": "upstream call done: ok",
        "request_id": "r-1",
        "tenant": "ten_a",
        "job_id": "job_1",
        "attempt": 2,
        "status_code": 200,
        "latency_ms": 31,
    }


def test_bound_ids_stay_in_their_context(capture: Any) -> None:
    logger, out = capture("json")
    in_context(lambda: logs.bind(job_id="job_elsewhere"))
    logger.info("outside")
    assert "job_id" not in json.loads(out.getvalue())


def test_an_extra_id_wins_over_the_bound_one_and_none_unbinds(capture: Any) -> None:
    logger, out = capture("json")

    def run() -> None:
        logs.bind(job_id="job_last", batch_id="bat_1")
        logger.error("refused", extra={"job_id": "job_this"})  # a writer's line about one job
        logs.bind(batch_id=None)
        logger.info("after")

    in_context(run)
    first, second = (json.loads(x) for x in out.getvalue().splitlines())
    assert (first["job_id"], first["batch_id"]) == ("job_this", "bat_1")
    assert second["job_id"] == "job_last"
    assert "batch_id" not in second


def test_an_exception_is_one_string_field_on_one_line(capture: Any) -> None:
    logger, out = capture("json")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["level"] == "ERROR"
    assert event["exc_info"].startswith("Traceback")
    assert "ValueError: boom" in event["exc_info"]


def test_odd_values_still_make_json(capture: Any) -> None:
    logger, out = capture("json")
    logger.info("odd", extra={"big": 2**70, "obj": object(), "color_message": "\x1b[1mx\x1b[0m"})
    event = json.loads(out.getvalue())
    assert event["big"] == str(2**70)
    assert event["obj"].startswith("<object")
    assert "color_message" not in event  # uvicorn's coloured copy of the message


def test_a_text_line_shows_the_bound_ids(capture: Any) -> None:
    logger, out = capture("text")

    def run() -> None:
        logs.bind(request_id="r-9", job_id="job_9", attempt=1)
        logger.warning("stored", extra={"citations": 3})

    in_context(run)
    line = out.getvalue().rstrip("\n")
    assert re.fullmatch(
        rf"\S+Z WARNING {re.escape(logger.name)}: stored request_id=r-9 job_id=job_9 attempt=1 citations=3",
        line,
    )


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_default_format_is_text_at_a_terminal_and_json_elsewhere() -> None:
    assert logs.resolve_format(None, _Tty()) == "text"
    assert logs.resolve_format(None, io.StringIO()) == "json"
    assert logs.resolve_format("json", _Tty()) == "json"
    assert logs.resolve_format("text", io.StringIO()) == "text"


def test_configure_puts_one_handler_on_the_root_logger_and_leaves_the_others() -> None:
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    out = io.StringIO()
    try:
        assert logs.configure(None, "debug", out) == "json"
        assert logs.configure(None, "debug", out) == "json"  # again: still one of its own
        assert logs.current_format() == "json"
        assert [h for h in root.handlers if h.get_name() == logs.HANDLER_NAME] == root.handlers[-1:]
        assert root.handlers[:-1] == saved  # pytest's capture handlers stay
        assert root.level == logging.DEBUG
        logging.getLogger("uvicorn.access").info("GET / 200")
        assert json.loads(out.getvalue())["logger"] == "uvicorn.access"
        assert logs.configure("text", "nonsense", io.StringIO()) == "text"
        assert root.level == logging.INFO
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


def test_pcq_log_format_is_a_setting() -> None:
    assert load_settings({}).log_format is None
    assert load_settings({"PCQ_LOG_FORMAT": "text"}).log_format == "text"
    with pytest.raises(ValueError, match="PCQ_LOG_FORMAT"):
        load_settings({"PCQ_LOG_FORMAT": "xml"})
