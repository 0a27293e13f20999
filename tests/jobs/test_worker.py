"""A real Celery worker runs jobs end to end: Postgres job table, Redis broker, S3 (moto) artifacts."""

from __future__ import annotations

import hashlib
import json
import os
import time

import httpx
import torch

from langadapt.core.adaptation.sources import save_pretrained
from tests.jobs.conftest import all_events, cpt_step, job_body, wait_for

TERMINAL = {"succeeded", "failed", "cancelled"}


def _download(client, auth, job_id: str, name: str) -> bytes:
    """A stored file comes straight from S3 (a presigned redirect, no API key); a model file kept as a recipe is
    assembled and streamed by the API."""
    response = client.get(f"/v1/jobs/{job_id}/artifacts/{name}", headers=auth, follow_redirects=False)
    if name.endswith(".safetensors"):
        assert response.status_code == 200, response.text
        return response.content
    assert response.status_code == 307, response.text
    presigned = httpx.get(response.headers["location"])
    assert presigned.status_code == 200
    return presigned.content


def test_job_runs_end_to_end_through_the_worker(client, auth, settings, start_worker, model_root, files) -> None:
    start_worker(settings)
    job = client.post("/v1/jobs", headers=auth, json=job_body(model_root, files)).json()
    job = wait_for(client, auth, job["id"], lambda j: j["status"] in TERMINAL)
    assert job["status"] == "succeeded", job
    assert job["stage"] == "evaluate" and job["error"] is None and job["finished_at"] >= job["started_at"]

    artifacts = {a["name"]: a for a in client.get(f"/v1/jobs/{job['id']}/artifacts", headers=auth).json()["data"]}
    expected = {
        "tokenizer/tokenizer.json": "tokenizer",
        "init/model.safetensors": "initialised_base",
        "cpt/model.safetensors": "adapted_base",
        "propagate-swap/model.safetensors": "propagated_instruct",
        "propagate-conversion/model.safetensors": "propagated_instruct",
        "evaluate/scores.json": "eval_report",
        "evaluate/manifest.json": "eval_report",
    }
    for name, kind in expected.items():
        assert artifacts[name]["kind"] == kind, name
    # Every artifact downloads with the size and sha256 the API lists; every model file complete (assembled).
    models = [name for name in artifacts if name.endswith(".safetensors")]
    assert len(models) == 4
    embedding_bytes = {}
    for name in ["tokenizer/tokenizer.json", "evaluate/scores.json", *models]:
        data = _download(client, auth, job["id"], name)
        assert (len(data), hashlib.sha256(data).hexdigest()) == (artifacts[name]["size"], artifacts[name]["sha256"])
        if name in models:
            resumed = client.get(f"/v1/jobs/{job['id']}/artifacts/{name}", headers={**auth, "Range": "bytes=1000-"})
            assert resumed.status_code == 206 and resumed.content == data[1000:]
            header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
            begin, end = header["model.embed_tokens.weight"]["data_offsets"]  # tied: the head too
            embedding_bytes[name] = end - begin
    store = settings.open_store()
    prefix = f"teams/{team_id(client, auth)}/jobs/{job['id']}/"
    manifest = json.loads(b"".join(store.iter_bytes(prefix + "manifest.json")))
    assert {a["name"] for a in manifest["artifacts"]} == set(artifacts)
    assert store.list(prefix + "checkpoints/") == []  # nothing but the artifacts is kept after success
    # Each tensor is stored once: init and the propagated models reference the input models' layers, and every
    # model stage stores only its new embedding matrix. `stored_bytes` is what the job's objects really occupy.
    assert {name: artifacts[name]["stored_bytes"] for name in models} == embedding_bytes
    stored = sum(a["stored_bytes"] for a in artifacts.values())
    assert sum(o.size for o in store.list(prefix)) == stored + store.stat(prefix + "manifest.json").size

    # Scores in SQL are exactly the evaluate stage's report.
    report = json.loads(_download(client, auth, job["id"], "evaluate/scores.json"))
    scores = client.get(f"/v1/jobs/{job['id']}/scores", headers=auth).json()["data"]
    assert sorted((s["model"], s["task"], s["metric"], s["value"], s["n"]) for s in scores) == sorted(
        (r["model"], r["task"], r["metric"], r["value"], r["n"]) for r in report
    )
    assert {s["model"] for s in scores} == {"original", "propagated:swap", "propagated:conversion"}
    results = client.get("/v1/results?label=suite:e2e&task=symbols_per_token&metric=target", headers=auth).json()
    assert {r["variant"] for r in results["data"]} == {None, "swap", "conversion"}
    assert all(r["vocab_method"] == "extended" and r["labels"] == {"suite": "e2e"} for r in results["data"])
    grouped = client.get("/v1/results?group_by=variant,task&task=bits_per_char", headers=auth).json()["data"]
    # task, metric and model are always part of a group: a mean never mixes them
    assert {tuple(g["key"].values()) for g in grouped} == {
        (variant, "bits_per_char", "target", model)
        for variant, model in ((None, "original"), ("swap", "propagated:swap"), ("conversion", "propagated:conversion"))
    }
    assert all(g["count"] == 1 for g in grouped)

    events = all_events(client, auth, job["id"])
    started = [e["stage"] for e in events if e["type"] == "stage" and e["message"] == "started"]
    assert started == ["inputs", "tokenizer", "init", "cpt", "propagate:swap", "propagate:conversion", "evaluate"]
    cpt_metrics = [e["data"] for e in events if e["type"] == "metrics" and e["stage"] == "cpt"]
    assert cpt_metrics[-1]["step"] == 6 and cpt_metrics[-1]["total"] == 6 and cpt_metrics[-1]["unit"] == "steps"
    assert "loss" in cpt_metrics[-1] and cpt_metrics[-1]["eta_s"] == 0
    evaluated = [e["data"] for e in events if e["type"] == "metrics" and e["stage"] == "evaluate"]
    evaluated_pairs = {(d["model"], d["task"]) for d in evaluated}
    assert evaluated_pairs >= {("original", "copy_ru"), ("propagated:swap", "bits_per_char")}
    assert not os.path.exists(os.path.join(settings.work, "jobs", job["id"]))  # scratch space released

    stream = client.get(f"/v1/jobs/{job['id']}/events", headers={**auth, "Accept": "text/event-stream"})
    assert stream.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in stream.text.split("\n\n") if b.strip()]
    assert len(blocks) == len(events) + 1 and blocks[-1] == 'event: end\ndata: {"status": "succeeded"}'
    assert blocks[0].startswith(f"id: {events[0]['id']}\nevent: stage\n")

    # Deleting the finished job removes every object it stored, then its rows.
    assert client.delete(f"/v1/jobs/{job['id']}", headers=auth).status_code == 204
    assert store.list(prefix) == []
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["error"]["code"] == "job_not_found"
    assert client.get("/v1/results?label=suite:e2e", headers=auth).json()["data"] == []


