"""Commands/s on RabbitMQ beside Redis, each beside the no-op task on the same broker.

    python -m bench.brokers [--commands 3000] [--rounds 3]

Three deployments, one after the other in one run, each with the same settings (the
worker's defaults: group commit 32 / 25 ms, a prefork pool of 2, late acks, JSON):

- ``redis``: Redis broker, outcomes in Redis (the default);
- ``rabbitmq+postgres``: RabbitMQ broker (quorum queues, publisher confirms), outcomes in
  PostgreSQL (``worker_results``): a deployment with no Redis at all;
- ``rabbitmq+redis``: RabbitMQ broker, outcomes in Redis.

For each, the real worker and a no-op worker (``bench.noop_worker``: the same settings,
prefetch 1, a task that does nothing; on RabbitMQ its queue is a quorum queue too) run
side by side; each round sends a burst of no-op tasks, then a burst of creates, then an
add-attempt for each call created, each from 4 producer threads (one sending alone,
waiting for each confirm, is slower than the worker on RabbitMQ), each timed from the
first publish to the last outcome stored. The figure is the round with the median rate;
the rate the producers alone sent the creates at is reported beside it.

RabbitMQ is ``CALLS_WORKER_BENCH_RABBITMQ_URL`` (by default the local one, guest/guest);
its ``calls.*`` and ``bench.*`` queues are deleted first. Redis and PostgreSQL as for the
other benchmarks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import redis
from celery import Celery
from sqlalchemy import text

from bench.common import Row, print_table, write_results
from bench.fixtures import broker, fresh_database, seed_person
from bench.noop_worker import NOOP_QUEUE, NOOP_TASK, noop_queues
from bench.workers import bench_env, process, wait_for_ping
from calls_worker.adapters.db.engine import build_engine
from calls_worker.adapters.queue import forget_amqp_queues
from calls_worker.wire import COMMANDS_QUEUE, TASK_NAMES, celery_config, close_app, is_amqp

CONCURRENCY = "2"
# Producer threads: one waiting for each publisher confirm sends ≈ 560 messages/s to
# RabbitMQ on the development machine, less than the worker takes (bench/README.md).
PRODUCERS = 4
LOCAL_RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"
DEPLOYMENTS = ("redis", "rabbitmq+postgres", "rabbitmq+redis")


def stored_counter(results_url: str) -> Callable[[list[str]], int]:
    """How many of these keys the result backend holds."""
    if results_url.startswith("redis"):
        connection = redis.Redis.from_url(results_url)
        return lambda keys: int(connection.exists(*keys))
    engine = build_engine(results_url, pool_size=1)

    def count(keys: list[str]) -> int:
        with engine.connect() as connection:
            return int(connection.execute(
                text("SELECT count(*) FROM worker_results WHERE key = ANY(:k)"), {"k": keys}
            ).scalar_one())  # fmt: skip

    return count


def burst(app: Celery, stored: Callable[[list[str]], int],
          messages: list[tuple[str, str, dict[str, Any]]]) -> tuple[float, float]:  # fmt: skip
    """Seconds from the first publish until every outcome is stored, and until the last
    publish returned (confirmed, on RabbitMQ)."""
    ids = [str(uuid4()) for _ in messages]

    def send(part: int) -> None:  # one producer (and connection) a thread
        with app.producer_or_acquire() as producer:
            for task_id, (name, queue, kwargs) in list(zip(ids, messages, strict=True))[
                part::PRODUCERS
            ]:
                app.send_task(name, kwargs=kwargs, task_id=task_id, queue=queue,
                              producer=producer)  # fmt: skip

    started = time.perf_counter()
    threads = [threading.Thread(target=send, args=(n,)) for n in range(PRODUCERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    published = time.perf_counter() - started
    keys = [f"celery-task-meta-{task_id}" for task_id in ids]
    for start in range(0, len(keys), 1000):
        chunk = keys[start : start + 1000]
        while stored(chunk) < len(chunk):
            time.sleep(0.02)
    return time.perf_counter() - started, published


def _bursts(count: int, organization: UUID, person: UUID) -> dict[str, list[Any]]:
    now = datetime.now(UTC).isoformat()
    calls = [str(uuid4()) for _ in range(count)]
    return {
        "noop": [(NOOP_TASK, NOOP_QUEUE, {"command": {}}) for _ in range(count)],
        "create": [(TASK_NAMES["create"], COMMANDS_QUEUE, {"command": {
            "uuid": call, "personUuid": str(person), "organizationUuid": str(organization),
            "issuedAt": now}}) for call in calls],
        "add_attempt": [(TASK_NAMES["add_attempt"], COMMANDS_QUEUE, {"command": {
            "callUuid": call, "userUuid": str(person), "attemptedAt": now,
            "issuedAt": now}}) for call in calls],
    }  # fmt: skip


def measure(deployment: str, database: str, redis_url: str, rabbitmq_url: str, count: int,
            rounds: int, logs: Path) -> dict[str, list[float]]:  # fmt: skip
    broker_url = redis_url if deployment == "redis" else rabbitmq_url
    results_url = database if deployment.endswith("postgres") else redis_url
    if is_amqp(broker_url):
        forget_amqp_queues(broker_url, (NOOP_QUEUE,))
    organization, person = seed_person(database, None)
    env = bench_env(database, broker_url, CALLS_WORKER_RESULT_BACKEND_URL=results_url)
    app = Celery("bench-producer", set_as_current=False)
    app.conf.update(celery_config(broker_url, results_url))
    if is_amqp(broker_url):
        app.conf.task_queues = [*app.conf.task_queues, *noop_queues()]
    stored = stored_counter(results_url)
    rates: dict[str, list[float]] = {"noop": [], "create": [], "add_attempt": [],
                                     "publish": []}  # fmt: skip
    name = deployment.replace("+", "-")
    noop_argv = ["-m", "bench.noop_worker", broker_url, "--concurrency", CONCURRENCY,
                 "--results", results_url, "--name", f"noop-{name}"]  # fmt: skip
    worker_argv = ["-m", "calls_worker", "worker", "-Q", COMMANDS_QUEUE, "-c", CONCURRENCY,
                   "-n", f"bench-{name}@%h"]  # fmt: skip
    try:
        with (
            process(noop_argv, env, logs / f"noop-{name}.log"),
            process(worker_argv, env, logs / f"worker-{name}.log"),
        ):
            wait_for_ping(broker_url, f"noop-{name}@")
            wait_for_ping(broker_url, f"bench-{name}@")
            for _ in range(rounds):
                for kind, messages in _bursts(count, organization, person).items():
                    seconds, published = burst(app, stored, messages)
                    rates[kind].append(count / seconds)
                    if kind == "create":  # how fast the producer alone can send them
                        rates["publish"].append(count / published)
                latest = ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in rates.items())
                print(f"  {deployment}: {latest}", flush=True)
    finally:
        close_app(app)
    return rates


def run(count: int, rounds: int) -> list[Row]:
    logs = Path(tempfile.mkdtemp(prefix="bench-brokers-"))
    rabbitmq_url = os.environ.get("CALLS_WORKER_BENCH_RABBITMQ_URL", LOCAL_RABBITMQ)
    figures: dict[str, dict[str, list[float]]] = {}
    with fresh_database("calls_worker_bench_brokers") as database, broker() as redis_url:
        for deployment in DEPLOYMENTS:
            figures[deployment] = measure(deployment, database, redis_url, rabbitmq_url,
                                          count, rounds, logs)  # fmt: skip
    rows = []
    redis_rates = {k: statistics.median(v) for k, v in figures["redis"].items()}
    for deployment, rates in figures.items():
        noop = statistics.median(rates["noop"])
        for kind in ("create", "add_attempt"):
            rate = statistics.median(rates[kind])
            rows.append(Row(
                benchmark="brokers", figure=f"{kind} commands/s, {deployment}", value=rate,
                unit="/s", baseline=f"no-op task/s, {deployment}", baseline_value=noop,
                goal="≥ 1.0× its no-op", passed=rate >= noop,
                details={"rates": [round(r, 1) for r in rates[kind]],
                         "noop_rates": [round(r, 1) for r in rates["noop"]],
                         "publish_rates": [round(r, 1) for r in rates["publish"]],
                         "vs_redis": round(rate / redis_rates[kind], 3)},
            ))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=3_000)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    rows = run(arguments.commands, arguments.rounds)
    print_table(rows)
    for row in rows:
        print(f"  {row.figure}: rounds {row.details['rates']}, no-op {row.details['noop_rates']},"
              f" {row.details['vs_redis']}× the same on Redis; the producer alone sent"
              f" {row.details['publish_rates']} creates/s")
    write_results(rows)


if __name__ == "__main__":
    main()
