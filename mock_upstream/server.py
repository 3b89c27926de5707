"""A local stand-in for Parallel's ``POST /v1beta/chat/completions`` (aiohttp.web).

Used for demos, tests and load tests: realistic bodies (basis with citations, usage, an
unknown extra key), configurable latency, random faults, an optional requests-per-minute
enforcer, and deterministic per-request fault directives written into the LAST user message::

    [[mock:status=503]]              always answer that status
    [[mock:status=429,times=2]]      the first 2 requests with this exact content get it
    [[mock:hang]]  [[mock:truncate]]  [[mock:malformed]]  [[mock:null_usage]]  (+ ",times=N")
    [[mock:latency_ms=1500]]  [[mock:retry_after=2]]  [[mock:big_bytes=20000000]]
    [[mock:echo_key]]                answer 401 naming the key it was sent, whole and by its first
                                     12 characters, as some APIs do: a client must not store it
    [[mock:long_fields=4000]]        every free-text field of the answer longer than any column:
                                     a citation URL of that many random characters, a 300-character
                                     host, and an id, model, finish_reason and confidence of it

Several blocks may appear in one message; ``times`` applies to the block it is in and is
counted per (hash of the full content, block). Run it with ``pcq mock-upstream`` (see
``pcq mock-upstream --help``; the default port is 8900). It accepts any non-empty key unless
told which ones (``--api-keys-env VAR``: the keys in that variable, so they stay out of ``ps``);
any other key is answered ``401``, as the real API answers a revoked or mistyped key.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import importlib
import json
import logging
import math
import random
import re
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

JSON = dict[str, Any]
log = logging.getLogger(__name__)

COMPLETIONS_PATH = "/v1beta/chat/completions"
MODELS = ("speed", "lite", "base", "core")
_ROLES = ("system", "user", "assistant")
_FORMATS = ("text", "json_schema", "json_object")
_DIRECTIVE_RE = re.compile(r"\[\[mock:([^\]]*)\]\]")
_CLIENT_GONE = 499  # nginx's "client closed request": counted when a caller gives up on us
# A long sleep checks whether its client is still there at growing intervals: quick to notice
# an early give-up, yet cheap with thousands of hung connections (~1% CPU for 5,000).
_POLL_FIRST_S, _POLL_MAX_S = 0.25, 5.0
_RPM_WINDOW_S = 60.0
_MASK64 = (1 << 64) - 1
_ERROR_TYPES = {401: "authentication_error", 402: "insufficient_credit", 404: "not_found_error"}
_ERROR_TYPES |= {408: "timeout_error", 409: "conflict_error", 429: "rate_limit_error"}


@dataclass
class MockConfig:
    latency_ms: float = 200.0
    latency_jitter_ms: float = 0.0
    citations_per_field: int = 3
    fault_429_rate: float = 0.0
    retry_after_seconds: float | None = 1.0
    fault_5xx_rate: float = 0.0
    fault_hang_rate: float = 0.0
    hang_seconds: float = 3600.0
    fault_truncate_rate: float = 0.0
    fault_malformed_rate: float = 0.0
    null_usage_rate: float = 0.0
    enforce_rpm: int | None = None
    # Per-key quotas (key -> requests per minute), overriding enforce_rpm for those keys.
    enforce_rpm_by_key: dict[str, int] = field(default_factory=dict)
    # The keys it accepts (x-api-key or Bearer); any other answers 401. Empty: any non-empty key.
    api_keys: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class _Directives:
    """What one request asked for (directives), later merged with the random faults."""

    status: int | None = None
    hang: bool = False
    truncate: bool = False
    malformed: bool = False
    null_usage: bool = False
    echo_key: bool = False
    latency_ms: float | None = None
    retry_after: float | None = None
    big_bytes: int | None = None
    long_fields: int | None = None


@dataclass
class _State:
    config: MockConfig
    rng: random.Random
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    rate_limited_by_enforcer: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    # Only contents carrying directives are remembered, so a load test with millions of
    # distinct prompts does not grow memory.
    by_content_hash: Counter[str] = field(default_factory=Counter)
    times_seen: Counter[str] = field(default_factory=Counter)
    # Per key digest (never the raw key): monotonic times of admitted requests.
    windows: dict[str, deque[float]] = field(default_factory=dict)
    # Per key digest: requests, calls open now and at most, 429s from the enforcer.
    by_key: dict[str, Counter[str]] = field(default_factory=dict)
    # The exact bodies of requests carrying [[mock:record]] (the last 100): what a client
    # really sent, byte for byte, for tests that check nothing was re-serialised on the way.
    recorded: deque[str] = field(default_factory=lambda: deque(maxlen=100))

    def new_id(self, prefix: str) -> str:
        return f"{prefix}{self.rng.getrandbits(96):024x}"

    def reset(self) -> None:
        self.requests = self.rate_limited_by_enforcer = 0
        self.max_in_flight = self.in_flight
        for counter in (self.by_status, self.faults, self.by_content_hash, self.times_seen):
            counter.clear()
        self.windows.clear()
        self.recorded.clear()
        for c in self.by_key.values():
            c["requests"] = c["rate_limited"] = 0
            c["max_in_flight"] = c["in_flight"]


STATE_KEY = web.AppKey("pcq_mock_state", _State)
RECORD_DIRECTIVE = b"[[mock:record]]"


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _h(*parts: object) -> int:
    """Stable hash so that identical prompts give identical answers across runs."""
    data = "\x1f".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


# ---------------------------------------------------------------------------- directives


def _parse_directives(content: str, state: _State) -> _Directives:
    d = _Directives()
    blocks = _DIRECTIVE_RE.findall(content)
    if not blocks:
        return d
    digest = _digest(content)
    state.by_content_hash[digest] += 1
    for i, block in enumerate(blocks):
        items: dict[str, str] = {}
        for part in block.split(","):
            key, _, value = part.partition("=")
            if key.strip():
                items[key.strip().lower()] = value.strip()
        try:
            if "times" in items:
                times = int(items.pop("times"))
                state.times_seen[f"{digest}:{i}"] += 1
                if state.times_seen[f"{digest}:{i}"] > times:
                    continue
            _apply_block(d, items)
        except ValueError:
            log.warning("ignoring malformed mock directive [[mock:%s]]", block)
    return d


def _apply_block(d: _Directives, items: dict[str, str]) -> None:
    for key, value in items.items():
        if key == "status":
            d.status = int(value)
        elif key in ("hang", "truncate", "malformed", "null_usage", "echo_key"):
            setattr(d, key, True)
        elif key == "record":
            pass  # _read_payload kept the raw body already
        elif key == "latency_ms":
            d.latency_ms = float(value)
        elif key == "retry_after":
            d.retry_after = float(value)
        elif key == "big_bytes":
            d.big_bytes = int(value)
        elif key == "long_fields":
            d.long_fields = int(value)
        else:
            log.warning("ignoring unknown mock directive key %r", key)


# ------------------------------------------------------------------------------- content

_SOURCES = (
    ("https://en.wikipedia.org/wiki/{Wiki}", "{Title} - Wikipedia"),
    ("https://www.reuters.com/world/{slug}-{n}/", "{Title} | Reuters"),
    ("https://www.bbc.com/news/articles/c{n}{slug3}", "{Title} - BBC News"),
    ("https://www.nature.com/articles/s41586-0{n}-0{m}", "{Title} | Nature"),
    ("https://arxiv.org/abs/24{m}.{n}", "[24{m}.{n}] {Title}"),
    ("https://www.britannica.com/topic/{slug}", "{Title} | Britannica"),
    ("https://www.nytimes.com/2024/0{d}/1{d}/business/{slug}.html", "{Title} - The New York Times"),
    ("https://www.sec.gov/Archives/edgar/data/{n}/{slug}.htm", "{Title} (Form 10-K)"),
    ("https://github.com/{slug3}/{slug}", "GitHub - {slug3}/{slug}"),
    ("https://www.who.int/news-room/fact-sheets/detail/{slug}", "{Title} - WHO"),
)
_EXCERPTS = (
    "{Title} has been documented extensively; several primary sources agree on the key facts.",
    "According to the report, {topic} remains the subject of ongoing analysis.",
    "Figures published in the latest filing are consistent with earlier estimates.",
    "Independent reviewers noted that the underlying data for {topic} was revised once.",
    "The article summarises the history and current state of {topic}.",
)
_SENTENCES = (
    "Multiple independent sources agree on the main points.",
    "Recent reporting adds context but does not change the overall picture.",
    "Figures vary slightly between publications, mostly because of reporting dates.",
    "Primary documents were preferred over secondary summaries where available.",
    "Some details remain uncertain and are flagged with lower confidence.",
)
_CONFIDENCE = ("low", "medium", "high", "high")


def _topic(text: str) -> str:
    clean = " ".join(_DIRECTIVE_RE.sub(" ", text).split())
    return clean[:60] or "your question"


def _text_answer(topic: str) -> str:
    h = _h("text", topic)
    return (
        f"Answer about: {topic}. {_SENTENCES[h % 5]} {_SENTENCES[(h >> 8) % 5]} "
        f"In short, the evidence points to a consistent conclusion about {topic}."
    )


def _mix(x: int) -> int:
    """splitmix64: cheap, well-spread derived hashes (one blake2b per field, not per citation)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _topic_words(topic: str) -> dict[str, str]:
    words = re.findall(r"[A-Za-z0-9]+", topic)[:6] or ["topic"]
    return {
        "Wiki": "_".join(w.capitalize() for w in words[:3]),
        "slug": "-".join(w.lower() for w in words),
        "slug3": "-".join(w.lower() for w in words[:2]),
        "Title": " ".join(w.capitalize() for w in words),
        "topic": topic,
    }


