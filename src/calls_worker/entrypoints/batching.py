"""Group commit on Celery: command messages are buffered and applied a batch at a time.

A producer still sends one command per message (docs/wire-format.md); nothing it sees
changes. In the worker's main process, Celery's own strategy receives each message as
always (decoding, signature, ETA of a retry, revocation, the task-received event) and
hands the request to ``on_task_request``, which ``RecordingConsumer`` points here for
command tasks: the request joins a buffer, whatever its command kind, in the order the
messages arrived. The buffer goes to a pool process as one job when it holds
``CALLS_WORKER_COMMAND_BATCH_SIZE`` requests, or ``CALLS_WORKER_COMMAND_BATCH_WAIT_MS``
after its first request came, whichever is first.

In the pool process (``apply_batch``) the commands are parsed, applied in one transaction
(service/batch.py), their outcomes stored in the result backend in one pipeline, logged
and counted; the job returns what became of each message. Only then does the main
process settle each message: acknowledged when its outcome is committed and stored (or it
was given up and kept, or republished for a retry, exactly as a lone command would be),
put back when it was not applied. So the order is commit, store, acknowledge; a worker
that dies in between has its messages redelivered, and a redelivery gets its first
outcome from the processed-command record.

A message the broker delivers again (``redelivered``: its batch failed, or its worker
stopped holding it) is applied in a batch of its own. The broker, not this process,
remembers it, so the rule holds whichever worker process or machine the redelivery
reaches: a command that ends its batch every time (a poison) fails alone from its second
delivery on, and its batch-mates are applied.

Failure paths, each settled per message with Celery's own request handling:
- the pool process dies (SIGKILL, out of memory): every message of the batch goes back
  to the queue (``task_reject_on_worker_lost``), unless its outcome was stored already;
  on RabbitMQ a poison then reaches the delivery limit alone and is dead-lettered alone;
- the batch job raises (a defect): the messages of a batch of several go back to the queue
  after a pause (and come back alone); a batch of one is given up: kept among the rejected
  commands, as a lone task that raises is;
- the soft time limit: the command it interrupted is given up (kept among the rejected
  commands) and the others go back to the queue; the hard limit: each message is
  handled as Celery handles a lone task past it (kept, acknowledged);
- the result backend does not take the outcomes: the commands are committed, their
  outcomes in the database; the messages are acknowledged, and the worker stops taking
  commands until the backend answers (outage.py), as for a database away;
- the broker connection is lost: the buffer is dropped (the broker redelivers its
  messages; they can no longer be acknowledged on the new channel) and the flush timer
  with it, so nothing waits on a timer of the old connection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from billiard.einfo import ExceptionInfo
from billiard.exceptions import WorkerLostError
from celery import Task
from celery.exceptions import Retry, SoftTimeLimitExceeded
from celery.worker.state import task_ready

from calls_worker.adapters.db import journal
from calls_worker.domain.commands import parse_command
from calls_worker.domain.errors import InvalidCommand
from calls_worker.domain.outcome import Outcome
from calls_worker.entrypoints import tasks
from calls_worker.entrypoints.metrics import worker_metrics
from calls_worker.entrypoints.outage import OUTCOME_STORE
from calls_worker.entrypoints.runtime import runtime_of
from calls_worker.service.batch import BatchEntry, handle_batch

logger = logging.getLogger("calls_worker")

# How long the messages of a batch that raised wait before they go back to the queue.
REQUEUE_PAUSE_SECONDS = 2.0

Item = tuple[str, str, dict[str, Any], Any, Any]
"""A message of a batch, as the pool process gets it: task name, id, request, args, kwargs."""
Job = Callable[[Any, list[Item]], list[tuple[str, str]]]
"""What a pool process runs for a batch (``apply_batch``; the benchmark's no-op batch)."""

# What became of a message, as the pool process tells the main process.
DONE, RETRIED, GAVE_UP, REQUEUE = "done", "retried", "gave_up", "requeue"
# Back to the queue after REQUEUE_PAUSE_SECONDS: what the worker paused for (a result
# backend away) has stopped it taking commands by then, so RabbitMQ, which hands a message
# put back to a consumer at once, does not send it round and round to its delivery limit.
REQUEUE_LATER = "requeue_later"


def apply_batch(task: Task[Any, Any], items: list[Item]
                ) -> list[tuple[str, str]]:  # fmt: skip
    """In a pool process: apply a batch of command messages ``(task name, id, request,
    args, kwargs)``; for each, what became of it and a short description (the outcome's
    repr, or the error)."""
    app = task.app
    runtime = runtime_of(app)
    started = time.perf_counter()
    settled: list[tuple[str, str] | None] = [None] * len(items)
    stored: dict[int, Outcome] = {}
    invalid: list[int] = []  # refused as invalid: their outcome is kept nowhere else
    entries: list[BatchEntry] = []
    at: list[int] = []  # the item of each entry
    for n, (name, task_id, _request, args, kwargs) in enumerate(items):
        kind = tasks.KIND_BY_TASK[name]
        try:
            payload, signer = tasks.command_payload(
                tuple(args), kwargs, command_id=task_id, task_name=name, signed=runtime.signed
            )
            command = parse_command(kind, payload if isinstance(payload, str)
                                    else tasks.mapping_of(payload))  # fmt: skip
        except InvalidCommand as error:
            try:
                stored[n] = tasks.reject_invalid(runtime, name, task_id, kind, args, kwargs, error)
                invalid.append(n)
            except tasks.TRANSIENT_ERRORS as away:
                settled[n] = _retry(app, items[n], away)
                continue
            settled[n] = (DONE, _repr(app, name, stored[n]))
            continue
        entries.append(BatchEntry(task_id, command, signer))
        at.append(n)

    result = handle_batch(
        entries, runtime.unit_of_work, policy=runtime.access_policy,
        stop_on=(*tasks.TRANSIENT_ERRORS, SoftTimeLimitExceeded),
    )  # fmt: skip
    for e, outcome in enumerate(result.outcomes):
        n = at[e]
        name, task_id = items[n][0], items[n][1]
        if outcome is not None:
            stored[n] = outcome
            kept = result.kept.get(e)
            if kept is not None:
                tasks.keep_refused(runtime, name, task_id, items[n][3], items[n][4], kept)
            tasks.log_outcome(tasks.KIND_BY_TASK[name], task_id, entries[e].command, outcome)
            settled[n] = (DONE, _repr(app, name, outcome))
        elif e in result.failed:
            settled[n] = _give_up(app, items[n], result.failed[e], f"failed: {result.failed[e]!r}")
        elif isinstance(result.stopped_by, SoftTimeLimitExceeded):
            # The command it interrupted, or the only one, would only hang again: it is
            # given up, as a lone command is. The others go back to the queue.
            if e == result.stopped_at or len(entries) == 1:
                reason = f"ran past its soft time limit: {result.stopped_by!r}"
                settled[n] = _give_up(app, items[n], result.stopped_by, reason)
            else:  # it comes back redelivered, so alone
                settled[n] = (REQUEUE, "its batch ran past the soft time limit")
        else:
            assert isinstance(result.stopped_by, Exception)
            settled[n] = _retry(app, items[n], result.stopped_by)

    try:
        store_outcomes(app, items, stored)
    except Exception as error:
        # The effects are committed and their outcomes are in the database: put back, the
        # messages would only be applied again as redeliveries, over and over, each return
        # counted toward RabbitMQ's delivery limit. Acknowledged; the worker pauses instead.
        runtime.database_watch.report_away(OUTCOME_STORE)
        worker_metrics().outcomes_not_stored(len(stored))
        # But an invalid command's outcome is in no table (it is kept among the rejected
        # ones, where its producer does not look): back to the queue, to be answered when
        # it comes back (and kept once, however often it comes).
        for n in invalid:
            settled[n] = (REQUEUE_LATER, "its outcome (invalid) could not be stored")
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
    logger.info(
        "batch of %d commands applied in %.1f ms: %d transaction(s)%s",
        len(items), duration * 1000, result.commits,
        f", {result.redone} part(s) applied again after a refused write" if result.redone else "",
        extra={"batch_size": len(items), "batch_ms": round(duration * 1000, 3),
               "commits": result.commits, "redone": result.redone},
    )  # fmt: skip
    return [s if s is not None else (REQUEUE, "not reached") for s in settled]


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


def _retry(app: Any, item: Item, error: Exception) -> tuple[str, str]:
    """A lone command's retry: republished with a backoff (or given up past its budget)."""
    return _by_task_policy(
        app, item, lambda task, args, kwargs: tasks.retry_or_give_up(task, error, args, kwargs),
        retried_for=error,
    )  # fmt: skip


def _give_up(app: Any, item: Item, error: BaseException, reason: str) -> tuple[str, str]:
    """A command kept among the rejected ones, with ``reason`` (retried instead when the
    database cannot keep it)."""
    cause = error if isinstance(error, Exception) else Exception(repr(error))
    return _by_task_policy(
        app, item, lambda task, args, kwargs: tasks.give_up(task, cause, args, kwargs, reason),
        retried_for=Exception(reason),
    )  # fmt: skip


def _by_task_policy(app: Any, item: Item, decide: Callable[[Any, Any, Any], Exception],
                    retried_for: Exception) -> tuple[str, str]:  # fmt: skip
    """Run ``decide`` (tasks.py's policy for a lone command) as the command's own task, with
    its request: RETRIED when it republished the command, else GAVE_UP with the error it
    returned stored as the command's failure."""
    name, task_id, _request, args, kwargs = item
    task = app.tasks[name]
    task.request_stack.push(_context(app, item))
    try:
        gave_up = decide(task, args, kwargs)
    except Retry as retry:
        task.on_retry(retried_for, task_id, args, kwargs, None)
        return RETRIED, repr(retry)
    finally:
        task.request_stack.pop()
    task.backend.mark_as_failure(task_id, gave_up, request=_context(app, item))
    return GAVE_UP, repr(gave_up)


def store_outcomes(app: Any, items: list[Item],
                   outcomes: dict[int, Outcome]) -> None:  # fmt: skip
    """The outcomes in the result backend: one pipeline for the batch when it is Redis, one
    statement when it is PostgreSQL (results.py). A producer that sent a command with
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


class BatchRequest:
    """A batch of command requests, sent to the pool as one job (duck-types the one
    method of a Celery request the worker calls: ``execute_using_pool``)."""

    def __init__(self, requests: list[Any], task: Task[Any, Any],
                 later: Callable[[float, Callable[[], None]], Any],
                 job: Job | None = None) -> None:  # fmt: skip
        self.requests = requests
        self.job: Job = job or apply_batch
        self.task = task
        self.later = later
        self.id = requests[0].id

    def execute_using_pool(self, pool: Any, **_: Any) -> Any:
        time_limit = self.task.time_limit or self.task.app.conf.task_time_limit
        soft_limit = self.task.soft_time_limit or self.task.app.conf.task_soft_time_limit
        items = [(r.type, r.id, r.request_dict, r.args, r.kwargs) for r in self.requests]
        return pool.apply_async(
            self.job,
            args=(self.task, items),
            accept_callback=self.on_accepted,
            timeout_callback=self.on_timeout,
            callback=self.on_return,
            error_callback=self.on_error,
            soft_timeout=soft_limit,
            timeout=time_limit,
            correlation_id=self.id,
        )

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        for request in self.requests:
            request.on_accepted(pid, time_accepted)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        for request in self.requests:
            request.on_timeout(soft, timeout)

    def on_return(self, settled: list[tuple[str, str]]) -> None:
        started = min((getattr(r, "time_start", None) or time.time()) for r in self.requests)
        runtime = time.time() - started
        for request, (what, detail) in zip(self.requests, settled, strict=True):
            self._settle(request, what, detail, runtime)

    def _settle(self, request: Any, what: str, detail: str, runtime: float) -> None:
        # A message of a broker connection lost since it came is left to the broker
        # (consumer._tolerate_lost_channel): settling it raises nothing here.
        if what == DONE:
            request.on_success((False, detail, runtime))
            return
        if what == REQUEUE_LATER:
            self._requeue_later([request])
            return
        task_ready(request)
        if what == REQUEUE:
            request.reject(requeue=True)
            return
        request.acknowledge()
        event = "task-retried" if what == RETRIED else "task-failed"
        request.send_event(event, exception=detail, traceback="")

    def on_error(self, exc_info: ExceptionInfo) -> None:
        error = exc_info.exception
        error = getattr(error, "exc", error)
        if isinstance(error, WorkerLostError | SystemExit | KeyboardInterrupt):
            # Celery's own path: requeued (task_reject_on_worker_lost), or acknowledged
            # when the pool process had stored the outcome before it died.
            worker_metrics().batch_failed("worker_lost")
            for request in self.requests:
                request.on_failure(exc_info)
            return
        worker_metrics().batch_failed("raised")
        size = len(self.requests)
        if size == 1 and self._given_up(self.requests[0], error):
            return
        logger.error("a batch of %d commands raised, they go back to the queue: %r\n%s", size,
                     error, exc_info.traceback, extra={"batch_size": size})  # fmt: skip
        self._requeue_later(self.requests)

    def _requeue_later(self, requests: list[Any]) -> None:
        """``requests`` back to the queue after REQUEUE_PAUSE_SECONDS."""

        def requeue() -> None:
            for request in requests:
                task_ready(request)
                request.reject(requeue=True)

        self.later(REQUEUE_PAUSE_SECONDS, requeue)

    def _given_up(self, request: Any, error: object) -> bool:
        """A command that raised alone: kept among the rejected commands, acknowledged
        (as Celery's on_failure does for a lone task; CommandTask.on_failure). False when
        it cannot be kept now: it goes back to the queue."""
        runtime = runtime_of(self.task.app)
        reason = f"failed: {error!r}"
        try:
            rejected_id = journal.record_rejected(
                runtime.unpooled_engine(), task_name=request.type, command_id=request.id,
                raw_body=tasks.raw_body(request.args, request.kwargs), reason=reason,
            )  # fmt: skip
        except Exception:
            runtime.database_watch.report_away()
            return False
        worker_metrics().rejection("gave_up")
        logger.error("command %s %s; kept as rejected command %s", request.id, reason,
                     rejected_id, extra={"command_id": request.id})  # fmt: skip
        task_ready(request)
        request.acknowledge()
        request.send_event("task-failed", exception=reason, traceback="")
        return True


class CommandBatcher:
    """The main process's buffer of command requests (see the module's docstring)."""

    def __init__(self, consumer: Any, process: Callable[[Any], Any], size: int,
                 wait_seconds: float, job: Job | None = None) -> None:  # fmt: skip
        self.job = job
        self.consumer = consumer
        self.process = process
        self.size = size
        self.wait_seconds = wait_seconds
        self.buffer: list[Any] = []
        self.generation = 0
        """Bumped whenever the buffer is emptied: a flush timer of an older one does nothing."""
        self.timer_set = False

    def add(self, request: Any) -> None:
        if (request.delivery_info or {}).get("redelivered"):
            # Its batch failed, or its worker stopped holding it: alone, so that a poison
            # takes no batch-mates with it (the module's docstring).
            self.process(BatchRequest([request], request.task, self.consumer.timer.call_after,
                                      self.job))  # fmt: skip
            return
        self.buffer.append(request)
        if len(self.buffer) >= self.size:
            self.flush()
        elif not self.timer_set:
            self.timer_set = True
            generation = self.generation
            self.consumer.timer.call_after(self.wait_seconds, lambda: self._due(generation))

    def _due(self, generation: int) -> None:
        if generation == self.generation:
            self.flush()

    def flush(self) -> None:
        batch, self.buffer = self.buffer, []
        self.generation += 1
        self.timer_set = False
        if not batch:
            return
        task = batch[0].task
        self.process(BatchRequest(batch, task, self.consumer.timer.call_after, self.job))

    def route(self, names: frozenset[str]) -> Callable[[Any], Any]:
        """What the consumer hands each request to: those of ``names`` join the buffer,
        the others go on as Celery would send them (to ``process``)."""
        process = self.process

        def on_task_request(request: Any) -> Any:
            if request.type in names:
                return self.add(request)
            return process(request)

        return on_task_request

    def forget(self) -> None:
        """The connection is lost: its messages come back from the broker, not from here."""
        dropped = len(self.buffer)
        self.buffer = []
        self.generation += 1
        self.timer_set = False
        if dropped:
            logger.warning("connection lost with %d commands buffered: the broker redelivers "
                           "them", dropped)  # fmt: skip
