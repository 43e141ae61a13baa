"""A tenant who can write to the broker, holding a trusted certificate of its own, tries to
act as another tenant by writing the signer into what it signs.

Account B (organization B, scope ``calls:create`` only, certificate B) pushes Redis
envelopes signed with its key, naming account A and claiming ``signedBy`` = A's certificate
and a ``signedOriginal`` of its making, in every body shape Celery's strategy accepts:
protocol 2's ``[args, kwargs, embed]``; a dict with ``args``/``kwargs`` under a task header;
a dict with its own ``task`` and no task header. For a cancel of A's call, a listing as A
and an outcome query. Nothing of A's may change, no listing of A's may be answered, and
every refused message is kept with its reason."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
import redis
from celery import Celery
from kombu.serialization import dumps

from calls_worker.adapters.db.directory import add_service_account
from calls_worker.client import CallsClient
from calls_worker.wire import Signing, celery_config, enable_signing
from calls_worker.worker.signer import certificate_sha256
from tests.db_world import Db
from tests.e2e.conftest import Process, redis_database, wait_for_worker, wait_until, worker_env
from tests.e2e.test_signing import captured, key_and_certificate

ALL = ["calls:create", "calls:attempt", "calls:complete", "calls:cancel", "calls:expire",
       "calls:read"]  # fmt: skip
SHAPES = ("protocol 2", "hybrid under a task header", "hybrid without a task header")


@pytest.fixture
def broker(redis_url: str) -> str:
    url = redis_database(redis_url, 14)
    redis.Redis.from_url(url).flushdb()
    return url


def forged(template: dict[str, Any], signing: Signing, shape: str, task: str,
           kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:  # fmt: skip
    """A Redis envelope of ``task`` whose body, in ``shape``, carries ``kwargs`` and is
    signed with ``signing``'s key; its id and the envelope."""
    message_id = str(uuid4())
    kwargs = {**kwargs, "signedFor": {"id": message_id, "task": task}}
    body: Any = [[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    envelope = json.loads(json.dumps(template))
    headers = envelope["headers"]
    headers.update(id=message_id, root_id=message_id, task=task)
    if shape != "protocol 2":
        body = {"args": [], "kwargs": kwargs}
    if shape == "hybrid without a task header":
        body.update(task=task, id=message_id)
        del headers["task"]
    enable_signing(Celery("forger", set_as_current=False), signing)  # registers its key
    _, _, signed = dumps(body, serializer="auth")
    envelope["body"] = base64.b64encode(str(signed).encode()).decode()
    envelope["properties"].update(correlation_id=message_id, delivery_tag=str(uuid4()))
    return message_id, envelope


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Signing, Signing, Signing]:
    """The worker's, A's and B's keys, each certificate trusted by one store."""
    store = tmp_path / "store"
    trusted = str(store / "*.pem")

    def key(name: str) -> Signing:
        made = key_and_certificate(store, name)
        return Signing(made.key, made.certificate, trusted)

    return key("worker"), key("a"), key("b")


def _signing_worker(database_url: str, broker: str, tmp_path: Path, name: str,
                    signing: Signing, **extra: str) -> tuple[Process, Celery]:  # fmt: skip
    """A command worker that signs with ``signing`` and requires service accounts, and a
    control app that can ping it."""
    worker = Process(["worker", "-c", "1", "-n", f"{name}@%h", "-Q", "calls.commands"],
                     worker_env(database_url, broker, tmp_path,
                                CALLS_WORKER_REQUIRE_SERVICE_ACCOUNT="true",
                                CALLS_WORKER_SIGNING_KEY_FILE=str(signing.key),
                                CALLS_WORKER_SIGNING_CERTIFICATE_FILE=str(signing.certificate),
                                CALLS_WORKER_SIGNING_CERT_STORE=signing.cert_store, **extra),
                     tmp_path / f"{name}.log")  # fmt: skip
    control = Celery(f"{name}-control", set_as_current=False)
    control.conf.update(celery_config(broker, broker))
    enable_signing(control, signing)
    return worker, control


@pytest.mark.slow
def test_no_body_a_tenant_signs_makes_it_another_tenant(
    db: Db, database_url: str, broker: str, tmp_path: Path,
    keys: tuple[Signing, Signing, Signing],
) -> None:  # fmt: skip
    worker_keys, a_keys, b_keys = keys
    a_org, b_org = db.organization(3), db.organization(3)
    a_person = db.person(a_org)
    a_sha = certificate_sha256(a_keys.certificate.read_bytes())
    a = add_service_account(db.engine, "a", a_org, ALL, a_sha)
    add_service_account(db.engine, "b", b_org, ["calls:create"],
                        certificate_sha256(b_keys.certificate.read_bytes()))  # fmt: skip
    worker, control = _signing_worker(database_url, broker, tmp_path, "forgery", worker_keys)
    results = Celery("forgery-results", set_as_current=False)
    results.conf.update(celery_config(broker, broker))
    answers: dict[tuple[str, str], Any] = {}
    try:
        wait_for_worker(control, "forgery", worker)
        with CallsClient(broker, signing=a_keys) as client:
            created = client.send("create", {"personUuid": str(a_person),
                                             "organizationUuid": str(a_org),
                                             "serviceAccountUuid": str(a)})  # fmt: skip
            call = created.outcome(30)["call"]["uuid"]
        template = captured(redis_database(broker, 15), b_keys, "create",
                            {"personUuid": str(uuid4()), "organizationUuid": str(uuid4())})
        queue = redis.Redis.from_url(broker)
        claims = {"signedBy": a_sha, "signedOriginal": None}
        sent: dict[tuple[str, str], str] = {}
        for shape in SHAPES:
            for task, kwargs in (
                ("calls.cancel", {"command": {"callUuid": call, "serviceAccountUuid": str(a)}}),
                ("calls.list", {"command": {"serviceAccountUuid": str(a)}}),
                ("calls.outcome", {"query": {"commandId": created.command_id}}),
            ):
                message_id, envelope = forged(template, b_keys, shape, task, {**kwargs, **claims})
                sent[(shape, task)] = message_id
                queue.lpush("calls.commands", json.dumps(envelope))
        for task in ("calls.cancel", "calls.list", "calls.outcome"):
            answers[("protocol 2", task)] = results.AsyncResult(
                sent[("protocol 2", task)]).get(timeout=30)
        with CallsClient(broker, signing=a_keys) as client:  # A reads its own
            answers[("A", "calls.outcome")] = client._ask_database(created.command_id, 30, str(a))
        hybrid = {message_id for (shape, _), message_id in sent.items() if shape != "protocol 2"}
        wait_until(lambda: hybrid <= set(db.sql(
            "SELECT command_id FROM worker_rejected_commands").scalars()), 30,
            "every hybrid body to be kept")  # fmt: skip
        with CallsClient(broker, signing=a_keys) as client:  # A is still served
            assert client.list_calls(service_account_uuid=a)["ok"] is True
        # An operator's `send --as A` signs with the key its shell has: the worker's key is
        # refused before sending; A's own key is A.
        with_workers_key = _send_as(database_url, broker, worker_keys, a, call)
        with_as_key = _send_as(database_url, broker, a_keys, a, call)
        assert worker.popen.poll() is None
    finally:
        worker.stop()
        control.close()
        results.close()
    assert db.row(call)["status"] == "requested"  # the cancel as A did nothing
    for task in ("calls.cancel", "calls.list"):
        answer = answers[("protocol 2", task)]
        assert answer["ok"] is False, answer
        assert answer["error"]["code"] == "forbidden", answer
        assert "whose certificate signed" in answer["error"]["message"], answer
    assert with_workers_key.returncode == 2, with_workers_key.stderr
    assert "Sign with the account's own key" in with_workers_key.stderr
    assert with_workers_key.stdout == ""  # nothing sent
    assert with_as_key.returncode == 0, with_as_key.stdout + with_as_key.stderr
    assert json.loads(with_as_key.stdout)["ok"] is True
    assert db.attempt_rows(UUID(call)) == 1  # the one sent with A's key
    assert answers[("protocol 2", "calls.outcome")] == {"found": False}  # as if there were none
    assert answers[("A", "calls.outcome")] is not None
    kept = dict(db.sql("SELECT command_id, reason FROM worker_rejected_commands").all())
    for (shape, task), message_id in sent.items():
        if shape != "protocol 2":
            assert "[args, kwargs, embed]" in kept[message_id], (shape, task, kept[message_id])


def _send_as(database_url: str, broker: str, signing: Signing, account: UUID, call: str
             ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """`calls-worker send add-attempt --as ACCOUNT` from a shell signing with ``signing``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLS_WORKER_")}
    env.update(CALLS_WORKER_DATABASE_URL=database_url, CALLS_WORKER_BROKER_URL=broker,
               CALLS_WORKER_SIGNING_KEY_FILE=str(signing.key),
               CALLS_WORKER_SIGNING_CERTIFICATE_FILE=str(signing.certificate),
               CALLS_WORKER_SIGNING_CERT_STORE=signing.cert_store)  # fmt: skip
    attempt = json.dumps({"callUuid": call, "userUuid": str(uuid4()),
                          "attemptedAt": "2026-03-01T09:00:00+00:00"})  # fmt: skip
    return subprocess.run([sys.executable, "-m", "calls_worker", "send", "add-attempt", "-",
                           "--as", str(account)], input=attempt, env=env, capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip


@pytest.mark.slow
def test_a_retried_command_still_acts_for_its_producers_account(
    db: Db, database_url: str, broker: str, tmp_path: Path,
    keys: tuple[Signing, Signing, Signing],
) -> None:  # fmt: skip
    """The worker republishes a retry signed with its own key, which vouches for nobody: the
    retry is applied as A's because it carries A's signed original (worker/signer.py)."""
    worker_keys, a_keys, _ = keys
    organization = db.organization(3)
    person = db.person(organization)
    a = add_service_account(db.engine, "a", organization, ALL,
                            certificate_sha256(a_keys.certificate.read_bytes()))  # fmt: skip
    db.sql("""
        CREATE SEQUENCE test_failures;
        CREATE FUNCTION test_fails_twice() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('test_failures') <= 2 THEN
                RAISE EXCEPTION 'the test fails this attempt' USING ERRCODE = '40001';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER test_fails_twice BEFORE INSERT ON call_attempts
            FOR EACH ROW EXECUTE FUNCTION test_fails_twice();
    """)
    worker, control = _signing_worker(database_url, broker, tmp_path, "resigned", worker_keys,
                                      CALLS_WORKER_COMMAND_RETRY_BACKOFF_MAX_SECONDS="1")
    try:
        wait_for_worker(control, "resigned", worker)
        with CallsClient(broker, signing=a_keys) as client:
            call = client.send("create", {"personUuid": str(person),
                                          "organizationUuid": str(organization),
                                          "serviceAccountUuid": str(a)}
                               ).outcome(30)["call"]["uuid"]  # fmt: skip
            attempt = client.send("add_attempt", {
                "callUuid": call, "userUuid": str(uuid4()), "serviceAccountUuid": str(a),
                "attemptedAt": "2026-03-01T09:00:00+00:00"})  # fmt: skip
            outcome = attempt.outcome(60)
    finally:
        worker.stop()
        control.close()
        db.sql("DROP TRIGGER test_fails_twice ON call_attempts;"
               " DROP FUNCTION test_fails_twice(); DROP SEQUENCE test_failures")  # fmt: skip
    assert worker.output().count("will be retried") == 2
    assert outcome["ok"] is True, outcome
    assert db.attempt_rows(UUID(call)) == 1
    sender = db.sql("SELECT service_account_uuid FROM worker_processed_commands"
                    " WHERE command_id = :c", c=attempt.command_id).scalar_one()  # fmt: skip
    assert sender == a
