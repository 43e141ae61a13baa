"""A seeded world on the real database: organizations, persons, pledge cases, calls.

Seeding is plain SQL, as the Calls API writes; commands go through the worker's handlers.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

from sqlalchemy import Engine, text

from calls_worker.adapters.db.unit_of_work import SqlUnitOfWork
from calls_worker.domain.commands import CommandKind, parse_command
from calls_worker.domain.outcome import Outcome
from calls_worker.service.apply import handle

ISSUED = "2026-03-01T09:00:00+00:00"
EARLIER = datetime(2026, 2, 1, tzinfo=UTC)


class Db:
    """Plain-SQL seeding (as the API would write) plus the worker's handlers."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def sql(self, statement: str, **params: Any) -> Any:
        with self.engine.begin() as connection:
            return connection.execute(text(statement), params)

    def organization(self, max_call_attempts: int | None = 3) -> UUID:
        uuid = uuid4()
        self.sql(
            "INSERT INTO organizations (uuid, name, max_call_attempts) VALUES (:u, 'org', :m)",
            u=uuid,
            m=max_call_attempts,
        )
        return uuid

    def person(self, owning_organization: UUID) -> UUID:
        uuid = uuid4()
        self.sql(
            "INSERT INTO persons (uuid, owning_organization_uuid) VALUES (:u, :o)",
            u=uuid,
            o=owning_organization,
        )
        return uuid

    def pledge_case(self, person: UUID) -> UUID:
        uuid = uuid4()
        self.sql("INSERT INTO pledge_cases (uuid, person_uuid) VALUES (:u, :p)", u=uuid, p=person)
        return uuid

    def call(
        self,
        person: UUID,
        organization: UUID,
        *,
        status: str = "requested",
        external: bool = False,
        attempts: int = 0,
    ) -> UUID:
        """A call as the API inserts it, with its attempts inserted one by one in plain SQL."""
        uuid = uuid4()
        self.sql(
            "INSERT INTO calls (uuid, status, person_uuid, organization_uuid, external_metadata,"
            " created_at, updated_at) VALUES (:u, :s, :p, :o, :e, :t, :t)",
            u=uuid,
            s=status,
            p=person,
            o=organization,
            e='{"source": "crm"}' if external else None,
            t=EARLIER,
        )
        for _ in range(attempts):
            self.plain_attempt(uuid)
        return uuid

    def plain_attempt(self, call: UUID) -> None:
        self.sql(
            "INSERT INTO call_attempts (call_uuid, user_uuid, attempted_at) VALUES (:c, :u, :t)",
            c=call,
            u=uuid4(),
            t=EARLIER,
        )

    def row(self, call: UUID) -> dict[str, Any]:
        return dict(self.sql("SELECT * FROM calls WHERE uuid = :u", u=call).mappings().one())

    def attempt_rows(self, call: UUID) -> int:
        return int(
            self.sql("SELECT count(*) FROM call_attempts WHERE call_uuid = :u", u=call).scalar()
        )

    def events(self, call: UUID | None = None) -> list[dict[str, Any]]:
        """The call events kept (of ``call``, or all), in ``seq`` order, as published."""
        from calls_worker.adapters.db.events import kept_events

        return kept_events(self.engine, call_uuid=call)

    def send(
        self, kind: CommandKind, payload: dict[str, Any], command_id: str | None = None
    ) -> Outcome:
        command = parse_command(kind, payload)
        return handle(command_id or str(uuid4()), command, SqlUnitOfWork(self.engine))
