"""Command outcomes in two tables that take turns, so that forgetting old ones is a TRUNCATE.

At 1,000 commands/s the outcome records grow by ≈ 86 million rows a day; deleting the old
ones row by row (what ``calls.prune`` did) was the heaviest thing the worker asked of the
database: every row deleted is written to the WAL, left for vacuum, and taken out of the
index. Partitioning by time would make it a DROP, but PostgreSQL wants a partitioned
table's unique key to hold the partition key, so it could not refuse a command id seen in
another partition, and that refusal is what "applied once" rests on.

Here the records are in two tables: the *current* one (where new outcomes go) and the
*previous* one; ``worker_processed_rotation`` says which is which and since when. A command
id must be new to both: within the current table its primary key refuses it (a second
delivery running at once waits for the first and is refused when it commits, as before);
an id in the previous table is refused by the trigger that writes the records. Readers see
both through the view ``worker_processed_commands``, which the worker also inserts into,
with the same columns and the same statement as before.

Rotation (``calls_worker_rotate_processed_commands(keep)``, called by ``calls.prune``): when
the current table has been current for ``keep``, every outcome in the previous table is
older than ``keep``; the previous table is emptied (TRUNCATE), and then, in a transaction of
its own, the two swap: the empty one becomes current. An outcome is kept for ``keep`` to
twice that. The swap takes an advisory lock exclusively (class 730412, key 1) and every
write of an outcome takes it shared, in its own statement before it reads which table is
current, so no write of the old turn is still running when the new turn starts, and the
previous table never gets a row once it is previous: its check is exact. The TRUNCATE waits
for the transactions that read the previous table and holds up new ones while it runs
(0.4 s for 10 million outcomes, bench/outcome_rotation.py; it gives up waiting after
``lock_timeout`` = 2 s, and the next hourly run tries again). The two steps are separate
transactions so that neither holds a lock the other waits for: a batch reads both tables
first and writes later.

Compatibility: the table that existed becomes the first current table and keeps its name's
constraint ``worker_processed_commands_pkey``, so a worker of the previous release still
sees a duplicate as one until the first rotation (``keep`` after this migration). The
``processed_at`` index served the row-by-row prune only and goes. The worker's role needs
SELECT and INSERT on the view and EXECUTE on the rotation (deploy/sql); the grants it had on
the old table (DELETE among them) are revoked: it can no longer forget an outcome early.

Revision ID: 0008
Revises: 0007
"""

from alembic import op

from calls_worker.adapters.db.trigger_sql import rotation_body

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

SEARCH_PATH = "pg_catalog, public, pg_temp"
# Every function is created whole, in the statement that creates it (see 0005).
DEFINER = f"SECURITY DEFINER SET search_path = {SEARCH_PATH}"
LOCK = "730412, 1"
COLUMNS = "command_id, kind, call_uuid, outcome, processed_at, service_account_uuid"

# The table kept, and its twin.
TABLES = """
ALTER TABLE worker_processed_commands RENAME TO worker_processed_commands_a;
DROP INDEX worker_processed_commands_processed_at_idx;
CREATE TABLE worker_processed_commands_b (
    command_id text NOT NULL,
    kind text NOT NULL,
    call_uuid uuid NULL,
    outcome jsonb NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    service_account_uuid uuid NULL,
    CONSTRAINT worker_processed_commands_b_pkey PRIMARY KEY (command_id)
);
CREATE TABLE worker_processed_rotation (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    current_table text NOT NULL CHECK (current_table IN ('a', 'b')),
    current_since timestamptz NOT NULL,
    previous_since timestamptz NULL
);
INSERT INTO worker_processed_rotation (current_table, current_since) VALUES ('a', now());
"""

VIEW = f"""
CREATE VIEW worker_processed_commands AS
    SELECT {COLUMNS} FROM worker_processed_commands_a
    UNION ALL
    SELECT {COLUMNS} FROM worker_processed_commands_b;
ALTER VIEW worker_processed_commands ALTER COLUMN processed_at SET DEFAULT now();
"""


