"""Alembic environment: runs on the connection that ``adapters.db.migrate`` hands it."""

from __future__ import annotations

from alembic import context

from calls_worker.adapters.db.migrate import VERSION_TABLE

connection = context.config.attributes["connection"]
context.configure(
    connection=connection, version_table=VERSION_TABLE, transaction_per_migration=True
)
with context.begin_transaction():
    context.run_migrations()
