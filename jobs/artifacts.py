"""A job's files in the artifact store, as the worker side needs them: completed stages published as they finish
and restored before a retry elsewhere, and models named by s3:// URIs.

Store layout under `layout.job_prefix(team, job)`: `artifacts/<stage dir>/<file>`, the job's `manifest.json`
(every artifact with size and sha256), `tensors/<stage dir>/<file>.<sha>` (the new tensors of a `.safetensors`
file, kept as a recipe on its row: `assembly.py`) and `checkpoints/` (CPT's latest checkpoint: `checkpoints.py`).
Torch-free: run directories are read through `core.adaptation.rundir`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile

from sqlalchemy.orm import Session, sessionmaker

from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.manifest import MANIFEST, is_complete, read_manifest, sha256_file
from langadapt.core.adaptation.rundir import stage_dirname
from langadapt.jobs import execution, layout
from langadapt.jobs.assembly import INPUT_FILE, INPUT_OBJECT, Assembler, InputFile, TensorIndex, split
from langadapt.jobs.catalogue import allowed_path, catalogue, model_objects, store_key
from langadapt.jobs.errors import ServiceError
from langadapt.jobs.models import Artifact, Job
from langadapt.jobs.settings import Settings
from langadapt.jobs.storage import ArtifactStore, S3Store

log = logging.getLogger("langadapt.jobs")

ARTIFACT_KINDS = {
    "tokenizer": "tokenizer",
    "init": "initialised_base",
    "cpt": "adapted_base",
    "propagate": "propagated_instruct",
    "calibration-data": "calibration_data",
    "calibrate": "calibrated_instruct",
    "evaluate": "eval_report",
}


class JobArtifacts:
    """The store side of one job's completed stages: `publish_stage` / `restore_stages`. `inputs` are the input
    models' safetensors files, whose tensors published models reference, not copy."""

    def __init__(self, store: ArtifactStore, sessions: sessionmaker[Session], job: Job) -> None:
        self.store, self.sessions, self.job = store, sessions, job
        self.prefix = layout.job_prefix(job.team_id, job.id)
        self.inputs: list[InputFile] = []
        self._index: TensorIndex | None = None

    def publish_stage(self, stage: str, path: str) -> None:
        """Upload a completed stage's new files (manifest last), record them, and the scores after `evaluate`."""
        directory = stage_dirname(stage)
        manifest = read_manifest(path) or {"files": []}
        hashes = {entry["path"]: entry["sha256"] for entry in manifest["files"]}
        with self.sessions() as session:
            published = execution.artifacts_of(session, self.job.id)
        known = {a.name: a.sha256 for a in published}
        stored = {a.sha256: a.storage_key for a in published if a.recipe is None}  # e.g. each stage's tokenizer
        kind = ARTIFACT_KINDS.get(stage.split(":", 1)[0], "other")
        rows = []
        for relative in [*sorted(hashes), MANIFEST]:
            name = f"{directory}/{relative}"
            local = os.path.join(path, relative)
            sha = hashes.get(relative) or sha256_file(local)
            if known.get(name) == sha:  # published by an earlier attempt
                continue
            size = os.path.getsize(local)
            row = Artifact(job_id=self.job.id, name=name, kind=kind, size=size, sha256=sha)
            if not (relative.endswith(".safetensors") and self._put_tensors(row, local, os.path.dirname(path))):
                self._put_file(row, local, stored)
            rows.append(row)
        with self.sessions() as session:
            execution.record_artifacts(session, self.job.id, rows)
            everything = execution.artifacts_of(session, self.job.id)
            if stage == "evaluate":
                with open(os.path.join(path, "scores.json"), encoding="utf-8") as handle:
                    execution.record_scores(session, self.job, json.load(handle))
        job_manifest = {
            "job_id": self.job.id,
            "artifacts": [{"name": a.name, "kind": a.kind, "size": a.size, "sha256": a.sha256} for a in everything],
        }
        self.store.put_bytes(self.prefix + MANIFEST, json.dumps(job_manifest, indent=2).encode())

    def _put_file(self, row: Artifact, local: str, stored: dict[str, str]) -> None:
        """Upload a file whole, unless the job stores the same bytes already (`stored`: sha256 -> key)."""
        if row.sha256 in stored:
            row.storage_key, row.stored_bytes = stored[row.sha256], 0
            return
        row.storage_key, row.stored_bytes = self.prefix + "artifacts/" + row.name, row.size
        self.store.put_file(row.storage_key, local)
        stored[row.sha256] = row.storage_key

    def _put_tensors(self, row: Artifact, local: str, run_dir: str) -> bool:
        """Store only the tensors of a safetensors file that neither this job nor its input models hold yet; False
        when the file is not one `assembly` can split (it is then stored whole)."""
        index = self._tensor_index()
        row.storage_key = f"{self.prefix}tensors/{row.name}.{row.sha256[:16]}"
        with tempfile.TemporaryDirectory(dir=run_dir, prefix=".tensors-") as scratch:
            blob = os.path.join(scratch, "tensors")
            try:
                row.recipe, row.stored_bytes = split(local, index, row.storage_key, blob)
            except (ValueError, KeyError, TypeError):
                return False
            if row.stored_bytes:
                self.store.put_file(row.storage_key, blob)
        return True

    def _tensor_index(self) -> TensorIndex:
        """The tensors already stored by this job (also by an earlier attempt elsewhere) and the input models'."""
        if self._index is None:
            self._index = TensorIndex()
            self._index.add_inputs(self.inputs)
            with self.sessions() as session:
                for row in execution.artifacts_of(session, self.job.id):
                    if row.recipe is not None:
                        self._index.add_recipe(row.recipe)
        return self._index

    def restore_stages(self, run_dir: str) -> None:
        """Download completed stages this machine lacks (a retry elsewhere), so they are skipped, not re-run;
        model files kept as recipes are assembled complete."""
        with self.sessions() as session:
            artifacts = execution.artifacts_of(session, self.job.id)
        by_stage: dict[str, list[Artifact]] = {}
        for artifact in artifacts:
            by_stage.setdefault(artifact.name.split("/", 1)[0], []).append(artifact)
        assembler = Assembler(self.store)
        for directory, rows in by_stage.items():
            local = os.path.join(run_dir, directory)
            if is_complete(local) or not any(row.name.endswith("/" + MANIFEST) for row in rows):
                continue
            shutil.rmtree(local, ignore_errors=True)
            for row in rows:
                target = os.path.join(run_dir, row.name)
                if row.recipe is None:
                    self.store.download(row.storage_key, target)
                    continue
                try:
                    assembler.save(row.recipe, target)
                except ServiceError as exc:
                    raise AdaptationInputError(f"stored stage {directory}: {exc.message}", exc.code) from exc


