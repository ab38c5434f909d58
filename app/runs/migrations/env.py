"""Alembic's entry point for the run store: migrations run on the locked connection app.runs.migrate hands over,
or, from the `alembic` command line, on DATABASE_URL's database under the same lock."""
from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from app.runs.migrate import locked, target_metadata


def run_on(connection: Connection) -> None:
    """Run the pending migrations on `connection`, inside its (locked) transaction."""
    context.configure(connection=connection, target_metadata=target_metadata(),
                      render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


given = context.config.attributes.get("connection")
if given is not None:
    run_on(given)
elif context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run `python -m app store upgrade`")
else:
    from app.config import load_settings
    from flows.database import Database

    database = Database(load_settings().run_store_url)
    try:
        with locked(database) as connection:
            run_on(connection)
    finally:
        database.dispose()
