"""The calls schema shared with the API, the attempt counter, and the worker's own tables.

Revision ID: 0001
Revises:
"""

from alembic import context, op

from calls_worker.adapters.db import adoption

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Every column the worker adds to the API's tables has a default, so the API's plain
# INSERTs keep working. Timestamps are timestamptz: stored as UTC instants.
API_TABLES = """
CREATE TABLE organizations (
    uuid uuid PRIMARY KEY,
    name text NOT NULL,
    max_call_attempts integer NULL CHECK (max_call_attempts > 0)
);

CREATE TABLE persons (
    uuid uuid PRIMARY KEY,
    owning_organization_uuid uuid NOT NULL REFERENCES organizations (uuid)
);
CREATE INDEX persons_owning_organization_idx ON persons (owning_organization_uuid);

CREATE TABLE pledge_cases (
    uuid uuid PRIMARY KEY,
    person_uuid uuid NOT NULL REFERENCES persons (uuid)
);
CREATE INDEX pledge_cases_person_idx ON pledge_cases (person_uuid);

CREATE TABLE calls (
    uuid uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    status text NOT NULL DEFAULT 'requested'
        CHECK (status IN ('requested', 'completed', 'cancelled', 'expired')),
    type text NOT NULL DEFAULT 'verification'
        CHECK (type IN ('verification', 'happy_call', 'winback')),
    person_uuid uuid NOT NULL REFERENCES persons (uuid),
    pledge_case_uuid uuid NULL REFERENCES pledge_cases (uuid),
    organization_uuid uuid NOT NULL REFERENCES organizations (uuid),
    requested_by uuid NULL,
    result text NULL,
    notes text NULL,
    external_metadata jsonb NULL CHECK (jsonb_typeof(external_metadata) = 'object'),
    attempt_count integer NOT NULL DEFAULT 0 CHECK (attempt_count >= 0),
    completed_by uuid NULL DEFAULT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz NULL,
    cancelled_at timestamptz NULL,
    expired_at timestamptz NULL
);
CREATE INDEX calls_person_idx ON calls (person_uuid);
CREATE INDEX calls_organization_idx ON calls (organization_uuid);
-- The sweep reads only requested calls managed here: a partial index keeps that set small
-- however many calls have ended.
CREATE INDEX calls_requested_managed_idx ON calls (person_uuid, attempt_count)
    WHERE status = 'requested' AND external_metadata IS NULL;

CREATE TABLE call_attempts (
    uuid uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    call_uuid uuid NOT NULL REFERENCES calls (uuid),
    user_uuid uuid NOT NULL,
    attempted_at timestamptz NOT NULL
);
CREATE INDEX call_attempts_call_idx ON call_attempts (call_uuid, attempted_at);

"""

COUNTING = """
-- attempt_count is the number of call_attempts rows, whoever writes them (the API inserts
-- attempts too). Row triggers on call_attempts keep it; a guard on calls keeps anyone from
-- setting it by hand, so it cannot drift.
CREATE FUNCTION calls_worker_count_attempts() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE calls SET attempt_count = attempt_count - 1 WHERE uuid = OLD.call_uuid;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        UPDATE calls SET attempt_count = attempt_count + 1 WHERE uuid = NEW.call_uuid;
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER call_attempts_count
    AFTER INSERT OR DELETE OR UPDATE OF call_uuid ON call_attempts
    FOR EACH ROW EXECUTE FUNCTION calls_worker_count_attempts();

CREATE FUNCTION calls_worker_reset_attempt_counts() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE calls SET attempt_count = 0 WHERE attempt_count <> 0;
    RETURN NULL;
END;
$$;
CREATE TRIGGER call_attempts_truncated
    AFTER TRUNCATE ON call_attempts
    FOR EACH STATEMENT EXECUTE FUNCTION calls_worker_reset_attempt_counts();

"""

GUARD = """
-- Only the triggers above (nested, so pg_trigger_depth() > 1) may change attempt_count;
-- a new call starts at 0 and its attempts count it up.
CREATE FUNCTION calls_worker_guard_attempt_count() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() = 1 THEN
        IF TG_OP = 'INSERT' THEN
            NEW.attempt_count := 0;
        ELSE
            NEW.attempt_count := OLD.attempt_count;
        END IF;
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER calls_attempt_count_guard
    BEFORE INSERT OR UPDATE OF attempt_count ON calls
    FOR EACH ROW EXECUTE FUNCTION calls_worker_guard_attempt_count();

"""

