"""Service commands: `serve` (API + workers), `worker`, `db upgrade`, `admin create-team` (keys, quotas)."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy.orm import Session

from langadapt.jobs.queue import GPU, GPU_COUNTS, MAINTENANCE, ROLES, gpu_role
from langadapt.jobs.settings import Settings


def _is_embedded(settings: Settings) -> bool:
    return settings.database.startswith("sqlite")


def serve(args: argparse.Namespace) -> None:
    """Run the API; with the embedded defaults also migrate the database and start the workers."""
    import uvicorn

    from langadapt.jobs.db import upgrade

    settings = Settings()
    if args.migrate or _is_embedded(settings):
        upgrade(settings.database)
    if not args.no_worker:
        _prepare_broker(settings)
    # uvicorn re-raises SIGTERM after its graceful shutdown; turn it into SystemExit so the workers are stopped.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    workers = WorkerSupervisor([] if args.no_worker else _worker_commands(settings))
    print(
        json.dumps(
            {
                "api": f"http://{args.host}:{args.port}",
                "docs": f"http://{args.host}:{args.port}/docs",
                "database": settings.database.split("@")[-1],
                "storage": settings.storage,
                "worker_pids": workers.pids(),
            }
        ),
        flush=True,
    )
    workers.start()
    try:
        # The factory string lets uvicorn start one API process per --workers (each builds its app from settings).
        uvicorn.run(
            "langadapt.api.app:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level=args.log_level,
        )
    finally:
        workers.stop()


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _prepare_broker(settings: Settings) -> None:
    """Connect once before the workers start, so the embedded broker's tables are created by one process only."""
    from langadapt.jobs.queue import celery_app

    with celery_app(settings).connection_for_write() as connection:
        connection.ensure_connection(max_retries=3)
        _ = connection.default_channel


def _worker_commands(settings: Settings) -> list[list[str]]:
    """One GPU-queue worker (one job at a time) and one maintenance worker running the reaper's schedule."""
    return [
        worker_command([settings.queue(GPU)], beat=False),
        worker_command([settings.queue(MAINTENANCE)], beat=True),
    ]


class WorkerSupervisor(threading.Thread):
    """The embedded workers, each started again when it dies (killed, crashed) while the service runs."""

    def __init__(self, commands: list[list[str]], poll_s: float = 1.0) -> None:
        super().__init__(daemon=True, name="worker-supervisor")
        self.commands, self.poll_s = commands, poll_s
        self.processes = [self._spawn(command) for command in commands]
        self.stopping = threading.Event()

    @staticmethod
    def _spawn(command: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, start_new_session=True)

    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def run(self) -> None:
        while not self.stopping.wait(self.poll_s):
            for index, process in enumerate(self.processes):
                if process.poll() is not None and not self.stopping.is_set():
                    self.processes[index] = self._spawn(self.commands[index])
                    print(
                        json.dumps({"worker_restarted": self.processes[index].pid, "exit_code": process.returncode}),
                        flush=True,
                    )

    def stop(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join()
        for process in self.processes:
            _stop(process)


def worker_command(queues: list[str], *, beat: bool, name: str | None = None) -> list[str]:
    """The Celery worker command line: one job at a time in the solo pool (the worker never forks: jobs run in
    processes it executes, `worker/app.py`); with `beat`, the reaper's schedule."""
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "langadapt.worker.app",
        "worker",
        "-Q",
        ",".join(queues),
        "--concurrency",
        "1",
        "--loglevel",
        "INFO",
        "-n",
        f"{name or re.sub(r'[^A-Za-z0-9_.-]', '-', '-'.join(queues))}@%h",
        "--pool",
        "solo",
    ]
    if beat:
        command += ["--beat"]
    return command


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def worker(args: argparse.Namespace) -> None:
    settings = Settings()
    roles = [role.strip() for role in args.queues.split(",") if role.strip()]
    if args.gpus is not None:  # --gpus K: the queue of K-GPU jobs instead of the one-GPU queue
        roles = [gpu_role(args.gpus) if role == GPU else role for role in roles]
    unknown = sorted(set(roles) - set(ROLES))
    if unknown or not roles:
        raise SystemExit(f"langadapt: error: unknown queue(s) {unknown} (choose from {', '.join(ROLES)})")
    if args.devices is not None:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
        if args.gpus is not None and len(devices) != args.gpus:
            raise SystemExit(f"langadapt: error: --devices lists {len(devices)} GPU(s), --gpus says {args.gpus}")
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)  # this worker's slice of the machine's GPUs
    os.execv(sys.executable, worker_command([settings.queue(role) for role in roles], beat=args.beat))


def db_upgrade(_: argparse.Namespace) -> None:
    from langadapt.jobs.db import upgrade

    settings = Settings()
    upgrade(settings.database)
    print(json.dumps({"database": settings.database.split("@")[-1], "revision": "head"}))


def _admin_session() -> AbstractContextManager[Session]:
    from langadapt.jobs.db import check_migrated, make_engine, make_sessionmaker, session_scope, upgrade

    settings = Settings()
    if _is_embedded(settings):
        upgrade(settings.database)
    engine = make_engine(settings.database)
    check_migrated(engine)
    return session_scope(make_sessionmaker(engine))


def _admin(action: Callable[[Session], dict[str, Any]]) -> None:
    from langadapt.jobs.errors import ServiceError

    try:
        with _admin_session() as session:
            result = action(session)
    except ServiceError as exc:
        raise SystemExit(f"langadapt: error: {exc.message}") from None
    print(json.dumps(result))


def create_team(args: argparse.Namespace) -> None:
    from langadapt.jobs import teams

    def action(session: Session) -> dict[str, Any]:
        team, key = teams.create_team(session=session, name=args.name)
        return {"team_id": team.id, "name": team.name, "api_key": key}

    _admin(action)


