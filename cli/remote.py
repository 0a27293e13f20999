"""Remote commands: `langadapt jobs ...` and `langadapt results` talk to a running service through the Python
client (`LANGADAPT_BASE_URL`, `LANGADAPT_API_KEY`, or `--base-url` / `--api-key`). They import no training code,
so they start fast. Human-readable output by default, `--json` for scripts (one JSON document or JSON lines).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml
from pydantic import BaseModel

from langadapt.api.schemas import EstimatePublic, EventPublic, JobPublic
from langadapt.client import Client
from langadapt.client.errors import APIError, LangadaptError

COMMANDS = ("jobs", "results")
EXIT_JOB_FAILED = 1
EXIT_USER_ERROR = 2

# Spec keys naming local files, as `langadapt run` reads them -> the job request's file-id fields.
TOP_LEVEL_FILES = {"corpus": "corpus_file", "heldout": "eval_file", "source_heldout": "source_eval_file"}
FILE_FIELDS = ("corpus_file", "eval_file", "source_eval_file")
NESTED_FILES = (("vocab", "source_corpus"), ("cpt", "source_corpus"), ("calibration", "prompt_file"))


def _client(args: argparse.Namespace) -> Client:
    return Client(args.base_url, args.api_key)


def _print_json(value: Any) -> None:
    if isinstance(value, BaseModel):
        print(value.model_dump_json())
    else:
        print(json.dumps(value, default=str))


# -- submit ----------------------------------------------------------------------------------------------------


def job_request(spec_path: Path, client: Client, *, log: TextIO = sys.stderr) -> dict[str, Any]:
    """The YAML spec as a job request: every file it names (relative to the spec's folder) uploaded once and
    replaced by its file id. A value that is no local file and starts with `file_` is taken as an uploaded id."""
    spec = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    if not isinstance(spec, dict):
        raise LangadaptError(f"{spec_path}: expected a mapping of settings")
    for path_key, id_key in TOP_LEVEL_FILES.items():
        if path_key in spec:
            spec[id_key] = spec.pop(path_key)
    uploaded: dict[Path, str] = {}

    def file_id(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        path = (spec_path.parent / value).resolve()
        if not path.is_file():
            if value.startswith("file_"):
                return value
            raise LangadaptError(f"{spec_path}: no such file {value!r}")
        if path not in uploaded:
            print(f"uploading {path} ...", file=log, flush=True)
            uploaded[path] = client.files.upload(path).id
        return uploaded[path]

    for key in FILE_FIELDS:
        if key in spec:
            spec[key] = file_id(spec[key])
    for section, key in NESTED_FILES:
        if isinstance(spec.get(section), dict) and spec[section].get(key) is not None:
            spec[section][key] = file_id(spec[section][key])
    return spec


def submit(args: argparse.Namespace) -> int:
    client = _client(args)
    request = job_request(Path(args.spec), client)
    if args.dry_run:
        estimate = client.jobs.estimate(request)
        _print_json(estimate) if args.json else print(describe_estimate(estimate))
        return 0
    job = client.jobs.create(request, idempotency_key=args.idempotency_key or "auto")
    if not args.wait:
        _print_json(job) if args.json else print(f"{job.id} {job.status}")
        return 0
    if not args.json:
        print(f"{job.id} submitted", file=sys.stderr)
    return _follow(client, job.id, as_json=args.json)


def _follow(client: Client, job_id: str, *, as_json: bool) -> int:
    display = None if as_json else ProgressDisplay(sys.stderr)
    for event in client.jobs.events(job_id, follow=True):
        if display is None:
            _print_json(event)
        else:
            display(event)
    job = client.jobs.get(job_id)
    if display is not None:
        display.close()
    _print_json(job) if as_json else print(describe_job(job))
    return 0 if job.status == "succeeded" else EXIT_JOB_FAILED


class ProgressDisplay:
    """A live progress line (stage, step/total, loss, tokens/s, ETA) rewritten in place on a terminal; elsewhere
    one line per stage change and at most one progress line every `interval_s`."""

    def __init__(self, out: TextIO, *, interval_s: float = 5.0) -> None:
        self.out, self.interval_s = out, interval_s
        self.tty = out.isatty()
        self.metrics: dict[str, Any] = {}
        self._last_line = 0.0
        self._open_line = False

    def __call__(self, event: EventPublic) -> None:
        if event.type == "metrics" and event.data:
            self.metrics = {**self.metrics, **event.data, "stage": event.stage}
            now = time.monotonic()
            if self.tty:
                self.out.write("\r\x1b[2K" + self.progress_line())
                self._open_line = True
            elif now - self._last_line >= self.interval_s or event.data.get("step") == event.data.get("total"):
                self.out.write(self.progress_line() + "\n")
                self._last_line = now
            self.out.flush()
            return
        if event.type == "stage" and event.message == "started":
            self.metrics = {}
        self._end_line()
        stage = f"[{event.stage}] " if event.stage else ""
        self.out.write(f"{stage}{event.message}\n")
        self.out.flush()

    def progress_line(self) -> str:
        m = self.metrics
        parts = [f"{m.get('stage') or '-'}"]
        if m.get("step") is not None:
            total = m.get("total")
            parts.append(f"{m['step']}/{total} {m.get('unit') or ''}".rstrip() if total else f"{m['step']}")
        if m.get("loss") is not None:
            parts.append(f"loss {m['loss']:.4f}")
        if m.get("tokens_per_s"):
            parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
        if m.get("eta_s") is not None:
            parts.append(f"ETA {_duration(m['eta_s'])}")
        return "  ".join(parts)

    def _end_line(self) -> None:
        if self._open_line:
            self.out.write("\n")
            self._open_line = False

    def close(self) -> None:
        self._end_line()
        self.out.flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def describe_job(job: JobPublic) -> str:
    lines = [f"{job.id}  {job.status}" + (f"  stage {job.stage}" if job.stage else "")]
    if job.progress.step is not None:
        lines.append(f"  progress {job.progress.step}/{job.progress.total_steps}")
    if job.labels:
        lines.append("  labels " + ", ".join(f"{k}={v}" for k, v in job.labels.items()))
    if job.error is not None:
        lines.append(f"  error [{job.error.kind}] {job.error.code} in {job.error.stage}: {job.error.message}")
    lines.append(f"  created {job.created_at:%Y-%m-%d %H:%M:%S}  attempt {job.attempt}")
    return "\n".join(lines)


def describe_estimate(estimate: EstimatePublic) -> str:
    lines = [f"{'stage':<22}{'tokens':>14}{'steps':>8}{'GPU min':>10}  throughput"]
    for stage in estimate.stages:
        tokens = f"{stage.tokens:,}" if stage.tokens is not None else "-"
        steps = str(stage.steps) if stage.steps is not None else "-"
        minutes = f"{stage.gpu_minutes:.1f}" if stage.gpu_minutes is not None else "?"
        rate = f"{stage.tokens_per_s:,.0f} tok/s ({stage.rate_source})" if stage.tokens_per_s else ""
        lines.append(f"{stage.stage:<22}{tokens:>14}{steps:>8}{minutes:>10}  {rate}")
    total = f"{estimate.gpu_minutes:.1f}" if estimate.gpu_minutes is not None else "unknown"
    lines.append(f"GPU minutes: {total}")
    if estimate.artifact_bytes is not None:
        lines.append(f"artifacts: {estimate.artifact_bytes / 2**20:,.1f} MiB")
    if estimate.payoff is not None:
        p = estimate.payoff
        lines.append(
            f"payoff: {p.source_chars_per_token:.2f} -> {p.proposed_chars_per_token:.2f} chars/token "
            f"(x{p.gain:.2f}; {p.proposed}, measured on {p.sample_chars:,} chars)"
        )
    return "\n".join(lines)


# -- the other job commands ------------------------------------------------------------------------------------


def list_jobs(args: argparse.Namespace) -> int:
    labels = dict(_label(value) for value in args.label)
    jobs = _client(args).jobs.list(status=args.status, labels=labels, page_size=min(args.limit, 100))
    for count, job in enumerate(jobs):
        if count >= args.limit:
            break
        if args.json:
            _print_json(job)
        else:
            step = f"{job.progress.step}/{job.progress.total_steps}" if job.progress.step is not None else ""
            labels_text = ",".join(f"{k}={v}" for k, v in job.labels.items())
            print(f"{job.id}  {job.status:<10} {job.stage or '-':<20} {step:<12} {labels_text}")
    return 0


def show(args: argparse.Namespace) -> int:
    job = _client(args).jobs.get(args.job_id)
    _print_json(job) if args.json else print(describe_job(job))
    return 0


def cancel(args: argparse.Namespace) -> int:
    job = _client(args).jobs.cancel(args.job_id)
    _print_json(job) if args.json else print(f"{job.id} {job.status}")
    return 0


def retry(args: argparse.Namespace) -> int:
    job = _client(args).jobs.retry(args.job_id)
    _print_json(job) if args.json else print(f"{job.id} {job.status} (attempt {job.attempt})")
    return 0


def logs(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.follow:
        return _follow(client, args.job_id, as_json=args.json)
    for event in client.jobs.events(args.job_id):
        if args.json:
            _print_json(event)
        else:
            data = f" {json.dumps(event.data)}" if event.data and event.type == "metrics" else ""
            print(f"{event.ts:%H:%M:%S} {event.level:<7} [{event.stage or '-'}] {event.message}{data}")
    return 0


def download(args: argparse.Namespace) -> int:
    client = _client(args)
    names = args.names or [a.name for a in client.artifacts.list(args.job_id)]
    for name in names:
        target = Path(args.out) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        path = client.artifacts.download(args.job_id, name, to=target)
        _print_json({"name": name, "path": str(path)}) if args.json else print(path)
    return 0


def results(args: argparse.Namespace) -> int:
    filters = {name: getattr(args, name) for name in ("task", "metric", "model", "vocab_method", "job_id")}
    group_by = [name.strip() for name in args.group_by.split(",")] if args.group_by else None
    labels = dict(_label(value) for value in args.label)
    rows = _client(args).results.query(group_by=group_by, labels=labels, **filters)
    for row in rows:
        if args.json:
            _print_json(row)
        elif group_by:
            key = " ".join(f"{k}={v}" for k, v in row.key.items())  # type: ignore[union-attr]
            print(f"{key}  mean {row.mean:.4f}  n {row.count}")  # type: ignore[union-attr]
        else:
            print(f"{row.job_id}  {row.model:<22} {row.task:<20} {row.metric:<18} {row.value:.4f}")  # type: ignore[union-attr]
    return 0


def _label(value: str) -> tuple[str, str]:
    key, sep, rest = value.partition(":")
    if not sep or not key:
        raise LangadaptError(f"label {value!r} must be key:value")
    return key, rest


# -- parser ----------------------------------------------------------------------------------------------------


def _connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default=os.environ.get("LANGADAPT_BASE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=None, help="default: LANGADAPT_API_KEY")
    parser.add_argument("--json", action="store_true", help="JSON output for scripts")


def register(commands: argparse._SubParsersAction) -> None:
    jobs = commands.add_parser("jobs", help="jobs on a running service (LANGADAPT_BASE_URL, LANGADAPT_API_KEY)")
    job_cmds = jobs.add_subparsers(dest="jobs_command", required=True, metavar="COMMAND")

    sub = job_cmds.add_parser("submit", help="upload the files a YAML spec names, then submit it")
    sub.add_argument("spec")
    sub.add_argument("--wait", action="store_true", help="follow the job with a live progress display")
    sub.add_argument("--dry-run", action="store_true", help="validate and estimate cost and payoff; queue nothing")
    sub.add_argument("--idempotency-key", default=None)
    sub.set_defaults(remote=submit)

    listing = job_cmds.add_parser("list", help="the team's jobs, newest first")
    listing.add_argument("--status")
    listing.add_argument("--label", action="append", default=[], help="key:value, repeatable")
    listing.add_argument("--limit", type=int, default=20)
    listing.set_defaults(remote=list_jobs)

    for name, handler, text in (
        ("show", show, "a job's status, stage, progress and error"),
        ("cancel", cancel, "cancel a job (a running one stops at its next step)"),
        ("retry", retry, "re-queue a failed or cancelled job"),
    ):
        command = job_cmds.add_parser(name, help=text)
        command.add_argument("job_id")
        command.set_defaults(remote=handler)

    log = job_cmds.add_parser("logs", help="a job's events; -f follows them with a live progress display")
    log.add_argument("job_id")
    log.add_argument("-f", "--follow", action="store_true")
    log.set_defaults(remote=logs)

    fetch = job_cmds.add_parser("download", help="download artifacts (all by default), sha256-checked, resumable")
    fetch.add_argument("job_id")
    fetch.add_argument("names", nargs="*", help="artifact names, e.g. cpt/model.safetensors")
    fetch.add_argument("--out", default=".", help="folder; names keep their stage sub-folder")
    fetch.set_defaults(remote=download)

    for command in (sub, listing, *[job_cmds.choices[n] for n in ("show", "cancel", "retry")], log, fetch):
        _connection(command)

    res = commands.add_parser("results", help="score rows joined with job parameters, or grouped means")
    res.add_argument("--label", action="append", default=[], help="key:value, repeatable")
    for name in ("task", "metric", "model", "vocab_method", "job_id"):
        res.add_argument(f"--{name.replace('_', '-')}", dest=name)
    res.add_argument("--group-by", help="comma-separated, e.g. vocab_method,init_method")
    _connection(res)
    res.set_defaults(remote=results)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="langadapt")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        return args.remote(args)
    except APIError as exc:
        print(f"langadapt: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR if exc.status < 500 else EXIT_JOB_FAILED
    except (LangadaptError, ValueError, OSError, yaml.YAMLError) as exc:
        print(f"langadapt: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
