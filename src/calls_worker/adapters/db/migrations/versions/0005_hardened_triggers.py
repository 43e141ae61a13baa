"""Triggers that no caller can redirect, and a due-calls record that holds under concurrency.

Two defects of 0003/0004, fixed here:

- **search_path.** The SECURITY DEFINER functions had ``search_path = pg_catalog, public``.
  With ``pg_temp`` not named, PostgreSQL searches it *first* for relations, so any role
  that could insert an attempt could shadow ``calls`` with a temporary table of its own
  and run code as the schema's owner. Every name is now schema-qualified and the path
  ends with ``pg_temp``, searched last.
- **Concurrency.** The triggers read the person and the organization in their own snapshot
  and locked nothing: lowering a maximum while an attempt was added left a due call out of
  the record; lowering it while a call was completed left a completed call in it. Now a
  change of a call takes a *shared* lock on its owning organization (an advisory lock
  keyed by the organization's uuid) before it reads the person and the organization, and a
  change of a maximum or of a person's owner takes the same lock *exclusively* before it
  rechecks the calls concerned. Whichever comes second waits for the first to commit and
  then reads what it committed (each statement of these functions takes a new snapshot
  under READ COMMITTED, PostgreSQL's default). Advisory locks write nothing to the rows,
  and need no privilege on the API's tables.

Writers at another isolation level, triggers disabled by hand, or any other route around
the rule are what ``calls_worker_reconcile_due_calls()`` is for: it compares the record
with the rule, repairs each difference under the same locks and returns what it repaired
(the beat runs it; the count is a metric with an alert).

Revision ID: 0005
Revises: 0004
"""

from alembic import op

from calls_worker.adapters.db.trigger_sql import PERSONS_MOVED

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# The class half of the advisory lock key (the other half is the organization's hash):
# any constant will do, as long as nothing else in the database uses it.
LOCK_CLASS = 730_411
# pg_temp last: searched first for relations when it is not named at all.
SEARCH_PATH = "pg_catalog, public, pg_temp"
# Every function is created whole, in the statement that creates it: CREATE OR REPLACE
# resets what it does not say, and a trigger's function that ran as its caller even for a
# moment would fail the API's writes.
DEFINER = f"SECURITY DEFINER SET search_path = {SEARCH_PATH}"

