"""The ``calls-worker`` command line."""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import click

from calls_worker.cli import sending
from calls_worker.cli.dead_letters import COMMANDS as DEAD_LETTERS_COMMANDS
from calls_worker.cli.directory import COMMANDS as DIRECTORY_COMMANDS
from calls_worker.cli.events import COMMANDS as EVENTS_COMMANDS
from calls_worker.cli.failures import Main, end_on_signals
from calls_worker.cli.output import print_json
from calls_worker.cli.params import (
    SECONDS,
    TEXT,
    CommandId,
    Kind,
)
from calls_worker.cli.processes import COMMANDS as PROCESS_COMMANDS
from calls_worker.cli.sending import KINDS
from calls_worker.cli.servers import configured, engine_of
from calls_worker.config import signing_of


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="calls-worker", prog_name="calls-worker")
def main() -> None:
    """Consumes call commands and expires calls whose attempts are exhausted.

    With no CALLS_WORKER_DATABASE_URL / CALLS_WORKER_BROKER_URL set, commands use the
    embedded PostgreSQL and Redis kept under CALLS_WORKER_DATA_DIR (.calls-worker).
    """
    end_on_signals()


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for machines.")
def status(as_json: bool) -> None:
    """Whether the database and broker answer, queues, the last sweep, calls waiting.

    Exit status 0 when the database and the broker answer, 1 otherwise.
    """
    from calls_worker.cli.status import gather_status, render_status

    servers = configured()
    try:
        report = gather_status(servers)
    finally:
        servers.stop()
    if as_json:
        print_json(report)
    else:
        click.echo(render_status(report))
    sys.exit(0 if report["database"]["ok"] and report["broker"]["ok"] else 1)


@main.command()
@click.option("--hostname", "-n", type=TEXT, required=True,
              help="The worker's name, e.g. commands@pod-1.")  # fmt: skip
@click.option("--database", is_flag=True, help="Also check that the database answers.")
@click.option("--timeout", type=SECONDS, default=5.0, show_default=True)
def ping(hostname: str, database: bool, timeout: float) -> None:
    """Exit 0 if this worker answers through the broker (a liveness/readiness probe).

    The worker's consumer must be running to answer, so a wedged worker fails the probe.
    """
    from celery import Celery
    from sqlalchemy import text

    from calls_worker.wire import celery_config, enable_signing

    servers = configured()
    broker = servers.broker_url(start=False)
    app = Celery("calls-ping", set_as_current=False)
    app.conf.update(celery_config(broker))  # control messages only: no result backend
    if (signing := signing_of(servers.settings)) is not None:
        enable_signing(app, signing)  # a signing worker accepts only signed control messages
    try:
        replies = app.control.ping(destination=[hostname], timeout=timeout) or []
    finally:
        app.close()
    if not any(hostname in reply for reply in replies):
        raise click.ClickException(f"{hostname} did not answer within {timeout}s")
    if database:
        engine = engine_of(servers)
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        finally:
            engine.dispose()
    click.echo(f"{hostname}: ok")


@main.command()
@click.option(
    "--grant-to",
    "grantee",
    type=TEXT,
    metavar="ROLE",
    help="Then grant ROLE (the workers' least-privilege role, e.g. calls_worker_app) what"
    " the worker needs, and nothing more.",
)
@click.option(
    "--check",
    is_flag=True,
    help="Say what migrate would do here (create, adopt the API's tables, upgrade, or refuse"
    " and why), changing nothing; exit 1 if it would refuse.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Calls a backfill transaction takes, when adopting the API's tables.",
)
def migrate(grantee: str | None, check: bool, batch_size: int) -> None:
    """Upgrade the database schema to the newest revision (safe to run again).

    Where the Calls API's tables exist already, adopts them online (docs/database.md), or
    refuses with every way they differ from what the worker needs, changing nothing.
    """
    from calls_worker.adapters.db.events import set_events_retention
    from calls_worker.adapters.db.journal import set_processed_retention
    from calls_worker.adapters.db.migrate import (
        ContractBroken,
        current_revision,
        grant_to,
        plan,
        upgrade,
    )

    servers = configured()
    engine = engine_of(servers)
    try:
        if check:
            the_plan = plan(engine)
            click.echo(f"migrate would {the_plan.describe()}")
            sys.exit(1 if the_plan.action == "refuse" else 0)
        try:
            upgrade(engine, batch_size=batch_size)
        except ContractBroken as error:
            raise click.ClickException(str(error)) from None
        click.echo(f"schema at revision {current_revision(engine)}")
        hours = servers.settings.processed_retention_hours
        set_processed_retention(engine, timedelta(hours=hours))
        click.echo(f"command outcomes kept {hours} h at least")
        events_hours = servers.settings.events_retention_hours
        set_events_retention(engine, timedelta(hours=events_hours))
        click.echo(f"call events kept {events_hours} h at least after they are published")
        if grantee is not None:
            try:
                grant_to(engine, grantee)
            except ValueError as error:
                raise click.BadParameter(str(error), param_hint="--grant-to") from error
            click.echo(f"granted {grantee} what the worker needs")
    finally:
        engine.dispose()
        servers.stop()


