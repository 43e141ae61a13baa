"""What operators use: the status command and Flower."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from celery import Celery

from calls_worker.client import CallsClient
from tests.db_world import Db
from tests.e2e.conftest import (
    Process,
    control_app_for,
    free_ports,
    redis_database,
    wait_for_worker,
    wait_until,
    worker_env,
)

# Each test on the session's worker runs on Redis and on RabbitMQ (tests/e2e/conftest.py).
pytestmark = pytest.mark.brokers("redis", "rabbitmq")

TIMEOUT = 30


def calls_worker(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "calls_worker", *args],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_status_reports_what_the_database_holds(
    db: Db, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    organization = db.organization(1)
    person = db.person(organization)
    db.call(person, organization, attempts=1)
    db.call(person, organization)
    db.sql(
        "INSERT INTO worker_rejected_commands (task_name, raw_body, reason)"
        " VALUES ('calls.create', '{}', 'test')"
    )
    run = calls_worker(worker_env(database_url, redis_url, tmp_path), "status", "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["database"]["ok"] is True
    assert report["broker"]["ok"] is True
    assert report["calls"]["requested"] == 2
    assert report["calls"]["atLimitNotExpired"] == 1
    assert report["rejectedCommandsWaiting"] == 1
    assert set(report["queues"]) == {"calls.commands", "calls.sweeps"}
    text = calls_worker(worker_env(database_url, redis_url, tmp_path), "status").stdout
    assert "at their limit, not yet expired: 1" in text


def test_status_says_which_server_does_not_answer(tmp_path: Path) -> None:
    env = worker_env("postgresql://postgres@127.0.0.1:1/x", "redis://127.0.0.1:1/0", tmp_path)
    run = calls_worker(env, "status")
    assert run.returncode == 1
    assert run.stdout.count("NOT ANSWERING") == 2


def get(url: str, auth: str | None = None) -> Any:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read()) if "json" in response.headers["Content-Type"] else None


def get_text(url: str) -> str:
    """The body of an unauthenticated GET."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text: str = response.read().decode()
        return text


@pytest.mark.parametrize(
    ("auth", "says"),
    [
        (None, "Flower needs authentication"),
        ("ops:", "Flower needs authentication"),
        (":s3cret", "Flower needs authentication"),
        ("ops:s3c,ret", "must not contain a comma"),
        ("ops:a,other:b", "must not contain a comma"),
    ],
)
def test_flower_refuses_to_start_without_one_whole_login(
    database_url: str, redis_url: str, tmp_path: Path, auth: str | None, says: str
) -> None:
    extra = {} if auth is None else {"CALLS_WORKER_FLOWER_BASIC_AUTH": auth}
    run = calls_worker(worker_env(database_url, redis_url, tmp_path, **extra), "flower")
    assert run.returncode != 0
    assert says in run.stderr


