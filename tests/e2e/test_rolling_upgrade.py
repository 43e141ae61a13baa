"""A rolling upgrade from the previous release, under a stream of commands (docs/upgrades.md).

The previous release is commit c5f4939 (before the review fixes, schema 0010), run from its
own source with this environment's packages. Its worker runs against its own schema; then,
while commands keep coming, this release's migrate brings the schema to this release's
head, this release's worker starts beside the old one, and the old one is stopped warm, as
a Deployment's rolling update does. Every command sent gets one outcome, and the database
holds each call once with each attempt once: nothing lost, nothing doubled.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from calls_worker.adapters.db.engine import build_engine
from calls_worker.adapters.db.migrate import current_revision, head_revision
from calls_worker.client import CallsClient
from tests.db_world import Db
from tests.e2e.conftest import Process, control_app_for, redis_database, wait_for_worker, worker_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PREVIOUS = "c5f4939"
PREVIOUS_HEAD = "0010"
RATE = 20  # creates a second, each followed by an attempt on an earlier call
LAG = 10


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's source, from this repository's history."""
    folder = tmp_path_factory.mktemp("previous")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", PREVIOUS, "src"],
                             capture_output=True, check=True, timeout=60).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True, timeout=60)
    return folder / "src"


def test_a_rolling_upgrade_loses_and_doubles_nothing(
    previous_release: Path, empty_database_url: str, redis_url: str, tmp_path: Path
) -> None:
    broker = redis_database(redis_url, 10)
    redis.Redis.from_url(broker).flushdb()
    old_env = worker_env(empty_database_url, broker, tmp_path / "old",
                         PYTHONPATH=str(previous_release))  # fmt: skip
    migrated = subprocess.run([sys.executable, "-m", "calls_worker", "migrate"], env=old_env,
                              capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert migrated.returncode == 0, migrated.stderr
    engine = build_engine(empty_database_url, pool_size=2)
    db = Db(engine)
    assert current_revision(engine) == PREVIOUS_HEAD
    organization = db.organization(5)
    people = [db.person(organization) for _ in range(20)]

    control = control_app_for(broker)
    old = Process(["worker", "-c", "2", "-n", "old@%h", "-Q", "calls.commands"], old_env,
                  tmp_path / "old.log")  # fmt: skip
    new: Process | None = None
    sent: list[tuple[str, Any]] = []  # (call uuid, handle) for creates and attempts
    stop = threading.Event()
    failures: list[BaseException] = []

    attempted: set[str] = set()

    def stream() -> None:
        """A create a tick, and an attempt on the call created LAG ticks before (once its
        create has its outcome: with two workers, an attempt must not overtake it)."""
        try:
            with CallsClient(broker) as client:
                creates: list[tuple[str, Any]] = []
                while not stop.is_set():
                    call = str(uuid.uuid4())
                    person = str(people[len(creates) % len(people)])
                    handle = client.send("create", {
                        "uuid": call, "personUuid": person,
                        "organizationUuid": str(organization)})  # fmt: skip
                    creates.append((call, handle))
                    sent.append((call, handle))
                    if len(creates) > LAG:
                        earlier, its_create = creates[-LAG - 1]
                        its_create.outcome(60)
                        sent.append((earlier, client.send("add_attempt", {
                            "callUuid": earlier, "userUuid": str(uuid.uuid4()),
                            "attemptedAt": datetime.now(UTC).isoformat()})))  # fmt: skip
                        attempted.add(earlier)
                    time.sleep(1 / RATE)
        except BaseException as error:  # the test fails on it below
            failures.append(error)

    producer = threading.Thread(target=stream, daemon=True)
    try:
        wait_for_worker(control, "old", old)
        producer.start()
        time.sleep(3)
        migrate = subprocess.run(
            [sys.executable, "-m", "calls_worker", "migrate"],
            env=worker_env(empty_database_url, broker, tmp_path / "migrate"),
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert migrate.returncode == 0, migrate.stderr
        assert current_revision(engine) == head_revision()
        time.sleep(3)  # the old worker on the new schema
        new = Process(["worker", "-c", "2", "-n", "new@%h", "-Q", "calls.commands"],
                      worker_env(empty_database_url, broker, tmp_path / "new"),
                      tmp_path / "new.log")  # fmt: skip
        wait_for_worker(control, "new", new)
        time.sleep(2)
        assert old.stop() == 0, old.output()[-3000:]  # warm: SIGTERM
        time.sleep(3)
    finally:
        stop.set()
        producer.join(30)
        control.close()
    try:
        assert not failures, failures
        outcomes = [(call, handle.outcome(120)) for call, handle in sent]
    finally:
        if new is not None:
            new.stop()
        old.stop()
    assert len(sent) > 100
    assert "batch of" in old.output(), "the previous release applied nothing"
    assert new is not None
    assert "batch of" in new.output(), "this release applied nothing"
    bad = [(call, outcome) for call, outcome in outcomes if outcome.get("ok") is not True]
    assert bad == [], f"{bad[:5]}\n{old.output()[-3000:]}"
    calls = {str(row.uuid): row.attempts for row in db.sql(
        "SELECT c.uuid, count(a.*) AS attempts FROM calls c"
        " LEFT JOIN call_attempts a ON a.call_uuid = c.uuid GROUP BY c.uuid")}  # fmt: skip
    expected = {call for call, _ in sent}
    assert set(calls) == expected, "lost or unexpected calls"
    wrong = {call: n for call, n in calls.items() if n != (call in attempted)}
    assert wrong == {}, "attempts lost or doubled"
    assert db.sql("SELECT count(*) FROM worker_rejected_commands").scalar() == 0
    engine.dispose()
