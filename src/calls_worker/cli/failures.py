"""What the command line says when the database or the broker is not what a command needs:
a sentence and an exit status, never a traceback. And the signals that end a command
(SIGTERM, a closed terminal's SIGHUP) end it as an exception would, so the embedded
servers it started are let go of on the way out."""

from __future__ import annotations

import signal
import sys
from types import FrameType
from typing import Any

import click

from calls_worker.cli.output import Group


def explain(error: BaseException) -> click.ClickException | None:
    """A ClickException saying what went wrong, for the failures a person can act on."""
    exc = sys.modules.get("sqlalchemy.exc")
    if exc is None or not isinstance(error, exc.DBAPIError):
        return None
    sqlstate = getattr(error.orig, "sqlstate", None)
    first = str(error.orig).strip().splitlines()[0] if str(error.orig).strip() else ""
    if isinstance(error, exc.OperationalError | exc.InterfaceError) and sqlstate is None:
        return click.ClickException(
            f"the database does not answer ({first}): check CALLS_WORKER_DATABASE_URL, or"
            " that the server runs"
        )
    from calls_worker.worker.settling import SCHEMA_BEHIND  # the worker's own list, on error only

    if sqlstate in SCHEMA_BEHIND:
        return click.ClickException(
            f"the database's schema is missing or older than this release ({first}): run"
            " `calls-worker migrate` (docs/upgrades.md)"
        )
    if sqlstate == "42501":  # insufficient_privilege
        return click.ClickException(
            f"the database refused this role ({first}): this command needs the owner's URL,"
            " or grants the role lacks (`calls-worker migrate --grant-to`)"
        )
    return None


class Main(Group):
    """The top-level group: known failures become messages (exit 1)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as error:
            explained = explain(error)
            if explained is None:
                raise
            raise explained from None


def end_on_signals() -> None:
    """SIGTERM and SIGHUP raise SystemExit (status 128 + the signal), as Ctrl-C raises
    KeyboardInterrupt: ``finally`` blocks and exit handlers run, and with them the letting
    go of the embedded servers. Their default ends the process on the spot, and left the
    embedded PostgreSQL running for good. (A worker or beat installs Celery's own handlers
    after this.)"""

    def end(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) in (signal.SIG_DFL, None):
            signal.signal(signum, end)
