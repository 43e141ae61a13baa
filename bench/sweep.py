"""Sweep benchmarks, each beside its baseline on the same data in the same run.

    python -m bench.sweep [--calls 1000000] [--idle-sizes 1000000,5000000]

1. Throughput: the worker's own sweep, batched as in production (1,000 calls a batch
   with events on, 5,000 with them off,
   each its own transaction), against the best hand-written single statement
   (``UPDATE calls … FROM persons JOIN organizations … WHERE status = 'requested' AND
   external_metadata IS NULL AND attempt_count >= max``, with the partial index on
   requested calls), each on a fresh copy of the data, in three alternating rounds (the
   medians are compared). With call events on (the default), the statement also writes
   each expired call's event: its ``RETURNING`` feeds an ``INSERT`` into the outbox,
   building the same event (the call with its attempts, the expiry) as the worker's
   sweep; with events off, the two as before. Goal: ≤ 1.0× the statement, and no batch
   holding its row locks for more than a second.
2. Nothing due: a sweep right after everything due was expired, against that same
   statement with nothing to do (it still scans the requested calls). Goal: ≤ 20 ms, at
   every size asked for.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Engine,
    and_,
    insert,
    select,
    text,
    update,
)

from bench.common import (
    Row,
    copy_of,
    median,
    print_table,
    server_url,
    template,
    timed,
    write_results,
)
from calls_worker.adapters.db.sweep import EVENT_COLUMNS, swept_event
from calls_worker.adapters.db.tables import call_events, calls, organizations, persons
from calls_worker.adapters.db.unit_of_work import SqlUnitOfWork
from calls_worker.config import SWEEP_BATCH_WITH_EVENTS, SWEEP_BATCH_WITHOUT_EVENTS
from calls_worker.service.sweep import expire_exhausted_calls
from calls_worker.service.unit_of_work import UnitOfWork

BATCH_SIZE = {True: SWEEP_BATCH_WITH_EVENTS, False: SWEEP_BATCH_WITHOUT_EVENTS}
"""The default batch, with events on and off."""
IDLE_RUNS = 20
ROUNDS = 3

BEST_SINGLE_STATEMENT = """
UPDATE calls c
SET status = 'expired', expired_at = :now, updated_at = :now
FROM persons p
JOIN organizations o ON o.uuid = p.owning_organization_uuid
WHERE c.person_uuid = p.uuid
  AND c.status = 'requested'
  AND c.external_metadata IS NULL
  AND o.max_call_attempts IS NOT NULL
  AND c.attempt_count >= o.max_call_attempts
"""


def statement_with_events(now: datetime) -> Any:
    """BEST_SINGLE_STATEMENT whose RETURNING feeds the INSERT of each expired call's event."""
    expired = (
        update(calls)
        .where(
            calls.c.person_uuid == persons.c.uuid,
            organizations.c.uuid == persons.c.owning_organization_uuid,
            and_(
                calls.c.status == "requested",
                calls.c.external_metadata.is_(None),
                organizations.c.max_call_attempts.is_not(None),
                calls.c.attempt_count >= organizations.c.max_call_attempts,
            ),
        )
        .values(status="expired", expired_at=now, updated_at=now)
        .returning(*[c for c in calls.c if c.name != "completed_by"],
                   organizations.c.uuid.label("owner"), organizations.c.max_call_attempts)
        .cte("expired")
    )  # fmt: skip
    return (
        insert(call_events)
        .add_cte(expired)
        .from_select(
            EVENT_COLUMNS,
            select(*swept_event(now, expired, expired.c.owner, expired.c.max_call_attempts))
            .select_from(expired),
        )
    )  # fmt: skip


def single_statement(engine: Engine, *, events: bool = True) -> tuple[float, int]:
    """The baseline, without the worker's due-tracking trigger (its best case)."""
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE calls DISABLE TRIGGER calls_track_due"))
    try:
        with engine.begin() as connection:
            now = datetime.now(UTC)
            statement = statement_with_events(now) if events else text(BEST_SINGLE_STATEMENT)
            seconds, result = timed(lambda: connection.execute(statement, {"now": now}))
            count = result.rowcount
        # (An INSERT fed by a CTE reports no row count: its events are counted instead.)
        return seconds, _events_written(engine) if events else count
    finally:
        with engine.begin() as connection:
            connection.execute(text("ALTER TABLE calls ENABLE TRIGGER calls_track_due"))


