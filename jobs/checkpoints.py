"""A job's CPT checkpoints in the artifact store as they are written, so an attempt that dies with its machine
(SIGKILL, lost node) resumes on any other from its last uploaded checkpoint: at most one checkpoint interval lost.

While an attempt runs, a thread watches the CPT working directory (`rundir.TrainingDir`) and uploads each new
complete checkpoint. It never blocks training: the loop writes the next checkpoint while one is uploading, and the
thread takes the newest when it is free again. A checkpoint is first hard-linked into `<run_dir>/cpt.upload/` (no
copy), so the loop may delete it meanwhile (it keeps only its newest); local disk holds at most one checkpoint more.

Store layout under the job's prefix: `checkpoints/<step>/...` (a snapshot of the training directory: its config
and one checkpoint) and `checkpoints/checkpoint.json`, the marker naming the complete snapshot, written after its
files; older snapshots are deleted once the marker names the new one (two at most, only while one uploads). A
storage error is logged and the next checkpoint tried; the attempt's end flushes the latest (`close`).

SFT (calibration) writes no checkpoints: an interrupted calibration stage runs again from its start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Callable

from langadapt.core.adaptation.manifest import is_complete
from langadapt.core.adaptation.rundir import CPT_WORK, TrainingDir
from langadapt.jobs.storage import ArtifactStore, StorageError

log = logging.getLogger("langadapt.jobs")

MARKER = "checkpoint.json"
STAGING = "cpt.upload"
POLL_S = 1.0


class CheckpointSync:
    """The checkpoints of one attempt's CPT: `restore` before it runs, `start` watching, `close` at its end."""

    def __init__(
        self, store: ArtifactStore, job_prefix: str, run_dir: str, on_saved: Callable[[int], None] = lambda _: None
    ) -> None:
        self.store, self.run_dir, self.on_saved = store, run_dir, on_saved
        self.prefix = job_prefix + "checkpoints/"
        self.work = TrainingDir(os.path.join(run_dir, CPT_WORK))
        self.staging = os.path.join(run_dir, STAGING)
        self.saved = 0  # the step the marker names (0: none)
        self._tried = 0  # the newest step an upload was started for
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="checkpoint-upload")

    def restore(self) -> int | None:
        """Fetch the checkpoint the marker names when this machine has none (a retry elsewhere); its step."""
        if is_complete(os.path.join(self.run_dir, "cpt")) or self.work.latest_checkpoint() is not None:
            return None
        if self.store.stat(self.prefix + MARKER) is None:
            return None
        marker = json.loads(b"".join(self.store.iter_bytes(self.prefix + MARKER)))
        for relative in marker["files"]:
            self.store.download(self.prefix + marker["snapshot"] + relative, os.path.join(self.work.root, relative))
        self.saved = self._tried = int(marker["step"])
        return self.saved

    def start(self) -> None:
        self._thread.start()

    def close(self) -> bool:
        """Stop watching and upload the newest local checkpoint if storage lacks it (a cancelled, failed or
        preempted attempt); False when that failed, so the local copy must stay for a retry on this machine."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        steps = self.work.checkpoint_steps()
        return not steps or steps[-1] <= self.saved or self._upload(steps[-1])

    def drop(self) -> None:
        """Delete the job's checkpoints from storage (the job succeeded: they have served)."""
        try:
            self.store.delete_prefix(self.prefix)
        except StorageError as exc:
            log.warning("stale checkpoints left in storage under %s: %s", self.prefix, exc)

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            steps = self.work.checkpoint_steps()
            if steps and steps[-1] > self._tried:
                self._tried = steps[-1]
                self._upload(steps[-1])

    def _upload(self, step: int) -> bool:
        snapshot = f"{step:08d}/"
        try:
            files = self._link(step)
            for relative in files:
                self.store.put_file(self.prefix + snapshot + relative, os.path.join(self.staging, relative))
            marker = {"step": step, "snapshot": snapshot, "files": files}
            self.store.put_bytes(self.prefix + MARKER, json.dumps(marker).encode(), "application/json")
        except (StorageError, OSError) as exc:  # the next checkpoint (or the attempt's end) tries again
            log.warning("checkpoint of step %d not uploaded to %s: %s", step, self.prefix, exc)
            return False
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
        self.saved = step
        self.on_saved(step)
        try:
            names = {obj.key[len(self.prefix) :].split("/", 1)[0] for obj in self.store.list(self.prefix)}
            for name in sorted(names - {snapshot.rstrip("/"), MARKER}):
                self.store.delete_prefix(self.prefix + name + "/")
        except StorageError as exc:  # deleted with the next one
            log.warning("older checkpoint left in %s: %s", self.prefix, exc)
        return True

    def _link(self, step: int) -> list[str]:
        """Hard-link the run's config and the checkpoint of `step` into the staging folder; their relative paths."""
        shutil.rmtree(self.staging, ignore_errors=True)
        checkpoint = self.work.checkpoint(step)
        sources = [self.work.config] + [
            os.path.join(root, name) for root, _, names in os.walk(checkpoint) for name in sorted(names)
        ]
        relatives = []
        for source in sources:
            relative = os.path.relpath(source, self.work.root).replace(os.sep, "/")
            target = os.path.join(self.staging, relative)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.link(source, target)
            relatives.append(relative)
        # The loop deletes a checkpoint only after writing a newer one: while `step` is still the newest, the
        # folder was complete when walked.
        if self.work.checkpoint_steps()[-1:] != [step]:
            raise FileNotFoundError(f"{checkpoint} was replaced by a newer checkpoint while being linked")
        return relatives
