"""Call events from the outbox to subscribers, through real workers and a real broker.

- A subscriber written as docs/examples/events_subscriber.py (a plain Celery worker) gets
  the events of a call from its creation to its expiry by the sweep, in order.
- With no subscriber bound, nothing accumulates in the broker.
- Relays killed at random between publishing and marking, two at a time, over a stream of
  commands and sweeps: every event reaches the subscriber's queue at least once, none that
  the database does not hold, a call's events in order once repeats are dropped, and no
  more repeats than the kills explain.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
import redis
from celery import Celery
from kombu import Connection, Exchange, Queue
from sqlalchemy import text

from calls_worker.adapters.db.engine import build_engine
from calls_worker.adapters.db.events import backlog, kept_events
from calls_worker.adapters.db.unit_of_work import SqlUnitOfWork
from calls_worker.client import CallsClient
from calls_worker.service.sweep import expire_exhausted_calls
from calls_worker.wire import EVENTS_EXCHANGE, SWEEP_TASK, SWEEPS_QUEUE, is_amqp
from tests.db_world import Db
from tests.e2e.conftest import Process, wait_for_worker, wait_until, worker_env
from tests.reliability import Reliability

pytestmark = pytest.mark.brokers("redis", "rabbitmq")

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60
EXCHANGE = Exchange(EVENTS_EXCHANGE, type="topic", durable=True)


def subscriber_queue(name: str) -> Queue:
    return Queue(name, EXCHANGE, routing_key="call.#", durable=True)


def delete_queue(broker_url: str, name: str) -> None:
    """Delete the queue and its binding (kombu's Redis transport forgets a binding only when
    the connection deleting the queue declared it)."""
    with Connection(broker_url) as connection:
        queue = subscriber_queue(name)(connection.default_channel)
        queue.declare()
        queue.delete()


@pytest.fixture
def subscriber(
    broker_url: str, control_app: Celery, tmp_path: Path
) -> Iterator[sqlite3.Connection]:
    """docs/examples/events_subscriber.py run as its docstring says; its database."""
    queue = f"test.crm-events-{uuid.uuid4().hex[:8]}"
    database = tmp_path / "subscriber.sqlite3"
    name = f"crm-{uuid.uuid4().hex[:6]}"
    process = Process(
        ["-A", "docs.examples.events_subscriber", "worker", "--pool", "solo", "-n",
         f"{name}@%h", "--loglevel", "INFO"],
        {**worker_env("", broker_url, tmp_path), "SUBSCRIBER_BROKER_URL": broker_url,
         "SUBSCRIBER_QUEUE": queue, "SUBSCRIBER_DATABASE": str(database),
         "PYTHONPATH": str(ROOT)},
        tmp_path / "subscriber.log",
        program=[sys.executable, "-m", "celery"],
    )  # fmt: skip
    try:
        wait_for_worker(control_app, name, process)
        yield sqlite3.connect(database)
    finally:
        process.stop()
        delete_queue(broker_url, queue)


def test_a_subscriber_receives_a_calls_events_to_its_expiry(
    db: Db, worker: Process, client: CallsClient, control_app: Celery,
    subscriber: sqlite3.Connection,
) -> None:  # fmt: skip
    organization = db.organization(2)
    person = db.person(organization)
    new = {"personUuid": str(person), "organizationUuid": str(organization)}
    created = client.send("create", new).outcome(TIMEOUT)
    call = created["call"]["uuid"]
    outcomes = [created]
    for _ in range(2):
        attempt = {"callUuid": call, "userUuid": str(uuid4()),
                   "attemptedAt": datetime.now(UTC).isoformat()}  # fmt: skip
        outcomes.append(client.send("add_attempt", attempt).outcome(TIMEOUT))
    control_app.send_task(SWEEP_TASK, queue=SWEEPS_QUEUE)

    def received() -> list[tuple[str, int, str]]:
        rows = subscriber.execute(
            "SELECT kind, sequence, body FROM events WHERE call_uuid = ? ORDER BY sequence",
            (call,),
        ).fetchall()
        return rows if len(rows) == 4 else []

    import json

    events = wait_until(received, TIMEOUT, "the subscriber to receive the call's four events")
    kinds = [kind for kind, _, _ in events]
    assert kinds == ["call.created", "call.attempt_added", "call.attempt_added", "call.expired"]
    bodies = [json.loads(body) for _, _, body in events]
    assert [b["call"] for b in bodies[:3]] == [o["call"] for o in outcomes]
    assert bodies[3]["expiry"] == {"by": "sweep", "attemptCount": 2, "maxCallAttempts": 2}
    assert bodies[3]["call"]["status"] == "expired"
    # Arrived in the order they happened (the queue's order, one message at a time).
    order = [row[0] for row in subscriber.execute(
        "SELECT e.sequence FROM deliveries d JOIN events e USING (event_id)"
        " WHERE e.call_uuid = ? ORDER BY d.n", (call,))]  # fmt: skip
    assert order == sorted(order)
    assert subscriber.execute("SELECT status FROM calls WHERE call_uuid = ?",
                              (call,)).fetchone() == ("expired",)  # fmt: skip


@pytest.mark.brokers("redis")
def test_with_no_subscriber_bound_nothing_accumulates(
    db: Db, worker: Process, client: CallsClient, broker_url: str
) -> None:
    """The events are published (marked), and the broker keeps none of them."""
    broker = redis.Redis.from_url(broker_url)
    organization = db.organization(3)
    person = db.person(organization)
    for _ in range(5):
        client.send("create", {"personUuid": str(person),
                               "organizationUuid": str(organization)}).outcome(TIMEOUT)  # fmt: skip
    wait_until(lambda: len(db.events()) == 5 and backlog(db.engine).unpublished == 0, TIMEOUT,
               "the relay to publish the five events")  # fmt: skip
    ids = [event["eventId"].encode() for event in db.events()]
    for key in broker.keys("*"):
        if broker.type(key) == b"list":
            held = broker.lrange(key, 0, -1)
            assert not [i for i in ids for message in held if i in message], key
    assert not broker.exists("ae.undeliver")


# The soak of the relay: CI runs ROUNDS rounds of a stream of STREAM_CALLS calls each, the
# relays publishing the round's number of lanes (LANES).
ROUNDS = 2
LANES = (1, 3)
STREAM_CALLS = 30
DIE_CHANCE = "0.3"
RELAY_BATCH = 4


def drain(broker_url: str, queue: str) -> list[dict[str, Any]]:
    """Every event waiting in ``queue``, in its order (taken off it)."""
    events = []
    with Connection(broker_url) as connection:
        bound = subscriber_queue(queue)(connection.default_channel)
        while (message := bound.get(no_ack=True)) is not None:
            _args, kwargs, _embed = message.decode()
            assert message.headers["task"] == "calls.events.call_changed"
            assert message.headers["id"] == kwargs["event"]["eventId"]
            events.append(kwargs["event"])
    return events


def stream(engine: Any, calls: int, seed: int) -> list[UUID]:
    """Commands and sweeps, as a producer's stream would bring them: calls created,
    attempted, some ended by a command, the rest expired by the sweep."""
    rng = random.Random(seed)
    db = Db(engine)
    organization = db.organization(2)
    made: list[UUID] = []

    send = db.send
    for n in range(calls):
        person = db.person(organization)
        call = send("create", {"personUuid": str(person),
                               "organizationUuid": str(organization)})["call"]["uuid"]  # fmt: skip
        made.append(UUID(call))
        for _ in range(rng.randint(1, 2)):
            send("add_attempt", {"callUuid": call, "userUuid": str(uuid4()),
                                 "attemptedAt": datetime.now(UTC).isoformat()})  # fmt: skip
        ending = rng.choice(["complete", "cancel", "none", "none"])
        if ending == "complete":
            send("complete", {"callUuid": call, "userUuid": str(uuid4()), "result": "ok"})
        elif ending == "cancel":
            send("cancel", {"callUuid": call})
        if n % 7 == 0:
            expire_exhausted_calls(lambda: SqlUnitOfWork(engine), datetime.now(UTC), 5)
        time.sleep(rng.random() * 0.05)
    expire_exhausted_calls(lambda: SqlUnitOfWork(engine), datetime.now(UTC), 5)
    return made


def relay_worker(database_url: str, broker_url: str, tmp: Path, name: str,
                 lanes: int = 1) -> Process:  # fmt: skip
    """A worker whose relay dies at random (tests.e2e.faults), on a queue nothing sends to."""
    return Process(
        ["worker", "-c", "1", "-n", f"{name}@%h", "-Q", f"test.idle-{name}",
         "--include", "tests.e2e.faults"],
        worker_env(database_url, broker_url, tmp, CALLS_WORKER_TEST_RELAY_DIE=DIE_CHANCE,
                   CALLS_WORKER_EVENTS_RELAY_BATCH_SIZE=str(RELAY_BATCH),
                   CALLS_WORKER_EVENTS_RELAY_INTERVAL_MS="20",
                   CALLS_WORKER_EVENTS_RELAY_LANES=str(lanes),
                   CALLS_WORKER_TEST_RELAY_WINDOW_SECONDS="0.1"),
        tmp / f"{name}.log",
    )  # fmt: skip


@pytest.mark.scenario("relay-kill")
@pytest.mark.slow
def test_relays_killed_between_publishing_and_marking_never_skip_nor_reorder(
    lone_db: Db, broker_url: str, tmp_path: Path, reliability: Reliability
) -> None:
    database_url = lone_db.engine.url.render_as_string(hide_password=False)
    engine = build_engine(database_url, pool_size=4)
    for round_ in range(ROUNDS):
        queue = f"test.relay-soak-{uuid.uuid4().hex[:8]}"
        with Connection(broker_url) as connection:
            subscriber_queue(queue)(connection.default_channel).declare()
        lives: list[Process] = []
        workers: dict[str, Process] = {}
        made: list[UUID] = []
        kills = 0
        try:
            producer = threading.Thread(
                target=lambda into, seed: into.extend(stream(engine, STREAM_CALLS, seed)),
                args=(made, round_))
            producer.start()
            deadline = time.monotonic() + 240
            while producer.is_alive() or backlog(engine).unpublished:
                assert time.monotonic() < deadline, "the relays did not publish everything"
                for n in ("a", "b"):  # two relays at once, restarted whenever one dies
                    current = workers.get(n)
                    if current is not None and current.popen.poll() is not None:
                        kills += current.popen.returncode == -signal.SIGKILL
                        current = None
                    if current is None:
                        workers[n] = relay_worker(database_url, broker_url, tmp_path,
                                                  f"relay-{n}{len(lives)}",
                                                  LANES[round_])  # fmt: skip
                        lives.append(workers[n])
                time.sleep(0.1)
            producer.join()
            # One that died after the last look, its batch published again by the other.
            kills += sum(w.popen.poll() == -signal.SIGKILL for w in workers.values())
        finally:
            for process in lives:
                process.stop(signal.SIGKILL)
            if is_amqp(broker_url):
                for process in lives:
                    delete_queue(broker_url, f"test.idle-{process.log.stem}")
        received = drain(broker_url, queue)
        delete_queue(broker_url, queue)
        kept = kept_events(engine)
        ours = {str(call) for call in made}
        mine = [e for e in received if e["callUuid"] in ours]
        kept_ids = {e["eventId"] for e in kept}
        received_ids = {e["eventId"] for e in mine}
        lost = len(kept_ids - received_ids)
        invented = len(received_ids - kept_ids)
        repeats = len(mine) - len(received_ids)
        # Each death republishes at most the one batch it had published.
        doubled = max(0, repeats - kills * RELAY_BATCH)
        out_of_order = 0
        seen: set[str] = set()
        last: dict[str, int] = {}
        for event in mine:
            if event["eventId"] in seen:
                continue
            seen.add(event["eventId"])
            if event["sequence"] < last.get(event["callUuid"], -1):
                out_of_order += 1
            last[event["callUuid"]] = event["sequence"]
        reliability.record("relay-kill", commands=len(kept), lost=lost + invented,
                           doubled=doubled + out_of_order)  # fmt: skip
        assert (lost, invented, doubled, out_of_order) == (0, 0, 0, 0)
        assert kills >= 2, "the relays were not killed: the fault did not fire"
        assert repeats > 0, "no event was published twice: no kill fell in the window"
        for event in kept:
            assert event == next(e for e in mine if e["eventId"] == event["eventId"])
        with lone_db.engine.begin() as connection:
            connection.execute(text("TRUNCATE worker_call_events"))
    engine.dispose()


@pytest.mark.brokers("redis")
def test_events_off_writes_and_publishes_nothing(
    lone_db: Db, redis_url: str, tmp_path: Path
) -> None:
    """A worker with CALLS_WORKER_EVENTS=off applies commands and writes no event; and no
    relay of its publishes the events others wrote (it runs none)."""
    from tests.e2e.conftest import own_worker, redis_database

    broker = redis_database(redis_url, 6)
    redis.Redis.from_url(broker).flushdb()
    db = lone_db
    organization = db.organization(3)
    person = db.person(organization)
    written_before = db.send("create", {"personUuid": str(person),
                                        "organizationUuid": str(organization)})  # fmt: skip
    assert len(db.events()) == 1  # written by the handler here, events on
    database_url = db.engine.url.render_as_string(hide_password=False)
    worker = own_worker(database_url, broker, tmp_path, "eventsoff", CALLS_WORKER_EVENTS="off")
    try:
        with CallsClient(broker) as client:
            created = client.send("create", {"personUuid": str(person),
                                             "organizationUuid": str(organization)})  # fmt: skip
            call = created.outcome(TIMEOUT)["call"]["uuid"]
            attempt = {"callUuid": call, "userUuid": str(uuid4()),
                       "attemptedAt": datetime.now(UTC).isoformat()}  # fmt: skip
            assert client.send("add_attempt", attempt).outcome(TIMEOUT)["ok"]
        time.sleep(1)  # five of its relay's rounds, had it one
    finally:
        worker.stop()
    assert [e["callUuid"] for e in db.events()] == [written_before["call"]["uuid"]]
    assert backlog(db.engine).unpublished == 1
    assert "calls_worker.relay" not in worker.output()


@pytest.mark.brokers("rabbitmq")
def test_a_round_rabbitmq_refuses_is_not_marked(lone_db: Db, broker_url: str) -> None:
    """A subscriber queue full with reject-publish nacks the round's messages: the round
    raises, nothing is marked published, and the next round publishes them all again."""
    from amqp.exceptions import MessageNacked

    from calls_worker.adapters.db.events import relay_batch
    from calls_worker.wire import close_app
    from calls_worker.worker.relay import Publisher
    from tests.e2e.conftest import control_app_for

    db = lone_db
    organization = db.organization(1)
    for _ in range(5):
        db.call(db.person(organization), organization, attempts=1)
    expire_exhausted_calls(lambda: SqlUnitOfWork(db.engine), datetime.now(UTC), 10)
    name = f"test.full-{uuid.uuid4().hex[:8]}"
    full = Queue(name, EXCHANGE, routing_key="call.#", durable=True,
                 queue_arguments={"x-max-length": 2, "x-overflow": "reject-publish"})  # fmt: skip
    app = control_app_for(broker_url)
    publisher = Publisher(app, "calls.events.call_changed")
    try:
        with Connection(broker_url) as connection:
            full(connection.default_channel).declare()
        with pytest.raises(MessageNacked):
            relay_batch(db.engine, 10, publisher.publish)
        assert backlog(db.engine).unpublished == 5
        publisher.close()
        with Connection(broker_url) as connection:
            held = full(connection.default_channel)
            assert held.purge() == 2  # what fitted before it was full
            held.delete()
        assert relay_batch(db.engine, 10, publisher.publish) == 5  # nothing bound: accepted
        assert backlog(db.engine).unpublished == 0
    finally:
        publisher.close()
        close_app(app)
        with Connection(broker_url) as connection:
            full(connection.default_channel).delete()
