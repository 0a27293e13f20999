"""`Client`: the service's resources as typed Python calls. Return values are the API's own response schemas
(`langadapt.api.schemas`), so a field has one name and one type on both sides of the wire.

    client = Client()                                   # LANGADAPT_BASE_URL / LANGADAPT_API_KEY
    corpus = client.files.upload("ru.jsonl.xz")
    job = client.jobs.create({"base_model": "smollm2-135m-instruct", "corpus_file": corpus.id})
    job = client.jobs.wait(job.id, on_event=print)      # follows the event stream, through dropped connections
    client.artifacts.download(job.id, "cpt/model.safetensors", to="model.safetensors")
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import EventSource
from pydantic import BaseModel

from langadapt.api.schemas import (
    ArtifactPublic,
    ArtifactsPublic,
    EstimatePublic,
    EventPublic,
    EventsPublic,
    FilePublic,
    FilesPublic,
    JobPublic,
    JobsPublic,
    ResultGroup,
    ResultGroupsPublic,
    ResultPublic,
    ResultsPublic,
    ScorePublic,
    ScoresPublic,
    WebhookCreated,
    WebhookDeliveriesPublic,
    WebhookDeliveryPublic,
    WebhookPublic,
    WebhooksPublic,
)
from langadapt.client.errors import ChecksumMismatch, ConnectionFailed, RateLimited, ServiceUnavailable
from langadapt.client.transport import Backoff, Transport
from langadapt.jobs.spec import JobRequest

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
DOWNLOAD_BLOCK = 1 << 20


class Client:
    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 5,
    ) -> None:
        base_url = base_url or os.environ.get("LANGADAPT_BASE_URL") or "http://127.0.0.1:8000"
        api_key = api_key or os.environ.get("LANGADAPT_API_KEY")
        if not api_key:
            raise ValueError("an API key is needed: pass api_key= or set LANGADAPT_API_KEY")
        self.transport = Transport(base_url, api_key, timeout=timeout, retries=retries)
        self.files = Files(self.transport)
        self.jobs = Jobs(self.transport)
        self.artifacts = Artifacts(self.transport)
        self.results = Results(self.transport)
        self.webhooks = Webhooks(self.transport)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _pages(fetch: Callable[[Any], BaseModel]) -> Iterator[Any]:
    """Every row of a cursor-paginated listing: `fetch(after)` returns a page with `data` and `next`."""
    after = None
    while True:
        page = fetch(after)
        yield from page.data  # type: ignore[attr-defined]
        after = page.next  # type: ignore[attr-defined]
        if after is None:
            return


class Files:
    def __init__(self, transport: Transport) -> None:
        self.t = transport

    def upload(self, path: str | os.PathLike[str]) -> FilePublic:
        path = Path(path)

        def body() -> dict[str, Any]:
            return {"file": (path.name, path.open("rb"))}

        return FilePublic.model_validate_json(self.t.request("POST", "/v1/files", files=body).content)

    def get(self, file_id: str) -> FilePublic:
        return FilePublic.model_validate_json(self.t.request("GET", f"/v1/files/{file_id}").content)

    def list(self, *, page_size: int = 100) -> Iterator[FilePublic]:
        def fetch(after: str | None) -> FilesPublic:
            params = {"limit": page_size, **({"after": after} if after else {})}
            return FilesPublic.model_validate_json(self.t.request("GET", "/v1/files", params=params).content)

        return _pages(fetch)


class Jobs:
    def __init__(self, transport: Transport) -> None:
        self.t = transport

    def create(self, spec: JobRequest | dict[str, Any], *, idempotency_key: str | None = "auto") -> JobPublic:
        """Submit a job. The default key is fresh per call, so this call's own retries never submit it twice;
        pass your own to make separate calls idempotent, or None for none."""
        key = uuid.uuid4().hex if idempotency_key == "auto" else idempotency_key
        headers = {"Idempotency-Key": key} if key else {}
        response = self.t.request("POST", "/v1/jobs", json=_body(spec), headers=headers, idempotent=key is not None)
        return JobPublic.model_validate_json(response.content)

    def estimate(self, spec: JobRequest | dict[str, Any]) -> EstimatePublic:
        """Validate the spec and estimate its cost and payoff (`POST /v1/jobs?dry_run=true`): nothing is queued."""
        response = self.t.request("POST", "/v1/jobs", params={"dry_run": "true"}, json=_body(spec), idempotent=True)
        return EstimatePublic.model_validate_json(response.content)

    def get(self, job_id: str) -> JobPublic:
        return JobPublic.model_validate_json(self.t.request("GET", f"/v1/jobs/{job_id}").content)

    def list(
        self, *, status: str | None = None, labels: dict[str, str] | None = None, page_size: int = 100
    ) -> Iterator[JobPublic]:
        """Newest first, every page fetched as it is reached."""

        def fetch(after: str | None) -> JobsPublic:
            params: dict[str, Any] = {"limit": page_size, "label": [f"{k}:{v}" for k, v in (labels or {}).items()]}
            if status:
                params["status"] = status
            if after:
                params["after"] = after
            return JobsPublic.model_validate_json(self.t.request("GET", "/v1/jobs", params=params).content)

        return _pages(fetch)

    def cancel(self, job_id: str) -> JobPublic:
        response = self.t.request("POST", f"/v1/jobs/{job_id}/cancel", idempotent=True)
        return JobPublic.model_validate_json(response.content)

    def retry(self, job_id: str) -> JobPublic:
        return JobPublic.model_validate_json(self.t.request("POST", f"/v1/jobs/{job_id}/retry").content)

    def delete(self, job_id: str) -> None:
        """Delete a finished job with everything it stored (its artifacts, checkpoints, events and scores)."""
        self.t.request("DELETE", f"/v1/jobs/{job_id}")

    def events(self, job_id: str, *, follow: bool = False, after: int | None = None) -> Iterator[EventPublic]:
        """The job's events, oldest first. `follow`: a live stream (Server-Sent Events) that ends when the job
        does; a dropped connection is reopened with `Last-Event-ID`, so no event is lost or repeated."""
        if not follow:

            def fetch(cursor: int | None) -> EventsPublic:
                params = {"limit": 100, **({"after": cursor} if cursor is not None else {})}
                response = self.t.request("GET", f"/v1/jobs/{job_id}/events", params=params)
                return EventsPublic.model_validate_json(response.content)

            yield from _pages(lambda cursor: fetch(after if cursor is None else cursor))
            return
        backoff = Backoff(self.t.retries)
        last = after
        while True:
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            try:
                with self.t.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
                    for sse in EventSource(response).iter_sse():
                        if sse.event == "end":
                            return
                        if not sse.id or not sse.data:  # keep-alive comments arrive as empty events
                            continue
                        event = EventPublic.model_validate_json(sse.data)
                        last = event.id
                        backoff.reset()
                        yield event
            except (httpx.TransportError, ServiceUnavailable, RateLimited) as exc:
                if not backoff.wait():
                    raise ConnectionFailed(f"event stream of {job_id}: {exc}") from exc
                continue
            # The stream closed without its end event (a restarted server): reopen from the last event.
            if not backoff.wait():
                raise ConnectionFailed(f"event stream of {job_id} keeps closing early")

    def wait(
        self, job_id: str, *, on_event: Callable[[EventPublic], None] | None = None, timeout: float | None = None
    ) -> JobPublic:
        """Follow the job until it ends; every event goes to `on_event`. Returns the final job."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for event in self.events(job_id, follow=True):
            if on_event is not None:
                on_event(event)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still running after {timeout} s")
        return self.get(job_id)

    def scores(self, job_id: str) -> list[ScorePublic]:
        return ScoresPublic.model_validate_json(self.t.request("GET", f"/v1/jobs/{job_id}/scores").content).data


