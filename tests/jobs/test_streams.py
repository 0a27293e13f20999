"""Event streams hold no database connection while open, are capped per team and in total, and deliver every
event; requests wait for a database slot instead of failing when many arrive at once."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from sqlalchemy import update

from langadapt.jobs import execution
from langadapt.jobs.db import make_engine, make_sessionmaker
from langadapt.jobs.models import Job, JobStatus
from tests.jobs.conftest import LiveServer, new_team_key


def _submit(api: httpx.Client, model_root) -> str:
    corpus = api.post("/v1/files", files={"file": ("c.txt", "текст для проверки\n".encode())}).json()["id"]
    body = {"base_model": str(model_root / "base"), "corpus_file": corpus, "cpt": {"seq_len": 64}}
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_streams_hold_no_connection_are_capped_and_deliver_every_event(make_settings, model_root) -> None:
    settings = make_settings(max_event_streams_per_team=3, max_event_streams=5)
    sessions = make_sessionmaker(make_engine(settings.database))
    teams = [{"Authorization": f"Bearer {new_team_key(settings)}"} for _ in range(2)]
    with LiveServer(settings) as server:
        engine = server.server.config.app.state.services.engine
        apis = [httpx.Client(base_url=server.url, headers=auth, timeout=30) for auth in teams]
        jobs = [_submit(api, model_root) for api in apis]
        sse = {"Accept": "text/event-stream"}
        opened = []

        def open_stream(team: int) -> httpx.Response:
            request = apis[team].build_request("GET", f"/v1/jobs/{jobs[team]}/events", headers=sse)
            return apis[team].send(request, stream=True)

        for _ in range(3):
            opened.append(open_stream(0))
            assert opened[-1].status_code == 200
        refused = open_stream(0)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "5"
        assert json.loads(refused.read())["error"]["code"] == "too_many_streams"
        for _ in range(2):
            opened.append(open_stream(1))
            assert opened[-1].status_code == 200
        assert open_stream(1).status_code == 429  # 5 open in total
        assert engine.pool.checkedout() == 0  # five open streams, no connection held

        # Every stream gets every event, in order, and ends with the job.
        with sessions() as session:
            for job_id in jobs:
                for i in range(3):
                    execution.append_event(session, job_id, type="message", message=f"m{i}")
                    session.commit()
                session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.failed))
            session.commit()
        for stream in opened:
            blocks = [b for b in stream.read().decode().split("\n\n") if b.strip()]
            messages = [json.loads(b.split("data: ", 1)[1])["message"] for b in blocks[:-1]]
            assert messages[-3:] == ["m0", "m1", "m2"], blocks
            assert blocks[-1] == 'event: end\ndata: {"status": "failed"}'
            stream.close()
        # Places are given back when streams end.
        deadline = time.monotonic() + 10
        while (again := open_stream(0)).status_code != 200:
            assert time.monotonic() < deadline
        again.close()
        for api in apis:
            api.close()


def test_a_burst_of_submissions_waits_for_database_slots_instead_of_failing(make_settings, model_root) -> None:
    settings = make_settings(api_db_slots=4)
    keys = [new_team_key(settings) for _ in range(40)]
    with LiveServer(settings) as server:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {keys[0]}"}) as api:
            corpus = api.post("/v1/files", files={"file": ("c.txt", "текст для проверки\n".encode())}).json()["id"]

        def post(key: str) -> int:
            # Each team submits its own corpus-less job: a 422 is also an answer that used the database.
            body = {"base_model": str(model_root / "base"), "corpus_file": corpus, "cpt": {"seq_len": 64}}
            with httpx.Client(base_url=server.url, timeout=60) as own:
                return own.post("/v1/jobs", json=body, headers={"Authorization": f"Bearer {key}"}).status_code

        with ThreadPoolExecutor(40) as pool:
            statuses = list(pool.map(post, keys))
    assert statuses.count(201) == 1 and statuses.count(422) == 39  # only the first team owns the corpus