def team_id(client, auth) -> str:
    from langadapt.jobs.teams import authenticate

    with client.app.state.services.sessions() as session:
        return authenticate(session=session, key=auth["Authorization"].split()[1]).id


def test_cancel_stops_cpt_and_retry_resumes_from_the_checkpoint(
    client, auth, settings, start_worker, model_root, files
) -> None:
    start_worker(settings)
    body = job_body(
        model_root,
        files,
        instruct_model=None,
        evaluation={"tasks": ["symbols_per_token"]},
        cpt={"steps": 1000, "seq_len": 32, "batch_size": 2, "grad_accum": 1, "checkpoint_every": 500},
    )
    job = client.post("/v1/jobs", headers=auth, json=body).json()
    wait_for(client, auth, job["id"], lambda j: cpt_step(j) >= 20 or j["status"] in TERMINAL)
    asked = time.monotonic()
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth).json()["status"] == "cancelling"
    cancelled = wait_for(client, auth, job["id"], lambda j: j["status"] in TERMINAL, timeout=60)
    latency = time.monotonic() - asked
    assert cancelled["status"] == "cancelled" and cancelled["stage"] == "cpt", cancelled
    assert latency < 15, latency
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth).json()["status"] == "cancelled"
    messages = [e["message"] for e in all_events(client, auth, job["id"])]
    message = next(m for m in messages if m.startswith("cpt cancelled at step "))
    stopped_at = int(message.rsplit(" ", 1)[-1])
    assert messages[-1] == f"checkpoint of step {stopped_at} saved to storage"  # uploaded as the attempt ended
    assert 20 <= stopped_at < 500  # before the first periodic checkpoint: only the cancel's checkpoint exists
    before = {
        a["name"]: a["sha256"] for a in client.get(f"/v1/jobs/{job['id']}/artifacts", headers=auth).json()["data"]
    }

    # The worker's scratch space is removed when the job ends, so the retry is as on "another machine": completed
    # stages and the cancel checkpoint come back from storage; they are not re-run and CPT resumes from it.
    deadline = time.monotonic() + 30
    while os.path.exists(os.path.join(settings.work, "jobs", job["id"])):
        assert time.monotonic() < deadline, "scratch space left behind"
        time.sleep(0.1)
    retried = client.post(f"/v1/jobs/{job['id']}/retry", headers=auth).json()
    assert retried["status"] == "queued" and retried["attempt"] == 2
    done = wait_for(client, auth, job["id"], lambda j: j["status"] in TERMINAL)
    assert done["status"] == "succeeded", done
    after = {a["name"]: a["sha256"] for a in client.get(f"/v1/jobs/{job['id']}/artifacts", headers=auth).json()["data"]}
    assert {name: sha for name, sha in after.items() if name in before} == before  # tokenizer/, init/ untouched
    cpt_info = json.loads(_download(client, auth, job["id"], "cpt/stage.json"))
    assert (cpt_info["resumed_from"], cpt_info["steps"]) == (stopped_at, 1000)
    events = all_events(client, auth, job["id"])
    second = events[[e["message"] for e in events].index("retry requested") :]
    rerun = [e["stage"] for e in second if e["type"] == "stage" and e["message"] == "started"]
    assert "cpt" in rerun and not {"tokenizer", "init"} & set(rerun)
    skipped = [e["stage"] for e in second if e["type"] == "stage" and e["message"] == "complete output found: skipped"]
    assert skipped == ["tokenizer", "init"]  # restored from storage, and said so


