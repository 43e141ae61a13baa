"""The relay: publishes the call events of the outbox to the broker (docs/wire-format.md).

A step of every ``calls-worker worker``: a thread of the worker's main process, next to
Celery's consumer, with a database connection and a broker connection of its own. Each
round is one transaction of ``events.relay_batch``: a lane's advisory lock, the lane's
oldest unpublished events, published one after the other (each accepted by the broker: a
publisher confirm on RabbitMQ, the LPUSH on Redis), marked published, committed. So
however many workers run, one relay publishes a lane at a time, in ``seq`` order (the
order of a call's changes: a call is in one lane), and an event is marked only once the
broker holds it; a relay that dies in between leaves it to be published again (consumers
de-duplicate by ``eventId``). With CALLS_WORKER_EVENTS_RELAY_LANES above 1, the calls are
shared between that many lanes, and as many workers publish at once: each relay goes round
the lanes, a round on each whose lock is free, and rests once a whole turn found little.

Events are Celery task messages: task CALLS_WORKER_EVENTS_TASK, JSON, keyword arguments
``{"event": {...}}``, the task id the event's id, on the durable topic exchange
``calls.events`` with the event's kind as routing key. A kind no queue is bound for is
dropped by the broker (RabbitMQ does so for an unroutable message; kombu's Redis transport
routes it to no list), so with no subscriber nothing accumulates.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

from celery import Celery, bootsteps
from kombu import Connection, Exchange, Producer

from calls_worker.adapters.db.engine import build_engine
from calls_worker.adapters.db.events import relay_batch
from calls_worker.wire import EVENTS_EXCHANGE
from calls_worker.worker.metrics import relay_metrics
from calls_worker.worker.runtime import runtime_of

logger = logging.getLogger("calls_worker.relay")

EXCHANGE = Exchange(EVENTS_EXCHANGE, type="topic", durable=True)
# Longest wait for RabbitMQ to confirm a round's messages before the round fails (and is
# published again).
CONFIRM_TIMEOUT_SECONDS = 30.0
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
        publisher confirms, a nack raises).

        On Redis the messages of a round go out in one pipeline (kombu's ``batch``), routed
        by the bindings as they stood when the round began: kombu's Redis transport would
        otherwise read the exchange's bindings, and make a client, for every message (two
        thirds of the time of an event, measured: bench/events.py). On RabbitMQ they go out
        one after the other, and the round then waits for all their confirms at once
        instead of one round trip each.
        """
        producer = self._open()
        batch = producer.batch(max_size=4 * len(events) + 1)  # type: ignore[attr-defined]  # kombu ≥ 5.7
        with _confirmed_together(producer.channel), batch, _bindings_read_once(producer.channel):
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


@contextlib.contextmanager
def _confirmed_together(channel: Any) -> Iterator[None]:
    """On a py-amqp channel with publisher confirms (RabbitMQ): the messages published
    within are sent without waiting for each one's confirm; on leaving, wait until the
    broker confirmed every one of them. A nack raises MessageNacked (as py-amqp's own
    publish does), and so does a confirm not received within CONFIRM_TIMEOUT_SECONDS."""
    from amqp import spec
    from amqp.exceptions import MessageNacked

    confirming = getattr(channel, "basic_publish_confirm", None)
    if confirming is None or channel.basic_publish != confirming:
        yield  # no confirms asked for, or not py-amqp: publish as kombu does
        return
    if not channel._confirm_selected:
        channel._confirm_selected = True
        channel.confirm_select()
    first = getattr(channel, "_calls_worker_tag", 0) + 1
    raw = channel._basic_publish
    # Confirms are counted from before the first publish: py-amqp reads what the broker
    # sent (confirms of this round's first messages too) before each publish.
    covered = [0]  # every tag up to this one is confirmed (a "multiple" confirm)
    single: set[int] = set()
    refused: list[int] = []

    def acked(delivery_tag: int, multiple: bool) -> None:
        if multiple:
            covered[0] = max(covered[0], delivery_tag)
        else:
            single.add(delivery_tag)

    def nacked(delivery_tag: int, multiple: bool) -> None:
        refused.append(delivery_tag)
        acked(delivery_tag, multiple)

    def publish(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop("confirm_timeout", None)
        sent = raw(*args, **kwargs)
        channel._calls_worker_tag = getattr(channel, "_calls_worker_tag", 0) + 1
        return sent

    channel.events["basic_ack"].add(acked)
    channel.events["basic_nack"].add(nacked)
    channel.basic_publish = publish
    try:
        yield
        # Delivery tags count the channel's messages from 1 (confirm mode): ours are
        # first..last.
        last = getattr(channel, "_calls_worker_tag", 0)
        deadline = time.monotonic() + CONFIRM_TIMEOUT_SECONDS

        def unconfirmed() -> int:
            return sum(1 for t in range(max(first, covered[0] + 1), last + 1) if t not in single)

        while unconfirmed():
            left = deadline - time.monotonic()
            if left <= 0:
                raise MessageNacked(f"{unconfirmed()} messages not confirmed in time")
            channel.wait([spec.Basic.Ack, spec.Basic.Nack], timeout=left)
    finally:
        channel.basic_publish = confirming  # as py-amqp set it up
        channel.events["basic_ack"].discard(acked)
        channel.events["basic_nack"].discard(nacked)
    if refused:
        raise MessageNacked(f"the broker refused {len(refused)} message(s) of the round")


@contextlib.contextmanager
def _bindings_read_once(channel: Any) -> Iterator[None]:
    """On a kombu virtual channel (Redis), the bindings of calls.events are read once for
    the messages published within; elsewhere (RabbitMQ routes them itself) nothing."""
    read = getattr(channel, "get_table", None)
    if read is None or not hasattr(channel, "typeof"):
        yield
        return
    table = read(EVENTS_EXCHANGE)

    def bindings(exchange: str) -> Any:
        return table if exchange == EVENTS_EXCHANGE else read(exchange)

    channel.get_table = bindings
    try:
        yield
    finally:
        del channel.get_table  # the class's method again


class Relay:
    """Rounds of ``relay_batch`` until stopped: at once while there is more to publish, else
    after ``interval`` seconds; after a failure, a backoff, telling the log once."""

    def __init__(self, database_url: str, publisher: Publisher, *, batch_size: int,
                 interval: float, lanes: int = 1) -> None:  # fmt: skip
        self.database_url = database_url
        self.publisher = publisher
        self.batch_size = batch_size
        self.interval = interval
        self.lanes = lanes
        # Where this relay starts: relays starting together spread over the lanes.
        self._lane = random.randrange(lanes)  # noqa: S311  (a spread, not a secret)
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
        idle = 0  # lanes in a row that had less than a batch to publish, or another relay
        try:
            while not self._stop.is_set():
                started = time.perf_counter()
                lane = self._lane
                try:
                    published = relay_batch(engine, self.batch_size, self.publisher.publish,
                                            lane=lane, lanes=self.lanes)  # fmt: skip
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
                # On to the next lane, whatever this one had (a busy lane does not starve
                # the others); a pause once every lane in a row had less than a batch.
                self._lane = (lane + 1) % self.lanes
                if published is None or published < self.batch_size:
                    idle += 1
                    if idle >= self.lanes:
                        idle = 0
                        self._stop.wait(self.interval)
                else:
                    idle = 0
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
            lanes=settings.events_relay_lanes,
        )
        self.relay.start()

    def stop(self, worker: Any) -> None:
        if self.relay is not None:
            self.relay.stop()
            self.relay = None

    def terminate(self, worker: Any) -> None:
        self.stop(worker)
