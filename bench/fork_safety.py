"""Job processes started while the embedded (SQLite) broker is busy: how many hang, with the worker's start method
(`forkserver`, see worker/tasks.py) against a plain fork of the busy process as the baseline.

A thread of this process polls the embedded broker (kombu's SQLAlchemy transport on a SQLite file) in a tight loop,
as a Celery worker's consumer does. Meanwhile `--forks` child processes are started one after another; each opens
the job database (`jobs.db.make_engine`, SQLite) and updates a row, as `claim_job` does, then exits. A child that
has not finished within `--timeout` seconds counts as hung (a SQLite mutex inherited locked through a fork) and is
killed. Prints one JSON line per start method: forks, hung, seconds, forks per second.

    python bench/fork_safety.py [--forks 1000] [--timeout 10] [--methods forkserver,fork]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from queue import Empty

from kombu import Connection
from sqlalchemy import text

from langadapt.jobs.db import make_engine


def claim_like(database_url: str) -> None:
    engine = make_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE jobs SET n = n + 1 WHERE id = 1"))
    engine.dispose()


def busy_broker(broker_url: str, stop: threading.Event) -> None:
    with Connection(broker_url) as connection:
        queue = connection.SimpleQueue("bench-fork-safety")
        while not stop.is_set():
            with contextlib.suppress(Empty):
                queue.get(block=False)
        queue.close()


def run(method: str, forks: int, timeout: float, database_url: str, broker_url: str) -> dict:
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["__main__", "langadapt.jobs.db", "sqlalchemy.dialects.sqlite"])
    stop = threading.Event()
    poller = threading.Thread(target=busy_broker, args=(broker_url, stop), daemon=True)
    poller.start()
    time.sleep(0.5)
    hung = failed = 0
    started = time.perf_counter()
    for _ in range(forks):
        child = context.Process(target=claim_like, args=(database_url,))
        child.start()
        child.join(timeout)
        if child.is_alive():
            hung += 1
            child.kill()
            child.join()
        elif child.exitcode != 0:
            failed += 1
    seconds = time.perf_counter() - started
    stop.set()
    poller.join()
    return {
        "bench": "fork_safety",
        "start_method": method,
        "forks": forks,
        "hung": hung,
        "failed": failed,
        "seconds": round(seconds, 1),
        "forks_per_s": round(forks / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--forks", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before a child counts as hung")
    parser.add_argument("--methods", default="forkserver,fork", help="start methods, the worker's first")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="langadapt-fork-")
    try:
        database_url = f"sqlite:///{os.path.join(tmp, 'jobs.db')}"
        engine = make_engine(database_url)
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE jobs (id INTEGER PRIMARY KEY, n INTEGER)"))
            connection.execute(text("INSERT INTO jobs VALUES (1, 0)"))
        broker_url = f"sqla+sqlite:///{os.path.join(tmp, 'broker.db')}"
        for method in args.methods.split(","):
            print(json.dumps(run(method, args.forks, args.timeout, database_url, broker_url)), flush=True)
        with engine.connect() as connection:
            print(json.dumps({"bench": "fork_safety", "rows_updated": connection.scalar(text("SELECT n FROM jobs"))}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
