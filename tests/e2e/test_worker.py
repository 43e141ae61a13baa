"""The queue path end to end: producer client → broker → a real worker process → PostgreSQL,
on Redis and on RabbitMQ (outcomes in PostgreSQL there)."""

from __future__ import annotations

import base64
import json
import pickle
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import psutil
import pytest
import redis
from celery import Celery

from calls_worker.client import CallsClient
from calls_worker.wire import PRUNE_TASK, SWEEP_TASK, SWEEPS_QUEUE
from tests.db_world import ISSUED, Db
from tests.e2e.conftest import Process, queues_drained, wait_until

pytestmark = pytest.mark.brokers("redis", "rabbitmq")

TIMEOUT = 30
ROOT = Path(__file__).resolve().parents[2]


def seeded_person(db: Db, max_call_attempts: int | None) -> dict[str, str]:
    organization = db.organization(max_call_attempts)
    return {"personUuid": str(db.person(organization)), "organizationUuid": str(organization)}


def attempt(client: CallsClient, call: str, command_id: str | None = None) -> Any:
    command = {"callUuid": call, "userUuid": str(uuid4()), "attemptedAt": ISSUED}
    return client.send("add_attempt", command, command_id=command_id).outcome(TIMEOUT)


def test_create_attempts_then_the_sweep_expires_exactly_the_calls_at_the_limit(
    db: Db, worker: Process, client: CallsClient, control_app: Celery
) -> None:
    person = seeded_person(db, 2)
    calls = [client.send("create", person).outcome(TIMEOUT)["call"]["uuid"] for _ in range(3)]
    for call, attempts in zip(calls, (1, 2, 3), strict=True):
        for _ in range(attempts):
            assert attempt(client, call)["ok"] is True
    unlimited = client.send("create", seeded_person(db, None)).outcome(TIMEOUT)["call"]["uuid"]
    for _ in range(5):
        attempt(client, unlimited)

    report = control_app.send_task(SWEEP_TASK, queue=SWEEPS_QUEUE).get(timeout=TIMEOUT)

    assert report["expired"] == 2
    assert report["skipped"] is False
    assert report["durationSeconds"] > 0
    statuses = [db.row(UUID(c))["status"] for c in [*calls, unlimited]]
    assert statuses == ["requested", "expired", "expired", "requested"]


def test_the_hourly_prune_forgets_outcomes_a_table_at_a_time_after_the_retention(
    db: Db, worker: Process, client: CallsClient, control_app: Celery
) -> None:
    def prune() -> dict[str, Any]:
        report: dict[str, Any] = control_app.send_task(PRUNE_TASK, queue=SWEEPS_QUEUE).get(
            timeout=TIMEOUT
        )
        return report

    def turn_began_hours_ago(hours: int) -> None:
        db.sql(f"UPDATE worker_processed_rotation SET current_since = now() - interval '{hours}h'")

    def send_again() -> Any:
        # Not from the result backend's copy of the first outcome: from the worker.
        control_app.AsyncResult(command_id).forget()
        return client.send("create", person, command_id=command_id).outcome(TIMEOUT)

    command_id = f"kept-{uuid4()}"
    person = seeded_person(db, 5)
    first = client.send("create", person, command_id=command_id).outcome(TIMEOUT)
    assert prune()["rotated"] is False  # the retention (72 h) has not passed
    # The create's event, once published, is kept as long, then forgotten by the prune.
    published = "SELECT count(*) FROM worker_call_events WHERE published_at IS NOT NULL"
    wait_until(lambda: db.sql(published).scalar() == 1, TIMEOUT, "the event to be published")
    assert prune()["eventsForgotten"] == 0
    db.sql("UPDATE worker_call_events SET recorded_at = now() - interval '73h',"
           " published_at = now() - interval '73h'")  # fmt: skip
    assert prune()["eventsForgotten"] == 1
    turn_began_hours_ago(73)
    report = prune()
    assert report["rotated"] is True
    assert report["retentionHours"] == 72

    # In the oldest table kept now: a redelivery still gets the first outcome.
    assert send_again() == first
    assert db.sql("SELECT count(*) FROM calls").scalar() == 1
    assert worker.output().count(f"command create {command_id}") == 2

    turn_began_hours_ago(73)
    assert prune()["rotated"] is True
    again = send_again()
    assert again["ok"] is True
    assert again["call"]["uuid"] != first["call"]["uuid"]  # forgotten: applied as new
    assert db.sql("SELECT count(*) FROM calls").scalar() == 2


def test_the_same_command_delivered_twice_has_one_effect(
    db: Db, worker: Process, client: CallsClient, broker_url: str
) -> None:
    call = client.send("create", seeded_person(db, 5)).outcome(TIMEOUT)["call"]["uuid"]
    command_id = f"twice-{uuid4()}"
    command = {"callUuid": call, "userUuid": str(uuid4()), "attemptedAt": ISSUED}
    first = client.send("add_attempt", command, command_id=command_id)
    second = client.send("add_attempt", command, command_id=command_id)
    assert first.outcome(TIMEOUT) == second.outcome(TIMEOUT)
    wait_until(lambda: queues_drained(broker_url), TIMEOUT, "both deliveries to be acknowledged")
    wait_until(
        lambda: worker.output().count(f"command add_attempt {command_id}") == 2,
        TIMEOUT,
        "the worker to handle both deliveries",
    )
    assert db.row(UUID(call))["attempt_count"] == db.attempt_rows(UUID(call)) == 1


def rejected(db: Db) -> list[dict[str, Any]]:
    rows = db.sql("SELECT * FROM worker_rejected_commands ORDER BY id").mappings()
    return [dict(row) for row in rows]