class Artifacts:
    def __init__(self, transport: Transport) -> None:
        self.t = transport

    def list(self, job_id: str) -> list[ArtifactPublic]:
        response = self.t.request("GET", f"/v1/jobs/{job_id}/artifacts")
        return ArtifactsPublic.model_validate_json(response.content).data

    def download(self, job_id: str, name: str, *, to: str | os.PathLike[str] | None = None) -> Path:
        """Stream an artifact to `to` (a file, or a folder to put it in; default: its file name here). Bytes land in
        `<to>.part` first; a dropped connection, or an earlier call's `.part`, resumes with a Range request. The
        file is renamed into place only when its sha256 matches the listing's."""
        entry = next((a for a in self.list(job_id) if a.name == name), None)
        if entry is None:  # let the server say why (unknown name, invalid name)
            self.t.request("HEAD", f"/v1/jobs/{job_id}/artifacts/{name}")
            raise ConnectionFailed(f"artifact {name} is not listed")
        target = Path(to) if to is not None else Path(name.rsplit("/", 1)[-1])
        if target.is_dir():
            target = target / name.rsplit("/", 1)[-1]
        part = target.with_name(target.name + ".part")
        backoff = Backoff(self.t.retries)
        while True:
            done = part.stat().st_size if part.exists() else 0
            if done >= entry.size:
                break
            try:
                self._fetch(job_id, name, part, done)
            except (httpx.TransportError, ServiceUnavailable, RateLimited) as exc:
                if not backoff.wait():
                    raise ConnectionFailed(f"download of {name}: {exc}") from exc
        if _sha256(part) != entry.sha256 or part.stat().st_size != entry.size:
            part.unlink()
            raise ChecksumMismatch(f"{name}: the downloaded bytes do not match the listed sha256 {entry.sha256}")
        part.replace(target)
        return target

    def _fetch(self, job_id: str, name: str, part: Path, offset: int) -> None:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        path = f"/v1/jobs/{job_id}/artifacts/{name}"
        # S3 stores answer with a redirect to a presigned URL: httpx drops the API key on the way there.
        with self.t.stream("GET", path, headers=headers, follow_redirects=True) as response:
            mode = "ab" if response.status_code == 206 else "wb"  # 200: the server sent it whole
            with part.open(mode) as out:
                for block in response.iter_bytes():  # as received: a dropped connection keeps what came
                    out.write(block)


