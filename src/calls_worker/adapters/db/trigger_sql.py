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
