"""`langadapt jobs ...` / `langadapt results` against the embedded service in a subprocess, as a user runs them."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time

import yaml

from langadapt.client import Client
from tests.embedded import LANGADAPT


def cli(service, key: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**service.env, "LANGADAPT_BASE_URL": service.url, "LANGADAPT_API_KEY": key}
    done = subprocess.run([LANGADAPT, *args], env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, (done.stdout, done.stderr)
    return done


def test_submit_wait_then_inspect_download_and_results(service, model_root, corpus, tmp_path) -> None:
    key = service.new_key("cli")
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "base_model": str(model_root / "base"),
                "corpus": corpus.name,  # a local file, relative to the spec: uploaded by the command
                "vocab": {"method": "extended", "new_tokens": 300},
                "cpt": {"steps": 4, "seq_len": 32, "batch_size": 2, "warmup_steps": 1, "log_every": 1},
                "evaluation": {"tasks": ["symbols_per_token", "bits_per_char"], "heldout_chars": 2000},
                "labels": {"suite": "cli"},
            }
        )
    )
    estimate = json.loads(cli(service, key, "jobs", "submit", str(spec), "--dry-run", "--json").stdout)
    assert [stage["stage"] for stage in estimate["stages"]] == ["tokenizer", "init", "cpt", "evaluate"]
    assert estimate["payoff"]["gain"] > 1
    table = cli(service, key, "jobs", "submit", str(spec), "--dry-run").stdout
    assert "GPU minutes: " in table and "payoff: " in table and "(cached" not in table
    assert cli(service, key, "jobs", "list").stdout == ""  # a dry run leaves no job

    started = time.monotonic()
    done = cli(service, key, "jobs", "submit", str(spec), "--wait")
    print(f"langadapt jobs submit --wait: {time.monotonic() - started:.1f} s")
    job_id = next(line.split()[0] for line in done.stderr.splitlines() if line.endswith(" submitted"))
    assert f"{job_id}  succeeded" in done.stdout, (done.stdout, done.stderr)
    assert "uploading" in done.stderr and "[cpt] started" in done.stderr and "[evaluate] done in" in done.stderr
    assert "cpt  4/4 steps  loss " in done.stderr and " tok/s" in done.stderr  # the progress display

    listed = [json.loads(line) for line in cli(service, key, "jobs", "list", "--json").stdout.splitlines()]
    assert [job["id"] for job in listed] == [job_id]
    shown = json.loads(cli(service, key, "jobs", "show", job_id, "--json").stdout)
    assert shown["status"] == "succeeded" and shown["labels"] == {"suite": "cli"}
    logs = cli(service, key, "jobs", "logs", job_id).stdout
    assert "[cpt] started" in logs and '"tokens_per_s"' in logs
    followed = cli(service, key, "jobs", "logs", job_id, "-f", "--json").stdout.splitlines()
    followed = [json.loads(line) for line in followed]
    assert followed[-1]["id"] == job_id and followed[-1]["status"] == "succeeded"  # the events, then the job
    assert [e["id"] for e in followed[:-1]] == sorted(e["id"] for e in followed[:-1])

    out = tmp_path / "artifacts"
    fetched = cli(service, key, "jobs", "download", job_id, "evaluate/scores.json", "--out", str(out), "--json")
    assert json.loads(fetched.stdout)["path"] == str(out / "evaluate" / "scores.json")
    listed_sha = {a.name: a.sha256 for a in Client(service.url, key).artifacts.list(job_id)}
    digest = hashlib.sha256((out / "evaluate" / "scores.json").read_bytes()).hexdigest()
    assert digest == listed_sha["evaluate/scores.json"]

    rows = cli(service, key, "results", "--label", "suite:cli", "--json").stdout.splitlines()
    rows = [json.loads(line) for line in rows]
    assert {(r["model"], r["task"]) for r in rows} >= {("original", "bits_per_char"), ("adapted", "bits_per_char")}
    grouped = cli(service, key, "results", "--label", "suite:cli", "--group-by", "vocab_method").stdout
    assert "vocab_method=extended task=bits_per_char metric=" in grouped

    refused = cli(service, key, "jobs", "retry", job_id, check=False)
    assert refused.returncode == 2 and "job_not_retryable" in refused.stderr
    missing = cli(service, key, "jobs", "show", "job_nope", check=False)
    assert missing.returncode == 2 and "job_not_found" in missing.stderr
