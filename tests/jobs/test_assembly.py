"""Model files kept as recipes (jobs/assembly.py): byte-exact round trips on both store backends, sharded models,
and a changed or vanished input model refused before any byte is streamed."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from sqlalchemy import update

from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.manifest import is_complete, write_manifest
from langadapt.jobs.artifacts import JobArtifacts
from langadapt.jobs.assembly import (
    INPUT_FILE,
    INPUT_OBJECT,
    Assembler,
    InputFile,
    InputModelChanged,
    InputModelUnavailable,
    TensorIndex,
    split,
)
from langadapt.jobs.execution import artifacts_of, record_artifacts
from langadapt.jobs.models import Artifact, Job, JobStatus
from langadapt.jobs.storage import ArtifactStore, LocalStore, S3Store
from tests.jobs.conftest import job_body


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        made: ArtifactStore = LocalStore(str(tmp_path / "store"))
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        made = S3Store(f"test-{uuid.uuid4().hex[:12]}", "p", endpoint, "test", "test", secure=False)
    made.ensure_ready()
    return made


def tensors(seed: int, vocab: int = 40) -> dict[str, np.ndarray]:
    """A tiny model's tensors: an embedding (changed by every stage below) and layers (kept)."""
    rng = np.random.default_rng(seed)
    layers = np.random.default_rng(0)
    return {
        "embed.weight": rng.standard_normal((vocab, 8)).astype(np.float32),
        "layer.0.w": layers.standard_normal((8, 8)).astype(np.float32),
        "layer.1.w": layers.standard_normal((8, 8)).astype(np.float32),
        "layer.1.b": layers.standard_normal((8,)).astype(np.float16),
        "norm.weight": np.ones(8, dtype=np.float32),
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def publish(store: ArtifactStore, index: TensorIndex, path: Path, key: str) -> tuple[dict, int]:
    blob = path.with_suffix(".blob")
    recipe, written = split(str(path), index, key, str(blob))
    if written:
        store.put_file(key, str(blob))
    return recipe, written


def test_round_trip_is_byte_exact_and_stores_only_changed_tensors(store: ArtifactStore, tmp_path: Path) -> None:
    base, stage, other = tmp_path / "base.safetensors", tmp_path / "stage.safetensors", tmp_path / "other.safetensors"
    save_file(tensors(1), str(base), metadata={"format": "pt"})
    save_file(tensors(2), str(stage))
    save_file(tensors(3), str(other))
    index = TensorIndex()
    index.add_inputs([InputFile(INPUT_FILE, str(base), str(base))])

    recipe, written = publish(store, index, stage, "job/tensors/stage")
    assert written == 40 * 8 * 4  # only the embedding: the layers are referenced in the input model
    assert recipe["size"] == stage.stat().st_size and recipe["sha256"] == sha256(stage)
    again, second = publish(store, index, other, "job/tensors/other")
    assert second == 40 * 8 * 4

    assembler = Assembler(store)
    for path, made in ((stage, recipe), (other, again)):
        assembler.verify(made)
        data = path.read_bytes()
        assert b"".join(assembler.chunks(made)) == data
        header = 8 + int.from_bytes(data[:8], "little")
        for start in (1, header - 1, header, header + 5, len(data) - 1):  # a resumed download (Range: bytes=N-)
            assert b"".join(assembler.chunks(made, start)) == data[start:], start
        assembler.save(made, str(tmp_path / "restored" / path.name))
        assert (tmp_path / "restored" / path.name).read_bytes() == path.read_bytes()

    # A stage equal to an earlier one stores nothing: every tensor is referenced.
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(stage.read_bytes())
    same, nothing = publish(store, index, copy, "job/tensors/copy")
    assert nothing == 0 and b"".join(assembler.chunks(same)) == stage.read_bytes()


def test_sharded_model_round_trips(store: ArtifactStore, tmp_path: Path) -> None:
    """Each shard of a sharded model is its own recipe; a tensor may come from any shard of the input."""
    model = tensors(1)
    names = sorted(model)
    inputs = []
    for number, part in enumerate((names[:2], names[2:])):
        shard = tmp_path / f"in-{number}.safetensors"
        save_file({name: model[name] for name in part}, str(shard))
        key = f"models/base/{shard.name}"
        store.put_file(key, str(shard))
        inputs.append(InputFile(INPUT_OBJECT, key, str(shard)))
    index = TensorIndex()
    index.add_inputs(inputs)
    changed = tensors(5)
    assembler = Assembler(store)
    for number, part in enumerate((names[:3], names[3:])):  # sharded differently from the input
        shard = tmp_path / f"out-{number}.safetensors"
        save_file({name: changed[name] if name == "embed.weight" else model[name] for name in part}, str(shard))
        recipe, written = publish(store, index, shard, f"job/tensors/out-{number}")
        assert written == (40 * 8 * 4 if "embed.weight" in part else 0)
        assembler.verify(recipe)
        assert hashlib.sha256(b"".join(assembler.chunks(recipe))).hexdigest() == sha256(shard)


def test_changed_or_vanished_input_model_is_refused_before_streaming(store: ArtifactStore, tmp_path: Path) -> None:
    base, stage = tmp_path / "base.safetensors", tmp_path / "stage.safetensors"
    save_file(tensors(1), str(base))
    save_file(tensors(2), str(stage))
    store.put_file("models/base/model.safetensors", str(base))
    local_index, store_index = TensorIndex(), TensorIndex()
    local_index.add_inputs([InputFile(INPUT_FILE, str(base), str(base))])
    store_index.add_inputs([InputFile(INPUT_OBJECT, "models/base/model.safetensors", str(base))])
    on_disk, _ = publish(store, local_index, stage, "job/tensors/a")
    in_store, _ = publish(store, store_index, stage, "job/tensors/b")
    assembler = Assembler(store)
    assembler.verify(on_disk)
    assembler.verify(in_store)

    changed = tensors(1)
    changed["layer.0.w"] = changed["layer.0.w"] + 1  # same size, other bytes
    save_file(changed, str(base))
    os.utime(base, ns=(1, 1))  # a new stamp, as any rewrite gives
    store.put_file("models/base/model.safetensors", str(base))
    for recipe in (on_disk, in_store):
        with pytest.raises(InputModelChanged) as caught:
            assembler.verify(recipe)
        assert caught.value.status == 409 and caught.value.code == "input_model_changed"
        with pytest.raises(InputModelChanged):
            assembler.save(recipe, str(tmp_path / "restored.safetensors"))
        assert not (tmp_path / "restored.safetensors").exists()

    base.unlink()
    store.delete_prefix("models/base")
    for recipe in (on_disk, in_store):
        with pytest.raises(InputModelUnavailable) as gone:
            assembler.verify(recipe)
        assert gone.value.status == 410 and gone.value.code == "input_model_unavailable"


def test_api_streams_an_assembled_model_and_refuses_a_changed_input(client, auth, model_root, files, tmp_path) -> None:
    """Through the API (Postgres, S3): the download is the complete file; a changed input model is a 409 and a
    vanished one a 410, answered before any byte, while HEAD keeps giving size and sha256."""
    job = client.post("/v1/jobs", headers=auth, json=job_body(model_root, files)).json()
    services = client.app.state.services
    base, stage = tmp_path / "base.safetensors", tmp_path / "stage.safetensors"
    save_file(tensors(1), str(base))
    save_file(tensors(2), str(stage))
    index = TensorIndex()
    index.add_inputs([InputFile(INPUT_FILE, str(base), str(base))])
    recipe, written = publish(services.store, index, stage, f"teams/t/jobs/{job['id']}/tensors/cpt/model.safetensors")
    with services.sessions() as session:
        session.execute(update(Job).where(Job.id == job["id"]).values(status=JobStatus.succeeded))
        row = Artifact(job_id=job["id"], name="cpt/model.safetensors", kind="adapted_base", recipe=recipe)
        row.size, row.sha256, row.storage_key, row.stored_bytes = recipe["size"], recipe["sha256"], "k", written
        record_artifacts(session, job["id"], [row])
    url = f"/v1/jobs/{job['id']}/artifacts/cpt/model.safetensors"

    download = client.get(url, headers=auth)
    assert download.status_code == 200 and download.content == stage.read_bytes()
    assert download.headers["x-content-sha256"] == sha256(stage)

    changed = tensors(1)
    changed["norm.weight"] = changed["norm.weight"] * 2
    save_file(changed, str(base))
    refused = client.get(url, headers=auth)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "input_model_changed"
    head = client.head(url, headers=auth)
    assert head.status_code == 200 and head.headers["x-content-sha256"] == sha256(stage)
    base.unlink()
    gone = client.get(url, headers=auth)
    assert gone.status_code == 410 and gone.json()["error"]["code"] == "input_model_unavailable"


def test_restore_rebuilds_complete_model_dirs_and_refuses_a_changed_input(
    client, auth, model_root, files, tmp_path
) -> None:
    """A retry elsewhere gets every published stage back complete: recipes assembled, whole files downloaded; an
    input model that changed since is the job's user error `input_model_changed`, not a wrong model."""
    job = client.post("/v1/jobs", headers=auth, json=job_body(model_root, files)).json()
    services = client.app.state.services
    with services.sessions() as session:
        row = session.get(Job, job["id"])
        session.expunge(row)
    base = tmp_path / "base.safetensors"
    save_file(tensors(1), str(base))
    stage = tmp_path / "run" / "cpt"
    stage.mkdir(parents=True)
    shards = (["embed.weight", "layer.0.w"], ["layer.1.b", "layer.1.w", "norm.weight"])
    for number, part in enumerate(shards, start=1):
        save_file({name: tensors(2)[name] for name in part}, str(stage / f"model-0000{number}-of-00002.safetensors"))
    (stage / "model.safetensors.index.json").write_text("{}")
    write_manifest(str(stage))
    artifacts = JobArtifacts(services.store, services.sessions, row)
    artifacts.inputs = [InputFile(INPUT_FILE, str(base), str(base))]
    artifacts.publish_stage("cpt", str(stage))
    with services.sessions() as session:
        listed = {a.name: a for a in artifacts_of(session, job["id"])}
    assert listed["cpt/model-00001-of-00002.safetensors"].stored_bytes == 40 * 8 * 4  # the layers: in the input
    assert listed["cpt/model-00002-of-00002.safetensors"].stored_bytes == 0

    elsewhere = tmp_path / "elsewhere"
    JobArtifacts(services.store, services.sessions, row).restore_stages(str(elsewhere))
    assert is_complete(str(elsewhere / "cpt"), verify_hashes=True)
    assert sorted(os.listdir(elsewhere / "cpt")) == sorted(os.listdir(stage))

    changed = tensors(1)
    changed["layer.1.w"] = changed["layer.1.w"] * 3
    save_file(changed, str(base))
    with pytest.raises(AdaptationInputError) as caught:
        JobArtifacts(services.store, services.sessions, row).restore_stages(str(tmp_path / "third"))
    assert caught.value.code == "input_model_changed"
