"""Database use by the API without holding a connection while waiting, and the event streams built on it.

- `DatabaseSlots`: admission to the database. A request takes a slot before its first query and gives it back
  when its session is closed; there are fewer slots than pooled connections and than thread-pool threads, so an
  admitted request never waits for a connection or a thread held by another one. Requests beyond them wait here,
  holding nothing (no connection, no thread).
- `StreamGate`: a cap on open event streams per team and in total (429 with `Retry-After` beyond it).
- `EventWatcher`: one poller for every event stream of this process. Each round (every 0.5 s, at once for a new
  stream) one short session reads the newest event id and the status of every watched job, and the new events of
  the jobs that have some, once per job however many streams follow it; the streams only write them out. An open
  stream holds no connection and costs no query of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from langadapt.api.schemas import EventPublic
from langadapt.jobs.errors import ServiceError, Unavailable
from langadapt.jobs.models import TERMINAL, Job, JobEvent

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
SSE_PAGE = 500  # events read per job and round at most


@dataclass(frozen=True)
class StreamEvent:
    id: int
    type: str
    payload: str  # the event as its public JSON, serialised once for every stream of its job


@dataclass(eq=False)  # kept in sets by identity
class Subscription:
    """One stream's view of its job, filled in by the watcher: the events after `after` it has not sent yet, and
    the job's latest state."""

    after: int | None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    pending: list[StreamEvent] = field(default_factory=list)
    state: JobState | None = None

    def take(self) -> list[StreamEvent]:
        events, self.pending = [e for e in self.pending if self.after is None or e.id > self.after], []
        if events:
            self.after = events[-1].id
        return events

    @property
    def finished(self) -> bool:
        """The job has ended and this stream has sent its every event."""
        if self.state is None or self.state[0] not in TERMINAL:
            return False
        newest = self.state[1]
        return newest is None or (self.after is not None and self.after >= newest)


class EventWatcher:
    def __init__(self, sessions: sessionmaker[Session], slots: DatabaseSlots, interval_s: float) -> None:
        self.sessions, self.slots, self.interval_s = sessions, slots, interval_s
        self._subscriptions: dict[str, set[Subscription]] = defaultdict(set)
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def watch(self, job_id: str, after: int | None) -> AsyncIterator[Subscription]:
        """A subscription to the job's events after `after`; its `wake` is set when there is something new."""
        subscription = Subscription(after)
        self._subscriptions[job_id].add(subscription)
        self._kick.set()  # serve a new stream now, not at the next round
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._poll(), name="event-watcher")
        try:
            yield subscription
        finally:
            self._subscriptions[job_id].discard(subscription)
            if not self._subscriptions[job_id]:
                del self._subscriptions[job_id]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll(self) -> None:
        while self._subscriptions:
            self._kick.clear()
            wanted = {job_id: _cursor(subs) for job_id, subs in self._subscriptions.items()}
            try:
                states, events = await self.slots.run(self.sessions, partial(_read_jobs, wanted=wanted))
            except Exception as exc:  # a database blip: streams wait for the next round
                log.warning("event watcher: %s", exc)
                states, events = {}, {}
            full_page = False
            for job_id, state in states.items():
                new = events.get(job_id, [])
                full_page = full_page or len(new) == SSE_PAGE
                for subscription in self._subscriptions.get(job_id, ()):
                    if new or subscription.state != state:
                        subscription.pending, subscription.state = new, state
                        subscription.wake.set()
            if not full_page:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._kick.wait(), self.interval_s)


def _cursor(subscriptions: set[Subscription]) -> int | None:
    """Where the job's next read starts: after the event the furthest-behind of its streams sent last."""
    cursors = [subscription.after for subscription in subscriptions]
    return None if None in cursors else min(c for c in cursors if c is not None)


def _read_jobs(
    session: Session, *, wanted: dict[str, int | None]
) -> tuple[dict[str, JobState], dict[str, list[StreamEvent]]]:
    """Each job's state, and its events after the given cursor (a page at most) where it has newer ones."""
    rows = session.execute(
        select(Job.id, Job.status, func.max(JobEvent.id))
        .outerjoin(JobEvent, JobEvent.job_id == Job.id)
        .where(Job.id.in_(list(wanted)))
        .group_by(Job.id, Job.status)
    )
    states = {job_id: (status, newest) for job_id, status, newest in rows}
    events = {}
    for job_id, (_, newest) in states.items():
        after = wanted[job_id]
        if newest is not None and (after is None or newest > after):
            query = select(JobEvent).where(JobEvent.job_id == job_id)
            if after is not None:
                query = query.where(JobEvent.id > after)
            rows_ = session.scalars(query.order_by(JobEvent.id).limit(SSE_PAGE))
            events[job_id] = [StreamEvent(row.id, row.type, EventPublic.of(row).model_dump_json()) for row in rows_]
    return states, events
