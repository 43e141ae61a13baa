"""A call is tracked from its insert, and an adopted database gets its due-calls record.

- An INSERT of a requested call managed here refreshes its entry in the due-calls record.
  A new call has no attempts, so it is due at once only where its owning organization's
  maximum is 0 or less: data the worker did not create may hold one (the worker's own
  schema forbids it), and the rule ``attemptCount >= max`` then holds from the start
  (docs/domain.md). Before this, such a call entered the record only on an update.
- ``worker_adoption`` exists on every database from here (empty unless the API's tables
  were adopted), and where they were, the record is filled in batches (adoption.py).

Revision ID: 0006
Revises: 0005
"""

from alembic import context, op

from calls_worker.adapters.db import adoption

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

UPGRADE = f"""
{adoption.CREATE_PROGRESS};
CREATE OR REPLACE TRIGGER calls_track_due_on_insert
    AFTER INSERT ON calls
    FOR EACH ROW
    WHEN (NEW.status = 'requested' AND NEW.external_metadata IS NULL)
    EXECUTE FUNCTION calls_worker_track_due_call();
"""


def upgrade() -> None:
    connection = op.get_bind()
    batch_size = int(context.config.attributes.get("batch_size", adoption.DEFAULT_BATCH_SIZE))
    with op.get_context().autocommit_block():
        adoption.run_online(connection, UPGRADE)
        adoption.backfill(connection, adoption.DUE_CALLS, batch_size)


def downgrade() -> None:
    op.execute("DROP TRIGGER calls_track_due_on_insert ON calls")
    if not adoption.adopted(op.get_bind()):  # 0001 drops it, after what it says
        op.execute(f"DROP TABLE {adoption.ADOPTION_TABLE}")
