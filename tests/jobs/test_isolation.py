"""Team isolation, for every route in the app: another team's ids are 404 (never 403), and lists show nothing."""

from __future__ import annotations

import re

from langadapt.jobs.execution import record_artifacts, record_scores
from langadapt.jobs.models import Artifact, Job
from tests.jobs.conftest import new_team_key

OWN_TEAM_ONLY = ("/healthz", "/readyz", "/metrics", "/v1/models")  # operator or global endpoints, no team data


def test_every_route_hides_other_teams_resources(client, auth, settings, model_root, upload) -> None:
    corpus = upload("строка\n")["id"]
    job_id = client.post(
        "/v1/jobs",
        headers=auth,
        json={
            "base_model": str(model_root / "base"),
            "corpus_file": corpus,
            "cpt": {"seq_len": 64},
            "labels": {"suite": "secret"},
        },
    ).json()["id"]
    with client.app.state.services.sessions() as session:
        job = session.get(Job, job_id)
        record_artifacts(
            session,
            job_id,
            [
                Artifact(
                    job_id=job_id,
                    name="evaluate/scores.json",
                    kind="eval_report",
                    size=2,
                    stored_bytes=2,
                    sha256="x",
                    storage_key="teams/t/x",
                )
            ],
        )
        record_scores(session, job, [{"model": "original", "task": "copy_ru", "metric": "f1", "value": 1, "n": 1}])
    webhook = client.post("/v1/webhooks", headers=auth, json={"url": "http://93.184.215.14/hook"}).json()["id"]
    values = {"job_id": job_id, "file_id": corpus, "name": "evaluate/scores.json", "webhook_id": webhook}
    other = {"Authorization": f"Bearer {new_team_key(settings)}"}

    checked = []
    routes = [
        (template, method.upper())
        for template, operations in client.app.openapi()["paths"].items()  # every documented route
        for method in operations
        if not template.startswith(OWN_TEAM_ONLY)
    ]
    for template, method in sorted(routes, key=lambda route: route[1] == "DELETE"):  # deletes last: they succeed
        params = re.findall(r"{(\w+)}", template)
        path = re.sub(r"{(\w+)}", lambda m: values[m.group(1)], template)
        response = client.request(method, path, headers=other)
        if params:
            assert response.status_code == 404, (method, path, response.text)
            if method != "HEAD":  # a HEAD answer has no body
                assert response.json()["error"]["code"].endswith("not_found")
            mine = client.request(method, path, headers=auth)
            assert mine.status_code != 404 or method == "GET" and "artifacts/" in path, (method, path)
        elif path == "/v1/usage":  # the other team's own use: none of this team's jobs and bytes
            usage = response.json()
            assert [usage[name]["used"] for name in ("running_jobs", "queued_jobs", "stored_bytes")] == [0, 0, 0]
        elif method == "GET":
            assert response.status_code == 200, (method, path)
            assert response.json() == {"data": [], "next": None}, (method, path)
        checked.append(f"{method} {template}")
    assert len(checked) >= 12, checked
    for query in ("label=suite:secret", f"job_id={job_id}", "group_by=task", "task=copy_ru"):
        assert client.get(f"/v1/results?{query}", headers=other).json() == {"data": [], "next": None}, query
        assert client.get(f"/v1/results?{query}", headers=auth).json()["data"], query
    assert client.get("/v1/jobs?label=suite:secret", headers=other).json() == {"data": [], "next": None}
