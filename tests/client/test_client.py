"""The Python client against the embedded service in a subprocess: upload, submit, follow the events through
connections that keep dropping, download through them with Range resumes, results, errors by code, retries."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from langadapt.api.schemas import EventPublic, JobPublic, ResultGroup, ResultPublic
from langadapt.client import Client
from langadapt.client.errors import (
    ChecksumMismatch,
    ConflictError,
    InvalidApiKey,
    InvalidModel,
    JobNotFound,
    JobNotRetryable,
    NotFoundError,
)
from tests.client.conftest import small_job
from tests.tcp_proxy import TcpProxy


def test_a_job_from_upload_to_download_through_a_flaky_network(service, model_root, corpus, tmp_path) -> None:
    key = service.new_key("flaky")
    direct = Client(service.url, key)
    uploaded = direct.files.upload(corpus)
    assert uploaded.documents == 400 and uploaded.filename == "ru.txt"
    job = direct.jobs.create(small_job(model_root, uploaded.id))
    assert isinstance(job, JobPublic) and job.status == "queued" and job.labels == {"suite": "client"}

    # Every connection through this proxy drops after 1 KB: the event stream breaks every few events.
    flaky = TcpProxy("127.0.0.1", service.port, cut_after_bytes=1000)
    with Client(f"http://127.0.0.1:{flaky.port}", key) as client:
        seen: list[EventPublic] = list(client.jobs.events(job.id, follow=True))  # ends with the job
    final = direct.jobs.wait(job.id)
    assert final.status == "succeeded", (final.error, service.log())
    every = list(direct.jobs.events(job.id))
    assert [e.id for e in seen] == [e.id for e in every]  # nothing lost, nothing repeated
    assert flaky.connections > len(seen) // 4  # the stream really was reopened (with Last-Event-ID)
    cpt = [e for e in seen if e.type == "metrics" and e.stage == "cpt"]
    assert [e.data["step"] for e in cpt] == [1, 2, 3, 4] and all(e.data["loss"] > 0 for e in cpt)

    # The model file is larger than the cut: every GET ends early, and each retry resumes with a Range request.
    listed = {a.name: a for a in direct.artifacts.list(job.id)}
    model = listed["cpt/model.safetensors"]
    assert model.size > 3 * 1000
    flaky.cut_after_bytes = model.size // 3
    before = flaky.connections
    with Client(f"http://127.0.0.1:{flaky.port}", key, retries=10) as client:
        path = client.artifacts.download(job.id, model.name, to=tmp_path)
    assert path == tmp_path / "model.safetensors" and not (tmp_path / "model.safetensors.part").exists()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == model.sha256
    assert flaky.connections - before >= 4  # the listing, then at least 3 partial GETs
    flaky.close()

    # A corrupt partial file is caught by the checksum and removed.
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "scores.json.part").write_bytes(b"x" * listed["evaluate/scores.json"].size)
    with pytest.raises(ChecksumMismatch):
        direct.artifacts.download(job.id, "evaluate/scores.json", to=tmp_path / "again" / "scores.json")
    assert not (tmp_path / "again" / "scores.json.part").exists()
    again = direct.artifacts.download(job.id, "evaluate/scores.json", to=tmp_path / "again" / "scores.json")
    assert hashlib.sha256(again.read_bytes()).hexdigest() == listed["evaluate/scores.json"].sha256

    rows = direct.results.query(labels={"suite": "client"}, task="bits_per_char")
    assert rows and all(isinstance(r, ResultPublic) and r.job_id == job.id for r in rows)
    assert {r.model for r in rows} == {"original", "adapted"}
    groups = direct.results.query(labels={"suite": "client"}, group_by=["vocab_method"])
    assert all(isinstance(g, ResultGroup) and g.key["vocab_method"] == "extended" for g in groups)
    assert {s.task for s in direct.jobs.scores(job.id)} == {"symbols_per_token", "bits_per_char"}


def test_listing_pages_and_errors_by_code(service, model_root, corpus) -> None:
    client = Client(service.url, service.new_key("pages"))
    file_id = client.files.upload(corpus).id
    created = [client.jobs.create(small_job(model_root, file_id, labels={"batch": "b"})) for _ in range(5)]
    for job in created:
        client.jobs.cancel(job.id)  # queued: cancelled at once, never runs
    listed = list(client.jobs.list(labels={"batch": "b"}, page_size=2))  # three pages
    assert [j.id for j in listed] == [j.id for j in reversed(created)]
    assert {j.status for j in listed} <= {"cancelled", "cancelling"}  # a worker may have claimed one first
    assert client.jobs.cancel(created[-1].id).status in ("cancelled", "cancelling")  # idempotent

    same = client.jobs.create(small_job(model_root, file_id), idempotency_key="nightly-1")
    assert client.jobs.create(small_job(model_root, file_id), idempotency_key="nightly-1").id == same.id
    with pytest.raises(ConflictError) as reused:
        client.jobs.create(small_job(model_root, file_id, labels={"other": "x"}), idempotency_key="nightly-1")
    assert reused.value.code == "idempotency_key_reused" and reused.value.status == 409
    client.jobs.cancel(same.id)

    with pytest.raises(JobNotFound):
        client.jobs.get("job_000000000000000000000000")
    with pytest.raises(NotFoundError):  # the status class catches every 404 code
        client.jobs.cancel("job_missing")
    queued = client.jobs.create(small_job(model_root, file_id))
    with pytest.raises(JobNotRetryable):
        client.jobs.retry(queued.id)
    client.jobs.cancel(queued.id)
    with pytest.raises(InvalidModel) as refused:
        client.jobs.create(small_job(model_root, file_id, base_model="/etc"))
    assert refused.value.param == "base_model"
    with pytest.raises(InvalidApiKey):
        Client(service.url, "la_not-a-key").jobs.get(created[0].id)


def test_requests_are_retried_until_the_service_is_back(service, corpus) -> None:
    proxy = TcpProxy("127.0.0.1", service.port)
    client = Client(f"http://127.0.0.1:{proxy.port}", service.new_key("outage"), retries=6)
    proxy.cut()  # connections refused for a second
    threading.Timer(1.0, proxy.restore).start()
    started = time.monotonic()
    uploaded = client.files.upload(corpus)  # a POST that never reached the server is safe to resend
    assert uploaded.documents == 400 and time.monotonic() - started >= 1.0
    proxy.close()