UPGRADE = f"""
-- The maximum that applies to calls of PERSON, read with its owning organization locked
-- (shared; exclusively by a change of the maximum or of the owner). A person who moved
-- while we waited is read again, until the owner we hold is the owner we read.
CREATE FUNCTION calls_worker_locked_maximum(person uuid) RETURNS integer
LANGUAGE plpgsql {DEFINER} AS $$
DECLARE
    owner uuid;
    held uuid;
    maximum integer;
BEGIN
    LOOP
        SELECT p.owning_organization_uuid INTO owner
        FROM public.persons p WHERE p.uuid = person;
        IF owner IS NULL OR owner = held THEN
            EXIT;
        END IF;
        PERFORM pg_catalog.pg_advisory_xact_lock_shared(
            {LOCK_CLASS}, pg_catalog.hashtext(owner::text));
        held := owner;
    END LOOP;
    SELECT o.max_call_attempts INTO maximum FROM public.organizations o WHERE o.uuid = owner;
    RETURN maximum;
END;
$$;

-- The exclusive side: taken by a change of maximums or owners, in a fixed order so that two
-- such changes cannot deadlock on each other.
CREATE FUNCTION calls_worker_lock_organizations(owners uuid[]) RETURNS void
LANGUAGE sql {DEFINER} AS $$
    SELECT pg_catalog.pg_advisory_xact_lock({LOCK_CLASS}, key)
    FROM (SELECT DISTINCT pg_catalog.hashtext(o::text) AS key
          FROM pg_catalog.unnest(owners) AS o WHERE o IS NOT NULL ORDER BY 1) AS keys;
$$;

-- Whether CALL is due now, and the record made to say so; true if the record changed.
-- The owner is locked whatever the call's state: a completed call's row must not be
-- removed before a concurrent recheck that saw it requested has added it.
CREATE FUNCTION calls_worker_refresh_due_call(call uuid) RETURNS boolean
LANGUAGE plpgsql {DEFINER} AS $$
DECLARE
    person uuid;
    c record;
    maximum integer;
    changed integer;
BEGIN
    SELECT person_uuid INTO person FROM public.calls WHERE uuid = call;
    IF FOUND THEN
        maximum := public.calls_worker_locked_maximum(person);
    END IF;
    SELECT status, external_metadata, attempt_count INTO c FROM public.calls WHERE uuid = call;
    IF FOUND AND c.status = 'requested' AND c.external_metadata IS NULL
       AND maximum IS NOT NULL AND c.attempt_count >= maximum THEN
        INSERT INTO public.worker_due_calls (call_uuid) VALUES (call)
        ON CONFLICT (call_uuid) DO NOTHING;
    ELSE
        DELETE FROM public.worker_due_calls WHERE call_uuid = call;
    END IF;
    GET DIAGNOSTICS changed = ROW_COUNT;
    RETURN changed > 0;
END;
$$;

CREATE OR REPLACE FUNCTION calls_worker_track_due_call() RETURNS trigger
LANGUAGE plpgsql {DEFINER} AS $$
BEGIN
    PERFORM public.calls_worker_refresh_due_call(NEW.uuid);
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION calls_worker_recheck_calls_of_persons(people uuid[]) RETURNS void
LANGUAGE sql {DEFINER} AS $$
    DELETE FROM public.worker_due_calls d
    USING public.calls c
    WHERE d.call_uuid = c.uuid
      AND c.person_uuid = ANY (people)
      AND NOT public.calls_worker_is_exhausted(c.status, c.external_metadata, c.attempt_count,
                                               c.person_uuid);
    INSERT INTO public.worker_due_calls (call_uuid)
    SELECT c.uuid FROM public.calls c
    WHERE c.person_uuid = ANY (people)
      AND c.status = 'requested' AND c.external_metadata IS NULL
      AND public.calls_worker_is_exhausted(c.status, c.external_metadata, c.attempt_count,
                                           c.person_uuid)
    ON CONFLICT (call_uuid) DO NOTHING;
$$;

CREATE OR REPLACE FUNCTION calls_worker_is_exhausted(
    status text, external_metadata jsonb, attempt_count integer, person uuid
) RETURNS boolean
LANGUAGE sql STABLE SET search_path = {SEARCH_PATH} AS $$
    SELECT status = 'requested'
       AND external_metadata IS NULL
       AND coalesce(attempt_count >= (
               SELECT o.max_call_attempts
               FROM public.persons p
               JOIN public.organizations o ON o.uuid = p.owning_organization_uuid
               WHERE p.uuid = person), false)
$$;

CREATE OR REPLACE FUNCTION calls_worker_organization_changed() RETURNS trigger
LANGUAGE plpgsql {DEFINER} AS $$
DECLARE
    changed_organizations uuid[];
BEGIN
    changed_organizations := ARRAY(
        SELECT n.uuid FROM changed n JOIN before b ON b.uuid = n.uuid
        WHERE n.max_call_attempts IS DISTINCT FROM b.max_call_attempts);
    IF pg_catalog.cardinality(changed_organizations) = 0 THEN
        RETURN NULL;
    END IF;
    PERFORM public.calls_worker_lock_organizations(changed_organizations);
    PERFORM public.calls_worker_recheck_calls_of_persons(
        ARRAY(SELECT p.uuid FROM public.persons p
              WHERE p.owning_organization_uuid = ANY (changed_organizations)));
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION calls_worker_person_changed() RETURNS trigger
LANGUAGE plpgsql {DEFINER} AS $$
{PERSONS_MOVED}
    PERFORM public.calls_worker_recheck_calls_of_persons(moved);
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION calls_worker_count_attempts() RETURNS trigger
LANGUAGE plpgsql {DEFINER} AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE public.calls SET attempt_count = attempt_count - 1 WHERE uuid = OLD.call_uuid;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        UPDATE public.calls SET attempt_count = attempt_count + 1 WHERE uuid = NEW.call_uuid;
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION calls_worker_reset_attempt_counts() RETURNS trigger
LANGUAGE plpgsql {DEFINER} AS $$
BEGIN
    UPDATE public.calls SET attempt_count = 0 WHERE attempt_count <> 0;
    RETURN NULL;
END;
$$;

-- The record against the rule: every call that differs is refreshed under the locks above
-- (its own row locked too, so a command changing it finishes first). Returns how many
-- were missing and how many were listed but not due. Nothing differs while the triggers
-- hold; a difference means something went around them.
CREATE FUNCTION calls_worker_reconcile_due_calls(OUT missing integer, OUT stale integer)
LANGUAGE plpgsql {DEFINER} AS $$
DECLARE
    candidate record;
BEGIN
    missing := 0;
    stale := 0;
    FOR candidate IN
        SELECT c.uuid, false AS listed
        FROM public.calls c
        JOIN public.persons p ON p.uuid = c.person_uuid
        JOIN public.organizations o ON o.uuid = p.owning_organization_uuid
        WHERE c.status = 'requested' AND c.external_metadata IS NULL
          AND c.attempt_count >= o.max_call_attempts
          AND NOT EXISTS (SELECT FROM public.worker_due_calls d WHERE d.call_uuid = c.uuid)
        UNION ALL
        SELECT d.call_uuid, true
        FROM public.worker_due_calls d
        JOIN public.calls c ON c.uuid = d.call_uuid
        WHERE NOT public.calls_worker_is_exhausted(c.status, c.external_metadata,
                                                   c.attempt_count, c.person_uuid)
    LOOP
        PERFORM FROM public.calls WHERE uuid = candidate.uuid FOR UPDATE;
        IF public.calls_worker_refresh_due_call(candidate.uuid) THEN
            IF candidate.listed THEN
                stale := stale + 1;
            ELSE
                missing := missing + 1;
            END IF;
        END IF;
    END LOOP;
END;
$$;
"""

