"""Pieces of SQL that more than one migration writes into the functions it creates, kept
here once. A migration's text must never change once released (an adopted database holds
the functions it created): tests/unit/test_migration_text.py pins what each renders."""

from __future__ import annotations

# The start of a statement-level trigger on persons (transition tables ``changed`` and
# ``before``): who moved to another owner, nothing to do when nobody did, and the owners
# they left and joined locked (exclusive, in a fixed order) before anything is rechecked.
PERSONS_MOVED = """DECLARE
    moved uuid[];
BEGIN
    moved := ARRAY(
        SELECT n.uuid FROM changed n JOIN before b ON b.uuid = n.uuid
        WHERE n.owning_organization_uuid IS DISTINCT FROM b.owning_organization_uuid);
    IF pg_catalog.cardinality(moved) = 0 THEN
        RETURN NULL;
    END IF;
    PERFORM public.calls_worker_lock_organizations(ARRAY(
        SELECT n.owning_organization_uuid FROM changed n WHERE n.uuid = ANY (moved)
        UNION
        SELECT b.owning_organization_uuid FROM before b WHERE b.uuid = ANY (moved)));"""


def rotation_body(keep: str, lock: str) -> str:
    """The body of ``calls_worker_rotate_processed_commands`` (0008, and 0011's, which reads
    the retention from the table): one step of a rotation, ``keep`` the retention's SQL,
    ``lock`` the advisory lock's key a swap takes."""
    return f"""DECLARE
    turn public.worker_processed_rotation;
    previous_empty boolean;
BEGIN
    SELECT * INTO turn FROM public.worker_processed_rotation FOR UPDATE;
    IF pg_catalog.now() - turn.current_since < {keep} THEN
        RETURN 'not due';
    END IF;
    IF turn.current_table = 'a' THEN
        previous_empty := NOT EXISTS (SELECT FROM public.worker_processed_commands_b);
    ELSE
        previous_empty := NOT EXISTS (SELECT FROM public.worker_processed_commands_a);
    END IF;
    IF NOT previous_empty THEN
        IF turn.current_table = 'a' THEN
            TRUNCATE public.worker_processed_commands_b;
        ELSE
            TRUNCATE public.worker_processed_commands_a;
        END IF;
        RETURN 'emptied';
    END IF;
    PERFORM pg_catalog.pg_advisory_xact_lock({lock});
    UPDATE public.worker_processed_rotation
    SET current_table = CASE current_table WHEN 'a' THEN 'b' ELSE 'a' END,
        previous_since = current_since,
        current_since = pg_catalog.now();
    RETURN 'swapped';
END;"""
