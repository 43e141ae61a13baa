"""Commands sent with Celery's ``expires``: past it, a command is not applied, and it is kept
with the reason, on both brokers, never dropped without a trace.

Celery by itself would drop such a command (REVOKED in the result backend, acknowledged);
RabbitMQ, which gets ``expires`` as a per-message expiration, dead-letters one that expires
in its queue with the reason ``expired``. The worker keeps both among the rejected commands
(``dead-letters list``), unapplied; only a sweep that expired in the sweeps' queue is
dropped (the next one supersedes it), told apart by ``x-first-death-queue``.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import pytest
from celery import Celery
from kombu import Connection, Exchange, Queue

from calls_worker.wire import DEAD_LETTER_EXCHANGE, QUEUE_ARGUMENTS, TASK_NAMES
from tests.db_world import Db
from tests.e2e.conftest import Process, wait_until

pytestmark = pytest.mark.brokers("redis", "rabbitmq")

TIMEOUT = 60


def kept(db: Db, command_id: str) -> list[tuple[str, str]]:
    return [tuple(row) for row in db.sql(
        "SELECT task_name, reason FROM worker_rejected_commands WHERE command_id = :c",
        c=command_id).all()]  # fmt: skip


def new_person(db: Db) -> dict[str, str]:
    organization = db.organization(3)
    return {"personUuid": str(db.person(organization)), "organizationUuid": str(organization)}


def not_applied(db: Db, command_id: str, person: dict[str, str]) -> None:
    assert db.sql("SELECT count(*) FROM calls WHERE person_uuid = :p",
                  p=person["personUuid"]).scalar() == 0  # fmt: skip
    assert db.sql("SELECT count(*) FROM worker_processed_commands WHERE command_id = :c",
                  c=command_id).scalar() == 0  # fmt: skip


def test_a_command_whose_expires_has_passed_is_kept_not_applied(
    db: Db, worker: Process, control_app: Celery
) -> None:
    """Sent already past its expires (as a producer whose command waited too long would):
    the worker keeps it with the reason, once, and applies nothing; a command sent in time
    beside it is applied."""
    command_id, person = f"expired-{uuid4()}", new_person(db)
    control_app.send_task(TASK_NAMES["create"], kwargs={"command": person}, task_id=command_id,
                          expires=datetime.now(UTC) - timedelta(minutes=5))  # fmt: skip
    in_time, other = f"in-time-{uuid4()}", new_person(db)
    control_app.send_task(TASK_NAMES["create"], kwargs={"command": other}, task_id=in_time,
                          expires=datetime.now(UTC) + timedelta(minutes=5))  # fmt: skip
    wait_until(lambda: kept(db, command_id), TIMEOUT, "the expired command kept")
    wait_until(lambda: db.sql("SELECT count(*) FROM calls WHERE person_uuid = :p",
                              p=other["personUuid"]).scalar() == 1, TIMEOUT, "the other applied")
    time.sleep(2)  # nothing comes later
    ((task, reason),) = kept(db, command_id)
    assert task == TASK_NAMES["create"]
    assert "expired" in reason, reason
    not_applied(db, command_id, person)
    assert kept(db, in_time) == []


@pytest.mark.brokers("rabbitmq")
def test_a_command_that_expires_in_its_queue_is_dead_lettered_and_kept(
    db: Db, worker: Process, control_app: Celery, broker_url: str
) -> None:
    """RabbitMQ expires the message in a queue nobody consumes (a queue of commands with
    the worker's arguments, so with its dead-letter exchange); the worker's dead-letter
    consumer keeps it, with the reason and the queue it expired in."""
    name = f"calls.commands.expiring-{uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, "topic", durable=True), routing_key=name, durable=True,
                  queue_arguments=dict(QUEUE_ARGUMENTS))  # fmt: skip
    command_id, person = f"expires-queued-{uuid4()}", new_person(db)
    with Connection(broker_url) as connection:
        queue.bind(connection.default_channel).declare()
        try:
            control_app.send_task(TASK_NAMES["create"], kwargs={"command": person},
                                  task_id=command_id, expires=1.0,
                                  queue=queue)  # type: ignore[arg-type]  # fmt: skip
            wait_until(lambda: kept(db, command_id), TIMEOUT, "the dead letter kept")
            time.sleep(2)
            ((task, reason),) = kept(db, command_id)
            assert task == TASK_NAMES["create"]
            assert f"dead-lettered by RabbitMQ from {name}: expired there" in reason, reason
            not_applied(db, command_id, person)
        finally:
            channel: Any = connection.default_channel
            channel.queue_delete(name)
            channel.exchange_delete(name)
    assert DEAD_LETTER_EXCHANGE in QUEUE_ARGUMENTS.values()