WORKER_TABLES = """
-- The worker's own tables.
CREATE TABLE worker_processed_commands (
    command_id text PRIMARY KEY,
    kind text NOT NULL,
    call_uuid uuid NULL,
    outcome jsonb NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX worker_processed_commands_processed_at_idx
    ON worker_processed_commands (processed_at);

CREATE TABLE worker_rejected_commands (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    task_name text NOT NULL,
    command_id text NULL,
    raw_body text NOT NULL,
    reason text NOT NULL,
    details jsonb NOT NULL DEFAULT '[]',
    replayed_at timestamptz NULL
);
CREATE INDEX worker_rejected_commands_waiting_idx
    ON worker_rejected_commands (received_at) WHERE replayed_at IS NULL;
"""

DOWNGRADE = """
DROP TABLE worker_rejected_commands;
DROP TABLE worker_processed_commands;
DROP TABLE call_attempts;
DROP TABLE calls;
DROP FUNCTION calls_worker_guard_attempt_count();
DROP FUNCTION calls_worker_reset_attempt_counts();
DROP FUNCTION calls_worker_count_attempts();
DROP TABLE pledge_cases;
DROP TABLE persons;
DROP TABLE organizations;
"""

# Adopting the API's tables (docs/database.md): the worker's columns, with defaults (adding
# one is instant: no rewrite), then its functions and triggers, its own tables. Every
# statement can run again: a migrate killed half-way is resumed by the next one.
ADOPT_COLUMNS = """
ALTER TABLE calls
    ADD COLUMN IF NOT EXISTS attempt_count integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS completed_by uuid NULL DEFAULT NULL;
"""
# What the worker needs indexed, built without blocking the API's writes, under names of
# its own (the API's indexes are left alone, whatever they are).
ADOPT_INDEXES = {
    "calls_worker_call_attempts_call_idx": "call_attempts (call_uuid, attempted_at)",
    "calls_worker_calls_requested_idx": "calls (person_uuid, attempt_count)"
    " WHERE status = 'requested' AND external_metadata IS NULL",
    "calls_worker_persons_owner_idx": "persons (owning_organization_uuid)",
}
ADOPT_DOWNGRADE = """
DROP TABLE worker_rejected_commands;
DROP TABLE worker_processed_commands;
DROP TRIGGER calls_attempt_count_guard ON calls;
DROP TRIGGER call_attempts_truncated ON call_attempts;
DROP TRIGGER call_attempts_count ON call_attempts;
DROP FUNCTION calls_worker_guard_attempt_count();
DROP FUNCTION calls_worker_reset_attempt_counts();
DROP FUNCTION calls_worker_count_attempts();
ALTER TABLE calls DROP COLUMN attempt_count, DROP COLUMN completed_by;
"""


def adopting() -> bool:
    return bool(context.config.attributes.get("adopting"))


def upgrade() -> None:
    if not adopting():
        op.execute(API_TABLES + COUNTING + GUARD + WORKER_TABLES)
        return
    connection = op.get_bind()
    batch_size = int(context.config.attributes.get("batch_size", adoption.DEFAULT_BATCH_SIZE))
    with op.get_context().autocommit_block():
        # The guard would stop the backfill setting attempt_count; it comes back after it.
        adoption.run_online(connection, "DROP TRIGGER IF EXISTS calls_attempt_count_guard ON calls")
        adoption.run_online(connection, ADOPT_COLUMNS)
        adoption.run_online(connection, COUNTING)  # attempts are counted from here on
        adoption.run_online(connection, WORKER_TABLES)
        adoption.start(connection)
        # Index builds wait for older transactions without blocking anyone: no lock_timeout.
        # Before the backfill, which counts each call's attempts through the first one.
        previous = connection.exec_driver_sql("SHOW lock_timeout").scalar()
        connection.exec_driver_sql("SET lock_timeout = 0")
        for name, definition in ADOPT_INDEXES.items():
            adoption.build_index_concurrently(connection, name, definition)
        connection.exec_driver_sql(f"SET lock_timeout = '{previous}'")
        adoption.backfill(connection, adoption.ATTEMPT_COUNTS, batch_size)
        adoption.run_online(connection, GUARD)


def downgrade() -> None:
    connection = op.get_bind()
    if adoption.adopted(connection):  # the API's tables stay, as they were found
        for name in ADOPT_INDEXES:
            op.execute(f"DROP INDEX IF EXISTS {name}")
        op.execute(ADOPT_DOWNGRADE)
        op.execute(f"DROP TABLE {adoption.ADOPTION_TABLE}")
        return
    op.execute(DOWNGRADE)
