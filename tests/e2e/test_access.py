"""Service accounts through a real worker: every outcome of the access rules, checked when
a command is applied; listings; and a claim backed by the certificate that signed it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
import redis
from celery import Celery

from calls_worker.adapters.db.directory import add_service_account, disable_service_account
from calls_worker.client import CallsClient, ListingRefused
from calls_worker.wire import Signing, celery_config, enable_signing
from calls_worker.worker.signer import certificate_sha256
from tests.db_world import ISSUED, Db
from tests.e2e.conftest import Process, redis_database, wait_for_worker, worker_env
from tests.e2e.test_signing import key_and_certificate

ALL = ["calls:create", "calls:attempt", "calls:complete", "calls:cancel", "calls:expire",
       "calls:read"]  # fmt: skip


@pytest.fixture
def strict_broker(redis_url: str) -> str:
    broker = redis_database(redis_url, 14)
    redis.Redis.from_url(broker).flushdb()
    return broker


def _start(database_url: str, broker: str, tmp_path: Path, name: str, **extra: str) -> Process:
    env = worker_env(database_url, broker, tmp_path, **extra)
    return Process(["worker", "-c", "1", "-n", f"{name}@%h", "-Q", "calls.commands"], env,
                   tmp_path / f"{name}.log")  # fmt: skip


@pytest.fixture
def control(strict_broker: str) -> Iterator[Celery]:
    app = Celery("access-control", set_as_current=False)
    app.conf.update(celery_config(strict_broker, strict_broker))
    yield app
    app.close()


@pytest.mark.slow
def test_every_access_outcome_through_a_worker_that_requires_accounts(
    db: Db, database_url: str, strict_broker: str, control: Celery, tmp_path: Path
) -> None:
    mine, theirs = db.organization(3), db.organization(3)
    my_person, their_person = db.person(mine), db.person(theirs)
    account = add_service_account(db.engine, "crm", mine, ALL)
    no_cancel = add_service_account(db.engine, "no-cancel", mine,
                                    [s for s in ALL if s != "calls:cancel"])  # fmt: skip
    soon_disabled = add_service_account(db.engine, "leaver", mine, ALL)
    reached = db.call(their_person, mine)
    hidden = db.call(their_person, theirs)
    create = {"personUuid": str(my_person), "organizationUuid": str(mine)}
    with CallsClient(strict_broker) as client:
        # Queued while no worker runs, by an account that is disabled before it is applied.
        queued = client.send("create", {**create, "serviceAccountUuid": str(soon_disabled)})
        disable_service_account(db.engine, soon_disabled)
        worker = _start(database_url, strict_broker, tmp_path, "strict",
                        CALLS_WORKER_REQUIRE_SERVICE_ACCOUNT="true")  # fmt: skip
        try:
            wait_for_worker(control, "strict", worker)
            outcomes = {
                "disabled in between": queued.outcome(30),
                "no account": client.send("create", create).outcome(30),
                "unknown": client.send("create", {**create, "serviceAccountUuid": str(uuid4())})
                .outcome(30),
                "created": client.send("create", {**create, "serviceAccountUuid": str(account)})
                .outcome(30),
                "person out of reach": client.send("create", {
                    "personUuid": str(their_person), "organizationUuid": str(mine),
                    "serviceAccountUuid": str(account)}).outcome(30),
                "no scope": client.send("cancel", {"callUuid": str(reached),
                                                   "serviceAccountUuid": str(no_cancel)})
                .outcome(30),
                "call out of reach": client.send("cancel", {
                    "callUuid": str(hidden), "serviceAccountUuid": str(account)}).outcome(30),
                "attempt in reach": client.send("add_attempt", {
                    "callUuid": str(reached), "userUuid": str(uuid4()), "attemptedAt": ISSUED,
                    "serviceAccountUuid": str(account)}).outcome(30),
            }  # fmt: skip
            page = client.list_calls(service_account_uuid=account, limit=100)
            filtered = client.list_calls(service_account_uuid=no_cancel, organization_uuid=theirs)
            with pytest.raises(ListingRefused):
                list(client.iter_calls())  # no account, and one is required
            sent = _send_as(database_url, strict_broker, account, reached)
            # The database's outcome (calls.outcome) answers the account that sent it only.
            own = client.send("create", {**create, "serviceAccountUuid": str(account)})
            own.outcome(30)
            read = {who: client._ask_database(own.command_id, 10, who)
                    for who in (str(account), str(no_cancel), None)}  # fmt: skip
        finally:
            worker.stop()
    codes = {name: o["ok"] or o["error"]["code"] for name, o in outcomes.items()}
    assert codes == {
        "disabled in between": "forbidden", "no account": "forbidden", "unknown": "forbidden",
        "created": True, "person out of reach": "not_found", "no scope": "forbidden",
        "call out of reach": "not_found", "attempt in reach": True,
    }  # fmt: skip
    assert "calls:cancel" in outcomes["no scope"]["error"]["message"]
    assert db.row(hidden)["status"] == "requested"
    assert db.attempt_rows(reached) == 2  # the client's and `send --as`'s
    assert page["ok"]
    listed = {c["uuid"] for c in page["calls"]}
    assert {str(reached), outcomes["created"]["call"]["uuid"]} <= listed
    assert str(hidden) not in listed
    # no_cancel may read; of the calls performed by theirs it reaches none (hidden is theirs).
    assert filtered == {"ok": True, "calls": [], "nextCursor": None}
    assert sent["ok"], sent
    assert read[str(account)] is not None
    assert read[str(account)]["ok"] is True  # type: ignore[index]
    assert read[str(no_cancel)] is None  # the same organization, another account
    assert read[None] is None  # no account, where one is required
    senders = dict(db.sql("SELECT command_id, service_account_uuid FROM worker_processed_commands"
                          " WHERE command_id = :c", c=queued.command_id).all())  # fmt: skip
    assert senders == {queued.command_id: soon_disabled}  # the audit keeps who sent it


def _send_as(database_url: str, broker: str, account: UUID, call: UUID) -> Any:
    """`calls-worker send --as` from a shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLS_WORKER_")}
    env.update(CALLS_WORKER_DATABASE_URL=database_url, CALLS_WORKER_BROKER_URL=broker)
    attempt = json.dumps({"callUuid": str(call), "userUuid": str(uuid4()), "attemptedAt": ISSUED})
    done = subprocess.run([sys.executable, "-m", "calls_worker", "send", "add-attempt", "-",
                           "--as", str(account)], input=attempt, env=env, capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow
def test_a_claimed_account_must_be_the_one_whose_certificate_signed(
    db: Db, database_url: str, strict_broker: str, tmp_path: Path
) -> None:
    """Two producers with certificates of their own, both trusted: each may act only for
    the account that names its certificate; naming the other's is forbidden and kept."""
    store = tmp_path / "store"
    worker_keys = key_and_certificate(store, "worker")
    first = key_and_certificate(store, "first")
    second = key_and_certificate(store, "second")
    trusted = str(store / "*.pem")
    organization = db.organization(3)
    person = db.person(organization)
    firsts = add_service_account(db.engine, "first", organization, ALL,
                                 certificate_sha256(first.certificate.read_bytes()))  # fmt: skip
    uncertified = add_service_account(db.engine, "uncertified", organization, ALL)
    create = {"personUuid": str(person), "organizationUuid": str(organization)}
    worker = _start(database_url, strict_broker, tmp_path, "certified",
                    CALLS_WORKER_SIGNING_KEY_FILE=str(worker_keys.key),
                    CALLS_WORKER_SIGNING_CERTIFICATE_FILE=str(worker_keys.certificate),
                    CALLS_WORKER_SIGNING_CERT_STORE=trusted)  # fmt: skip
    control = Celery("certified-control", set_as_current=False)
    control.conf.update(celery_config(strict_broker, strict_broker))
    enable_signing(control, Signing(worker_keys.key, worker_keys.certificate, trusted))
    try:
        wait_for_worker(control, "certified", worker)
        with CallsClient(strict_broker, signing=_trusting(first, trusted)) as client:
            own = client.send("create", {**create, "serviceAccountUuid": str(firsts)}).outcome(30)
            listed = client.list_calls(service_account_uuid=firsts)
            without = client.send("create", {**create, "serviceAccountUuid": str(uncertified)})
            without_outcome = without.outcome(30)
        with CallsClient(strict_broker, signing=_trusting(second, trusted)) as client:
            stolen = client.send("create", {**create, "serviceAccountUuid": str(firsts)})
            stolen_outcome = stolen.outcome(30)
            # A body that says who signed it is not believed: the worker's decoding says.
            forged = client.send_unchecked(
                "create", json.dumps({**create, "serviceAccountUuid": str(firsts)}))
            stolen_list = client.list_calls(service_account_uuid=firsts)
        forged_outcome = _forged_with_signed_by(
            strict_broker, _trusting(second, trusted), firsts, create,
            claimed=certificate_sha256(first.certificate.read_bytes()),
        )  # fmt: skip
    finally:
        worker.stop()
        control.close()
    assert own["ok"], own
    assert listed["ok"]
    assert [c["uuid"] for c in listed["calls"]] == [own["call"]["uuid"]]
    for refused in (without_outcome, stolen_outcome, forged.outcome(30), forged_outcome,
                    stolen_list):  # fmt: skip
        assert refused["ok"] is False, refused
        assert refused["error"]["code"] == "forbidden", refused
    assert "has no certificate" in without_outcome["error"]["message"]
    assert "whose certificate signed" in stolen_outcome["error"]["message"]
    kept = db.sql("SELECT command_id, reason FROM worker_rejected_commands").all()
    kept_ids = {row[0] for row in kept}
    assert {without.command_id, stolen.command_id} <= kept_ids
    assert db.sql("SELECT count(*) FROM calls WHERE person_uuid = :p", p=person).scalar() == 1


def _trusting(signing: Signing, store: str) -> Signing:
    return Signing(key=signing.key, certificate=signing.certificate, cert_store=store)


def _forged_with_signed_by(
    broker: str, signing: Signing, account: UUID, create: dict[str, str], *, claimed: str
) -> Any:
    """A command signed by ``signing`` whose body claims ``signedBy: claimed``."""
    app = Celery("forger", set_as_current=False)
    app.conf.update(celery_config(broker, broker))
    enable_signing(app, signing)
    command_id = str(uuid4())
    try:
        result = app.send_task(
            "calls.create", task_id=command_id, queue="calls.commands",
            kwargs={"command": {**create, "serviceAccountUuid": str(account)},
                    "signedFor": {"id": command_id, "task": "calls.create"},
                    "signedBy": claimed},
        )  # fmt: skip
        return result.get(timeout=30)
    finally:
        app.close()

