"""``calls-worker dead-letters``: the commands the worker could not handle, for an operator.

A rejected command waits until it is settled: **replayed** (sent again, as it was or
corrected) or **dismissed** (the operator decided it needs nothing more). The gauge
``calls_worker_rejected_commands_waiting`` counts those that wait, and an alert fires when
some wait too long (deploy/prometheus/alerts.yml).

A replay and a producer's resend of the same command never both apply it. A command whose
own id has no outcome in the database (given up, or refused before it was applied, as an
invalid one is) is replayed under that id: whichever of the replay and the resend comes
second gets the first's outcome. A command whose own id has an outcome there was applied
after all (then it is not sent again) or answered with an error by the rules (then the
replay, as it was or corrected, is a new command, under ``replay-<rejected id>-<hash>``:
its producer's resends keep getting that error).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from datetime import datetime
from typing import Any
from uuid import UUID

import click

from calls_worker.cli import sending
from calls_worker.cli.output import Group, camel_keys, output_options, print_json, show_rows
from calls_worker.cli.params import POSITIVE, SECONDS, TEXT
from calls_worker.cli.replay import command_of, replay_id
from calls_worker.cli.servers import configured, engine_of
from calls_worker.config import signing_of
from calls_worker.wire import COMMAND_ID_LIMIT, TASK_NAMES

KINDS_BY_TASK = {name: kind for kind, name in TASK_NAMES.items()}


def _selection(function: Any) -> Any:
    """The options that choose many rejected commands at once."""
    for option in reversed([
        click.option("--all", "everything", is_flag=True,
                     help="Every rejected command that waits (neither replayed nor dismissed)."),
        click.option("--since", type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S",
                                                     "%Y-%m-%d %H:%M:%S"]),
                     help="Only those received at this time (UTC) or later."),
        click.option("--reason", type=TEXT, metavar="TEXT",
                     help="Only those whose reason contains TEXT (any case)."),
    ]):  # fmt: skip
        function = option(function)
    return function


def _chosen(engine: Any, everything: bool, since: datetime | None, reason: str | None,
            include_settled: bool = False, limit: int | None = None) -> list[Any]:  # fmt: skip
    from datetime import UTC

    from calls_worker.adapters.db.journal import list_rejected

    return list_rejected(engine, include_settled=include_settled, limit=limit,
                         since=None if since is None else since.replace(tzinfo=UTC),
                         reason=reason)  # fmt: skip


@click.group(cls=Group, name="dead-letters")
def dead_letters() -> None:
    """Commands the worker could not handle, kept with the reason: list, replay, dismiss."""


@dead_letters.command(name="list")
@click.option("--all", "include_settled", is_flag=True,
              help="Include those replayed or dismissed already.")  # fmt: skip
@click.option("--since", type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S",
                                             "%Y-%m-%d %H:%M:%S"]),
              help="Only those received at this time (UTC) or later.")  # fmt: skip
@click.option("--reason", type=TEXT, metavar="TEXT",
              help="Only those whose reason contains TEXT (any case).")  # fmt: skip
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@output_options
def dead_letters_list(include_settled: bool, since: datetime | None, reason: str | None,
                      limit: int, as_json: bool, as_table: bool) -> None:  # fmt: skip
    """Print the rejected commands waiting for an operator, oldest first (as JSON, with
    their raw body and details)."""

    servers = configured()
    engine = engine_of(servers)
    try:
        chosen = _chosen(engine, False, since, reason, include_settled, limit)
    finally:
        engine.dispose()
        servers.stop()
    show_rows([camel_keys(asdict(r)) for r in chosen],
              ["id", "receivedAt", "taskName", "commandId", "reason", "replayedAt",
               "dismissedAt"], as_json, as_table)  # fmt: skip


def usable_own_id(command_id: str | None) -> bool:
    """Whether a rejected command's own id can carry its replay (one the worker accepts)."""
    return (command_id is not None and 0 < len(command_id) <= COMMAND_ID_LIMIT
            and command_id.isprintable())  # fmt: skip


class NotSent(Exception):
    """The rejected command is not sent again; why, and the outcome to show if any."""

    def __init__(self, why: str, outcome: Any = None) -> None:
        super().__init__(why)
        self.outcome = outcome


def _account_of(command: Any) -> UUID | None:
    """The service account a command names, if it names a well-formed one."""
    try:
        decoded = json.loads(command) if isinstance(command, str) else command
        return UUID(str(decoded["serviceAccountUuid"]))
    except (ValueError, TypeError, KeyError):
        return None


def _replay(engine: Any, client: Any, servers: Any, rejected: Any, file: Any) -> tuple[str, Any]:
    """Send one rejected command again; the command id it went under and its handle."""
    from calls_worker.adapters.db.journal import mark_replayed, processed_outcome

    if rejected.task_name not in KINDS_BY_TASK:
        raise NotSent(f"{rejected.task_name!r} is not a command task; nothing to replay")
    own = rejected.command_id if usable_own_id(rejected.command_id) else None
    answered = None if own is None else processed_outcome(engine, own)
    if answered is not None and answered["outcome"].get("ok"):
        raise NotSent(f"command {own} was applied at {answered['processedAt']} (its outcome is"
                      " shown); it is not sent again", answered["outcome"])  # fmt: skip
    command = sending.read_command(file) if file is not None else command_of(rejected.raw_body)
    account = _account_of(command)
    signing = signing_of(servers.settings)
    if account is not None and signing is not None:  # refused before anything is recorded
        try:
            sending.check_signs_as(servers, account, signing.certificate)
        except SystemExit:  # it said why
            raise NotSent(f"not signed with service account {account}'s key") from None
    # Under its own id when the database has no outcome for it (given up, or refused before
    # it was applied): a resend by its producer and this replay then have one effect between
    # them. What the result backend answered under that id (a give-up, `invalid`) goes.
    command_id = own if answered is None and own is not None else replay_id(rejected.id, command)
    if command_id == own:
        client.forget(own)
    handle = sending.queue(client, KINDS_BY_TASK[rejected.task_name], command, command_id)
    mark_replayed(engine, rejected.id, command_id)
    return command_id, handle


