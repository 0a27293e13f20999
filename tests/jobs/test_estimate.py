"""`POST /v1/jobs?dry_run=true`: validated like a submission, answered with an estimate, and nothing is written
or queued: no job row, no broker message."""

from __future__ import annotations

import json
import uuid

import redis
from sqlalchemy import func, select

from langadapt.core.adaptation.train.plan import ModelShape
from langadapt.jobs import execution
from langadapt.jobs.db import make_engine, make_sessionmaker, session_scope
from langadapt.jobs.models import Job, JobStatus
from tests.jobs.conftest import REDIS_URL, job_body


def _broker_keys(settings) -> list[bytes]:
    return list(redis.Redis.from_url(REDIS_URL).scan_iter(match=f"{settings.queue_prefix}*", count=1000))


def _jobs_in_db(settings) -> int:
    engine = make_engine(settings.database)
    with make_sessionmaker(engine)() as session:
        count = session.scalar(select(func.count()).select_from(Job))
    engine.dispose()
    return count


def test_dry_run_estimates_without_a_job_or_a_message(client, auth, files, model_root, settings) -> None:
    # A base model no other test runs jobs on: the session's database is shared, and measured rates win.
    body = job_body(model_root, files, instruct_model=None, base_model=str(model_root / "instruct"))
    jobs_before = _jobs_in_db(settings)
    response = client.post("/v1/jobs?dry_run=true", headers=auth, json=body)
    assert response.status_code == 200, response.text
    estimate = response.json()
    assert estimate["object"] == "estimate"
    assert _jobs_in_db(settings) == jobs_before and client.get("/v1/jobs", headers=auth).json()["data"] == []
    assert _broker_keys(settings) == []  # nothing was sent to the broker

    stages = {stage["stage"]: stage for stage in estimate["stages"]}
    assert list(stages) == ["tokenizer", "init", "cpt", "evaluate"]
    cpt = stages["cpt"]
    assert cpt["tokens"] == 6 * 2 * 1 * 32 and cpt["steps"] == 6  # steps x batch x accumulation x sequence
    assert cpt["rate_source"].startswith("seed: FLOPs model")
    assert cpt["gpu_minutes"] == round(cpt["tokens"] / cpt["tokens_per_s"] / 60, 2)
    assert estimate["gpu_minutes"] == round(sum(s["gpu_minutes"] for s in estimate["stages"]), 2)
    config = json.loads((model_root / "instruct" / "config.json").read_text())
    vocab = config["vocab_size"]
    shape = ModelShape.from_hf_config(config).with_vocab(vocab + 300)  # counts: tests/adaptation/test_plan
    trained = shape.trained_parameters("embeddings+head", 0)
    # init in full, of cpt only the tensors it trained (stored once per job: jobs/assembly.py), the tokenizer
    assert estimate["artifact_bytes"] == (shape.parameters + trained) * 4 + (vocab + 300) * 64

    payoff = estimate["payoff"]  # an English byte-level tokenizer against Russian text: the new tokens pay
    assert payoff["cached"] is False and payoff["sample_chars"] > 50_000
    assert payoff["proposed_chars_per_token"] > payoff["source_chars_per_token"] > 0
    assert payoff["gain"] == round(payoff["proposed_chars_per_token"] / payoff["source_chars_per_token"], 4)
    again = client.post("/v1/jobs?dry_run=true", headers=auth, json=body).json()["payoff"]
    assert again == {**payoff, "cached": True}

    refused = client.post("/v1/jobs?dry_run=true", headers=auth, json={**body, "corpus_file": "file_nope"})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "file_not_found"
    assert _broker_keys(settings) == []

    created = client.post("/v1/jobs", headers=auth, json=body)  # the control: a real submission is queued
    assert created.status_code == 201 and _broker_keys(settings) != []


def test_finished_jobs_replace_the_seed_with_measured_throughput(client, auth, files, model_root, settings) -> None:
    alias = model_root / f"alias-{uuid.uuid4().hex[:8]}"  # a model name only this test's jobs use
    alias.symlink_to(model_root / "base")
    body = job_body(model_root, files, instruct_model=None, base_model=str(alias))
    engine = make_engine(settings.database)
    for rate in (100.0, 300.0, 200.0):  # three jobs whose CPT reported these rates, as a worker records them
        job_id = client.post("/v1/jobs", headers=auth, json=body).json()["id"]
        with session_scope(make_sessionmaker(engine)) as session:
            execution.claim_job(session, job_id, "test-worker", settings)
            execution.set_progress(session, job_id, step=6, total=6, eta_s=0.0, cpt_tokens_per_s=rate)
            execution.finish_job(session, job_id, "test-worker", JobStatus.succeeded)
    engine.dispose()
    stages = client.post("/v1/jobs?dry_run=true", headers=auth, json=body).json()["stages"]
    cpt = next(stage for stage in stages if stage["stage"] == "cpt")
    assert cpt["tokens_per_s"] == 200.0
    assert cpt["rate_source"] == "measured: median of 3 finished job(s)"
    assert cpt["gpu_minutes"] == round(6 * 2 * 32 / 200.0 / 60, 2)
