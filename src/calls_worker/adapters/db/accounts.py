"""Service accounts as commands and listings read them (``worker_service_accounts``); the
directory (directory.py) adds, lists and disables them."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from sqlalchemy import Engine, text

from calls_worker.domain.access import ServiceAccount
from calls_worker.service.unit_of_work import ServiceAccounts

from .transaction import OnTransaction

# One account by its uuid, in the named style psycopg and SQLAlchemy both take (the unit
# of work binds it on the client, the listing's reader through SQLAlchemy).
_SERVICE_ACCOUNT = (
    "SELECT uuid, name, organization_uuid, scopes, disabled_at, certificate_sha256"
    " FROM worker_service_accounts WHERE uuid = {uuid}"
)


class SqlServiceAccounts(OnTransaction, ServiceAccounts):
    def get(self, uuid: UUID) -> ServiceAccount | None:
        row = self._transaction.read(_SERVICE_ACCOUNT.format(uuid="%(uuid)s"), {"uuid": uuid})
        return None if row is None else service_account_from_row(row)


def service_account_from_row(row: Any) -> ServiceAccount:
    return ServiceAccount(
        uuid=row.uuid,
        name=row.name,
        organization_uuid=row.organization_uuid,
        scopes=frozenset(row.scopes),
        disabled_at=row.disabled_at,
        certificate_sha256=row.certificate_sha256,
    )




def service_account(engine: Engine, uuid: UUID) -> ServiceAccount | None:
    """The account as it is now, on a connection of its own (a listing's caller)."""
    with engine.connect() as connection:
        row = connection.execute(text(_SERVICE_ACCOUNT.format(uuid=":uuid")),
                                 {"uuid": uuid}).one_or_none()  # fmt: skip
    return None if row is None else service_account_from_row(row)

