"""Sweep lag: how long a call that reached its limit waits to be expired.

    python -m bench.lag [--interval 5] [--calls 300] [--seconds 60]

A worker and beat (sweep every S seconds) run while calls reach their limit at random
moments over the run; each call's lag is the time from the commit of its last attempt
(its attemptedAt, stamped as it is sent) to its expiredAt. Goal: every lag ≤ S plus the
longest sweep's duration.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import text

from bench.common import Row, print_table, write_results
from bench.fixtures import broker, fresh_database, seed_person
from bench.workers import bench_env, process, wait_for_ping
from calls_worker.adapters.db.engine import build_engine
from calls_worker.client import CallsClient


def run(interval: int, calls: int, seconds: float) -> list[Row]:
    logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    rng = random.Random(5)
    with fresh_database("calls_worker_bench_lag") as url, broker() as broker_url:
        organization, person = seed_person(url, 2)
        env = bench_env(url, broker_url, CALLS_WORKER_SWEEP_INTERVAL_SECONDS=str(interval),
                        CALLS_WORKER_DATA_DIR=str(logs))  # fmt: skip
        worker = ["-m", "calls_worker", "worker", "-c", "2", "-n", "lag@%h"]
        beat = ["-m", "calls_worker", "beat"]
        with (
            process(worker, env, logs / "worker.log"),
            process(beat, env, logs / "beat.log"),
            CallsClient(broker_url) as client,
        ):
            wait_for_ping(broker_url, "lag@")
            person_fields = {"personUuid": str(person), "organizationUuid": str(organization)}
            made = [client.send("create", person_fields).outcome(30)["call"]["uuid"]
                    for _ in range(calls)]  # fmt: skip
            for call in made:  # one attempt each: one short of the limit
                client.send("add_attempt", {"callUuid": call, "userUuid": str(person),
                            "attemptedAt": _now()}).outcome(30)  # fmt: skip
            moments = sorted(rng.uniform(0, seconds) for _ in made)
            started = time.monotonic()
            for call, moment in zip(made, moments, strict=True):
                time.sleep(max(0.0, started + moment - time.monotonic()))
                client.send("add_attempt", {"callUuid": call, "userUuid": str(person),
                            "attemptedAt": _now()}).outcome(30)  # fmt: skip
            time.sleep(interval * 2 + 2)
        engine = build_engine(url, pool_size=1)
        with engine.connect() as connection:
            lags = [
                float(row.lag)
                for row in connection.execute(text(
                    "SELECT extract(epoch FROM c.expired_at - max(a.attempted_at)) AS lag"
                    " FROM calls c JOIN call_attempts a ON a.call_uuid = c.uuid"
                    " WHERE c.status = 'expired' GROUP BY c.uuid"))
            ]  # fmt: skip
            longest_sweep = connection.execute(
                text("SELECT max(duration_seconds) FROM worker_sweep_runs WHERE NOT skipped")
            ).scalar_one()
        engine.dispose()
    assert len(lags) == calls, f"{len(lags)} of {calls} calls expired"
    bound = interval + float(longest_sweep)
    quantiles = statistics.quantiles(lags, n=100)
    details = {"p50_s": round(quantiles[49], 3), "p95_s": round(quantiles[94], 3),
               "max_s": round(max(lags), 3), "calls": calls, "interval_s": interval,
               "longest_sweep_s": round(float(longest_sweep), 4)}  # fmt: skip
    return [
        Row("lag", f"longest sweep lag, interval {interval}s", max(lags), "s",
            "interval + longest sweep", bound, "≤ 1.0× baseline", max(lags) <= bound, details)
    ]  # fmt: skip


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=60)
    arguments = parser.parse_args()
    rows = run(arguments.interval, arguments.calls, arguments.seconds)
    print_table(rows)
    write_results(rows)


if __name__ == "__main__":
    main()
