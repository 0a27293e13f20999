"""Recovery: CPT checkpoints reach storage as they are written, a killed worker's job retries itself on another
worker from the last uploaded one, a worker shutting down (SIGTERM) puts its job back in the queue, and a job that
kills its worker every time ends failed after its attempts. Real Postgres, Redis, S3 (moto) and Celery workers."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime

import httpx
import pytest
from sqlalchemy import select

from langadapt.jobs import layout
from langadapt.jobs.checkpoints import MARKER
from langadapt.jobs.models import Job, Webhook, WebhookDelivery
from langadapt.jobs.settings import Settings
from tests.jobs.conftest import WorkerProcess, all_events, cpt_step, job_body, wait_for

TERMINAL = {"succeeded", "failed", "cancelled"}
FAST = {"heartbeat_timeout_s": 3, "reaper_interval_s": 1, "retry_backoff_s": 1}  # the reaper, and retry backoff


def _worker_settings(settings: Settings, tmp_path, name: str) -> Settings:
    """A worker "machine" of its own: an empty scratch folder, the test's fast reaper and backoff."""
    return settings.model_copy(update={**FAST, "work_dir": str(tmp_path / name)})


def _prefix(client, job_id: str) -> str:
    with client.app.state.services.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return layout.job_prefix(job.team_id, job_id) + "checkpoints/"


def _marker(store, prefix: str) -> dict | None:
    if store.stat(prefix + MARKER) is None:
        return None
    return json.loads(b"".join(store.iter_bytes(prefix + MARKER)))


def _stage_info(client, auth, job_id: str) -> dict:
    response = client.get(f"/v1/jobs/{job_id}/artifacts/cpt/stage.json", headers=auth, follow_redirects=False)
    return json.loads(httpx.get(response.headers["location"]).content)


def _started(events: list[dict]) -> list[str]:
    return [e["stage"] for e in events if e["type"] == "stage" and e["message"] == "started"]


def _eventually(condition, timeout: float = 30) -> None:
    """What the worker does right after recording the outcome (cleaning up) is done within `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def _wait_started(client, auth, job_id: str, stage: str, times: int) -> None:
    deadline = time.monotonic() + 900
    while _started(all_events(client, auth, job_id)).count(stage) < times:
        assert time.monotonic() < deadline
        time.sleep(0.5)


def _job_processes(worker: WorkerProcess) -> list[int]:
    """The worker's job processes: the children of its fork server (its only child besides none)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                    parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    servers = {pid for pid, parent in parents.items() if parent == worker.process.pid}
    return [pid for pid, parent in parents.items() if parent in servers]


