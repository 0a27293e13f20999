"""Bytes one job stores: a SmolLM2-135M-Instruct job with `embeddings+head` CPT, the three LEP variants (swap,
overlap, conversion) and self+copy calibration, run through the service's own code on the embedded defaults (SQLite,
a local artifact folder in a temporary home): the API takes the upload and the job, the worker's `run_job` runs it
in this process, and every listed model file is then downloaded through the API and checked against its sha256.

Training is tiny (a few CPT and SFT steps, a small calibration set): what a stage stores depends on which tensors
it rewrites, not on how long it trains. Base and instruct model are both the installed `smollm2-135m-instruct`
shortcut (no real base/instruct pair installs offline), so the propagated layers equal the initialised ones. With
`--distinct-pair` they are that model written as bfloat16 and as float16 safetensors (in an allowed model root): a
pair whose layers differ in every byte, in the half precision published weights come in.

One JSON line: `stored_bytes` (what the job's artifacts occupy in storage), `model_bytes` (one complete model file:
`cpt/model.safetensors`), `ratio` = stored / model, and `before_bytes` / `before_ratio`: the sum of the artifacts'
complete sizes, what storing a full copy of every file (the service before tensor sharing) takes in the same run.

    python bench/storage_bytes.py [--cpt-steps 2] [--examples 4] [--distinct-pair]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import tempfile
import time

import torch
from fastapi.testclient import TestClient

from langadapt.api.app import create_app
from langadapt.core.adaptation.sources import load_model, save_pretrained
from langadapt.jobs.db import make_engine, make_sessionmaker, session_scope, upgrade
from langadapt.jobs.runtime import build_services
from langadapt.jobs.settings import Settings
from langadapt.jobs.teams import create_team
from langadapt.worker.runner import run_job

MODEL = "smollm2-135m-instruct"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BESIDE = os.path.join(os.path.dirname(REPO), "shared", "data", "ru", "ruslit.jsonl.xz")
CORPUS = BESIDE if os.path.exists(BESIDE) else "/work/shared/data/ru/ruslit.jsonl.xz"


def corpus(chars: int) -> bytes:
    lines = []
    with lzma.open(CORPUS, "rt", encoding="utf-8") as handle:
        for line in handle:
            lines.append(line)
            chars -= len(line)
            if chars <= 0:
                break
    return "".join(lines).encode()


def half_precision_copy(root: str, name: str, dtype: torch.dtype) -> str:
    """The shortcut's model as a Hugging Face folder of `dtype` safetensors under `root`."""
    model, tokenizer = load_model(MODEL)
    path = os.path.join(root, name)
    save_pretrained(model.to(dtype), tokenizer, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpt-steps", type=int, default=2)
    parser.add_argument("--examples", type=int, default=4, help="self-calibration and copy examples, each")
    parser.add_argument("--distinct-pair", action="store_true", help="base in bfloat16, instruct in float16")
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="langadapt-storage-bench-")
    base = instruct = MODEL
    roots = []
    if args.distinct_pair:
        roots = [os.path.join(home, "models")]
        base = half_precision_copy(roots[0], "base", torch.bfloat16)
        instruct = half_precision_copy(roots[0], "instruct", torch.float16)
    settings = Settings(_env_file=None, home=home, allowed_model_roots=roots)
    upgrade(settings.database)
    engine = make_engine(settings.database)
    with session_scope(make_sessionmaker(engine)) as session:
        _, key = create_team(session=session, name="bench")
    engine.dispose()
    auth = {"Authorization": f"Bearer {key}"}
    started = time.monotonic()
    with TestClient(create_app(settings)) as client:
        upload = client.post("/v1/files", headers=auth, files={"file": ("ru.jsonl", corpus(300_000))})
        assert upload.status_code == 201, upload.text
        body = {
            "base_model": base,
            "instruct_model": instruct,
            "corpus_file": upload.json()["id"],
            "vocab": {"method": "extended", "new_tokens": 500},
            "cpt": {
                "trainable": "embeddings+head",
                "steps": args.cpt_steps,
                "seq_len": 64,
                "batch_size": 2,
                "grad_accum": 1,
                "warmup_steps": 1,
            },
            "propagation": {"variant": ["swap", "overlap", "conversion"]},
            "calibration": {
                "method": "self+copy",
                "self_calibration_examples": args.examples,
                "copy_examples": args.examples,
                "max_new_tokens": 16,
                "batch_size": 4,
                "passage_max_chars": 200,
                "sft": {"batch_size": 2, "grad_accum": 1, "max_len": 512},
            },
            "evaluation": {"tasks": ["symbols_per_token"], "limit": 2, "heldout_chars": 2000},
        }
        created = client.post("/v1/jobs", headers=auth, json=body)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        run_job(build_services(settings), job_id)  # the worker's code, in this process
        job = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
        assert job["status"] == "succeeded", job
        artifacts = client.get(f"/v1/jobs/{job_id}/artifacts", headers=auth).json()["data"]
        models = [a for a in artifacts if a["name"].endswith(".safetensors")]
        for artifact in models:  # every listed model downloads complete, with its listed sha256
            digest, size = hashlib.sha256(), 0
            with client.stream("GET", f"/v1/jobs/{job_id}/artifacts/{artifact['name']}", headers=auth) as response:
                assert response.status_code == 200, response.read()
                for chunk in response.iter_bytes():
                    digest.update(chunk)
                    size += len(chunk)
            assert (size, digest.hexdigest()) == (artifact["size"], artifact["sha256"]), artifact["name"]
    stored = sum(a["stored_bytes"] for a in artifacts)
    before = sum(a["size"] for a in artifacts)
    model = next(a["size"] for a in artifacts if a["name"] == "cpt/model.safetensors")
    on_disk = sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(os.path.join(home, "artifacts"))
        for name in names
    )
    print(
        json.dumps(
            {
                "job": job_id,
                "base_model": base,
                "instruct_model": instruct,
                "model_files": sorted(a["name"] for a in models),
                "stored_bytes": stored,
                "store_folder_bytes": on_disk,
                "model_bytes": model,
                "ratio": round(stored / model, 3),
                "before_bytes": before,
                "before_ratio": round(before / model, 3),
                "stored_by_model_file": {a["name"]: a["stored_bytes"] for a in models},
                "downloads_verified": len(models),
                "seconds": round(time.monotonic() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