class Results:
    def __init__(self, transport: Transport) -> None:
        self.t = transport

    def query(
        self, *, group_by: list[str] | None = None, labels: dict[str, str] | None = None, **filters: Any
    ) -> list[ResultPublic] | list[ResultGroup]:
        """Score rows joined with their jobs' parameters (every page), or with `group_by` one aggregate per
        group. Filters: task, metric, model, variant, vocab_method, init_method, base_model, instruct_model,
        job_id, since, until."""
        params: dict[str, Any] = {k: v for k, v in filters.items() if v is not None}
        params["label"] = [f"{k}:{v}" for k, v in (labels or {}).items()]
        if group_by:
            params.update(group_by=",".join(group_by), limit=100)
            response = self.t.request("GET", "/v1/results", params=params)
            return ResultGroupsPublic.model_validate_json(response.content).data

        def fetch(after: int | None) -> ResultsPublic:
            page = {**params, "limit": 100, **({"after": after} if after is not None else {})}
            return ResultsPublic.model_validate_json(self.t.request("GET", "/v1/results", params=page).content)

        return list(_pages(fetch))


class Webhooks:
    def __init__(self, transport: Transport) -> None:
        self.t = transport

    def create(self, url: str, events: list[str] | None = None) -> WebhookCreated:
        """Register a URL; the answer carries the signing secret, shown this once."""
        body: dict[str, Any] = {"url": url, **({"events": events} if events else {})}
        return WebhookCreated.model_validate_json(self.t.request("POST", "/v1/webhooks", json=body).content)

    def list(self) -> list[WebhookPublic]:
        return WebhooksPublic.model_validate_json(self.t.request("GET", "/v1/webhooks").content).data

    def delete(self, webhook_id: str) -> None:
        self.t.request("DELETE", f"/v1/webhooks/{webhook_id}")

    def deliveries(self, webhook_id: str) -> list[WebhookDeliveryPublic]:
        response = self.t.request("GET", f"/v1/webhooks/{webhook_id}/deliveries")
        return WebhookDeliveriesPublic.model_validate_json(response.content).data


def _body(spec: JobRequest | dict[str, Any]) -> dict[str, Any]:
    return spec.model_dump(mode="json", exclude_unset=True) if isinstance(spec, JobRequest) else spec


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(DOWNLOAD_BLOCK):
            digest.update(block)
    return digest.hexdigest()
