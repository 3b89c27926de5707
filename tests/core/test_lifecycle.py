"""Claiming and storing: one result per job whatever runs twice (SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

from sqlalchemy import func, select

from api.intake import NewJob, create_job
from pcq.db import unit_of_work
from pcq.jobs import lifecycle
from pcq.jobs.lifecycle import AttemptRecord
from pcq.models import Attempt, BasisField, Citation, Job, Result, Usage, utcnow
from pcq.settings import load_settings
from pcq.tenants import create_key
from pcq.wire import BasisData, CitationData, ParsedCompletion
from tests.core import lifecycle_helpers as one

REQ = {"model": "lite", "messages": [{"role": "user", "content": "q"}]}


def _new_job(sessions) -> str:
    with unit_of_work(sessions) as s:
        tenant, _ = create_key(s, "t", "")
        job, _ = create_job(s, tenant.id, NewJob(request_json=json.dumps(REQ), model="lite"), None)
        return job.id


def _completion() -> ParsedCompletion:
    cites = [CitationData(url=f"https://Example.com/{i}", title=None, excerpts=["e"]) for i in range(3)]
    return ParsedCompletion(
        raw_body='{"raw": true}',
        content="a",
        parsed=None,
        model="lite",
        finish_reason="stop",
        upstream_id="u",
        usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        basis=[BasisData("output", "r", "high", cites), BasisData("other", None, None, cites[:1])],
    )


def _record(n: int) -> AttemptRecord:
    now = utcnow()
    return AttemptRecord(number=n, started_at=now, finished_at=now, outcome="ok", status_code=200)


def _claim(sessions, job_id: str, **kw):
    with unit_of_work(sessions) as s:
        return one.claim(
            s,
            job_id,
            now=kw.get("now", utcnow()),
            lease_seconds=kw.get("lease", 60),
            max_attempts=kw.get("max_attempts", 3),
        )


def _count(sessions, model, **where) -> int:
    with sessions() as s:
        q = select(func.count()).select_from(model)
        for k, v in where.items():
            q = q.where(getattr(model, k) == v)
        return s.scalar(q) or 0


def test_a_claimed_job_cannot_be_claimed_again_while_leased(sessions) -> None:
    job_id = _new_job(sessions)
    first = _claim(sessions, job_id)
    assert first is not None
    assert first.attempt == 1
    assert _claim(sessions, job_id) is None


def test_an_expired_lease_is_claimed_with_the_next_attempt_number(sessions) -> None:
    job_id = _new_job(sessions)
    _claim(sessions, job_id, lease=1)
    later = _claim(sessions, job_id, now=utcnow() + timedelta(seconds=5))
    assert later is not None
    assert later.attempt == 2


def test_success_stores_result_usage_basis_and_one_row_per_citation(sessions) -> None:
    job_id = _new_job(sessions)
    job = _claim(sessions, job_id)
    with unit_of_work(sessions) as s:
        assert one.store_success(s, job, _record(1), _completion())
    assert _count(sessions, Result, job_id=job_id) == 1
    assert _count(sessions, Usage, job_id=job_id) == 1
    assert _count(sessions, BasisField, job_id=job_id) == 2
    assert _count(sessions, Citation, job_id=job_id) == 4
    assert _count(sessions, Attempt, job_id=job_id) == 1
    with sessions() as s:
        assert s.get(Job, job_id).status == "succeeded"
        assert s.get(Result, job_id).raw_body == '{"raw": true}'
        assert {c.domain for c in s.scalars(select(Citation))} == {"example.com"}


def test_each_citation_carries_its_fields_confidence_and_its_answers_time(sessions) -> None:
    """The copies the audit filters read (GET /v1/citations?confidence=&created_after=)."""
    job_id = _new_job(sessions)
    job = _claim(sessions, job_id)
    with unit_of_work(sessions) as s:
        assert one.store_success(s, job, _record(1), _completion())
    with sessions() as s:
        stored = s.get(Result, job_id).created_at
        cites = {(c.field, c.position): c for c in s.scalars(select(Citation))}
        assert {k: c.confidence for k, c in cites.items()} == {
            ("output", 0): "high",
            ("output", 1): "high",
            ("output", 2): "high",
            ("other", 0): None,
        }
        assert {c.created_at for c in cites.values()} == {stored}
        assert {c.field_md5 for c in cites.values()} == {
            hashlib.md5(f.encode()).hexdigest() for f in ("output", "other")
        }


def test_an_answer_with_nul_and_lone_surrogates_is_stored_not_retried_for_ever(sessions) -> None:
    """PostgreSQL holds neither character; the parsed copies get U+FFFD, the raw body its escapes."""
    job_id = _new_job(sessions)
    job = _claim(sessions, job_id)
    bad = "a\x00b\ud800c"
    raw = json.dumps({"choices": [{"message": {"content": bad}}]})
    cite = CitationData(url="https://example.com/\x00", title=bad, excerpts=[bad])
    completion = ParsedCompletion(
        raw_body=raw + "\x00",
        content=bad,
        parsed={bad: [bad]},
        model="lite",
        finish_reason="stop",
        upstream_id=bad,
        usage={"prompt_tokens": 1, "detail": bad},
        basis=[BasisData(bad, bad, bad, [cite])],
    )
    with unit_of_work(sessions) as s:
        assert one.store_success(s, job, _record(1), completion)
    clean = "a\ufffdb\ufffdc"
    with sessions() as s:
        result = s.get(Result, job_id)
        assert result.content == clean
        assert result.parsed == {clean: [clean]}
        assert result.raw_body == raw + "\ufffd"  # the escapes in the JSON text are kept
        assert "\\u0000" in result.raw_body
        assert "\\ud800" in result.raw_body
        citation = s.scalars(select(Citation)).one()
        assert (citation.title, citation.excerpts) == (clean, [clean])
        assert s.scalars(select(BasisField.field)).one() == clean


def test_a_superseded_attempt_records_its_call_but_stores_no_result(sessions) -> None:
    job_id = _new_job(sessions)
    stale = _claim(sessions, job_id, lease=1)
    fresh = _claim(sessions, job_id, now=utcnow() + timedelta(seconds=5))
    with unit_of_work(sessions) as s:
        assert one.store_success(s, fresh, _record(2), _completion())
    with unit_of_work(sessions) as s:
        assert not one.store_success(s, stale, _record(1), _completion())
    assert _count(sessions, Result) == 1
    assert _count(sessions, Citation) == 4
    assert _count(sessions, Attempt, job_id=job_id) == 2


def test_retry_requeues_until_the_attempt_cap_then_fails(sessions) -> None:
    job_id = _new_job(sessions)
    for n in (1, 2, 3):
        job = _claim(sessions, job_id, max_attempts=3)
        assert job is not None
        assert job.attempt == n
        with unit_of_work(sessions) as s:
            status = one.store_retry(
                s, job, _record(n), next_attempt_at=utcnow(), max_attempts=3, code="server_error", error="503"
            )
        assert status == ("failed" if n == 3 else "queued")
    with sessions() as s:
        job_row = s.get(Job, job_id)
        assert job_row.status == "failed"
        assert job_row.error_code == "server_error"
    assert _count(sessions, Attempt, job_id=job_id) == 3


def test_a_retry_is_not_claimed_before_it_is_due(sessions) -> None:
    job_id = _new_job(sessions)
    job = _claim(sessions, job_id)
    with unit_of_work(sessions) as s:
        one.store_retry(
            s,
            job,
            _record(1),
            next_attempt_at=utcnow() + timedelta(seconds=30),
            max_attempts=3,
            code="rate_limited",
            error="429",
        )
    assert _claim(sessions, job_id) is None
    assert _claim(sessions, job_id, now=utcnow() + timedelta(seconds=31)) is not None


def test_jobs_whose_worker_died_every_time_end_failed_at_the_cap(sessions) -> None:
    job_id = _new_job(sessions)
    now = utcnow()
    for n in range(3):
        assert _claim(sessions, job_id, now=now + timedelta(seconds=10 * n), lease=1) is not None
    assert _claim(sessions, job_id, now=now + timedelta(seconds=40)) is None
    with sessions() as s:
        row = s.get(Job, job_id)
        assert row.status == "failed"
        assert row.error_code == "attempts_exhausted"


def test_sweeper_picks_due_retries_lost_messages_and_expired_leases_once(sessions) -> None:
    fresh = _new_job(sessions)
    with unit_of_work(sessions) as s:
        s.get(Job, fresh).enqueued_at = utcnow()  # the dispatcher sent it just now: not due
    leased = _new_job(sessions)
    _claim(sessions, leased, lease=1)
    now = utcnow() + timedelta(seconds=5)
    with unit_of_work(sessions) as s:
        due = lifecycle.due_for_enqueue(s, now=now, requeue_after_seconds=60)
    assert due == [(leased, "lease_expired")]
    with unit_of_work(sessions) as s:
        assert lifecycle.due_for_enqueue(s, now=now, requeue_after_seconds=60) == []
    with unit_of_work(sessions) as s:
        later = lifecycle.due_for_enqueue(s, now=now + timedelta(seconds=120), requeue_after_seconds=60)
    assert (fresh, "stale") in later


def test_sweeper_says_a_message_sent_before_a_broker_loss_is_due_as_broker_lost(sessions) -> None:
    sent = _new_job(sessions)
    with unit_of_work(sessions) as s:
        s.get(Job, sent).enqueued_at = utcnow()  # young: not stale, but sent before the loss
    leased = _new_job(sessions)
    _claim(sessions, leased, lease=1)
    now = utcnow() + timedelta(seconds=5)
    with unit_of_work(sessions) as s:
        due = lifecycle.due_for_enqueue(s, now=now, requeue_after_seconds=60, lost_before=now)
    assert sorted(due) == sorted([(sent, "broker_lost"), (leased, "lease_expired")])


def test_a_repeated_attempt_number_does_not_fail_the_other_outcomes(sessions) -> None:
    a, b = _new_job(sessions), _new_job(sessions)
    ja, jb = _claim(sessions, a), _claim(sessions, b)
    with unit_of_work(sessions) as s:  # a row for (a, 1) already exists, e.g. after a failover
        s.add(Attempt(**_record(1).row(a)))
    with unit_of_work(sessions) as s:
        stored = lifecycle.store_outcomes(
            s,
            [
                lifecycle.Settled(ja, _record(1), completion=_completion()),
                lifecycle.Settled(jb, _record(1), completion=_completion()),
            ],
            max_attempts=3,
        )
    assert stored == {a, b}
    assert _count(sessions, Result) == 2


def test_sweeper_leaves_old_messages_alone_while_the_broker_still_holds_messages(sessions) -> None:
    waiting = _new_job(sessions)  # its message was sent: it waits its turn in the queue
    with unit_of_work(sessions) as s:
        s.get(Job, waiting).enqueued_at = utcnow()
    unsent = _new_job(sessions)
    with unit_of_work(sessions) as s:
        s.get(Job, unsent).enqueued_at = None  # never sent: the dispatcher's, never the sweep's
    later = utcnow() + timedelta(seconds=120)
    with unit_of_work(sessions) as s:
        due = lifecycle.due_for_enqueue(s, now=later, requeue_after_seconds=60, resend_stale=False)
    assert due == []
    with unit_of_work(sessions) as s:  # the queue is empty now: the old message was lost
        assert lifecycle.due_for_enqueue(s, now=later, requeue_after_seconds=60) == [(waiting, "stale")]
    with sessions() as s:
        assert s.get(Job, unsent).enqueued_at is None  # still waiting for the dispatcher


def test_lease_renewal_extends_only_the_claim_that_still_holds_the_job(sessions) -> None:
    job_id = _new_job(sessions)
    now = utcnow()
    old = _claim(sessions, job_id, now=now, lease=1)
    new = _claim(sessions, job_id, now=now + timedelta(seconds=2), lease=1)  # taken over
    assert old is not None
    assert new is not None
    later = now + timedelta(seconds=2.5)
    with unit_of_work(sessions) as s:  # the superseded claim renews nothing
        assert lifecycle.renew_leases(s, [(job_id, old.attempt)], now=later, lease_seconds=60) == 0
    with sessions() as s:
        assert s.get(Job, job_id).lease_until < later + timedelta(seconds=1)
    with unit_of_work(sessions) as s:
        assert lifecycle.renew_leases(s, [(job_id, new.attempt)], now=later, lease_seconds=60) == 1
    with sessions() as s:
        assert s.get(Job, job_id).lease_until > later + timedelta(seconds=59)


def _expire_and_claim(sessions, job_id: str, *, seconds: int, **kw):
    """Claim the job as a new worker would once the previous claim's lease has expired."""
    with unit_of_work(sessions) as s:
        return lifecycle.claim_many(
            s,
            [job_id],
            now=utcnow() + timedelta(seconds=seconds),
            lease_seconds=1,
            max_attempts=kw.get("max_attempts", 3),
            prices=load_settings({}).prices,
            suspect_room=kw.get("suspect_room"),
        )


