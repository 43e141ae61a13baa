"""The relay's lanes: events/s with 1, 2 and 4 lanes, each published by a relay of its own
(a worker's ``Relay``, in a process of its own, as on as many worker machines), same run.

    python -m bench.relay_lanes [--events 40000] [--rounds 3] [--broker redis|rabbitmq]

The outbox is filled with EVENTS events of as many calls, shaped as bench/events.py's,
then N processes each run the worker's relay (``worker.relay.Relay``, lanes N, batches of
CALLS_WORKER_EVENTS_RELAY_BATCH_SIZE) until nothing is left unpublished: events per
second from the moment they all start to the last mark. The baseline is one lane, one
relay, in the same round. Each round refills the outbox for each lane count and empties
the subscriber queue, checking that it received every event; the median of the rounds is
the figure. Goal: 2 lanes ≥ 1.6× one. On this 2-core machine PostgreSQL, the broker and
the relays share the cores, so 4 lanes show what a third and fourth process add there,
not what four machines would.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from typing import Any

from celery import Celery
from sqlalchemy import text

from bench.common import Row, print_table, write_results
from bench.events import BATCH, LOCAL_RABBITMQ, empty_queue, fill
from bench.fixtures import broker, fresh_database
from calls_worker.adapters.db.engine import build_engine
from calls_worker.config import Settings
from calls_worker.wire import celery_config, close_app
from calls_worker.worker.relay import Publisher, Relay

LANES = (1, 2, 4)


def _relay_process(url: str, broker_url: str, lanes: int, ready: Any, go: Any) -> None:
    """One relay of ``lanes`` until the outbox has nothing unpublished."""
    app = Celery("bench-lane", set_as_current=False)
    app.conf.update(celery_config(broker_url, "disabled://" if "amqp" in broker_url
                                  else broker_url))  # fmt: skip
    relay = Relay(url, Publisher(app, Settings.model_fields["events_task"].default),
                  batch_size=BATCH, interval=0.01, lanes=lanes)  # fmt: skip
    engine = build_engine(url, pool_size=1)
    ready.wait()
    go.wait()
    relay.start()
    try:
        while True:
            with engine.connect() as connection:
                left = connection.execute(text(
                    "SELECT count(*) FROM worker_call_events WHERE published_at IS NULL"
                )).scalar()  # fmt: skip
            if not left:
                return
            time.sleep(0.02)
    finally:
        relay.stop()
        engine.dispose()
        close_app(app)


def publish_with(url: str, broker_url: str, lanes: int) -> float:
    """Seconds for ``lanes`` relays, one process each, to publish the whole outbox."""
    context = multiprocessing.get_context("spawn")
    ready, go = context.Barrier(lanes + 1), context.Event()
    processes = [context.Process(target=_relay_process, args=(url, broker_url, lanes, ready, go))
                 for _ in range(lanes)]  # fmt: skip
    for process in processes:
        process.start()
    ready.wait()
    started = time.perf_counter()
    go.set()
    for process in processes:
        process.join()
        assert process.exitcode == 0, process.exitcode
    return time.perf_counter() - started


def run(count: int, rounds: int, broker_name: str) -> list[Row]:
    rates: dict[int, list[float]] = {lanes: [] for lanes in LANES}
    with fresh_database("calls_worker_bench_lanes") as url, broker() as redis_url:
        broker_url = redis_url if broker_name == "redis" else os.environ.get(
            "CALLS_WORKER_BENCH_RABBITMQ_URL", LOCAL_RABBITMQ)  # fmt: skip
        engine = build_engine(url, pool_size=1)
        try:
            empty_queue(broker_url)
            for _ in range(rounds):
                for lanes in LANES:
                    fill(engine, count)
                    seconds = publish_with(url, broker_url, lanes)
                    received = empty_queue(broker_url)
                    assert received >= count, (lanes, received)  # at least once
                    rates[lanes].append(count / seconds)
                    print(f"  {lanes} lanes: {count / seconds:,.0f} events/s"
                          f" ({received - count} published twice)", flush=True)  # fmt: skip
        finally:
            empty_queue(broker_url, delete=True)
            engine.dispose()
    one = statistics.median(rates[1])
    rows = []
    for lanes in LANES[1:]:
        rate = statistics.median(rates[lanes])
        goal = "≥ 1.6× one lane" if lanes == 2 else "(measured, no goal)"
        rows.append(Row(
            "events", f"relay events/s with {lanes} lanes on {broker_name} ({count:,})", rate,
            "/s", "one lane, one relay", one, goal, rate >= 1.6 * one if lanes == 2 else True,
            {"events": count, "rounds": rounds, "batch": BATCH,
             "rates": {n: [round(r) for r in rs] for n, rs in rates.items()},
             "statistic": "median of the rounds"},
        ))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--broker", choices=("redis", "rabbitmq"), default="redis")
    parser.add_argument("--no-write", action="store_true", help="Do not update results.json.")
    arguments = parser.parse_args()
    rows = run(arguments.events, arguments.rounds, arguments.broker)
    print_table(rows)
    if not arguments.no_write:
        write_results(rows)


if __name__ == "__main__":
    main()
