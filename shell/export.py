"""``pcq export BATCH_ID``: a batch's results as JSONL, CSV or Parquet, in one flat schema.

One row per job, the same columns in every format (README, "Exporting results"):

    custom_id, job_id, status, content, parsed, model, finish_reason, usage,
    prompt_tokens, completion_tokens, total_tokens, citation_count, error_code, error,
    reused_from

(``reused_from``: the job whose call made a reused answer, empty for one the job's own call made)

and, with ``--citations FILE``, one row per citation in a second file of the same format:

    job_id, custom_id, field, field_position, position, url, domain, title, excerpts,
    reasoning, confidence

Nested values (``parsed``, ``usage``, ``excerpts``) stay JSON values in JSONL and are compact
JSON text in CSV and Parquet: ``parsed`` has the shape of each request's own schema, so no
fixed column type can hold it, and one rule for every nested value is simpler to load than
a mix. ``usage`` is also split into three integer columns, because token counts are what
people sum, and a spreadsheet or SQL should not need a JSON parser for that.

One pass over the API's stream (``GET /v1/batches/{id}/results``): each line becomes its rows,
written at once (Parquet: buffered into row groups of ROW_GROUP rows), so memory stays flat
whatever the batch's size. Files are written as ``FILE.part`` and renamed when the export is
complete: a file that exists is whole. The export fails (exit 1, no traceback) when the
stream ends before the batch's every job was written.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import httpx
import orjson

from pcq.wire import url_domain
from shell.client import PcqClient
from shell.progress import export_bar

Kind = Literal["text", "int", "json"]
FORMATS = ("jsonl", "csv", "parquet")
ROW_GROUP = 4096  # Parquet rows buffered per row group (~20 MB of answers with 12 citations each)
PARQUET_MISSING = "pcq: --format parquet needs pyarrow; install it with: pip install 'pcq[parquet]'"


@dataclass(frozen=True)
class Column:
    name: str
    kind: Kind


JOB_COLUMNS = (
    Column("custom_id", "text"),
    Column("job_id", "text"),
    Column("status", "text"),
    Column("content", "text"),
    Column("parsed", "json"),
    Column("model", "text"),
    Column("finish_reason", "text"),
    Column("usage", "json"),
    Column("prompt_tokens", "int"),
    Column("completion_tokens", "int"),
    Column("total_tokens", "int"),
    Column("citation_count", "int"),
    Column("error_code", "text"),
    Column("error", "text"),
    Column("reused_from", "text"),
)
CITATION_COLUMNS = (
    Column("job_id", "text"),
    Column("custom_id", "text"),
    Column("field", "text"),
    Column("field_position", "int"),
    Column("position", "int"),
    Column("url", "text"),
    Column("domain", "text"),
    Column("title", "text"),
    Column("excerpts", "json"),
    Column("reasoning", "text"),
    Column("confidence", "text"),
)


def job_row(line: dict[str, Any]) -> dict[str, Any]:
    """The row of one export line (an ExportLine of the API)."""
    result = line.get("result") or {}
    usage = result.get("usage")
    return {
        "custom_id": line["custom_id"],
        "job_id": line["job_id"],
        "status": line["status"],
        "content": result.get("content"),
        "parsed": result.get("parsed"),
        "model": result.get("model"),
        "finish_reason": result.get("finish_reason"),
        "usage": usage,
        "prompt_tokens": usage.get("prompt_tokens") if usage else None,
        "completion_tokens": usage.get("completion_tokens") if usage else None,
        "total_tokens": usage.get("total_tokens") if usage else None,
        "citation_count": sum(len(b["citations"]) for b in result.get("basis") or []),
        "error_code": line.get("error_code"),
        "error": line.get("error"),
        "reused_from": result.get("reused_from"),
    }


@lru_cache(maxsize=4096)
def _domain_of_prefix(prefix: str) -> str | None:
    return url_domain(prefix)


def citation_domain(url: str) -> str | None:
    """``pcq.wire.url_domain(url)``, as the API filters citations by it, cached by the URL's
    ``scheme://host`` part (a few sites make most citations; parsing each URL whole was a
    third of a CSV export's time). The host ends at the first ``/``, ``?`` or ``#`` after
    ``//``, so that prefix has the URL's own host."""
    start = url.find("//")
    if start < 0:
        return url_domain(url)
    ends = [i for i in (url.find(c, start + 2) for c in "/?#") if i >= 0]
    return _domain_of_prefix(url[: min(ends)] if ends else url)