def _citation(words: dict[str, str], h: int) -> JSON:
    fmt = {**words, "n": 100000 + h % 900000, "m": 1000 + (h >> 20) % 9000, "d": 1 + (h >> 34) % 9}
    url, title_fmt = _SOURCES[(h >> 40) % len(_SOURCES)]
    n_excerpts = 1 + (h >> 6) % 2
    excerpts = [_EXCERPTS[(h >> (44 + 3 * k)) % len(_EXCERPTS)].format(**fmt) for k in range(n_excerpts)]
    return {
        "url": url.format(**fmt),
        # Real citations sometimes lack a title or excerpts: clients must cope with null.
        "title": None if h % 7 == 0 else title_fmt.format(**fmt),
        "excerpts": None if (h >> 3) % 5 == 0 else excerpts,
    }


def _basis(model: str, fields: list[str], topic: str, per_field: int) -> list[JSON]:
    if model == "speed":
        return []
    words = _topic_words(topic)
    out = []
    for fld in fields:
        h = _h("basis", topic, fld)
        out.append(
            {
                "field": fld,
                "citations": [_citation(words, _mix(h + i)) for i in range(per_field)],
                "reasoning": f"The {fld} value for '{topic}' was cross-checked against "
                f"{per_field} sources; {_SENTENCES[h % 5].lower()}",
                "confidence": _CONFIDENCE[(h >> 8) % 4],
            }
        )
    return out


