"""Service accounts, who sent each command, and what makes listing calls cheap at any depth.

- ``worker_service_accounts``: the accounts commands act for (domain/access.py); the API,
  if it has service accounts of its own, keeps this table in step by writing it.
- ``worker_processed_commands.service_account_uuid``: which account each command named.
- ``worker_secrets``: the key that signs listing cursors (made here, at random, once).
- ``worker_call_reach``: for each call, a row under each organization whose service
  accounts reach it: the performing organization and the organization owning the person
  (one row when they are the same). A service account's page of calls is then one range of
  one index, newest first, whatever the depth; the alternative, "performing organization =
  X OR the person's owner = X", has no index that serves its order. Triggers keep it in
  the transaction of every change (a call inserted, deleted, moved to another person,
  organization or creation time; a person moved to another owner), under the same
  advisory locks as the due-calls record (0005), so a person moving while a call of theirs
  is inserted cannot leave the call under the old owner. Existing calls are filled in
  batches (adoption.py), resumably.
- Indexes on ``calls`` for the listing's three orders: all calls, by performing
  organization, by person (newest first by ``created_at``, then ``uuid``), built
  CONCURRENTLY.

Revision ID: 0007
Revises: 0006
"""

import secrets

from alembic import context, op

from calls_worker.adapters.db import adoption
from calls_worker.adapters.db.trigger_sql import PERSONS_MOVED

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# pg_temp last: searched first for relations when it is not named at all (see 0005).
SEARCH_PATH = "pg_catalog, public, pg_temp"
# Every function is created whole, in the statement that creates it (adoption.py says why).
DEFINER = f"SECURITY DEFINER SET search_path = {SEARCH_PATH}"

TABLES = """
CREATE TABLE worker_service_accounts (
    uuid uuid PRIMARY KEY,
    name text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    organization_uuid uuid NOT NULL REFERENCES organizations (uuid),
    scopes text[] NOT NULL CHECK (scopes <@ ARRAY['calls:create', 'calls:attempt',
        'calls:complete', 'calls:cancel', 'calls:expire', 'calls:read']::text[]),
    certificate_sha256 text NULL CHECK (certificate_sha256 ~ '^[0-9a-f]{64}$'),
    created_at timestamptz NOT NULL DEFAULT now(),
    disabled_at timestamptz NULL
);
CREATE INDEX worker_service_accounts_organization_idx
    ON worker_service_accounts (organization_uuid);
ALTER TABLE worker_processed_commands ADD COLUMN IF NOT EXISTS service_account_uuid uuid NULL;
CREATE TABLE worker_secrets (
    name text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE worker_call_reach (
    organization_uuid uuid NOT NULL,
    created_at timestamptz NOT NULL,
    call_uuid uuid NOT NULL,
    PRIMARY KEY (organization_uuid, created_at, call_uuid)
);
"""