@dead_letters.command(name="replay")
@click.argument("rejected_id", type=POSITIVE, required=False)
@click.argument("file", type=click.File("rb"), required=False)
@_selection
@click.option("--timeout", type=SECONDS, default=30.0, show_default=True,
              help="How long to wait for each outcome.")  # fmt: skip
def dead_letters_replay(rejected_id: int | None, file: Any, everything: bool,
                        since: datetime | None, reason: str | None,
                        timeout: float) -> None:  # fmt: skip
    """Send rejected command REJECTED_ID again, as it was or as corrected in FILE (- for
    stdin); or, with --all, --since or --reason, every waiting one so chosen, as it was.

    A command whose own id has no outcome in the database goes under that id, so a producer
    that sends it again too gets one effect, whichever comes first; replaying it again then
    shows that outcome. A command that was applied after all (its commit reached the
    database, only the answer was lost) is not sent again: its outcome is shown, and the
    exit status is 1. One answered with an error by the rules goes under a replay id derived
    from REJECTED_ID and the command, so the same replay twice has its effect once.
    Outcomes are kept CALLS_WORKER_PROCESSED_RETENTION_HOURS (72 h): replay sooner than
    that. Prints the outcome (for a selection: a JSON list, what became of each).
    """
    from calls_worker.adapters.db.journal import get_rejected

    many = everything or since is not None or reason is not None
    if many == (rejected_id is not None):
        raise click.UsageError("give REJECTED_ID, or choose with --all, --since or --reason")
    if many and file is not None:
        raise click.UsageError("FILE corrects one command: give it with REJECTED_ID only")
    servers = configured()
    sending.check_broker(servers)
    engine = engine_of(servers)
    try:
        if rejected_id is not None:
            rejected = get_rejected(engine, rejected_id)
            if rejected is None:
                raise click.ClickException(f"no rejected command {rejected_id}")
            with sending.client(servers) as client:
                try:
                    _, handle = _replay(engine, client, servers, rejected, file)
                except NotSent as refused:
                    if refused.outcome is not None:
                        print_json(refused.outcome)
                    raise click.ClickException(str(refused)) from None
                print_json(handle.outcome(timeout))
            return
        _replay_many(engine, servers, _chosen(engine, everything, since, reason), timeout)
    finally:
        engine.dispose()
        servers.stop()


def _replay_many(engine: Any, servers: Any, chosen: list[Any], timeout: float) -> None:
    """Send each, then wait for each outcome; print what became of each, as a JSON list.
    Exit 1 when any was not sent or got no outcome."""

    sent: list[tuple[Any, str, Any]] = []
    report: list[dict[str, Any]] = []
    with sending.client(servers) as client:
        for rejected in chosen:
            try:
                command_id, handle = _replay(engine, client, servers, rejected, None)
            except (NotSent, click.ClickException) as refused:
                why = refused.message if isinstance(refused, click.ClickException) else str(refused)
                report.append({"id": rejected.id, "notSent": why})
                continue
            sent.append((rejected, command_id, handle))
        for rejected, command_id, handle in sent:
            try:
                report.append({"id": rejected.id, "commandId": command_id,
                               "outcome": handle.outcome(timeout)})  # fmt: skip
            except Exception as error:  # reported; the others are still waited for
                report.append({"id": rejected.id, "commandId": command_id,
                               "noOutcome": str(error)})  # fmt: skip
    print_json(sorted(report, key=lambda line: int(line["id"])))
    if any("outcome" not in line for line in report):
        sys.exit(1)


@dead_letters.command(name="dismiss")
@click.argument("rejected_ids", type=POSITIVE, nargs=-1)
@_selection
def dead_letters_dismiss(rejected_ids: tuple[int, ...], everything: bool,
                         since: datetime | None, reason: str | None) -> None:  # fmt: skip
    """Mark rejected commands settled without replaying them: REJECTED_IDS, or every waiting
    one chosen with --all, --since or --reason. They stop counting as waiting. Nothing is
    recorded under their command ids: a producer that sends one of them again has it
    applied as any new delivery. Prints the ids dismissed."""
    from calls_worker.adapters.db.journal import dismiss_rejected

    many = everything or since is not None or reason is not None
    if many == bool(rejected_ids):
        raise click.UsageError("give REJECTED_IDS, or choose with --all, --since or --reason")
    servers = configured()
    engine = engine_of(servers)
    try:
        ids = list(rejected_ids) or [r.id for r in _chosen(engine, everything, since, reason)]
        print_json({"dismissed": dismiss_rejected(engine, ids)})
    finally:
        engine.dispose()
        servers.stop()


COMMANDS: list[Any] = [dead_letters]
