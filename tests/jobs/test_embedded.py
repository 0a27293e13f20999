"""The README's run command: `langadapt serve` on the embedded defaults (SQLite, a local artifact folder, a broker
in a SQLite file, workers started by the same command) serves the API and runs a real job with no services."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.s3_server import free_port

LANGADAPT = str(Path(sys.executable).with_name("langadapt"))


def test_serve_runs_a_job_with_no_external_services(tmp_path, model_root) -> None:
    env = {
        **os.environ,
        "LANGADAPT_HOME": str(tmp_path / "data"),
        "LANGADAPT_ALLOWED_MODEL_ROOTS": json.dumps([str(model_root)]),
        "LANGADAPT_HEARTBEAT_INTERVAL_S": "0.5",
        "LANGADAPT_WORKER_BEAT_INTERVAL_S": "0.5",
    }
    for name in ("LANGADAPT_DATABASE_URL", "LANGADAPT_BROKER_URL", "LANGADAPT_STORAGE_URL"):
        env.pop(name, None)
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [LANGADAPT, "serve", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        elsewhere = tmp_path / "another-folder"  # the data folder comes from settings, never from the cwd
        elsewhere.mkdir()
        created = subprocess.run(
            [LANGADAPT, "admin", "create-team", "demo"],
            env=env,
            cwd=elsewhere,
            capture_output=True,
            text=True,
            check=True,
        )
        assert list(elsewhere.iterdir()) == []
        auth = {"Authorization": f"Bearer {json.loads(created.stdout)['api_key']}"}
        corpus = "".join(f"Строка номер {i}: мороз и солнце, день чудесный.\n" for i in range(400)).encode()
        file_id = httpx.post(f"{base}/v1/files", headers=auth, files={"file": ("ru.txt", corpus)}).json()["id"]
        body = {
            "base_model": str(model_root / "base"),
            "corpus_file": file_id,
            "vocab": {"method": "extended", "new_tokens": 300},
            "cpt": {"steps": 3, "seq_len": 32, "batch_size": 2, "grad_accum": 1, "warmup_steps": 1},
            "evaluation": {"tasks": ["symbols_per_token", "bits_per_char"], "heldout_chars": 2000},
        }
        job = httpx.post(f"{base}/v1/jobs", headers=auth, json=body).json()
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline + 240, job
            time.sleep(0.5)
            job = httpx.get(f"{base}/v1/jobs/{job['id']}", headers=auth).json()
        assert job["status"] == "succeeded", (job["error"], (tmp_path / "serve.log").read_text()[-3000:])
        scores = httpx.get(f"{base}/v1/jobs/{job['id']}/scores", headers=auth).json()["data"]
        assert {(s["model"], s["task"]) for s in scores} >= {
            ("original", "bits_per_char"),
            ("adapted", "bits_per_char"),
        }
        artifacts = httpx.get(f"{base}/v1/jobs/{job['id']}/artifacts", headers=auth).json()["data"]
        model = next(a for a in artifacts if a["name"] == "cpt/model.safetensors")
        data = httpx.get(f"{base}/v1/jobs/{job['id']}/artifacts/cpt/model.safetensors", headers=auth).content
        assert hashlib.sha256(data).hexdigest() == model["sha256"]
        assert (tmp_path / "data" / "langadapt.db").is_file() and (tmp_path / "data" / "artifacts").is_dir()

        # A killed worker is started again, and the service is ready again once it beats.
        gpu_worker = json.loads((tmp_path / "serve.log").read_text().splitlines()[0])["worker_pids"][0]
        os.killpg(gpu_worker, signal.SIGKILL)
        while "worker_restarted" not in (tmp_path / "serve.log").read_text():
            assert time.monotonic() < deadline + 300
            time.sleep(0.2)
        restarted = next(
            json.loads(line)["worker_restarted"]
            for line in (tmp_path / "serve.log").read_text().splitlines()
            if line.startswith('{"worker_restarted"')
        )
        assert restarted != gpu_worker and Path(f"/proc/{restarted}").exists()
        while httpx.get(f"{base}/readyz").status_code != 200:
            assert time.monotonic() < deadline + 360
            time.sleep(0.2)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()
    started = json.loads((tmp_path / "serve.log").read_text().splitlines()[0])
    assert len(started["worker_pids"]) == 2
    for pid in started["worker_pids"]:  # the workers stopped with the command
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