def citation_rows(line: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The citation rows of one export line: each basis field's citations, in order."""
    for field_position, basis in enumerate((line.get("result") or {}).get("basis") or []):
        for position, cite in enumerate(basis["citations"]):
            yield {
                "job_id": line["job_id"],
                "custom_id": line["custom_id"],
                "field": basis["field"],
                "field_position": field_position,
                "position": position,
                "url": cite["url"],
                "domain": citation_domain(cite["url"]),
                "title": cite["title"],
                "excerpts": cite["excerpts"],
                "reasoning": basis["reasoning"],
                "confidence": basis["confidence"],
            }


# --- writers: one per format, the same columns


class RowWriter(Protocol):
    def write(self, row: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def _json_text(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


class JsonlWriter:
    def __init__(self, out: IO[bytes], columns: tuple[Column, ...], *, owned: bool) -> None:
        self.out, self.owned, self.names = out, owned, [c.name for c in columns]

    def write(self, row: dict[str, Any]) -> None:
        self.out.write(orjson.dumps({n: row[n] for n in self.names}, option=orjson.OPT_APPEND_NEWLINE))

    def close(self) -> None:
        self.out.close() if self.owned else self.out.flush()


# A cell starting with one of these is a formula to a spreadsheet (`=HYPERLINK(...)` as a
# custom_id would be a live link); OWASP's advice is to prefix such a cell with a quote.
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: Any) -> Any:
    """A cell as a spreadsheet will show it, never run it: text starting with ``=``, ``+``,
    ``-``, ``@``, tab or carriage return gains a leading ``'``. Numbers and empty cells are
    left as they are (a number is never a formula)."""
    if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
        return value
    text = str(value)
    return "'" + text if text.startswith(FORMULA_TRIGGERS) else text


class CsvWriter:
    """A header line, then one line per row; every text cell through ``csv_safe``; nested
    values as JSON text; None as an empty cell."""

    def __init__(self, out: IO[str], columns: tuple[Column, ...], *, owned: bool) -> None:
        self.out, self.owned, self.columns = out, owned, columns
        self.csv = csv.writer(out)
        self.csv.writerow([c.name for c in columns])

    def write(self, row: dict[str, Any]) -> None:
        cells = [_json_text(row[c.name]) if c.kind == "json" else row[c.name] for c in self.columns]
        # csv_safe, inlined for text (most cells: a call each was a third of the time)
        self.csv.writerow(
            [
                ("'" + v if v.startswith(FORMULA_TRIGGERS) else v) if type(v) is str else csv_safe(v)
                for v in cells
            ]
        )

    def close(self) -> None:
        self.out.close() if self.owned else self.out.flush()


class ParquetWriter:
    """Row groups of ROW_GROUP rows through pyarrow's ParquetWriter (zstd); text and JSON text
    columns are strings, int columns int64, every column nullable."""

    def __init__(self, path: Path, columns: tuple[Column, ...]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa, self.columns = pa, columns
        self.schema = pa.schema([(c.name, pa.int64() if c.kind == "int" else pa.string()) for c in columns])
        self.writer = pq.ParquetWriter(str(path), self.schema, compression="zstd")
        self.buffer: dict[str, list[Any]] = {c.name: [] for c in columns}
        self.rows = 0

    def write(self, row: dict[str, Any]) -> None:
        for c in self.columns:
            self.buffer[c.name].append(_json_text(row[c.name]) if c.kind == "json" else row[c.name])
        self.rows += 1
        if self.rows >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            self.writer.write_table(self.pa.Table.from_pydict(self.buffer, schema=self.schema))
            self.buffer = {c.name: [] for c in self.columns}
            self.rows = 0

    def close(self) -> None:
        self._flush()
        self.writer.close()


def check_format(fmt: str, output: str | None) -> None:
    """Refuse, before any request, what cannot be written: Parquet without pyarrow or to stdout."""
    if fmt != "parquet":
        return
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise SystemExit(PARQUET_MISSING) from None
    if output is None:
        raise SystemExit("pcq: --format parquet writes a file: give it with -o FILE")


def _open(path: Path, fmt: str, columns: tuple[Column, ...]) -> RowWriter:
    if fmt == "parquet":
        return ParquetWriter(path, columns)
    if fmt == "csv":
        return CsvWriter(path.open("w", newline="", encoding="utf-8"), columns, owned=True)
    return JsonlWriter(path.open("wb"), columns, owned=True)


@contextmanager
def _target(path: str | None, fmt: str, columns: tuple[Column, ...]) -> Iterator[RowWriter]:
    """A writer to ``path`` (stdout when None), written as ``path.part`` and renamed into place
    only if the block completes (else removed)."""
    if path is None:
        writer: RowWriter = (
            JsonlWriter(sys.stdout.buffer, columns, owned=False)
            if fmt == "jsonl"
            else CsvWriter(sys.stdout, columns, owned=False)
        )
        yield writer
        writer.close()
        return
    final = Path(path)
    part = final.with_name(final.name + ".part")
    try:
        writer = _open(part, fmt, columns)
    except OSError as exc:
        raise SystemExit(f"pcq: cannot write {final}: {exc.strerror or exc}") from None
    complete = False
    try:
        yield writer
        complete = True
    finally:
        writer.close()
        if complete:
            os.replace(part, final)
        else:
            part.unlink(missing_ok=True)


def export_batch(
    client: PcqClient, batch_id: str, *, fmt: str, output: str | None, citations: str | None
) -> int:
    """Write the batch's rows (and citation rows) in ``fmt``; 0 once every job is written."""
    total = int(client.batch(batch_id)["total"])  # an unknown batch or a bad key stops here
    written = 0
    try:
        with ExitStack() as stack:
            rows = stack.enter_context(_target(output, fmt, JOB_COLUMNS))
            cites = stack.enter_context(_target(citations, fmt, CITATION_COLUMNS)) if citations else None
            bar = stack.enter_context(export_bar(total, batch_id))
            for text in client.results(batch_id):
                if not text:
                    continue
                line = orjson.loads(text)
                rows.write(job_row(line))
                if cites is not None:
                    for cite in citation_rows(line):
                        cites.write(cite)
                written += 1
                bar.update(1)
            if written != total:
                raise _cut_short(written, total, output, "it ended")
    except httpx.TransportError as exc:  # the API went away mid-stream (or the network did)
        raise _cut_short(written, total, output, f"it broke off: {type(exc).__name__}") from None
    except OSError as exc:  # a full disk, a closed pipe
        raise SystemExit(f"pcq: cannot write the export: {exc.strerror or exc}") from None
    return 0


def _cut_short(written: int, total: int, output: str | None, how: str) -> SystemExit:
    kept = "the output is incomplete" if output is None else "no file was written"
    return SystemExit(f"pcq: the export stream stopped after {written} of {total} jobs ({how}); {kept}")
