"""Database use by the API without holding a connection while waiting, and the event streams built on it.

- `DatabaseSlots`: admission to the database. A request takes a slot before its first query and gives it back
  when its session is closed; there are fewer slots than pooled connections and than thread-pool threads, so an
  admitted request never waits for a connection or a thread held by another one. Requests beyond them wait here,
  holding nothing (no connection, no thread).
- `StreamGate`: a cap on open event streams per team and in total (429 with `Retry-After` beyond it).
- `EventWatcher`: one poller for every event stream of this process. Each interval a single short query reads
  the newest event id and the status of every watched job; only the streams whose job changed read their new
  events, each with a session of its own that is closed at once. An open stream holds no connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from langadapt.jobs.errors import ServiceError, Unavailable
from langadapt.jobs.models import Job, JobEvent

log = logging.getLogger("langadapt.api")

T = TypeVar("T")


class TooManyStreams(ServiceError):
    status = 429
    code = "too_many_streams"
    retry_after = 5


class Busy(Unavailable):
    code = "service_busy"
    retry_after = 1


class DatabaseSlots:
    def __init__(self, size: int, wait_s: float) -> None:
        self.size, self.wait_s = size, wait_s
        self._semaphore: asyncio.Semaphore | None = None

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._semaphore is None:  # created on the serving event loop
            self._semaphore = asyncio.Semaphore(self.size)
        try:
            await asyncio.wait_for(self._semaphore.acquire(), self.wait_s)
        except TimeoutError:
            raise Busy("the service is busy; retry shortly") from None
        try:
            yield
        finally:
            self._semaphore.release()

    async def run(self, sessions: sessionmaker[Session], work: Callable[[Session], T]) -> T:
        """`work(session)` in a worker thread, with a slot and a session of its own closed before returning."""

        def in_thread() -> T:
            with sessions() as session:
                return work(session)

        async with self.slot():
            return await run_in_threadpool(in_thread)


class StreamGate:
    def __init__(self, total: int, per_team: int) -> None:
        self.total, self.per_team = total, per_team
        self.open_by_team: dict[str, int] = defaultdict(int)

    def open(self, team_id: str) -> None:
        """Count a new stream of `team_id`, or raise 429 when a cap is reached."""
        if self.open_by_team[team_id] >= self.per_team:
            raise TooManyStreams(f"your team has {self.per_team} event streams open already; close one first")
        if sum(self.open_by_team.values()) >= self.total:
            raise TooManyStreams("the service has too many event streams open; retry shortly")
        self.open_by_team[team_id] += 1

    def close(self, team_id: str) -> None:
        self.open_by_team[team_id] -= 1
        if self.open_by_team[team_id] <= 0:
            del self.open_by_team[team_id]


class GatedStreamingResponse(StreamingResponse):
    """A stream that gives its gate place back however it ends (finished, client gone, never started)."""

    def __init__(self, content: AsyncIterator[str], *, release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


JobState = tuple[str, int | None]  # status, newest event id


class EventWatcher:
    def __init__(self, sessions: sessionmaker[Session], slots: DatabaseSlots, interval_s: float) -> None:
        self.sessions, self.slots, self.interval_s = sessions, slots, interval_s
        self._wakers: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def watch(self, job_id: str) -> AsyncIterator[asyncio.Event]:
        """An event set whenever the job's newest event or status changes (the caller clears it)."""
        wake = asyncio.Event()
        self._wakers[job_id].add(wake)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._poll(), name="event-watcher")
        try:
            yield wake
        finally:
            self._wakers[job_id].discard(wake)
            if not self._wakers[job_id]:
                del self._wakers[job_id]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll(self) -> None:
        seen: dict[str, JobState] = {}
        while self._wakers:
            job_ids = list(self._wakers)
            try:
                states = await self.slots.run(self.sessions, partial(_job_states, job_ids=job_ids))
            except Exception as exc:  # a database blip: streams wait for the next round
                log.warning("event watcher: %s", exc)
                states = seen
            for job_id, state in states.items():
                if seen.get(job_id) != state:
                    for wake in self._wakers.get(job_id, ()):
                        wake.set()
            seen = states
            await asyncio.sleep(self.interval_s)


def _job_states(session: Session, *, job_ids: list[str]) -> dict[str, JobState]:
    rows = session.execute(
        select(Job.id, Job.status, func.max(JobEvent.id))
        .outerjoin(JobEvent, JobEvent.job_id == Job.id)
        .where(Job.id.in_(job_ids))
        .group_by(Job.id, Job.status)
    )
    return {job_id: (status, newest) for job_id, status, newest in rows}
