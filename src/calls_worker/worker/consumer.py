"""A Celery consumer that keeps every message it cannot run, instead of only logging it.

Celery acknowledges (and so drops) a message it cannot decode, whose content type it
refuses (pickle), or whose task it does not know. Each is first written to the
rejected-commands table with its raw body and the reason, where an operator can see it
and replay it (``calls-worker dead-letters``).

Two kinds of message never reach Celery's own handling here: one larger than
``CALLS_WORKER_MAX_MESSAGE_BYTES`` (kept truncated), and one whose content type the worker
does not accept. The second matters because kombu trusts ``application/data`` and
``application/text`` whatever ``accept_content`` says: such a body reaches Celery's task
strategy undecoded, which raises where nothing catches it and the worker process exits
(Celery issue 4308), and every redelivery then kills the next worker. Anything else that
Celery's strategy raises is kept the same way instead of ending the process.

A message is acknowledged only once it is kept: while the database cannot take it, it
goes back to the queue (after a pause, so an outage is not a busy loop). What a database
that answers refuses is kept escaped, or else dropped with an error line and a counter,
never sent round again (``_record``).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from celery import bootsteps
from celery.utils.time import maybe_iso8601, maybe_make_aware
from celery.worker.consumer import Consumer
from kombu import serialization
from vine import promise

from calls_worker.adapters.db import journal
from calls_worker.wire import (
    COMMAND_ID_LIMIT,
    COMMANDS_QUEUE,
    DELIVERY_LIMIT,
    SWEEPS_QUEUE,
    TASK_NAMES,
    dead_letters_queue,
    is_amqp,
)
from calls_worker.worker.batching import CommandBatcher
from calls_worker.worker.health import HEARTBEAT
from calls_worker.worker.keeping import CommandGaveUp
from calls_worker.worker.metrics import worker_metrics
from calls_worker.worker.outage import WATCH_SECONDS, CommandsPause, stores_answer
from calls_worker.worker.runtime import runtime_of
from calls_worker.worker.settling import Action, Failure, Situation, database_away, decide

logger = logging.getLogger("calls_worker")

# How much of a body a log line shows; the rejected-commands table keeps the rest.
LOGGED_PREFIX = 512
# How long a message waits before it goes back to the queue when it could not be kept.
REQUEUE_PAUSE_SECONDS = 2.0


def _tolerate_lost_channel(message: Any) -> None:
    """Celery settles a message later, from the event loop; if the broker connection was
    lost meanwhile, kombu's Redis transport raises AttributeError putting it back (its
    channel has no client any more), which would end the worker. Such a message is left to
    the broker, which delivers it again."""
    for name in ("ack_log_error", "reject_log_error"):
        settle = getattr(message, name)

        def tolerant(*args: Any, _settle: Any = settle, **kwargs: Any) -> Any:
            try:
                return _settle(*args, **kwargs)
            except AttributeError as error:
                logger.warning("a message of a lost broker connection was not settled (%r);"
                               " the broker delivers it again", error)  # fmt: skip
                return None

        setattr(message, name, tolerant)


def unusable_command_id(headers: Any) -> str | None:
    """Why a task message's ``id`` header cannot be a command id (None: it can). It keys the
    outcome in the database, so it must be text PostgreSQL can hold, of 1 to
    COMMAND_ID_LIMIT characters (docs/wire-format.md); a message with another is kept with
    the reason before it reaches a batch, whose commit it would otherwise fail every time."""
    if not isinstance(headers, dict) or "task" not in headers:
        return None  # not a protocol 2 message: Celery's own handling says what it is
    command_id = headers.get("id")
    if not isinstance(command_id, str):
        return f"the id header must be a string (a command id), not {type(command_id).__name__}"
    if not 0 < len(command_id) <= COMMAND_ID_LIMIT:
        return (f"the command id has {len(command_id)} characters: a command id has 1 to"
                f" {COMMAND_ID_LIMIT}")  # fmt: skip
    if "\x00" in command_id or not command_id.isprintable():
        return "the command id holds a NUL or another control character"
    return None


# The tasks whose messages are applied in batches (group commit: worker/batching.py).
BATCHED_TASKS = frozenset(TASK_NAMES.values())


def expired_command(headers: Any, now: datetime | None = None) -> str | None:
    """Why a command message is not applied because its ``expires`` has passed (None: it has
    none, or it has not passed). Celery would acknowledge such a message and mark it revoked
    in the result backend, leaving no trace an operator sees; the worker keeps it instead,
    unapplied, with this reason (docs/wire-format.md, "Delivery"). A value that is not a
    time is left to Celery, which refuses the message as invalid (also kept)."""
    if not isinstance(headers, dict) or headers.get("task") not in BATCHED_TASKS:
        return None
    expires = headers.get("expires")
    if expires is None:
        return None
    try:
        parsed = maybe_iso8601(expires)
    except (TypeError, ValueError):
        return None
    if parsed is None:
        return None
    deadline = maybe_make_aware(parsed)
    if deadline >= (now or datetime.now(UTC)):
        return None
    return (f"expired: its expires ({deadline.isoformat()}) had passed when a worker took it;"
            " not applied")  # fmt: skip


class RecordingConsumer(Consumer):
    def __init__(self, on_task_request: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(on_task_request, *args, **kwargs)
        settings = runtime_of(self.app).settings
        # Every command is applied by batching.py: in batches of one when the batch size
        # is 1 (messages.py is the one path of a command).
        self.batcher = CommandBatcher(
            self, on_task_request, settings.command_batch_size,
            settings.command_batch_wait_ms / 1000,
        )  # fmt: skip
        # Celery's strategies (and its ETA timer) hand every request to this.
        self.on_task_request = self.batcher.route(BATCHED_TASKS)
        runtime = runtime_of(self.app)
        self.commands_pause = CommandsPause(
            self, runtime.database_watch, COMMANDS_QUEUE,
            lambda: stores_answer(runtime.unpooled_engine(), self.app.backend),
        )  # fmt: skip
        self.timer.call_repeatedly(WATCH_SECONDS, self.commands_pause.check)
        self.timer.call_repeatedly(WATCH_SECONDS, HEARTBEAT.beat)  # liveness (health.py)
        # Not a command against a schema older than this release's (outage.py): until
        # migrate has run, the commands queue is not consumed (pings are answered).
        queues = self.app.amqp.queues
        consumed = COMMANDS_QUEUE in (queues.consume_from or {})
        behind = self.commands_pause.not_ready(runtime.unpooled_engine()) if consumed else None
        if behind is not None:
            queues.deselect([COMMANDS_QUEUE])
            self.commands_pause.hold(behind)
        elif consumed:
            worker_metrics().consuming_commands(True)

    def on_close(self) -> None:
        super().on_close()
        self.batcher.forget()

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        """Celery closes the lost connection; with messages delivered and unacknowledged
        (a batch buffered or running), kombu's Redis transport tries to put them back while
        closing, on a connection its collect() has already torn down, and raises
        AttributeError ('NoneType' object has no attribute 'hostname'), which Celery takes
        for an unrecoverable error: the worker exits. The connection is gone either way
        (Celery let go of it first), and the messages are not lost: they stay recorded as
        unacknowledged and come back after the visibility timeout. So reconnect."""
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError as error:
            logger.warning("closing the lost broker connection failed (%r); the messages it"
                           " held come back after the visibility timeout", error)  # fmt: skip

    def create_task_handler(self, promise: Any = promise) -> Any:
        handle = super().create_task_handler(promise)
        accepted: set[str] = (
            serialization.prepare_accept_content(self.app.conf.accept_content) or set()
        )
        limit = runtime_of(self.app).settings.max_message_bytes
        connection_errors = self._connection_errors()

        def on_task_received(message: Any) -> None:
            size = len(message.body or b"")
            if size > limit:
                self._refuse(
                    message,
                    f"message of {size} bytes is over the limit of {limit} bytes"
                    " (CALLS_WORKER_MAX_MESSAGE_BYTES); kept truncated",
                    limit,
                )
                return
            if message.content_type not in accepted:
                # registry is not in kombu's type stubs
                known = serialization.registry.type_to_name.get(  # type: ignore[attr-defined]
                    message.content_type
                )
                named = f" ({known})" if known else ""
                self._refuse(
                    message,
                    f"content type {message.content_type!r}{named} is not accepted"
                    f" (accepted: {', '.join(sorted(accepted))})",
                    limit,
                )
                return
            unusable = unusable_command_id(message.headers) or expired_command(message.headers)
            if unusable is not None:
                self._refuse(message, unusable, limit)
                return
            _tolerate_lost_channel(message)
            try:
                handle(message)
            except connection_errors:
                raise
            except Exception as error:  # whatever Celery did not expect must not end the worker
                self._refuse(message, f"message cannot be handled: {error!r}", limit)

        return on_task_received

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        if self._record(message, f"message cannot be decoded: {exc}"):
            super().on_decode_error(message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        if self._record(message, f"message refused: {exc}"):
            super().on_invalid_task(body, message, exc)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        if self._record(message, f"unknown task: {exc}"):
            super().on_unknown_task(body, message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        if self._record(message, "not a task message"):
            super().on_unknown_message(body, message)

    def _connection_errors(self) -> tuple[type[BaseException], ...]:
        errors: tuple[type[BaseException], ...] = self.connection_errors  # type: ignore[attr-defined]
        return errors

    def _refuse(self, message: Any, reason: str, limit: int) -> None:
        # Celery may have settled it already before raising; settling twice would raise.
        if self._record(message, reason, limit) and not message.acknowledged:
            message.reject_log_error(logger, self._connection_errors())

    def _record(self, message: Any, reason: str, limit: int | None = None) -> bool:
        """Keep the message with ``reason``; True when the caller may settle it.

        Only a database that does not answer keeps a message waiting: it goes back to its
        queue after a pause (on the consumer's timer: the loop itself never sleeps, its
        heartbeats go on), and False. What a database that answers refuses is not the
        database being away: the values are stored escaped (journal.storable_text), and a
        message that still cannot be kept is dropped with an error line and the counter
        ``calls_worker_rejected_commands_total{stage="dropped"}``, so that it never loops.
        """
        headers = getattr(message, "headers", None) or {}
        if not isinstance(headers, dict):
            headers = {}
        body = message.body or b""
        task_name = str(headers.get("task") or "?")
        command_id = None if headers.get("id") is None else str(headers["id"])
        runtime = runtime_of(self.app)
        try:
            rejected_id = journal.record_rejected(
                runtime.unpooled_engine(),
                task_name=task_name,
                command_id=command_id,
                raw_body=journal.body_text(body if limit is None else body[:limit]),
                reason=f"{reason} (content type {message.content_type!r})",
            )
        except Exception as error:
            decision = decide(Situation(Failure.MESSAGE_NOT_KEPT, database_away(error)))
            if decision.action == Action.DROP:
                worker_metrics().rejection("dropped")
                logger.error(
                    "a rejected message could not be kept and is dropped (%s; the database"
                    " refused it: %s); task %r, id %r, its body starts: %r",
                    reason, str(error).splitlines()[0] if str(error) else repr(error),
                    task_name[:LOGGED_PREFIX], (command_id or "")[:LOGGED_PREFIX],
                    body[:LOGGED_PREFIX],
                )  # fmt: skip
                return True
            runtime.database_watch.report_away()
            logger.exception(
                "could not keep a rejected message (%s); it goes back to its queue: %r",
                reason,
                body[:LOGGED_PREFIX],
            )
            self.timer.call_after(REQUEUE_PAUSE_SECONDS, lambda: self._requeue(message))
            return False
        worker_metrics().rejection("message")
        logger.warning("message rejected as %s: %s", rejected_id, reason)
        return True

    def _requeue(self, message: Any) -> None:
        if not message.acknowledged:
            message.reject_log_error(logger, self._connection_errors(), requeue=True)


def already_settled(headers: dict[str, Any]) -> bool:
    """Whether RabbitMQ dead-lettered a message that needs no keeping: one a worker rejected
    (it rejects only a message it has kept), or a sweep that expired in the sweeps' queue (the
    next one supersedes it). A message that expired anywhere else (a command sent with
    Celery's ``expires``, which RabbitMQ turns into a per-message expiration) is kept."""
    reason = headers.get("x-first-death-reason")
    if reason == "rejected":
        return True
    return reason == "expired" and headers.get("x-first-death-queue") == SWEEPS_QUEUE


def dead_letter_reason(headers: dict[str, Any]) -> str:
    """Why RabbitMQ dead-lettered a message, from the headers it added."""
    reason = headers.get("x-first-death-reason", "?")
    queue = headers.get("x-first-death-queue", "?")
    if reason == "expired":
        return (f"dead-lettered by RabbitMQ from {queue}: expired there before a worker took it"
                " (the producer's expires); not applied")  # fmt: skip
    if reason == "delivery_limit":
        return (
            f"dead-lettered by RabbitMQ from {queue}: delivered more than {DELIVERY_LIMIT} times"
            " without being settled (each time its worker stopped or died holding it: a"
            " message that ends its worker, or that many restarts)"
        )
    return f"dead-lettered by RabbitMQ from {queue}: {reason}"


class DeadLetters(bootsteps.ConsumerStep):
    """RabbitMQ only: the dead-letter queue's messages are kept among the rejected commands
    (``calls-worker dead-letters list``, replayable), then acknowledged; a message that
    cannot be kept yet goes back to that queue, which has no delivery limit. A worker that
    takes commands runs it; each message is taken by one of them."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def include_if(self, c: Any) -> bool:
        if not is_amqp(c.app.conf.broker_url):
            return False
        consumed = c.app.amqp.queues.consume_from
        return consumed is None or COMMANDS_QUEUE in consumed

    def get_consumers(self, channel: Any) -> list[Any]:
        from kombu import Consumer

        # Celery gives the step a channel of its own: this prefetch is not the commands'.
        return [Consumer(channel, queues=[dead_letters_queue()], on_message=self._on_message,
                         prefetch_count=16, no_ack=False)]  # fmt: skip

    def _on_message(self, message: Any) -> None:
        consumer = self._consumer
        headers = message.headers if isinstance(message.headers, dict) else {}
        if already_settled(headers):
            logger.info("dead letter %s (%s) needs nothing more",
                        headers.get("id"), headers.get("x-first-death-reason"))  # fmt: skip
            message.ack()
            return
        reason = dead_letter_reason(headers)
        if consumer._record(message, reason) and not message.acknowledged:
            self._tell_producer(headers, reason)
            message.ack()

    def _tell_producer(self, headers: dict[str, Any], reason: str) -> None:
        """A dead-lettered command's failure, stored as its outcome: its producer, waiting
        for one, hears that the command was not applied instead of waiting for ever (the
        client answers with the database's outcome should the command have been applied
        after all). Not for a sweep, nor for a command sent with ``ignore_result``."""
        command_id = headers.get("id")
        if (command_id is None or headers.get("task") not in TASK_NAMES.values()
                or headers.get("ignore_result")):  # fmt: skip
            return
        gave_up = CommandGaveUp(f"command {command_id} {reason}; kept among the rejected"
                                " commands (calls-worker dead-letters list)")  # fmt: skip
        try:
            self._consumer.app.backend.mark_as_failure(str(command_id), gave_up)
        except Exception as error:  # kept all the same: an operator sees it and can replay it
            logger.warning("the failure of dead-lettered command %s could not be stored as its"
                           " outcome: %s", command_id, error)  # fmt: skip

    def start(self, c: Any) -> None:
        self._consumer = c
        super().start(c)