@pytest.mark.slow  # whole workers or a thousand clients: the slow tier (CI runs it)
def test_a_killed_worker_s_job_resumes_by_itself_on_another_worker_from_its_uploaded_checkpoint(
    client, auth, settings, start_worker, model_root, files, tmp_path
) -> None:
    start_worker(_worker_settings(settings, tmp_path, "maintenance"), queues="maintenance", beat=True)
    first = start_worker(_worker_settings(settings, tmp_path, "machine-1"), queues="gpu")
    cpt = {"steps": 600, "seq_len": 32, "batch_size": 2, "grad_accum": 1, "checkpoint_every": 20}
    body = job_body(model_root, files, instruct_model=None, evaluation={"tasks": ["symbols_per_token"]}, cpt=cpt)
    job = client.post("/v1/jobs", headers=auth, json=body).json()
    store, prefix = settings.open_store(), _prefix(client, job["id"])
    deadline = time.monotonic() + 900
    while (_marker(store, prefix) or {"step": 0})["step"] < 40:  # two checkpoints in storage, CPT still running
        assert (
            time.monotonic() < deadline
            and client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["status"] not in TERMINAL
        )
        time.sleep(0.1)
    artifacts_before = client.get(f"/v1/jobs/{job['id']}/artifacts", headers=auth).json()["data"]

    first.kill()  # SIGKILL to the worker's whole process group, mid-CPT: the machine is gone with its disk
    killed = time.monotonic()
    uploaded = _marker(store, prefix)
    assert uploaded is not None and uploaded["step"] % 20 == 0 and uploaded["step"] < 600
    requeued = wait_for(client, auth, job["id"], lambda j: j["attempt"] == 2 or j["status"] in TERMINAL, timeout=120)
    requeued_after = time.monotonic() - killed
    assert requeued["status"] == "queued", requeued  # the reaper's verdict: retried, not failed
    second = start_worker(_worker_settings(settings, tmp_path, "machine-2"), queues="gpu")
    done = wait_for(client, auth, job["id"], lambda j: j["status"] in TERMINAL)
    assert done["status"] == "succeeded", (done, second.log())

    assert (done["attempt"], done["error"]) == (2, None)
    lost, final = done["attempts"]
    assert (final["attempt"], final["outcome"], final["error"]) == (2, "succeeded", None)
    assert (lost["attempt"], lost["outcome"], lost["stage"]) == (1, "failed", "cpt")
    assert (lost["error"]["code"], lost["error"]["kind"]) == ("worker_lost", "system")
    events = all_events(client, auth, job["id"])
    messages = [e["message"] for e in events]
    assert "retry requested" not in messages  # nobody pressed retry
    retried = next(i for i, m in enumerate(messages) if m.startswith("attempt 1 failed (worker_lost): retrying in 1 s"))
    saved = [e["data"]["checkpoint_step"] for e in events[:retried] if (e["data"] or {}).get("checkpoint_step")]
    # Uploaded as written (the newest when one is still uploading); the kill may beat the marker's event.
    assert saved == sorted(set(saved)) and all(step % 20 == 0 for step in saved) and saved[-1] <= uploaded["step"]
    # The second attempt fetched that checkpoint into its empty scratch folder and resumed CPT from that step.
    assert f"checkpoint of step {uploaded['step']} fetched from storage: CPT resumes from it" in messages[retried:]
    resumed_from = _stage_info(client, auth, job["id"])["resumed_from"]
    assert resumed_from == uploaded["step"]
    # Nothing that had completed ran again: tokenizer and init came from storage, their artifacts untouched.
    assert _started(events[retried:]) == ["inputs", "cpt", "evaluate"]
    after = client.get(f"/v1/jobs/{job['id']}/artifacts", headers=auth).json()["data"]
    assert [a for a in after if a["name"].split("/")[0] in ("tokenizer", "init")] == artifacts_before
    _eventually(lambda: store.list(prefix) == [])  # the checkpoints have served
    _eventually(lambda: not os.path.exists(os.path.join(tmp_path, "machine-2", "jobs", job["id"])))
    figure = {"figure": "worker_kill", "requeued_after_s": round(requeued_after, 2), "heartbeat_timeout_s": 3}
    print(json.dumps({**figure, "last_uploaded_checkpoint": uploaded["step"], "resumed_from": resumed_from}))


@pytest.mark.slow  # whole workers or a thousand clients: the slow tier (CI runs it)
def test_sigterm_puts_the_job_back_in_the_queue_and_it_resumes_from_the_preemption_checkpoint(
    client, auth, settings, start_worker, model_root, files, tmp_path
) -> None:
    start_worker(_worker_settings(settings, tmp_path, "maintenance"), queues="maintenance", beat=True)
    first = start_worker(_worker_settings(settings, tmp_path, "machine-1"), queues="gpu")
    cpt = {"steps": 300, "seq_len": 32, "batch_size": 2, "grad_accum": 1, "checkpoint_every": 250}
    body = job_body(
        model_root,
        files,
        instruct_model=None,
        evaluation={"tasks": ["symbols_per_token"]},
        cpt=cpt,
        max_attempts=1,  # preemptions use up no attempt
    )
    job = client.post("/v1/jobs", headers=auth, json=body).json()
    store, prefix = settings.open_store(), _prefix(client, job["id"])

    # `docker stop`: SIGTERM to the worker alone; it forwards it to the job process and waits for it.
    wait_for(client, auth, job["id"], lambda j: cpt_step(j) >= 20 or j["status"] in TERMINAL)
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(timeout=300) == 0, first.log()
    preempted = client.get(f"/v1/jobs/{job['id']}", headers=auth).json()
    assert (preempted["status"], preempted["attempt"], preempted["error"]) == ("queued", 2, None), preempted
    step_1 = _marker(store, prefix)["step"]
    assert 20 <= step_1 < 250  # the preemption's own checkpoint, not a periodic one

    # Kubernetes: SIGTERM to the whole process group of the next worker.
    second = start_worker(_worker_settings(settings, tmp_path, "machine-2"), queues="gpu")
    wait_for(client, auth, job["id"], lambda j: cpt_step(j) >= step_1 + 10 or j["status"] in TERMINAL)
    os.killpg(second.process.pid, signal.SIGTERM)
    assert second.process.wait(timeout=300) == 0, second.log()
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["status"] == "queued"
    step_2 = _marker(store, prefix)["step"]
    assert step_1 < step_2 < 250

    start_worker(_worker_settings(settings, tmp_path, "machine-3"), queues="gpu")
    done = wait_for(client, auth, job["id"], lambda j: j["status"] in TERMINAL)
    assert done["status"] == "succeeded", done
    assert [(a["attempt"], a["outcome"], a["error"]) for a in done["attempts"]] == [
        (1, "preempted", None),
        (2, "preempted", None),
        (3, "succeeded", None),
    ]
    assert _stage_info(client, auth, job["id"])["resumed_from"] == step_2
    events = all_events(client, auth, job["id"])
    assert not [e for e in events if e["level"] == "error"]  # never failed, not even for a moment
    messages = [e["message"] for e in events]
    for attempt, step in ((1, step_1), (2, step_2)):
        assert f"cpt cancelled at step {step}" in messages
        assert f"attempt {attempt} preempted by worker shutdown: back in the queue from its last checkpoint" in messages
    resumed = messages.index("attempt 2 preempted by worker shutdown: back in the queue from its last checkpoint")
    assert _started(events[resumed:]) == ["inputs", "cpt", "evaluate"]