class RunsWhenUnpickled:
    """Unpickling this creates a file: the proof that a pickle body was never loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_bad_messages_are_kept_with_their_reason_and_the_worker_keeps_serving(
    db: Db, worker: Process, client: CallsClient, control_app: Celery, tmp_path: Path
) -> None:
    marker = tmp_path / "pickle-was-loaded"
    pickle.dumps(RunsWhenUnpickled(marker))  # it does pickle
    control_app.send_task(
        "calls.create", kwargs={"command": RunsWhenUnpickled(marker)}, serializer="pickle"
    )
    control_app.send_task("calls.create", kwargs={"command": {"personUuid": "nobody"}})
    control_app.send_task("calls.cancel", args=[str(uuid4())])
    control_app.send_task("calls.cancel", kwargs={"command": "{not json"})
    control_app.send_task("calls.no_such_task", kwargs={"command": {}})

    rows = wait_until(lambda: len(rejected(db)) == 5 and rejected(db), TIMEOUT, "5 rejections")
    reasons: dict[str, list[str]] = {row["task_name"]: [] for row in rows}
    for row in rows:
        reasons[row["task_name"]].append(row["reason"])
    assert any("pickle" in reason for reason in reasons["calls.create"])
    assert any("create command is invalid" in reason for reason in reasons["calls.create"])
    assert any("exactly one keyword argument" in r for r in reasons["calls.cancel"])
    assert any("cancel command is invalid" in r for r in reasons["calls.cancel"])
    assert any("unknown task" in r for r in reasons["calls.no_such_task"])
    assert all(row["raw_body"] for row in rows)
    assert not marker.exists()

    outcome = client.send("create", seeded_person(db, 3)).outcome(TIMEOUT)
    assert outcome["ok"] is True
    assert db.sql("SELECT count(*) FROM calls").scalar() == 1


@pytest.mark.brokers("redis")  # RabbitMQ's: test_rabbitmq.py
def test_the_documented_envelope_works_without_celery(
    db: Db, worker: Process, client: CallsClient, redis_url: str
) -> None:
    call = client.send("create", seeded_person(db, 3)).outcome(TIMEOUT)["call"]["uuid"]
    envelope = json.loads((ROOT / "docs/examples/cancel-message.json").read_text())
    args, kwargs, embed = json.loads(base64.b64decode(envelope["body"]))
    kwargs["command"]["callUuid"] = call
    envelope["body"] = base64.b64encode(json.dumps([args, kwargs, embed]).encode()).decode()
    command_id = f"raw-{uuid4()}"
    envelope["headers"].update(id=command_id, root_id=command_id)
    envelope["properties"].update(correlation_id=command_id, delivery_tag=str(uuid4()))
    connection = redis.Redis.from_url(redis_url)
    connection.lpush("calls.commands", json.dumps(envelope))

    meta = wait_until(
        lambda: connection.get(f"celery-task-meta-{command_id}"), TIMEOUT, "the outcome"
    )
    outcome = json.loads(meta)["result"]
    assert outcome["ok"] is True, outcome
    assert outcome["call"]["status"] == "cancelled"
    assert outcome["call"]["cancelledAt"] == "2026-03-01T09:00:00+00:00"  # its issuedAt


def publish_raw(control_app: Celery, body: bytes, content_type: str, task: str) -> str:
    """A message on calls.commands as any producer could write it: task headers, any body."""
    command_id = str(uuid4())
    with control_app.connection_for_write() as connection:
        connection.Producer().publish(
            body, exchange="", routing_key="calls.commands", content_type=content_type,
            content_encoding="binary", headers={"task": task, "id": command_id, "lang": "py"},
        )  # fmt: skip
    return command_id


def test_a_binary_or_oversized_message_is_kept_and_the_worker_lives_on(
    db: Db, worker: Process, client: CallsClient, control_app: Celery
) -> None:
    """kombu trusts application/data whatever accept_content says; such a body used to
    reach Celery's strategy undecoded and end the worker process. It is refused at the
    door now, like a message over the size limit, and both are kept."""
    pid = worker.popen.pid
    children = {p.pid for p in psutil.Process(pid).children()}
    binary = publish_raw(control_app, b"\x80\x04\x95binary\x00body", "application/data",
                         "calls.create")  # fmt: skip
    text = publish_raw(control_app, b"plain text", "application/text", "calls.cancel")
    big = json.dumps([[], {"command": {"notes": "x" * 1_100_000}}, {}]).encode()
    oversized = publish_raw(control_app, big, "application/json", "calls.create")

    rows = wait_until(lambda: len(rejected(db)) == 3 and rejected(db), TIMEOUT, "3 rejections")
    by_id = {row["command_id"]: row for row in rows}
    assert "'application/data' is not accepted" in by_id[binary]["reason"]
    assert by_id[binary]["raw_body"].startswith("base64:")
    assert "'application/text' is not accepted" in by_id[text]["reason"]
    assert "over the limit of 1048576 bytes" in by_id[oversized]["reason"]
    assert len(by_id[oversized]["raw_body"]) == 1_048_576  # kept, truncated
    outcome = client.send("create", seeded_person(db, 3)).outcome(TIMEOUT)
    assert outcome["ok"] is True
    assert worker.popen.poll() is None
    assert worker.popen.pid == pid
    assert {p.pid for p in psutil.Process(pid).children()} == children  # no process replaced
    # acknowledged just after its outcome is stored
    wait_until(lambda: queues_drained(worker.env["CALLS_WORKER_BROKER_URL"]), 10,
               "the queue to drain")  # fmt: skip
