"""Request latency of `GET /v1/jobs/{id}` and `POST /v1/jobs` against PostgreSQL, with `GET /healthz` as baseline.

The API runs as a real uvicorn server in its own process (`--workers W`) on a throwaway Postgres database
(`langadapt_bench_<pid>`, migrated, one team and key), Redis db 15 as the Celery broker (POST dispatches a message
there; no worker consumes it) and a local artifact folder. One corpus file and one job are created first; the GETs
read that job, every POST submits the same body with a unique `Idempotency-Key` (so each creates a job).

The load is open-loop from this process: asyncio and a minimal HTTP/1.1 client (httpx would take most of a core
from the server at these rates) over `--connections` keep-alive connections, one request every 1/rate s whether
or not earlier ones have answered, for `--seconds` per endpoint after a 1 s warm-up. Latency runs from the
*scheduled* send time, so a queue for a connection or a stalled server counts (no coordinated omission).
Percentiles cover every request; errors are non-2xx answers or exceptions. Client and server share the machine:
`server_cpu_pct` / `client_cpu_pct` (100 = one core busy) tell which side was saturated; `rate_achieved` is
requests / time until the last answer. One JSON line per endpoint, `/healthz` first; ratios are against its run
in the same process.

    python bench/api_latency.py [--rate 300] [--post-rate 150] [--seconds 10] [--connections 32] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable

import httpx
import psycopg
import redis

from langadapt.core.adaptation.shortcuts import available_shortcuts
from langadapt.jobs.db import make_engine, make_sessionmaker, session_scope, upgrade
from langadapt.jobs.teams import create_team

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = "Мороз и солнце; день чудесный!\nЕщё ты дремлешь, друг прелестный.\nПора, красавица, проснись.\n" * 20
MODEL = "smollm2-135m-instruct"
WARMUP_S = 1.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its descendants, from /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as children:
                total += sum(cpu_seconds(int(child)) for child in children.read().split())
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return total


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class RawHttp:
    """A minimal keep-alive HTTP/1.1 client over asyncio streams: pre-encoded requests, Content-Length bodies.

    httpx costs ~1.4 ms of CPU per request, which on a 2-core machine starves the server it measures; this costs a
    fraction of that. A request waits for a free connection, and that wait counts in its latency.
    """

    def __init__(self, host: str, port: int, connections: int) -> None:
        self.host, self.port, self.size = host, port, connections
        self.pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def open(self) -> None:
        for _ in range(self.size):
            self.pool.put_nowait(await asyncio.open_connection(self.host, self.port))

    async def close(self) -> None:
        while not self.pool.empty():
            _, writer = self.pool.get_nowait()
            writer.close()

    def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        reader, writer = await self.pool.get()
        try:
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            body = await reader.readexactly(length)
        except Exception:
            writer.close()  # a broken connection is replaced, not reused
            self.pool.put_nowait(await asyncio.open_connection(self.host, self.port))
            raise
        self.pool.put_nowait((reader, writer))
        return status, body


async def load(send: Callable[[int], Awaitable[tuple[int, bytes]]], rate: float, seconds: float) -> dict:
    """Open-loop: start request i at start + i / rate; latency from that scheduled instant to its answer."""
    latencies: list[float] = []
    errors: list[str] = []

    async def one(index: int, scheduled: float) -> None:
        try:
            status, body = await send(index)
            if not 200 <= status < 300:
                errors.append(f"{status} {body[:300]!r}")
        except Exception as exc:  # timeouts, refused or reset connections: all count as errors
            errors.append(repr(exc))
        latencies.append(time.perf_counter() - scheduled)

    count = round(rate * seconds)
    tasks = []
    start = time.perf_counter()
    for index in range(count):
        scheduled = start + index / rate
        if (delay := scheduled - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(index, scheduled)))
    await asyncio.gather(*tasks)
    return {"latencies": latencies, "errors": errors, "elapsed": time.perf_counter() - start}


async def measure(
    name: str, send: Callable[[int], Awaitable[tuple[int, bytes]]], rate: float, args, server_pid: int
) -> dict:
    await load(send, rate, WARMUP_S)
    server_cpu, client_cpu = cpu_seconds(server_pid), own_cpu_seconds()
    result = await load(send, rate, args.seconds)
    elapsed = result["elapsed"]
    server_cpu, client_cpu = cpu_seconds(server_pid) - server_cpu, own_cpu_seconds() - client_cpu
    for error in result["errors"][:3]:
        print(f"{name}: {error}", file=sys.stderr)
    cuts = statistics.quantiles(result["latencies"], n=100, method="inclusive")
    return {
        "bench": "api_latency",
        "endpoint": name,
        "rate_target": rate,
        "rate_achieved": round(len(result["latencies"]) / elapsed, 1),
        "requests": len(result["latencies"]),
        "errors": len(result["errors"]),
        "p50_ms": round(cuts[49] * 1000, 2),
        "p90_ms": round(cuts[89] * 1000, 2),
        "p99_ms": round(cuts[98] * 1000, 2),
        "max_ms": round(max(result["latencies"]) * 1000, 2),
        "server_cpu_pct": round(100 * server_cpu / elapsed),
        "client_cpu_pct": round(100 * client_cpu / elapsed),
    }


async def run(url: str, key: str, model: str, args, server_pid: int) -> None:
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=auth, timeout=30.0) as setup:
        upload = setup.post("/v1/files", files={"file": ("corpus.txt", CORPUS.encode())})
        upload.raise_for_status()
        body = {"base_model": model, "corpus_file": upload.json()["id"]}
        job = setup.post("/v1/jobs", json=body)
        job.raise_for_status()
    job_id, run_id = job.json()["id"], uuid.uuid4().hex[:8]
    host, port = url.removeprefix("http://").split(":")
    client = RawHttp(host, int(port), args.connections)
    await client.open()
    payload = json.dumps(body).encode()
    post_headers = {**auth, "Content-Type": "application/json"}
    endpoints = {
        "GET /healthz": lambda _: client.send(client.request("GET", "/healthz", {})),
        "GET /v1/jobs/{id}": lambda _: client.send(client.request("GET", f"/v1/jobs/{job_id}", auth)),
        "POST /v1/jobs": lambda i: client.send(
            client.request("POST", "/v1/jobs", {**post_headers, "Idempotency-Key": f"{run_id}-{i}"}, payload)
        ),
    }
    baseline = None
    try:
        for name, send in endpoints.items():
            rate = args.post_rate if name.startswith("POST") else args.rate
            row = await measure(name, send, rate, args, server_pid)
            baseline = baseline or row
            row["p50_ratio_vs_healthz"] = round(row["p50_ms"] / baseline["p50_ms"], 2)
            row["p99_ratio_vs_healthz"] = round(row["p99_ms"] / baseline["p99_ms"], 2)
            row.update(database="postgresql", api_workers=args.workers, connections=args.connections)
            print(json.dumps(row), flush=True)
    finally:
        await client.close()


def new_key(database_url: str) -> str:
    engine = make_engine(database_url)
    with session_scope(make_sessionmaker(engine)) as session:
        _, key = create_team(session=session, name="bench")
    engine.dispose()
    return key


def start_server(env: dict[str, str], workers: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "uvicorn", "langadapt.api.app:create_app", "--factory", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", str(workers), "--log-level", "warning", "--no-access-log"]
    server = subprocess.Popen(command, env=env, cwd=REPO, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).is_success:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError("the API server did not start")


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.terminate()  # uvicorn's supervisor stops its workers on SIGTERM
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=300, help="target requests per second")
    parser.add_argument(
        "--post-rate", type=float, default=150, help="target rate of POST /v1/jobs (~200/s saturates 2 cores)"
    )
    parser.add_argument("--seconds", type=float, default=10, help="measured seconds per endpoint")
    parser.add_argument("--connections", type=int, default=32, help="client keep-alive connections at most")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes (one per core)")
    parser.add_argument("--pg-admin", default="host=127.0.0.1 port=5432 user=postgres dbname=test")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15", help="broker (this run's keys only)")
    args = parser.parse_args()

    name = f"langadapt_bench_{os.getpid()}"
    pg = dict(part.split("=", 1) for part in args.pg_admin.split())
    database_url = f"postgresql+psycopg://{pg['user']}@{pg['host']}:{pg['port']}/{name}"
    broker = redis.Redis.from_url(args.redis)
    prefix = f"{name}:"  # this run's queues and broker keys, deleted at the end
    tmp = tempfile.mkdtemp(prefix="langadapt-bench-")
    server = None
    try:
        with psycopg.connect(args.pg_admin, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        upgrade(database_url)
        env = {
            **os.environ,
            "LANGADAPT_DATABASE_URL": database_url,
            "LANGADAPT_BROKER_URL": args.redis,
            "LANGADAPT_QUEUE_PREFIX": prefix,
            "LANGADAPT_STORAGE_URL": os.path.join(tmp, "artifacts"),
            "LANGADAPT_HOME": os.path.join(tmp, "data"),
        }
        model = MODEL
        if MODEL not in available_shortcuts():  # any existing path under an allowed root passes the submit check
            model = os.path.join(tmp, "models", "base")
            os.makedirs(model)
            open(os.path.join(model, "config.json"), "w").close()
            env["LANGADAPT_ALLOWED_MODEL_ROOTS"] = json.dumps([os.path.join(tmp, "models")])
        key = new_key(database_url)
        server, url = start_server(env, args.workers)
        asyncio.run(run(url, key, model, args, server.pid))
    finally:
        if server is not None:
            stop_server(server)
        with psycopg.connect(args.pg_admin, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        for key in broker.scan_iter(match=f"{prefix}*", count=1000):
            broker.delete(key)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
