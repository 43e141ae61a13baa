"""Call events: the outbox every change of a call writes in its own transaction (events.py).

``worker_call_events`` holds one row per change the worker makes to a call (created, attempt
added, completed, cancelled, expired by a command or by the sweep), inserted by the same
transaction as the change, so that there is no change without its event and no event
without its change. The relay (worker/relay.py) publishes the rows not published yet
in ``seq`` order and then sets ``published_at``; ``calls.prune`` deletes published rows
older than CALLS_WORKER_EVENTS_RETENTION_HOURS.

- ``seq``: an identity, taken when the row is inserted. Two events of one call are written
  by transactions that each hold the call's row lock (or create the call), so they take
  their numbers in the order they commit: ``seq`` orders the events of a call. (Across
  calls it need not follow commit order; nothing relies on that.)
- ``call`` and ``expiry`` are ``json``, not ``jsonb``: stored as written, never queried
  inside, and cheaper to write.
- Indexes: the primary key; the rows not published yet (partial: what the relay reads,
  small however large the table); ``(call_uuid, seq)`` for ``calls-worker events tail
  --call``; a BRIN index on ``recorded_at`` (cheap to keep: rows arrive in time order) for
  the prune.

Revision ID: 0010
Revises: 0009
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE worker_call_events (
            seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            event_id uuid NOT NULL,
            kind text NOT NULL CHECK (kind IN ('call.created', 'call.attempt_added',
                'call.completed', 'call.cancelled', 'call.expired')),
            occurred_at timestamptz NOT NULL,
            call_uuid uuid NOT NULL,
            organization_uuid uuid NOT NULL,
            owning_organization_uuid uuid NULL,
            call json NOT NULL,
            expiry json NULL,
            recorded_at timestamptz NOT NULL DEFAULT now(),
            published_at timestamptz NULL
        );
        CREATE INDEX worker_call_events_unpublished_idx
            ON worker_call_events (seq) WHERE published_at IS NULL;
        CREATE INDEX worker_call_events_call_idx ON worker_call_events (call_uuid, seq);
        CREATE INDEX worker_call_events_recorded_idx
            ON worker_call_events USING brin (recorded_at);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE worker_call_events")
