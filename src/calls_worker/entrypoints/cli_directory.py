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

from calls_worker.config import get_settings
from calls_worker.entrypoints.output import print_json
from calls_worker.entrypoints.servers import Servers


@contextmanager
def _engine() -> Iterator[Any]:
    from calls_worker.adapters.db.engine import build_engine

    servers = Servers(get_settings())
    engine = build_engine(servers.database_url(), pool_size=1)
    try:
        yield engine
    finally:
        engine.dispose()
        servers.stop()


def _add(write: Callable[[Any], UUID], missing: str) -> None:
    """Run ``write`` and print the new uuid; a missing referenced row is a clear error."""
    from sqlalchemy.exc import IntegrityError

    with _engine() as engine:
        try:
            click.echo(str(write(engine)))
        except IntegrityError:
            click.echo(f"Error: {missing}", err=True)
            sys.exit(1)


@click.group()
def organizations() -> None:
    """Organizations: a person's owning organization sets how many attempts its calls get."""


@organizations.command(name="add")
@click.option("--name", required=True)
@click.option(
    "--max-attempts",
    type=int,
    default=None,
    help="The maximum number of attempts for calls of the persons it owns (none: no limit).",
)
def organizations_add(name: str, max_attempts: int | None) -> None:
    """Add an organization; prints its uuid."""
    from calls_worker.adapters.db.directory import add_organization

    _add(lambda engine: add_organization(engine, name, max_attempts), "not added")


@organizations.command(name="list")
def organizations_list() -> None:
    """Every organization, as JSON."""
    from calls_worker.adapters.db.directory import list_organizations

    with _engine() as engine:
        print_json(list_organizations(engine))


@click.group()
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
def persons_list(organization: UUID | None) -> None:
    """Persons (of one owning organization), as JSON."""
    from calls_worker.adapters.db.directory import list_persons

    with _engine() as engine:
        print_json(list_persons(engine, organization))


@click.group(name="pledge-cases")
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
def pledge_cases_list(person: UUID | None) -> None:
    """Pledge cases (of one person), as JSON."""
    from calls_worker.adapters.db.directory import list_pledge_cases

    with _engine() as engine:
        print_json(list_pledge_cases(engine, person))


@click.group()
def calls() -> None:
    """Calls, as stored."""


@calls.command(name="show")
@click.argument("call", type=click.UUID)
def calls_show(call: UUID) -> None:
    """The call, its attempts, the maximum that applies to it and since when it is due."""
    from calls_worker.adapters.db.directory import show_call

    with _engine() as engine:
        shown = show_call(engine, call)
    if shown is None:
        click.echo(f"Error: no call {call}", err=True)
        sys.exit(1)
    print_json(shown)


COMMANDS = (organizations, persons, pledge_cases, calls)
