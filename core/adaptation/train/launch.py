"""One CPT on several GPUs of one machine: `launch_cpt` runs `run_cpt` under `torchrun` and supervises it.

    python -m torch.distributed.run --standalone --nproc-per-node N -m langadapt.core.adaptation.train.launch \
        DIR/request.json

(`python -m torch.distributed.run` is `torchrun` of the running interpreter.) The caller and the ranks talk through
files in a private launch folder (`LaunchFiles`): the request, rank 0's progress reports as JSON lines, a cancel
file the caller writes when `should_cancel()` says so (rank 0 polls it and broadcasts: every rank checkpoints and
exits), each rank's pid, a rank's input error, rank 0's result. torchrun runs in its own process session; when it
fails, times out, or the caller is interrupted, torchrun and every rank (torchrun starts each in a session of its
own) are killed. A rank that dies is a `RankFailure` (a system fault: retry resumes from the last checkpoint); a
rank's `AdaptationInputError` is raised again as such (a user fault).

Test hook: `LANGADAPT_CPT_FAIL_RANK=R` makes rank R exit abruptly once the run's first checkpoint exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from langadapt.core.adaptation.config import CPTConfig, Strategy
from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.core.adaptation.rundir import TrainingDir
from langadapt.core.adaptation.sources import load_model, load_tokenizer
from langadapt.core.adaptation.train.common import ProgressCallback
from langadapt.core.adaptation.train.cpt import CPTResult, run_cpt

FAIL_RANK_ENV = "LANGADAPT_CPT_FAIL_RANK"
STOP_GRACE_S = 30.0  # between asking torchrun to stop its ranks (SIGTERM) and killing what is left


class CPTLaunch(BaseModel):
    """What one CPT run needs, as the ranks read it from `request.json`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="the model to train (HF directory or shortcut)")
    tokenizer: str = Field(description="its tokenizer")
    corpus: str
    config: CPTConfig
    out_dir: str
    new_rows: list[int] | None = None
    resume: bool = False
    strategy: Strategy = "ddp"


class RankFailure(RuntimeError):
    """A training process died, the group overran its time, or it did not stop after a cancel."""


def run_request(
    request: CPTLaunch,
    *,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> CPTResult:
    """Load the request's model and tokenizer and train (in this process; one rank of several under torchrun)."""
    model, _ = load_model(request.model)
    return run_cpt(
        model,
        load_tokenizer(request.tokenizer),
        request.corpus,
        request.config,
        request.out_dir,
        new_rows=request.new_rows,
        resume=request.resume,
        progress=progress,
        should_cancel=should_cancel,
        strategy=request.strategy,
    )


def launch_cpt(
    request: CPTLaunch,
    *,
    nproc: int,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    timeout_s: float | None = None,
    cancel_grace_s: float = 600.0,
    poll_s: float = 0.5,
) -> CPTResult:
    """Train `request` on `nproc` processes (GPUs); one runs in this process.

    `progress` gets rank 0's reports, `should_cancel` is polled every `poll_s` seconds; once it says True the run
    stops at its next log step with a checkpoint (`cancelled=True`), or is killed after `cancel_grace_s` (then a
    `RankFailure`, as for a rank that dies or a run longer than `timeout_s`). Nothing is left running when this
    returns or raises."""
    if nproc == 1:
        return run_request(request, progress=progress, should_cancel=should_cancel)
    with tempfile.TemporaryDirectory(prefix="cpt-launch-") as folder:
        files = LaunchFiles(Path(folder))
        files.request.write_text(request.model_dump_json(), encoding="utf-8")
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            __name__,
            str(files.request),
        ]
        with open(files.log, "wb") as log:
            group = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = _supervise(group, files, progress, should_cancel, timeout_s, cancel_grace_s, poll_s)
        finally:
            _stop(group, files)
        if code != 0:
            error = files.input_error()
            if error is not None:
                raise AdaptationInputError(error["message"], error["code"])
            raise RankFailure(f"a CPT process failed (torchrun exit code {code}); its output ends:\n{files.log_tail()}")
        return CPTResult(**json.loads(files.result.read_text(encoding="utf-8")))