def test_a_model_in_the_service_bucket_is_fetched_by_the_worker(
    client, auth, settings, start_worker, model_root, files
) -> None:
    store = client.app.state.services.store
    for path in (model_root / "base").iterdir():
        store.put_file(f"models/tiny-base/{path.name}", str(path))
    bucket = settings.storage.removeprefix("s3://")
    start_worker(settings, queues="gpu")
    body = job_body(
        model_root,
        files,
        base_model=f"s3://{bucket}/models/tiny-base",
        instruct_model=None,
        evaluation={"tasks": ["symbols_per_token"]},
    )
    job = client.post("/v1/jobs", headers=auth, json=body).json()
    done = wait_for(client, auth, job["id"], lambda j: j["status"] in TERMINAL)
    assert done["status"] == "succeeded", done
    # Another team's prefix, a missing prefix and another bucket are refused at submit time.
    for ref in (f"s3://{bucket}/teams/team_other/models/x", f"s3://{bucket}/models/missing", "s3://elsewhere/models/x"):
        refused = client.post("/v1/jobs", headers=auth, json={**body, "base_model": ref})
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_model", ref


def test_a_diverging_run_fails_as_training_diverged_and_publishes_no_model(
    client, auth, settings, start_worker, model_root, files, tiny_model, english_byte_level_tokenizer
) -> None:
    tok = english_byte_level_tokenizer
    diverging = model_root / "diverging"
    if not diverging.exists():
        model = tiny_model(len(tok), seed=13)
        with torch.no_grad():
            model.get_input_embeddings().weight[tok.eos_token_id] = float("inf")  # every packed block has an EOS
        save_pretrained(model, tok, str(diverging))
    start_worker(settings, queues="gpu")
    body = job_body(
        model_root, files, base_model=str(diverging), instruct_model=None, evaluation={"tasks": ["symbols_per_token"]}
    )
    job = client.post("/v1/jobs", headers=auth, json=body).json()
    done = wait_for(client, auth, job["id"], lambda j: j["status"] in TERMINAL)
    assert done["status"] == "failed", done
    assert {k: done["error"][k] for k in ("code", "stage", "kind")} == {
        "code": "training_diverged",
        "stage": "cpt",
        "kind": "user",
    }
    # A user error is never retried: one attempt, though the job had three.
    assert (done["attempt"], done["max_attempts"]) == (1, 3)
    assert [(a["attempt"], a["outcome"], a["error"]["code"]) for a in done["attempts"]] == [
        (1, "failed", "training_diverged")
    ]
    names = {a["name"] for a in client.get(f"/v1/jobs/{job['id']}/artifacts", headers=auth).json()["data"]}
    assert not any(name.startswith(("cpt/", "evaluate/")) for name in names) and "init/model.safetensors" in names
    deadline = time.monotonic() + 30
    while os.path.exists(os.path.join(settings.work, "jobs", job["id"])):  # no scratch left behind
        assert time.monotonic() < deadline
        time.sleep(0.1)