@pytest.mark.slow  # whole workers or a thousand clients: the slow tier (CI runs it)
def test_a_job_that_kills_its_worker_every_time_fails_after_its_attempts(
    client, auth, settings, start_worker, model_root, files, tmp_path
) -> None:
    events = ["job.failed", "job.retrying"]  # the team's webhook: a retried failure is no `job.failed`
    hook = client.post("/v1/webhooks", headers=auth, json={"url": "http://93.184.215.14/hook", "events": events}).json()
    maintenance = _worker_settings(settings, tmp_path, "maintenance").model_copy(update={"webhook_poll_s": 3600})
    start_worker(maintenance, queues="maintenance", beat=True)  # reaps, never sends (the deliveries are read here)
    worker = start_worker(_worker_settings(settings, tmp_path, "machine"), queues="gpu")
    cpt = {"steps": 100_000, "seq_len": 32, "batch_size": 2, "grad_accum": 1, "checkpoint_every": 1000}
    body = job_body(model_root, files, instruct_model=None, evaluation={"tasks": ["symbols_per_token"]}, cpt=cpt)
    job = client.post("/v1/jobs", headers=auth, json=body).json()
    for attempt in (1, 2, 3):  # each attempt's process is killed (as by the OOM killer) once it trains
        _wait_started(client, auth, job["id"], "cpt", attempt)
        for pid in _job_processes(worker):
            os.kill(pid, signal.SIGKILL)
    failed = wait_for(client, auth, job["id"], lambda j: j["status"] in TERMINAL, timeout=120)

    assert (failed["status"], failed["attempt"], failed["max_attempts"]) == ("failed", 3, 3)
    assert (failed["error"]["code"], failed["error"]["kind"], failed["error"]["stage"]) == (
        "worker_lost",
        "system",
        "cpt",
    )
    attempts = failed["attempts"]
    assert [(a["attempt"], a["outcome"], a["error"]["code"]) for a in attempts] == [
        (n, "failed", "worker_lost") for n in (1, 2, 3)
    ]
    # Backoff: 1 s, then 2 s, recorded as each retry's not-before time; none after the last attempt.
    delays = [
        (datetime.fromisoformat(a["retry_at"]) - datetime.fromisoformat(a["finished_at"])).total_seconds()
        if a["retry_at"]
        else None
        for a in attempts
    ]
    assert delays == [1.0, 2.0, None]
    messages = [e["message"] for e in all_events(client, auth, job["id"])]
    assert [m for m in messages if m.startswith("attempt ")] == [
        "attempt 1 failed (worker_lost): retrying in 1 s (2 more attempts allowed)",
        "attempt 2 failed (worker_lost): retrying in 2 s (1 more attempts allowed)",
        "attempt 3 failed (worker_lost): no attempts left (3 of max_attempts 3 failed)",
    ]
    with client.app.state.services.sessions() as session:
        sent = session.scalars(
            select(WebhookDelivery.event)
            .join(Webhook)
            .where(Webhook.id == hook["id"], WebhookDelivery.job_id == job["id"])
            .order_by(WebhookDelivery.id)
        )
        assert list(sent) == ["job.retrying", "job.retrying", "job.failed"]

    # A manual retry still works, with a fresh budget of attempts.
    retried = client.post(f"/v1/jobs/{job['id']}/retry", headers=auth).json()
    assert (retried["status"], retried["attempt"], len(retried["attempts"])) == ("queued", 4, 3)
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    # The deliveries never reach that address: the webhook goes with them, or later tests' senders would retry them.
    assert client.delete(f"/v1/webhooks/{hook['id']}", headers=auth).status_code == 204