def _supervise(
    group: subprocess.Popen[bytes],
    files: LaunchFiles,
    progress: ProgressCallback | None,
    should_cancel: Callable[[], bool] | None,
    timeout_s: float | None,
    cancel_grace_s: float,
    poll_s: float,
) -> int:
    """Relay progress and cancellation until torchrun exits; its exit code."""
    started = time.monotonic()
    cancelled_at: float | None = None
    new_reports = files.progress_reports()
    while True:
        code = group.poll()
        for report in new_reports():
            if progress is not None:
                progress(report)
        if code is not None:
            return code
        now = time.monotonic()
        if cancelled_at is None and should_cancel is not None and should_cancel():
            files.cancel.touch()
            cancelled_at = now
        if cancelled_at is not None and now - cancelled_at > cancel_grace_s:
            raise RankFailure(f"the CPT processes did not stop within {cancel_grace_s:.0f} s of the cancel")
        if timeout_s is not None and now - started > timeout_s:
            raise RankFailure(f"the CPT run exceeded its {timeout_s:.0f} s")
        time.sleep(poll_s)


def _stop(group: subprocess.Popen[bytes], files: LaunchFiles) -> None:
    """End torchrun (SIGTERM: it stops its ranks; SIGKILL after `STOP_GRACE_S`) and any rank still alive."""
    if group.poll() is None:
        os.killpg(group.pid, signal.SIGTERM)
        try:
            group.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(group.pid, signal.SIGKILL)
            group.wait()
    for pid in files.rank_pids():
        if process_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # a rank leads its own session, with any children it started
    deadline = time.monotonic() + STOP_GRACE_S
    while any(process_alive(pid) for pid in files.rank_pids()) and time.monotonic() < deadline:
        time.sleep(0.05)


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its parent to reap it does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


@dataclass(frozen=True)
class LaunchFiles:
    """The launch folder shared by the caller and the ranks."""

    root: Path

    @property
    def request(self) -> Path:
        return self.root / "request.json"

    @property
    def progress(self) -> Path:
        return self.root / "progress.jsonl"

    @property
    def cancel(self) -> Path:
        return self.root / "cancel"

    @property
    def result(self) -> Path:
        return self.root / "result.json"

    @property
    def log(self) -> Path:
        return self.root / "torchrun.log"

    def pid_file(self, rank: int) -> Path:
        return self.root / f"rank-{rank}.pid"

    def error_file(self, rank: int) -> Path:
        return self.root / f"rank-{rank}.error.json"

    def rank_pids(self) -> list[int]:
        return [int(p.read_text()) for p in sorted(self.root.glob("rank-*.pid"))]

    def report(self, data: dict[str, object]) -> None:
        """Append one progress report (rank 0)."""
        with open(self.progress, "a", encoding="utf-8") as out:
            out.write(json.dumps(data) + "\n")

    def progress_reports(self) -> Callable[[], list[dict[str, object]]]:
        """A reader of the progress file: each call returns the reports appended since the last one (a line still
        being written waits for the next call)."""
        offset = 0

        def new() -> list[dict[str, object]]:
            nonlocal offset
            if not self.progress.exists():
                return []
            with open(self.progress, "rb") as source:
                source.seek(offset)
                data = source.read()
            complete = data[: data.rfind(b"\n") + 1]
            offset += len(complete)
            return [json.loads(line) for line in complete.splitlines()]

        return new

    def input_error(self) -> dict[str, str] | None:
        errors = sorted(self.root.glob("rank-*.error.json"))
        return json.loads(errors[0].read_text(encoding="utf-8")) if errors else None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-chars:] if self.log.exists() else ""


def _fail_after_first_checkpoint(out_dir: str) -> None:
    """The test hook (module doc): exit this rank without cleanup once a checkpoint exists."""
    paths = TrainingDir(os.path.abspath(out_dir))

    def watch() -> None:
        while not paths.checkpoint_steps():
            time.sleep(0.01)
        os._exit(17)

    threading.Thread(target=watch, daemon=True, name="fail-rank").start()


def main(argv: list[str] | None = None) -> int:
    """One rank: run the request whose file is the only argument."""
    args = sys.argv[1:] if argv is None else argv
    files = LaunchFiles(Path(args[0]).parent)
    request = CPTLaunch.model_validate_json(files.request.read_text(encoding="utf-8"))
    rank = int(os.environ.get("RANK", "0"))
    files.pid_file(rank).write_text(str(os.getpid()))
    if os.environ.get(FAIL_RANK_ENV) == str(rank):
        _fail_after_first_checkpoint(request.out_dir)
    try:
        result = run_request(
            request,
            progress=files.report if rank == 0 else None,
            should_cancel=files.cancel.exists,
        )
    except AdaptationInputError as exc:
        files.error_file(rank).write_text(json.dumps({"message": str(exc), "code": exc.code}), encoding="utf-8")
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank == 0:
        tmp = files.result.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(result)), encoding="utf-8")
        os.replace(tmp, files.result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