@pytest.mark.slow
def test_flower_lists_the_calls_tasks_that_ran(
    db: Db, worker: Process, client: CallsClient, database_url: str, broker_url: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    port, auth = free_ports(1), "ops:s3cret-test"
    env = worker_env(database_url, broker_url, tmp_path, CALLS_WORKER_FLOWER_BASIC_AUTH=auth)
    flower = Process(["flower", "--port", str(port)], env, tmp_path / "flower.log")
    try:

        def answers() -> bool:
            try:
                get(f"http://127.0.0.1:{port}/healthcheck")
            except OSError:
                return False
            return True

        wait_until(answers, TIMEOUT, "Flower to answer")
        wait_until(
            lambda: get(f"http://127.0.0.1:{port}/api/workers?refresh=1", auth),
            TIMEOUT,
            "Flower to see the worker",
        )
        organization = db.organization(3)
        person = {"personUuid": str(db.person(organization)), "organizationUuid": str(organization)}
        handle = client.send("create", person)
        assert handle.outcome(TIMEOUT)["ok"] is True

        def task_seen() -> dict[str, Any] | None:
            tasks = get(f"http://127.0.0.1:{port}/api/tasks", auth)
            task: dict[str, Any] | None = tasks.get(handle.command_id)
            return task if task and task["state"] == "SUCCESS" else None

        task = wait_until(task_seen, TIMEOUT, "Flower to list the task")
        assert task["name"] == "calls.create"
        assert task["state"] == "SUCCESS"
        with pytest.raises(urllib.error.HTTPError) as refused:
            get(f"http://127.0.0.1:{port}/api/tasks")
        refused.value.close()
        assert refused.value.code == 401
        # Open by Flower's design, as the README says: the probe, and Prometheus's scrape.
        assert get_text(f"http://127.0.0.1:{port}/healthcheck") == "OK"
        assert "flower_events_total" in get_text(f"http://127.0.0.1:{port}/metrics")
        assert auth.split(":")[1] not in flower.output()
    finally:
        flower.stop()


def test_secrets_never_reach_the_logs(
    db: Db, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """The database password (trust auth lets any through) and the broker's are not logged,
    not even when a command fails or is rejected."""
    from sqlalchemy import make_url

    secret = "s3cret-db-pa55"
    with_password = (
        make_url(database_url).set(password=secret).render_as_string(hide_password=False)
    )
    broker_secret = "s3cret-redis-pa55"
    broker = redis_database(redis_url, 10)  # its messages reach this worker only
    own_control = control_app_for(broker)
    env = worker_env(with_password, broker, tmp_path,
                     CALLS_WORKER_FLOWER_BASIC_AUTH=f"ops:{secret}-flower")  # fmt: skip
    worker = Process(["worker", "-c", "1", "-n", "secrets@%h", "-Q", "calls.commands",
                      "--log-format", "json"], env, tmp_path / "secrets.log")  # fmt: skip
    try:
        wait_for_worker(own_control, "secrets", worker)
        own_control.send_task("calls.create", kwargs={"command": {"personUuid": "x"}})
        wait_until(lambda: "rejected as" in worker.output(), 30, "the rejection")
        status = calls_worker({**env, "CALLS_WORKER_BROKER_URL":
                               broker.replace("redis://", f"redis://:{broker_secret}@")},
                              "status")  # fmt: skip
    finally:
        worker.stop()
        own_control.close()
    for text in (worker.output(), status.stdout, status.stderr):
        assert secret not in text
        assert broker_secret not in text


def test_an_operator_lists_and_replays_a_rejected_command(
    db: Db, worker: Process, control_app: Celery, database_url: str, broker_url: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    organization = db.organization(3)
    person = {"personUuid": str(db.person(organization)), "organizationUuid": str(organization)}
    control_app.send_task("calls.create", kwargs={"command": {**person, "status": "completed"}})
    env = worker_env(database_url, broker_url, tmp_path)

    def waiting() -> list[Any]:
        listed: list[Any] = json.loads(calls_worker(env, "dead-letters", "list").stdout)
        return listed

    (rejected,) = wait_until(waiting, TIMEOUT, "the rejected command")
    assert rejected["details"] == [{"field": "status", "reason": rejected["details"][0]["reason"]}]
    corrected = tmp_path / "corrected.json"
    corrected.write_text(json.dumps(person))
    replays = [calls_worker(env, "dead-letters", "replay", str(rejected["id"]), str(corrected))
               for _ in range(2)]  # fmt: skip
    outcomes = [json.loads(r.stdout) for r in replays]
    assert outcomes[0]["ok"] is True, (replays[0].stdout, replays[0].stderr)
    assert outcomes[1] == outcomes[0]  # the same replay twice: one call
    assert db.sql("SELECT count(*) FROM calls").scalar() == 1
    assert waiting() == []  # replayed: no longer waiting
    everything = json.loads(calls_worker(env, "dead-letters", "list", "--all").stdout)
    assert everything[0]["replayedAt"] is not None
    assert set(everything[0]) == {"id", "receivedAt", "taskName", "commandId", "rawBody",
                                  "reason", "details", "replayedAt", "dismissedAt",
                                  "replayedAs"}  # fmt: skip
    # Refused as invalid, nothing recorded under its own id: replayed under it.
    assert everything[0]["replayedAs"] == everything[0]["commandId"]
    assert replays[0].returncode == 0
    assert replays[1].returncode == 1  # applied already: shown, not sent again


def test_a_replay_never_applies_a_command_that_was_applied(
    db: Db, worker: Process, client: CallsClient, database_url: str, broker_url: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    """The commit reached the database and only its answer was lost; the command was then
    given up and kept. Replaying it must not add a second attempt."""
    organization = db.organization(5)
    person = db.person(organization)
    call = db.call(person, organization)
    command = {
        "callUuid": str(call),
        "userUuid": str(person),
        "attemptedAt": "2026-03-01T09:00:00Z",
    }
    sent = client.send("add_attempt", command)
    first = sent.outcome(TIMEOUT)
    assert first["ok"] is True
    body = json.dumps([[], {"command": sent.command}, {}])
    rejected = db.sql("INSERT INTO worker_rejected_commands (task_name, command_id, raw_body,"
                      " reason) VALUES ('calls.add_attempt', :c, :b, 'failed after 8 retries')"
                      " RETURNING id", c=sent.command_id, b=body).scalar()  # fmt: skip
    replay = calls_worker(worker_env(database_url, broker_url, tmp_path),
                          "dead-letters", "replay", str(rejected))  # fmt: skip
    assert replay.returncode == 1, replay.stderr
    assert f"command {sent.command_id} was applied" in replay.stderr
    assert json.loads(replay.stdout) == first
    assert db.attempt_rows(call) == 1


def given_up(db: Db, control_app: Celery, task: str, command: dict[str, Any],
             command_id: str, reason: str = "failed after 8 retries",
             in_backend: bool = True) -> int:  # fmt: skip
    """What the worker leaves of a command it gave up on: kept among the rejected commands,
    no outcome in the database, and (``in_backend``) the failure in the result backend."""
    rejected: int = db.sql(
        "INSERT INTO worker_rejected_commands (task_name, command_id, raw_body, reason)"
        " VALUES (:t, :c, :b, :r) RETURNING id", t=task, c=command_id,
        b=json.dumps([[], {"command": command}, {}]), r=reason).scalar()  # fmt: skip
    if in_backend:
        with warnings.catch_warnings():  # Celery's Redis backend calls redis-py's old setex
            warnings.simplefilter("ignore", DeprecationWarning)
            control_app.backend.mark_as_failure(command_id, RuntimeError(reason))
    return rejected


@pytest.mark.parametrize("first", ["replay", "resend"])
def test_a_replay_and_a_resend_of_a_given_up_command_apply_it_once(
    first: str, db: Db, worker: Process, client: CallsClient, control_app: Celery,
    database_url: str, broker_url: str, tmp_path: Path,
) -> None:  # fmt: skip
    """The worker gave up on an attempt; an operator replays it and its producer sends it
    again under its id (as the wire format says to after a wait), in either order: one
    attempt, and whichever comes second gets the first's outcome."""
    organization = db.organization(5)
    person = db.person(organization)
    call = db.call(person, organization)
    command = {"callUuid": str(call), "userUuid": str(person),
               "attemptedAt": "2026-03-01T09:00:00Z"}  # fmt: skip
    command_id = f"order-7-attempt-{uuid4()}"
    # The client reads a failure the backend holds as the worker's word, checked against the
    # database: the replay drops it (it sends under the same id); a producer's resend does not.
    rejected = given_up(db, control_app, "calls.add_attempt", command, command_id,
                        in_backend=first == "replay")  # fmt: skip
    env = worker_env(database_url, broker_url, tmp_path)

    def replay() -> subprocess.CompletedProcess[str]:
        return calls_worker(env, "dead-letters", "replay", str(rejected))

    if first == "replay":
        replayed = replay()
        assert replayed.returncode == 0, replayed.stderr
        outcome = json.loads(replayed.stdout)
        assert outcome["ok"] is True
        assert client.send("add_attempt", command, command_id=command_id).outcome(
            TIMEOUT) == outcome  # fmt: skip
    else:
        outcome = client.send("add_attempt", command, command_id=command_id).outcome(TIMEOUT)
        assert outcome["ok"] is True
        replayed = replay()
        assert replayed.returncode == 1, replayed.stderr
        assert f"command {command_id} was applied" in replayed.stderr
        assert json.loads(replayed.stdout) == outcome
    assert db.attempt_rows(call) == 1
    assert outcome["call"]["attemptCount"] == 1
    (kept,) = json.loads(calls_worker(env, "dead-letters", "list", "--all").stdout)
    if first == "replay":
        assert kept["replayedAs"] == command_id  # under its own id
    assert json.loads(calls_worker(env, "dead-letters", "list").stdout) == (
        [] if first == "replay" else [kept])


def test_an_operator_replays_and_dismisses_by_selection(
    db: Db, worker: Process, client: CallsClient, control_app: Celery,
    database_url: str, broker_url: str, tmp_path: Path,
) -> None:  # fmt: skip
    """Three given up during an outage and one refused for another reason: the three are
    replayed at once (--reason), the other dismissed (--all); none waits after, the gauge's
    figure says 0, and a resend of the dismissed command's id is applied as new."""
    from calls_worker.adapters.db.journal import operational_figures

    organization = db.organization(5)
    calls = [db.call(db.person(organization), organization) for _ in range(4)]
    commands = [{"callUuid": str(call), "userUuid": str(uuid4()),
                 "attemptedAt": "2026-03-01T09:00:00Z"} for call in calls]  # fmt: skip
    ids = [f"bulk-{n}-{uuid4()}" for n in range(4)]
    for n in range(3):
        given_up(db, control_app, "calls.add_attempt", commands[n], ids[n],
                 reason="database away: failed after 8 retries")  # fmt: skip
    other = given_up(db, control_app, "calls.add_attempt", commands[3], ids[3],
                     reason="the soft time limit", in_backend=False)  # fmt: skip
    env = worker_env(database_url, broker_url, tmp_path)
    assert operational_figures(db.engine).rejected_waiting == 4

    replayed = calls_worker(env, "dead-letters", "replay", "--reason", "DATABASE AWAY")
    assert replayed.returncode == 0, replayed.stderr
    lines = json.loads(replayed.stdout)
    assert sorted(line["commandId"] for line in lines) == sorted(ids[:3])
    assert all(line["outcome"]["ok"] for line in lines)
    assert [db.attempt_rows(call) for call in calls] == [1, 1, 1, 0]

    dismissed = calls_worker(env, "dead-letters", "dismiss", "--all")
    assert json.loads(dismissed.stdout) == {"dismissed": [other]}, dismissed.stderr
    assert json.loads(calls_worker(env, "dead-letters", "list").stdout) == []
    assert operational_figures(db.engine).rejected_waiting == 0
    again = calls_worker(env, "dead-letters", "dismiss", str(other))  # settled already
    assert json.loads(again.stdout) == {"dismissed": []}
    # Dismissed: nothing recorded under its id; its producer's resend is applied as new.
    resent = client.send("add_attempt", commands[3], command_id=ids[3]).outcome(TIMEOUT)
    assert resent["ok"] is True
    assert db.attempt_rows(calls[3]) == 1
    usage = calls_worker(env, "dead-letters", "replay", "1", "--all")
    assert usage.returncode == 2
    assert "give REJECTED_ID, or choose" in usage.stderr
