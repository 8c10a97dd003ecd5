"""Alembic environment: the URL comes from the config (set by `sql.alembic_config`) or, for
the ``alembic`` command line, from the application's Settings (``DATABASE_URL``)."""

from __future__ import annotations

from alembic import context

from pipeline.settings import Settings
from pipeline.storage.sql import Base, make_engine

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or Settings().sql_url()


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = make_engine(_url())
    with engine.connect() as connection:
        # Batch mode: SQLite alters tables by copying them.
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=True, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
