"""``calls-worker organizations|persons|pledge-cases|calls``: the rows a call points at.

In production the Calls API writes organizations, persons and pledge cases; these commands
are for the embedded database (the walkthrough in the README), for tests and for
operators who need to look. Each ``add`` prints the new uuid alone, so a shell can keep it:
``ORG=$(calls-worker organizations add --name Acme --max-attempts 3)``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import click

from calls_worker.cli.output import Group, output_options, print_json, show_rows, table, wants_json
from calls_worker.cli.params import TEXT, Certificate
from calls_worker.cli.servers import Servers
from calls_worker.config import get_settings
from calls_worker.domain.access import SCOPES
from calls_worker.domain.commands import DEFAULT_PAGE, MAX_PAGE
from calls_worker.domain.model import CallStatus, CallType


@contextmanager
def database_engine() -> Iterator[Any]:
    from calls_worker.adapters.db.engine import build_engine

    servers = Servers(get_settings())
    engine = build_engine(servers.database_url(), pool_size=1)
    try:
        yield engine
    finally:
        engine.dispose()
        servers.stop()


def _add(write: Callable[[Any], UUID], missing: str) -> None:
    """Run ``write`` and print the new uuid. A missing referenced row says which (exit 1);
    any other refusal by the database says what it refused and why (exit 2)."""
    from sqlalchemy.exc import IntegrityError

    with database_engine() as engine:
        try:
            click.echo(str(write(engine)))
        except IntegrityError as error:
            diag = getattr(error.orig, "diag", None)
            if getattr(error.orig, "sqlstate", None) == "23503":  # foreign_key_violation
                click.echo(f"Error: {missing}", err=True)
                sys.exit(1)
            why = getattr(diag, "message_primary", None) or str(error.orig).splitlines()[0]
            detail = getattr(diag, "message_detail", None)
            click.echo(f"Error: the database refused it: {why}"
                       + (f" ({detail})" if detail else ""), err=True)  # fmt: skip
            sys.exit(2)


def _max_attempts(value: int | None) -> int | None:
    """The worker's schema holds a maximum to more than 0 (docs/domain.md): said here, not
    left to the database's refusal."""
    if value is not None and value < 1:
        raise click.BadParameter(
            f"{value}: a maximum is 1 attempt or more (a call at 0 would expire before its"
            " first attempt); for no limit, leave --max-attempts out"
        )
    return value


@click.group(cls=Group)
def organizations() -> None:
    """Organizations: a person's owning organization sets how many attempts its calls get."""


@organizations.command(name="add")
@click.option("--name", type=TEXT, required=True)
@click.option(
    "--max-attempts",
    type=int,
    callback=lambda _ctx, _param, value: _max_attempts(value),
    default=None,
    help="The maximum number of attempts for calls of the persons it owns (none: no limit).",
)
def organizations_add(name: str, max_attempts: int | None) -> None:
    """Add an organization; prints its uuid."""
    from calls_worker.adapters.db.directory import add_organization

    _add(lambda engine: add_organization(engine, name, max_attempts), "not added")


@organizations.command(name="list")
@output_options
def organizations_list(as_json: bool, as_table: bool) -> None:
    """Every organization."""
    from calls_worker.adapters.db.directory import list_organizations

    with database_engine() as engine:
        rows = list_organizations(engine)
    show_rows(rows, ["uuid", "name", "maxCallAttempts"], as_json, as_table)


@click.group(cls=Group)
def persons() -> None:
    """Persons, each owned by an organization (whose maximum applies to their calls)."""


@persons.command(name="add")
@click.option("--organization", type=click.UUID, required=True, help="The owning organization.")
def persons_add(organization: UUID) -> None:
    """Add a person owned by ORGANIZATION; prints its uuid."""
    from calls_worker.adapters.db.directory import add_person

    _add(lambda engine: add_person(engine, organization),
         f"no organization {organization}")  # fmt: skip


@persons.command(name="list")
@click.option("--organization", type=click.UUID, default=None)
@output_options
def persons_list(organization: UUID | None, as_json: bool, as_table: bool) -> None:
    """Persons (of one owning organization)."""
    from calls_worker.adapters.db.directory import list_persons

    with database_engine() as engine:
        rows = list_persons(engine, organization)
    show_rows(rows, ["uuid", "owningOrganizationUuid"], as_json, as_table)


@click.group(cls=Group, name="pledge-cases")
def pledge_cases() -> None:
    """Pledge cases, each of a person; a call may name one of its person's."""


@pledge_cases.command(name="add")
@click.option("--person", type=click.UUID, required=True)
def pledge_cases_add(person: UUID) -> None:
    """Add a pledge case of PERSON; prints its uuid."""
    from calls_worker.adapters.db.directory import add_pledge_case

    _add(lambda engine: add_pledge_case(engine, person), f"no person {person}")


@pledge_cases.command(name="list")
@click.option("--person", type=click.UUID, default=None)
@output_options
def pledge_cases_list(person: UUID | None, as_json: bool, as_table: bool) -> None:
    """Pledge cases (of one person)."""
    from calls_worker.adapters.db.directory import list_pledge_cases

    with database_engine() as engine:
        rows = list_pledge_cases(engine, person)
    show_rows(rows, ["uuid", "personUuid"], as_json, as_table)


@click.group(cls=Group)
def calls() -> None:
    """Calls, as stored."""


