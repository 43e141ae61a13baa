"""PostgreSQL's CPU per command, by kind, with group commit: what one PostgreSQL can carry.

    python -m bench.postgres_cpu [--commands 3000] [--batch 32] [--rounds 3]

Each kind's commands are applied the way a worker's pool process applies a batch
(``service.apply.handle_batch`` with the worker's unit of work, call events on, batches
of ``--batch`` in one transaction each), on one database connection, and the CPU time of
that connection's server process (psutil: user + system) is divided by the commands. So
is the relay's, per event it reads, publishes (to nothing) and marks, and the sweep's, per
call it expires. What is set up for a kind (the calls an add-attempt needs) is not
measured. The median of ``--rounds`` rounds is the figure. The server must run on this
machine (its processes are read). bench/README.md turns these into how many commands a
second saturate a PostgreSQL of N cores: a projection, not a measurement.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import psutil
from sqlalchemy import Engine, text

from bench.common import Row, print_table, write_results
from bench.fixtures import fresh_database
from calls_worker.adapters.db.engine import build_engine
from calls_worker.adapters.db.events import relay_batch
from calls_worker.adapters.db.unit_of_work import SqlUnitOfWork
from calls_worker.domain.commands import CommandKind, parse_command
from calls_worker.service.apply import BatchEntry, handle_batch
from calls_worker.service.sweep import expire_exhausted_calls

KINDS: tuple[CommandKind, ...] = ("create", "add_attempt", "complete", "cancel", "expire")


def backend_seconds(engine: Engine) -> Callable[[], float]:
    """The CPU seconds so far of the server process behind the engine's one connection."""
    with engine.connect() as connection:
        pid = int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())
    process = psutil.Process(pid)

    def seconds() -> float:
        times = process.cpu_times()
        return float(times.user + times.system)

    return seconds


class World:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        with engine.begin() as connection:
            self.open = self._organization(connection, None)
            self.strict = self._organization(connection, 1)

    @staticmethod
    def _organization(connection: Any, maximum: int | None) -> UUID:
        uuid = uuid4()
        connection.execute(text("INSERT INTO organizations (uuid, name, max_call_attempts)"
                                " VALUES (:u, 'bench', :m)"),
                           {"u": uuid, "m": maximum})  # fmt: skip
        return uuid

    def persons(self, organization: UUID, count: int) -> list[UUID]:
        made = [uuid4() for _ in range(count)]
        with self.engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO persons (uuid, owning_organization_uuid)"
                " SELECT p, :o FROM unnest(CAST(:ps AS uuid[])) p"),
                {"o": organization, "ps": made})  # fmt: skip
        return made

    def apply(self, kind: CommandKind, payloads: list[dict[str, Any]], batch: int) -> None:
        for start in range(0, len(payloads), batch):
            entries = [BatchEntry(str(uuid4()), parse_command(kind, payload))
                       for payload in payloads[start : start + batch]]  # fmt: skip
            result = handle_batch(entries, lambda: SqlUnitOfWork(self.engine))
            assert all(o is not None and o["ok"] for o in result.outcomes), result.outcomes[:1]

    def creates(self, organization: UUID, count: int) -> list[dict[str, Any]]:
        return [{"uuid": str(uuid4()), "personUuid": str(person),
                 "organizationUuid": str(organization)}
                for person in self.persons(organization, count)]  # fmt: skip


def _now() -> str:
    return datetime.now(UTC).isoformat()


def measure_round(engine: Engine, count: int, batch: int) -> dict[str, float]:
    world = World(engine)
    cpu = backend_seconds(engine)
    per: dict[str, float] = {}

    def timed(name: str, action: Callable[[], Any], units: int) -> None:
        before = cpu()
        action()
        per[name] = (cpu() - before) / units * 1000  # ms a unit

    creates = world.creates(world.open, count)
    timed("create", lambda: world.apply("create", creates, batch), count)
    calls = [c["uuid"] for c in creates]
    attempts = [{"callUuid": c, "userUuid": str(uuid4()), "attemptedAt": _now()} for c in calls]
    timed("add_attempt", lambda: world.apply("add_attempt", attempts, batch), count)
    third = count // 3
    ends = {
        "complete": [{"callUuid": c, "userUuid": str(uuid4()), "result": "ok"}
                     for c in calls[:third]],
        "cancel": [{"callUuid": c} for c in calls[third : 2 * third]],
        "expire": [{"callUuid": c} for c in calls[2 * third : 3 * third]],
    }  # fmt: skip
    for kind, payloads in ends.items():
        timed(kind, lambda k=kind, p=payloads: world.apply(k, p, batch), len(payloads))  # type: ignore[misc]
    # The relay: every event those commands wrote, read, published (to nothing), marked.
    with engine.connect() as connection:
        events = int(connection.execute(text(
            "SELECT count(*) FROM worker_call_events WHERE published_at IS NULL"
        )).scalar_one())  # fmt: skip

    def relay_all() -> None:
        while relay_batch(engine, 500, lambda published: None):
            pass

    timed("relay, per event", relay_all, events)
    # The sweep: calls of an organization whose maximum is 1, each with its attempt.
    due = world.creates(world.strict, count)
    world.apply("create", due, batch)
    world.apply("add_attempt", [{"callUuid": c["uuid"], "userUuid": str(uuid4()),
                                 "attemptedAt": _now()} for c in due], batch)  # fmt: skip
    timed("sweep, per call expired", lambda: expire_exhausted_calls(
        lambda: SqlUnitOfWork(engine), datetime.now(UTC), 1000), count)  # fmt: skip
    return per


def run(count: int, batch: int, rounds: int) -> list[Row]:
    results: list[dict[str, float]] = []
    with fresh_database("calls_worker_bench_postgres_cpu") as url:
        engine = build_engine(url, pool_size=1)
        try:
            for n in range(rounds):
                started = time.perf_counter()
                results.append(measure_round(engine, count, batch))
                shown = ", ".join(f"{k} {v:.3f}" for k, v in results[-1].items())
                print(f"  round {n + 1} ({time.perf_counter() - started:.0f} s):"
                      f" PostgreSQL CPU ms {shown}", flush=True)  # fmt: skip
        finally:
            engine.dispose()
    rows = []
    for name in results[0]:
        value = statistics.median(r[name] for r in results)
        rows.append(Row(
            "postgres-cpu", f"PostgreSQL CPU: {name} (batches of {batch}, events on)", value,
            "ms", "", 0.0, "(measured, no goal)", True,
            {"commands": count, "batch": batch, "rounds": [round(r[name], 4) for r in results],
             "statistic": "median of the rounds"},
        ))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=3_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="Do not update results.json.")
    arguments = parser.parse_args()
    rows = run(arguments.commands, arguments.batch, arguments.rounds)
    print_table(rows)
    if not arguments.no_write:
        write_results(rows)


if __name__ == "__main__":
    main()
