"""Drive one job through `core.adaptation.pipeline`: materialise its inputs, run the stages, upload each
completed stage's files, store the scores, and record how the job ended.

The job row is the source of truth. A monitor thread heartbeats it and watches the cancel flag; the pipeline polls
the flag through `should_cancel`. Completed stages are uploaded as they finish, and restored from storage before
a retry on a machine that lacks them, so a retry never re-runs finished work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from langadapt.core.adaptation.corpus import split_heldout
from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.manifest import MANIFEST, is_complete, read_manifest, sha256_file
from langadapt.core.adaptation.pipeline import CPT_WORK, StageCancelled, run_pipeline, stage_dirname
from langadapt.core.adaptation.train.cpt import CONFIG_FILE as CPT_CONFIG_FILE
from langadapt.core.adaptation.train.cpt import latest_checkpoint
from langadapt.jobs import execution, layout
from langadapt.jobs.catalogue import catalogue, model_objects, store_key
from langadapt.jobs.files import fetch_file
from langadapt.jobs.models import Artifact, File, Job, JobStatus
from langadapt.jobs.settings import Settings
from langadapt.jobs.spec import JobRequest
from langadapt.jobs.storage import ArtifactStore, S3Store, StorageError

log = logging.getLogger("langadapt.worker")

CHECKPOINT_MARKER = "checkpoint.json"
FINISH_RETRY_S = 3600.0  # how long a finished job waits for the database to record its outcome
ARTIFACT_KINDS = {
    "tokenizer": "tokenizer",
    "init": "initialised_base",
    "cpt": "adapted_base",
    "propagate": "propagated_instruct",
    "calibration-data": "calibration_data",
    "calibrate": "calibrated_instruct",
    "evaluate": "eval_report",
}


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def job_prefix(job: Job) -> str:
    return layout.job_prefix(job.team_id, job.id)


class Monitor(threading.Thread):
    """Heartbeats the job every `interval` seconds and raises `stop` on a cancel request or lost ownership."""

    def __init__(self, sessions: sessionmaker[Session], job_id: str, worker: str, interval: float) -> None:
        super().__init__(daemon=True, name=f"monitor-{job_id}")
        self.sessions, self.job_id, self.worker, self.interval = sessions, job_id, worker, interval
        self.stop = threading.Event()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                with self.sessions() as session:
                    if execution.heartbeat(session, self.job_id, self.worker):
                        self.stop.set()
            except Exception as exc:  # a database blip must not kill the job; the reaper judges staleness
                log.warning("heartbeat for %s failed: %s", self.job_id, exc)

    def close(self) -> None:
        self._done.set()
        self.join(timeout=5)


@dataclass
class _Progress:
    """Turns pipeline events into job-row updates and event rows; estimates the ETA per stage."""

    sessions: sessionmaker[Session]
    job_id: str
    stage: str | None = None
    _first: dict[str, tuple[float, int]] = field(default_factory=dict)

    def __call__(self, event: dict[str, Any]) -> None:
        kind, stage = event.get("type", "message"), event.get("stage")
        new_stage = kind == "stage" and not str(event.get("message", "")).startswith("done")
        if new_stage:
            self.stage = stage
        try:
            with self.sessions() as session:
                if new_stage:
                    execution.set_stage(session, self.job_id, stage)
                if kind == "metrics":
                    self._progress(session, stage, event.get("data") or {})
                execution.add_event(
                    session,
                    self.job_id,
                    type=kind,
                    stage=stage,
                    message=event.get("message", ""),
                    data=event.get("data"),
                )
        except SQLAlchemyError as exc:  # a database blip must not kill hours of training; the log keeps the event
            log.warning("job %s: event not recorded (%s): %s", self.job_id, type(exc).__name__, event)

    def _progress(self, session: Session, stage: str | None, data: dict[str, Any]) -> None:
        step, total = data.get("step", data.get("done")), data.get("total_steps", data.get("total"))
        if not isinstance(step, int) or not isinstance(total, int) or stage is None:
            return
        now = time.monotonic()
        first_time, first_step = self._first.setdefault(stage, (now, step))
        eta = None
        if step > first_step:
            eta = round((total - step) * (now - first_time) / (step - first_step), 1)
        execution.set_progress(session, self.job_id, step=step, total=total, eta_s=eta)


class JobRunner:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], store: ArtifactStore) -> None:
        self.settings, self.sessions, self.store = settings, sessions, store
        self.worker = worker_name()

    def run(self, job_id: str) -> JobStatus | None:
        """Run a queued job to a terminal status; None when it was not queued (cancelled, taken, unknown)."""
        with self.sessions() as session:
            job = execution.claim_job(session, job_id, self.worker)
        if job is None:
            log.info("job %s is not queued: skipped", job_id)
            return None
        log.info("job %s: attempt %d on %s", job.id, job.attempt, self.worker)
        monitor = Monitor(self.sessions, job.id, self.worker, self.settings.heartbeat_interval_s)
        monitor.start()
        progress = _Progress(self.sessions, job.id)
        status, error = JobStatus.succeeded, None
        try:
            self._run(job, progress, monitor)
        except StageCancelled as exc:
            status = JobStatus.cancelled
            progress({"type": "message", "stage": progress.stage, "message": str(exc)})
        except AdaptationInputError as exc:
            status = JobStatus.failed
            error = execution.JobError(exc.code, str(exc), progress.stage or "inputs", "user")
        except StorageError as exc:
            status = JobStatus.failed
            error = execution.JobError("storage_unavailable", f"artifact storage: {exc}", progress.stage, "system")
        except Exception as exc:
            log.exception("job %s failed", job.id)
            status = JobStatus.failed
            error = execution.JobError("internal_error", f"{type(exc).__name__}: {exc}", progress.stage, "system")
        finally:
            monitor.close()
        if status != JobStatus.succeeded:
            self._save_checkpoint(job)
        if error is not None:
            progress({"type": "message", "stage": error.stage, "message": f"failed: {error.message}"})
        if not self._finish(job.id, status, error):
            log.warning("job %s was taken from this worker (reaped?): result %s not recorded", job.id, status)
            return None
        if status == JobStatus.succeeded:  # everything is in storage now: drop scratch space and checkpoints
            shutil.rmtree(self._run_dir(job), ignore_errors=True)
            self._drop_checkpoint(job)
        return status

    def _finish(self, job_id: str, status: JobStatus, error: execution.JobError | None) -> bool:
        """Record the outcome, waiting out a database outage (the outcome is the one thing that must land)."""
        delay = 1.0
        deadline = time.monotonic() + FINISH_RETRY_S
        while True:
            try:
                with self.sessions() as session:
                    return execution.finish_job(session, job_id, self.worker, status, error)
            except SQLAlchemyError as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("job %s: cannot record %s yet (%s); retrying in %.0f s", job_id, status, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _run_dir(self, job: Job) -> str:
        return os.path.join(self.settings.work, "jobs", job.id)

    def _run(self, job: Job, progress: _Progress, monitor: Monitor) -> None:
        request = JobRequest.model_validate(job.request)
        run_dir = self._run_dir(job)
        inputs = os.path.join(run_dir, "inputs")
        os.makedirs(inputs, exist_ok=True)
        progress({"type": "stage", "stage": "inputs", "message": "started"})
        files = self._fetch_files(request, inputs)
        heldout = files.get("eval_file")
        if heldout is None:  # hold out the corpus's first characters: never train on evaluated text
            train, heldout = os.path.join(inputs, "train.jsonl"), os.path.join(inputs, "heldout.jsonl")
            split_heldout(files["corpus_file"], request.evaluation.heldout_chars, train, heldout)
            files["corpus_file"] = train
        models = {ref: self._model_path(ref, job) for ref in (request.base_model, request.instruct_model) if ref}
        spec = request.to_adaptation_spec(files=files, models=models, heldout=heldout, mera_dir=self.settings.mera_dir)
        self._restore_stages(job, run_dir)
        self._restore_checkpoint(job, run_dir)
        run_pipeline(
            spec,
            run_dir,
            emit=progress,
            should_cancel=monitor.stop.is_set,
            on_stage_complete=lambda stage, path: self._publish(job, stage, path),
        )

    def _fetch_files(self, request: JobRequest, inputs: str) -> dict[str, str]:
        paths = {}
        with self.sessions() as session:
            for field_name, file_id in request.file_ids().items():
                row = session.get(File, file_id)
                if row is None:
                    raise AdaptationInputError(f"{field_name}: file {file_id} no longer exists", "file_not_found")
                paths[field_name] = fetch_file(self.store, row, inputs)
        return paths

    def _model_path(self, ref: str, job: Job) -> str:
        """A local spec core can load: shortcuts stay names, configured names and s3:// URIs become local paths."""
        entry = catalogue(self.settings).get(ref)
        if entry is not None and entry.source == "builtin":
            return ref
        location = entry.location if entry is not None else ref
        if not location.startswith("s3://"):
            return location
        key = store_key(self.store, location) if isinstance(self.store, S3Store) else None
        if key is None:
            raise AdaptationInputError(f"model {ref!r}: {location} is not in this service's store", "invalid_model")
        target = os.path.join(self.settings.work, "models", hashlib.sha256(location.encode()).hexdigest()[:16])
        objects = model_objects(self.store, key)
        if not objects:
            raise AdaptationInputError(f"model {ref!r}: no objects in storage", "invalid_model")
        for obj in objects:
            relative = obj.key[len(key) :].lstrip("/") or os.path.basename(key)
            path = os.path.join(target, relative)
            if not os.path.exists(path) or os.path.getsize(path) != obj.size:
                self.store.download(obj.key, path)
        return target if len(objects) > 1 or objects[0].key != key else os.path.join(target, os.path.basename(key))

    def _restore_stages(self, job: Job, run_dir: str) -> None:
        """Download completed stages this machine lacks (a retry elsewhere), so they are skipped, not re-run."""
        with self.sessions() as session:
            artifacts = execution.artifacts_of(session, job.id)
        by_stage: dict[str, list[Artifact]] = {}
        for artifact in artifacts:
            by_stage.setdefault(artifact.name.split("/", 1)[0], []).append(artifact)
        for directory, rows in by_stage.items():
            local = os.path.join(run_dir, directory)
            if is_complete(local) or not any(row.name.endswith("/" + MANIFEST) for row in rows):
                continue
            shutil.rmtree(local, ignore_errors=True)
            for row in rows:
                self.store.download(row.storage_key, os.path.join(run_dir, row.name))

    def _save_checkpoint(self, job: Job) -> None:
        """Keep an interrupted CPT's latest checkpoint in storage too, so a retry on another machine resumes it.
        Best-effort: the local copy stays for a retry here; the marker is written last."""
        work = os.path.join(self._run_dir(job), CPT_WORK)
        checkpoint = latest_checkpoint(work)
        if checkpoint is None:
            return
        prefix = job_prefix(job) + "checkpoints/"
        files = [os.path.join(work, CPT_CONFIG_FILE)] + [
            os.path.join(root, name) for root, _, names in os.walk(checkpoint) for name in names
        ]
        try:
            self.store.delete_prefix(prefix)
            for path in files:
                self.store.put_file(prefix + os.path.relpath(path, work).replace(os.sep, "/"), path)
            marker = {"checkpoint": os.path.relpath(checkpoint, work), "files": len(files)}
            self.store.put_bytes(prefix + CHECKPOINT_MARKER, json.dumps(marker).encode())
        except (StorageError, OSError) as exc:
            log.warning("job %s: checkpoint not saved to storage: %s", job.id, exc)

    def _drop_checkpoint(self, job: Job) -> None:
        try:
            self.store.delete_prefix(job_prefix(job) + "checkpoints/")
        except StorageError as exc:
            log.warning("job %s: stale checkpoint left in storage: %s", job.id, exc)

    def _restore_checkpoint(self, job: Job, run_dir: str) -> None:
        """Before a retry on a machine without the interrupted CPT's checkpoint, fetch it from storage."""
        work = os.path.join(run_dir, CPT_WORK)
        if is_complete(os.path.join(run_dir, "cpt")) or latest_checkpoint(work) is not None:
            return
        prefix = job_prefix(job) + "checkpoints/"
        if self.store.stat(prefix + CHECKPOINT_MARKER) is None:
            return
        for obj in self.store.list(prefix):
            relative = obj.key[len(prefix) :]
            if relative != CHECKPOINT_MARKER:
                self.store.download(obj.key, os.path.join(work, relative))

    def _publish(self, job: Job, stage: str, path: str) -> None:
        """Upload a completed stage's files (manifest last), record them, and the scores after `evaluate`."""
        directory = stage_dirname(stage)
        manifest = read_manifest(path) or {"files": []}
        hashes = {entry["path"]: entry["sha256"] for entry in manifest["files"]}
        with self.sessions() as session:
            known = {a.name: a.sha256 for a in execution.artifacts_of(session, job.id)}
        kind = ARTIFACT_KINDS.get(stage.split(":", 1)[0], "other")
        rows = []
        for relative in [*sorted(hashes), MANIFEST]:
            name = f"{directory}/{relative}"
            local = os.path.join(path, relative)
            sha = hashes.get(relative) or sha256_file(local)
            key = job_prefix(job) + "artifacts/" + name
            if known.get(name) != sha:
                self.store.put_file(key, local)
            rows.append(
                Artifact(job_id=job.id, name=name, kind=kind, size=os.path.getsize(local), sha256=sha, storage_key=key)
            )
        with self.sessions() as session:
            execution.record_artifacts(session, job.id, rows)
            everything = execution.artifacts_of(session, job.id)
            if stage == "evaluate":
                with open(os.path.join(path, "scores.json"), encoding="utf-8") as handle:
                    execution.record_scores(session, job, json.load(handle))
        job_manifest = {
            "job_id": job.id,
            "artifacts": [{"name": a.name, "kind": a.kind, "size": a.size, "sha256": a.sha256} for a in everything],
        }
        self.store.put_bytes(job_prefix(job) + MANIFEST, json.dumps(job_manifest, indent=2).encode())
