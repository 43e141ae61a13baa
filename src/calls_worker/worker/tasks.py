"""The worker's tasks under their stable names: the command tasks (their options; the
consumer applies commands, batching.py), the sweep, the pruning, the reconciliation, and
the two queries (a command's outcome, a page of calls).

No business ``if`` here; the rules are in the domain and the handlers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any
from uuid import UUID

import psycopg
from celery import Celery, Task
from sqlalchemy.exc import OperationalError

from calls_worker.adapters.db import journal
from calls_worker.adapters.db.events import prune_published
from calls_worker.adapters.db.unit_of_work import SqlUnitOfWork
from calls_worker.config import sweep_batch_size
from calls_worker.domain.access import ACCOUNT_FIELD, Caller, may_read_outcome
from calls_worker.domain.commands import CommandKind, parse_list_calls
from calls_worker.domain.errors import InvalidCommand
from calls_worker.domain.outcome import Outcome, failed
from calls_worker.service.handlers import utc_now
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
from calls_worker.worker.keeping import LOGGED_PREFIX, CommandGaveUp, give_up, raw_body
from calls_worker.worker.messages import (
    SIGNED_FOR,
    Message,
    checked_arguments,
    mapping_of,
)
from calls_worker.worker.metrics import worker_metrics
from calls_worker.worker.runtime import Runtime, runtime_of
from calls_worker.worker.signer import SIGNED_BY, as_sent

logger = logging.getLogger("calls_worker")


class NotApplied(Exception):
    """A command task's body was called: commands are applied by the worker's consumer."""


class CommandTask(Task[Any, Outcome]):
    """Delivery settings of every command task: late acks, retried on transient errors.

    The worker never runs a command task's body: its consumer hands every command message
    to batching.py, which applies it (alone when CALLS_WORKER_COMMAND_BATCH_SIZE is 1) and
    settles it as settling.py decides; retries use this task's ``retry`` (a new message,
    ``retries`` + 1). A body called all the same (``apply``, another consumer) raises
    NotApplied, and the command is kept among the rejected ones (``on_failure``).
    """

    acks_late = True
    reject_on_worker_lost = True
    max_retries = None  # the budget is CALLS_WORKER_COMMAND_MAX_RETRIES (settling.py)
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
        """An error no retry is for (Celery's hard time limit, after which Celery
        acknowledges the message; a body called): keep the command for an operator."""
        if isinstance(exc, CommandGaveUp):
            return  # kept already
        try:
            give_up(runtime_of(self.app), self.name, task_id, args, kwargs, f"failed: {exc!r}")
        except Exception:  # nowhere else to keep it: the log has what fits in a line
            logger.exception("could not keep failed command %s (%r); its body starts: %s",
                             task_id, exc, raw_body(args, kwargs)[:LOGGED_PREFIX])  # fmt: skip


def run_list(task: Task[Any, Any], args: Any, kwargs: Any) -> Outcome:
    """The ``calls.list`` query: a page of calls, or an error outcome. Changes nothing."""
    runtime = runtime_of(task.app)
    try:
        message = Message(task.name, str(task.request.id), tuple(args), kwargs)
        payload, signer = checked_arguments(message, signed=runtime.signed)
        query = parse_list_calls(payload if isinstance(payload, str) else mapping_of(payload))
    except InvalidCommand as error:
        logger.warning("list query %s refused: %s", task.request.id, error.message,
                       extra={"command_id": str(task.request.id)})  # fmt: skip
        return failed(error)
    return list_calls(
        runtime.call_reader(), query, policy=runtime.access_policy,
        signer_sha256=signer,
    )  # fmt: skip


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
        raise NotApplied(f"command {self.request.id} reached the body of its task: the"
                         " worker's consumer applies commands (batching.py)")  # fmt: skip

    command_task.__doc__ = f"A queued {kind} command (``command``: its JSON); see CommandTask."
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
        # Outcomes kept for producers in PostgreSQL (adapters/results.py), past their expiry.
        expired = journal.forget_expired_results(runtime.engine())
        # Call events: the coming hours' partitions made, the hours whose events were all
        # published longer ago than the owner's retention dropped whole (0013).
        events = prune_published(runtime.engine())
        if events.dropped or events.deleted:
            logger.info("forgot the call events of %d hours (about %d events) and %d more,"
                        " all published longer ago than their retention", events.dropped,
                        events.dropped_rows_estimate, events.deleted)  # fmt: skip
        if events.busy:
            logger.warning("%d partitions of call events not made or dropped: commands held"
                           " the table for 2 s; the next run tries again", events.busy)  # fmt: skip
        return {"rotated": rotation.swapped, "retentionHours": hours,
                "keptSince": kept_since.isoformat(), "resultsForgotten": expired,
                "eventsForgotten": events.deleted,
                "eventPartitionsDropped": events.dropped,
                "eventPartitionsMade": events.created}  # fmt: skip

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
