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
from langadapt.core.adaptation.events import EventSink, Message, StageStarted
from langadapt.core.adaptation.spec import AdaptationSpec
from langadapt.jobs import execution
from langadapt.jobs.artifacts import JobArtifacts, input_files, local_model
from langadapt.jobs.checkpoints import CheckpointSync
from langadapt.jobs.files import fetch_file
from langadapt.jobs.models import AttemptOutcome, File, Job, JobStatus
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
    preempted: Callable[[], bool],
) -> JobStatus | None:
    """Run a job this worker has claimed to the end of this attempt: a terminal status, or `queued` when the job
    gets another attempt (a retried system failure, or `preempted()`: the worker is shutting down). None when the
    job was taken from the worker (reaped) before its outcome could be recorded."""
    events = JobEventRecorder(sessions, job.id)
    artifacts = JobArtifacts(store, sessions, job)
    run_dir = os.path.join(settings.work, "jobs", job.id)
    checkpoints = CheckpointSync(store, artifacts.prefix, run_dir, on_saved=lambda step: _saved(events, step))
    outcome, error = AttemptOutcome.succeeded, None
    try:
        spec = _prepare(job, run_dir, settings, sessions, store, events)
        refs = [ref for ref in (job.base_model, job.instruct_model) if ref]
        artifacts.inputs = [file for ref in refs for file in input_files(settings, store, ref)]
        artifacts.restore_stages(run_dir)
        restored = checkpoints.restore()
        if restored is not None:
            events.message(f"checkpoint of step {restored} fetched from storage: CPT resumes from it", stage="cpt")
        checkpoints.start()
        pipeline(
            spec,
            run_dir,
            emit=events,
            should_cancel=lambda: should_cancel() or preempted(),
            on_stage_complete=artifacts.publish_stage,
        )
    except StageCancelled as exc:
        outcome = AttemptOutcome.preempted if preempted() else AttemptOutcome.cancelled
        events.message(str(exc))
    except AdaptationInputError as exc:
        outcome, error = AttemptOutcome.failed, execution.JobError(exc.code, str(exc), events.stage or "inputs", "user")
    except StorageError as exc:
        outcome = AttemptOutcome.failed
        error = execution.JobError("storage_unavailable", f"artifact storage: {exc}", events.stage, "system")
    except Exception as exc:
        log.exception("job %s failed", job.id)
        outcome = AttemptOutcome.failed
        error = execution.JobError("internal_error", f"{type(exc).__name__}: {exc}", events.stage, "system")
    checkpoint_kept = checkpoints.close()  # an interrupted CPT's newest checkpoint is in storage
    if error is not None:
        events.message(f"failed: {error.message}", level="error", stage=error.stage)
    events.flush(FINISH_RETRY_S)  # what the attempt reported lands before its outcome
    status = _finish(sessions, job.id, worker, outcome, error, settings.retry_backoff_s)
    if checkpoint_kept:  # completed stages and the checkpoint are in storage, where a retry restores them from
        shutil.rmtree(run_dir, ignore_errors=True)
    if status is None:
        log.warning("job %s was taken from this worker (reaped?): result %s not recorded", job.id, outcome)
    elif status == JobStatus.succeeded:
        checkpoints.drop()
    return status


def _saved(events: JobEventRecorder, step: int) -> None:
    events(Message("cpt", f"checkpoint of step {step} saved to storage", data={"checkpoint_step": step}))


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
    sessions: sessionmaker[Session],
    job_id: str,
    worker: str,
    outcome: AttemptOutcome,
    error: execution.JobError | None,
    backoff_s: float,
) -> JobStatus | None:
    """Record the outcome, waiting out a database outage (the outcome is the one thing that must land)."""
    delay = 1.0
    deadline = time.monotonic() + FINISH_RETRY_S
    while True:
        try:
            with sessions() as session:
                return execution.finish_job(session, job_id, worker, outcome, error, backoff_s=backoff_s)
        except SQLAlchemyError as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("job %s: cannot record %s yet (%s); retrying in %.0f s", job_id, outcome, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