def _write(into: str, other: str) -> str:
    """The trigger's branch for one turn: refuse an id of the previous table, as its primary
    key would, then insert into the current one (whose own key refuses an id it has)."""
    constraint = (
        "worker_processed_commands_pkey" if other == "a" else "worker_processed_commands_b_pkey"
    )
    return f"""
        IF EXISTS (SELECT FROM public.worker_processed_commands_{other}
                   WHERE command_id = NEW.command_id) THEN
            RAISE unique_violation USING
                MESSAGE = 'duplicate key value violates unique constraint "{constraint}"',
                DETAIL = format('Key (command_id)=(%s) already exists.', NEW.command_id),
                CONSTRAINT = '{constraint}', TABLE = 'worker_processed_commands_{other}',
                SCHEMA = 'public';
        END IF;
        INSERT INTO public.worker_processed_commands_{into} ({COLUMNS})
        VALUES (NEW.command_id, NEW.kind, NEW.call_uuid, NEW.outcome,
                coalesce(NEW.processed_at, now()), NEW.service_account_uuid);"""


FUNCTIONS = f"""
CREATE FUNCTION calls_worker_record_processed() RETURNS trigger
LANGUAGE plpgsql {DEFINER} AS $$
DECLARE
    into_b boolean;
BEGIN
    -- Shared: writes of one turn run together; a swap waits for them (see the docstring).
    PERFORM pg_catalog.pg_advisory_xact_lock_shared({LOCK});
    -- A statement of its own, after the lock: it reads the turn the swap committed.
    SELECT r.current_table = 'b' INTO into_b FROM public.worker_processed_rotation r;
    IF into_b THEN{_write("b", "a")}
    ELSE{_write("a", "b")}
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER worker_processed_commands_write
    INSTEAD OF INSERT ON worker_processed_commands
    FOR EACH ROW EXECUTE FUNCTION calls_worker_record_processed();

-- One step of a rotation; call it until it says 'swapped' or 'not due':
-- 'emptied'  the previous table was emptied (commit, then call again to swap);
-- 'swapped'  the empty previous table is current now;
-- 'not due'  the current table has not been current for keep yet.
-- Never holds up the commands for long (lock_timeout): the next hourly run tries again.
CREATE FUNCTION calls_worker_rotate_processed_commands(keep interval) RETURNS text
LANGUAGE plpgsql {DEFINER} SET lock_timeout = '2s' AS $$
{rotation_body("keep", LOCK)}
$$;
"""

DEFINERS = (
    "calls_worker_record_processed()",
    "calls_worker_rotate_processed_commands(interval)",
)

# Whatever a role was granted on the table before (the worker's DELETE for pruning): the
# records are now written through the view and forgotten only by the rotation.
REVOKE_OLD_GRANTS = """
DO $$
DECLARE
    grantee text;
BEGIN
    FOR grantee IN
        SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                             ELSE pg_catalog.quote_ident(r.rolname) END
        FROM pg_catalog.pg_class c
        CROSS JOIN LATERAL pg_catalog.aclexplode(c.relacl) a
        LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
        WHERE c.oid = 'public.worker_processed_commands_a'::regclass
          AND a.grantee <> c.relowner
    LOOP
        EXECUTE 'REVOKE ALL ON public.worker_processed_commands_a FROM ' || grantee;
    END LOOP;
END;
$$;
"""

DOWNGRADE = f"""
DROP TRIGGER worker_processed_commands_write ON worker_processed_commands;
DROP VIEW worker_processed_commands;
DROP FUNCTION calls_worker_rotate_processed_commands(interval);
DROP FUNCTION calls_worker_record_processed();
INSERT INTO worker_processed_commands_a ({COLUMNS})
    SELECT {COLUMNS} FROM worker_processed_commands_b
    ON CONFLICT (command_id) DO NOTHING;
DROP TABLE worker_processed_commands_b;
DROP TABLE worker_processed_rotation;
ALTER TABLE worker_processed_commands_a RENAME TO worker_processed_commands;
CREATE INDEX worker_processed_commands_processed_at_idx
    ON worker_processed_commands (processed_at);
"""


def upgrade() -> None:
    # One transaction: a worker's insert finds either the table or the view, never neither.
    op.execute(TABLES)
    op.execute(REVOKE_OLD_GRANTS)
    op.execute(VIEW)
    op.execute(FUNCTIONS)
    for function in DEFINERS:
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")


def downgrade() -> None:
    op.execute(DOWNGRADE)
