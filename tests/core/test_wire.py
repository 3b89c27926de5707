"""Reading upstream answers: every legal shape, nothing invented, truncation detected."""

from __future__ import annotations

import json

import pytest

from pcq.wire import MalformedResponse, StreamAssembler, iter_sse_data, parse_completion

BASIS = [
    {
        "field": "output",
        "reasoning": "r",
        "confidence": "high",
        "citations": [
            {"url": "https://a.example/x", "title": None, "excerpts": None},
            {"url": "https://b.example/y"},
        ],
    }
]


def body(**over: object) -> str:
    base = {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": "lite",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        "basis": BASIS,
    }
    base.update(over)
    return json.dumps(base)


def test_content_from_message() -> None:
    assert parse_completion(body(), None).content == "hi"


def test_content_from_delta_when_no_message() -> None:
    raw = body(choices=[{"index": 0, "delta": {"content": "from delta"}, "finish_reason": "stop"}])
    assert parse_completion(raw, None).content == "from delta"


def test_null_and_missing_usage_and_unknown_keys_are_fine() -> None:
    assert parse_completion(body(usage=None, interaction_id="x"), None).usage is None
    raw = json.loads(body())
    del raw["usage"], raw["basis"]
    parsed = parse_completion(json.dumps(raw), None)
    assert parsed.usage is None
    assert parsed.basis == []


def test_raw_body_is_kept_verbatim() -> None:
    raw = body(extra={"nested": [1, 2]})
    assert parse_completion(raw, None).raw_body == raw


def test_citations_and_domains() -> None:
    basis = parse_completion(body(), None).basis
    assert [c.domain for c in basis[0].citations] == ["a.example", "b.example"]
    assert basis[0].citations[0].title is None


def test_json_schema_content_is_parsed() -> None:
    raw = body(choices=[{"index": 0, "message": {"content": '{"a": 1}'}, "finish_reason": "stop"}])
    assert parse_completion(raw, {"type": "json_schema", "json_schema": {"name": "x"}}).parsed == {"a": 1}
    assert parse_completion(raw, None).parsed is None


@pytest.mark.parametrize(
    "raw", ["not json", "[]", json.dumps({"choices": []}), body(basis=[{"no": "field"}])]
)
def test_malformed_bodies_are_refused(raw: str) -> None:
    with pytest.raises(MalformedResponse):
        parse_completion(raw, None)


def sse(*chunks: object) -> str:
    return "".join(f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n" for c in chunks)


def chunk(content: str | None = None, finish: str | None = None, **extra: object) -> dict[str, object]:
    delta = {"content": content} if content is not None else {}
    return {
        "id": "s1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "core",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


def feed(text: str) -> StreamAssembler:
    a = StreamAssembler()
    for data in iter_sse_data(text):
        a.feed_data(data)
    return a


def test_stream_is_assembled_with_basis_from_any_chunk_once() -> None:
    a = feed(
        sse(
            chunk("Hel"),
            chunk("lo", basis=BASIS),
            chunk(None, "stop", basis=BASIS, usage={"total_tokens": 3}),
            "[DONE]",
        )
    )
    assert a.complete
    result = a.result("raw", None)
    assert result.content == "Hello"
    assert len(result.basis) == 1
    assert result.usage == {"total_tokens": 3}


def test_stream_without_done_or_finish_reason_is_incomplete() -> None:
    assert not feed(sse(chunk("Hel"), chunk("lo"))).complete


def test_stream_with_finish_reason_but_cut_before_done_is_complete() -> None:
    assert feed(sse(chunk("Hi", "stop"))).complete


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("not json", "body is not JSON"),
        ("[]", "body is not a JSON object"),
        (json.dumps({"choices": []}), "no choices"),
        (body(choices=[5, {"message": {"content": "hi"}}]), "no choices"),
        (body(basis={"field": "output"}), "basis is not a list"),
        (body(basis=[{"no": "field"}]), "basis entry without a field name"),
        (body(basis=["output"]), "basis entry without a field name"),
        (body(basis=[{"field": "output", "citations": [{"title": "no url"}]}]), "citation without a url"),
        (
            body(basis=[{"field": "output", "citations": {"url": "https://a.example"}}]),
            "citation without a url",
        ),
        # Was a TypeError out of the parser (int is not iterable): now a malformed answer, retried.
        (body(basis=[{"field": "output", "citations": 3}]), "citation without a url"),
    ],
)
def test_malformed_bodies_say_what_is_wrong(raw: str, problem: str) -> None:
    with pytest.raises(MalformedResponse, match=problem):
        parse_completion(raw, None)


def test_fields_of_another_type_are_read_as_absent() -> None:
    raw = body(
        id=7,
        model="",
        usage=[1],
        choices=[{"message": {"content": None}, "delta": {"content": "d"}, "finish_reason": 1}, "extra"],
        basis=[
            {
                "field": "output",
                "reasoning": 1,
                "confidence": None,
                "citations": [{"url": "https://a.example", "title": 2, "excerpts": ["e", 3, None]}],
            },
            {"field": "other", "citations": None},
        ],
    )
    parsed = parse_completion(raw, None)
    assert (parsed.upstream_id, parsed.model, parsed.usage, parsed.finish_reason) == (None, None, None, None)
    assert parsed.content == "d"
    first, second = parsed.basis
    assert (first.reasoning, first.confidence) == (None, None)
    assert (first.citations[0].title, first.citations[0].excerpts) == (None, ["e"])
    assert second.citations == []


def test_stream_skips_choices_that_are_not_objects() -> None:
    # A number of choices was a TypeError out of the assembler; now it is skipped like the rest.
    a = feed(
        sse({"id": "s1", "choices": 3}, {"choices": ["x", {"delta": {"content": "Hi"}}]}, chunk(None, "stop"))
    )
    assert a.result("raw", None).content == "Hi"
    assert a.complete


def test_stream_usage_from_the_last_chunk_that_sends_one() -> None:
    a = feed(sse(chunk("a", usage={"total_tokens": 1}), chunk("b", usage=None), chunk(None, "stop")))
    assert a.result("raw", None).usage == {"total_tokens": 1}
    a = feed(sse(chunk("a", usage={"total_tokens": 1}), chunk(None, "stop", usage="n/a")))
    assert a.result("raw", None).usage is None  # a usage that cannot be read replaces it, as before


def test_stream_basis_that_is_not_a_list_is_refused() -> None:
    with pytest.raises(MalformedResponse, match="basis is not a list"):
        feed(sse(chunk("a", basis={"field": "output"})))
    assert feed(sse(chunk("a", basis={}), chunk(None, "stop"))).result("raw", None).basis == []
