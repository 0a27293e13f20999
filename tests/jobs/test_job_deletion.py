"""DELETE /v1/jobs/{id} and the artifact retention period, against Postgres, S3 (moto) and a real maintenance worker
with its beat schedule. The jobs here never run: their rows are set to finished and their files written directly."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from langadapt.jobs.execution import record_artifacts, record_scores
from langadapt.jobs.models import Artifact, Job, JobStatus, utcnow
from langadapt.jobs.storage import S3Store
from tests.jobs.conftest import job_body, new_team_key, wait_for
from tests.jobs.test_worker import team_id
from tests.s3_server import free_port


def finished_job(client, auth, model_root, files, *, status: JobStatus, days_ago: float) -> tuple[str, str]:
    """A job (never dispatched: no worker consumes its queue) made `status` `days_ago`, with a score, an artifact,
    a checkpoint and a manifest in storage; returns its id and its store prefix."""
    job = client.post("/v1/jobs", headers=auth, json=job_body(model_root, files)).json()
    services = client.app.state.services
    prefix = f"teams/{team_id(client, auth)}/jobs/{job['id']}/"
    key = prefix + "artifacts/evaluate/scores.json"
    services.store.put_bytes(key, b"[]")
    services.store.put_bytes(prefix + "checkpoints/checkpoint.json", b"{}")
    services.store.put_bytes(prefix + "manifest.json", b"{}")
    with services.sessions() as session:
        finished_at = utcnow() - timedelta(days=days_ago)
        session.execute(update(Job).where(Job.id == job["id"]).values(status=status, finished_at=finished_at))
        session.commit()
        row = Artifact(job_id=job["id"], name="evaluate/scores.json", kind="eval_report", size=2, sha256="s")
        row.storage_key, row.stored_bytes = key, 2
        record_artifacts(session, job["id"], [row])
        finished = session.get(Job, job["id"])
        record_scores(session, finished, [{"model": "original", "task": "copy_ru", "metric": "f1", "value": 1, "n": 1}])
    return job["id"], prefix


def test_delete_removes_a_finished_job_and_refuses_others(client, auth, settings, model_root, files) -> None:
    queued = client.post("/v1/jobs", headers=auth, json=job_body(model_root, files)).json()
    refused = client.delete(f"/v1/jobs/{queued['id']}", headers=auth)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "job_not_finished"
    assert client.get(f"/v1/jobs/{queued['id']}", headers=auth).json()["status"] == "queued"

    job_id, prefix = finished_job(client, auth, model_root, files, status=JobStatus.succeeded, days_ago=0)
    other = {"Authorization": f"Bearer {new_team_key(settings)}"}
    assert client.delete(f"/v1/jobs/{job_id}", headers=other).json()["error"]["code"] == "job_not_found"

    # Storage down: 503, and the job, its rows and its files are as they were.
    services = client.app.state.services
    store = services.store
    services.store = S3Store("down", "", f"127.0.0.1:{free_port()}", "k", "s", secure=False, timeout_s=2)
    try:
        down = client.delete(f"/v1/jobs/{job_id}", headers=auth)
    finally:
        services.store = store
    assert down.status_code == 503 and down.json()["error"]["code"] == "storage_unavailable"
    kept = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
    assert kept["status"] == "succeeded" and kept["artifacts_expired_at"] is None
    download = client.get(f"/v1/jobs/{job_id}/artifacts/evaluate/scores.json", headers=auth, follow_redirects=False)
    assert download.status_code == 307
    assert len(store.list(prefix)) == 3

    assert client.delete(f"/v1/jobs/{job_id}", headers=auth).status_code == 204
    assert store.list(prefix) == []
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/scores", headers=auth).status_code == 404
    assert client.delete(f"/v1/jobs/{job_id}", headers=auth).status_code == 404


def test_retention_deletes_old_artifacts_and_keeps_the_job_and_scores(
    client, auth, settings, start_worker, model_root, files
) -> None:
    old, old_prefix = finished_job(client, auth, model_root, files, status=JobStatus.failed, days_ago=3)
    recent, recent_prefix = finished_job(client, auth, model_root, files, status=JobStatus.failed, days_ago=0.5)
    maintenance = settings.model_copy(update={"artifact_retention_days": 1, "retention_interval_s": 0.5})
    start_worker(maintenance, queues="maintenance", beat=True)  # the beat schedule sends the retention task
    store = client.app.state.services.store
    # Marked first (downloads answer 410 from then on), then its files deleted, then its artifact rows.
    listed = lambda: client.get(f"/v1/jobs/{old}/artifacts", headers=auth).json()["data"]  # noqa: E731
    expired = wait_for(client, auth, old, lambda j: j["artifacts_expired_at"] is not None and not listed(), 120)
    assert expired["status"] == "failed" and store.list(old_prefix) == []
    gone = client.get(f"/v1/jobs/{old}/artifacts/evaluate/scores.json", headers=auth)
    assert gone.status_code == 410 and gone.json()["error"]["code"] == "artifacts_expired"
    assert [s["task"] for s in client.get(f"/v1/jobs/{old}/scores", headers=auth).json()["data"]] == ["copy_ru"]
    retry = client.post(f"/v1/jobs/{old}/retry", headers=auth)
    assert retry.status_code == 409 and retry.json()["error"]["code"] == "artifacts_expired"

    # The job finished within the period keeps everything.
    kept = client.get(f"/v1/jobs/{recent}", headers=auth).json()
    assert kept["artifacts_expired_at"] is None and len(store.list(recent_prefix)) == 3
    assert len(client.get(f"/v1/jobs/{recent}/artifacts", headers=auth).json()["data"]) == 1

    # An expired job can still be deleted.
    assert client.delete(f"/v1/jobs/{old}", headers=auth).status_code == 204
