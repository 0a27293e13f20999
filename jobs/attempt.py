"""One attempt of a job on a worker, from a claimed row to its recorded outcome: materialise the inputs, restore
what an earlier attempt finished, run the pipeline with its events recorded and each completed stage published,
and record how it ended (with the stage that failed and whether the user or the system caused it).

The pipeline itself is passed in (`core.adaptation.pipeline.run_pipeline` on a worker), so the job domain never
imports training code.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from langadapt.core.adaptation.corpus import split_heldout
from langadapt.core.adaptation.errors import AdaptationInputError, StageCancelled
from langadapt.core.adaptation.events import EventSink, StageStarted
from langadapt.core.adaptation.spec import AdaptationSpec
from langadapt.jobs import execution
from langadapt.jobs.artifacts import JobArtifacts, input_files, local_model
from langadapt.jobs.files import fetch_file
from langadapt.jobs.models import File, Job, JobStatus
from langadapt.jobs.progress import JobEventRecorder
from langadapt.jobs.settings import Settings
from langadapt.jobs.spec import JobRequest
from langadapt.jobs.storage import ArtifactStore, StorageError

log = logging.getLogger("langadapt.jobs")

FINISH_RETRY_S = 3600.0  # how long a finished job waits for the database to record its outcome


class Pipeline(Protocol):
    def __call__(
        self,
        spec: AdaptationSpec,
        run_dir: str,
        *,
        emit: EventSink,
        should_cancel: Callable[[], bool],
        on_stage_complete: Callable[[str, str], None],
    ) -> Any: ...


def run_attempt(
    job: Job,
    *,
    worker: str,
    settings: Settings,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    pipeline: Pipeline,
    should_cancel: Callable[[], bool],
) -> JobStatus | None:
    """Run a job this worker has claimed to a terminal status; None when the job was taken from the worker
    (reaped) before its outcome could be recorded."""
    events = JobEventRecorder(sessions, job.id)
    artifacts = JobArtifacts(store, sessions, job)
    run_dir = os.path.join(settings.work, "jobs", job.id)
    status, error = JobStatus.succeeded, None
    try:
        spec = _prepare(job, run_dir, settings, sessions, store, events)
        refs = [ref for ref in (job.base_model, job.instruct_model) if ref]
        artifacts.inputs = [file for ref in refs for file in input_files(settings, store, ref)]
        artifacts.restore_stages(run_dir)
        artifacts.restore_checkpoint(run_dir)
        pipeline(spec, run_dir, emit=events, should_cancel=should_cancel, on_stage_complete=artifacts.publish_stage)
    except StageCancelled as exc:
        status = JobStatus.cancelled
        events.message(str(exc))
    except AdaptationInputError as exc:
        status, error = JobStatus.failed, execution.JobError(exc.code, str(exc), events.stage or "inputs", "user")
    except StorageError as exc:
        status = JobStatus.failed
        error = execution.JobError("storage_unavailable", f"artifact storage: {exc}", events.stage, "system")
    except Exception as exc:
        log.exception("job %s failed", job.id)
        status = JobStatus.failed
        error = execution.JobError("internal_error", f"{type(exc).__name__}: {exc}", events.stage, "system")
    checkpoint_kept = status == JobStatus.succeeded or artifacts.save_checkpoint(run_dir)
    if error is not None:
        events.message(f"failed: {error.message}", level="error", stage=error.stage)
    events.flush(FINISH_RETRY_S)  # what the attempt reported lands before its outcome
    recorded = _finish(sessions, job.id, worker, status, error)
    if checkpoint_kept:  # completed stages and the checkpoint are in storage, where a retry restores them from
        shutil.rmtree(run_dir, ignore_errors=True)
    if not recorded:
        log.warning("job %s was taken from this worker (reaped?): result %s not recorded", job.id, status)
        return None
    if status == JobStatus.succeeded:
        artifacts.drop_checkpoint()
    return status


def _prepare(
    job: Job,
    run_dir: str,
    settings: Settings,
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    events: JobEventRecorder,
) -> AdaptationSpec:
    """The job's core spec with its files and models on this machine's disk."""
    request = JobRequest.model_validate(job.request)
    inputs = os.path.join(run_dir, "inputs")
    os.makedirs(inputs, exist_ok=True)
    events(StageStarted("inputs"))
    files = {}
    with sessions() as session:
        for field_name, file_id in request.file_ids().items():
            row = session.get(File, file_id)
            if row is None:
                raise AdaptationInputError(f"{field_name}: file {file_id} no longer exists", "file_not_found")
            files[field_name] = fetch_file(store, row, inputs)
    heldout = files.get("eval_file")
    if heldout is None:  # hold out the corpus's first characters: never train on evaluated text
        train, heldout = os.path.join(inputs, "train.jsonl"), os.path.join(inputs, "heldout.jsonl")
        split_heldout(files["corpus_file"], request.evaluation.heldout_chars, train, heldout)
        files["corpus_file"] = train
    models = {ref: local_model(settings, store, ref) for ref in (request.base_model, request.instruct_model) if ref}
    return request.to_adaptation_spec(files=files, models=models, heldout=heldout, mera_dir=settings.mera_dir)


def _finish(
    sessions: sessionmaker[Session], job_id: str, worker: str, status: JobStatus, error: execution.JobError | None
) -> bool:
    """Record the outcome, waiting out a database outage (the outcome is the one thing that must land)."""
    delay = 1.0
    deadline = time.monotonic() + FINISH_RETRY_S
    while True:
        try:
            with sessions() as session:
                return execution.finish_job(session, job_id, worker, status, error)
        except SQLAlchemyError as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("job %s: cannot record %s yet (%s); retrying in %.0f s", job_id, status, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
