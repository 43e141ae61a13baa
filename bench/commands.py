"""Command throughput through the real worker, beside a no-op Celery task, same run.

    python -m bench.commands [--commands 5000]

Both workers run with the production settings (Redis broker and result backend, JSON,
late acks, prefetch 1, a prefork pool of 2). Each side gets the same number of messages
published as fast as the producer can, and is timed from the first publish to the last
outcome stored. Goal: create and add-attempt commands each reach ≥ 75% of the no-op
task's throughput.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import redis
from celery import Celery

from bench.common import Row, print_table, write_results
from bench.fixtures import broker, fresh_database, seed_person
from bench.noop_worker import NOOP_TASK
from bench.workers import bench_env, process, wait_for_ping
from calls_worker.wire import COMMANDS_QUEUE, TASK_NAMES, celery_config

Message = tuple[str, dict[str, Any]]
"""A task name and its keyword arguments."""


def publish_and_wait(app: Celery, broker: str, messages: list[Message]) -> float:
    """Seconds from the first publish until every outcome is stored."""
    connection = redis.Redis.from_url(broker)
    ids = [str(uuid4()) for _ in messages]
    started = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for task_id, (name, kwargs) in zip(ids, messages, strict=True):
            app.send_task(name, kwargs=kwargs, task_id=task_id, queue=COMMANDS_QUEUE,
                          producer=producer)  # fmt: skip
    keys = [f"celery-task-meta-{task_id}" for task_id in ids]
    for start in range(0, len(keys), 1000):  # outcomes arrive roughly in publishing order
        chunk = keys[start : start + 1000]
        while connection.exists(*chunk) < len(chunk):
            time.sleep(0.02)
    seconds = time.perf_counter() - started
    connection.close()
    return seconds


def run(count: int) -> list[Row]:
    logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    with fresh_database("calls_worker_bench_commands") as url, broker() as broker_url:
        organization, person = seed_person(url, None)
        now = datetime.now(UTC).isoformat()
        calls = [str(uuid4()) for _ in range(count)]
        creates = [(TASK_NAMES["create"], {"command": {
            "uuid": call, "personUuid": str(person), "organizationUuid": str(organization),
            "issuedAt": now}}) for call in calls]  # fmt: skip
        attempts = [(TASK_NAMES["add_attempt"], {"command": {
            "callUuid": call, "userUuid": str(person), "attemptedAt": now,
            "issuedAt": now}}) for call in calls]  # fmt: skip
        noops: list[Message] = [(NOOP_TASK, {"command": {}}) for _ in range(count)]
        app = Celery("bench-producer", set_as_current=False)
        app.conf.update(celery_config(broker_url, broker_url))
        env = bench_env(url, broker_url)
        try:
            with process(["-m", "bench.noop_worker", broker_url], env, logs / "noop.log"):
                wait_for_ping(broker_url, "noop@")
                noop_seconds = publish_and_wait(app, broker_url, noops)
            with process(["-m", "calls_worker", "worker", "-Q", COMMANDS_QUEUE, "-c", "2",
                          "-n", "bench@%h"], env, logs / "worker.log"):  # fmt: skip
                wait_for_ping(broker_url, "bench@")
                create_seconds = publish_and_wait(app, broker_url, creates)
                attempt_seconds = publish_and_wait(app, broker_url, attempts)
        finally:
            app.close()
    noop_rate = count / noop_seconds
    rows = []
    for kind, seconds in (("create", create_seconds), ("add_attempt", attempt_seconds)):
        rate = count / seconds
        goal_met = rate >= 0.75 * noop_rate
        rows.append(
            Row("commands", f"{kind} commands/s ({count:,})", rate, "/s", "no-op Celery task /s",
                noop_rate, "≥ 0.75× baseline", goal_met, {"commands": count, "concurrency": 2})
        )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=5_000)
    arguments = parser.parse_args()
    rows = run(arguments.commands)
    print_table(rows)
    write_results(rows)


if __name__ == "__main__":
    main()