def _value_for(schema: Any, name: str, topic: str, h: int, depth: int = 0) -> Any:
    """A plausible value of the JSON-schema type, so typed clients can parse the answer."""
    if not isinstance(schema, dict):
        return f"{name.replace('_', ' ')} of {topic}"
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][h % len(schema["enum"])]
    if "const" in schema:
        return schema["const"]
    for union in ("anyOf", "oneOf"):
        options = [o for o in schema.get(union) or [] if o != {"type": "null"}]
        if options:
            return _value_for(options[0], name, topic, h, depth)
    typ = schema.get("type", "string")
    if isinstance(typ, list):
        typ = next((t for t in typ if t != "null"), "null")
    if typ == "number":
        return round((h % 100000) / 100, 2)
    if typ == "integer":
        return h % 1000
    if typ == "boolean":
        return h % 2 == 0
    if typ == "null":
        return None
    if typ == "array":
        if depth >= 4:
            return []
        items = schema.get("items", {})
        return [_value_for(items, name, topic, _h(h, i), depth + 1) for i in range(2)]
    if typ == "object":
        props = schema.get("properties")
        if not isinstance(props, dict) or depth >= 4:
            return {}
        return {k: _value_for(v, k, topic, _h(h, k), depth + 1) for k, v in props.items()}
    return f"{name.replace('_', ' ')} of {topic}"


