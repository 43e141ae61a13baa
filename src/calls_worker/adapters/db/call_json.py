"""A call as JSON in SQL, exactly as ``outcome.call_json`` writes it in Python: what the
sweep's events carry, and what the tests compare the database with."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, case, func, literal_column, select
from sqlalchemy.dialects.postgresql import aggregate_order_by

from .tables import call_attempts


def iso_timestamp(column: Any) -> ColumnElement[str]:
    """A timestamp as ``outcome.call_json`` writes it (Python's ``isoformat`` in UTC: no
    fraction when there is none, else six digits), so an event the sweep writes in SQL
    reads exactly as one a command writes in Python. NULL stays NULL."""
    utc = func.timezone("UTC", column)
    return case(
        (func.date_trunc("second", utc) == utc,
         func.to_char(utc, literal_column("""'YYYY-MM-DD"T"HH24:MI:SS"+00:00"'"""))),
        else_=func.to_char(utc, literal_column("""'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'""")),
    )  # fmt: skip


def key(name: str) -> Any:
    """A JSON key in SQL, as a literal (a bound parameter's type could not be told)."""
    return literal_column(f"'{name}'")


def call_json_sql(call: Any) -> ColumnElement[Any]:
    """``outcome.call_json`` in SQL, over a row of ``calls`` (a table or a CTE with its
    columns): the call with its attempts, in the order commands load them."""
    a = call_attempts.alias("a")
    attempt = func.json_build_object(
        key("userUuid"), a.c.user_uuid, key("attemptedAt"), iso_timestamp(a.c.attempted_at)
    )
    attempts = (
        select(
            func.coalesce(
                func.json_agg(aggregate_order_by(attempt, a.c.attempted_at, a.c.uuid)),
                literal_column("'[]'::json"),
            )
        )
        .where(a.c.call_uuid == call.c.uuid)
        .scalar_subquery()
    )
    fields: list[Any] = [
        ("uuid", call.c.uuid),
        ("status", call.c.status),
        ("type", call.c.type),
        ("attempts", attempts),
        ("attemptCount", call.c.attempt_count),
        ("result", call.c.result),
        ("notes", call.c.notes),
        ("requestedBy", call.c.requested_by),
        ("personUuid", call.c.person_uuid),
        ("pledgeCaseUuid", call.c.pledge_case_uuid),
        ("organizationUuid", call.c.organization_uuid),
        ("externalMetadata", call.c.external_metadata),
        ("createdAt", iso_timestamp(call.c.created_at)),
        ("updatedAt", iso_timestamp(call.c.updated_at)),
        ("completedAt", iso_timestamp(call.c.completed_at)),
        ("cancelledAt", iso_timestamp(call.c.cancelled_at)),
        ("expiredAt", iso_timestamp(call.c.expired_at)),
    ]
    return func.json_build_object(*[part for name, value in fields for part in (key(name), value)])


