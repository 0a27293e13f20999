"""Service fixtures: the machine's real PostgreSQL and Redis, a moto S3 server, tiny models under an allowed root.

Everything a run touches is its own, so two runs on one machine never meet: a Postgres database per session
(created and dropped here), a Redis key and queue prefix per session (its keys deleted at the end; nothing is
flushed) with a sub-prefix per test (no message of one test reaches another's worker), a bucket and a data folder
per test, a moto server on a free port.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis
import uvicorn
from fastapi.testclient import TestClient

from langadapt.api.app import create_app
from langadapt.cli.service import worker_command
from langadapt.core.adaptation.sources import save_pretrained
from langadapt.jobs.db import make_engine, make_sessionmaker, session_scope, upgrade
from langadapt.jobs.settings import Settings
from langadapt.jobs.teams import create_team
from tests.conftest import shared_file
from tests.s3_server import free_port, moto_s3_server

PG_ADMIN = os.environ.get("LANGADAPT_TEST_PG", "host=127.0.0.1 port=5432 user=postgres dbname=test")
REDIS_URL = os.environ.get("LANGADAPT_TEST_REDIS", "redis://127.0.0.1:6379/9")
SESSION_PREFIX = f"langadapt-test-{os.getpid()}-{uuid.uuid4().hex[:6]}:"

SettingsFactory = Callable[..., Settings]


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    name = f"langadapt_test_{os.getpid()}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    params = dict(part.split("=", 1) for part in PG_ADMIN.split())
    url = f"postgresql+psycopg://{params['user']}@{params['host']}:{params['port']}/{name}"
    upgrade(url)
    yield url
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    yield REDIS_URL
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"{SESSION_PREFIX}*", count=1000):
        client.delete(key)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def model_root(tmp_path_factory, tiny_model, english_byte_level_tokenizer) -> Path:
    """An allowed model root holding a tiny base and instruct pair (real HF dirs)."""
    root = tmp_path_factory.mktemp("models")
    save_pretrained(
        tiny_model(len(english_byte_level_tokenizer), seed=11), english_byte_level_tokenizer, str(root / "base")
    )
    save_pretrained(
        tiny_model(len(english_byte_level_tokenizer), seed=12), english_byte_level_tokenizer, str(root / "instruct")
    )
    return root


@pytest.fixture
def make_settings(tmp_path, pg_url, redis_url, s3_endpoint, model_root) -> SettingsFactory:
    """Production-shaped settings (Postgres, Redis, S3) with a fresh bucket; keywords override."""

    def build(**overrides) -> Settings:
        values = {
            "home": str(tmp_path / "data"),
            "database_url": pg_url,
            "broker_url": redis_url,
            "queue_prefix": f"{SESSION_PREFIX}{uuid.uuid4().hex[:8]}:",
            "storage_url": f"s3://test-{uuid.uuid4().hex[:12]}",
            "s3_endpoint": s3_endpoint,
            "s3_access_key": "test",
            "s3_secret_key": "test",
            "allowed_model_roots": [str(model_root)],
            "heartbeat_interval_s": 0.2,
            **overrides,
        }
        return Settings(_env_file=None, **values)

    return build


@pytest.fixture
def settings(make_settings) -> Settings:
    return make_settings()


@pytest.fixture
def client(settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def new_team_key(settings: Settings, name: str | None = None) -> str:
    engine = make_engine(settings.database)
    with session_scope(make_sessionmaker(engine)) as session:
        _, key = create_team(session=session, name=name or f"team-{uuid.uuid4().hex[:10]}")
    engine.dispose()
    return key


@pytest.fixture
def auth(settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {new_team_key(settings)}"}


@pytest.fixture
def upload(client, auth) -> Callable[..., dict]:
    """Upload text as a corpus file; returns the file object."""

    def send(text: str = "", *, name: str = "corpus.txt", data: bytes | None = None, headers=None) -> dict:
        body = data if data is not None else text.encode()
        response = client.post("/v1/files", headers=headers or auth, files={"file": (name, body)})
        assert response.status_code == 201, response.text
        return response.json()

    return send


class LiveServer:
    """The app served by a real uvicorn on a free port, in a thread (for concurrent clients)."""

    def __init__(self, settings: Settings) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *_) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as LANGADAPT_* environment variables (lists and dicts as JSON), for worker processes."""
    env = dict(os.environ)
    for name, value in settings.model_dump(exclude={"home_path"}).items():
        if value is None:
            continue
        env[f"LANGADAPT_{name.upper()}"] = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return env


