"""Team quotas and the POST rate limit (jobs/quotas.py): 429s with `Retry-After` and the limit's code, nothing
half-written, GET /v1/usage, overrides by the admin CLI, and the running-jobs quota a worker's claim enforces.
Real Postgres, Redis, S3 (moto) and Celery worker processes."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from datetime import datetime

import httpx
import pytest
from sqlalchemy import select

from langadapt.cli.main import main
from langadapt.jobs import execution, quotas
from langadapt.jobs.db import make_engine, make_sessionmaker, upgrade
from langadapt.jobs.errors import TooMany
from langadapt.jobs.models import Artifact, File, Job, JobEvent, JobStatus, PostCount, Team
from langadapt.jobs.settings import Settings
from langadapt.jobs.teams import authenticate
from tests.jobs.conftest import LiveServer, job_body, new_team_key

TERMINAL = {"succeeded", "failed", "cancelled"}


def _log(figure: str, **values) -> None:
    """Figures the closing note reports (pytest -s shows them)."""
    print(json.dumps({"figure": figure, **values}))


@pytest.fixture
def settings(make_settings):
    return make_settings(quota_rate_window_s=86_400)  # no POST rate window ends during a test


@pytest.fixture
def sessions(settings):
    engine = make_engine(settings.database)
    yield make_sessionmaker(engine)
    engine.dispose()


def _team_id(sessions, auth: dict) -> str:
    key = auth["Authorization"].removeprefix("Bearer ")
    with sessions() as session:
        return authenticate(session=session, key=key).id


def _set_limits(sessions, team_id: str, **values: int) -> None:
    with sessions() as session:
        quotas.set_team_limits(session, team_id, values)
        session.commit()


def _record_artifact(session, job_id: str, name: str, size: int) -> None:
    """A stored artifact of `size` bytes (its object need not exist: the quota counts rows)."""
    artifact = Artifact(
        job_id=job_id, name=name, kind="model", size=size, stored_bytes=size, sha256="0" * 64, storage_key="k"
    )
    execution.record_artifacts(session, job_id, [artifact])


def _small_body(model_root, corpus: str, **labels: str) -> dict:
    """A job that is only ever queued here (no worker): the cheapest valid request."""
    return {"base_model": str(model_root / "base"), "corpus_file": corpus, "cpt": {"seq_len": 64}, "labels": labels}


def _assert_429(response: httpx.Response, code: str, retry_after: int | None = None) -> None:
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == code
    seconds = int(response.headers["Retry-After"])
    assert seconds >= 1 if retry_after is None else seconds == retry_after


def test_queued_jobs_quota(client, auth, upload, settings, sessions, model_root) -> None:
    team_id = _team_id(sessions, auth)
    _set_limits(sessions, team_id, queued_jobs=2)
    corpus = upload("текст для проверки\n")["id"]
    first = client.post("/v1/jobs", headers={**auth, "Idempotency-Key": "k1"}, json=_small_body(model_root, corpus))
    second = client.post("/v1/jobs", headers=auth, json=_small_body(model_root, corpus, n="2"))
    assert (first.status_code, second.status_code) == (201, 201)

    refused = client.post("/v1/jobs", headers=auth, json=_small_body(model_root, corpus, n="3"))
    _assert_429(refused, "quota_queued_jobs", settings.quota_retry_after_s)
    with sessions() as session:  # nothing written for the refused job
        assert (
            session.scalar(select(Job.id).where(Job.team_id == team_id, Job.request["labels"]["n"].as_string() == "3"))
            is None
        )
    replay = client.post("/v1/jobs", headers={**auth, "Idempotency-Key": "k1"}, json=_small_body(model_root, corpus))
    assert replay.status_code == 201 and replay.json()["id"] == first.json()["id"]  # at the quota, still the job
    assert replay.headers["Idempotent-Replayed"] == "true"

    client.post(f"/v1/jobs/{second.json()['id']}/cancel", headers=auth)
    assert client.post("/v1/jobs", headers=auth, json=_small_body(model_root, corpus, n="4")).status_code == 201


def test_stored_bytes_quota(client, auth, upload, settings, sessions, model_root) -> None:
    team_id = _team_id(sessions, auth)
    _set_limits(sessions, team_id, stored_bytes=100)
    corpus = upload("a" * 59 + "\n")["id"]  # 60 bytes
    refused = client.post("/v1/files", headers=auth, files={"file": ("more.txt", b"b" * 59 + b"\n")})
    _assert_429(refused, "quota_stored_bytes", settings.quota_retry_after_s)
    store = settings.open_store()
    with sessions() as session:  # neither a row nor an object for the refused upload
        assert session.scalars(select(File.id).where(File.team_id == team_id)).all() == [corpus]
    assert len(store.list("")) == 1

    with sessions() as session:  # the team's job artifacts count too
        job_id = client.post("/v1/jobs", headers=auth, json=_small_body(model_root, corpus)).json()["id"]
        _record_artifact(session, job_id, "init/x", 40)
    usage = client.get("/v1/usage", headers=auth).json()
    assert usage["stored_bytes"] == {"used": 100, "limit": 100, "source": "team"}
    _assert_429(
        client.post("/v1/jobs", headers=auth, json=_small_body(model_root, corpus, n="2")), "quota_stored_bytes"
    )


def test_post_rate_limit_counts_every_post_and_its_window_resets(make_settings) -> None:
    settings = make_settings(quota_post_rate=3, quota_rate_window_s=86_400)
    auth = {"Authorization": f"Bearer {new_team_key(settings)}"}
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, headers=auth) as api:
        answers = [api.post("/v1/jobs/job_nope/cancel").status_code for _ in range(3)]
        assert answers == [404, 404, 404]  # counted although refused by the route
        assert api.get("/v1/usage").json()["post_rate"]["used"] == 3  # GETs do not count
        _assert_429(api.post("/v1/files", files={"file": ("c.txt", b"text\n")}), "rate_limited")
        limited = api.post("/v1/jobs/job_nope/retry")
        _assert_429(limited, "rate_limited")
        assert int(limited.headers["Retry-After"]) <= 86_400
        usage = api.get("/v1/usage").json()
        assert usage["post_rate"] == {"used": 3, "limit": 3, "source": "default"}  # refused POSTs are not counted
        assert usage["window_s"] == 86_400 and 1 <= usage["window_resets_in_s"] <= 86_400

    engine = make_engine(settings.database)
    with make_sessionmaker(engine)() as session:  # a window of the future, at given times: nothing waits
        team_id = _team_id(make_sessionmaker(engine), auth)
        start = quotas.window_start(settings, 4_000_000_000)
        for second in range(3):
            quotas.count_post(session, settings, team_id, now=start + second)
        with pytest.raises(TooMany) as refused:
            quotas.count_post(session, settings, team_id, now=start + 86_399.5)
        assert refused.value.code == "rate_limited" and refused.value.retry_after == 1
        quotas.count_post(session, settings, team_id, now=start + 86_400)  # the next window starts from zero
        later = quotas.usage(session, settings, team_id, now=start + 86_401)
        assert later.post_rate.used == 1 and later.window_resets_in_s == 86_399
    engine.dispose()


def test_rate_counter_in_embedded_mode(tmp_path) -> None:
    """SQLite, no Redis: the same counter (SQLite's upsert), at given times."""
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    settings = Settings(_env_file=None, home=str(tmp_path), quota_post_rate=2, quota_rate_window_s=60)
    engine = make_engine(url)
    with make_sessionmaker(engine)() as session:
        team = Team(name="t")
        session.add(team)
        session.commit()
        quotas.count_post(session, settings, team.id, now=0)
        quotas.count_post(session, settings, team.id, now=1)
        with pytest.raises(TooMany) as refused:
            quotas.count_post(session, settings, team.id, now=2)
        assert refused.value.retry_after == 58
        quotas.count_post(session, settings, team.id, now=60)
        assert quotas.usage(session, settings, team.id, now=61).post_rate.used == 1
        assert session.scalars(select(PostCount.window_start)).all() == [60]  # the old window is gone
    engine.dispose()


def test_usage_reports_use_and_the_source_of_each_limit(client, auth, upload, settings, sessions, model_root) -> None:
    team_id = _team_id(sessions, auth)
    _set_limits(sessions, team_id, running_jobs=3)
    corpus = upload("текст\n")
    jobs = [
        client.post("/v1/jobs", headers=auth, json=_small_body(model_root, corpus["id"], n=str(i))).json()
        for i in range(3)
    ]
    with sessions() as session:
        execution.claim_job(session, jobs[0]["id"], "w1", settings)
        _record_artifact(session, jobs[0]["id"], "a/b", 1000)
    usage = client.get("/v1/usage", headers=auth).json()
    assert usage["running_jobs"] == {"used": 1, "limit": 3, "source": "team"}
    assert usage["queued_jobs"] == {"used": 2, "limit": settings.quota_queued_jobs, "source": "default"}
    assert usage["stored_bytes"] == {
        "used": corpus["bytes"] + 1000,
        "limit": settings.quota_stored_bytes,
        "source": "default",
    }
    assert usage["post_rate"]["used"] == 4  # one upload, three submits
    assert usage["object"] == "usage"
    assert "/v1/usage" in client.get("/openapi.json").json()["paths"]


def test_admin_cli_sets_shows_and_clears_a_team_quota(settings, monkeypatch, capsys) -> None:
    monkeypatch.setenv("LANGADAPT_DATABASE_URL", settings.database)
    monkeypatch.setenv("LANGADAPT_QUOTA_QUEUED_JOBS", "50")
    new_team_key(settings, name="quota-team")

    def run(*argv: str) -> dict:
        assert main(["admin", "quota", *argv]) == 0
        return json.loads(capsys.readouterr().out)["limits"]

    assert run("show", "quota-team")["queued_jobs"] == {"value": 50, "source": "default"}
    limits = run("set", "quota-team", "--running-jobs", "2", "--post-rate", "30")
    assert limits["running_jobs"] == {"value": 2, "source": "team"} and limits["post_rate"] == {
        "value": 30,
        "source": "team",
    }
    assert run("set", "quota-team", "--queued-jobs", "7")["running_jobs"]["value"] == 2  # the others stay
    assert run("show", "quota-team")["queued_jobs"] == {"value": 7, "source": "team"}
    assert all(limit["source"] == "default" for limit in run("clear", "quota-team").values())
    with pytest.raises(SystemExit, match="no team 'nobody'"):
        main(["admin", "quota", "show", "nobody"])
    with pytest.raises(SystemExit, match="give at least one of"):
        main(["admin", "quota", "set", "quota-team"])
    with pytest.raises(SystemExit):
        main(["admin", "quota", "set", "quota-team", "--running-jobs", "0"])


def test_concurrent_claims_never_exceed_the_running_quota(client, auth, upload, settings, sessions, model_root) -> None:
    """40 workers claim 40 queued jobs of one team at once, straight against Postgres: 2 run, 38 are held."""
    team_id = _team_id(sessions, auth)
    _set_limits(sessions, team_id, running_jobs=2)
    corpus = upload("текст\n")["id"]
    job_ids = [
        client.post("/v1/jobs", headers=auth, json=_small_body(model_root, corpus, n=str(i))).json()["id"]
        for i in range(40)
    ]
    barrier = threading.Barrier(len(job_ids))

    def claim(job_id: str) -> bool:
        with sessions() as session:
            barrier.wait()
            return execution.claim_job(session, job_id, f"w-{job_id}", settings) is not None

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(job_ids)) as pool:
        claimed = list(pool.map(claim, job_ids))
    _log("concurrent_claims", claims=len(job_ids), claimed=sum(claimed), held=claimed.count(False))
    assert sum(claimed) == 2
    message = "waiting: team at its running-jobs quota (2)"
    with sessions() as session:
        held = session.scalars(select(Job).where(Job.team_id == team_id, Job.status == JobStatus.queued)).all()
        assert len(held) == 38 and all(job.dispatched_at is None and job.not_before is not None for job in held)
        events = session.scalars(
            select(JobEvent.job_id).where(JobEvent.job_id.in_(job_ids), JobEvent.message == message)
        )
        assert sorted(events) == sorted(job.id for job in held)  # one event per held job
        assert execution.claim_job(session, held[0].id, "w-again", settings) is None  # held again: no second event
        again = session.scalars(select(JobEvent.id).where(JobEvent.job_id == held[0].id, JobEvent.message == message))
        assert len(again.all()) == 1
        held_ids = sorted(job.id for job in held)
        assert quotas.with_room_to_run(session, settings, held_ids) == []  # the reaper sends none of them
        running = [job_id for job_id, ok in zip(job_ids, claimed, strict=True) if ok]
        execution.finish_job(session, running[0], f"w-{running[0]}", JobStatus.succeeded)
        assert quotas.with_room_to_run(session, settings, held_ids) == held_ids[:1]  # one place free: the oldest
        assert execution.claim_job(session, held[0].id, "w-next", settings).status == JobStatus.running


