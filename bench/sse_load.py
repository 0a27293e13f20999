"""Many open event streams plus reads, then a burst of submissions, against one API process: no 5xx, `/healthz`
stays fast, every stream gets every event, every submission is answered in time and creates exactly one job.

The API runs as a real uvicorn server in its own process (one worker, like `langadapt serve`) on PostgreSQL
(a throwaway `langadapt_bench_<pid>` database, Redis db 15 as broker) or on the embedded default (`--database
sqlite`: SQLite job table and SQLite broker in a temporary folder). No worker runs: this process plays the workers,
appending an event per second to each job while `--streams` SSE streams (spread over `--jobs` jobs, each stream
from the first event) are open, and `GET /v1/jobs/{id}` runs open-loop at `--get-rate` plus `GET /healthz` at
10/s; after `--seconds` the jobs are marked failed, so every stream must end with `event: end` having received
every event of its job. Then `--posts` teams (distinct keys) each submit one job at the same instant.

Printed, one JSON line each: `sse_streams` (streams complete / total, events expected / received, GET and healthz
latency percentiles, 5xx and other errors, server CPU) and `post_burst` (answers by status, slowest answer, jobs
in the database vs 201 answers). Ratios are against `/healthz` in the same run.

    python bench/sse_load.py [--database postgresql|sqlite] [--streams 200] [--seconds 60] [--get-rate 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid

import httpx
import psycopg
import redis
from api_latency import RawHttp, cpu_seconds, load, start_server, stop_server
from sqlalchemy import func, select, update

from langadapt.jobs import execution
from langadapt.jobs.db import make_engine, make_sessionmaker, session_scope, upgrade
from langadapt.jobs.models import Job, JobStatus
from langadapt.jobs.teams import create_team

CORPUS = "Мороз и солнце; день чудесный!\nЕщё ты дремлешь, друг прелестный.\n" * 20


def percentiles(values: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "p50_ms": round(cuts[49] * 1000, 2),
        "p99_ms": round(cuts[98] * 1000, 2),
        "max_ms": round(max(values) * 1000, 2),
    }


async def read_stream(host: str, port: int, path: str, key: str) -> tuple[int, int, bool]:
    """(status, events received, ended with `event: end`) of one SSE stream read to its end."""
    reader, writer = await asyncio.open_connection(host, port)
    head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\nAccept: text/event-stream\r\n\r\n"
    writer.write(head.encode())
    data = b""
    try:
        while chunk := await reader.read(65536):
            data += chunk
            if b"event: end" in data:
                break
    finally:
        writer.close()
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data.count(b"\nid: "), b"event: end" in data


class Feeder(threading.Thread):
    """Plays the workers: one event per job per second; counts what it wrote."""

    def __init__(self, database_url: str, job_ids: list[str]) -> None:
        super().__init__(daemon=True)
        self.sessions = make_sessionmaker(make_engine(database_url))
        self.job_ids = job_ids
        self.written = dict.fromkeys(job_ids, 0)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            with self.sessions() as session:
                for job_id in self.job_ids:
                    execution.append_event(session, job_id, type="metrics", data={"step": self.written[job_id]})
                    session.commit()
                    self.written[job_id] += 1

    def finish(self) -> None:
        self.stop.set()
        self.join()
        with session_scope(self.sessions) as session:
            session.execute(update(Job).where(Job.id.in_(self.job_ids)).values(status=JobStatus.failed))


async def streams_phase(url: str, database_url: str, key: str, body: dict, args, server_pid: int) -> dict:
    host, port = url.removeprefix("http://").split(":")
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=auth, timeout=30) as api:
        job_ids = [api.post("/v1/jobs", json=body).raise_for_status().json()["id"] for _ in range(args.jobs)]
    feeder = Feeder(database_url, job_ids)
    cpu_before = cpu_seconds(server_pid)
    started = time.perf_counter()
    streams = [
        asyncio.create_task(read_stream(host, int(port), f"/v1/jobs/{job_ids[i % args.jobs]}/events", key))
        for i in range(args.streams)
    ]
    await asyncio.sleep(1.0)  # every stream open before the events start
    feeder.start()
    client = RawHttp(host, int(port), 16)
    await client.open()
    get_raw = client.request("GET", f"/v1/jobs/{job_ids[0]}", auth)
    health_raw = client.request("GET", "/healthz", {})
    gets, health = await asyncio.gather(
        load(lambda _: client.send(get_raw), args.get_rate, args.seconds),
        load(lambda _: client.send(health_raw), 10, args.seconds),
    )
    await asyncio.to_thread(feeder.finish)
    results = await asyncio.wait_for(asyncio.gather(*streams, return_exceptions=True), 120)
    elapsed = time.perf_counter() - started
    await client.close()
    expected = sum(feeder.written[job_ids[i % args.jobs]] for i in range(args.streams))  # a new job has no events
    complete = [r for r in results if isinstance(r, tuple) and r[0] == 200 and r[2]]
    errors = gets["errors"] + health["errors"]
    get, healthz = percentiles(gets["latencies"]), percentiles(health["latencies"])
    return {
        "bench": "sse_load",
        "phase": "sse_streams",
        "database": args.database,
        "streams": args.streams,
        "streams_complete": len(complete),
        "stream_statuses": sorted({r[0] if isinstance(r, tuple) else repr(r)[:60] for r in results}),
        "events_expected": expected,
        "events_received": sum(r[1] for r in complete),
        "seconds": args.seconds,
        "get_rate": args.get_rate,
        "get": get,
        "healthz": healthz,
        "errors_5xx": sum(1 for e in errors if e[:1] == "5"),
        "errors_other": sum(1 for e in errors if e[:1] != "5"),
        "p99_ratio_get_vs_healthz": round(
            percentiles(gets["latencies"])["p99_ms"] / percentiles(health["latencies"])["p99_ms"], 2
        ),
        "server_cpu_pct": round(100 * (cpu_seconds(server_pid) - cpu_before) / elapsed),
    }


async def post_burst(url: str, database_url: str, submissions: list[tuple[str, dict]], args) -> dict:
    """Every submission sent at the same instant, each on its own connection."""
    host, port = url.removeprefix("http://").split(":")

    async def post(key: str, body: dict) -> tuple[int, float]:
        payload = json.dumps(body).encode()
        started = time.perf_counter()
        client = RawHttp(host, int(port), 1)
        try:
            await client.open()
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            status, _ = await asyncio.wait_for(client.send(client.request("POST", "/v1/jobs", headers, payload)), 60)
        except Exception:
            status = 0
        finally:
            await client.close()
        return status, time.perf_counter() - started

    engine = make_engine(database_url)
    with make_sessionmaker(engine)() as session:
        before = session.scalar(select(func.count()).select_from(Job))
    answers = await asyncio.gather(*(post(key, body) for key, body in submissions))
    with make_sessionmaker(engine)() as session:
        created = session.scalar(select(func.count()).select_from(Job)) - before
    engine.dispose()
    statuses: dict[str, int] = {}
    for status, _ in answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    latencies = [seconds for _, seconds in answers]
    return {
        "bench": "sse_load",
        "phase": "post_burst",
        "database": args.database,
        "posts": len(submissions),
        "statuses": statuses,
        "slowest_s": round(max(latencies), 2),
        "p50_s": round(statistics.median(latencies), 2),
        "answered_within_10s": sum(1 for s in latencies if s <= 10),
        "jobs_created": created,
        "answers_201": statuses.get("201", 0),
    }


def new_keys(database_url: str, count: int) -> list[str]:
    engine = make_engine(database_url)
    keys = []
    with session_scope(make_sessionmaker(engine)) as session:
        for _ in range(count):
            keys.append(create_team(session=session, name=f"bench-{uuid.uuid4().hex[:10]}")[1])
    engine.dispose()
    return keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=20, help="jobs the streams are spread over")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--get-rate", type=float, default=100)
    parser.add_argument("--posts", type=int, default=300)
    parser.add_argument("--pg-admin", default="host=127.0.0.1 port=5432 user=postgres dbname=test")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15", help="broker (this run's keys only)")
    args = parser.parse_args()

    name = f"langadapt_bench_{os.getpid()}"
    prefix = f"{name}:"
    tmp = tempfile.mkdtemp(prefix="langadapt-bench-")
    env = {**os.environ, "LANGADAPT_HOME": os.path.join(tmp, "data"), "LANGADAPT_QUEUE_PREFIX": prefix}
    if args.database == "postgresql":
        pg = dict(part.split("=", 1) for part in args.pg_admin.split())
        database_url = f"postgresql+psycopg://{pg['user']}@{pg['host']}:{pg['port']}/{name}"
        with psycopg.connect(args.pg_admin, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        env.update(LANGADAPT_DATABASE_URL=database_url, LANGADAPT_BROKER_URL=args.redis)
    else:
        database_url = f"sqlite:///{os.path.join(tmp, 'data', 'langadapt.db')}"
    model = os.path.join(tmp, "models", "base")  # any model folder under an allowed root passes the submit check
    os.makedirs(model)
    with open(os.path.join(model, "config.json"), "w") as config:
        json.dump({"max_position_embeddings": 2048}, config)
    env["LANGADAPT_ALLOWED_MODEL_ROOTS"] = json.dumps([os.path.join(tmp, "models")])
    server = None
    try:
        upgrade(database_url)
        keys = new_keys(database_url, 1 + args.posts)
        server, url = start_server(env, 1)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {keys[0]}"}, timeout=30) as api:
            corpus = api.post("/v1/files", files={"file": ("c.txt", CORPUS.encode())}).raise_for_status().json()["id"]
        body = {"base_model": model, "corpus_file": corpus, "cpt": {"seq_len": 64}}
        print(json.dumps(asyncio.run(streams_phase(url, database_url, keys[0], body, args, server.pid))), flush=True)
        # Each team of the burst submits a job on a corpus of its own (uploaded first, one by one).
        submissions = []
        with httpx.Client(base_url=url, timeout=30) as api:
            for key in keys[1:]:
                auth = {"Authorization": f"Bearer {key}"}
                upload = api.post("/v1/files", headers=auth, files={"file": ("c.txt", CORPUS.encode())})
                submissions.append((key, {**body, "corpus_file": upload.raise_for_status().json()["id"]}))
        print(json.dumps(asyncio.run(post_burst(url, database_url, submissions, args))), flush=True)
    finally:
        if server is not None:
            stop_server(server)
        if args.database == "postgresql":
            with psycopg.connect(args.pg_admin, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            broker = redis.Redis.from_url(args.redis)
            for key in broker.scan_iter(match=f"{prefix}*", count=1000):
                broker.delete(key)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
