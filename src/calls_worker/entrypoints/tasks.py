"""The thin tasks: parse the payload, open a unit of work, call the handler, log the outcome.

No business ``if`` here; the rules are in the domain and the handlers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any
from uuid import UUID

import psycopg
from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.time import get_exponential_backoff_interval
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from calls_worker.adapters.db import journal
from calls_worker.adapters.db.events import prune_published
from calls_worker.adapters.db.repository import SqlUnitOfWork
from calls_worker.config import sweep_batch_size
from calls_worker.domain.access import ACCOUNT_FIELD, Caller, may_read_outcome
from calls_worker.domain.commands import Command, CommandKind, parse_command, parse_list_calls
from calls_worker.domain.errors import DomainError, FieldError, InvalidCommand
from calls_worker.domain.outcome import Outcome, failed
from calls_worker.entrypoints.metrics import worker_metrics
from calls_worker.entrypoints.runtime import Runtime, runtime_of
from calls_worker.entrypoints.signer import SIGNED_BY, WORKERS_NAMES, as_sent
from calls_worker.service.handlers import handle, utc_now
from calls_worker.service.listing import list_calls
from calls_worker.service.sweep import SweepResult, expire_exhausted_calls
from calls_worker.wire import (
    COMMAND_ID_LIMIT,
    COMMANDS_QUEUE,
    LIST_TASK,
    OUTCOME_TASK,
    PRUNE_TASK,
    RECONCILE_TASK,
    SWEEP_TASK,
    SWEEPS_QUEUE,
    TASK_NAMES,
)

logger = logging.getLogger("calls_worker")

KIND_BY_TASK: dict[str, CommandKind] = {name: kind for kind, name in TASK_NAMES.items()}

# Errors worth another try: the database or the network was away for a moment, a deadlock
# or serialization failure was resolved by rolling us back. A broken rule is never retried.
TRANSIENT_ERRORS = (
    OperationalError,
    InterfaceError,
    PoolTimeoutError,
    # Commands read and write through psycopg directly too (see repository._Transaction).
    psycopg.OperationalError,
    psycopg.InterfaceError,
)
# SQLSTATEs that say the server cannot serve us now: admin or crash shutdown, starting up.
_SERVER_AWAY = {"57P01", "57P02", "57P03"}


def database_away(error: BaseException) -> bool:
    """Whether ``error`` says the database cannot be reached (connection refused or lost,
    shutting down, starting up), as opposed to an error of a database that answers (a
    deadlock, a serialization failure, a pool exhausted by slow commands)."""
    cause = getattr(error, "orig", None) or error
    if isinstance(error, InterfaceError) or isinstance(cause, psycopg.InterfaceError):
        return True
    if isinstance(cause, psycopg.OperationalError):
        state = cause.sqlstate
        return state is None or state.startswith("08") or state in _SERVER_AWAY
    return False


# How much of a command's body a log line shows (the rejected-commands table keeps it all).
LOGGED_PREFIX = 512


class CommandGaveUp(Exception):
    """A command failed through every retry and is kept among the rejected commands."""


class CommandTask(Task[Any, Outcome]):
    """Delivery settings of every command task: late acks, retried on transient errors.

    Retries are decided by ``retry_or_give_up``, not by Celery's autoretry: a command is
    given up (kept in the rejected-commands table, then acknowledged) only once the
    database took it there. While the database cannot, the command is retried without end,
    so an outage of any length loses nothing.
    """

    acks_late = True
    reject_on_worker_lost = True
    max_retries = None  # the budget is CALLS_WORKER_COMMAND_MAX_RETRIES, kept by retry_or_give_up
    # The outcome's repr goes into each task-succeeded event (Flower shows it); the start
    # of it says ok or the error code, and a shorter one costs the worker less.
    resultrepr_maxsize = 160

    def on_retry(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        budget = runtime_of(self.app).settings.command_max_retries
        retry = self.request.retries + 1
        logger.warning(
            "command %s will be retried (try %d of %d%s): %s",
            task_id,
            retry,
            budget,
            "; past the budget while the database is away" if retry > budget else "",
            str(exc).splitlines()[0] if str(exc) else repr(exc),
            extra={"command_id": task_id, "retry": retry},
        )

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """An error no retry is for (a defect, or Celery's hard time limit, after which
        Celery acknowledges the message): keep the command for an operator to replay."""
        if isinstance(exc, CommandGaveUp):
            return  # kept already
        worker_metrics().rejection("gave_up")
        body = raw_body(args, kwargs)
        reason = f"failed: {exc!r}"
        try:
            journal.record_rejected(
                runtime_of(self.app).unpooled_engine(),
                task_name=self.name,
                command_id=task_id,
                raw_body=body,
                reason=reason,
            )
        except Exception:  # nowhere else to keep it: the log has what fits in a line
            logger.exception("could not keep failed command %s (%s); its body starts: %s",
                             task_id, reason, body[:LOGGED_PREFIX])  # fmt: skip


def retry_or_give_up(task: Task[Any, Any], error: Exception, args: Any, kwargs: Any) -> Exception:
    """After a transient error: retry (raises celery's Retry) while the budget lasts; then
    keep the command among the rejected ones and return the CommandGaveUp to raise.

    A command is never given up because the database is away: while it is (``database_away``),
    the command is retried whatever the budget says, at most a backoff maximum apart; and
    if the database cannot even keep it among the rejected ones, it is retried too. Only
    an error of a database that answers spends the budget to the end. (The budget counts
    every retry: a deadlock right after a long outage is kept at once, for a replay.)
    """
    runtime = runtime_of(task.app)
    settings = runtime.settings
    retries = task.request.retries
    away = database_away(error)
    if away:
        runtime.database_watch.report_away()  # the worker stops taking commands (outage.py)
    if retries < settings.command_max_retries or away:
        countdown = get_exponential_backoff_interval(
            factor=1, retries=retries, maximum=settings.command_retry_backoff_max_seconds,
            full_jitter=True,
        )  # fmt: skip
        raise task.retry(exc=error, countdown=countdown)
    return give_up(task, error, args, kwargs, f"failed after {retries} retries: {error!r}")


def give_up(
    task: Task[Any, Any], error: Exception, args: Any, kwargs: Any, reason: str
) -> Exception:
    """Keep the command among the rejected ones and return the CommandGaveUp to raise; when
    the database cannot keep it, retry instead (raises celery's Retry), at the longest pause."""
    runtime = runtime_of(task.app)
    settings = runtime.settings
    command_id = str(task.request.id)
    try:
        rejected_id = journal.record_rejected(
            runtime.unpooled_engine(),
            task_name=task.name,
            command_id=command_id,
            raw_body=raw_body(args, kwargs),
            reason=reason,
        )
    except Exception as unkept:  # the database is away: the broker keeps the command
        runtime.database_watch.report_away()
        logger.warning(
            "command %s is given up but cannot be kept either (%s): it stays queued",
            command_id,
            str(unkept).splitlines()[0] if str(unkept) else repr(unkept),
            extra={"command_id": command_id},
        )
        raise task.retry(exc=error, countdown=settings.command_retry_backoff_max_seconds) from None
    worker_metrics().rejection("gave_up")
    logger.error("command %s %s; kept as rejected command %s", command_id, reason, rejected_id,
                 extra={"command_id": command_id, "rejected_id": rejected_id})  # fmt: skip
    return CommandGaveUp(f"command {command_id} {reason}; kept as rejected command {rejected_id}")


SIGNED_FOR = "signedFor"


def command_payload(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], *, command_id: str, task_name: str,
    signed: bool,
) -> tuple[Any, str | None]:  # fmt: skip
    """The ``command`` keyword argument, the only argument a command task takes, besides
    ``signedFor`` when messages are signed; and the fingerprint of the certificate that
    signed the message (``signedBy``, set by the worker's decoding with ``signedOriginal``:
    entrypoints/signer.py; unsigned, a body naming either is refused).

    Celery's signing covers the body only, not the headers that carry the command id and
    the task name: a captured signed message could be sent again under a new id (a second
    attempt) or relabelled as another task (a cancel turned into an expire). A signed
    body therefore names its id and task in ``signedFor: {"id": ..., "task": ...}``,
    which must match the headers; when signing is on, a body without it is refused.
    """
    given = set(kwargs) - (WORKERS_NAMES if signed else set())
    expected = {"command", SIGNED_FOR} if SIGNED_FOR in given else {"command"}
    if args or given != expected:
        raise InvalidCommand(
            "a command task takes exactly one keyword argument, command",
            [FieldError("kwargs", f"got {len(args)} positional and keywords {sorted(given)}")],
        )
    bound = kwargs.get(SIGNED_FOR)
    if bound is None and signed:
        raise InvalidCommand(
            "a signed command must name its command id and task in signedFor",
            [FieldError(SIGNED_FOR, "missing")],
        )
    if bound is not None and bound != {"id": command_id, "task": task_name}:
        raise InvalidCommand(
            "signedFor does not match the message: sent again under another id, or as another task",
            [FieldError(SIGNED_FOR, f"names {bound!r}; the message is {task_name} {command_id}")],
        )
    signer = kwargs.get(SIGNED_BY) if signed else None
    return kwargs["command"], signer if isinstance(signer, str) else None


def raw_body(args: Any, kwargs: Mapping[str, Any]) -> str:
    """The message's body as kept among the rejected commands: as the producer sent it
    (without what the worker's decoding added: ``signedBy``, ``signedOriginal``)."""
    return journal.dumps([list(args), as_sent(kwargs), {}])


def run_command(task: Task[Any, Any], kind: CommandKind, args: Any, kwargs: Any) -> Outcome:
    runtime = runtime_of(task.app)
    command_id = str(task.request.id)
    try:
        payload, signer = command_payload(
            tuple(args), kwargs, command_id=command_id, task_name=task.name,
            signed=runtime.signed,
        )  # fmt: skip
        command = parse_command(kind, payload if isinstance(payload, str) else mapping_of(payload))
    except InvalidCommand as error:
        return reject_invalid(runtime, task.name, command_id, kind, args, kwargs, error)

    def keep(error: DomainError) -> None:
        keep_refused(runtime, task.name, command_id, args, kwargs, error)

    outcome = handle(
        command_id, command, runtime.unit_of_work(),
        policy=runtime.access_policy, signer_sha256=signer, on_kept=keep,
    )  # fmt: skip
    log_outcome(kind, command_id, command, outcome)
    return outcome


def reject_invalid(
    runtime: Runtime, task_name: str, command_id: str, kind: CommandKind, args: Any,
    kwargs: Any, error: InvalidCommand,
) -> Outcome:  # fmt: skip
    """A command that cannot be parsed: kept among the rejected ones; its error outcome."""
    rejected_id = journal.record_rejected(
        runtime.engine(),
        task_name=task_name,
        command_id=command_id,
        raw_body=raw_body(args, kwargs),
        reason=error.message,
        details=error.details,
        once=True,
    )
    worker_metrics().rejection("task")
    logger.warning(
        "command %s %s rejected as %s: %s",
        kind,
        command_id,
        rejected_id,
        error.message,
        extra={"command_id": command_id, "kind": kind, "rejected_id": rejected_id},
    )
    return failed(error)


def keep_refused(
    runtime: Runtime, task_name: str, command_id: str, args: Any, kwargs: Any,
    error: DomainError,
) -> None:  # fmt: skip
    """A refusal an operator must see (a claim the signature does not back), kept."""
    rejected_id = journal.record_rejected(
        runtime.engine(), task_name=task_name, command_id=command_id,
        raw_body=raw_body(args, kwargs), reason=error.message, details=error.details,
    )  # fmt: skip
    worker_metrics().rejection("forbidden")
    logger.warning("command %s %s refused and kept as %s: %s", KIND_BY_TASK.get(task_name),
                   command_id, rejected_id, error.message,
                   extra={"command_id": command_id, "rejected_id": rejected_id})  # fmt: skip


def log_outcome(kind: CommandKind, command_id: str, command: Command, outcome: Outcome) -> None:
    """The one log line and the counter of a command's outcome."""
    call_uuid = outcome["call"]["uuid"] if outcome["ok"] else command.call_uuid_or_none
    code = "ok" if outcome["ok"] else outcome["error"]["code"]
    worker_metrics().command(kind, code)
    logger.info(
        "command %s %s call=%s outcome=%s",
        kind,
        command_id,
        call_uuid,
        code,
        extra={
            "command_id": command_id,
            "kind": kind,
            "call_uuid": str(call_uuid),
            "outcome": code,
            "service_account_uuid": str(command.service_account_uuid),
        },
    )


def run_list(task: Task[Any, Any], args: Any, kwargs: Any) -> Outcome:
    """The ``calls.list`` query: a page of calls, or an error outcome. Changes nothing."""
    runtime = runtime_of(task.app)
    try:
        payload, signer = command_payload(
            tuple(args), kwargs, command_id=str(task.request.id), task_name=task.name,
            signed=runtime.signed,
        )  # fmt: skip
        query = parse_list_calls(payload if isinstance(payload, str) else mapping_of(payload))
    except InvalidCommand as error:
        logger.warning("list query %s refused: %s", task.request.id, error.message,
                       extra={"command_id": str(task.request.id)})  # fmt: skip
        return failed(error)
    return list_calls(
        runtime.call_reader(), query, policy=runtime.access_policy,
        signer_sha256=signer,
    )  # fmt: skip


def mapping_of(payload: Any) -> Mapping[str, Any]:
    if not isinstance(payload, Mapping):
        raise InvalidCommand(
            "command must be a JSON object",
            [FieldError("command", f"got {type(payload).__name__}")],
        )
    return payload


def run_sweep(runtime: Runtime) -> dict[str, Any]:
    """One sweep, unless another is running; its report (also kept in worker_sweep_runs)."""
    engine = runtime.engine()
    now = utc_now()
    started = time.perf_counter()
    with journal.exclusive_sweep(engine) as mine:
        result = SweepResult(expired=0, batches=0)
        if mine:
            result = expire_exhausted_calls(
                lambda: SqlUnitOfWork(engine, events=runtime.settings.events), now,
                sweep_batch_size(runtime.settings),
            )
        expired, batches = result.expired, result.batches
    duration = time.perf_counter() - started
    worker_metrics().sweep(skipped=not mine, duration=duration, expired=expired)
    journal.record_sweep_run(
        engine,
        swept_at=now,
        duration_seconds=duration,
        expired=expired,
        batches=batches,
        skipped=not mine,
    )
    report = {
        "sweptAt": now.isoformat(),
        "expired": expired,
        "batches": batches,
        "durationSeconds": round(duration, 6),
        "skipped": not mine,
        "expiredByOrganization": result.by_organization,
    }
    by_organization = ", ".join(f"{organization}: {count}" for organization, count
                                in sorted(result.by_organization.items()))  # fmt: skip
    logger.info(
        "sweep expired=%d batches=%d duration=%.3fs%s%s",
        expired,
        batches,
        duration,
        f" by owning organization {{{by_organization}}}" if by_organization else "",
        " (skipped: another sweep is running)" if not mine else "",
        extra={"sweep": report},
    )
    if result.expired_calls:
        logger.debug("sweep expired calls %s", ", ".join(map(str, result.expired_calls)),
                     extra={"expired_calls": [str(c) for c in result.expired_calls]})  # fmt: skip
    return report


def _command_task(kind: CommandKind) -> Any:
    def command_task(self: Task[Any, Any], *args: Any, **kwargs: Any) -> Outcome:
        try:
            return run_command(self, kind, args, kwargs)
        except TRANSIENT_ERRORS as error:
            raise retry_or_give_up(self, error, args, kwargs) from error
        except SoftTimeLimitExceeded as error:  # it would only hang again: an operator decides
            reason = f"ran past its soft time limit: {error!r}"
            raise give_up(self, error, args, kwargs, reason) from error

    command_task.__doc__ = f"Handle a queued {kind} command (``command``: its JSON)."
    return command_task


def register_tasks(app: Celery) -> None:
    """One task per command, plus the sweep, under their stable names."""
    for kind, name in TASK_NAMES.items():
        app.task(name=name, bind=True, base=CommandTask, queue=COMMANDS_QUEUE)(_command_task(kind))

    def sweep(self: Task[Any, Any]) -> dict[str, Any]:
        """Expire every call whose attempts reached its owning organization's maximum."""
        return run_sweep(runtime_of(self.app))

    app.task(name=SWEEP_TASK, bind=True, queue=SWEEPS_QUEUE, acks_late=True)(sweep)

    def prune(self: Task[Any, Any]) -> dict[str, Any]:
        """Forget command outcomes older than the retention (they answer redeliveries): the
        older of the two tables of outcomes at a time, when it is all older (migration 0008);
        outcomes kept for producers past their expiry; call events published longer ago
        than their retention."""
        runtime = runtime_of(self.app)
        try:
            # By the retention the owner set (`migrate`), not this worker's setting (0011).
            rotation = journal.rotate_processed(runtime.engine())
        except OperationalError as error:
            if not isinstance(error.orig, psycopg.errors.LockNotAvailable):
                raise
            logger.warning("outcome records not rotated: commands held them for 2 s;"
                           " the next run tries again")  # fmt: skip
            return {"rotated": False, "busy": True}
        hours = round(rotation.keep.total_seconds() / 3600, 3)
        kept_since = rotation.kept_since or rotation.current_since
        if rotation.swapped:
            logger.info("forgot the command outcomes recorded before %s (retention %gh)",
                        kept_since.isoformat(), hours)  # fmt: skip
        # Outcomes kept for producers in PostgreSQL (results.py), past their expiry.
        expired = journal.forget_expired_results(runtime.engine())
        # Call events published longer ago than their retention (unpublished ones stay).
        events_hours = runtime.settings.events_retention_hours
        events = prune_published(runtime.engine(), timedelta(hours=events_hours))
        if events:
            logger.info("forgot %d call events published more than %dh ago", events,
                        events_hours)  # fmt: skip
        return {"rotated": rotation.swapped, "retentionHours": hours,
                "keptSince": kept_since.isoformat(), "resultsForgotten": expired,
                "eventsForgotten": events}  # fmt: skip

    app.task(name=PRUNE_TASK, bind=True, queue=SWEEPS_QUEUE, acks_late=True)(prune)

    def reconcile(self: Task[Any, Any]) -> dict[str, int]:
        """Compare the due-calls record with the expiry rule; repair and count any drift."""
        missing, stale = journal.reconcile_due_calls(runtime_of(self.app).engine())
        worker_metrics().due_record_repairs(missing=missing, stale=stale)
        log = logger.warning if missing or stale else logger.info
        log("due-calls record reconciled: %d missing, %d stale repaired", missing, stale,
            extra={"missing": missing, "stale": stale})  # fmt: skip
        return {"missing": missing, "stale": stale}

    app.task(name=RECONCILE_TASK, bind=True, queue=SWEEPS_QUEUE, acks_late=True)(reconcile)

    def outcome(self: Task[Any, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The outcome the database keeps for ``query: {"commandId": ...}``:
        ``{"found": true, "outcome": ...}``, ``{"found": false}``, or ``{"found": false,
        "error": ...}`` for a query that is not one. Changes nothing."""
        return run_outcome_query(self, args, kwargs)

    app.task(name=OUTCOME_TASK, bind=True, queue=COMMANDS_QUEUE, acks_late=True)(outcome)

    def list_page(self: Task[Any, Any], *args: Any, **kwargs: Any) -> Outcome:
        """A page of calls, newest first, for ``command: {...}`` (docs/wire-format.md):
        ``{"ok": true, "calls": [...], "nextCursor": ...}`` or an error outcome."""
        return run_list(self, args, kwargs)

    app.task(name=LIST_TASK, bind=True, queue=COMMANDS_QUEUE, acks_late=True)(list_page)


def run_outcome_query(task: Task[Any, Any], args: Any, kwargs: Any) -> dict[str, Any]:
    """``{"found": true, "outcome": ..., "processedAt": ...}`` when the database keeps an
    outcome for ``query.commandId`` that this caller may read (access.may_read_outcome: the
    account that sent it, named in ``query.serviceAccountUuid`` and, where messages are
    signed, signed by its certificate); ``{"found": false}`` otherwise, whether there is
    none or it is not the caller's."""
    runtime = runtime_of(task.app)
    query = kwargs.get("query")
    sent = as_sent(kwargs) if runtime.signed else kwargs
    if args or set(sent) - {"query", SIGNED_FOR} or not isinstance(query, Mapping):
        return {"found": False, "error": "an outcome query takes one keyword argument, query"}
    bound = kwargs.get(SIGNED_FOR)
    if runtime.signed and bound != {"id": str(task.request.id), "task": task.name}:
        return {"found": False, "error": "signedFor does not match the message"}
    command_id = query.get("commandId")
    if not isinstance(command_id, str) or not 0 < len(command_id) <= COMMAND_ID_LIMIT:
        return {"found": False, "error": "query.commandId must be a command id (a string)"}
    named = query.get(ACCOUNT_FIELD)
    try:
        account_uuid = None if named is None else UUID(str(named))
    except ValueError:
        return {"found": False, "error": f"query.{ACCOUNT_FIELD} must be a UUID"}
    if set(query) - {"commandId", ACCOUNT_FIELD}:
        return {"found": False, "error": "an outcome query has commandId and serviceAccountUuid"}
    kept = journal.processed_outcome(runtime.engine(), command_id)
    if kept is None:
        return {"found": False}
    account = None if account_uuid is None else runtime.call_reader().service_account(account_uuid)
    signer = kwargs.get(SIGNED_BY) if runtime.signed else None
    caller = Caller(account_uuid, signer if isinstance(signer, str) else None)
    if not may_read_outcome(runtime.access_policy, caller, account, kept["serviceAccountUuid"]):
        return {"found": False}
    return {"found": True, "outcome": kept["outcome"],
            "processedAt": kept["processedAt"].isoformat()}  # fmt: skip
