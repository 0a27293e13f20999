"""CheckpointSync on a local store, with checkpoint folders laid out as CPT writes them (`rundir.TrainingDir`)."""

from __future__ import annotations

import os
import shutil

from langadapt.core.adaptation.rundir import CPT_WORK, TrainingDir
from langadapt.jobs.checkpoints import MARKER, CheckpointSync
from langadapt.jobs.storage import LocalStore, StorageUnavailable

PREFIX = "teams/t/jobs/j/"


def _write_checkpoint(work: TrainingDir, step: int, keep: int = 1) -> None:
    """As CPT does: a complete folder renamed into place, the older ones beyond `keep` deleted."""
    os.makedirs(work.checkpoints, exist_ok=True)
    if not os.path.exists(work.config):
        with open(work.config, "w", encoding="utf-8") as handle:
            handle.write('{"steps": 100}')
    tmp = os.path.join(work.checkpoints, f".tmp-step-{step:08d}")
    os.makedirs(tmp)
    for name in ("state.json", "trainable.safetensors", "optimizer.pt"):
        with open(os.path.join(tmp, name), "w", encoding="utf-8") as handle:
            handle.write(f"{name} at {step}")
    os.replace(tmp, work.checkpoint(step))
    for old in work.checkpoint_steps()[:-keep]:
        shutil.rmtree(work.checkpoint(old))


class FlakyStore(LocalStore):
    """Refuses uploads while `down`."""

    down = False

    def put_file(self, key: str, path: str):
        if self.down:
            raise StorageUnavailable("storage is down")
        return super().put_file(key, path)


def test_each_checkpoint_replaces_the_last_in_storage_and_restores_elsewhere(tmp_path) -> None:
    store = FlakyStore(str(tmp_path / "store"))
    run_dir = str(tmp_path / "machine-1")
    work = TrainingDir(os.path.join(run_dir, CPT_WORK))
    saved: list[int] = []
    sync = CheckpointSync(store, PREFIX, run_dir, on_saved=saved.append)

    _write_checkpoint(work, 20)
    assert sync._upload(20)
    _write_checkpoint(work, 40)
    assert sync._upload(40)
    keys = sorted(obj.key.removeprefix(PREFIX + "checkpoints/") for obj in store.list(PREFIX))
    assert keys == [
        "00000040/checkpoints/step-00000040/optimizer.pt",
        "00000040/checkpoints/step-00000040/state.json",
        "00000040/checkpoints/step-00000040/trainable.safetensors",
        "00000040/cpt_config.json",
        MARKER,
    ]  # the older snapshot went once the marker named the newer
    assert saved == [20, 40] and not os.path.exists(os.path.join(run_dir, "cpt.upload"))

    # A storage error is not fatal: the checkpoint stays local, the next one (or the attempt's end) goes up.
    store.down = True
    _write_checkpoint(work, 60)
    assert not sync._upload(60) and sync.saved == 40
    store.down = False
    _write_checkpoint(work, 80)
    assert sync.close() and sync.saved == 80  # the end of the attempt flushes the newest

    other = str(tmp_path / "machine-2")  # an empty scratch folder on another machine
    elsewhere = CheckpointSync(store, PREFIX, other)
    assert elsewhere.restore() == 80
    restored = TrainingDir(os.path.join(other, CPT_WORK))
    assert restored.checkpoint_steps() == [80]
    for name in ("state.json", "optimizer.pt"):
        with open(os.path.join(restored.checkpoint(80), name), encoding="utf-8") as handle:
            assert handle.read() == f"{name} at 80"
    assert os.path.exists(restored.config)
    assert CheckpointSync(store, PREFIX, run_dir).restore() is None  # a local checkpoint wins
    elsewhere.drop()
    assert store.list(PREFIX) == []


def test_a_checkpoint_replaced_while_being_linked_is_not_uploaded(tmp_path, monkeypatch) -> None:
    store = LocalStore(str(tmp_path / "store"))
    run_dir = str(tmp_path / "run")
    work = TrainingDir(os.path.join(run_dir, CPT_WORK))
    sync = CheckpointSync(store, PREFIX, run_dir)
    _write_checkpoint(work, 20)
    link = os.link

    def link_then_race(source: str, target: str) -> None:  # CPT writes step 40 (deleting 20) meanwhile
        link(source, target)
        if work.checkpoint_steps() != [40]:
            _write_checkpoint(work, 40)

    monkeypatch.setattr(os, "link", link_then_race)
    assert not sync._upload(20) and store.list(PREFIX) == []
    monkeypatch.setattr(os, "link", link)
    assert sync._upload(40) and sync.saved == 40
