"""Outcomes for producers in PostgreSQL, for deployments with no Redis (adapters/results.py).

``worker_results`` holds what Celery's Redis result backend would: a key
(``celery-task-meta-<command id>``), its value (the outcome as Celery encodes it, JSON) and
when it expires (CALLS_WORKER_RESULT_RETENTION_SECONDS after it was written). It is
UNLOGGED: a producer reads an outcome within seconds, the processed-command record keeps a
logged copy of every command's outcome for days, and so an outcome written here costs no
WAL. PostgreSQL empties an unlogged table after a crash and does not copy it to standbys:
a producer then gets the outcome from the record (``calls.outcome``). No index but the key:
``calls.prune`` deletes the expired rows once an hour, one scan of a table that holds at
most two hours of outcomes.

Revision ID: 0009
Revises: 0008
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "CREATE UNLOGGED TABLE worker_results ("
        " key text PRIMARY KEY,"
        " value text NOT NULL,"
        " expires_at timestamptz NOT NULL)"
    )


def downgrade() -> None:
    op.execute("DROP TABLE worker_results")
