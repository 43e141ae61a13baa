"""What commands cost in Redis: bytes per stored outcome and per queued message, and Redis's
memory after N commands with outcomes kept a day (the old retention) and an hour (the new
one), in the same run.

A database of its own on the benchmark server, a worker process per retention on a Redis
database of its own (``CALLS_WORKER_BENCH_REDIS_URL``, else an embedded Redis), N
creates sent and answered; then the worker stopped and N more queued, unanswered.

    python -m bench.redis_memory --commands 2000
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import make_url

from bench.fixtures import broker, fresh_database, seed_person
from calls_worker.client import CallsClient


def redis_db(url: str, number: int) -> str:
    return make_url(url).set(database=str(number)).render_as_string(hide_password=False)


def measure(db_url: str, broker: str, retention: int, commands: int, person: dict[str, str],
            tmp: Path) -> dict[str, Any]:  # fmt: skip
    backend = redis.Redis.from_url(broker)
    backend.flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLS_WORKER_")}
    env |= {"CALLS_WORKER_DATABASE_URL": db_url, "CALLS_WORKER_BROKER_URL": broker,
            "CALLS_WORKER_RESULT_RETENTION_SECONDS": str(retention),
            "CALLS_WORKER_METRICS_PORT": "0", "CALLS_WORKER_DATA_DIR": str(tmp)}  # fmt: skip
    log = (tmp / f"worker-{retention}.log").open("wb")
    worker = subprocess.Popen([sys.executable, "-m", "calls_worker", "worker", "-c", "2", "-n",
                               f"mem{retention}@%h", "-Q", "calls.commands"], env=env,
                              stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        with CallsClient(broker) as client:
            handles = [client.send("create", person) for _ in range(commands)]
            for handle in handles:
                handle.outcome(120)
            keys = [f"celery-task-meta-{h.command_id}" for h in handles]
            sizes = [backend.memory_usage(key) or 0 for key in keys[:200]]
            ttl = backend.ttl(keys[-1])
            used_with_outcomes = backend.info("memory")["used_memory"]
    finally:
        worker.terminate()
        worker.wait(60)
        log.close()
    with CallsClient(broker) as client:  # queued, nobody consuming
        before = backend.info("memory")["used_memory"]
        for _ in range(commands):
            client.send("create", person, ignore_result=True)
        queued = backend.info("memory")["used_memory"] - before
    backend.flushdb()
    return {
        "outcome_bytes": statistics.mean(sizes),
        "ttl": ttl,
        "used_with_outcomes": used_with_outcomes,
        "queued_bytes": queued / commands,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=2000)
    args = parser.parse_args()
    name = f"calls_worker_bench_memory_{uuid.uuid4().hex[:8]}"
    with (
        fresh_database(name) as url,
        broker() as redis_url,
        tempfile.TemporaryDirectory(prefix=f"{name}-") as scratch,
    ):
        organization, person = seed_person(url, 5)
        who = {"personUuid": str(person), "organizationUuid": str(organization)}
        tmp = Path(scratch)
        day = measure(url, redis_db(redis_url, 14), 86_400, args.commands, who, tmp)
        hour = measure(url, redis_db(redis_url, 15), 3_600, args.commands, who, tmp)
    for label, figures in (("a day", day), ("an hour", hour)):
        print(f"outcomes kept {label}: {figures['outcome_bytes']:.0f} bytes an outcome"
              f" (TTL {figures['ttl']} s), Redis used {figures['used_with_outcomes']:,} bytes"
              f" after {args.commands} commands; {figures['queued_bytes']:.0f} bytes a"
              " queued message")  # fmt: skip


if __name__ == "__main__":
    main()
