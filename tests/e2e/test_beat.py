"""Two beat processes started by mistake: each exhausted call is still expired once."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

import pytest

from calls_worker.adapters.db.journal import SWEEP_LOCK
from tests.db_world import Db
from tests.e2e.conftest import Process, wait_until, worker_env
from tests.reliability import Reliability

# Each test on the session's worker runs on Redis and on RabbitMQ (tests/e2e/conftest.py).
pytestmark = pytest.mark.brokers("redis", "rabbitmq")

SENT = re.compile(r"^(\S+ \S+) INFO MainProcess celery.beat: Scheduler: Sending due task "
                  r"expire-exhausted-calls", re.MULTILINE)  # fmt: skip


def sends(beat: Process) -> list[datetime]:
    """When ``beat`` sent a sweep, from its log."""
    return [datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=UTC)
            for t in SENT.findall(beat.output())]


@pytest.mark.scenario("two-beats")
@pytest.mark.slow
def test_two_beats_expire_each_call_once(
    db: Db,
    worker: Process,
    database_url: str,
    broker_url: str,
    tmp_path: Path,
    reliability: Reliability,
) -> None:
    organization = db.organization(1)
    person = db.person(organization)
    calls = [db.call(person, organization, attempts=1) for _ in range(30)]
    beats = [
        Process(
            ["beat"],
            worker_env(
                database_url,
                broker_url,
                tmp_path / f"beat{n}",
                CALLS_WORKER_SWEEP_INTERVAL_SECONDS="1",
            ),
            tmp_path / f"beat{n}.log",
        )
        for n in (1, 2)
    ]
    try:
        wait_until(lambda: all(len(sends(beat)) >= 2 for beat in beats), 60,
                   "both beats to send sweeps")  # fmt: skip
        # While something else holds the sweep lock, every sweep either beat sends is
        # skipped; more calls reach their limit meanwhile.
        with db.engine.connect() as holder:
            holder.exec_driver_sql("SELECT pg_advisory_lock(%s)", (SWEEP_LOCK,))
            for _ in range(3):
                time.sleep(1)
                fresh = [db.call(person, organization) for _ in range(10)]
                for call in fresh:
                    db.plain_attempt(call)
                calls += fresh
            wait_until(lambda: db.sql("SELECT count(*) FROM worker_sweep_runs WHERE skipped")
                       .scalar(), 30, "a sweep to find another sweeping")  # fmt: skip
            holder.exec_driver_sql("SELECT pg_advisory_unlock(%s)", (SWEEP_LOCK,))
            holder.commit()

        def all_expired() -> bool:
            expired = db.sql("SELECT count(*) FROM calls WHERE status = 'expired'").scalar()
            return bool(expired == len(calls))

        def swept_often() -> bool:
            runs = db.sql("SELECT count(*) FROM worker_sweep_runs").scalar()
            return bool(runs is not None and runs >= 4)

        wait_until(all_expired, 30, "every exhausted call to expire")
        # A slow start can fold the first rounds into one sweep; wait for more rounds.
        wait_until(swept_often, 30, "four sweeps to be journaled")
    finally:
        for beat in beats:
            beat.stop()
    runs = db.sql("SELECT expired, skipped, duration_seconds FROM worker_sweep_runs").all()
    first, second = (sends(beat) for beat in beats)
    # The two beats ran at the same time: each sent sweeps within a second of the other's.
    close = [t for t in first if any(abs((t - u).total_seconds()) < 1 for u in second)]
    assert len(close) >= 3, (first, second)
    assert any(run.skipped for run in runs)
    expired = db.sql("SELECT count(*) FROM calls WHERE status = 'expired'").scalar()
    reliability.record(
        "two-beats",
        commands=len(calls),
        lost=len(calls) - expired,
        doubled=sum(run.expired for run in runs) - expired,
    )
    assert len(runs) >= 4
    assert sum(run.expired for run in runs) == len(calls)  # no call counted by two sweeps
    assert all(run.duration_seconds < 5 for run in runs)  # none waited on another
    assert len({db.row(UUID(str(call)))["expired_at"] for call in calls}) >= 2