@main.command()
@click.option("--dry-run", is_flag=True, help="Show what would expire, by organization.")
def sweep(dry_run: bool) -> None:
    """Run one sweep now and print its result."""
    from calls_worker.adapters.db.journal import exhausted_by_organization
    from calls_worker.worker.runtime import Runtime
    from calls_worker.worker.tasks import run_sweep

    servers = configured()
    try:
        if dry_run:
            engine = engine_of(servers)
            by_organization = exhausted_by_organization(engine)
            engine.dispose()
            print_json(
                {
                    "wouldExpire": sum(o["calls"] for o in by_organization),
                    "byOrganization": by_organization,
                }
            )
            return
        runtime = Runtime(database_url=servers.database_url(), settings=servers.settings)
        try:
            print_json(run_sweep(runtime))
        finally:
            runtime.dispose()
    finally:
        servers.stop()


@main.command()
@click.argument("kind", type=Kind(sorted(KINDS)))
@click.argument("file", type=click.File("rb"), default="-")
@click.option("--command-id", type=CommandId(), help="Your own command id (default: a new UUID).")
@click.option("--timeout", type=SECONDS, default=30.0, show_default=True)
@click.option(
    "--no-validate",
    is_flag=True,
    help="Send FILE's text as it is, unchecked and unstamped, as a producer's bad message"
    " would arrive (the worker then refuses it and keeps it among the dead letters).",
)
@click.option(
    "--as", "account", type=click.UUID, default=None,
    help="Send it for this service account (fills serviceAccountUuid unless the JSON has it).",
)  # fmt: skip
def send(
    kind: str, file: Any, command_id: str | None, timeout: float, no_validate: bool,
    account: UUID | None,
) -> None:  # fmt: skip
    """Queue one command (its JSON from FILE, a path from where you are, or - for stdin)
    and print its outcome.

    The command id goes to standard error as soon as it is sent.

    Exit status: 0 ok, 1 an error outcome, 2 refused before sending (the reason on
    standard error, or the invalid outcome on standard output), 3 sent but no outcome
    within --timeout (`calls-worker outcome ID` tells it later).
    """
    text = sending.read_command(file)
    servers = configured()
    signing = signing_of(servers.settings)
    if account is not None and signing is not None:
        sending.check_signs_as(servers, account, signing.certificate)
    sending.check_broker(servers)
    with sending.client(servers, account) as client:
        if no_validate:
            handle = client.send_unchecked(KINDS[kind], text, command_id=command_id)
        else:
            handle = sending.queue(client, KINDS[kind], text, command_id)
        click.echo(f"sent command {handle.command_id}", err=True)
        try:
            outcome = handle.outcome(timeout)
        except TimeoutError:
            click.echo(f"Error: no outcome for command {handle.command_id} within {timeout:g} s."
                       f" It was sent: `calls-worker outcome {handle.command_id}` tells it"
                       " once a worker has applied it", err=True)  # fmt: skip
            sys.exit(3)
    print_json(outcome)
    sys.exit(0 if outcome["ok"] else 1)


@main.command()
@click.argument("command_id", type=CommandId())
def outcome(command_id: str) -> None:
    """The outcome the database keeps for COMMAND_ID (for PROCESSED_RETENTION_HOURS, long
    after the result backend forgot it). Exit 1 if there is none: not handled (yet), or older."""
    from calls_worker.adapters.db.journal import processed_outcome

    servers = configured()
    engine = engine_of(servers)
    try:
        kept = processed_outcome(engine, command_id)
    finally:
        engine.dispose()
        servers.stop()
    if kept is None:
        click.echo(f"Error: no outcome for command {command_id}: not handled (yet), or older"
                   " than CALLS_WORKER_PROCESSED_RETENTION_HOURS", err=True)  # fmt: skip
        sys.exit(1)
    print_json(kept["outcome"])


@main.command(name="settings")
def settings_command() -> None:
    """The settings this worker reads, as a Markdown table."""
    from calls_worker.config import settings_table

    click.echo(settings_table())


@main.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write one <kind>.schema.json per command (and list.schema.json, the listing query,"
    " and call-event.schema.json, the call events) here instead of printing them all.",
)
def schema(out: Path | None) -> None:
    """The JSON Schema of every command, of the listing query and of the call events, for
    producers and subscribers in other languages."""
    from calls_worker.domain.commands import COMMANDS, ListCalls
    from calls_worker.domain.events import CallEventDocument

    models: dict[str, Any] = {str(kind): model for kind, model in COMMANDS.items()}
    models["list"] = ListCalls
    models["call-event"] = CallEventDocument
    schemas = {kind: model.model_json_schema(by_alias=True) for kind, model in models.items()}
    if out is None:
        print_json(schemas)
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        for kind, document in schemas.items():
            (out / f"{kind}.schema.json").write_text(json.dumps(document, indent=2) + "\n")
    except OSError as error:
        raise click.BadParameter(
            f"cannot write there: {error.strerror} ({error.filename})", param_hint="--out"
        ) from None
    click.echo(f"wrote {len(schemas)} schemas to {out}")


for _command in [*PROCESS_COMMANDS, *DIRECTORY_COMMANDS, *EVENTS_COMMANDS,
                 *DEAD_LETTERS_COMMANDS]:
    main.add_command(_command)
