"""Alembic environment: the URL comes from the caller's config (jobs.db.alembic_config) or from settings."""

from __future__ import annotations

from alembic import context
from sqlalchemy import pool

from langadapt.jobs.db import make_engine
from langadapt.jobs.models import Base
from langadapt.jobs.settings import Settings

config = context.config
url = config.get_main_option("sqlalchemy.url") or Settings().database


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
