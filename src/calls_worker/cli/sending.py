"""Sending a command from the command line (``send``, ``dead-letters replay``): a producer
client on the configured broker, the command read from a file, and the check that this
shell signs as the account it sends for."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, get_args
from uuid import UUID

import click

from calls_worker.cli.output import print_json
from calls_worker.cli.servers import Servers, engine_of
from calls_worker.config import signing_of
from calls_worker.domain.commands import CommandKind

KINDS = {kind.replace("_", "-"): kind for kind in get_args(CommandKind)}


def client(servers: Servers, service_account: UUID | None = None) -> Any:
    """A producer client on the configured (or embedded, running) broker."""
    from calls_worker.client import CallsClient

    return CallsClient(
        servers.broker_url(start=False),
        servers.result_backend_url(start=False),
        signing=signing_of(servers.settings),
        service_account=service_account,
    )


def queue(client: Any, kind: CommandKind, command: Any, command_id: str | None) -> Any:
    """Queue the command; an invalid one is printed as its outcome, exit status 2."""
    from calls_worker.domain.errors import InvalidCommand
    from calls_worker.domain.outcome import failed

    try:
        return client.send(kind, command, command_id=command_id)
    except InvalidCommand as error:
        print_json(failed(error))
        sys.exit(2)


# A command is a few kilobytes; a file far larger than a message may be is not one.
MAX_COMMAND_BYTES = 1_048_576


class Refused(click.ClickException):
    """The input cannot be a command: nothing was sent (exit status 2, like click's own
    refusals of a missing file or a directory)."""

    exit_code = 2


def read_command(file: Any) -> str:
    """The command's text from FILE (bytes), or exit 2 with what is wrong with it."""
    if file is sys.stdin.buffer and sys.stdin.isatty():
        click.echo("Reading the command's JSON from standard input; end it with Ctrl-D.",
                   err=True)  # fmt: skip
    raw = file.read(MAX_COMMAND_BYTES + 1)
    if len(raw) > MAX_COMMAND_BYTES:
        raise Refused(
            f"the command is over {MAX_COMMAND_BYTES} bytes; a command is a JSON object of a"
            " few kilobytes"
        ) from None
    try:
        return str(raw.decode("utf-8-sig"))  # a byte order mark is not part of the JSON
    except UnicodeDecodeError as error:
        offset = error.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)
        raise Refused(
            f"the command is not UTF-8 text (byte 0x{raw[offset]:02x} at offset {offset}):"
            " give its JSON in UTF-8"
        ) from None


def check_broker(servers: Servers) -> None:
    """Exit 2, nothing sent, when the broker does not answer (a client would otherwise
    retry for long, then fail with a traceback)."""
    from kombu import Connection

    url = servers.broker_url(start=False)
    try:
        with Connection(url, connect_timeout=5) as connection:
            connection.ensure_connection(max_retries=1, timeout=5)
    except Exception as error:  # whatever the transport raises: it does not answer
        shown = Connection(url).as_uri()  # without the password
        raise Refused(f"the broker {shown} does not answer ({error}): nothing was sent; check"
                      " CALLS_WORKER_BROKER_URL") from None  # fmt: skip


def check_signs_as(servers: Servers, account: UUID, certificate: Path) -> None:
    """With signing on, a command for ``account`` must be signed with the account's own
    key: the worker believes no other (not even its own) about who sent it. Refused here,
    before sending, when this shell's certificate is not the account's; when the database
    cannot be read, the worker decides."""
    from calls_worker.adapters.db.directory import list_service_accounts
    from calls_worker.worker.signer import certificate_sha256

    mine = certificate_sha256(certificate.read_bytes())
    try:
        engine = engine_of(servers)
        try:
            accounts = {a["uuid"]: a for a in list_service_accounts(engine)}
        finally:
            engine.dispose()
    except Exception as error:  # any failure to read it means the same here
        click.echo(f"warning: service account {account} not checked ({error}); the worker"
                   " decides", err=True)  # fmt: skip
        return
    found = accounts.get(account)
    if found is None or found["certificateSha256"] == mine:
        return  # an unknown account: the worker's outcome says so
    theirs = found["certificateSha256"]
    click.echo(
        f"Error: service account {account} "
        + (f"signs with the certificate {theirs[:16]}…" if theirs else "has no certificate")
        + f", and this shell signs with {mine[:16]}… ({certificate}): the worker would refuse"
        " it as forbidden. Sign with the account's own key: set CALLS_WORKER_SIGNING_KEY_FILE"
        " and CALLS_WORKER_SIGNING_CERTIFICATE_FILE to its key and certificate for this"
        " command.",
        err=True,
    )
    sys.exit(2)
