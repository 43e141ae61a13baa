"""The call-event relay's throughput, beside bare publishing of the same messages, same run.

    python -m bench.events [--events 20000] [--rounds 3]

For each broker (Redis, and RabbitMQ with publisher confirms), with one subscriber queue
bound to ``calls.events`` for every kind: the outbox is filled with EVENTS events shaped
as the worker writes them (a call with two attempts), then the relay's rounds
(``events.relay_batch`` with the worker's ``Publisher``, CALLS_WORKER_EVENTS_RELAY_BATCH_SIZE
a round) publish them all: events per second, from the first round to the last mark. The
baseline is the same ``Publisher`` publishing the same events with no database around it
(no read, no mark, no transaction): what the broker and kombu allow. Each round refills the
outbox and empties the queue; the round with the median ratio is the figure. Goal: ≥ 0.5×
the bare publishing (the relay's own work, reading the events and marking them in one
transaction, costs no more than publishing them). Whether the relay keeps up with the
commands is the lag row of bench/commands.py.

RabbitMQ is ``CALLS_WORKER_BENCH_RABBITMQ_URL`` (by default the local one, guest/guest).
The lag of events under the command benchmark's load is in bench/commands.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

from celery import Celery
from kombu import Connection, Queue
from sqlalchemy import Engine, text

from bench.common import Row, print_table, write_results
from bench.fixtures import broker, fresh_database
from calls_worker.adapters.db.engine import build_engine
from calls_worker.adapters.db.events import as_event, relay_batch
from calls_worker.config import Settings
from calls_worker.wire import celery_config, close_app
from calls_worker.worker.relay import EXCHANGE, Publisher

LOCAL_RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"
QUEUE = "bench.call-events"
BATCH: int = Settings.model_fields["events_relay_batch_size"].default

# Events as the worker writes them: a managed call with two attempts, created just now.
_FILL = text("""
INSERT INTO worker_call_events (event_id, kind, occurred_at, call_uuid, organization_uuid,
    owning_organization_uuid, call)
SELECT gen_random_uuid(), 'call.attempt_added', now(), c.uuid, c.org, c.org,
    json_build_object('uuid', c.uuid, 'status', 'requested', 'type', 'verification',
        'attempts', json_build_array(
            json_build_object('userUuid', gen_random_uuid(), 'attemptedAt', now()),
            json_build_object('userUuid', gen_random_uuid(), 'attemptedAt', now())),
        'attemptCount', 2, 'result', NULL, 'notes', 'called twice', 'requestedBy', NULL,
        'personUuid', gen_random_uuid(), 'pledgeCaseUuid', NULL, 'organizationUuid', c.org,
        'externalMetadata', NULL, 'createdAt', now(), 'updatedAt', now(),
        'completedAt', NULL, 'cancelledAt', NULL, 'expiredAt', NULL)
FROM (SELECT gen_random_uuid() AS uuid, gen_random_uuid() AS org
      FROM generate_series(1, :n)) AS c
""")


def fill(engine: Engine, count: int) -> None:
    with engine.begin() as connection:
        connection.execute(text("TRUNCATE worker_call_events"))
        connection.execute(_FILL, {"n": count})


def pending(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        rows = connection.execute(text(
            "SELECT seq, event_id, kind, occurred_at, call_uuid, organization_uuid,"
            " owning_organization_uuid, call, expiry FROM worker_call_events"
            " WHERE published_at IS NULL ORDER BY seq")).all()  # fmt: skip
    return [as_event(row) for row in rows]


def empty_queue(broker_url: str, *, delete: bool = False) -> int:
    """Empty the subscriber queue (declaring it, bound); how many it held."""
    with Connection(broker_url) as connection:
        queue = Queue(QUEUE, EXCHANGE, routing_key="call.#", durable=True)(
            connection.default_channel)  # fmt: skip
        queue.declare()
        held = int(queue.purge() or 0)
        if delete:
            queue.delete()
        return held


def relay_all(engine: Engine, publisher: Publisher) -> float:
    started = time.perf_counter()
    while relay_batch(engine, BATCH, publisher.publish):
        pass
    return time.perf_counter() - started


def bare(events: list[dict[str, Any]], publisher: Publisher) -> float:
    started = time.perf_counter()
    for start in range(0, len(events), BATCH):
        publisher.publish(events[start : start + BATCH])
    return time.perf_counter() - started


def measure(broker_url: str, engine: Engine, count: int, rounds: int) -> dict[str, list[float]]:
    app = Celery("bench-relay", set_as_current=False)
    app.conf.update(celery_config(broker_url, "disabled://" if "amqp" in broker_url
                                  else broker_url))  # fmt: skip
    publisher = Publisher(app, Settings.model_fields["events_task"].default)
    rates: dict[str, list[float]] = {"relay": [], "bare": []}
    try:
        empty_queue(broker_url)
        for _ in range(rounds):
            fill(engine, count)
            events = pending(engine)
            seconds = bare(events, publisher)
            assert empty_queue(broker_url) == count
            rates["bare"].append(count / seconds)
            seconds = relay_all(engine, publisher)
            assert empty_queue(broker_url) == count
            rates["relay"].append(count / seconds)
    finally:
        publisher.close()
        close_app(app)
        empty_queue(broker_url, delete=True)
    return rates


def run(count: int, rounds: int) -> list[Row]:
    rows = []
    rabbitmq = os.environ.get("CALLS_WORKER_BENCH_RABBITMQ_URL", LOCAL_RABBITMQ)
    with fresh_database("calls_worker_bench_events") as url, broker() as redis_url:
        engine = build_engine(url, pool_size=2)
        try:
            for name, broker_url in (("Redis", redis_url), ("RabbitMQ", rabbitmq)):
                rates = measure(broker_url, engine, count, rounds)
                ratios = [r / b for r, b in zip(rates["relay"], rates["bare"], strict=True)]
                middle = sorted(range(rounds), key=ratios.__getitem__)[(rounds - 1) // 2]
                rate, base = rates["relay"][middle], rates["bare"][middle]
                rows.append(Row(
                    "events", f"relay events/s on {name} ({count:,}, {BATCH} a round)", rate,
                    "/s", "the same events published bare", base, "≥ 0.5× baseline",
                    rate >= 0.5 * base,
                    {"events": count, "rounds": rounds, "batch": BATCH,
                     "relay_rates": [round(r, 1) for r in rates["relay"]],
                     "bare_rates": [round(r, 1) for r in rates["bare"]],
                     "ratios": [round(r, 3) for r in ratios],
                     "statistic": "the round with the median ratio",
                     "median_relay": round(statistics.median(rates["relay"]), 1)},
                ))  # fmt: skip
        finally:
            engine.dispose()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    rows = run(arguments.events, arguments.rounds)
    print_table(rows)
    for row in rows:
        print(f"  {row.figure}: {row.details}")
    write_results(rows)


if __name__ == "__main__":
    main()