@pytest.mark.slow  # whole workers or a thousand clients: the slow tier (CI runs it)
def test_a_thousand_concurrent_posts_with_one_key_create_one_job(make_settings, model_root) -> None:
    """Goal: 1,000 concurrent POSTs with one Idempotency-Key create exactly one job; every answer is that job or a
    429 `rate_limited` (this test's rate limit is 600 POSTs per window), none is a 5xx."""
    settings = make_settings(quota_post_rate=600, quota_rate_window_s=3600)
    auth = {"Authorization": f"Bearer {new_team_key(settings)}"}
    n = 1000
    window = quotas.window_start(settings, time.time())
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, headers=auth, timeout=120) as api:
        corpus = api.post("/v1/files", files={"file": ("c.txt", "текст для проверки\n".encode())}).json()["id"]
        body = _small_body(model_root, corpus, batch="thousand")

        def post(_: int) -> httpx.Response:
            with httpx.Client(base_url=server.url, headers=auth, timeout=120) as own:
                return own.post("/v1/jobs", json=body, headers={"Idempotency-Key": "one-key"})

        with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
            answers = list(pool.map(post, range(n)))
        listed = api.get("/v1/jobs?label=batch:thousand&limit=100").json()["data"]
    same_window = quotas.window_start(settings, time.time()) == window
    statuses = [r.status_code for r in answers]
    accepted = [r for r in answers if r.status_code == 201]
    limited = [r for r in answers if r.status_code == 429]
    replayed = sum(r.headers.get("Idempotent-Replayed") == "true" for r in accepted)
    _log("thousand_posts", posts=n, created=len(accepted) - replayed, replayed=replayed, limited=len(limited))
    assert len(accepted) + len(limited) == n, sorted(set(statuses))
    assert len({r.json()["id"] for r in accepted}) == 1 and len(accepted) - replayed == 1
    assert all(r.json()["error"]["code"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1 for r in limited)
    if same_window:  # the upload took one of the window's 600 POSTs
        assert len(accepted) == 599
    assert [job["id"] for job in listed] == [accepted[0].json()["id"]]


@pytest.mark.slow  # whole workers or a thousand clients: the slow tier (CI runs it)
def test_running_quota_of_two_end_to_end(settings, auth, files, start_worker, model_root) -> None:
    """Goal: with a running quota of 2 and a queued quota of 8, 50 concurrent submissions to 3 GPU workers: 8 (or a
    few more, as jobs start meanwhile) accepted, the rest 429 `quota_queued_jobs`; never more than 2 running (a
    sampled timeline and the jobs' start and finish times); every accepted job succeeds."""
    settings = settings.model_copy(update={"reaper_interval_s": 1, "quota_hold_s": 1})
    start_worker(settings, queues="maintenance", beat=True)  # the reaper sends held jobs again
    for _ in range(3):
        start_worker(settings, queues="gpu")
    engine = make_engine(settings.database)
    _set_limits(make_sessionmaker(engine), _team_id(make_sessionmaker(engine), auth), running_jobs=2, queued_jobs=8)
    engine.dispose()
    body = job_body(
        model_root,
        files,
        instruct_model=None,
        cpt={"steps": 2, "seq_len": 32, "batch_size": 2, "grad_accum": 1, "warmup_steps": 1, "checkpoint_every": 2},
        evaluation={"tasks": ["symbols_per_token"], "heldout_chars": 1000},
    )
    with LiveServer(settings) as server, httpx.Client(base_url=server.url, headers=auth, timeout=120) as api:
        with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
            answers = list(pool.map(lambda i: api.post("/v1/jobs", json={**body, "labels": {"n": str(i)}}), range(50)))
        accepted = [r.json()["id"] for r in answers if r.status_code == 201]
        limited = [r for r in answers if r.status_code == 429]
        assert len(accepted) + len(limited) == 50 and len(accepted) >= 8, answers[0].text
        assert all(r.json()["error"]["code"] == "quota_queued_jobs" for r in limited)

        most_running, done, deadline = 0, {}, time.monotonic() + 1800
        while len(done) < len(accepted):  # a sampled timeline of the team's running jobs
            assert time.monotonic() < deadline, f"jobs not finished: {set(accepted) - set(done)}"
            most_running = max(most_running, api.get("/v1/usage").json()["running_jobs"]["used"])
            for job_id in set(accepted) - set(done):
                job = api.get(f"/v1/jobs/{job_id}").json()
                if job["status"] in TERMINAL:
                    done[job_id] = job
            time.sleep(0.2)
        message = "waiting: team at its running-jobs quota (2)"
        held = sum(
            any(event["message"] == message for event in api.get(f"/v1/jobs/{job_id}/events?limit=100").json()["data"])
            for job_id in accepted
        )
    spans = [(datetime.fromisoformat(j["started_at"]), datetime.fromisoformat(j["finished_at"])) for j in done.values()]
    overlap = max(sum(start <= t < end for start, end in spans) for t, _ in spans)
    _log(
        "running_quota",
        submitted=50,
        accepted=len(accepted),
        limited=len(limited),
        most_running_sampled=most_running,
        most_running_from_times=overlap,
        jobs_held_at_least_once=held,
    )
    assert [job["status"] for job in done.values()] == ["succeeded"] * len(accepted)
    assert most_running <= 2 and overlap <= 2
    assert held >= 1  # three workers, two places: the third worker's job waited
