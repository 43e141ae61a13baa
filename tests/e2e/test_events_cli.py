"""`calls-worker events tail`, as an operator runs it: the latest events, one line each or
as JSON, for one call, and new ones as they come with --follow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from uuid import uuid4

from calls_worker.adapters.db.unit_of_work import SqlUnitOfWork
from calls_worker.service.sweep import expire_exhausted_calls
from tests.db_world import Db
from tests.e2e.test_directory import cli


def test_tail_prints_the_latest_events_and_follows(lone_db: Db) -> None:
    db = lone_db
    url = db.engine.url.render_as_string(hide_password=False)
    organization = db.organization(1)
    person = db.person(organization)
    first = db.send("create", {"personUuid": str(person), "organizationUuid": str(organization)})
    call = first["call"]["uuid"]
    db.send("add_attempt", {"callUuid": call, "userUuid": str(uuid4()),
                            "attemptedAt": "2026-03-01T09:00:00Z"})  # fmt: skip
    other = db.send("create", {"personUuid": str(person), "organizationUuid": str(organization)})

    shown = cli(url, "events", "tail")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert [line.split()[2] for line in lines] == [
        "call.created", "call.attempt_added", "call.created"]  # fmt: skip
    assert all(line.endswith("[pending]") for line in lines)
    assert "status=requested attempts=1" in lines[1]

    only = cli(url, "events", "tail", "--call", call, "--json", "-n", "1")
    (event,) = [json.loads(line) for line in only.stdout.splitlines()]
    assert event["kind"] == "call.attempt_added"
    assert event["call"]["attemptCount"] == 1

    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLS_WORKER_")}
    follower = subprocess.Popen(
        [sys.executable, "-m", "calls_worker", "events", "tail", "--follow", "--json",
         "--interval", "0.2", "--call", call],
        env={**env, "CALLS_WORKER_DATABASE_URL": url}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    with follower:
        time.sleep(2)  # it printed what there was, and waits
        expire_exhausted_calls(lambda: SqlUnitOfWork(db.engine), datetime.now(UTC), 10)
        db.send("cancel", {"callUuid": other["call"]["uuid"]})  # another call: not shown
        assert follower.stdout is not None
        seen = [json.loads(follower.stdout.readline()) for _ in range(3)]
        follower.terminate()
    assert [e["kind"] for e in seen] == ["call.created", "call.attempt_added", "call.expired"]
    assert seen[2]["expiry"]["by"] == "sweep"


def test_follow_prints_only_events_newer_than_those_shown(lone_db: Db) -> None:
    db = lone_db
    url = db.engine.url.render_as_string(hide_password=False)
    organization = db.organization(5)
    person = db.person(organization)
    calls = [db.send("create", {"personUuid": str(person), "organizationUuid": str(organization)})
             ["call"]["uuid"] for _ in range(4)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLS_WORKER_")}
    follower = subprocess.Popen(
        [sys.executable, "-m", "calls_worker", "events", "tail", "--follow", "--json",
         "--interval", "0.2", "-n", "2"],
        env={**env, "CALLS_WORKER_DATABASE_URL": url}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    with follower:
        assert follower.stdout is not None
        first = [json.loads(follower.stdout.readline()) for _ in range(2)]
        time.sleep(1)  # a few rounds of following, with nothing new
        db.send("cancel", {"callUuid": calls[0]})
        new = json.loads(follower.stdout.readline())
        time.sleep(1)
        follower.terminate()
        rest = follower.stdout.read()
    assert [e["callUuid"] for e in first] == calls[2:]
    assert (new["kind"], new["callUuid"]) == ("call.cancelled", calls[0])
    assert rest == ""  # the two events before those shown were never printed as new
