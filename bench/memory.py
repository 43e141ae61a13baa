"""Worker memory: resident size after 50,000 commands and after 100,000.

    python -m bench.memory [--commands 100000]

A worker with the production settings (prefork pool of 2, metrics on) handles creates
and attempts; the resident memory of its whole process tree is read when half the
commands are done and when all are. Goal: the second within 10% of the first (no growth
per command, so no leak).
"""

from __future__ import annotations

import argparse
import socket
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from uuid import uuid4

from celery import Celery

from bench.commands import Message, publish_and_wait
from bench.common import Row, print_table, write_results
from bench.fixtures import broker, fresh_database, seed_person
from bench.workers import bench_env, process, resident_memory, wait_for_ping
from calls_worker.wire import COMMANDS_QUEUE, TASK_NAMES, celery_config


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run(count: int) -> list[Row]:
    half = count // 2
    logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    with fresh_database("calls_worker_bench_memory") as url, broker() as broker_url:
        organization, person = seed_person(url, None)
        now = datetime.now(UTC).isoformat()

        def commands(n: int) -> list[Message]:
            calls = [str(uuid4()) for _ in range(n // 2)]
            none: dict[str, str] = {}
            return [
                (TASK_NAMES["create"], COMMANDS_QUEUE, {"command": {
                    "uuid": call, "personUuid": str(person),
                    "organizationUuid": str(organization), "issuedAt": now}}, none)
                for call in calls
            ] + [
                (TASK_NAMES["add_attempt"], COMMANDS_QUEUE, {"command": {
                    "callUuid": call, "userUuid": str(person), "attemptedAt": now,
                    "issuedAt": now}}, none)
                for call in calls
            ]  # fmt: skip

        app = Celery("bench-producer", set_as_current=False)
        app.conf.update(celery_config(broker_url, broker_url))
        env = bench_env(url, broker_url, CALLS_WORKER_METRICS_PORT=str(free_port()))
        try:
            with process(["-m", "calls_worker", "worker", "-Q", COMMANDS_QUEUE, "-c", "2",
                          "-n", "memory@%h"], env, logs / "worker.log") as worker:  # fmt: skip
                wait_for_ping(broker_url, "memory@")
                started = resident_memory(worker.pid)
                publish_and_wait(app, broker_url, commands(half))
                after_half = resident_memory(worker.pid)
                publish_and_wait(app, broker_url, commands(count - half))
                after_all = resident_memory(worker.pid)
        finally:
            app.close()
    mib = 2**20
    return [
        Row("memory", f"worker RSS after {count:,} commands", after_all / mib, "MiB",
            f"RSS after {half:,}", after_half / mib, "≤ 1.10× baseline",
            after_all <= 1.10 * after_half,
            {"rss_at_start_mib": round(started / mib, 1), "processes": "main + 2 pool"}),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=100_000)
    arguments = parser.parse_args()
    rows = run(arguments.commands)
    print_table(rows)
    write_results(rows)


if __name__ == "__main__":
    main()