def create_key(args: argparse.Namespace) -> None:
    from langadapt.jobs import teams

    def action(session: Session) -> dict[str, Any]:
        team = teams.team_by_name(session=session, name=args.team)
        return {"team_id": team.id, "api_key": teams.create_key(session=session, team=team)}

    _admin(action)


def list_keys(args: argparse.Namespace) -> None:
    from langadapt.jobs import teams

    def action(session: Session) -> dict[str, Any]:
        team = teams.team_by_name(session=session, name=args.team)
        keys = teams.list_keys(session=session, team=team)
        return {
            "team_id": team.id,
            "keys": [
                {
                    "id": k.id,
                    "hint": f"...{k.hint}",
                    "created_at": k.created_at.isoformat(),
                    "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
                }
                for k in keys
            ],
        }

    _admin(action)


def revoke_key(args: argparse.Namespace) -> None:
    from langadapt.jobs import teams

    def action(session: Session) -> dict[str, Any]:
        key = teams.revoke_key(session=session, key_id=args.key_id)
        return {"id": key.id, "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None}

    _admin(action)


QUOTA_OPTIONS = {
    "running_jobs": "jobs running at once",
    "queued_jobs": "queued jobs",
    "stored_bytes": "stored bytes",
    "post_rate": "POST requests per rate window",
}


def _quota_report(session: Session, team_name: str) -> dict[str, Any]:
    from dataclasses import asdict

    from langadapt.jobs import quotas, teams

    team = teams.team_by_name(session=session, name=team_name)
    limits = quotas.team_limits(session, Settings(), team.id)
    return {"team_id": team.id, "team": team.name, "limits": {name: asdict(limit) for name, limit in limits.items()}}


def quota_show(args: argparse.Namespace) -> None:
    _admin(lambda session: _quota_report(session, args.team))


def quota_set(args: argparse.Namespace) -> None:
    from langadapt.jobs import quotas, teams

    values = {name: getattr(args, name) for name in QUOTA_OPTIONS if getattr(args, name) is not None}
    if not values:
        raise SystemExit(f"langadapt: error: give at least one of {', '.join(_flag(n) for n in QUOTA_OPTIONS)}")

    def action(session: Session) -> dict[str, Any]:
        quotas.set_team_limits(session, teams.team_by_name(session=session, name=args.team).id, values)
        return _quota_report(session, args.team)

    _admin(action)


def quota_clear(args: argparse.Namespace) -> None:
    from langadapt.jobs import quotas, teams

    def action(session: Session) -> dict[str, Any]:
        quotas.clear_team_limits(session, teams.team_by_name(session=session, name=args.team).id)
        return _quota_report(session, args.team)

    _admin(action)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


def register(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("serve", help="run the REST API (embedded defaults: also the workers)")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=8000)
    run.add_argument("--no-worker", action="store_true", help="API only (production runs workers separately)")
    run.add_argument("--migrate", action="store_true", help="upgrade the database first (automatic on SQLite)")
    run.add_argument("--workers", type=int, default=1, help="API processes (one per core for high request rates)")
    run.add_argument("--log-level", default="info")
    run.set_defaults(handler=serve)

    work = commands.add_parser("worker", help="run a Celery worker (gpu queue by default)")
    work.add_argument("--queues", default=GPU, help=f"comma-separated roles: {', '.join(ROLES)}")
    work.add_argument(
        "--gpus", type=int, choices=GPU_COUNTS, help="GPUs this worker owns: it takes the jobs asking for that many"
    )
    work.add_argument("--devices", help="the GPUs it owns, e.g. 0,1 (sets CUDA_VISIBLE_DEVICES)")
    work.add_argument("--beat", action="store_true", help="also run the periodic reaper schedule")
    work.set_defaults(handler=worker)

    db = commands.add_parser("db", help="database administration")
    db_cmds = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    db_cmds.add_parser("upgrade", help="apply the Alembic migrations").set_defaults(handler=db_upgrade)

    admin = commands.add_parser("admin", help="teams, API keys and quotas")
    admin_cmds = admin.add_subparsers(dest="admin_command", required=True, metavar="COMMAND")
    team = admin_cmds.add_parser("create-team", help="create a team and print its first API key")
    team.add_argument("name")
    team.set_defaults(handler=create_team)
    key = admin_cmds.add_parser("create-key", help="another API key for a team (rotation: create, then revoke)")
    key.add_argument("team", help="team name")
    key.set_defaults(handler=create_key)
    keys = admin_cmds.add_parser("list-keys", help="a team's keys (ids and last characters, never the keys)")
    keys.add_argument("team", help="team name")
    keys.set_defaults(handler=list_keys)
    revoke = admin_cmds.add_parser("revoke-key", help="revoke an API key at once")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=revoke_key)
    quota = admin_cmds.add_parser("quota", help="a team's own limits (defaults: the LANGADAPT_QUOTA_* settings)")
    quota_cmds = quota.add_subparsers(dest="quota_command", required=True, metavar="COMMAND")
    show = quota_cmds.add_parser("show", help="a team's limits and where each comes from (default or team)")
    show.add_argument("team", help="team name")
    show.set_defaults(handler=quota_show)
    set_ = quota_cmds.add_parser("set", help="override some of a team's limits (the others stay as they are)")
    set_.add_argument("team", help="team name")
    for name, what in QUOTA_OPTIONS.items():
        set_.add_argument(_flag(name), dest=name, type=_positive, metavar="N", help=what)
    set_.set_defaults(handler=quota_set)
    clear = quota_cmds.add_parser("clear", help="back to the defaults for all of a team's limits")
    clear.add_argument("team", help="team name")
    clear.set_defaults(handler=quota_clear)
