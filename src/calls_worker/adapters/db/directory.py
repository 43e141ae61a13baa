"""The rows a call points at, for the embedded database and for operators: organizations,
persons and pledge cases (written by the Calls API in production), and a call as stored.

Plain SQL on the API's tables, as the API writes them: nothing here goes through the
command path, so nothing here is a command with an outcome.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID, uuid4

from sqlalchemy import Engine, text


def _listed(engine: Engine, sql: str, **params: Any) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(text(sql), params)]


def _inserted(engine: Engine, sql: str, **params: Any) -> UUID:
    """A new row's uuid (``:u`` in ``sql``), inserted in a transaction of its own."""
    uuid = uuid4()
    with engine.begin() as connection:
        connection.execute(text(sql), {"u": uuid, **params})
    return uuid


def add_organization(engine: Engine, name: str, max_call_attempts: int | None) -> UUID:
    return _inserted(engine, "INSERT INTO organizations (uuid, name, max_call_attempts)"
                             " VALUES (:u, :n, :m)", n=name, m=max_call_attempts)  # fmt: skip


def list_organizations(engine: Engine) -> list[dict[str, Any]]:
    return _listed(
        engine,
        'SELECT uuid, name, max_call_attempts AS "maxCallAttempts" FROM organizations'
        " ORDER BY name, uuid",
    )


def add_person(engine: Engine, owning_organization: UUID) -> UUID:
    """Raises sqlalchemy's IntegrityError if the organization does not exist."""
    return _inserted(engine, "INSERT INTO persons (uuid, owning_organization_uuid)"
                             " VALUES (:u, :o)", o=owning_organization)  # fmt: skip


def list_persons(engine: Engine, organization: UUID | None) -> list[dict[str, Any]]:
    return _listed(
        engine,
        'SELECT uuid, owning_organization_uuid AS "owningOrganizationUuid" FROM persons'
        " WHERE CAST(:o AS uuid) IS NULL OR owning_organization_uuid = :o ORDER BY uuid",
        o=organization,
    )


def add_pledge_case(engine: Engine, person: UUID) -> UUID:
    """Raises sqlalchemy's IntegrityError if the person does not exist."""
    return _inserted(engine, "INSERT INTO pledge_cases (uuid, person_uuid) VALUES (:u, :p)",
                     p=person)


def list_pledge_cases(engine: Engine, person: UUID | None) -> list[dict[str, Any]]:
    return _listed(
        engine,
        'SELECT uuid, person_uuid AS "personUuid" FROM pledge_cases'
        " WHERE CAST(:p AS uuid) IS NULL OR person_uuid = :p ORDER BY uuid",
        p=person,
    )


def show_call(engine: Engine, call: UUID) -> dict[str, Any] | None:
    """The call as stored, its attempts, the maximum that applies to it (its person's
    owning organization's) and since when it is due, if it is; None if there is none."""
    with engine.connect() as connection:
        row = connection.execute(
            text(
                'SELECT c.uuid, c.status, c.type, c.person_uuid AS "personUuid",'
                ' c.organization_uuid AS "organizationUuid",'
                ' c.pledge_case_uuid AS "pledgeCaseUuid",'
                ' c.external_metadata AS "externalMetadata", c.attempt_count AS "attemptCount",'
                ' p.owning_organization_uuid AS "owningOrganizationUuid",'
                ' o.max_call_attempts AS "maxCallAttempts", d.due_since AS "dueSince",'
                ' c.created_at AS "createdAt", c.updated_at AS "updatedAt",'
                ' c.completed_at AS "completedAt", c.cancelled_at AS "cancelledAt",'
                ' c.expired_at AS "expiredAt"'
                " FROM calls c JOIN persons p ON p.uuid = c.person_uuid"
                " LEFT JOIN organizations o ON o.uuid = p.owning_organization_uuid"
                " LEFT JOIN worker_due_calls d ON d.call_uuid = c.uuid WHERE c.uuid = :c"
            ),
            {"c": call},
        ).one_or_none()
        if row is None:
            return None
        attempts = connection.execute(
            text('SELECT user_uuid AS "userUuid", attempted_at AS "attemptedAt"'
                 " FROM call_attempts WHERE call_uuid = :c ORDER BY attempted_at, uuid"),
            {"c": call},
        )  # fmt: skip
        return {**row._mapping, "attempts": [dict(a._mapping) for a in attempts]}


def add_service_account(
    engine: Engine,
    name: str,
    organization: UUID,
    scopes: Sequence[str],
    certificate_sha256: str | None = None,
) -> UUID:
    """Raises sqlalchemy's IntegrityError if the organization does not exist."""
    return _inserted(
        engine, "INSERT INTO worker_service_accounts"
                " (uuid, name, organization_uuid, scopes, certificate_sha256)"
                " VALUES (:u, :n, :o, :s, :c)",
        n=name, o=organization, s=sorted(set(scopes)), c=certificate_sha256,
    )  # fmt: skip


def list_service_accounts(engine: Engine) -> list[dict[str, Any]]:
    return _listed(
        engine,
        'SELECT uuid, name, organization_uuid AS "organizationUuid", scopes,'
        ' certificate_sha256 AS "certificateSha256", created_at AS "createdAt",'
        ' disabled_at AS "disabledAt" FROM worker_service_accounts ORDER BY name, uuid',
    )


def disable_service_account(engine: Engine, uuid: UUID) -> bool:
    """Disable the account from now on (commands applied later are forbidden); False if
    there is no such account. Disabling one disabled already keeps its first time."""
    with engine.begin() as connection:
        found = connection.execute(
            text("UPDATE worker_service_accounts SET disabled_at = coalesce(disabled_at, now())"
                 " WHERE uuid = :u"),
            {"u": uuid},
        )  # fmt: skip
    return found.rowcount == 1
