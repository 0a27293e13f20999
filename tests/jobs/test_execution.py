"""Worker-side job-row operations and the reaper, on the embedded database (SQLite, migrated by Alembic)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from langadapt.jobs import execution
from langadapt.jobs.db import make_engine, make_sessionmaker, upgrade
from langadapt.jobs.models import AttemptOutcome, Job, JobEvent, JobStatus, utcnow
from langadapt.jobs.results import job_scores
from langadapt.jobs.settings import Settings
from tests.jobs.conftest import insert_job

SETTINGS = Settings(_env_file=None)


@pytest.fixture
def sessions(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def job_id(sessions) -> str:
    with sessions() as session:
        return insert_job(session, "t")


def _age_heartbeat(sessions, job_id: str, seconds: float) -> None:
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=seconds)))
        session.commit()


def test_a_job_is_claimed_once(sessions, job_id) -> None:
    with sessions() as session:
        assert execution.claim_job(session, job_id, "w1", SETTINGS).status == JobStatus.running
        assert execution.claim_job(session, job_id, "w2", SETTINGS) is None
        assert execution.claim_job(session, "job_missing", "w2", SETTINGS) is None


def test_heartbeat_reports_cancel_and_lost_ownership(sessions, job_id) -> None:
    with sessions() as session:
        execution.claim_job(session, job_id, "w1", SETTINGS)
        assert execution.heartbeat(session, job_id, "w1") is False
        assert execution.heartbeat(session, job_id, "w2") is True  # not its job: stop
        session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
        session.commit()
        assert execution.heartbeat(session, job_id, "w1") is True


def test_only_the_owner_finishes_a_job(sessions, job_id) -> None:
    error = execution.JobError("invalid_corpus", "bad", "inputs", "user")
    with sessions() as session:
        execution.claim_job(session, job_id, "w1", SETTINGS)
        assert not execution.finish_job(session, job_id, "w2", AttemptOutcome.failed, error)
        assert execution.finish_job(session, job_id, "w1", AttemptOutcome.failed, error) == JobStatus.failed
        assert not execution.finish_job(session, job_id, "w1", AttemptOutcome.succeeded)  # already terminal
        job = session.get(Job, job_id)
        session.refresh(job)
        assert (job.status, job.error_code, job.error_stage, job.error_kind) == (
            "failed",
            "invalid_corpus",
            "inputs",
            "user",
        )
        assert [(a.attempt, a.outcome, a.error_code) for a in job.attempts] == [(1, "failed", "invalid_corpus")]


def test_a_system_failure_is_retried_with_backoff_until_the_attempts_run_out(sessions, job_id) -> None:
    error = execution.JobError("internal_error", "boom", "cpt", "system")
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(max_attempts=3))
        session.commit()
    delays = []
    for attempt in (1, 2, 3):
        with sessions() as session:
            job = execution.claim_job(session, job_id, f"w{attempt}", SETTINGS)
            assert job is not None and job.attempt == attempt
            before = utcnow()
            status = execution.finish_job(session, job_id, f"w{attempt}", AttemptOutcome.failed, error, backoff_s=10)
            job = session.get(Job, job_id, populate_existing=True)
            if attempt < 3:
                assert status == JobStatus.queued and job.dispatched_at is None and job.error_code is None
                delays.append(round((job.not_before - before).total_seconds()))
    assert delays == [10, 20]  # doubling per failure
    with sessions() as session:
        job = session.get(Job, job_id)
        assert (status, job.status, job.attempt, job.error_code) == (JobStatus.failed, "failed", 3, "internal_error")
        assert [(a.attempt, a.outcome, a.error_code, a.retry_at is not None) for a in job.attempts] == [
            (1, "failed", "internal_error", True),
            (2, "failed", "internal_error", True),
            (3, "failed", "internal_error", False),
        ]
        messages = [e.message for e in session.scalars(select(JobEvent).where(JobEvent.job_id == job_id))]
        assert messages == [
            "attempt 1 failed (internal_error): retrying in 10 s (2 more attempts allowed)",
            "attempt 2 failed (internal_error): retrying in 20 s (1 more attempts allowed)",
            "attempt 3 failed (internal_error): no attempts left (3 of max_attempts 3 failed)",
        ]


def test_a_preempted_attempt_is_queued_again_without_using_up_an_attempt(sessions, job_id) -> None:
    with sessions() as session:
        execution.claim_job(session, job_id, "w1", SETTINGS)
        assert execution.finish_job(session, job_id, "w1", AttemptOutcome.preempted) == JobStatus.queued
        job = session.get(Job, job_id, populate_existing=True)
        assert (job.status, job.attempt, job.system_failures, job.dispatched_at) == ("queued", 2, 0, None)
        assert job.not_before <= utcnow()  # due at once: the reaper sends it at its next round
        assert [(a.attempt, a.outcome) for a in job.attempts] == [(1, "preempted")]
        # A cancel asked meanwhile wins over the preemption.
        execution.claim_job(session, job_id, "w2", SETTINGS)
        session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.cancelling))
        session.commit()
        assert execution.finish_job(session, job_id, "w2", AttemptOutcome.preempted) == JobStatus.cancelled


def test_reaper_retries_jobs_whose_worker_went_silent(sessions, job_id) -> None:
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(max_attempts=2))
        session.commit()
        execution.claim_job(session, job_id, "w1", SETTINGS)
        execution.set_stage(session, job_id, "cpt")
        session.commit()
    _age_heartbeat(sessions, job_id, 30)
    with sessions() as session:
        assert execution.reap_stale(session, 60, 5) == []  # still fresh enough
    _age_heartbeat(sessions, job_id, 90)
    with sessions() as session:
        assert execution.reap_stale(session, 60, 5) == [job_id]
        job = session.get(Job, job_id)
        assert (job.status, job.attempt, job.worker, job.dispatched_at) == ("queued", 2, None, None)
        assert [(a.attempt, a.outcome, a.worker, a.stage, a.error_code, a.error_kind) for a in job.attempts] == [
            (1, "failed", "w1", "cpt", "worker_lost", "system")
        ]
        # The dead worker cannot overwrite the reaper's verdict if it comes back.
        assert not execution.finish_job(session, job_id, "w1", AttemptOutcome.succeeded)
    with sessions() as session:  # the second attempt's worker dies too: its last allowed attempt
        execution.claim_job(session, job_id, "w2", SETTINGS)
    _age_heartbeat(sessions, job_id, 90)
    with sessions() as session:
        assert execution.reap_stale(session, 60, 5) == [job_id]
        job = session.get(Job, job_id)
        assert (job.status, job.error_code, job.error_stage, job.error_kind) == (
            "failed",
            "worker_lost",
            "cpt",
            "system",
        )
        assert len(job.attempts) == job.max_attempts == 2


def test_reaper_completes_a_cancel_whose_worker_died(sessions, job_id) -> None:
    with sessions() as session:
        execution.claim_job(session, job_id, "w1", SETTINGS)
        session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.cancelling))
        session.commit()
    _age_heartbeat(sessions, job_id, 300)
    with sessions() as session:
        assert execution.reap_stale(session, 60, 5) == [job_id]
        job = session.get(Job, job_id)
        assert job.status == "cancelled" and job.error_code is None


def test_undispatched_jobs_are_found_after_a_grace_period(sessions, job_id) -> None:
    with sessions() as session:
        assert execution.undispatched(session, 30) == []
        session.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow() - timedelta(seconds=60)))
        session.commit()
        assert execution.undispatched(session, 30) == [job_id]
        session.execute(update(Job).where(Job.id == job_id).values(dispatched_at=utcnow()))
        session.commit()
        assert execution.undispatched(session, 30) == []


def test_a_held_back_job_is_sent_once_its_time_has_come(sessions, job_id) -> None:
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(not_before=utcnow() + timedelta(seconds=60)))
        session.commit()
        assert execution.undispatched(session, 30) == []
        session.execute(update(Job).where(Job.id == job_id).values(not_before=utcnow() - timedelta(seconds=1)))
        session.commit()
        assert execution.undispatched(session, 30) == [job_id]  # due at once, no grace period


def test_progress_and_scores(sessions, job_id) -> None:
    with sessions() as session:
        execution.set_progress(session, job_id, step=5, total=10, eta_s=12.5)
        job = session.get(Job, job_id)
        execution.record_scores(
            session,
            job,
            [
                {"model": "original", "task": "bits_per_char", "metric": "target", "value": 1.5, "n": 3},
                {"model": "propagated:swap", "task": "bits_per_char", "metric": "target", "value": 1.7, "n": 3},
            ],
        )
        execution.record_scores(
            session,
            job,
            [
                {"model": "propagated:swap", "task": "bits_per_char", "metric": "target", "value": 1.6, "n": 3},
            ],
        )  # a re-run replaces the rows
        rows = job_scores(session, job)
        assert [(r.model, r.variant, r.value) for r in rows] == [("propagated:swap", "swap", 1.6)]
        session.refresh(job)
        assert (job.progress_step, job.progress_total, job.eta_s) == (5, 10, 12.5)
