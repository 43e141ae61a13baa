"""What a pool process runs for a batch of command messages (``apply_batch``): the one
path of a command (messages.py), then what settling.py decides for each message, done:
outcomes stored in the result backend in one pipeline, logged and counted, retries sent,
commands given up kept. It returns what became of each message; the main process
(batching.py) settles the messages accordingly."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.exceptions import Retry, SoftTimeLimitExceeded
from celery.utils.time import get_exponential_backoff_interval

from calls_worker.domain.outcome import Outcome
from calls_worker.worker.keeping import (
    CommandGaveUp,
    give_up,
    keep_invalid,
    keep_refused,
    log_outcome,
)
from calls_worker.worker.logs import COMMANDS_LOGGER
from calls_worker.worker.messages import Message, apply_messages
from calls_worker.worker.metrics import worker_metrics
from calls_worker.worker.outage import OUTCOME_STORE
from calls_worker.worker.runtime import Runtime, runtime_of
from calls_worker.worker.settling import (
    TRANSIENT_ERRORS,
    Action,
    Decision,
    Failure,
    Pause,
    Situation,
    database_away,
    decide,
)
from calls_worker.worker.tracing import batch_spans

logger = logging.getLogger("calls_worker")
command_lines = logging.getLogger(COMMANDS_LOGGER)

Item = tuple[str, str, dict[str, Any], Any, Any]
"""A message of a batch, as the pool process gets it: task name, id, request, args, kwargs."""
Job = Callable[[Any, list[Item]], list[tuple[str, str]]]
"""What a pool process runs for a batch (``apply_batch``; the benchmark's no-op batch)."""

# What became of a message, as the pool process tells the main process.
DONE, RETRIED, GAVE_UP, REQUEUE = "done", "retried", "gave_up", "requeue"
# Back to the queue after batching.REQUEUE_PAUSE_SECONDS: what the worker paused for (a result
# backend away) has stopped it taking commands by then, so RabbitMQ, which hands a message
# put back to a consumer at once, does not send it round and round to its delivery limit.
REQUEUE_LATER = "requeue_later"


def apply_batch(task: Task[Any, Any], items: list[Item]
                ) -> list[tuple[str, str]]:  # fmt: skip
    """In a pool process: apply a batch of command messages ``(task name, id, request,
    args, kwargs)`` (messages.py); for each, what became of it (settling.py decides) and
    a short description (the outcome's repr, or the error). Traced when an OTLP endpoint
    is configured (tracing.py)."""
    spans = batch_spans(items)
    if spans is None:
        return _apply_batch(task, items)
    codes: list[str | None] = [None] * len(items)
    try:
        settled = _apply_batch(task, items, codes)
    except BaseException as error:
        spans.failed(error)
        raise
    spans.end([(what, code) for (what, _), code in zip(settled, codes, strict=True)])
    return settled


def _apply_batch(task: Task[Any, Any], items: list[Item],
                 codes: list[str | None] | None = None) -> list[tuple[str, str]]:  # fmt: skip
    """``apply_batch``'s work; ``codes``, when given, gets each outcome's code."""
    app = task.app
    runtime = runtime_of(app)
    started = time.perf_counter()
    messages = [Message(name, task_id, tuple(args), kwargs)
                for name, task_id, _request, args, kwargs in items]  # fmt: skip
    applied, result = apply_messages(
        messages, runtime.unit_of_work, policy=runtime.access_policy, signed=runtime.signed,
        stop_on=(*TRANSIENT_ERRORS, SoftTimeLimitExceeded),
    )  # fmt: skip
    if codes is not None:
        for n, one in enumerate(applied):
            if one.outcome is not None:
                codes[n] = "ok" if one.outcome["ok"] else one.outcome["error"]["code"]
    budget = runtime.settings.command_max_retries
    alone = len(result.outcomes) == 1
    stored: dict[int, Outcome] = {}
    invalid: list[int] = []  # refused as invalid: their outcome is kept nowhere else
    settled: list[tuple[str, str]] = []
    for n, (item, one) in enumerate(zip(items, applied, strict=True)):
        retries = item[2].get("retries") or 0
        failure: BaseException | None = one.failure
        if one.invalid is not None:
            try:
                keep_invalid(runtime, messages[n], one.invalid)
                situation = Situation(Failure.INVALID)
                invalid.append(n)
            except TRANSIENT_ERRORS as error:
                failure = error
                situation = Situation(Failure.DATABASE, database_away(error), retries=retries,
                                      budget=budget)  # fmt: skip
        elif one.outcome is not None:
            situation = Situation(Failure.NONE)
        elif isinstance(failure, SoftTimeLimitExceeded):
            situation = Situation(Failure.SOFT_TIME_LIMIT, alone=alone,
                                  interrupted=one.interrupted)  # fmt: skip
        elif one.interrupted and failure is not result.stopped_by:
            situation = Situation(Failure.DEFECT)
        else:
            situation = Situation(Failure.DATABASE, database_away(failure or Exception()),
                                  retries=retries, budget=budget)  # fmt: skip
        decision = decide(situation)
        if decision.action == Action.ANSWER:
            assert one.outcome is not None
            stored[n] = one.outcome
            if one.refusal is not None:
                keep_refused(runtime, messages[n], one.refusal)
            if one.command is not None:
                log_outcome(one.command, messages[n], one.outcome)
            settled.append((DONE, _repr(app, item[0], one.outcome)))
        else:
            assert failure is not None
            settled.append(_carry_out(app, item, decision, situation, failure))

    try:
        store_outcomes(app, items, stored)
    except Exception as error:
        # The effects are committed and their outcomes are in the database: put back, the
        # messages would only be applied again as redeliveries, over and over, each return
        # counted toward RabbitMQ's delivery limit. Acknowledged; the worker pauses instead.
        # But an invalid command's outcome is in no table (it is kept among the rejected
        # ones, where its producer does not look): back to the queue, to be answered when
        # it comes back (and kept once, however often it comes).
        for n in stored:
            decision = decide(Situation(Failure.OUTCOME_NOT_STORED,
                                        kept_elsewhere=n not in invalid))  # fmt: skip
            pause(runtime, decision)
            if decision.action == Action.ALONE_LATER:
                settled[n] = (REQUEUE_LATER, "its outcome (invalid) could not be stored")
        worker_metrics().outcomes_not_stored(len(stored))
        logger.warning(
            "the outcomes of %d commands could not be stored in the result backend (%s);"
            " %d are applied and their outcomes kept in the database (calls.outcome)%s",
            len(stored), str(error).splitlines()[0] if str(error) else repr(error),
            len(stored) - len(invalid),
            f"; {len(invalid)} invalid go back to the queue" if invalid else "",
        )  # fmt: skip
    duration = time.perf_counter() - started
    metrics = worker_metrics()
    metrics.batch(size=len(items), duration=duration,
                  result="stopped" if result.stopped_by is not None else "done")  # fmt: skip
    command_lines.info(
        "batch of %d commands applied in %.1f ms: %d transaction(s)%s",
        len(items), duration * 1000, result.commits,
        f", {result.redone} part(s) applied again after a refused write" if result.redone else "",
        extra={"batch_size": len(items), "batch_ms": round(duration * 1000, 3),
               "commits": result.commits, "redone": result.redone},
    )  # fmt: skip
    return settled


def pause(runtime: Runtime, decision: Decision) -> None:
    """Stop taking commands until what failed answers again (outage.py)."""
    if decision.pause == Pause.DATABASE:
        runtime.database_watch.report_away()
    elif decision.pause == Pause.OUTCOME_STORE:
        runtime.database_watch.report_away(OUTCOME_STORE)


def _carry_out(app: Any, item: Item, decision: Decision, situation: Situation,
               error: BaseException) -> tuple[str, str]:  # fmt: skip
    """Do what ``decision`` says with a message that has no outcome to answer with."""
    runtime = runtime_of(app)
    pause(runtime, decision)
    settings = runtime.settings
    match decision.action:
        case Action.RETRY | Action.RETRY_AT_LONGEST:
            retries = item[2].get("retries") or 0
            countdown = settings.command_retry_backoff_max_seconds
            if decision.action == Action.RETRY:
                countdown = get_exponential_backoff_interval(
                    factor=1, retries=retries, maximum=countdown, full_jitter=True,
                )  # fmt: skip
            return _send_again(app, item, error, countdown)
        case Action.GIVE_UP:
            reason = _reason(situation, error)
            try:
                rejected_id = give_up(runtime, item[0], item[1], item[3], item[4], reason)
            except Exception as unkept:  # the database is away: the broker keeps it
                logger.warning(
                    "command %s is given up but cannot be kept either (%s): it stays queued",
                    item[1], str(unkept).splitlines()[0] if str(unkept) else repr(unkept),
                    extra={"command_id": item[1]},
                )  # fmt: skip
                kept = Situation(Failure.NOT_KEPT, database_away=True)
                return _carry_out(app, item, decide(kept), kept, error)
            gave_up = CommandGaveUp(f"command {item[1]} {reason}; kept as rejected command"
                                    f" {rejected_id}")  # fmt: skip
            app.tasks[item[0]].backend.mark_as_failure(item[1], gave_up,
                                                       request=_context(app, item))  # fmt: skip
            return GAVE_UP, repr(gave_up)
        case Action.ALONE:
            return REQUEUE, f"its batch was stopped: {error!r}"
        case Action.ALONE_LATER:
            return REQUEUE_LATER, f"back to the queue after a pause: {error!r}"
    raise AssertionError(f"{decision} is not for a message in a pool process")


def _reason(situation: Situation, error: BaseException) -> str:
    """Why a command was given up, as kept among the rejected commands."""
    match situation.failure:
        case Failure.DATABASE:
            return f"failed after {situation.retries} retries: {error!r}"
        case Failure.SOFT_TIME_LIMIT:
            return f"ran past its soft time limit: {error!r}"
    return f"failed: {error!r}"


def _send_again(app: Any, item: Item, error: BaseException, countdown: float
                ) -> tuple[str, str]:  # fmt: skip
    """Celery's retry of the command's own task, with its request: a new message with
    ``retries`` + 1, after ``countdown`` seconds; RETRIED."""
    name, task_id, _request, args, kwargs = item
    task = app.tasks[name]
    cause = error if isinstance(error, Exception) else Exception(repr(error))
    task.request_stack.push(_context(app, item))
    try:
        task.retry(exc=cause, countdown=countdown)
    except Retry as retry:
        task.on_retry(cause, task_id, args, kwargs, None)
        return RETRIED, repr(retry)
    finally:
        task.request_stack.pop()
    raise AssertionError("Task.retry raises Retry")  # pragma: no cover


def _repr(app: Any, name: str, outcome: Outcome) -> str:
    """The start of the outcome, for the task-succeeded event (Flower shows it): ok or the
    error code comes first. ``repr`` cut short, not Celery's saferepr, which cost a fifth
    of a batch's time."""
    limit = app.tasks[name].resultrepr_maxsize
    text = repr(outcome)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _context(app: Any, item: Item) -> Any:
    from celery.app.task import Context

    _name, _task_id, request, args, kwargs = item
    return Context(request, args=args, kwargs=kwargs, called_directly=False, is_eager=False)


def store_outcomes(app: Any, items: list[Item],
                   outcomes: dict[int, Outcome]) -> None:  # fmt: skip
    """The outcomes in the result backend: one pipeline for the batch when it is Redis, one
    statement when it is PostgreSQL (adapters/results.py). A producer that sent a command with
    ``ignore_result`` gets none stored."""
    outcomes = {n: o for n, o in outcomes.items() if not items[n][2].get("ignore_result")}
    if not outcomes:
        return
    backend = app.backend
    client = getattr(backend, "client", None)
    set_many = getattr(backend, "set_many", None)
    if set_many is not None:
        set_many(_encoded(app, items, outcomes))
        return
    if client is None or not hasattr(client, "pipeline"):
        for n, outcome in outcomes.items():
            backend.mark_as_done(items[n][1], outcome, request=_context(app, items[n]))
        return
    with client.pipeline(transaction=False) as pipe:
        for key, value in _encoded(app, items, outcomes):
            if backend.expires:
                pipe.setex(key, backend.expires, value)
            else:
                pipe.set(key, value)
            pipe.publish(key, value)  # a producer waiting on the result is told at once
        pipe.execute()


def _encoded(app: Any, items: list[Item], outcomes: dict[int, Outcome]) -> list[tuple[Any, Any]]:
    """Each outcome as its key and value in a key/value result backend."""
    from celery import states

    backend = app.backend
    # The request adds to the stored meta only with result_extended (and for groups and
    # chords, which commands are not part of).
    extended = app.conf.find_value_for_key("extended", "result")
    pairs = []
    for n, outcome in outcomes.items():
        task_id = items[n][1]
        request = _context(app, items[n]) if extended else None
        meta = backend._get_result_meta(
            result=outcome, state=states.SUCCESS, traceback=None, request=request
        )
        meta["task_id"] = task_id
        pairs.append((backend.get_key_for_task(task_id), backend.encode(meta)))
    return pairs


