"""The event stream's framing as the service writes it: keep-alive comments between events (sent after 15 quiet
seconds, e.g. while a model loads) are not events."""

from __future__ import annotations

import httpx

from langadapt.client import Client

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