class WorkerProcess:
    """A real Celery worker (`celery -A langadapt.worker.app worker`) in its own process group."""

    def __init__(self, settings: Settings, *, queues: str = "gpu,maintenance", beat: bool = False) -> None:
        names = [settings.queue(role) for role in queues.split(",")]
        command = worker_command(names, beat=beat, name=f"test-{uuid.uuid4().hex[:6]}")
        self.log_path = Path(settings.home_path) / f"worker-{uuid.uuid4().hex[:6]}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            command,
            env=settings_env(settings),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(Path(__file__).resolve().parents[2]),
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while b" ready." not in self.log_path.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@pytest.fixture
def start_worker() -> Iterator[Callable[..., WorkerProcess]]:
    """Start workers on the test's own queues (its settings' prefix); stopped at teardown."""
    started: list[WorkerProcess] = []

    def start(settings: Settings, **kwargs) -> WorkerProcess:
        worker = WorkerProcess(settings, **kwargs)
        started.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()


def wait_for(client: TestClient, headers: dict, job_id: str, predicate, timeout: float = 900) -> dict:
    """Poll GET /v1/jobs/{id} until `predicate(job)`; fails with the job's last state on timeout. The default
    leaves room for the jobs' hundreds of CPU training steps on a loaded machine (two suites at once train
    several times slower); a wait returns as soon as the job gets there."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if predicate(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting; job is {job}")
        time.sleep(0.1)


@pytest.fixture
def files(upload, ru_texts) -> dict[str, str]:
    corpus = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in ru_texts)[:150_000]
    corpus = corpus[: corpus.rfind("\n") + 1]
    heldout = shared_file("ru/taiga_devtest.jsonl").read_text(encoding="utf-8")[:20_000]
    heldout = heldout[: heldout.rfind("\n") + 1]
    return {
        "corpus": upload(name="ru.jsonl", data=corpus.encode())["id"],
        "heldout": upload(name="heldout.jsonl", data=heldout.encode())["id"],
    }


def job_body(model_root, files, **overrides) -> dict:
    """A small real job; with `instruct_model=None` it adapts the base alone (no propagation settings)."""
    body = {
        "base_model": str(model_root / "base"),
        "instruct_model": str(model_root / "instruct"),
        "corpus_file": files["corpus"],
        "eval_file": files["heldout"],
        "vocab": {"method": "extended", "new_tokens": 300},
        "cpt": {
            "steps": 6,
            "seq_len": 32,
            "batch_size": 2,
            "grad_accum": 1,
            "warmup_steps": 1,
            "checkpoint_every": 3,
            "lr": 1e-3,
        },
        "propagation": {"variant": ["swap", "conversion"]},
        "evaluation": {"tasks": ["symbols_per_token", "bits_per_char", "copy_ru"], "limit": 2, "heldout_chars": 3000},
        "labels": {"suite": "e2e"},
        **overrides,
    }
    if body["instruct_model"] is None and "propagation" not in overrides:
        del body["propagation"]  # LEP settings without an instruct model are refused
    return body


def cpt_step(job: dict) -> int:
    """The CPT step a job reports (0 before CPT runs: other stages count other units)."""
    return (job["progress"]["step"] or 0) if job["stage"] == "cpt" else 0


def all_events(client, auth, job_id: str) -> list[dict]:
    events, after = [], None
    while True:
        query = "" if after is None else f"&after={after}"
        page = client.get(f"/v1/jobs/{job_id}/events?limit=100{query}", headers=auth).json()
        events += page["data"]
        if page["next"] is None:
            return events
        after = page["next"]


def insert_job(session, team_name: str) -> str:
    """A queued job row (with its team and corpus file) written straight to the database; its id."""
    from langadapt.jobs.models import File, Job, Team

    team = Team(name=team_name)
    session.add(team)
    session.flush()
    corpus = File(team_id=team.id, filename="c.txt", bytes=1, sha256="0" * 64, documents=1, chars=1, storage_key="k")
    session.add(corpus)
    session.flush()
    job = Job(
        team_id=team.id,
        request={},
        base_model="b",
        vocab_method="extended",
        init_method="mean",
        variants=[],
        corpus_file_id=corpus.id,
        request_hash="h",
    )
    session.add(job)
    session.commit()
    return job.id