def test_worker_deaths_are_counted_apart_from_attempts_and_make_a_suspect(sessions) -> None:
    job_id = _new_job(sessions)
    _claim(sessions, job_id, lease=1)
    once = _expire_and_claim(sessions, job_id, seconds=5).jobs[0]
    assert (once.attempt, once.lease_losses, once.tries, once.suspect) == (2, 1, 1, False)
    # The second death makes it a suspect: with no room in the lane it is deferred, unclaimed.
    held = _expire_and_claim(sessions, job_id, seconds=10, suspect_room=0)
    assert (held.jobs, held.deferred) == ([], [job_id])
    twice = _expire_and_claim(sessions, job_id, seconds=10, suspect_room=1).jobs[0]
    assert (twice.attempt, twice.lease_losses, twice.tries, twice.suspect) == (3, 2, 1, True)
    assert not twice.exhausted(3)  # deaths do not spend the attempt budget


def test_a_job_whose_worker_dies_every_time_fails_at_the_crash_cap(sessions) -> None:
    job_id = _new_job(sessions)
    _claim(sessions, job_id, lease=1)
    for n in range(1, lifecycle.crash_cap(3)):
        assert _expire_and_claim(sessions, job_id, seconds=5 * n).jobs
    assert _expire_and_claim(sessions, job_id, seconds=100).jobs == []
    with sessions() as s:
        job = s.get(Job, job_id)
        assert (job.status, job.error_code, job.lease_losses) == ("failed", "attempts_exhausted", 3)
        assert "worker died" in job.error


def test_a_release_at_shutdown_is_not_a_death(sessions) -> None:
    job_id = _new_job(sessions)
    first = _claim(sessions, job_id)
    with unit_of_work(sessions) as s:
        assert lifecycle.release(s, [(job_id, first.attempt + 1)], now=utcnow()) == 0  # not our claim
        assert lifecycle.release(s, [(job_id, first.attempt)], now=utcnow()) == 1
    again = _claim(sessions, job_id)
    assert (again.attempt, again.lease_losses) == (2, 0)
