"""The worker's decoding of signed messages names the certificate that signed them."""

from __future__ import annotations

from pathlib import Path

from kombu.serialization import dumps, loads

from calls_worker.entrypoints import signer
from calls_worker.entrypoints.signer import SIGNED_BY, certificate_sha256
from calls_worker.wire import Signing
from tests.e2e.test_signing import key_and_certificate


def _signed_as(signing: Signing, store: str, body: object) -> bytes | str:
    """``body`` signed with ``signing``, decoded as the worker decodes it."""
    signer.install(Signing(signing.key, signing.certificate, store))
    _, _, data = dumps(body, serializer="auth")
    signed: bytes | str = data
    return signed


def test_the_signer_is_named_and_a_claimed_one_overwritten(tmp_path: Path) -> None:
    producer = key_and_certificate(tmp_path, "producer")
    worker = key_and_certificate(tmp_path, "worker")
    store = str(tmp_path / "*.pem")
    producers = certificate_sha256(producer.certificate.read_bytes())
    claimed = [[], {"command": {}, SIGNED_BY: "f" * 64}, {}]
    data = _signed_as(producer, store, claimed)
    signer.install(Signing(worker.key, worker.certificate, store))  # the worker decodes
    decoded = loads(data, "application/data", "utf-8", accept=["application/data"])
    assert decoded[1][SIGNED_BY] == producers


def test_the_workers_own_retry_keeps_the_producers_signer(tmp_path: Path) -> None:
    worker = key_and_certificate(tmp_path, "worker")
    store = str(tmp_path / "*.pem")
    retried = [[], {"command": {}, SIGNED_BY: "a" * 64}, {}]
    data = _signed_as(worker, store, retried)  # the worker republishes a retry
    decoded = loads(data, "application/data", "utf-8", accept=["application/data"])
    assert decoded[1][SIGNED_BY] == "a" * 64
    unclaimed = _signed_as(worker, store, [[], {"command": {}}, {}])
    own = loads(unclaimed, "application/data", "utf-8", accept=["application/data"])
    assert own[1][SIGNED_BY] == certificate_sha256(worker.certificate.read_bytes())


def test_a_task_without_a_command_gets_no_signer(tmp_path: Path) -> None:
    """The sweep, pruning and the outcome query take no ``signedBy``: theirs stay as sent."""
    worker = key_and_certificate(tmp_path, "worker")
    store = str(tmp_path / "*.pem")
    bodies: list[list[object]] = [[[], {}, {}], [[], {"query": {"commandId": "x"}}, {}]]
    for body in bodies:
        data = _signed_as(worker, store, body)
        assert loads(data, "application/data", "utf-8", accept=["application/data"]) == body
