"""Attempts are counted with the privileges of the schema's owner.

Whoever writes an attempt (the API's role, the worker's least-privilege role) must keep
``attempt_count`` right without being granted anything more: 0001's counting functions
become SECURITY DEFINER here, with a fixed search_path so that no caller can slip its own
objects in. The change is one transaction, so no write sees them half changed.

0003's functions used to be made SECURITY DEFINER here as well. They are created whole
by 0003 now: on adopted tables 0003 runs statement by statement, and between the two
migrations the API's writes failed for want of privileges on the due-calls record. This
migration leaves them alone, up and down.

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
)
# pg_temp last: searched first for relations when it is not named at all (see 0005).
SEARCH_PATH = "pg_catalog, public, pg_temp"


def upgrade() -> None:
    for function in FUNCTIONS:
        op.execute(f"ALTER FUNCTION {function} SECURITY DEFINER SET search_path = {SEARCH_PATH}")


def downgrade() -> None:
    for function in FUNCTIONS:
        op.execute(f"ALTER FUNCTION {function} SECURITY INVOKER RESET search_path")
