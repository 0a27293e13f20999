"""Requests a hostile but authenticated client can send answer 4xx (or work), never 500; models are checked when
the worker opens them, not only at submit."""

from __future__ import annotations

import os

import pytest

from langadapt.core.adaptation.errors import AdaptationInputError
from langadapt.jobs.artifacts import local_model

TEXT = "Мороз и солнце; день чудесный!\n"


@pytest.fixture
def job_id(client, auth, upload, model_root) -> str:
    body = {"base_model": str(model_root / "base"), "corpus_file": upload(TEXT)["id"], "cpt": {"seq_len": 64}}
    response = client.post("/v1/jobs", headers=auth, json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_huge_headers_are_431_before_the_key_is_checked(client, auth) -> None:
    response = client.get("/v1/jobs", headers={"Authorization": "Bearer " + "a" * 100_000})
    assert response.status_code == 431 and response.json()["error"]["code"] == "headers_too_large"
    assert client.get("/v1/jobs", headers={**auth, "X-Filler": "b" * 1000}).status_code == 200


@pytest.mark.parametrize(
    ("path", "headers", "param"),
    [
        ("/v1/jobs/{job}/events?after=9223372036854775808", {}, "after"),
        ("/v1/results?after=9223372036854775808", {}, "after"),
        ("/v1/jobs/{job}/events", {"Accept": "text/event-stream", "Last-Event-ID": "9" * 5000}, "last-event-id"),
        ("/v1/jobs/{job}/events", {"Accept": "text/event-stream", "Last-Event-ID": "99999999999999999999"}, None),
    ],
)
def test_numbers_beyond_64_bits_are_422(client, auth, job_id, path, headers, param) -> None:
    response = client.get(path.format(job=job_id), headers={**auth, **headers})
    assert response.status_code == 422, response.text
    assert param is None or response.json()["error"]["param"].lower() == param


def test_far_future_dates_filter_instead_of_failing(client, auth, job_id) -> None:
    for query in ("since=9999-12-31T23:59:59", "until=9999-12-31T23:59:59Z", "since=0001-01-01T00:00:00"):
        response = client.get(f"/v1/results?{query}", headers=auth)
        assert response.status_code in (200, 422), response.text


def test_models_lists_models_only_and_tokenizers_are_refused(client, auth, job_id, model_root, settings) -> None:
    from langadapt.core.adaptation.shortcuts import available_shortcuts

    listed = {model["id"] for model in client.get("/v1/models", headers=auth).json()["data"]}
    tokenizers = {name for name, path in available_shortcuts().items() if not path.endswith(".gguf")}
    assert not listed & tokenizers
    body = client.get(f"/v1/jobs/{job_id}", headers=auth).json()["request"]
    for name in tokenizers:
        response = client.post("/v1/jobs", headers=auth, json={**body, "base_model": name})
        assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_model", name
        assert "tokenizer" in response.json()["error"]["message"]
    (model_root / "tok").mkdir(exist_ok=True)
    (model_root / "tok" / "tokenizer.json").write_text("{}")
    refused = client.post("/v1/jobs", headers=auth, json={**body, "base_model": str(model_root / "tok")})
    assert refused.json()["error"]["code"] == "invalid_model"


def test_the_worker_resolves_a_model_path_again(tmp_path, make_settings) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "real").mkdir(parents=True)
    outside.mkdir()
    link = root / "model"
    link.symlink_to(root / "real")
    settings = make_settings(allowed_model_roots=[str(root)])
    assert local_model(settings, settings.open_store(), str(link)) == os.path.realpath(root / "real")
    link.unlink()
    link.symlink_to(outside)  # swapped after submit
    with pytest.raises(AdaptationInputError) as refused:
        local_model(settings, settings.open_store(), str(link))
    assert refused.value.code == "invalid_model"