FUNCTIONS = f"""
-- The organization owning PERSON, locked (shared) while it is read: a person moving to
-- another owner takes the old and the new owner's lock exclusively (0005).
CREATE FUNCTION calls_worker_locked_owner(person uuid) RETURNS uuid
LANGUAGE plpgsql {DEFINER} AS $$
DECLARE
    owner uuid;
BEGIN
    PERFORM public.calls_worker_locked_maximum(person);
    SELECT p.owning_organization_uuid INTO owner FROM public.persons p WHERE p.uuid = person;
    RETURN owner;
END;
$$;

-- The rows of the call CALL (performed by ORG, created at CREATED, of PERSON) as they must
-- be. plpgsql, so that the statement after the lock reads with a snapshot taken after it.
CREATE FUNCTION calls_worker_add_call_reach(call uuid, org uuid, person uuid,
                                            created timestamptz) RETURNS void
LANGUAGE plpgsql {DEFINER} AS $$
DECLARE
    owner uuid := public.calls_worker_locked_owner(person);
BEGIN
    INSERT INTO public.worker_call_reach (organization_uuid, created_at, call_uuid)
    SELECT DISTINCT o, created, call FROM pg_catalog.unnest(ARRAY[org, owner]) AS o
    WHERE o IS NOT NULL
    ON CONFLICT DO NOTHING;
END;
$$;

CREATE FUNCTION calls_worker_drop_call_reach(call uuid, org uuid, person uuid,
                                             created timestamptz) RETURNS void
LANGUAGE plpgsql {DEFINER} AS $$
DECLARE
    owner uuid := public.calls_worker_locked_owner(person);
BEGIN
    DELETE FROM public.worker_call_reach r
    WHERE r.organization_uuid IN (org, owner) AND r.created_at = created AND r.call_uuid = call;
END;
$$;

CREATE FUNCTION calls_worker_call_reach_changed() RETURNS trigger
LANGUAGE plpgsql {DEFINER} AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM public.calls_worker_drop_call_reach(OLD.uuid, OLD.organization_uuid,
                                                    OLD.person_uuid, OLD.created_at);
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        PERFORM public.calls_worker_add_call_reach(NEW.uuid, NEW.organization_uuid,
                                                   NEW.person_uuid, NEW.created_at);
    END IF;
    RETURN NULL;
END;
$$;

CREATE FUNCTION calls_worker_calls_truncated() RETURNS trigger
LANGUAGE plpgsql {DEFINER} AS $$
BEGIN
    TRUNCATE public.worker_call_reach;
    RETURN NULL;
END;
$$;

-- A person moved to another owner: their calls move with them, under the owners' locks
-- (exclusive, in a fixed order), like the due-calls record's recheck (0005).
CREATE FUNCTION calls_worker_person_reach_changed() RETURNS trigger
LANGUAGE plpgsql {DEFINER} AS $$
{PERSONS_MOVED}
    DELETE FROM public.worker_call_reach r
    USING public.calls c, before b
    WHERE b.uuid = ANY (moved) AND c.person_uuid = b.uuid
      AND r.organization_uuid = b.owning_organization_uuid
      AND r.created_at = c.created_at AND r.call_uuid = c.uuid
      AND c.organization_uuid IS DISTINCT FROM b.owning_organization_uuid;
    INSERT INTO public.worker_call_reach (organization_uuid, created_at, call_uuid)
    SELECT n.owning_organization_uuid, c.created_at, c.uuid
    FROM public.calls c JOIN changed n ON n.uuid = c.person_uuid
    WHERE n.uuid = ANY (moved) AND n.owning_organization_uuid IS NOT NULL
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END;
$$;

-- The backfill's batch: the rows of these calls, each owner locked (shared) first, then
-- read by a statement of its own; how many rows it added.
CREATE FUNCTION calls_worker_fill_call_reach(targets uuid[]) RETURNS integer
LANGUAGE plpgsql {DEFINER} AS $$
DECLARE
    added integer;
BEGIN
    -- In the owners' lock order (as calls_worker_lock_organizations takes them), so that
    -- a batch and a person moving to another owner rarely wait for each other in a cycle.
    PERFORM public.calls_worker_locked_maximum(people.person)
    FROM (SELECT c.person_uuid AS person,
                 pg_catalog.hashtext(p.owning_organization_uuid::text) AS key
          FROM public.calls c JOIN public.persons p ON p.uuid = c.person_uuid
          WHERE c.uuid = ANY (targets) GROUP BY 1, 2 ORDER BY 2) AS people;
    INSERT INTO public.worker_call_reach (organization_uuid, created_at, call_uuid)
    SELECT DISTINCT o.org, c.created_at, c.uuid
    FROM public.calls c
    JOIN public.persons p ON p.uuid = c.person_uuid
    CROSS JOIN LATERAL pg_catalog.unnest(ARRAY[c.organization_uuid,
                                               p.owning_organization_uuid]) AS o (org)
    WHERE c.uuid = ANY (targets) AND o.org IS NOT NULL
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS added = ROW_COUNT;
    RETURN added;
END;
$$;
"""

