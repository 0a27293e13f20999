"""Dashboard page load times with a team of 1,000 jobs and 50,000 score rows, with `GET /healthz` as baseline.

The API runs as a real uvicorn server in its own process (`langadapt serve --no-worker`) on a throwaway Postgres
database (`langadapt_bench_dash_<pid>`, migrated) and a local artifact folder. The team's rows are written
directly (Core bulk inserts): `--jobs` succeeded jobs with labels (`suite:s0..s9`), vocabulary / init methods
spread over the values the service knows, `--scores` score rows spread evenly over them (original and adapted
models, symbols_per_token and bits_per_char among the tasks), and 100 CPT metrics events on the job whose page is
loaded. A second team holds the same number of jobs, so every query has to filter by team. `ANALYZE` runs after
the load (what autovacuum does for tables this size), so the planner knows the row counts.

The client signs in once (the real form and cookie), then loads each page `--repeat` times one after the other
(the full body read; server-side rendering included, no browser). One JSON line per page: p50 / p95 / max in ms,
body bytes, and the ratio of its p50 to the baseline's p50 in this process.

    python bench/dashboard_load.py [--jobs 1000] [--scores 50000] [--repeat 20]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

import httpx
import psycopg
from sqlalchemy import insert

from langadapt.jobs.db import make_engine, make_sessionmaker, session_scope, upgrade
from langadapt.jobs.models import File, Job, JobEvent, JobLabel, Score, new_id, utcnow
from langadapt.jobs.teams import create_team

PG_ADMIN = os.environ.get("LANGADAPT_TEST_PG", "host=127.0.0.1 port=5432 user=postgres dbname=test")
VOCABS = ("extended", "optimized", "bpe", "unigram")
INITS = ("mean", "random")
MEASURES = [
    ("symbols_per_token", "target"),
    ("symbols_per_token", "source"),
    ("bits_per_char", "target"),
    ("bits_per_char", "source"),
    ("copy_ru", "exact_match"),
]
MODELS = ("original", "adapted", "propagated:swap", "propagated:overlap", "propagated:conversion")


def seed(url: str, team_name: str, jobs: int, scores: int) -> tuple[str, str]:
    """A team with `jobs` succeeded jobs and `scores` score rows; returns (api key, a job id)."""
    engine = make_engine(url)
    with session_scope(make_sessionmaker(engine)) as session:
        team, key = create_team(session=session, name=team_name)
        corpus = File(
            id=new_id("file"),
            team_id=team.id,
            filename="ru.txt",
            bytes=1,
            sha256="0" * 64,
            documents=1,
            chars=1,
            storage_key="none",
        )
        session.add(corpus)
        session.flush()
        now = utcnow()
        job_rows, label_rows = [], []
        for i in range(jobs):
            job_id = new_id("job")
            job_rows.append(
                {
                    "id": job_id,
                    "team_id": team.id,
                    "status": "succeeded",
                    "stage": "evaluate",
                    "request": {"cpt": {"trainable": "embeddings+head"}},
                    "base_model": "smollm2-135m-instruct",
                    "instruct_model": None,
                    "vocab_method": VOCABS[i % len(VOCABS)],
                    "init_method": INITS[i % len(INITS)],
                    "variants": [],
                    "corpus_file_id": corpus.id,
                    "request_hash": "0" * 64,
                    "attempt": 1,
                    "cancel_requested": False,
                    "stage_seconds": {"tokenizer": 10.0, "init": 2.0, "cpt": 600.0, "evaluate": 30.0},
                    "cpt_tokens_per_s": 20_000.0 + i,
                    "created_at": now - timedelta(minutes=jobs - i),
                    "started_at": now - timedelta(minutes=jobs - i),
                    "finished_at": now - timedelta(minutes=jobs - i - 1),
                    "updated_at": now,
                }
            )
            label_rows.append({"job_id": job_id, "key": "suite", "value": f"s{i % 10}"})
        session.execute(insert(Job), job_rows)
        session.execute(insert(JobLabel), label_rows)
        score_rows = []
        for i in range(scores):
            job = job_rows[i % jobs]
            task, metric = MEASURES[(i // jobs) % len(MEASURES)]
            model = MODELS[(i // (jobs * len(MEASURES))) % len(MODELS)]
            value = 1.5 + (i % 97) / 100 if task != "copy_ru" else (i % 100) / 100
            score_rows.append(
                {
                    "job_id": job["id"],
                    "team_id": team.id,
                    "model": model,
                    "variant": model.split(":", 1)[1] if ":" in model else None,
                    "task": task,
                    "metric": metric,
                    "value": value,
                    "n": 50,
                    "created_at": now,
                }
            )
        session.execute(insert(Score), score_rows)
        page_job = job_rows[-1]["id"]
        events = [
            {"job_id": page_job, "type": "stage", "stage": stage, "message": message, "level": "info", "ts": now}
            for stage in ("tokenizer", "init", "cpt", "evaluate")
            for message in ("started", "done in 10.0 s")
        ]
        events += [
            {
                "job_id": page_job,
                "type": "metrics",
                "stage": "cpt",
                "message": "",
                "level": "info",
                "ts": now,
                "data": {"step": step * 10, "total": 1000, "loss": 4 - step / 50, "tokens_per_s": 20_000.0},
            }
            for step in range(1, 101)
        ]
        session.execute(insert(JobEvent), events)
    engine.dispose()
    return key, page_job


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed(client: httpx.Client, path: str, repeat: int) -> dict[str, float]:
    times, size = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        response = client.get(path)
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, (path, response.status_code, response.text[:300])
        size = len(response.content)
    times.sort()
    return {
        "p50_ms": round(statistics.median(times), 1),
        "p95_ms": round(times[max(0, int(len(times) * 0.95) - 1)], 1),
        "max_ms": round(times[-1], 1),
        "bytes": size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--scores", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    name = f"langadapt_bench_dash_{os.getpid()}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    params = dict(part.split("=", 1) for part in PG_ADMIN.split())
    url = f"postgresql+psycopg://{params['user']}@{params['host']}:{params['port']}/{name}"
    home = tempfile.mkdtemp(prefix="langadapt-bench-dash-")
    server = None
    try:
        upgrade(url)
        started = time.perf_counter()
        key, page_job = seed(url, "bench", args.jobs, args.scores)
        seed(url, "neighbour", args.jobs, args.scores)
        seed_s = time.perf_counter() - started
        # Planner statistics, as autovacuum gathers them after a load this size (a fresh bulk load without them
        # makes the label-filtered results page ~40x slower: nested loops planned for one row).
        with psycopg.connect(f"{PG_ADMIN.replace('dbname=test', '')} dbname={name}", autocommit=True) as db:
            db.execute("ANALYZE")
        port = free_port()
        env = {
            **os.environ,
            "LANGADAPT_HOME": home,
            "LANGADAPT_DATABASE_URL": url,
            "LANGADAPT_BROKER_URL": "redis://127.0.0.1:6379/15",
            "LANGADAPT_QUEUE_PREFIX": f"bench-dash-{os.getpid()}:",
        }
        langadapt = os.path.join(os.path.dirname(sys.executable), "langadapt")
        server = subprocess.Popen(
            [langadapt, "serve", "--no-worker", "--port", str(port), "--log-level", "warning"],
            env=env,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=60) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the API did not start")
                time.sleep(0.2)
            form = client.get("/dashboard/login").text
            csrf = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
            signed = client.post("/dashboard/login", data={"api_key": key, "csrf": csrf}, follow_redirects=True)
            assert signed.status_code == 200 and "Sign out" in signed.text
            pages = [
                ("healthz", "/healthz"),
                ("jobs", "/dashboard"),
                ("jobs_by_label", "/dashboard?label=suite:s3"),
                ("job", f"/dashboard/jobs/{page_job}"),
                ("results", "/dashboard/results"),
                ("results_by_label", "/dashboard/results?label=suite:s3&group=init_method"),
            ]
            baseline = None
            for page, path in pages:
                timed(client, path, 2)  # warm-up: connections, template compilation
                result = timed(client, path, args.repeat)
                baseline = baseline or result["p50_ms"]
                line = {
                    "bench": "dashboard_load",
                    "page": page,
                    "path": path,
                    "jobs": args.jobs,
                    "scores": args.scores,
                    "repeat": args.repeat,
                    **result,
                    "ratio_vs_healthz_p50": round(result["p50_ms"] / baseline, 1),
                    "seed_s": round(seed_s, 1),
                }
                print(json.dumps(line), flush=True)
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
