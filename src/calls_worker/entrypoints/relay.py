"""The relay: publishes the call events of the outbox to the broker (docs/wire-format.md).

A step of every ``calls-worker worker``: a thread of the worker's main process, next to
Celery's consumer, with a database connection and a broker connection of its own. Each
round is one transaction of ``events.relay_batch``: the relay's advisory lock, the oldest
unpublished events, published one after the other (each accepted by the broker: a
publisher confirm on RabbitMQ, the LPUSH on Redis), marked published, committed. So
however many workers run, one relay publishes at a time, in ``seq`` order (the order of a
call's changes), and an event is marked only once the broker holds it; a relay that dies
in between leaves it to be published again (consumers de-duplicate by ``eventId``).

Events are Celery task messages: task CALLS_WORKER_EVENTS_TASK, JSON, keyword arguments
``{"event": {...}}``, the task id the event's id, on the durable topic exchange
``calls.events`` with the event's kind as routing key. A kind no queue is bound for is
dropped by the broker (RabbitMQ does so for an unroutable message; kombu's Redis transport
routes it to no list), so with no subscriber nothing accumulates.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from celery import Celery, bootsteps
from kombu import Connection, Exchange, Producer

from calls_worker.adapters.db.engine import build_engine
from calls_worker.adapters.db.events import relay_batch
from calls_worker.entrypoints.metrics import relay_metrics
from calls_worker.entrypoints.runtime import runtime_of
from calls_worker.wire import EVENTS_EXCHANGE

logger = logging.getLogger("calls_worker.relay")

EXCHANGE = Exchange(EVENTS_EXCHANGE, type="topic", durable=True)
# Longest pause after a failed round (the database or the broker away), doubling from 1 s.
BACKOFF_MAX_SECONDS = 30.0


class Publisher:
    """Call events as Celery task messages, on a broker connection of the relay's own."""

    def __init__(self, app: Celery, task_name: str) -> None:
        self.app = app
        self.task_name = task_name
        self._connection: Connection | None = None
        self._producer: Producer | None = None

    def _open(self) -> Producer:
        if self._producer is None:
            connection = self.app.connection_for_write()
            try:
                connection.ensure_connection(max_retries=1)
                # auto_declare: the exchange (durable, topic) is declared on this channel,
                # which is also what tells kombu's Redis transport its type.
                producer = Producer(connection.default_channel, exchange=EXCHANGE,
                                    serializer="json", auto_declare=True)  # fmt: skip
            except BaseException:
                connection.release()
                raise
            self._connection, self._producer = connection, producer
        return self._producer

    def publish(self, events: list[dict[str, Any]]) -> None:
        """Publish ``events`` in order; returns once the broker accepted each (with
        publisher confirms, a nack raises)."""
        producer = self._open()
        for event in events:
            headers, properties, body, _ = self.app.amqp.as_task_v2(
                event["eventId"], self.task_name, kwargs={"event": event},
                ignore_result=True, argsrepr="()",
                kwargsrepr=f"{{'event': '{event['kind']} {event['callUuid']}'}}",
            )  # fmt: skip
            producer.publish(
                body, routing_key=event["kind"], headers=headers, delivery_mode=2,
                serializer="json", retry=False, **properties,
            )  # fmt: skip
        logger.debug("published events %d..%d", events[0]["sequence"], events[-1]["sequence"],
                     extra={"published": [e["sequence"] for e in events]})  # fmt: skip

    def close(self) -> None:
        connection, self._connection, self._producer = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):  # a broken connection closes as it can
                connection.release()


class Relay:
    """Rounds of ``relay_batch`` until stopped: at once while there is more to publish, else
    after ``interval`` seconds; after a failure, a backoff, telling the log once."""

    def __init__(self, database_url: str, publisher: Publisher, *, batch_size: int,
                 interval: float) -> None:  # fmt: skip
        self.database_url = database_url
        self.publisher = publisher
        self.batch_size = batch_size
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="calls-worker-relay", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        engine = build_engine(self.database_url, pool_size=1, pre_ping=False)
        metrics = relay_metrics()
        backoff = 1.0
        try:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    published = relay_batch(engine, self.batch_size, self.publisher.publish)
                except Exception as error:
                    self.publisher.close()
                    engine.dispose()
                    if not self._failing:
                        reason = str(error).splitlines()[0] if str(error) else repr(error)
                        logger.warning("call events cannot be published now (%s); retrying",
                                       reason)  # fmt: skip
                    self._failing = True
                    metrics.failures.inc()
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX_SECONDS)
                    continue
                if self._failing:
                    logger.info("call events are published again")
                    self._failing, backoff = False, 1.0
                if published:
                    metrics.published.inc(published)
                    metrics.round_seconds.observe(time.perf_counter() - started)
                if published is None or published < self.batch_size:
                    self._stop.wait(self.interval)
        finally:
            self.publisher.close()
            engine.dispose()


class EventRelayStep(bootsteps.StartStopStep):
    """The relay, in the worker's main process (after the pool started its processes, so
    none of them is forked while the relay's thread holds a lock), unless events are off."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.relay: Relay | None = None

    def start(self, worker: Any) -> None:
        runtime = runtime_of(worker.app)
        settings = runtime.settings
        if not settings.events:
            return
        self.relay = Relay(
            runtime.database_url,
            Publisher(worker.app, settings.events_task),
            batch_size=settings.events_relay_batch_size,
            interval=settings.events_relay_interval_ms / 1000,
        )
        self.relay.start()

    def stop(self, worker: Any) -> None:
        if self.relay is not None:
            self.relay.stop()
            self.relay = None

    def terminate(self, worker: Any) -> None:
        self.stop(worker)
