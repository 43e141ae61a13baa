"""The /metrics endpoints, scraped after real commands and real sweeps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import uuid4

import pytest
from celery import Celery
from sqlalchemy import Engine

from calls_worker.client import CallsClient
from calls_worker.wire import RECONCILE_TASK, SWEEP_TASK, SWEEPS_QUEUE, sent_at_header
from calls_worker.worker.metrics import serve_database_metrics
from tests.db_world import ISSUED, Db
from tests.e2e.conftest import (
    Process,
    free_ports,
    redis_database,
    scrape,
    wait_until,
    worker_env,
)

# Each test on the session's worker runs on Redis and on RabbitMQ (tests/e2e/conftest.py).
pytestmark = pytest.mark.brokers("redis", "rabbitmq")

TIMEOUT = 30


def command_count(samples: dict, kind: str, outcome: str) -> float:  # type: ignore[type-arg]
    key = ("calls_worker_commands_total", (("kind", kind), ("outcome", outcome)))
    return float(samples.get(key, 0.0))


def test_worker_metrics_count_what_happened(
    db: Db, worker: Process, client: CallsClient, control_app: Celery
) -> None:
    port = int(worker.env["CALLS_WORKER_METRICS_PORT"])
    before = scrape(port)
    organization = db.organization(1)
    person = {"personUuid": str(db.person(organization)), "organizationUuid": str(organization)}
    calls = [client.send("create", person).outcome(TIMEOUT)["call"]["uuid"] for _ in range(3)]
    for call in calls[:2]:
        command = {"callUuid": call, "userUuid": str(uuid4()), "attemptedAt": ISSUED}
        client.send("add_attempt", command).outcome(TIMEOUT)
    client.send("cancel", {"callUuid": str(uuid4())}).outcome(TIMEOUT)  # not_found
    control_app.send_task("calls.cancel", kwargs={"command": {"callUuid": "x"}})  # rejected
    report = control_app.send_task(SWEEP_TASK, queue=SWEEPS_QUEUE).get(timeout=TIMEOUT)
    assert report["expired"] == 2

    def rejected_counted() -> bool:
        key = ("calls_worker_rejected_commands_total", (("stage", "task"),))
        return scrape(port).get(key, 0) - before.get(key, 0) == 1

    wait_until(rejected_counted, TIMEOUT, "the rejection to be counted")
    after = scrape(port)
    assert command_count(after, "create", "ok") - command_count(before, "create", "ok") == 3
    added = command_count(after, "add_attempt", "ok") - command_count(before, "add_attempt", "ok")
    assert added == 2
    assert (
        command_count(after, "cancel", "not_found") - command_count(before, "cancel", "not_found")
        == 1
    )
    # Each command is timed from its producer's sentAt header to its answer; the one sent
    # by a plain Celery app, without the header, is counted untimed.
    def timed(samples: dict, kind: str) -> float:  # type: ignore[type-arg]
        return float(samples.get(("calls_worker_command_latency_seconds_count",
                                  (("kind", kind),)), 0.0))  # fmt: skip

    assert timed(after, "create") - timed(before, "create") == 3
    assert timed(after, "add_attempt") - timed(before, "add_attempt") == 2
    assert timed(after, "cancel") - timed(before, "cancel") == 1
    untimed = ("calls_worker_commands_untimed_total", ())
    assert after[untimed] - before.get(untimed, 0) == 1
    slowest = ("calls_worker_command_latency_seconds_bucket", (("kind", "create"), ("le", "30.0")))
    assert after[slowest] - before.get(slowest, 0) == 3  # each answered within 30 s
    expired = ("calls_worker_sweep_expired_calls_total", ())
    assert after[expired] - before.get(expired, 0) == 2
    sweeps = ("calls_worker_sweep_duration_seconds_count", ())
    assert after[sweeps] - before.get(sweeps, 0) == 1
    # Every command message went through a batch (group commit): seven commands, each
    # counted once in the batches' sizes, in batches that each took some time.
    sizes = ("calls_worker_command_batch_size_sum", (("result", "done"),))
    batches = ("calls_worker_command_batch_duration_seconds_count", (("result", "done"),))
    assert after[sizes] - before.get(sizes, 0) == 7
    assert 1 <= after[batches] - before.get(batches, 0) <= 7
    # Their events: three created, two attempts added, two expired, published by this
    # worker's relay (the only one on this database now).
    published = ("calls_worker_events_published_total", ())
    wait_until(lambda: scrape(port).get(published, 0) - before.get(published, 0) >= 7,
               TIMEOUT, "the relay to count the seven events it published")  # fmt: skip


def test_database_metrics_match_the_database(db: Db, engine: Engine, redis_url: str) -> None:
    organization = db.organization(2)
    person = db.person(organization)
    waiting = db.call(person, organization, attempts=2)  # at its limit since EARLIER
    db.call(person, organization, attempts=1)
    db.call(person, organization, status="completed", attempts=3)
    db.sql(
        "INSERT INTO worker_rejected_commands (task_name, raw_body, reason)"
        " VALUES ('calls.create', '{}', 'test')"
    )
    port = free_ports(1)
    serve_database_metrics(port, engine, redis_url)
    samples = scrape(port)
    assert samples[("calls_worker_requested_calls", ())] == 2
    assert samples[("calls_worker_exhausted_calls", ())] == 1
    assert samples[("calls_worker_rejected_commands_waiting", ())] == 1
    assert 0 < samples[("calls_worker_sweep_lag_seconds", ())] < 60  # due since its attempt
    db.sql(
        "UPDATE worker_due_calls SET due_since = now() - interval '90 seconds'"
        " WHERE call_uuid = :c",
        c=waiting,
    )
    assert 90 <= scrape(port)[("calls_worker_sweep_lag_seconds", ())] < 100
    assert ("calls_worker_queue_messages", (("queue", "calls.commands"),)) in samples
    assert ("calls_worker_last_sweep_timestamp_seconds", ()) not in samples  # none ran yet


def test_the_oldest_queued_command_is_aged_from_its_sent_at(engine: Engine, redis_url: str) -> None:
    import redis

    broker = redis_database(redis_url, 3)  # no worker takes from it
    queue = redis.Redis.from_url(broker)
    queue.flushdb()
    port = free_ports(1)
    serve_database_metrics(port, engine, broker)
    oldest = ("calls_worker_commands_oldest_age_seconds", ())
    assert scrape(port)[oldest] == 0  # nothing queued
    with Celery("old-producer", set_as_current=False, broker=broker) as producer:
        sent = datetime.now(UTC) - timedelta(seconds=120)
        producer.send_task("calls.cancel", kwargs={"command": {}}, queue="calls.commands",
                           headers=sent_at_header(sent))  # fmt: skip
        producer.send_task("calls.cancel", kwargs={"command": {}}, queue="calls.commands",
                           headers=sent_at_header(datetime.now(UTC)))  # fmt: skip
    try:
        assert 120 <= scrape(port)[oldest] < 150  # the head: the first sent, not the last
        queue.rpop("calls.commands")  # a worker took it; the head is a message just sent
        assert scrape(port)[oldest] < 30
        queue.rpop("calls.commands")
        queue.lpush("calls.commands", b'{"headers": {}, "body": ""}')  # a producer without it
        assert oldest not in scrape(port)  # unknown, rather than a made-up age
    finally:
        queue.flushdb()
        queue.close()


@pytest.mark.slow
def test_beat_serves_the_database_metrics(
    db: Db, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    env = worker_env(database_url, redis_url, tmp_path, CALLS_WORKER_SWEEP_INTERVAL_SECONDS="3600")
    beat = Process(["beat"], env, tmp_path / "beat.log")
    try:
        port = int(env["CALLS_WORKER_METRICS_PORT"])

        def served() -> dict | None:  # type: ignore[type-arg]
            try:
                return scrape(port)
            except OSError:
                return None

        samples = wait_until(served, TIMEOUT, "beat's metrics endpoint")
        assert ("calls_worker_requested_calls", ()) in samples
    finally:
        beat.stop()


def test_reconciliation_runs_on_the_sweeps_queue_and_counts_its_repairs(
    db: Db, worker: Process, control_app: Celery
) -> None:
    """Drift made by hand (a due call taken off the record, a call not due put on it): the
    calls.reconcile task that beat schedules repairs both, and the worker counts them."""
    port = int(worker.env["CALLS_WORKER_METRICS_PORT"])
    before = scrape(port)
    organization = db.organization(1)
    person = db.person(organization)
    missing = db.call(person, organization, attempts=1)
    stale = db.call(person, organization)
    db.sql("DELETE FROM worker_due_calls WHERE call_uuid = :c", c=missing)
    db.sql("INSERT INTO worker_due_calls (call_uuid) VALUES (:c)", c=stale)

    report = control_app.send_task(RECONCILE_TASK, queue=SWEEPS_QUEUE).get(timeout=TIMEOUT)

    assert report == {"missing": 1, "stale": 1}
    listed = set(db.sql("SELECT call_uuid FROM worker_due_calls").scalars())
    assert listed == {missing}
    after = scrape(port)
    for kind in ("missing", "stale"):
        key = ("calls_worker_due_record_repairs_total", (("kind", kind),))
        assert after[key] - before.get(key, 0) == 1, kind


def test_the_memory_of_each_redis_is_served_against_its_maximum(
    engine: Engine, redis_url: str
) -> None:
    import redis

    results = redis_database(redis_url, 13)
    port = free_ports(1)
    serve_database_metrics(port, engine, redis_url, results)
    samples = scrape(port)
    info = redis.Redis.from_url(redis_url).info("memory")
    for name in ("broker", "results"):
        assert samples[("calls_worker_redis_used_memory_bytes", (("redis", name),))] > 0
        maximum = samples[("calls_worker_redis_max_memory_bytes", (("redis", name),))]
        assert maximum == info["maxmemory"]


def test_event_metrics_show_the_backlog_and_each_subscribers_queue(
    lone_db: Db, broker_url: str
) -> None:
    """On its own database (no relay of the session's worker publishes its events): the
    unpublished events and the oldest one's age, then the depth of a subscriber's queue
    once a relay round published into it. Redis finds the bound queue itself; RabbitMQ is
    told its name (CALLS_WORKER_EVENTS_WATCH_QUEUES)."""
    from kombu import Connection

    from calls_worker.adapters.db.events import relay_batch
    from calls_worker.adapters.db.unit_of_work import SqlUnitOfWork
    from calls_worker.service.sweep import expire_exhausted_calls
    from calls_worker.wire import close_app, is_amqp
    from calls_worker.worker.relay import Publisher
    from tests.e2e.conftest import control_app_for
    from tests.e2e.test_events import delete_queue, subscriber_queue

    db = lone_db
    organization = db.organization(1)
    for _ in range(3):
        db.call(db.person(organization), organization, attempts=1)
    expire_exhausted_calls(lambda: SqlUnitOfWork(db.engine), datetime.now(UTC), 10)
    db.sql("UPDATE worker_call_events SET recorded_at = now() - interval '2 minutes'")
    queue = f"test.metrics-events-{uuid4().hex[:8]}"
    with Connection(broker_url) as connection:
        subscriber_queue(queue)(connection.default_channel).declare()
    app = control_app_for(broker_url)
    publisher = Publisher(app, "calls.events.call_changed")
    try:
        port = free_ports(1)
        serve_database_metrics(port, db.engine, broker_url,
                               event_queues=[queue] if is_amqp(broker_url) else [])  # fmt: skip
        samples = scrape(port)
        assert samples[("calls_worker_events_unpublished", ())] == 3
        assert 120 <= samples[("calls_worker_events_oldest_unpublished_age_seconds", ())] < 150
        depth = ("calls_worker_event_queue_messages", (("queue", queue),))
        assert samples[depth] == 0
        assert relay_batch(db.engine, 2, publisher.publish) == 2
        wait_until(lambda: scrape(port)[depth] == 2, TIMEOUT, "the queue's depth to show")
        assert scrape(port)[("calls_worker_events_unpublished", ())] == 1
        assert relay_batch(db.engine, 2, publisher.publish) == 1
        assert scrape(port)[("calls_worker_events_oldest_unpublished_age_seconds", ())] == 0
    finally:
        publisher.close()
        close_app(app)
        delete_queue(broker_url, queue)
