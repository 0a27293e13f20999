"""Run a real job through a running service (default: `scripts/serve` on http://127.0.0.1:8000) and print its
timeline and scores: create a team, upload a Russian corpus slice and held-out text, submit, poll, download.

    python scripts/service_demo.py [--url URL] [--steps 40] [--corpus-chars 2000000] [--shared ../shared/data]

SmolLM2-135M-Instruct is the base model (the only causal LM that installs offline); the held-out text is taiga.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from langadapt.core.adaptation.corpus import iter_documents

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _jsonl(path: Path, chars: int) -> bytes:
    return "".join(
        json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in iter_documents(str(path), limit_chars=chars)
    ).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--corpus-chars", type=int, default=2_000_000)
    parser.add_argument("--new-tokens", type=int, default=4000)
    parser.add_argument("--shared", type=Path, default=SHARED, help="the shared data folder")
    args = parser.parse_args()

    created = subprocess.run(
        ["langadapt", "admin", "create-team", f"demo-{int(time.time())}"], check=True, capture_output=True, text=True
    )
    auth = {"Authorization": f"Bearer {json.loads(created.stdout)['api_key']}"}
    api = httpx.Client(base_url=args.url, headers=auth, timeout=120)

    def upload(name: str, data: bytes) -> str:
        response = api.post("/v1/files", files={"file": (name, io.BytesIO(data))})
        response.raise_for_status()
        print(json.dumps({"file": response.json()}), flush=True)
        return response.json()["id"]

    corpus = upload("ruslit.jsonl", _jsonl(args.shared / "ru" / "ruslit.jsonl.xz", args.corpus_chars))
    heldout = upload("taiga.jsonl", _jsonl(args.shared / "ru" / "taiga_devtest.jsonl", 30_000))
    body = {
        "base_model": "smollm2-135m-instruct",
        "corpus_file": corpus,
        "eval_file": heldout,
        "vocab": {"method": "extended", "new_tokens": args.new_tokens},
        "init": {"method": "mean"},
        "cpt": {
            "trainable": "embeddings+head",
            "steps": args.steps,
            "seq_len": 256,
            "batch_size": 4,
            "grad_accum": 1,
            "warmup_steps": 5,
            "lr": 5e-4,
            "checkpoint_every": 20,
        },
        "evaluation": {
            "tasks": ["symbols_per_token", "bits_per_char", "copy_ru"],
            "limit": 10,
            "heldout_chars": 20_000,
        },
        "labels": {"suite": "service-demo"},
    }
    started = time.monotonic()
    job = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": f"demo-{corpus}"}).json()
    stage = None
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(1)
        job = api.get(f"/v1/jobs/{job['id']}").json()
        if job["stage"] != stage:
            stage = job["stage"]
            print(json.dumps({"t_s": round(time.monotonic() - started, 1), "stage": stage}), flush=True)
    elapsed = round(time.monotonic() - started, 1)
    scores = api.get(f"/v1/jobs/{job['id']}/scores").json()["data"]
    artifacts = api.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
    print(
        json.dumps(
            {
                "job": job["id"],
                "status": job["status"],
                "error": job["error"],
                "seconds": elapsed,
                "artifacts": len(artifacts),
                "artifact_bytes": sum(a["size"] for a in artifacts),
                "scores": [{k: s[k] for k in ("model", "task", "metric", "value", "n")} for s in scores],
            }
        )
    )
    sys.exit(0 if job["status"] == "succeeded" else 1)


if __name__ == "__main__":
    main()
