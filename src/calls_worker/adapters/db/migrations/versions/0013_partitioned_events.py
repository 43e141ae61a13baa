"""The outbox of call events, partitioned by the hour; old hours dropped whole.

Until now ``calls.prune`` deleted published events row by row (batches of 10,000 found by a
BRIN index): at 1,000 commands a second, 3.6 million deletes an hour, their WAL and the
VACUUM after them. Now ``worker_call_events`` is partitioned by range of ``recorded_at``
(native partitioning, nothing to install), one partition an hour, named
``worker_call_events_YYYYMMDDHH`` (UTC).

``calls_worker_prune_call_events()``, run by ``calls.prune`` and by ``migrate``, creates the
partitions of this hour and the next 6 and drops, whole, each partition whose hour ended
longer ago than the retention and that holds no event unpublished or published within the
retention. The retention is the owner's: ``worker_call_events_retention.keep``, which
``migrate`` sets from CALLS_WORKER_EVENTS_RETENTION_HOURS; the worker's role reads it and
cannot change it, and calling the function cannot shorten it (as 0011 did for outcomes).

- A default partition takes what no hourly one does (the prune not run for a day, a clock
  far off, a row moved into the past); the function deletes its published events past the
  retention row by row, as before. An hourly partition is not created over a range the
  default one holds rows of.
- ``seq`` comes from a sequence of its own (``worker_call_events_seq``), carried on from the
  identity's last value: numbers go on rising, and a call's events keep their order.
- The primary key is ``(seq, recorded_at)``, as partitioning requires. The relay marks by
  both, so that each mark reads only the partitions it concerns.
- The BRIN index is on ``published_at`` now (``recorded_at`` is the partition key): it finds
  an old partition's late publications without reading the partition.
- The events already written stay, in the old table, attached as the partition of
  everything before the first hour (or dropped, when it holds none): dropped whole too,
  once all of it is past the retention. Attaching scans it once and builds its key.

Revision ID: 0013
Revises: 0012
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

SEARCH_PATH = "pg_catalog, public, pg_temp"
LEGACY = "worker_call_events_before_0013"

COLUMNS = """
    event_id uuid NOT NULL,
    kind text NOT NULL CONSTRAINT worker_call_events_kind_check CHECK (kind IN (
        'call.created', 'call.attempt_added', 'call.completed', 'call.cancelled',
        'call.expired')),
    occurred_at timestamptz NOT NULL,
    call_uuid uuid NOT NULL,
    organization_uuid uuid NOT NULL,
    owning_organization_uuid uuid NULL,
    call json NOT NULL,
    expiry json NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz NULL"""
NAMES = ("seq, event_id, kind, occurred_at, call_uuid, organization_uuid,"
         " owning_organization_uuid, call, expiry, recorded_at, published_at")  # fmt: skip

PRUNE = f"""
CREATE FUNCTION calls_worker_prune_call_events() RETURNS json
LANGUAGE plpgsql SECURITY DEFINER SET search_path = {SEARCH_PATH} SET lock_timeout = '2s'
AS $$
DECLARE
    keep interval := (SELECT r.keep FROM public.worker_call_events_retention r);
    this_hour timestamptz := pg_catalog.date_trunc('hour', now(), 'UTC');
    low timestamptz;
    name text;
    part record;
    held boolean;
    created int := 0;
    dropped int := 0;
    dropped_rows bigint := 0;
    kept int := 0;
    gone regclass[] := '{{}}';
    gone_rows bigint[] := '{{}}';
    busy int := 0;
    deleted bigint := 0;
BEGIN
    -- The table's partitions are made and dropped last, together: each takes the whole
    -- table's ACCESS EXCLUSIVE lock until the commit, so every command writing an event
    -- waits while it is held. What reads or deletes rows comes first, without it.
    -- What the default partition caught, row by row as before.
    WITH forgotten AS (
        DELETE FROM public.worker_call_events_default d
        WHERE d.recorded_at < now() - keep AND d.published_at < now() - keep
        RETURNING 1)
    SELECT pg_catalog.count(*) INTO deleted FROM forgotten;
    -- Behind: whole partitions past the retention, oldest first, when nothing in them is
    -- unpublished (the partial index) or was published within it (the BRIN index). None
    -- of that can change before the drop: events are recorded at now(), and only an
    -- unpublished one is marked.
    FOR part IN
        SELECT c.oid::regclass AS relation, c.reltuples,
               pg_catalog.substring(pg_catalog.pg_get_expr(c.relpartbound, c.oid),
                                    'TO \\(''([^'']*)''\\)')::timestamptz AS upper_bound
        FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'public.worker_call_events'::regclass
          AND c.relname <> 'worker_call_events_default'
        ORDER BY 3
    LOOP
        CONTINUE WHEN part.upper_bound IS NULL;  -- not a bound this function made
        EXIT WHEN part.upper_bound > now() - keep;
        EXECUTE pg_catalog.format(
            'SELECT EXISTS (SELECT 1 FROM %s WHERE published_at IS NULL)'
            ' OR EXISTS (SELECT 1 FROM %s WHERE published_at >= %L)',
            part.relation, part.relation, now() - keep) INTO STRICT held;
        IF held THEN
            kept := kept + 1;
        ELSE
            gone := gone || part.relation;
            gone_rows := gone_rows || greatest(part.reltuples, 0)::bigint;
        END IF;
    END LOOP;
    -- Ahead: this hour and the next 6, each unless a partition (the default one, or the
    -- events from before 0013) holds rows of it already.
    FOR n IN 0..6 LOOP
        low := this_hour + pg_catalog.make_interval(hours => n);
        name := 'worker_call_events_'
            || pg_catalog.to_char(low AT TIME ZONE 'UTC', 'YYYYMMDDHH24');
        CONTINUE WHEN pg_catalog.to_regclass('public.' || name) IS NOT NULL;
        BEGIN
            EXECUTE pg_catalog.format(
                'CREATE TABLE public.%I PARTITION OF public.worker_call_events'
                ' FOR VALUES FROM (%L) TO (%L)', name, low, low + interval '1 hour');
            created := created + 1;
        EXCEPTION
            WHEN invalid_object_definition OR check_violation THEN NULL;  -- overlaps
            WHEN lock_not_available THEN busy := busy + 1;
        END;
    END LOOP;
    FOR n IN 1..pg_catalog.cardinality(gone) LOOP
        BEGIN
            EXECUTE pg_catalog.format('DROP TABLE %s', gone[n]);
            dropped := dropped + 1;
            dropped_rows := dropped_rows + gone_rows[n];
        EXCEPTION WHEN lock_not_available THEN
            busy := busy + 1;
        END;
    END LOOP;
    RETURN pg_catalog.json_build_object(
        'created', created, 'dropped', dropped, 'droppedRowsEstimate', dropped_rows,
        'held', kept, 'busy', busy, 'deleted', deleted);
