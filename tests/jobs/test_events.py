"""The worker's event log on the real Postgres: events reported during a database outage land late but whole and in
order (a restored stage's "skipped" event went missing when a refused write was dropped), and one job's events
commit in id order, so a reader paging with `after` never skips one."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import make_url, select, update
from sqlalchemy.orm import Session, sessionmaker

from langadapt.core.adaptation.events import Progress, StageSkipped, StageStarted
from langadapt.jobs import execution
from langadapt.jobs.db import make_engine, make_sessionmaker
from langadapt.jobs.models import Job, JobEvent
from langadapt.jobs.progress import JobEventRecorder
from tests.jobs.conftest import insert_job
from tests.tcp_proxy import TcpProxy


@pytest.fixture
def sessions(pg_url) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(pg_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def job_id(sessions) -> str:
    with sessions() as session:
        return insert_job(session, f"events-{id(session)}")


def _log(sessions: sessionmaker[Session], job_id: str) -> list[JobEvent]:
    with sessions() as session:
        return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def test_events_reported_while_the_database_is_down_land_in_order(pg_url, sessions, job_id) -> None:
    url = make_url(pg_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    engine = make_engine(url.set(port=proxy.port).render_as_string(hide_password=False))
    recorder = JobEventRecorder(make_sessionmaker(engine), job_id)
    try:
        recorder(StageStarted("inputs"))
        proxy.cut()  # the database is unreachable while the restored stages are found complete
        recorder(StageSkipped("tokenizer"))
        recorder(StageSkipped("init"))
        recorder(Progress("cpt", 1, 10, "steps"))  # superseded by later reports: dropped, not kept
        assert recorder.stage == "init"  # known at once, for an error report during the outage
        proxy.restore()
        recorder(StageStarted("cpt"))  # the next write takes the waiting events first
        assert recorder.flush(timeout_s=30)
    finally:
        engine.dispose()
        proxy.close()
    events = _log(sessions, job_id)
    assert [(e.type, e.stage, e.message) for e in events] == [
        ("stage", "inputs", "started"),
        ("stage", "tokenizer", "complete output found: skipped"),
        ("stage", "init", "complete output found: skipped"),
        ("stage", "cpt", "started"),
    ]
    times = [e.ts for e in events]
    assert times == sorted(times)  # each keeps the time it happened, not the time it was written
    with sessions() as session:
        assert session.get(Job, job_id).stage == "cpt"


def test_flush_reports_events_it_could_not_write(pg_url, job_id) -> None:
    url = make_url(pg_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    engine = make_engine(url.set(port=proxy.port).render_as_string(hide_password=False))
    recorder = JobEventRecorder(make_sessionmaker(engine), job_id)
    try:
        proxy.cut()
        recorder.message("kept while the database is away")
        assert not recorder.flush(timeout_s=1)
    finally:
        engine.dispose()


def test_a_job_event_waits_for_a_concurrent_writer_of_the_same_job(sessions, job_id) -> None:
    """Without the job-row lock the worker's event would take the next id and commit first: a stream that read it
    would move its cursor past the API's event, committed later with the smaller id."""
    with sessions() as api:
        api.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
        execution.append_event(api, job_id, type="message", message="cancel requested")  # id taken, not committed
        worker = threading.Thread(
            target=lambda: _add(sessions, job_id, "worker event"), name="worker-event", daemon=True
        )
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive()  # blocked on the job row until the API's transaction ends
        assert [e.message for e in _log(sessions, job_id)] == []
        api.commit()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert [e.message for e in _log(sessions, job_id)] == ["cancel requested", "worker event"]


def _add(sessions: sessionmaker[Session], job_id: str, message: str) -> None:
    with sessions() as session:
        execution.append_event(session, job_id, type="message", message=message)
        session.commit()
