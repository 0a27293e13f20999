"""The Python client end to end against the embedded service (`langadapt serve` in a subprocess, its own data
folder): upload a Russian corpus sample, estimate (dry run), submit a small real job on SmolLM2-135M-Instruct
(the `smollm2-135m-instruct` shortcut), follow its events to the end, download the adapted model (sha256 checked)
and query the results. One JSON line: the time of each phase; `client_overhead_s` is the wall time minus the time
the job itself ran (finished_at - created_at on the job row), and `ratio` divides the wall time by that job time.

    python bench/client_e2e.py [--corpus ../shared/data/ru/ruslit.jsonl.xz] [--chars 300000] [--cpt-steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

from langadapt.client import Client
from langadapt.core.adaptation.corpus import iter_documents

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BESIDE = os.path.join(os.path.dirname(REPO), "shared", "data", "ru", "ruslit.jsonl.xz")
DEFAULT_CORPUS = BESIDE if os.path.exists(BESIDE) else "/work/shared/data/ru/ruslit.jsonl.xz"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default=DEFAULT_CORPUS)
    parser.add_argument("--chars", type=int, default=300_000)
    parser.add_argument("--cpt-steps", type=int, default=4)
    args = parser.parse_args()

    home = tempfile.mkdtemp(prefix="langadapt-bench-client-")
    sample = os.path.join(home, "ru.jsonl")
    with open(sample, "w", encoding="utf-8") as out:
        for text in iter_documents(args.corpus, limit_chars=args.chars):
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    env = {**os.environ, "LANGADAPT_HOME": os.path.join(home, "data")}
    for name in ("LANGADAPT_DATABASE_URL", "LANGADAPT_BROKER_URL", "LANGADAPT_STORAGE_URL"):
        env.pop(name, None)
    langadapt = os.path.join(os.path.dirname(sys.executable), "langadapt")
    port = free_port()
    phases: dict[str, float] = {}
    clock = time.perf_counter()
    server = subprocess.Popen(
        [langadapt, "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=open(os.path.join(home, "serve.log"), "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        while True:
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        phases["serve_ready_s"] = time.perf_counter() - clock
        created = subprocess.run(
            [langadapt, "admin", "create-team", "bench"], env=env, capture_output=True, text=True, check=True
        )
        key = json.loads(created.stdout)["api_key"]

        started = time.perf_counter()
        with Client(base, key) as client:
            mark = time.perf_counter()
            corpus = client.files.upload(sample)
            phases["upload_s"] = time.perf_counter() - mark
            spec = {
                "base_model": "smollm2-135m-instruct",
                "corpus_file": corpus.id,
                "vocab": {"method": "extended", "new_tokens": 2000},
                "cpt": {"steps": args.cpt_steps, "seq_len": 64, "batch_size": 2, "grad_accum": 1, "log_every": 1},
                "evaluation": {"tasks": ["symbols_per_token", "bits_per_char"], "heldout_chars": 5000},
                "labels": {"bench": "client_e2e"},
            }
            mark = time.perf_counter()
            estimate = client.jobs.estimate(spec)
            phases["estimate_s"] = time.perf_counter() - mark
            mark = time.perf_counter()
            job = client.jobs.create(spec)
            events: list[object] = []
            job = client.jobs.wait(job.id, on_event=events.append)
            phases["submit_and_wait_s"] = time.perf_counter() - mark
            if job.status != "succeeded":
                raise SystemExit(f"job {job.id} {job.status}: {job.error}")
            mark = time.perf_counter()
            model = client.artifacts.download(job.id, "cpt/model.safetensors", to=home)
            phases["download_s"] = time.perf_counter() - mark
            mark = time.perf_counter()
            rows = client.results.query(labels={"bench": "client_e2e"})
            phases["results_s"] = time.perf_counter() - mark
        wall = time.perf_counter() - started
        job_s = (job.finished_at - job.created_at).total_seconds()
        print(
            json.dumps(
                {
                    "bench": "client_e2e",
                    "wall_s": round(wall, 2),
                    "job_s": round(job_s, 2),
                    "client_overhead_s": round(wall - job_s, 2),
                    "ratio": round(wall / job_s, 3),
                    **{name: round(value, 2) for name, value in phases.items()},
                    "events": len(events),
                    "model_bytes": os.path.getsize(model),
                    "result_rows": len(rows),
                    "estimate_gpu_minutes": estimate.gpu_minutes,
                    "payoff_gain": estimate.payoff.gain if estimate.payoff else None,
                    "corpus_chars": corpus.chars,
                }
            ),
            flush=True,
        )
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