TRIGGERS = """
CREATE TRIGGER calls_reach
    AFTER INSERT OR DELETE ON calls
    FOR EACH ROW EXECUTE FUNCTION calls_worker_call_reach_changed();
CREATE TRIGGER calls_reach_moved
    AFTER UPDATE OF organization_uuid, person_uuid, created_at ON calls
    FOR EACH ROW
    WHEN ((OLD.organization_uuid, OLD.person_uuid, OLD.created_at)
          IS DISTINCT FROM (NEW.organization_uuid, NEW.person_uuid, NEW.created_at))
    EXECUTE FUNCTION calls_worker_call_reach_changed();
CREATE TRIGGER calls_reach_truncated
    AFTER TRUNCATE ON calls
    FOR EACH STATEMENT EXECUTE FUNCTION calls_worker_calls_truncated();
CREATE TRIGGER persons_reach
    AFTER UPDATE ON persons
    REFERENCING OLD TABLE AS before NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION calls_worker_person_reach_changed();
"""

DEFINERS = (
    "calls_worker_locked_owner(uuid)",
    "calls_worker_add_call_reach(uuid, uuid, uuid, timestamptz)",
    "calls_worker_drop_call_reach(uuid, uuid, uuid, timestamptz)",
    "calls_worker_call_reach_changed()",
    "calls_worker_calls_truncated()",
    "calls_worker_person_reach_changed()",
    "calls_worker_fill_call_reach(uuid[])",
)

# Listing orders: newest first (created_at, then uuid), read backwards.
INDEXES = {
    "calls_worker_calls_created_idx": "calls (created_at, uuid)",
    "calls_worker_calls_organization_created_idx": "calls (organization_uuid, created_at, uuid)",
    "calls_worker_calls_person_created_idx": "calls (person_uuid, created_at, uuid)",
}

CURSOR_KEY = "listing_cursor_key"

DOWNGRADE = """
DROP TRIGGER persons_reach ON persons;
DROP TRIGGER calls_reach_truncated ON calls;
DROP TRIGGER calls_reach_moved ON calls;
DROP TRIGGER calls_reach ON calls;
DROP FUNCTION calls_worker_fill_call_reach(uuid[]);
DROP FUNCTION calls_worker_person_reach_changed();
DROP FUNCTION calls_worker_calls_truncated();
DROP FUNCTION calls_worker_call_reach_changed();
DROP FUNCTION calls_worker_drop_call_reach(uuid, uuid, uuid, timestamptz);
DROP FUNCTION calls_worker_add_call_reach(uuid, uuid, uuid, timestamptz);
DROP FUNCTION calls_worker_locked_owner(uuid);
DROP TABLE worker_call_reach;
DROP TABLE worker_secrets;
ALTER TABLE worker_processed_commands DROP COLUMN service_account_uuid;
DROP TABLE worker_service_accounts;
"""


def upgrade() -> None:
    connection = op.get_bind()
    batch_size = int(context.config.attributes.get("batch_size", adoption.DEFAULT_BATCH_SIZE))
    with op.get_context().autocommit_block():
        adoption.run_online(connection, TABLES)
        # Nobody but the triggers calls the functions that take arguments.
        revoke = "".join(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC;\n"
                         for function in DEFINERS if not function.endswith("()"))  # fmt: skip
        adoption.run_functions(connection, FUNCTIONS + revoke)
        adoption.run_online(connection, TRIGGERS)
        connection.exec_driver_sql(
            "INSERT INTO worker_secrets (name, value) VALUES (%(name)s, %(value)s)"
            " ON CONFLICT (name) DO NOTHING",
            {"name": CURSOR_KEY, "value": secrets.token_hex(32)},
        )
        # Index builds wait for older transactions without blocking anyone: no lock_timeout.
        previous = connection.exec_driver_sql("SHOW lock_timeout").scalar()
        connection.exec_driver_sql("SET lock_timeout = 0")
        for name, definition in INDEXES.items():
            adoption.build_index_concurrently(connection, name, definition)
        connection.exec_driver_sql(f"SET lock_timeout = '{previous}'")
        adoption.owe(connection, adoption.CALL_REACH)
        adoption.backfill(connection, adoption.CALL_REACH, batch_size)


def downgrade() -> None:
    connection = op.get_bind()
    with op.get_context().autocommit_block():
        for name in INDEXES:
            connection.exec_driver_sql(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
    op.execute(DOWNGRADE)
    op.execute(f"DELETE FROM {adoption.ADOPTION_TABLE} WHERE step = '{adoption.CALL_REACH}'")
