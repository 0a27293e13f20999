"""Where things live in a run directory. Torch-free, so the job service finds stages and checkpoints without
loading training code.

    <run_dir>/<stage dir>/              a complete stage: its files, stage.json, manifest.json
    <run_dir>/<stage dir>.partial/      a stage being written (renamed into place when complete)
    <run_dir>/cpt.work/                 CPT's working directory until the cpt stage completes (`TrainingDir`)
    <run_dir>/init.aux/                 cached auxiliary spaces of focus / omp / regression (kept across retries)
    <run_dir>/calibration.cache.jsonl   the instruct model's cached calibration answers
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

STAGE_INFO = "stage.json"
LORA_ADAPTER = "lora_adapter"  # inside the cpt stage: the layers' delta of `lora+head`, merged into I by LEP
NEW_TOKENS = "new_token_ids.json"  # inside the init stage: ids of the tokens the source vocabulary lacks
CPT_WORK = "cpt.work"
AUXILIARY_CACHE = "init.aux"
CALIBRATION_CACHE = "calibration.cache.jsonl"

_CHECKPOINT = re.compile(r"step-(\d{8})")


def stage_dirname(stage: str) -> str:
    """The folder a stage writes to inside the run directory (`propagate:swap` -> `propagate-swap`)."""
    return stage.replace(":", "-")


@dataclass(frozen=True)
class TrainingDir:
    """A training run's directory (`run_cpt`'s `out_dir`):

    config.json                          the run's settings (written when it starts)
    checkpoints/step-00000500/           one per checkpoint, the newest `keep_checkpoints` kept
    checkpoints/.tmp-step-.../           a checkpoint being written (renamed into place when complete)
    model/, lora/, result.json           at the end
    """

    root: str

    CONFIG = "cpt_config.json"

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.root, "checkpoints")

    @property
    def config(self) -> str:
        return os.path.join(self.root, self.CONFIG)

    @property
    def model(self) -> str:
        return os.path.join(self.root, "model")

    @property
    def adapter(self) -> str:
        return os.path.join(self.root, "lora")

    def checkpoint(self, step: int) -> str:
        return os.path.join(self.checkpoints, f"step-{step:08d}")

    def checkpoint_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        if not os.path.isdir(self.checkpoints):
            return []
        return sorted(int(m.group(1)) for name in os.listdir(self.checkpoints) if (m := _CHECKPOINT.fullmatch(name)))

    def latest_checkpoint(self) -> str | None:
        steps = self.checkpoint_steps()
        return self.checkpoint(steps[-1]) if steps else None
