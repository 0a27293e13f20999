"""Typed events the pipeline reports to whoever runs it: the CLI prints them, the job service turns them into job
rows and event rows. A caller dispatches on the type, never on message text. Torch-free."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class StageStarted:
    stage: str


@dataclass(frozen=True)
class StageSkipped:
    """The stage's complete output was found (an earlier run, or restored from storage): not run again."""

    stage: str


@dataclass(frozen=True)
class StageDone:
    stage: str
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Progress:
    """`step` of `total` units of work in `stage` (`total` None: unknown); `data` carries what the loop measures
    (loss, lr, tokens/s; the model and task under evaluation; ...)."""

    stage: str
    step: int
    total: int | None
    unit: str
    eta_s: float | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Message:
    stage: str | None
    text: str
    level: Literal["info", "warning", "error"] = "info"
    data: dict[str, Any] | None = None


Event = StageStarted | StageSkipped | StageDone | Progress | Message
EventSink = Callable[[Event], None]


def ignore(_: Event) -> None:
    """The sink of a caller that wants no events."""


class ProgressMeter:
    """Turns "step k of n" reports of one loop into `Progress` events with an ETA.

    The rate is measured from the first report, so a resumed loop's ETA counts only the steps it ran itself.
    Reports closer than `min_interval_s` to the previous event are dropped, except the last one (`step == total`).
    """

    def __init__(
        self, emit: EventSink, stage: str, total: int | None, unit: str, *, min_interval_s: float = 0.0
    ) -> None:
        self.emit, self.stage, self.total, self.unit = emit, stage, total, unit
        self.min_interval_s = min_interval_s
        self._first: tuple[float, int] | None = None
        self._last_emit = float("-inf")

    def __call__(self, step: int, **data: Any) -> None:
        now = time.monotonic()
        if self._first is None:
            self._first = (now, step)
        final = self.total is not None and step >= self.total
        if not final and now - self._last_emit < self.min_interval_s:
            return
        self._last_emit = now
        first_time, first_step = self._first
        eta = 0.0 if final else None
        if not final and self.total is not None and step > first_step:
            eta = round(max(0, self.total - step) * (now - first_time) / (step - first_step), 1)
        self.emit(Progress(self.stage, step, self.total, self.unit, eta, data))
