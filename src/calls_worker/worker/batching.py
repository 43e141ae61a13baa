"""Group commit on Celery: command messages are buffered and applied a batch at a time.

Every command message comes this way; with CALLS_WORKER_COMMAND_BATCH_SIZE=1 each is a
batch of one. A producer still sends one command per message (docs/wire-format.md);
nothing it sees changes. In the worker's main process, Celery's own strategy receives
each message as always (decoding, signature, ETA of a retry, revocation, the
task-received event) and hands the request to ``on_task_request``, which
``RecordingConsumer`` points here for command tasks: the request joins a buffer, whatever
its command kind, in the order the messages arrived. The buffer goes to a pool process as
one job when it holds ``CALLS_WORKER_COMMAND_BATCH_SIZE`` requests, or
``CALLS_WORKER_COMMAND_BATCH_WAIT_MS`` after its first request came, whichever is first.

In the pool process (``apply_batch``) the messages take the one path of a command
(messages.py: checked, parsed, applied in one transaction by service/apply.py); what
becomes of each is decided by settling.py and done here: outcomes stored in the result
backend in one pipeline, logged and counted, retries sent, commands given up kept. The
job returns what became of each message. Only then does the main process settle each
message: acknowledged when its outcome is committed and stored (or it was given up and
kept, or sent again for a retry), put back when it was not applied. So the order is
commit, store, acknowledge; a worker that dies in between has its messages redelivered,
and a redelivery gets its first outcome from the processed-command record.

A message the broker delivers again (``redelivered``: its batch failed, or its worker
stopped holding it) is applied in a batch of its own. The broker, not this process,
remembers it, so the rule holds whichever worker process or machine the redelivery
reaches: a command that ends its batch every time (a poison) fails alone from its second
delivery on, and its batch-mates are applied.

Failure paths (settling.py's table), each settled per message with Celery's own request
handling:
- the pool process dies (SIGKILL, out of memory): every message of the batch goes back
  to the queue (``task_reject_on_worker_lost``), unless its outcome was stored already;
  on RabbitMQ a poison then reaches the delivery limit alone and is dead-lettered alone;
- the batch job raises (a defect): the messages of a batch of several go back to the queue
  after a pause (and come back alone); a batch of one is given up: kept among the
  rejected commands;
- the soft time limit: the command it interrupted is given up (kept among the rejected
  commands) and the others go back to the queue; the hard limit: each message is
  handled as Celery handles a task past it (kept, acknowledged);
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
from celery.worker.state import task_ready

from calls_worker.wire import sent_at
from calls_worker.worker.batch_job import (
    DONE,
    REQUEUE,
    REQUEUE_LATER,
    RETRIED,
    Job,
    apply_batch,
    pause,
)
from calls_worker.worker.keeping import give_up
from calls_worker.worker.metrics import worker_metrics
from calls_worker.worker.runtime import runtime_of
from calls_worker.worker.settling import Action, Failure, Situation, decide

logger = logging.getLogger("calls_worker")

# How long the messages of a batch that raised wait before they go back to the queue.
REQUEUE_PAUSE_SECONDS = 2.0


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
            answered(request)
            return
        if what == REQUEUE_LATER:
            self._requeue_later([request])
            return
        task_ready(request)
        if what == REQUEUE:
            request.reject(requeue=True)
            return
        request.acknowledge()
        if what != RETRIED:  # given up: its failure is its outcome
            answered(request)
        event = "task-retried" if what == RETRIED else "task-failed"
        request.send_event(event, exception=detail, traceback="")

    def on_error(self, exc_info: ExceptionInfo) -> None:
        error = exc_info.exception
        error = getattr(error, "exc", error)
        lost = isinstance(error, WorkerLostError | SystemExit | KeyboardInterrupt)
        worker_metrics().batch_failed("worker_lost" if lost else "raised")
        failure = Failure.WORKER_LOST if lost else Failure.BATCH_RAISED
        decision = decide(Situation(failure, alone=len(self.requests) == 1, in_pool=False))
        if decision.action == Action.CELERY:
            # Celery's own path: requeued (task_reject_on_worker_lost), or acknowledged
            # when the pool process had stored the outcome before it died.
            for request in self.requests:
                request.on_failure(exc_info)
            return
        if decision.action == Action.GIVE_UP and self._given_up(self.requests[0], error):
            return
        logger.error("a batch of %d commands raised, they go back to the queue: %r\n%s",
                     len(self.requests), error, exc_info.traceback,
                     extra={"batch_size": len(self.requests)})  # fmt: skip
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
        it cannot be kept now: it goes back to the queue later (settling.py)."""
        runtime = runtime_of(self.task.app)
        reason = f"failed: {error!r}"
        try:
            give_up(runtime, request.type, request.id, request.args, request.kwargs, reason)
        except Exception:
            pause(runtime, decide(Situation(Failure.NOT_KEPT, database_away=True,
                                             in_pool=False)))  # fmt: skip
            return False
        task_ready(request)
        request.acknowledge()
        answered(request)
        request.send_event("task-failed", exception=reason, traceback="")
        return True


def answered(request: Any) -> None:
    """Time the command from its producer's sentAt to now, its outcome stored and its
    message acknowledged (counted untimed without the header)."""
    headers = getattr(request, "request_dict", None)
    worker_metrics().answered(str(getattr(request, "type", "?")), sent_at(headers), time.time())


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
