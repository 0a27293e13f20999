"""Health, readiness, metrics, migrations guard, and the local artifact store's download path."""

from __future__ import annotations

import http.client
import json
import os
import re

import pytest
from fastapi.testclient import TestClient

from langadapt.api.app import create_app
from langadapt.jobs import execution
from langadapt.jobs.db import DatabaseNotMigrated, upgrade
from langadapt.jobs.models import Artifact
from tests.jobs.conftest import LiveServer, new_team_key
from tests.s3_server import free_port


def test_health_ready_and_metrics(client, auth) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["gpu_worker"] == "no GPU worker alive"
    assert "no GPU worker alive" in ready.json()["error"]["message"]
    settings = client.app.state.services.settings
    with client.app.state.services.sessions() as session:  # a maintenance worker does not make the API ready
        execution.worker_beat(session, name="m@host", queues=[settings.queue("maintenance")], pid=1)
        assert client.get("/readyz").status_code == 503
        execution.worker_beat(session, name="g@host", queues=[settings.queue("gpu")], pid=2)
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok", "gpu_worker": "ok"}
    client.get("/v1/jobs", headers=auth)
    text = client.get("/metrics").text
    assert 'langadapt_jobs{status="queued"}' in text and "langadapt_queue_depth" in text
    assert 'langadapt_request_seconds_count{method="GET",route="/v1/jobs",status="200"}' in text


def test_metrics_token_guards_service_wide_counts(make_settings) -> None:
    with TestClient(create_app(make_settings(metrics_token="s3cret"))) as client:
        refused = client.get("/metrics")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_metrics_token"
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        allowed = client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
        assert allowed.status_code == 200 and "langadapt_jobs" in allowed.text


def test_readyz_names_what_is_down(make_settings) -> None:
    settings = make_settings(s3_endpoint=f"127.0.0.1:{free_port()}", broker_url=f"redis://127.0.0.1:{free_port()}/0")
    app = create_app(settings)
    with TestClient(app) as client:  # the API starts even with storage and broker down
        response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["error"]["code"] == "not_ready" and body["checks"]["database"] == "ok"
    assert body["checks"]["broker"].startswith("unavailable") and body["checks"]["storage"].startswith("unavailable")


def test_the_app_refuses_an_unmigrated_database(tmp_path, make_settings) -> None:
    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'fresh.db'}")
    with pytest.raises(DatabaseNotMigrated, match="langadapt db upgrade"), TestClient(create_app(settings)):
        pass


def test_local_store_streams_artifacts_and_refuses_traversal(tmp_path, make_settings) -> None:
    """The embedded default: SQLite and a local folder; downloads are streamed files, not redirects."""
    settings = make_settings(
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", storage_url=str(tmp_path / "artifacts")
    )
    upgrade(settings.database)
    key = new_team_key(settings)
    auth = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings)) as client:
        corpus = client.post("/v1/files", headers=auth, files={"file": ("c.txt", "текст\n".encode())}).json()
        body = {
            "base_model": str(settings.allowed_model_roots[0]) + "/base",
            "corpus_file": corpus["id"],
            "cpt": {"seq_len": 64},  # within the tiny model's 256 positions
        }
        job = client.post("/v1/jobs", headers=auth, json=body).json()
        services = client.app.state.services
        services.store.put_bytes(f"teams/x/jobs/{job['id']}/artifacts/evaluate/scores.json", b"[1, 2]")
        with services.sessions() as session:
            session.add(
                Artifact(
                    job_id=job["id"],
                    name="evaluate/scores.json",
                    kind="eval_report",
                    size=6,
                    stored_bytes=6,
                    sha256="s",
                    storage_key=f"teams/x/jobs/{job['id']}/artifacts/evaluate/scores.json",
                )
            )
            session.commit()
        download = client.get(f"/v1/jobs/{job['id']}/artifacts/evaluate/scores.json", headers=auth)
        assert download.status_code == 200 and download.content == b"[1, 2]"
        assert 'filename="scores.json"' in download.headers["content-disposition"]
        head = client.head(f"/v1/jobs/{job['id']}/artifacts/evaluate/scores.json", headers=auth)
        assert head.status_code == 200 and head.content == b""
        assert (head.headers["content-length"], head.headers["x-content-sha256"]) == ("6", "s")
        with LiveServer(settings) as server:  # raw paths: HTTP clients would normalise dot segments
            for name in (
                "evaluate/../evaluate/scores.json",
                "evaluate/%2E%2E/evaluate/scores.json",
                "evaluate%2Fscores.json",
                "evaluate/./scores.json",
                "evaluate//scores.json",
                "/etc/passwd",
                "..%2F..%2Fetc%2Fpasswd",
                "evaluate%5Cscores.json",
            ):
                connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
                connection.request("GET", f"/v1/jobs/{job['id']}/artifacts/{name}", headers=auth)
                response = connection.getresponse()
                error = json.loads(response.read())["error"]
                connection.close()
                assert response.status in (400, 404, 422), name
                assert error["code"] in ("invalid_artifact_name", "artifact_not_found", "not_found"), name
        missing = client.get(f"/v1/jobs/{job['id']}/artifacts/evaluate/other.json", headers=auth)
        assert missing.json()["error"]["code"] == "artifact_not_found"
    assert os.path.isfile(
        tmp_path / "artifacts" / "teams" / "x" / "jobs" / job["id"] / "artifacts" / "evaluate" / "scores.json"
    )


def test_docs_work_offline_with_an_authorize_button(client) -> None:
    """Swagger UI's assets come from the service itself (no CDN), and the API key is an HTTP bearer scheme."""
    page = client.get("/docs").text
    assets = re.findall(r"""(?:src|href)=["']([^"']+\.(?:js|css))["']""", page)
    assert len(assets) == 2 and all(asset.startswith("/") for asset in assets), assets
    for asset in assets:
        response = client.get(asset)
        assert response.status_code == 200 and len(response.content) > 50_000, asset
    assert "cdn" not in page.lower()
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["APIKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "a team's API key: `Bearer la_...`",
    }
    assert schema["paths"]["/v1/jobs"]["post"]["security"] == [{"APIKey": []}]
    assert "head" in schema["paths"]["/v1/jobs/{job_id}/artifacts/{name}"]
    evaluation = schema["components"]["schemas"]["EvaluationConfig"]["properties"]
    assert evaluation["tasks"]["default"] == ["symbols_per_token", "bits_per_char", "copy_ru", "generation_speed"]
    assert evaluation["limit"]["default"] == 50
