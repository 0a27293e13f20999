"""Webhooks to a local receiver: signed deliveries, retries after failures, the delivery log, the SSRF guard, and
the maintenance worker sending a real job's events."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from langadapt.api.app import create_app
from langadapt.client import verify_signature
from langadapt.jobs.runtime import build_services
from langadapt.jobs.webhooks import deliver_due
from tests.jobs.conftest import job_body, new_team_key, wait_for


class Receiver:
    """An HTTP server that records every POST and answers 500 to the first `fail_first` of them."""

    def __init__(self, fail_first: int = 0) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), body))
                self.send_response(500 if len(receiver.requests) <= receiver.fail_first else 204)
                self.end_headers()

            def log_message(self, *_) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[dict]:
        return [json.loads(body) for _, body in self.requests]

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def settings(make_settings):
    """This module's service accepts webhooks on the loopback network, where the receiver listens."""
    return make_settings(webhooks_allow_private=True, webhook_backoff_s=0.2, webhook_poll_s=0.3)


@pytest.fixture
def receiver():
    running = Receiver(fail_first=2)
    yield running
    running.close()


def test_signed_delivery_retried_until_the_receiver_answers(client, auth, settings, model_root, files, receiver):
    hook = client.post("/v1/webhooks", headers=auth, json={"url": receiver.url, "events": ["job.cancelled"]})
    assert hook.status_code == 201, hook.text
    secret = hook.json()["secret"]
    listed = client.get("/v1/webhooks", headers=auth).json()["data"]
    assert secret.startswith("whsec_") and "secret" not in listed[0]  # shown once
    job = client.post("/v1/jobs", headers=auth, json=job_body(model_root, files, instruct_model=None)).json()
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth).json()["status"] == "cancelled"

    sessions = build_services(settings).sessions
    deadline = time.monotonic() + 30
    while len(receiver.requests) < 3 and time.monotonic() < deadline:
        deliver_due(sessions, settings)  # every team's due deliveries: count this hook's in its log below
        time.sleep(0.05)
    assert len(receiver.requests) == 3  # 500, 500 (each retried after its backoff: 0.2 s, then 0.4 s), then 204
    log = client.get(f"/v1/webhooks/{hook.json()['id']}/deliveries", headers=auth).json()["data"]
    assert len(log) == 1
    assert log[0]["status"] == "succeeded" and log[0]["attempts"] == 3 and log[0]["response_status"] == 204
    assert log[0]["event"] == "job.cancelled" and log[0]["job_id"] == job["id"] and log[0]["error"] is None

    for headers, body in receiver.requests:
        assert headers["Langadapt-Event"] == "job.cancelled"
        assert verify_signature(secret, headers["Langadapt-Signature"], body)
        assert not verify_signature(secret, headers["Langadapt-Signature"], body + b" ")  # tampered body
        assert not verify_signature("whsec_other", headers["Langadapt-Signature"], body)
        assert not verify_signature(secret, headers["Langadapt-Signature"], body, now=time.time() + 301)  # replay
    event = receiver.events()[-1]
    assert event["type"] == "job.cancelled" and event["id"] == log[0]["id"]
    assert event["data"]["job"]["id"] == job["id"] and event["data"]["job"]["status"] == "cancelled"
    assert event["data"]["job"]["labels"] == {"suite": "e2e"}


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/hook",
        "http://localhost/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://169.254.169.254/latest/meta-data",  # cloud metadata
        "http://[::1]/hook",
        "ftp://example.com/hook",
    ],
)
def test_private_network_urls_are_refused(make_settings, url) -> None:
    settings = make_settings()  # the default: private networks refused
    auth = {"Authorization": f"Bearer {new_team_key(settings)}"}
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/webhooks", headers=auth, json={"url": url})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "unsafe_webhook_url" and error["param"] == "url"
        assert client.get("/v1/webhooks", headers=auth).json()["data"] == []


def test_webhooks_are_per_team(client, auth, settings) -> None:
    created = client.post("/v1/webhooks", headers=auth, json={"url": "http://93.184.215.14/hook"})  # a public IP
    assert created.status_code == 201 and created.json()["events"] == [
        "job.succeeded",
        "job.failed",
        "job.cancelled",
        "job.stage_completed",
        "job.retrying",
    ]
    other = {"Authorization": f"Bearer {new_team_key(settings)}"}
    assert client.get("/v1/webhooks", headers=other).json()["data"] == []
    missing = client.delete(f"/v1/webhooks/{created.json()['id']}", headers=other)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "webhook_not_found"
    assert client.delete(f"/v1/webhooks/{created.json()['id']}", headers=auth).status_code == 204
    assert client.get("/v1/webhooks", headers=auth).json()["data"] == []


def test_the_maintenance_worker_sends_a_real_jobs_events(client, auth, settings, model_root, files, start_worker):
    receiver = Receiver()
    try:
        client.post("/v1/webhooks", headers=auth, json={"url": receiver.url})
        start_worker(settings, queues="gpu,maintenance", beat=True)
        body = job_body(model_root, files, instruct_model=None)
        job = client.post("/v1/jobs", headers=auth, json=body).json()
        assert wait_for(client, auth, job["id"], lambda j: j["status"] == "succeeded")["status"] == "succeeded"
        deadline = time.monotonic() + 30
        while not any(e["type"] == "job.succeeded" for e in receiver.events()) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        receiver.close()
    events = receiver.events()
    completed = [e["data"]["stage"] for e in events if e["type"] == "job.stage_completed"]
    assert completed == ["tokenizer", "init", "cpt", "evaluate"]
    assert [e["type"] for e in events].count("job.succeeded") == 1
