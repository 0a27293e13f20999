"""The client's handling of what is hard to make a real service do on cue: keep-alive comments between events
(sent after 15 quiet seconds, e.g. while a model loads), 429 and 503 answers."""

from __future__ import annotations

import httpx
import pytest

from langadapt.client import Client
from langadapt.client.errors import DatabaseUnavailable

EVENT = (
    '{"id": %d, "ts": "2026-11-30T06:00:00Z", "level": "info", "type": "stage", "stage": "cpt", '
    '"message": "started", "data": null}'
)


def test_keep_alive_comments_are_skipped() -> None:
    body = (
        f"id: 1\nevent: stage\ndata: {EVENT % 1}\n\n"
        ": keep-alive\n\n"
        f"id: 2\nevent: stage\ndata: {EVENT % 2}\n\n"
        ": keep-alive\n\n"
        'event: end\ndata: {"status": "succeeded"}\n\n'
    )

    def answer(request: httpx.Request) -> httpx.Response:
        assert request.headers["accept"] == "text/event-stream"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    client = Client("http://service", "la_key")
    client.transport.http = httpx.Client(base_url="http://service", transport=httpx.MockTransport(answer))
    assert [event.id for event in client.jobs.events("job_x", follow=True)] == [1, 2]


def _client_answering(statuses: list[int], seen: list[httpx.Request]) -> Client:
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        status = statuses.pop(0)
        if status >= 400:
            body = {"error": {"code": "database_unavailable" if status == 503 else "rate_limited", "message": "x"}}
            return httpx.Response(status, json=body, headers={"Retry-After": "0"})
        return httpx.Response(201, json=FILE)

    client = Client("http://service", "la_key")
    client.transport.http = httpx.Client(base_url="http://service", transport=httpx.MockTransport(answer))
    return client


FILE = {
    "id": "file_1",
    "filename": "ru.txt",
    "bytes": 3,
    "sha256": "0" * 64,
    "documents": 1,
    "chars": 3,
    "created_at": "2026-11-30T06:00:00Z",
}


def test_429_is_retried_for_any_request_503_only_when_safe_to_resend(tmp_path) -> None:
    corpus = tmp_path / "ru.txt"
    corpus.write_text("абв")
    seen: list[httpx.Request] = []
    assert _client_answering([429, 429, 201], seen).files.upload(corpus).id == "file_1"
    assert len(seen) == 3 and all("абв".encode() in request.content for request in seen)  # re-sent whole

    seen.clear()
    with pytest.raises(DatabaseUnavailable):  # an upload is no idempotent request: a 503 is not re-sent
        _client_answering([503, 201], seen).files.upload(corpus)
    assert len(seen) == 1
