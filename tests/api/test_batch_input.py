"""api/batch_input.py: batch bodies read as streams, JSON request by request and JSONL line by
line, with every request kept as the exact text submitted, whatever the read size."""

from __future__ import annotations

import io
import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import api.batch_input as batch_input
from api.batch_input import JsonBatch, JsonlBatch
from api.intake import NewJob
from api.verbatim import MAX_DEPTH
from pcq.jobs.errors import InvalidInput, PcqError, TooLarge

REQ = {
    "model": "lite",
    "messages": [{"role": "user", "content": 'a "[{" \\ é \u2028 ]}'}],
    "x": [1.0, {"k": []}],
}
REQ_TEXT = json.dumps(REQ)


def read_json(
    raw: bytes, max_lines: int = 100, max_item_bytes: int = 1 << 20
) -> tuple[list[NewJob], JsonBatch]:
    reader = JsonBatch(io.BytesIO(raw), max_lines, max_item_bytes)
    return list(reader.jobs()), reader


def read_jsonl(raw: bytes, max_lines: int = 100, max_line_bytes: int = 1 << 20) -> list[NewJob]:
    return list(JsonlBatch(io.BytesIO(raw), max_lines, max_line_bytes).jobs())


@pytest.fixture(params=[1, 2, 7, 1 << 20], ids=lambda n: f"read{n}")
def read_size(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run with reads of 1, 2, 7 bytes and 1 MiB: every token is cut somewhere."""
    monkeypatch.setattr(batch_input, "READ_SIZE", request.param)
    size: int = request.param
    return size


def test_a_json_batch_keeps_each_request_as_sent_and_its_own_members(read_size: int) -> None:
    items = [
        '{"custom_id": "a", "body": ' + REQ_TEXT + ', "metadata": {"z": 1, "a": [2.50]}}',
        '{ "body" :\n' + json.dumps(REQ, indent=2, ensure_ascii=False) + ' ,"custom_id":"b"}',
    ]
    raw = ' \n{ "metadata" : {"b": 1, "a": 1.0} , "requests" : [ ' + " ,\r\n".join(items) + " ] ,"
    raw += '"webhook_url": "https://hooks.example.com/x" }\n'
    jobs, reader = read_json(raw.encode())
    assert [j.custom_id for j in jobs] == ["a", "b"]
    assert jobs[0].request_json == REQ_TEXT
    assert jobs[1].request_json == json.dumps(REQ, indent=2, ensure_ascii=False)
    assert jobs[0].metadata_json == '{"z": 1, "a": [2.50]}'
    assert reader.metadata_json == '{"b": 1, "a": 1.0}'  # read after... and before its requests
    assert reader.webhook_url == "https://hooks.example.com/x"
    assert reader.count == 2


def test_jsonl_keeps_each_request_as_sent(read_size: int) -> None:
    raw = (
        '{"custom_id": "a", "body": ' + REQ_TEXT + "}\r\n\n" + '{"custom_id": "b", "body": ' + REQ_TEXT + "}"
    ).encode()
    assert [(j.custom_id, j.request_json) for j in read_jsonl(raw)] == [("a", REQ_TEXT), ("b", REQ_TEXT)]


# Arbitrary (valid) batches, written with arbitrary blanks and formatting, read back exactly.
blank = st.sampled_from(["", " ", "\n", "\r\n\t ", "  \n  "])
texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
requests = st.builds(
    lambda content, extra, indent, ascii_: json.dumps(
        {"model": "speed", "messages": [{"role": "user", "content": content}], "extra": extra},
        indent=indent,
        ensure_ascii=ascii_,
    ),
    texts,
    st.recursive(st.none() | st.integers() | texts, lambda inner: st.lists(inner, max_size=3), max_leaves=6),
    st.sampled_from([None, 0, 2]),
    st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(
    bodies=st.lists(requests, min_size=1, max_size=5),
    gaps=st.lists(blank, min_size=12, max_size=12),
    read=st.sampled_from([1, 3, 64, 1 << 20]),
    metadata_first=st.booleans(),
)
def test_any_json_batch_reads_back_exactly(
    bodies: list[str], gaps: list[str], read: int, metadata_first: bool
) -> None:
    g = iter(gaps * 10)
    items = [
        "{"
        + next(g)
        + f'"custom_id"{next(g)}:{next(g)}"c{i}"{next(g)},{next(g)}"body":{next(g)}{b}{next(g)}}}'
        for i, b in enumerate(bodies)
    ]
    requests_member = f'"requests"{next(g)}:{next(g)}[{next(g)}' + f"{next(g)},{next(g)}".join(items) + "]"
    metadata_member = f'"metadata"{next(g)}:{next(g)}{{"k"{next(g)}:{next(g)}"v"}}'
    members = [metadata_member, requests_member] if metadata_first else [requests_member, metadata_member]
    raw = next(g) + "{" + next(g) + f"{next(g)},{next(g)}".join(members) + next(g) + "}" + next(g)
    original = batch_input.READ_SIZE
    batch_input.READ_SIZE = read
    try:
        jobs, reader = read_json(raw.encode())
    finally:
        batch_input.READ_SIZE = original
    assert [j.request_json for j in jobs] == bodies
    assert [j.custom_id for j in jobs] == [f"c{i}" for i in range(len(bodies))]
    assert json.loads(reader.metadata_json or "null") == {"k": "v"}


ONE = '{"custom_id": "a", "body": ' + REQ_TEXT + "}"
DEEP = '{"k":' * (MAX_DEPTH + 5) + "1" + "}" * (MAX_DEPTH + 5)


@pytest.mark.parametrize(
    ("raw", "status", "says"),
    [
        ("", 422, "body: not a JSON object"),
        ("[]", 422, "body: not a JSON object"),
        ("{}", 422, "body: requests: Field required"),
        ('{"requests": []}', 422, "body: requests: List should have at least 1 item"),
        ('{"requests": "x"}', 422, "body: requests: Input should be a valid list"),
        ('{"requests": [1]}', 422, "requests[0]: not a JSON object"),
        ('{"requests": [' + ONE + ",]}", 422, "requests[1]: not valid JSON (expected a value"),
        (
            '{"requests": [' + ONE + '], "requests": [' + ONE + "]}",
            422,
            "body: requests: given more than once",
        ),
        ('{"requests": [' + ONE + '], "surprise": 1}', 422, "body: surprise: Extra inputs are not permitted"),
        ('{"requests": [' + ONE + "]} x", 422, "body: not valid JSON (extra data"),
        ('{"requests": [' + ONE, 422, "body: requests: not valid JSON"),
        ('{"requests": [' + ONE + '], "metadata": NaN}', 422, "NaN is not valid JSON"),
        ('{"requests": [' + ONE + '], "metadata": ' + DEEP + "}", 422, "body: metadata: nested more than 64"),
        (
            '{"requests": [' + ONE[:-1] + ', "metadata": ' + DEEP + "}]}",
            422,
            "requests[0]: metadata: nested more",
        ),
        (
            '{"requests": [{"custom_id": "a", "body": ' + DEEP + "}]}",
            422,
            "requests[0]: body: nested more than",
        ),
        (
            '{"requests": [' + ONE + "," + ONE + "]}",
            422,
            "requests[1]: custom_id 'a' already used by requests[0]",
        ),
        ('{"requests": [' + ONE.replace('"a"', '"\\ud800"') + "]}", 422, "requests[0]: custom_id"),
        (
            '{"requests": [' + ",".join(ONE.replace('"a"', f'"c{i}"') for i in range(4)) + "]}",
            413,
            "at most 3",
        ),
        (
            '{"requests": [' + ONE + "], " + '"metadata": "' + "x" * 5000 + '"}',
            413,
            "body: metadata is longer",
        ),
    ],
)
def test_a_bad_json_batch_is_refused_naming_what_and_where(
    read_size: int, raw: str, status: int, says: str
) -> None:
    with pytest.raises(PcqError) as caught:
        read_json(raw.encode(), max_lines=3, max_item_bytes=4096)
    assert caught.value.http_status == status
    assert says in caught.value.detail


def test_a_json_request_over_the_request_limit_is_413_naming_it(read_size: int) -> None:
    big = '{"custom_id": "b", "body": {"model": "lite", "messages": [{"role": "user", "content": "'
    big += "x" * 5000 + '"}]}}'
    with pytest.raises(TooLarge, match=r"requests\[1\] is longer than 4096 bytes \(PCQ_MAX_REQUEST_BYTES\)"):
        read_json(('{"requests": [' + ONE + "," + big + "]}").encode(), max_item_bytes=4096)


def test_a_request_as_bytes_not_utf8_is_named() -> None:
    with pytest.raises(InvalidInput, match=r"requests\[0\]: not valid UTF-8"):
        read_json(b'{"requests": [{"custom_id": "\xff", "body": {}}]}')


def test_blank_lines_count_toward_the_line_cap() -> None:
    with pytest.raises(TooLarge, match="at most 3 lines"):
        read_jsonl(b"\n\n\n" + ONE.encode() + b"\n", max_lines=3)
    assert len(read_jsonl(b"\n\n" + ONE.encode() + b"\n", max_lines=3)) == 1  # the final newline ends a line


def test_a_body_of_blank_lines_is_refused() -> None:
    with pytest.raises(InvalidInput, match="no requests"):
        read_jsonl(b"\n \n\r\n\t\n", max_lines=100)


def test_twenty_megabytes_of_newlines_are_refused_at_once() -> None:
    t0 = time.perf_counter()
    with pytest.raises(TooLarge, match="at most 100000 lines"):
        read_jsonl(b"\n" * 20_000_000, max_lines=100_000)
    assert time.perf_counter() - t0 < 2.0  # it stops at the cap; it was 6.5 s of the event loop


def test_a_jsonl_line_nested_too_deep_is_refused_naming_its_field() -> None:
    with pytest.raises(InvalidInput, match="line 2: metadata: nested more than 64 levels deep"):
        read_jsonl((ONE + "\n" + ONE[:-1].replace('"a"', '"b"') + ', "metadata": ' + DEEP + "}\n").encode())