def _answer(topic: str, response_format: JSON | None) -> tuple[str, list[str]]:
    """Content string and the output fields the basis must cover."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return _text_answer(topic), ["output"]
    obj: JSON
    if kind == "json_schema":
        schema = (response_format or {}).get("json_schema", {}).get("schema") or {}
        props = schema.get("properties") if isinstance(schema, dict) else None
        if isinstance(props, dict) and props:
            obj = {k: _value_for(v, k, topic, _h("val", topic, k)) for k, v in props.items()}
        else:
            obj = {"answer": _text_answer(topic)}
    else:  # json_object
        obj = {"answer": _text_answer(topic), "summary": f"Summary of {topic}"}
    return json.dumps(obj), list(obj)


# ---------------------------------------------------------------------------- validation


def _validate(body: Any) -> list[JSON]:
    """FastAPI/pydantic-style 422 details for the subset of the contract that matters."""
    errs: list[JSON] = []

    def err(loc: list[str | int], msg: str, typ: str) -> None:
        errs.append({"loc": ["body", *loc], "msg": msg, "type": typ})

    if not isinstance(body, dict):
        err([], "Input should be a valid dictionary or object to extract fields from", "dict_type")
        return errs
    if "model" not in body:
        err(["model"], "Field required", "missing")
    elif not isinstance(body["model"], str):
        err(["model"], "Input should be a valid string", "string_type")
    messages = body.get("messages")
    if "messages" not in body:
        err(["messages"], "Field required", "missing")
    elif not isinstance(messages, list):
        err(["messages"], "Input should be a valid list", "list_type")
    else:
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                err(["messages", i], "Input should be a valid dictionary", "dict_type")
                continue
            if "role" not in m:
                err(["messages", i, "role"], "Field required", "missing")
            elif m["role"] not in _ROLES:
                err(
                    ["messages", i, "role"],
                    "Input should be 'system', 'user' or 'assistant'",
                    "enum",
                )
            if "content" not in m:
                err(["messages", i, "content"], "Field required", "missing")
            elif not isinstance(m["content"], str):
                err(["messages", i, "content"], "Input should be a valid string", "string_type")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        err(["stream"], "Input should be a valid boolean", "bool_type")
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in _FORMATS:
            msg = "Input tag does not match any of: " + ", ".join(_FORMATS)
            err(["response_format"], msg, "union_tag_invalid")
        elif rf["type"] == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict):
                err(["response_format", "json_schema"], "Field required", "missing")
            elif not isinstance(js.get("name"), str):
                err(["response_format", "json_schema", "name"], "Field required", "missing")
            elif js.get("schema") is not None and not isinstance(js["schema"], dict):
                loc: list[str | int] = ["response_format", "json_schema", "schema"]
                err(loc, "Input should be a valid dictionary", "dict_type")
    return errs


def _presented_keys(request: web.Request) -> list[str]:
    keys = [request.headers.get("x-api-key", "").strip()]
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        keys.append(token.strip())
    return [k for k in keys if k]


def _authorized_key(request: web.Request, accepted: tuple[str, ...]) -> str | None:
    for key in _presented_keys(request):
        if not accepted or any(hmac.compare_digest(key.encode(), a.encode()) for a in accepted):
            return key
    return None


# ------------------------------------------------------------------------------ responses


def _json(status: int, body: Any, rid: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(body).encode(),
        status=status,
        content_type="application/json",
        headers={"x-request-id": rid, **(headers or {})},
    )


def _retry_headers(seconds: float | None) -> dict[str, str]:
    if seconds is None:
        return {}
    # Retry-After must be whole seconds; retry-after-ms carries the precise value.
    return {
        "Retry-After": str(max(0, math.ceil(seconds))),
        "retry-after-ms": str(int(seconds * 1000)),
    }


def _error(status: int, rid: str, retry_after: float | None = None) -> web.Response:
    # Parallel answers in more than one error shape; the mock uses both so clients handle both.
    if status == 422:
        detail = [{"loc": ["body"], "msg": "Injected validation error", "type": "value_error"}]
        return _json(422, {"detail": detail}, rid)
    if status >= 500:
        error = {"ref_id": rid, "message": "Internal server error (mock)"}
        return _json(status, {"type": "error", "error": error}, rid)
    kind = _ERROR_TYPES.get(status, "invalid_request_error")
    body = {"error": {"message": f"Mock error {status}", "type": kind}}
    return _json(status, body, rid, _retry_headers(retry_after) if status == 429 else None)


async def _sleep_while_connected(request: web.Request, seconds: float) -> bool:
    """Sleep; False if the client went away. Needed when the runner does not cancel
    handlers on disconnect, else hung requests would linger in in_flight for an hour."""
    loop = asyncio.get_running_loop()
    deadline, poll = loop.time() + seconds, _POLL_FIRST_S
    while (remaining := deadline - loop.time()) > 0:
        await asyncio.sleep(min(remaining, poll))
        poll = min(poll * 2, _POLL_MAX_S)
        transport = request.transport
        if transport is None or transport.is_closing():
            return False
    return True


def _pad(body: bytes, big_bytes: int | None) -> bytes:
    """Grow a JSON object to exactly big_bytes with a padding key, so it stays valid JSON."""
    prefix = b',"mock_padding":"'
    n = (big_bytes or 0) - len(body) - len(prefix) - 1
    return body if n < 0 else body[:-1] + prefix + b"x" * n + b'"}'


def _sse(head: JSON, delta: JSON, finish: str | None = None, **extra: Any) -> bytes:
    chunk = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def _stream(request: web.Request, rid: str, completion: JSON, d: _Directives) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "x-request-id": rid,
        }
    )
    await resp.prepare(request)
    content: str = completion["choices"][0]["message"]["content"]
    head = {k: completion[k] for k in ("id", "created", "model")}
    head.update(object="chat.completion.chunk", type="chat.completion.chunk")
    n = max(2, min(8, len(content) // 40))
    size = math.ceil(len(content) / n)
    parts = [_sse(head, {"role": "assistant", "content": ""})]
    parts += [_sse(head, {"content": content[i : i + size]}) for i in range(0, len(content), size)]
    if d.truncate:  # connection ends cleanly but mid-answer: no finish_reason, no [DONE]
        await resp.write(b"".join(parts[: 1 + len(parts) // 2]))
        await resp.write_eof()
        return resp
    if d.malformed:
        parts.append(b'data: {"id": "' + head["id"].encode() + b'", "choices": [{"delta": \n\n')
    # basis and usage ride on the last chunk, as upstream does; padding goes inside its JSON.
    extra = {k: completion[k] for k in ("basis", "usage", "interaction_id") if k in completion}
    last = _sse(head, {}, "stop", **extra)
    parts.append(b"data: " + _pad(last[6:-2], d.big_bytes) + b"\n\n")
    parts.append(b"data: [DONE]\n\n")
    await resp.write(b"".join(parts))
    await resp.write_eof()
    return resp


async def _completions(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE_KEY]
    st.requests += 1
    st.in_flight += 1
    st.max_in_flight = max(st.max_in_flight, st.in_flight)
    try:
        resp = await _handle(request, st, st.new_id("req_"))
    except asyncio.CancelledError:  # runner cancelled us because the client disconnected
        st.by_status[str(_CLIENT_GONE)] += 1
        raise
    finally:
        st.in_flight -= 1
    st.by_status[str(resp.status)] += 1
    return resp


def _enforce_rpm(st: _State, key: str, rid: str) -> web.Response | None:
    """Sliding 60 s window per API key, like the upstream quota (POSTs count)."""
    limit = st.config.enforce_rpm_by_key.get(key, st.config.enforce_rpm)
    if limit is None:
        return None
    now = time.monotonic()
    window = st.windows.setdefault(_digest(key), deque())
    while window and window[0] <= now - _RPM_WINDOW_S:
        window.popleft()
    if len(window) < limit:
        window.append(now)
        return None
    st.rate_limited_by_enforcer += 1
    st.by_key[_digest(key)]["rate_limited"] += 1
    wait = window[0] + _RPM_WINDOW_S - now if window else _RPM_WINDOW_S
    headers = _retry_headers(wait if st.config.retry_after_seconds is not None else None)
    error = {
        "message": f"Rate limit exceeded: {limit} requests per minute.",
        "type": "rate_limit_error",
    }
    return _json(429, {"error": error}, rid, headers)


async def _read_payload(request: web.Request, rid: str) -> JSON | web.Response:
    """The validated request body, or the 422/403 answer the upstream would give."""
    raw = await request.read()
    if RECORD_DIRECTIVE in raw:
        request.app[STATE_KEY].recorded.append(raw.decode("utf-8", errors="replace"))
    try:
        payload = json.loads(raw)
    except ValueError as exc:
        pos = getattr(exc, "pos", 0)
        detail = [{"loc": ["body", pos], "msg": "JSON decode error", "type": "json_invalid"}]
        return _json(422, {"detail": detail}, rid)
    errors = _validate(payload)
    if errors:
        return _json(422, {"detail": errors}, rid)
    model: str = payload["model"]
    if model not in MODELS:
        msg = f"Invalid model '{model[:100]}'. Expected one of: {', '.join(MODELS)}."
        return _json(403, {"error": {"message": msg, "type": "invalid_request_error"}}, rid)
    return dict(payload)


def _roll_faults(d: _Directives, st: _State) -> _Directives:
    """Add the configured random faults to what the directives asked for."""
    cfg, rng = st.config, st.rng

    def roll(p: float) -> bool:
        return p > 0 and rng.random() < p

    if d.status is None and roll(cfg.fault_429_rate):
        d.status = 429
    elif d.status is None and roll(cfg.fault_5xx_rate):
        d.status = rng.choice((500, 502, 503))
    d.hang = d.hang or roll(cfg.fault_hang_rate)
    d.truncate = d.truncate or roll(cfg.fault_truncate_rate)
    d.malformed = d.malformed or roll(cfg.fault_malformed_rate)
    d.null_usage = d.null_usage or roll(cfg.null_usage_rate)
    for name in ("hang", "truncate", "malformed", "null_usage"):
        if getattr(d, name):
            st.faults[name] += 1
    if d.latency_ms is None:
        jitter = cfg.latency_jitter_ms
        # 429s skip the configured latency: real rate limiters reject at the edge.
        d.latency_ms = 0.0 if d.status == 429 else cfg.latency_ms + rng.uniform(-jitter, jitter)
    return d


def _completion(st: _State, payload: JSON, last_user: str, d: _Directives) -> JSON:
    model: str = payload["model"]
    topic = _topic(last_user)
    content, out_fields = _answer(topic, payload.get("response_format"))
    prompt_tokens = sum(len(m["content"]) for m in payload["messages"]) // 4 + 1
    completion_tokens = len(content) // 4 + 1
    completion: JSON = {
        "id": st.new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "delta": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "interaction_id": st.new_id("int_"),  # an unknown extra key, on purpose
    }
    basis = _basis(model, out_fields, topic, st.config.citations_per_field)
    if basis or _h("speed-basis", topic) % 2:  # speed: sometimes `basis: []`, sometimes absent
        completion["basis"] = basis
    if d.long_fields is not None:
        _lengthen(completion, d.long_fields)
    if d.null_usage:  # both legal forms: null and missing
        if st.rng.random() < 0.5:
            completion["usage"] = None
        else:
            del completion["usage"]
    return completion


def _noise(n: int) -> str:
    """``n`` hex digits that do not compress (PostgreSQL compresses long index entries)."""
    digits = "".join(hashlib.sha256(str(i).encode()).hexdigest() for i in range(n // 64 + 1))
    return digits[:n]


def _lengthen(completion: JSON, n: int) -> None:
    """[[mock:long_fields=N]]: strings longer than a store would expect, all legal JSON."""
    completion["id"] += "i" * n
    completion["model"] += "-" + "m" * n
    completion["choices"][0]["finish_reason"] = "stop" + "f" * n
    host = ".".join(["a" * 60] * 5)  # 304 characters: more than any real hostname
    basis = completion.setdefault("basis", [])
    if not basis:
        basis.append({"field": "content", "reasoning": "long fields", "citations": []})
    basis[0]["confidence"] = "c" * n
    basis[0]["citations"] = [
        {"url": "https://example.com/" + _noise(n), "title": "t" * n, "excerpts": ["e" * n]},
        {"url": f"https://{host}/page", "title": None, "excerpts": None},
        *basis[0]["citations"],
    ]


async def _handle(request: web.Request, st: _State, rid: str) -> web.StreamResponse:
    key = _authorized_key(request, st.config.api_keys)
    if key is None:
        error = {"message": "Invalid or missing API key.", "type": "authentication_error"}
        return _json(401, {"error": error}, rid)
    mine = st.by_key.setdefault(_digest(key), Counter())
    mine["requests"] += 1
    mine["in_flight"] += 1
    mine["max_in_flight"] = max(mine["max_in_flight"], mine["in_flight"])
    try:
        return await _handle_authorized(request, st, rid, key)
    finally:
        mine["in_flight"] -= 1


async def _handle_authorized(request: web.Request, st: _State, rid: str, key: str) -> web.StreamResponse:
    if (limited := _enforce_rpm(st, key, rid)) is not None:
        return limited
    payload = await _read_payload(request, rid)
    if isinstance(payload, web.Response):
        return payload

    messages: list[JSON] = payload["messages"]
    users = [m["content"] for m in messages if m["role"] == "user"]
    last_user: str = users[-1] if users else (messages[-1]["content"] if messages else "")
    d = _roll_faults(_parse_directives(last_user, st), st)
    if d.hang:  # a never-answering upstream; after hang_seconds a gateway would give up
        if not await _sleep_while_connected(request, st.config.hang_seconds):
            return web.Response(status=_CLIENT_GONE)
        return _error(504, rid)
    latency_s = (d.latency_ms or 0.0) / 1000
    if latency_s > 0 and not await _sleep_while_connected(request, latency_s):
        return web.Response(status=_CLIENT_GONE)
    if d.echo_key:
        st.faults["echo_key"] += 1
        message = f"API key {key} is not valid for this endpoint (keys beginning {key[:12]}… are not)"
        return _json(401, {"error": {"message": message, "type": "authentication_error"}}, rid)
    if d.status is not None and 400 <= d.status <= 599:
        st.faults[str(d.status)] += 1
        retry = d.retry_after if d.retry_after is not None else st.config.retry_after_seconds
        return _error(d.status, rid, retry)

    completion = _completion(st, payload, last_user, d)
    if payload.get("stream"):
        return await _stream(request, rid, completion, d)
    body = _pad(json.dumps(completion).encode(), d.big_bytes)
    if d.truncate:
        body = body[: len(body) // 2]
    elif d.malformed:
        no_choices = {k: completion[k] for k in ("id", "object", "created", "model")}
        html = b"<html><body>502 Bad Gateway</body></html>"
        body = st.rng.choice((html, json.dumps(no_choices).encode(), body[:-1] + b",}"))
    return web.Response(body=body, content_type="application/json", headers={"x-request-id": rid})


async def _stats(request: web.Request) -> web.Response:
    st = request.app[STATE_KEY]
    return web.json_response(
        {
            "requests": st.requests,
            "by_status": dict(st.by_status),
            "in_flight": st.in_flight,
            "max_in_flight": st.max_in_flight,
            "rate_limited_by_enforcer": st.rate_limited_by_enforcer,
            "by_key": {digest: dict(c) for digest, c in st.by_key.items()},
            "faults": dict(st.faults),
            "by_content_hash": dict(st.by_content_hash),
        }
    )


async def _recorded(request: web.Request) -> web.Response:
    """``{"bodies": [...]}``: the raw bodies of requests that carried ``[[mock:record]]``."""
    return web.json_response({"bodies": list(request.app[STATE_KEY].recorded)})


async def _reset(request: web.Request) -> web.Response:
    request.app[STATE_KEY].reset()
    return web.json_response({"reset": True})


async def _healthz(request: web.Request) -> web.Response:  # noqa: ARG001
    return web.json_response({"status": "ok"})


def create_app(config: MockConfig) -> web.Application:
    app = web.Application(client_max_size=32 * 1024 * 1024)
    app[STATE_KEY] = _State(config=config, rng=random.Random(config.seed))
    app.router.add_post(COMPLETIONS_PATH, _completions)
    app.router.add_get("/mock/stats", _stats)
    app.router.add_get("/mock/recorded", _recorded)
    app.router.add_post("/mock/reset", _reset)
    app.router.add_get("/healthz", _healthz)
    return app


def _raise_fd_limit() -> None:
    """Thousands of hung connections need thousands of file descriptors."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            target = 65536 if hard == resource.RLIM_INFINITY else hard
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


async def _serve_forever(host: str, port: int, config: MockConfig) -> None:
    # No access log (it costs ~30% of throughput); cancel handlers of clients that left.
    runner = web.AppRunner(create_app(config), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port  # port=0 -> the real port
    print(f"mock upstream listening on http://{host}:{bound}", flush=True)  # noqa: T201
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def serve(host: str, port: int, config: MockConfig) -> None:
    """Blocking. Uses uvloop when it is installed (roughly doubles throughput)."""
    _raise_fd_limit()
    try:
        loop_factory = importlib.import_module("uvloop").new_event_loop
    except ImportError:
        loop_factory = None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_serve_forever(host, port, config))
    except KeyboardInterrupt:
        pass


def parse_key_quotas(text: str) -> dict[str, int]:
    """``key=rpm,key=rpm`` -> {key: rpm}; the last ``=`` splits, so keys may contain ``=``."""
    quotas: dict[str, int] = {}
    for part in text.split(","):
        if part.strip():
            key, _, rpm = part.strip().rpartition("=")
            quotas[key] = int(rpm)
    return quotas
