"""A journal of sweep runs: what operators and the status command read.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE worker_sweep_runs (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            swept_at timestamptz NOT NULL,
            finished_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            duration_seconds double precision NOT NULL,
            expired integer NOT NULL,
            batches integer NOT NULL,
            skipped boolean NOT NULL
        );
        CREATE INDEX worker_sweep_runs_swept_at_idx ON worker_sweep_runs (swept_at);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE worker_sweep_runs")
