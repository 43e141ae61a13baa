"""A rejected command is settled by a replay or by an operator's dismissal.

- ``dismissed_at``: an operator decided the command needs nothing more
  (``dead-letters dismiss``); it no longer waits.
- ``replayed_as``: the command id a replay sent it under: its own id when it had no outcome
  (so that a producer's resend of that id and the replay have one effect between them), or
  a replay id (``replay-<id>-<hash>``) when its own id has an outcome already.
- The index of those waiting (the gauge ``calls_worker_rejected_commands_waiting``, the
  default ``dead-letters list``) covers the rows neither replayed nor dismissed.

Revision ID: 0012
Revises: 0011
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE worker_rejected_commands
            ADD COLUMN dismissed_at timestamptz NULL,
            ADD COLUMN replayed_as text NULL;
        DROP INDEX worker_rejected_commands_waiting_idx;
        CREATE INDEX worker_rejected_commands_waiting_idx ON worker_rejected_commands
            (received_at) WHERE replayed_at IS NULL AND dismissed_at IS NULL;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP INDEX worker_rejected_commands_waiting_idx;
        ALTER TABLE worker_rejected_commands DROP COLUMN replayed_as, DROP COLUMN dismissed_at;
        CREATE INDEX worker_rejected_commands_waiting_idx
            ON worker_rejected_commands (received_at) WHERE replayed_at IS NULL;
        """
    )
