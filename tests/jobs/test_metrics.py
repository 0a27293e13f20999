"""/metrics from the job table: stage durations by stage and vocabulary method, CPT tokens/s, queue wait, as the
worker's event recorder writes them (compared before and after one job: the database is shared by the session)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from langadapt.core.adaptation.events import Progress, StageDone, StageStarted
from langadapt.jobs import execution
from langadapt.jobs.db import make_engine, make_sessionmaker
from langadapt.jobs.models import JobStatus
from langadapt.jobs.progress import JobEventRecorder
from tests.jobs.conftest import job_body


def samples(client) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_stage_durations_throughput_and_queue_wait(client, auth, files, model_root, settings) -> None:
    before = samples(client)
    job_id = client.post("/v1/jobs", headers=auth, json=job_body(model_root, files, instruct_model=None)).json()["id"]
    engine = make_engine(settings.database)
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        execution.claim_job(session, job_id, "test-worker", settings)
    record = JobEventRecorder(sessions, job_id)
    record(StageStarted("tokenizer"))
    record(StageDone("tokenizer", 2.0))
    record(StageStarted("cpt"))
    record(Progress("cpt", 6, 6, "steps", 0.0, {"loss": 3.0, "tokens_per_s": 5000.0}))
    running = samples(client)
    assert running[("langadapt_cpt_tokens_per_second", ())] >= 5000.0
    record(StageDone("cpt", 30.0))
    with sessions() as session:
        execution.finish_job(session, job_id, "test-worker", JobStatus.succeeded)
    engine.dispose()
    after = samples(client)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    cpt = {"stage": "cpt", "vocab_method": "extended"}
    assert grew("langadapt_stage_duration_seconds_gcount", **cpt) == 1
    assert grew("langadapt_stage_duration_seconds_bucket", le="60.0", **cpt) == 1
    assert grew("langadapt_stage_duration_seconds_bucket", le="15.0", **cpt) == 0
    assert grew("langadapt_stage_duration_seconds_gsum", **cpt) == 30.0
    assert grew("langadapt_stage_duration_seconds_gsum", stage="tokenizer", vocab_method="extended") == 2.0
    assert grew("langadapt_cpt_tokens_per_second_finished_bucket", le="10000.0") == 1
    assert grew("langadapt_cpt_tokens_per_second_finished_bucket", le="1000.0") == 0
    assert grew("langadapt_queue_wait_seconds_gcount") == 1
    assert grew("langadapt_queue_wait_seconds_bucket", le="+Inf") == 1
