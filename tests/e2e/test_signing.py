"""Optional message signing (Celery's auth serializer): signed commands pass; forged and
unsigned ones are refused and kept with the reason."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
import redis
from celery import Celery
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from calls_worker.client import CallsClient
from calls_worker.domain.commands import CommandKind
from calls_worker.wire import Signing, celery_config, enable_signing
from tests.db_world import ISSUED, Db
from tests.e2e.conftest import (
    Process,
    redis_database,
    wait_for_worker,
    wait_until,
    worker_env,
)
from tests.reliability import Reliability


def key_and_certificate(directory: Path, name: str) -> Signing:
    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    key_file, cert_file = directory / f"{name}.key", directory / f"{name}.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return Signing(key=key_file, certificate=cert_file, cert_store=str(cert_file))


@pytest.mark.scenario("signed-messages")
@pytest.mark.slow
def test_only_commands_signed_by_a_trusted_key_are_handled(
    db: Db,
    database_url: str,
    redis_url: str,
    control_app: Celery,
    tmp_path: Path,
    reliability: Reliability,
) -> None:
    trusted = key_and_certificate(tmp_path / "trusted", "producer")
    forger = key_and_certificate(tmp_path / "forged", "forger")
    broker = redis_database(redis_url, 9)  # the session's worker does not sign
    env = worker_env(database_url, broker, tmp_path,
                     CALLS_WORKER_SIGNING_KEY_FILE=str(trusted.key),
                     CALLS_WORKER_SIGNING_CERTIFICATE_FILE=str(trusted.certificate),
                     CALLS_WORKER_SIGNING_CERT_STORE=trusted.cert_store)  # fmt: skip
    worker = Process(["worker", "-c", "1", "-n", "signed@%h", "-Q", "calls.commands"], env,
                     tmp_path / "signed.log")  # fmt: skip
    control = Celery("signing-control", set_as_current=False)  # control messages are signed too
    control.conf.update(celery_config(broker, broker))
    enable_signing(control, trusted)
    unsigned = Celery("unsigned-producer", set_as_current=False)
    unsigned.conf.update(celery_config(broker, broker))
    try:
        wait_for_worker(control, "signed", worker)
        organization = db.organization(3)
        person = {"personUuid": str(db.person(organization)), "organizationUuid": str(organization)}
        with CallsClient(broker, signing=trusted) as client:
            assert client.send("create", person).outcome(30)["ok"] is True
        with CallsClient(broker, signing=forger) as client:
            forged = client.send("create", person)
        unsigned.send_task("calls.create", kwargs={"command": person})  # plain JSON
        wait_until(lambda: db.sql("SELECT count(*) FROM worker_rejected_commands").scalar() == 2,
                   30, "both refused messages to be kept")  # fmt: skip
        with CallsClient(broker, signing=trusted) as client:  # still serving
            call = client.send("create", person).outcome(30)["call"]["uuid"]
        # Someone who can write to the broker captures validly signed messages...
        attempt = captured(
            redis_database(redis_url, 10),
            trusted,
            "add_attempt",
            {"callUuid": call, "userUuid": call, "attemptedAt": ISSUED},
        )
        cancel = captured(redis_database(redis_url, 10), trusted, "cancel", {"callUuid": call})
        queue = redis.Redis.from_url(broker)
        queue.lpush("calls.commands", json.dumps(attempt))  # delivered as sent: applied
        wait_until(lambda: db.attempt_rows(UUID(call)) == 1, 30, "the signed attempt")
        # ... and sends the attempt again under new ids, and the cancel as an expire.
        for _ in range(2):
            queue.lpush("calls.commands", json.dumps(relabelled(attempt, new_id=True)))
        queue.lpush("calls.commands", json.dumps(relabelled(cancel, task="calls.expire")))
        queue.lpush(
            "calls.commands",
            json.dumps(
                relabelled(attempt, new_id=True, body=base64.b64encode(b"\x80binary\x00").decode())
            ),
        )
        wait_until(lambda: db.sql("SELECT count(*) FROM worker_rejected_commands").scalar() == 6,
                   30, "the replays, the relabelled and the binary message to be kept")  # fmt: skip
        with CallsClient(broker, signing=trusted) as client:  # still serving
            assert client.send("create", person).outcome(30)["ok"] is True
        assert worker.popen.poll() is None  # the binary message did not end the worker
    finally:
        worker.stop()
        control.close()
        unsigned.close()
    reasons = db.sql("SELECT reason FROM worker_rejected_commands ORDER BY id").scalars().all()
    calls = db.sql("SELECT count(*) FROM calls").scalar()
    attempts = db.attempt_rows(UUID(call))
    ended = db.row(UUID(call))["status"] != "requested"
    reliability.record("signed-messages", commands=10,
                       lost=max(0, 3 - calls) + max(0, 1 - attempts),
                       doubled=max(0, calls - 3) + max(0, attempts - 1) + ended)  # fmt: skip
    assert calls == 3
    assert db.attempt_rows(UUID(call)) == 1  # the replays added nothing
    assert db.row(UUID(call))["status"] == "requested"  # the cancel did not become an expire
    # The forged command was kept under its own id, and never applied nor answered.
    kept_ids = db.sql("SELECT command_id FROM worker_rejected_commands").scalars().all()
    assert forged.command_id in kept_ids
    processed = db.sql("SELECT count(*) FROM worker_processed_commands WHERE command_id = :c",
                       c=forged.command_id).scalar()  # fmt: skip
    assert processed == 0
    assert any("application/json" in r for r in reasons), reasons
    assert sum("signedFor does not match" in r for r in reasons) == 3, reasons
    assert len(reasons) == 6


def captured(broker: str, signing: Signing, kind: CommandKind, command: dict[str, str]) -> Any:
    """A command signed by ``signing``, as it lies in the broker (its Redis envelope)."""
    with CallsClient(broker, signing=signing) as client:
        client.send(kind, command)
    envelope: Any = redis.Redis.from_url(broker).rpop("calls.commands")
    assert envelope is not None
    return json.loads(envelope)


def relabelled(envelope: Any, *, new_id: bool = False, task: str | None = None,
               body: str | None = None) -> Any:  # fmt: skip
    """The captured message with its headers (not its signed body) changed."""
    changed = copy.deepcopy(envelope)
    command_id = str(uuid4()) if new_id else changed["headers"]["id"]
    changed["headers"].update(id=command_id, root_id=command_id)
    if task is not None:
        changed["headers"]["task"] = task
    if body is not None:
        changed["body"] = body
    changed["properties"].update(correlation_id=command_id, delivery_tag=str(uuid4()))
    return changed
