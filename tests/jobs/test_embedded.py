"""The README's run command: `langadapt serve` on the embedded defaults (SQLite, a local artifact folder, a broker
in a SQLite file, workers started by the same command) serves the API and runs a real job with no services."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.embedded import LANGADAPT, EmbeddedService


def test_serve_runs_a_job_with_no_external_services(tmp_path, model_root) -> None:
    with EmbeddedService(tmp_path, model_root) as service:
        base = service.url
        elsewhere = tmp_path / "another-folder"  # the data folder comes from settings, never from the cwd
        elsewhere.mkdir()
        created = subprocess.run(
            [LANGADAPT, "admin", "create-team", "demo"],
            env=service.env,
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
        deadline = time.monotonic() + 300
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
            job = httpx.get(f"{base}/v1/jobs/{job['id']}", headers=auth).json()
        assert job["status"] == "succeeded", (job["error"], service.log()[-3000:])
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
        deadline = time.monotonic() + 300
        gpu_worker = service.worker_pids()[0]
        os.killpg(gpu_worker, signal.SIGKILL)
        while "worker_restarted" not in service.log_path.read_text():
            assert time.monotonic() < deadline, service.log()
            time.sleep(0.2)
        restarted = next(
            json.loads(line)["worker_restarted"]
            for line in service.log_path.read_text().splitlines()
            if line.startswith('{"worker_restarted"')
        )
        assert restarted != gpu_worker and Path(f"/proc/{restarted}").exists()
        while httpx.get(f"{base}/readyz").status_code != 200:
            assert time.monotonic() < deadline + 60
            time.sleep(0.2)
    worker_pids = service.worker_pids()
    assert len(worker_pids) == 2
    for pid in worker_pids:  # the workers stopped with the command
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