DEFINERS = (
    "calls_worker_count_attempts()",
    "calls_worker_reset_attempt_counts()",
    "calls_worker_track_due_call()",
    "calls_worker_organization_changed()",
    "calls_worker_person_changed()",
    "calls_worker_recheck_calls_of_persons(uuid[])",
    "calls_worker_locked_maximum(uuid)",
    "calls_worker_lock_organizations(uuid[])",
    "calls_worker_refresh_due_call(uuid)",
    "calls_worker_reconcile_due_calls()",
)

DOWNGRADE = """
DROP FUNCTION calls_worker_reconcile_due_calls();
DROP FUNCTION calls_worker_refresh_due_call(uuid);
DROP FUNCTION calls_worker_lock_organizations(uuid[]);
DROP FUNCTION calls_worker_locked_maximum(uuid);
"""


def upgrade() -> None:
    op.execute(UPGRADE)
    # Nobody but the definer's own functions needs these (deploy/sql grants the worker's
    # role the reconciliation).
    for function in DEFINERS[5:]:
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")


def downgrade() -> None:
    # The hardened bodies stay (they do what 0004's did, with the locks); what 0005 added
    # goes, once the functions that call it no longer do.
    op.execute(
        f"""
        CREATE OR REPLACE FUNCTION calls_worker_track_due_call() RETURNS trigger
        LANGUAGE plpgsql {DEFINER} AS $$
        BEGIN
            IF public.calls_worker_is_exhausted(NEW.status, NEW.external_metadata,
                                                NEW.attempt_count, NEW.person_uuid) THEN
                INSERT INTO public.worker_due_calls (call_uuid) VALUES (NEW.uuid)
                ON CONFLICT (call_uuid) DO NOTHING;
            ELSE
                DELETE FROM public.worker_due_calls WHERE call_uuid = NEW.uuid;
            END IF;
            RETURN NULL;
        END;
        $$;
        CREATE OR REPLACE FUNCTION calls_worker_organization_changed() RETURNS trigger
        LANGUAGE plpgsql {DEFINER} AS $$
        BEGIN
            PERFORM public.calls_worker_recheck_calls_of_persons(
                ARRAY(SELECT p.uuid FROM public.persons p
                      JOIN changed n ON n.uuid = p.owning_organization_uuid
                      JOIN before b ON b.uuid = n.uuid
                      WHERE n.max_call_attempts IS DISTINCT FROM b.max_call_attempts));
            RETURN NULL;
        END;
        $$;
        CREATE OR REPLACE FUNCTION calls_worker_person_changed() RETURNS trigger
        LANGUAGE plpgsql {DEFINER} AS $$
        BEGIN
            PERFORM public.calls_worker_recheck_calls_of_persons(
                ARRAY(SELECT n.uuid FROM changed n JOIN before b ON b.uuid = n.uuid
                      WHERE n.owning_organization_uuid
                            IS DISTINCT FROM b.owning_organization_uuid));
            RETURN NULL;
        END;
        $$;
        """
    )
    op.execute(DOWNGRADE)