def local_model(settings: Settings, store: ArtifactStore, ref: str) -> str:
    """A model spec core can load: shortcuts stay names, configured names and s3:// URIs become local paths (an
    s3 model is downloaded once into the worker's model cache)."""
    entry = catalogue(settings).get(ref)
    if entry is not None and entry.source == "builtin":
        return ref
    location = entry.location if entry is not None else ref
    if entry is None and not location.startswith("s3://"):
        real = allowed_path(location, settings)  # resolved again: a link swapped in since submit is refused
        if real is None:
            raise AdaptationInputError(f"model {ref!r} now resolves outside the allowed model roots", "invalid_model")
        return real
    if not location.startswith("s3://"):
        return location
    key = store_key(store, location) if isinstance(store, S3Store) else None
    if key is None:
        raise AdaptationInputError(f"model {ref!r}: {location} is not in this service's store", "invalid_model")
    target = os.path.join(settings.work, "models", hashlib.sha256(location.encode()).hexdigest()[:16])
    objects = model_objects(store, key)
    if not objects:
        raise AdaptationInputError(f"model {ref!r}: no objects in storage", "invalid_model")
    for obj in objects:
        relative = obj.key[len(key) :].lstrip("/") or os.path.basename(key)
        path = os.path.join(target, relative)
        if not os.path.exists(path) or os.path.getsize(path) != obj.size:
            store.download(obj.key, path)
    return target if len(objects) > 1 or objects[0].key != key else os.path.join(target, os.path.basename(key))


def input_files(settings: Settings, store: ArtifactStore, ref: str) -> list[InputFile]:
    """The safetensors files of an input model (a Hugging Face folder), where assembly reads them again: the
    path, or the store key of an s3:// model. Single-file models (.gguf) and shortcuts have none."""
    entry = catalogue(settings).get(ref)
    if entry is not None and entry.source == "builtin":
        return []
    local = local_model(settings, store, ref)
    if not os.path.isdir(local):
        return []
    names = sorted(name for name in os.listdir(local) if name.endswith(".safetensors"))
    location = entry.location if entry is not None else ref
    if location.startswith("s3://"):
        key = store_key(store, location) if isinstance(store, S3Store) else None
        return [InputFile(INPUT_OBJECT, f"{key}/{name}", os.path.join(local, name)) for name in names]
    return [InputFile(INPUT_FILE, os.path.join(local, name), os.path.join(local, name)) for name in names]