END
$$;
REVOKE ALL ON FUNCTION calls_worker_prune_call_events() FROM PUBLIC;
"""

UPGRADE = f"""
ALTER TABLE worker_call_events RENAME TO {LEGACY};
ALTER INDEX worker_call_events_pkey RENAME TO {LEGACY}_pkey;
ALTER INDEX worker_call_events_unpublished_idx RENAME TO {LEGACY}_unpublished_idx;
ALTER INDEX worker_call_events_call_idx RENAME TO {LEGACY}_call_idx;
DROP INDEX worker_call_events_recorded_idx;
CREATE SEQUENCE worker_call_events_seq;
SELECT pg_catalog.setval('worker_call_events_seq', coalesce(
    pg_catalog.pg_sequence_last_value(pg_catalog.pg_get_serial_sequence('{LEGACY}', 'seq')
                                      ::regclass), 0) + 1, false);
ALTER TABLE {LEGACY} ALTER COLUMN seq DROP IDENTITY;
CREATE TABLE worker_call_events (
    seq bigint NOT NULL DEFAULT nextval('worker_call_events_seq'),{COLUMNS},
    PRIMARY KEY (seq, recorded_at)
) PARTITION BY RANGE (recorded_at);
ALTER SEQUENCE worker_call_events_seq OWNED BY worker_call_events.seq;
CREATE INDEX worker_call_events_unpublished_idx
    ON worker_call_events (seq) WHERE published_at IS NULL;
CREATE INDEX worker_call_events_call_idx ON worker_call_events (call_uuid, seq);
CREATE INDEX worker_call_events_published_idx
    ON worker_call_events USING brin (published_at);
CREATE TABLE worker_call_events_default PARTITION OF worker_call_events DEFAULT;
CREATE TABLE worker_call_events_retention (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    keep interval NOT NULL DEFAULT interval '72 hours' CHECK (keep >= interval '0')
);
INSERT INTO worker_call_events_retention DEFAULT VALUES;
DO $$
DECLARE
    cut timestamptz;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM {LEGACY}) THEN
        DROP TABLE {LEGACY};
        RETURN;
    END IF;
    -- Every row written so far (this migration holds the table), into the next hour.
    cut := pg_catalog.date_trunc('hour', greatest(now(),
        (SELECT max(recorded_at) FROM {LEGACY})), 'UTC') + interval '1 hour';
    -- Its key becomes the partitioned table's, (seq, recorded_at), built by the attach.
    ALTER TABLE {LEGACY} DROP CONSTRAINT {LEGACY}_pkey;
    EXECUTE pg_catalog.format('ALTER TABLE {LEGACY} ADD CONSTRAINT {LEGACY}_bound'
        ' CHECK (recorded_at IS NOT NULL AND recorded_at < %L)', cut);
    EXECUTE pg_catalog.format('ALTER TABLE worker_call_events ATTACH PARTITION {LEGACY}'
        ' FOR VALUES FROM (MINVALUE) TO (%L)', cut);
END
$$;
"""

DOWNGRADE = f"""
DROP FUNCTION calls_worker_prune_call_events();
ALTER TABLE worker_call_events RENAME TO worker_call_events_partitioned;
ALTER INDEX worker_call_events_pkey RENAME TO worker_call_events_partitioned_pkey;
ALTER INDEX worker_call_events_unpublished_idx
    RENAME TO worker_call_events_partitioned_unpublished_idx;
ALTER INDEX worker_call_events_call_idx RENAME TO worker_call_events_partitioned_call_idx;
CREATE TABLE worker_call_events (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,{COLUMNS}
);
INSERT INTO worker_call_events ({NAMES}) OVERRIDING SYSTEM VALUE
    SELECT {NAMES} FROM worker_call_events_partitioned ORDER BY seq;
SELECT pg_catalog.setval(pg_catalog.pg_get_serial_sequence('worker_call_events', 'seq'),
    pg_catalog.nextval('worker_call_events_seq'), false);
DROP TABLE worker_call_events_partitioned;
DROP TABLE worker_call_events_retention;
CREATE INDEX worker_call_events_unpublished_idx
    ON worker_call_events (seq) WHERE published_at IS NULL;
CREATE INDEX worker_call_events_call_idx ON worker_call_events (call_uuid, seq);
CREATE INDEX worker_call_events_recorded_idx ON worker_call_events USING brin (recorded_at);
"""


def upgrade() -> None:
    op.execute(UPGRADE)
    op.execute(PRUNE)
    op.execute("SELECT calls_worker_prune_call_events()")  # this hour's and the next ones


def downgrade() -> None:
    op.execute(DOWNGRADE)