class TimedUnitOfWork(SqlUnitOfWork):
    """Records how long each batch's transaction lasted (its row locks live as long)."""

    durations: list[float]

    def __enter__(self) -> TimedUnitOfWork:
        self._started = time.perf_counter()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self.durations.append(time.perf_counter() - self._started)


def worker_sweep(engine: Engine, *, events: bool = True) -> tuple[float, int, list[float]]:
    durations: list[float] = []

    def factory() -> UnitOfWork:
        uow = TimedUnitOfWork(engine, events=events)
        uow.durations = durations
        return uow

    batch = BATCH_SIZE[events]
    seconds, result = timed(lambda: expire_exhausted_calls(factory, datetime.now(UTC), batch))
    return seconds, result.expired, durations


def idle(action: Callable[[], Any]) -> float:
    return median([timed(action)[0] for _ in range(IDLE_RUNS)])


def throughput(server: str, calls: int, *, events: bool = True) -> list[Row]:
    """Rounds alternate the two on fresh copies; each side's median counts."""
    data = template(server, calls)
    baseline_runs, worker_runs, batches = [], [], []
    for _ in range(ROUNDS):
        with copy_of(server, data) as engine:
            baseline_seconds, baseline_count = single_statement(engine, events=events)
            written = _events_written(engine)
        with copy_of(server, data) as engine:
            seconds, expired, durations = worker_sweep(engine, events=events)
            assert _events_written(engine) == written, "the two must write the same events"
        assert expired == baseline_count, (expired, baseline_count)
        baseline_runs.append(baseline_seconds)
        worker_runs.append(seconds)
        batches += durations
    baseline_seconds, seconds = median(baseline_runs), median(worker_runs)
    with_events = "with events" if events else "events off"
    return [
        Row("sweep", f"expire all due, {calls:,} calls, {with_events}", seconds, "s",
            "best single statement" + (" writing the events" if events else ""),
            baseline_seconds, "≤ 1.0× baseline", seconds <= baseline_seconds,
            {"expired": expired, "events_written": written,
             "batches_per_sweep": len(batches) // ROUNDS,
             "batch_size": BATCH_SIZE[events], "rounds": ROUNDS, "statistic": "median",
             "worker_runs_s": [round(r, 3) for r in worker_runs],
             "baseline_runs_s": [round(r, 3) for r in baseline_runs]}),
        Row("sweep", f"longest batch (row locks held), {calls:,}, {with_events}", max(batches), "s",
            "", None, "≤ 1 s", max(batches) <= 1.0, {"batches": len(batches)}),
    ]  # fmt: skip


def _events_written(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT count(*) FROM worker_call_events")).scalar_one())


def nothing_due(server: str, calls: int) -> Row:
    data = template(server, calls)
    with copy_of(server, data) as engine:
        worker_sweep(engine)  # expire everything due: now nothing is
        seconds = idle(lambda: worker_sweep(engine))
        baseline = idle(lambda: single_statement(engine))
    return Row("sweep", f"sweep with nothing due, {calls:,} calls", seconds * 1000, "ms",
               "single statement, nothing due", baseline * 1000, "≤ 20 ms",
               seconds <= 0.020, {"runs": IDLE_RUNS, "statistic": "median"})  # fmt: skip


def run(calls: int, idle_sizes: list[int]) -> list[Row]:
    server = server_url()
    rows = throughput(server, calls) + throughput(server, calls, events=False)
    rows += [nothing_due(server, size) for size in idle_sizes]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--idle-sizes", default="1000000,5000000")
    arguments = parser.parse_args()
    rows = run(arguments.calls, [int(n) for n in arguments.idle_sizes.split(",")])
    print_table(rows)
    write_results(rows)


if __name__ == "__main__":
    main()
