"""What the worker needs of the Calls API's five tables, and a check of a database against it.

The API owns ``organizations``, ``persons``, ``pledge_cases``, ``calls`` and
``call_attempts`` (docs/database.md). Where they exist already, ``migrate`` adopts them:
it first checks that every column the worker reads or writes is there, of a type it can
use, nullable where the worker writes NULL and not null where it reads a value, and that
the foreign keys it relies on (a missing person is a ``not_found``) exist. Anything else
of the API's (other columns, constraints, indexes, names) is the API's business.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, text

API_TABLES = ("organizations", "persons", "pledge_cases", "calls", "call_attempts")

UUID = frozenset({"uuid"})
TEXT = frozenset({"text", "character varying"})
INTEGER = frozenset({"integer", "bigint", "smallint"})
TIMESTAMPTZ = frozenset({"timestamp with time zone"})
JSONB = frozenset({"jsonb"})


@dataclass(frozen=True)
class Column:
    """A column the worker uses: its acceptable types; ``not_null`` True where the worker
    reads a value it cannot do without, False where it writes NULL, None where either will
    do; the table and column it must reference, if any."""

    name: str
    types: frozenset[str]
    not_null: bool | None = None
    references: tuple[str, str] | None = None


CONTRACT: dict[str, tuple[Column, ...]] = {
    "organizations": (
        Column("uuid", UUID, True),
        Column("name", TEXT),
        Column("max_call_attempts", INTEGER, False),
    ),
    "persons": (
        Column("uuid", UUID, True),
        Column("owning_organization_uuid", UUID, references=("organizations", "uuid")),
    ),
    "pledge_cases": (
        Column("uuid", UUID, True),
        Column("person_uuid", UUID, references=("persons", "uuid")),
    ),
    "calls": (
        Column("uuid", UUID, True),
        Column("status", TEXT, True),
        Column("type", TEXT, True),
        Column("person_uuid", UUID, True, references=("persons", "uuid")),
        Column("pledge_case_uuid", UUID, False, references=("pledge_cases", "uuid")),
        Column("organization_uuid", UUID, True, references=("organizations", "uuid")),
        Column("requested_by", UUID, False),
        Column("result", TEXT, False),
        Column("notes", TEXT, False),
        Column("external_metadata", JSONB, False),
        Column("created_at", TIMESTAMPTZ, True),
        Column("updated_at", TIMESTAMPTZ, True),
        Column("completed_at", TIMESTAMPTZ, False),
        Column("cancelled_at", TIMESTAMPTZ, False),
        Column("expired_at", TIMESTAMPTZ, False),
    ),
    "call_attempts": (
        Column("uuid", UUID, True),
        Column("call_uuid", UUID, True, references=("calls", "uuid")),
        Column("user_uuid", UUID, True),
        Column("attempted_at", TIMESTAMPTZ, True),
    ),
}

_COLUMNS = text(
    "SELECT table_name, column_name, data_type, is_nullable = 'NO' AS not_null"
    " FROM information_schema.columns"
    " WHERE table_schema = current_schema() AND table_name = ANY (:tables)"
)
# Single-column foreign keys, and single-column unique keys (a primary key is one).
_FOREIGN_KEYS = text(
    "SELECT c.conrelid::regclass::text AS table_name, a.attname AS column_name,"
    " c.confrelid::regclass::text AS target_table, fa.attname AS target_column"
    " FROM pg_constraint c"
    " JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]"
    " JOIN pg_attribute fa ON fa.attrelid = c.confrelid AND fa.attnum = c.confkey[1]"
    " WHERE c.contype = 'f' AND cardinality(c.conkey) = 1"
    " AND c.connamespace = current_schema()::regnamespace"
)
_UNIQUE_KEYS = text(
    "SELECT c.conrelid::regclass::text AS table_name, a.attname AS column_name"
    " FROM pg_constraint c"
    " JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]"
    " WHERE c.contype IN ('p', 'u') AND cardinality(c.conkey) = 1"
    " AND c.connamespace = current_schema()::regnamespace"
)


def present_tables(connection: Connection) -> set[str]:
    """Which of the API's five tables exist in the current schema."""
    rows = connection.execute(
        text("SELECT table_name FROM information_schema.tables"
             " WHERE table_schema = current_schema() AND table_name = ANY (:tables)"),
        {"tables": list(API_TABLES)},
    )  # fmt: skip
    return {row.table_name for row in rows}


def mismatches(connection: Connection) -> list[str]:
    """Every way the database breaks the contract, one line each (empty: it holds).

    Reads the catalog only; changes nothing.
    """
    columns = {
        (row.table_name, row.column_name): row
        for row in connection.execute(_COLUMNS, {"tables": list(API_TABLES)})
    }
    foreign_keys = {
        (row.table_name, row.column_name): (row.target_table, row.target_column)
        for row in connection.execute(_FOREIGN_KEYS)
    }
    unique = {(row.table_name, row.column_name) for row in connection.execute(_UNIQUE_KEYS)}
    present = present_tables(connection)
    problems = []
    for table, wanted in CONTRACT.items():
        if table not in present:
            problems.append(f"table {table} is missing")
            continue
        if (table, "uuid") not in unique:
            problems.append(f"{table}.uuid is not a primary or unique key")
        for column in wanted:
            found = columns.get((table, column.name))
            where = f"{table}.{column.name}"
            if found is None:
                problems.append(f"column {where} is missing")
                continue
            if found.data_type not in column.types:
                needed = " or ".join(sorted(column.types))
                problems.append(f"{where} is {found.data_type}; the worker needs {needed}")
            if column.not_null is True and not found.not_null:
                problems.append(f"{where} may be NULL; the worker needs a value there")
            if column.not_null is False and found.not_null:
                problems.append(f"{where} is NOT NULL; the worker writes NULL there")
            if column.references and foreign_keys.get((table, column.name)) != column.references:
                target = ".".join(column.references)
                problems.append(f"{where} has no foreign key to {target}")
    return problems