def _acting(engine: Any, account: UUID | None) -> Any:
    """The service account ``--as`` names, if it may read (else exit 1 saying why)."""
    from calls_worker.adapters.db.listing import SqlCallReader
    from calls_worker.domain import access
    from calls_worker.domain.errors import Forbidden

    if account is None:
        return None
    stored = SqlCallReader(engine).service_account(account)
    try:
        return access.authorize(access.OPEN, access.Caller(account), stored, "calls:read")
    except Forbidden as error:
        click.echo(f"Error: {error.message}", err=True)
        sys.exit(1)


AS_OPTION = click.option(
    "--as", "account", type=click.UUID, default=None,
    help="Only what this service account reaches (it needs calls:read).",
)  # fmt: skip


@calls.command(name="show")
@click.argument("call", type=click.UUID)
@AS_OPTION
def calls_show(call: UUID, account: UUID | None) -> None:
    """The call, its attempts, the maximum that applies to it and since when it is due."""
    from calls_worker.adapters.db.directory import show_call
    from calls_worker.domain.access import reaches_call

    with database_engine() as engine:
        acting = _acting(engine, account)
        shown = show_call(engine, call)
    if shown is None or not reaches_call(
        acting, shown["organizationUuid"], shown["owningOrganizationUuid"]
    ):
        click.echo(f"Error: no call {call}", err=True)
        sys.exit(1)
    print_json(shown)


_COLUMNS = ["createdAt", "uuid", "status", "type", "attemptCount", "organizationUuid",
            "personUuid"]  # fmt: skip


@calls.command(name="list")
@click.option("--organization", type=click.UUID, default=None, help="Performed by it.")
@click.option("--person", type=click.UUID, default=None)
@click.option("--status", type=click.Choice([s.value for s in CallStatus]), default=None)
@click.option("--type", "call_type", type=click.Choice([t.value for t in CallType]), default=None)
@click.option("--limit", type=click.IntRange(1, MAX_PAGE), default=DEFAULT_PAGE, show_default=True)
@click.option("--cursor", type=TEXT, default=None, help="Where the previous page said to go on.")
@AS_OPTION
@output_options
def calls_list(organization: UUID | None, person: UUID | None, status: str | None,
               call_type: str | None, limit: int, cursor: str | None, account: UUID | None,
               as_json: bool, as_table: bool) -> None:  # fmt: skip
    """A page of calls, newest first; the command for the next page goes to standard error.

    As JSON: one call a line."""
    import json

    from calls_worker.adapters.db.listing import SqlCallReader
    from calls_worker.domain.access import OPEN
    from calls_worker.domain.commands import parse_list_calls
    from calls_worker.domain.errors import InvalidCommand
    from calls_worker.service.listing import list_calls

    given = {"organizationUuid": organization, "personUuid": person, "status": status,
             "type": call_type, "cursor": cursor, "serviceAccountUuid": account}  # fmt: skip
    query: dict[str, Any] = {k: str(v) for k, v in given.items() if v is not None}
    try:
        parsed = parse_list_calls({**query, "limit": limit})
    except InvalidCommand as error:
        raise click.UsageError(error.message) from None
    with database_engine() as engine:
        page = list_calls(SqlCallReader(engine), parsed, policy=OPEN, signer_sha256=None)
    if not page["ok"]:  # a cursor not made for this query is a bad argument (exit 2)
        click.echo(f"Error: {page['error']['message']}", err=True)
        sys.exit(2 if page["error"]["code"] == "invalid" else 1)
    if wants_json(as_json, as_table):
        for call in page["calls"]:
            click.echo(json.dumps(call, separators=(",", ":")))
    else:
        click.echo(table(page["calls"], _COLUMNS))
    if page["nextCursor"]:
        click.echo(f"next page: --cursor {page['nextCursor']}", err=True)


@click.group(cls=Group, name="service-accounts")
def service_accounts() -> None:
    """Service accounts: each acts for one organization, with scopes (docs/domain.md)."""


@service_accounts.command(name="add")
@click.option("--name", type=TEXT, required=True)
@click.option("--organization", type=click.UUID, required=True, help="The one it represents.")
@click.option("--scope", "scopes", multiple=True, required=True,
              type=click.Choice(list(SCOPES)), help="Repeat for each scope.")  # fmt: skip
@click.option("--certificate", type=Certificate(), default=None,
              help="PEM certificate it signs with (needed where messages are signed).")  # fmt: skip
def service_accounts_add(name: str, organization: UUID, scopes: tuple[str, ...],
                         certificate: Any) -> None:  # fmt: skip
    """Add a service account; prints its uuid."""
    from calls_worker.adapters.db.directory import add_service_account
    from calls_worker.worker.signer import certificate_sha256

    fingerprint = None if certificate is None else certificate_sha256(certificate)
    _add(lambda engine: add_service_account(engine, name, organization, scopes, fingerprint),
         f"no organization {organization}")  # fmt: skip


@service_accounts.command(name="list")
@output_options
def service_accounts_list(as_json: bool, as_table: bool) -> None:
    """Every service account."""
    from calls_worker.adapters.db.directory import list_service_accounts

    with database_engine() as engine:
        rows = list_service_accounts(engine)
    show_rows(rows, ["uuid", "name", "organizationUuid", "scopes", "disabledAt"],
              as_json, as_table)  # fmt: skip


@service_accounts.command(name="disable")
@click.argument("account", type=click.UUID)
def service_accounts_disable(account: UUID) -> None:
    """Disable ACCOUNT: every command it sends from now on, queued already or not, is
    forbidden."""
    from calls_worker.adapters.db.directory import disable_service_account

    with database_engine() as engine:
        found = disable_service_account(engine, account)
    if not found:
        click.echo(f"Error: no service account {account}", err=True)
        sys.exit(1)
    click.echo(f"disabled {account}")


COMMANDS = (organizations, persons, pledge_cases, calls, service_accounts)
