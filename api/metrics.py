"""Prometheus metrics: request latency by route (observed here), and from the job table (so every API process
reports the same numbers, whichever machine ran the jobs): jobs by status, queue depth, and over the jobs of the
last `WINDOW_S` (gauge histograms: the distribution now, not a counter): stage durations by stage and vocabulary
method, CPT tokens/s of finished jobs, queue wait (submission to start); the CPT tokens/s of running jobs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from langadapt.jobs.models import Job, JobStatus, utcnow

WINDOW_S = 24 * 3600
STAGE_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600)
WAIT_BUCKETS = (0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600)
RATE_BUCKETS = (100, 1_000, 10_000, 30_000, 100_000, 300_000, 1_000_000, 3_000_000)


class JobCollector(Collector):
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self.sessions() as session:
            counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        jobs = GaugeMetricFamily("langadapt_jobs", "Jobs by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], counts.get(status.value, 0))
        yield jobs
        yield GaugeMetricFamily("langadapt_queue_depth", "Jobs waiting for a worker", value=counts.get("queued", 0))
        yield from self._recent()

    def _recent(self) -> Iterator[GaugeHistogramMetricFamily | GaugeMetricFamily]:
        since = utcnow() - timedelta(seconds=WINDOW_S)
        columns = (Job.status, Job.vocab_method, Job.stage, Job.stage_seconds, Job.cpt_tokens_per_s)
        with self.sessions() as session:
            recent = session.execute(
                select(*columns).where(or_(Job.finished_at >= since, Job.status == JobStatus.running))
            ).all()
            waits = session.execute(select(Job.created_at, Job.started_at).where(Job.started_at >= since)).all()
        stages: dict[tuple[str, str], list[float]] = {}
        finished_rates: list[float] = []
        running_rate = 0.0
        for status, method, stage, seconds, rate in recent:
            if status == JobStatus.running:
                running_rate += (rate or 0.0) if stage == "cpt" else 0.0
                continue
            for name, value in (seconds or {}).items():
                stages.setdefault((name, method), []).append(float(value))
            if rate:
                finished_rates.append(float(rate))
        durations = GaugeHistogramMetricFamily(
            "langadapt_stage_duration_seconds",
            f"Stage durations of the jobs finished in the last {WINDOW_S // 3600} h",
            labels=["stage", "vocab_method"],
        )
        for (stage, method), values in sorted(stages.items()):
            durations.add_metric([stage, method], *_buckets(values, STAGE_BUCKETS))
        yield durations
        rates = GaugeHistogramMetricFamily(
            "langadapt_cpt_tokens_per_second_finished",
            f"CPT tokens/s (last report) of the jobs finished in the last {WINDOW_S // 3600} h",
        )
        rates.add_metric([], *_buckets(finished_rates, RATE_BUCKETS))
        yield rates
        yield GaugeMetricFamily(
            "langadapt_cpt_tokens_per_second", "CPT tokens/s of the running jobs, summed", value=running_rate
        )
        queue_wait = GaugeHistogramMetricFamily(
            "langadapt_queue_wait_seconds",
            f"Submission to start, jobs started in the last {WINDOW_S // 3600} h (a retry counts from submission)",
        )
        seconds_waited = [(started - created).total_seconds() for created, started in waits]
        queue_wait.add_metric([], *_buckets(seconds_waited, WAIT_BUCKETS))
        yield queue_wait


def _buckets(values: list[float], bounds: tuple[float, ...]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative `le` buckets (with +Inf) and the sum, as prometheus_client's histogram families take them."""
    buckets = [(str(float(bound)), float(sum(1 for v in values if v <= bound))) for bound in bounds]
    return [*buckets, ("+Inf", float(len(values)))], float(sum(values))


def new_registry(sessions: sessionmaker[Session]) -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    registry.register(JobCollector(sessions))
    latency = Histogram(
        "langadapt_request_seconds",
        "HTTP request latency",
        ["method", "route", "status"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    )
    return registry, latency


class LatencyMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware task per request): time to the response start, labelled by route."""

    def __init__(self, app: ASGIApp, latency: Histogram) -> None:
        self.app, self.latency = app, latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.latency.labels(scope["method"], route, str(status)).observe(time.perf_counter() - started)
