"""Command throughput through the real worker, beside a no-op Celery task, same run.

    python -m bench.commands [--commands 5000] [--rounds 5]

Both workers run with the production settings (Redis broker and result backend, JSON,
late acks, prefetch 1, a prefork pool of 2, task events) side by side, each on its own
queue, and are measured in turns: each round sends a burst of no-op tasks, then a burst
of creates, then one add-attempt for each call created. A burst is timed from the first
publish to the last outcome stored, and compared with the no-op burst of its round; the
round with the median ratio is the figure (the machine's speed drifts between rounds,
so rates are only compared within one). Goal:
create and add-attempt commands each reach ≥ 75% of the no-op task's throughput.

Also reported, per command: the CPU time of the worker's main process, its pool
processes, PostgreSQL, Redis and the producer (all on the same machine), which is where
the time of a command goes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import psutil
import redis
from celery import Celery

from bench.common import Row, print_table, write_results
from bench.fixtures import broker, fresh_database, seed_person
from bench.noop_worker import NOOP_QUEUE, NOOP_TASK
from bench.workers import bench_env, process, wait_for_ping
from calls_worker.wire import COMMANDS_QUEUE, TASK_NAMES, celery_config

Message = tuple[str, str, dict[str, Any]]
"""A task name, its queue and its keyword arguments."""

CONCURRENCY = "2"
PARTS = ("main", "pool", "postgres", "redis", "producer")


def publish_and_wait(app: Celery, broker: str, messages: list[Message]) -> float:
    """Seconds from the first publish until every outcome is stored."""
    connection = redis.Redis.from_url(broker)
    ids = [str(uuid4()) for _ in messages]
    started = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for task_id, (name, queue, kwargs) in zip(ids, messages, strict=True):
            app.send_task(name, kwargs=kwargs, task_id=task_id, queue=queue, producer=producer)
    keys = [f"celery-task-meta-{task_id}" for task_id in ids]
    for start in range(0, len(keys), 1000):  # outcomes arrive roughly in publishing order
        chunk = keys[start : start + 1000]
        while connection.exists(*chunk) < len(chunk):
            time.sleep(0.02)
    seconds = time.perf_counter() - started
    connection.close()
    return seconds


def _cpu_seconds(processes: Iterable[psutil.Process]) -> float:
    total = 0.0
    for p in processes:
        try:
            times = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _named(prefix: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith(prefix)]


class CpuMeter:
    """CPU seconds spent by each part of the system during a burst."""

    def __init__(self, worker_pid: int) -> None:
        self._worker = psutil.Process(worker_pid)
        self._me = psutil.Process()

    def _read(self) -> dict[str, float]:
        return {
            "main": _cpu_seconds([self._worker]),
            "pool": _cpu_seconds(self._worker.children(recursive=True)),
            "postgres": _cpu_seconds(_named("postgres")),
            "redis": _cpu_seconds(_named("redis")),
            "producer": _cpu_seconds([self._me]),
        }

    def measure(self, burst: Callable[[], float]) -> tuple[float, dict[str, float]]:
        before = self._read()
        seconds = burst()
        after = self._read()
        return seconds, {part: after[part] - before[part] for part in PARTS}


def run(count: int, rounds: int) -> list[Row]:
    logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    rates: dict[str, list[float]] = {"noop": [], "create": [], "add_attempt": []}
    cpu: dict[str, list[dict[str, float]]] = {kind: [] for kind in rates}
    with fresh_database("calls_worker_bench_commands") as url, broker() as broker_url:
        organization, person = seed_person(url, None)
        app = Celery("bench-producer", set_as_current=False)
        app.conf.update(celery_config(broker_url, broker_url))
        env = bench_env(url, broker_url)
        noop_argv = ["-m", "bench.noop_worker", broker_url, "--concurrency", CONCURRENCY]
        worker_argv = ["-m", "calls_worker", "worker", "-Q", COMMANDS_QUEUE, "-c", CONCURRENCY,
                       "-n", "bench@%h"]  # fmt: skip
        try:
            with (
                process(noop_argv, env, logs / "noop.log") as noop,
                process(worker_argv, env, logs / "worker.log") as worker,
            ):
                wait_for_ping(broker_url, "noop@")
                wait_for_ping(broker_url, "bench@")
                meters = {"noop": CpuMeter(noop.pid), "worker": CpuMeter(worker.pid)}
                for _ in range(rounds):
                    for kind, messages in _round(count, organization, person).items():
                        meter = meters["noop" if kind == "noop" else "worker"]
                        seconds, spent = meter.measure(
                            partial(publish_and_wait, app, broker_url, messages)
                        )
                        rates[kind].append(count / seconds)
                        cpu[kind].append({part: 1000 * s / count for part, s in spent.items()})
        finally:
            app.close()
    rows = []
    for kind in ("create", "add_attempt"):
        # Each round's burst is compared with the no-op burst sent just before it; the
        # round with the median ratio is the figure (the lower middle one for an even count).
        ratios = [rate / noop for rate, noop in zip(rates[kind], rates["noop"], strict=True)]
        middle = sorted(range(rounds), key=ratios.__getitem__)[(rounds - 1) // 2]
        rate, noop_rate = rates[kind][middle], rates["noop"][middle]
        details = {
            "commands": count,
            "rounds": rounds,
            "statistic": "the round with the median ratio",
            "concurrency": int(CONCURRENCY),
            "rates": [round(r, 1) for r in rates[kind]],
            "noop_rates": [round(r, 1) for r in rates["noop"]],
            "ratios": [round(r, 3) for r in ratios],
            "cpu_ms_per_command": _median_parts(cpu[kind]),
            "noop_cpu_ms_per_task": _median_parts(cpu["noop"]),
        }
        rows.append(
            Row("commands", f"{kind} commands/s ({count:,})", rate, "/s", "no-op Celery task /s",
                noop_rate, "≥ 0.75× baseline", rate >= 0.75 * noop_rate, details)
        )  # fmt: skip
    return rows


def _round(count: int, organization: UUID, person: UUID) -> dict[str, list[Message]]:
    """One round's bursts, in the order they are sent: fresh calls each round."""
    now = datetime.now(UTC).isoformat()
    calls = [str(uuid4()) for _ in range(count)]
    create, add_attempt = TASK_NAMES["create"], TASK_NAMES["add_attempt"]
    return {
        "noop": [(NOOP_TASK, NOOP_QUEUE, {"command": {}}) for _ in range(count)],
        "create": [(create, COMMANDS_QUEUE, {"command": {
            "uuid": call, "personUuid": str(person), "organizationUuid": str(organization),
            "issuedAt": now}}) for call in calls],
        "add_attempt": [(add_attempt, COMMANDS_QUEUE, {"command": {
            "callUuid": call, "userUuid": str(person), "attemptedAt": now,
            "issuedAt": now}}) for call in calls],
    }  # fmt: skip


def _median_parts(samples: list[dict[str, float]]) -> dict[str, float]:
    return {part: round(statistics.median(s[part] for s in samples), 2) for part in PARTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=5)
    arguments = parser.parse_args()
    rows = run(arguments.commands, arguments.rounds)
    print_table(rows)
    for row in rows:
        print(f"  {row.figure}: rounds {row.details['rates']}, no-op {row.details['noop_rates']},"
              f" ratios {row.details['ratios']}")  # fmt: skip
        print(f"    CPU ms per command {row.details['cpu_ms_per_command']}")
        print(f"    CPU ms per no-op   {row.details['noop_cpu_ms_per_task']}")
    write_results(rows)


if __name__ == "__main__":
    main()
