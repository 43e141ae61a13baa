"""Keep a record of the calls that are due to expire, so a sweep costs what is due.

``worker_due_calls`` holds exactly the calls the expiry policy says must expire
(requested, managed here, attempts ≥ the owning organization's maximum), with the time
each became due. Triggers keep it in the same transaction as whatever made a call due
or not due any more: an attempt (through ``attempt_count``), a change of status or of
person, a new maximum for an organization, a person moving to another organization.
The sweep then reads this small table instead of scanning every requested call.

Whoever writes a call (the API's role included) must keep the record without being granted
anything on it: the trigger functions are SECURITY DEFINER, with a search path that no
caller can slip its own objects into, from the statement that creates them. On adopted
tables each statement is a transaction of its own (adoption.run_online), and a function
made whole only afterwards would run as its caller in between: the API's writes would fail.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

from calls_worker.adapters.db import adoption

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# pg_temp last: searched first for relations when it is not named at all (see 0005).
SEARCH_PATH = "pg_catalog, public, pg_temp"
DEFINER = f"SECURITY DEFINER SET search_path = {SEARCH_PATH}"

UPGRADE = f"""
CREATE TABLE worker_due_calls (
    call_uuid uuid PRIMARY KEY REFERENCES calls (uuid) ON DELETE CASCADE,
    due_since timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX worker_due_calls_due_since_idx ON worker_due_calls (due_since);

-- The expiry policy (domain/policy.py) in SQL, for the triggers: whether a call with these
-- values, called person PERSON, is exhausted.
CREATE FUNCTION calls_worker_is_exhausted(
    status text, external_metadata jsonb, attempt_count integer, person uuid
) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT status = 'requested'
       AND external_metadata IS NULL
       AND coalesce(attempt_count >= (
               SELECT o.max_call_attempts
               FROM persons p JOIN organizations o ON o.uuid = p.owning_organization_uuid
               WHERE p.uuid = person), false)
$$;

-- After an UPDATE that changes what the policy looks at (attempt_count, status,
-- external_metadata, person_uuid) of a call: add it if it became due, drop it otherwise.
-- The sweep keeps the table itself and says so with the setting calls_worker.sweeping, so
-- the trigger is not even called for the calls it expires.
CREATE FUNCTION calls_worker_track_due_call() RETURNS trigger
LANGUAGE plpgsql {DEFINER} AS $$
BEGIN
    IF calls_worker_is_exhausted(NEW.status, NEW.external_metadata, NEW.attempt_count,
                                 NEW.person_uuid) THEN
        INSERT INTO worker_due_calls (call_uuid) VALUES (NEW.uuid)
        ON CONFLICT (call_uuid) DO NOTHING;
    ELSE
        DELETE FROM worker_due_calls WHERE call_uuid = NEW.uuid;
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER calls_track_due
    AFTER UPDATE OF attempt_count, status, external_metadata, person_uuid ON calls
    FOR EACH ROW
    WHEN ((OLD.attempt_count, OLD.status, OLD.external_metadata, OLD.person_uuid)
              IS DISTINCT FROM (NEW.attempt_count, NEW.status, NEW.external_metadata,
                                NEW.person_uuid)
          AND current_setting('calls_worker.sweeping', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION calls_worker_track_due_call();

-- A new maximum, or a new owner of a person: recompute the calls concerned.
CREATE FUNCTION calls_worker_recheck_calls_of_persons(people uuid[]) RETURNS void
LANGUAGE sql {DEFINER} AS $$
    DELETE FROM worker_due_calls d
    USING calls c
    WHERE d.call_uuid = c.uuid
      AND c.person_uuid = ANY (people)
      AND NOT calls_worker_is_exhausted(c.status, c.external_metadata, c.attempt_count,
                                        c.person_uuid);
    INSERT INTO worker_due_calls (call_uuid)
    SELECT c.uuid FROM calls c
    WHERE c.person_uuid = ANY (people)
      AND c.status = 'requested' AND c.external_metadata IS NULL
      AND calls_worker_is_exhausted(c.status, c.external_metadata, c.attempt_count,
                                    c.person_uuid)
    ON CONFLICT (call_uuid) DO NOTHING;
$$;

CREATE FUNCTION calls_worker_organization_changed() RETURNS trigger
LANGUAGE plpgsql {DEFINER} AS $$
BEGIN
    PERFORM calls_worker_recheck_calls_of_persons(
        ARRAY(SELECT p.uuid FROM persons p
              JOIN changed n ON n.uuid = p.owning_organization_uuid
              JOIN before b ON b.uuid = n.uuid
              WHERE n.max_call_attempts IS DISTINCT FROM b.max_call_attempts));
    RETURN NULL;
END;
$$;
CREATE TRIGGER organizations_track_due
    AFTER UPDATE ON organizations
    REFERENCING OLD TABLE AS before NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION calls_worker_organization_changed();

CREATE FUNCTION calls_worker_person_changed() RETURNS trigger
LANGUAGE plpgsql {DEFINER} AS $$
BEGIN
    PERFORM calls_worker_recheck_calls_of_persons(
        ARRAY(SELECT n.uuid FROM changed n JOIN before b ON b.uuid = n.uuid
              WHERE n.owning_organization_uuid IS DISTINCT FROM b.owning_organization_uuid));
    RETURN NULL;
END;
$$;
CREATE TRIGGER persons_track_due
    AFTER UPDATE ON persons
    REFERENCING OLD TABLE AS before NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION calls_worker_person_changed();

"""

# What is due already. On adopted tables, full of the API's data, this one statement would
# hold the triggers' locks for as long as it runs: there, migration 0006 fills the record
# in batches instead.
BACKFILL = """
INSERT INTO worker_due_calls (call_uuid)
SELECT c.uuid
FROM calls c
JOIN persons p ON p.uuid = c.person_uuid
JOIN organizations o ON o.uuid = p.owning_organization_uuid
WHERE c.status = 'requested' AND c.external_metadata IS NULL
  AND o.max_call_attempts IS NOT NULL AND c.attempt_count >= o.max_call_attempts;
"""

DOWNGRADE = """
DROP TRIGGER persons_track_due ON persons;
DROP TRIGGER organizations_track_due ON organizations;
DROP TRIGGER calls_track_due ON calls;
DROP FUNCTION calls_worker_person_changed();
DROP FUNCTION calls_worker_organization_changed();
DROP FUNCTION calls_worker_recheck_calls_of_persons(uuid[]);
DROP FUNCTION calls_worker_track_due_call();
DROP FUNCTION calls_worker_is_exhausted(text, jsonb, integer, uuid);
DROP TABLE worker_due_calls;
"""


def upgrade() -> None:
    connection = op.get_bind()
    if not adoption.adopted(connection):
        op.execute(UPGRADE)
        op.execute(BACKFILL)
        return
    with op.get_context().autocommit_block():
        adoption.run_online(connection, UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
