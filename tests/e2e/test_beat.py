"""Two beat processes started by mistake: each exhausted call is still expired once."""

from __future__ import annotations

import time
from pathlib import Path
from uuid import UUID

import pytest

from tests.db_world import Db
from tests.e2e.conftest import Process, wait_until, worker_env
from tests.reliability import Reliability


@pytest.mark.slow
def test_two_beats_expire_each_call_once(
    db: Db,
    worker: Process,
    database_url: str,
    redis_url: str,
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
                redis_url,
                tmp_path / f"beat{n}",
                CALLS_WORKER_SWEEP_INTERVAL_SECONDS="1",
            ),
            tmp_path / f"beat{n}.log",
        )
        for n in (1, 2)
    ]
    try:
        for _ in range(3):  # more calls reach their limit while both beats run
            time.sleep(1)
            fresh = [db.call(person, organization) for _ in range(10)]
            for call in fresh:
                db.plain_attempt(call)
            calls += fresh

        def all_expired() -> bool:
            expired = db.sql("SELECT count(*) FROM calls WHERE status = 'expired'").scalar()
            return bool(expired == len(calls))

        def swept_often() -> bool:
            runs = db.sql("SELECT count(*) FROM worker_sweep_runs").scalar()
            return bool(runs is not None and runs >= 4)

        wait_until(all_expired, 30, "every exhausted call to expire")
        wait_until(lambda: all("Sending due task" in beat.output() for beat in beats), 30,
                   "both beats to send sweeps")  # fmt: skip
        # A slow start can fold the first rounds into one sweep; wait for more rounds.
        wait_until(swept_often, 30, "four sweeps to be journaled")
    finally:
        for beat in beats:
            beat.stop()
    runs = db.sql("SELECT expired, skipped, duration_seconds FROM worker_sweep_runs").all()
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
