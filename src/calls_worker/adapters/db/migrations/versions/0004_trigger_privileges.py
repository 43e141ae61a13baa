"""Triggers act with the privileges of the schema's owner.

Whoever writes an attempt or a call (the API's role, the worker's least-privilege role)
must keep ``attempt_count`` and ``worker_due_calls`` right without being granted
anything on the worker's own tables: the trigger functions become SECURITY DEFINER, with
a fixed search_path so that no caller can slip its own objects in.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

FUNCTIONS = (
    "calls_worker_count_attempts()",
    "calls_worker_reset_attempt_counts()",
    "calls_worker_track_due_call()",
    "calls_worker_organization_changed()",
    "calls_worker_person_changed()",
    "calls_worker_recheck_calls_of_persons(uuid[])",
)


def upgrade() -> None:
    for function in FUNCTIONS:
        op.execute(
            f"ALTER FUNCTION {function} SECURITY DEFINER SET search_path = pg_catalog, public"
        )


def downgrade() -> None:
    for function in FUNCTIONS:
        op.execute(f"ALTER FUNCTION {function} SECURITY INVOKER RESET search_path")
