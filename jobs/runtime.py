"""The process-wide handles the API and the workers build once from settings."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from langadapt.jobs.assembly import Assembler
from langadapt.jobs.db import make_engine, make_sessionmaker
from langadapt.jobs.queue import celery_app
from langadapt.jobs.settings import Settings
from langadapt.jobs.storage import ArtifactStore


@dataclass
class Services:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: ArtifactStore
    celery: Celery  # a client: sends task names, never imports training code
    assembler: Assembler  # model files kept as recipes; remembers which input models it verified


def build_services(settings: Settings) -> Services:
    engine = make_engine(settings.database)
    store = settings.open_store()
    return Services(
        settings=settings,
        engine=engine,
        sessions=make_sessionmaker(engine),
        store=store,
        celery=celery_app(settings),
        assembler=Assembler(store),
    )
