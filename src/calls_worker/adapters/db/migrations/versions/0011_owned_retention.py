"""The outcomes' retention is the owner's to set, not the caller's.

Until now ``calls_worker_rotate_processed_commands(keep)`` took the retention from its
caller, and the worker's role may execute it: as that role, calling it with ``'0'`` a few
times forgot every outcome, those recorded seconds before included, and every redelivery or
resend after that would be applied again. Now the retention is a column of
``worker_processed_rotation`` (``keep``), which only the owner of the worker's objects
writes (the worker's role reads it); ``calls-worker migrate`` sets it from
CALLS_WORKER_PROCESSED_RETENTION_HOURS (journal.set_processed_retention), 72 hours until it
does. The rotation, ``calls_worker_rotate_processed_commands()``, reads it there.

Rolling upgrade: a worker of the previous release still calls ``rotate(keep)``; that
signature stays callable, ignores its argument and rotates by the owner's retention. It goes
in the release after this one.

Each function is created whole (SECURITY DEFINER, its search path, its lock timeout, EXECUTE
revoked from PUBLIC) in the statement that creates it, so there is no moment when it runs
as its caller; CREATE OR REPLACE would otherwise reset those.

Revision ID: 0011
Revises: 0010
"""

from alembic import op

from calls_worker.adapters.db.trigger_sql import rotation_body

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

SEARCH_PATH = "pg_catalog, public, pg_temp"
LOCK = "730412, 1"  # 0008's: a swap waits for the writes of its turn

ATTRIBUTES = f"SECURITY DEFINER SET search_path = {SEARCH_PATH} SET lock_timeout = '2s'"


def rotation(signature: str, keep: str) -> str:
    """One step of a rotation (0008's, created whole): call it until it says 'swapped' or
    'not due'; 'emptied' means the previous table was emptied, call it again to swap.
    ``keep``: where the retention comes from."""
    return f"""
CREATE OR REPLACE FUNCTION calls_worker_rotate_processed_commands({signature}) RETURNS text
LANGUAGE plpgsql {ATTRIBUTES} AS $$
{rotation_body(keep, LOCK)}
$$;
REVOKE ALL ON FUNCTION calls_worker_rotate_processed_commands({signature}) FROM PUBLIC;
"""


# The previous release's call: its argument is ignored.
IGNORING_ITS_ARGUMENT = f"""
CREATE OR REPLACE FUNCTION calls_worker_rotate_processed_commands(keep interval) RETURNS text
LANGUAGE sql {ATTRIBUTES} AS $$ SELECT public.calls_worker_rotate_processed_commands() $$;
REVOKE ALL ON FUNCTION calls_worker_rotate_processed_commands(interval) FROM PUBLIC;
"""


def upgrade() -> None:
    op.execute(
        "ALTER TABLE worker_processed_rotation"
        " ADD COLUMN keep interval NOT NULL DEFAULT interval '72 hours'"
        " CHECK (keep >= interval '0')"
    )
    op.execute(rotation("", "turn.keep"))
    op.execute(IGNORING_ITS_ARGUMENT)


def downgrade() -> None:
    op.execute("DROP FUNCTION calls_worker_rotate_processed_commands()")
    op.execute(rotation("keep interval", "keep"))
    op.execute("ALTER TABLE worker_processed_rotation DROP COLUMN keep")
