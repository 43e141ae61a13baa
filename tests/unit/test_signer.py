"""The worker's decoding of signed messages names the certificate that signed them, and
nothing a sender writes becomes that signer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kombu.exceptions import DecodeError
from kombu.serialization import dumps, loads

from calls_worker.wire import Signing
from calls_worker.worker import signer
from calls_worker.worker.signer import SIGNED_BY, SIGNED_ORIGINAL, certificate_sha256
from tests.e2e.test_signing import key_and_certificate

SIGNED_FOR = {"id": "c-1", "task": "calls.cancel"}


def _signed_as(signing: Signing, store: str, body: object) -> str:
    """``body`` signed with ``signing``'s key."""
    signer.install(Signing(signing.key, signing.certificate, store))
    _, _, data = dumps(body, serializer="auth")
    return str(data)


def _decoded_by_worker(worker: Signing, store: str, data: str) -> Any:
    signer.install(Signing(worker.key, worker.certificate, store))
    return loads(data, "application/data", "utf-8", accept=["application/data"])


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Signing, Signing, Signing, str]:
    """A producer's, another producer's and the worker's keys, and the store trusting all."""
    return (key_and_certificate(tmp_path, "producer"), key_and_certificate(tmp_path, "other"),
            key_and_certificate(tmp_path, "worker"), str(tmp_path / "*.pem"))  # fmt: skip


def sha(signing: Signing) -> str:
    return certificate_sha256(signing.certificate.read_bytes())


@pytest.mark.parametrize("argument", ["command", "query"])
def test_the_signer_is_named_and_a_claimed_one_overwritten(
    keys: tuple[Signing, Signing, Signing, str], argument: str
) -> None:
    producer, other, worker, store = keys
    claimed = [[], {argument: {}, "signedFor": SIGNED_FOR, SIGNED_BY: sha(other),
                    SIGNED_ORIGINAL: None}, {}]  # fmt: skip
    data = _signed_as(producer, store, claimed)
    decoded = _decoded_by_worker(worker, store, data)
    assert decoded[1][SIGNED_BY] == sha(producer)
    assert decoded[1][SIGNED_ORIGINAL] == data
    assert decoded[1]["signedFor"] == SIGNED_FOR


# Every shape Celery's strategy turns into a task's arguments besides protocol 2's list:
# a dict with args/kwargs (the hybrid shape, under a task header or with its own "task").
HYBRID_BODIES = [
    {"args": [], "kwargs": {"command": {}, "signedFor": SIGNED_FOR, SIGNED_BY: "a" * 64}},
    {"task": "calls.cancel", "id": "c-1", "args": [],
     "kwargs": {"command": {}, "signedFor": SIGNED_FOR, SIGNED_BY: "a" * 64}},
    {"task": "calls.outcome", "id": "q-1", "args": [],
     "kwargs": {"query": {"commandId": "c-1"}, SIGNED_BY: "a" * 64}},
    {"task": "calls.list", "id": "l-1", "kwargs": {"command": {}}},
    ["args", {"command": {}}, {}],  # a list whose args is "args": Celery reads it as a dict
    [[], {"command": {}}],
    "a string",
    None,
    {"task": "calls.cancel"},
]  # fmt: skip


@pytest.mark.parametrize("body", HYBRID_BODIES, ids=lambda body: type(body).__name__)
def test_every_other_body_shape_is_refused(
    keys: tuple[Signing, Signing, Signing, str], body: object
) -> None:
    producer, _, worker, store = keys
    with pytest.raises(DecodeError, match=r"\[args, kwargs, embed\]"):
        _decoded_by_worker(worker, store, _signed_as(producer, store, body))


def test_the_workers_own_key_vouches_for_nobody(
    keys: tuple[Signing, Signing, Signing, str],
) -> None:
    """A body the worker's key signed, claiming a producer, is the worker's."""
    producer, _, worker, store = keys
    claimed = [[], {"command": {}, "signedFor": SIGNED_FOR, SIGNED_BY: sha(producer)}, {}]
    decoded = _decoded_by_worker(worker, store, _signed_as(worker, store, claimed))
    assert decoded[1][SIGNED_BY] == sha(worker)


def test_a_retry_names_the_producer_of_the_original_it_carries(
    keys: tuple[Signing, Signing, Signing, str],
) -> None:
    producer, _, worker, store = keys
    first = _decoded_by_worker(worker, store, _signed_as(
        producer, store, [[], {"command": {"callUuid": "x"}, "signedFor": SIGNED_FOR}, {}]))
    # The worker republishes what it decoded (Celery's retry), signed with its own key.
    retry = _signed_as(worker, store, first)
    again = _decoded_by_worker(worker, store, retry)
    assert again[1][SIGNED_BY] == sha(producer)
    assert again[1][SIGNED_ORIGINAL] == first[1][SIGNED_ORIGINAL]  # the first, not the retry
    assert _decoded_by_worker(worker, store, _signed_as(worker, store, again)) == again


@pytest.mark.parametrize("changed", [
    {"command": {"callUuid": "y"}},
    {"signedFor": {"id": "c-2", "task": "calls.cancel"}},
    {"signedFor": {"id": "c-1", "task": "calls.expire"}},
])  # fmt: skip
def test_a_carried_original_must_say_what_the_message_says(
    keys: tuple[Signing, Signing, Signing, str], changed: dict[str, Any]
) -> None:
    """Someone holding any trusted key cannot borrow a producer's signature for another
    command, id or task."""
    producer, other, worker, store = keys
    sent = {"command": {"callUuid": "x"}, "signedFor": SIGNED_FOR}
    original = _signed_as(producer, store, [[], sent, {}])
    borrowed = [[], {**sent, **changed, SIGNED_ORIGINAL: original}, {}]
    with pytest.raises(DecodeError, match="does not say what the message says"):
        _decoded_by_worker(worker, store, _signed_as(other, store, borrowed))
    same = [[], {**sent, SIGNED_ORIGINAL: original}, {}]  # the very same message: no more
    assert _decoded_by_worker(worker, store, _signed_as(other, store, same))[1][SIGNED_BY] == (
        sha(producer))


def test_a_carried_original_must_itself_be_signed_by_a_trusted_key(
    keys: tuple[Signing, Signing, Signing, str], tmp_path: Path
) -> None:
    producer, _, worker, store = keys
    untrusted = key_and_certificate(tmp_path / "outside", "untrusted")
    sent = {"command": {}, "signedFor": SIGNED_FOR}
    forged = _signed_as(untrusted, str(untrusted.certificate), [[], sent, {}])
    with pytest.raises(DecodeError):
        _decoded_by_worker(worker, store, _signed_as(
            producer, store, [[], {**sent, SIGNED_ORIGINAL: forged}, {}]))
    nested = _signed_as(producer, store, [[], {**sent, SIGNED_ORIGINAL: "x"}, {}])
    with pytest.raises(DecodeError, match="does not say"):  # an original may carry none
        _decoded_by_worker(worker, store, _signed_as(
            producer, store, [[], {**sent, SIGNED_ORIGINAL: nested}, {}]))


def test_a_task_without_a_sender_gets_no_signer_and_may_not_name_one(
    keys: tuple[Signing, Signing, Signing, str],
) -> None:
    """The sweep, pruning and reconciling take no ``signedBy``."""
    _, _, worker, store = keys
    body: list[object] = [[], {}, {}]
    assert _decoded_by_worker(worker, store, _signed_as(worker, store, body)) == body
    for name in (SIGNED_BY, SIGNED_ORIGINAL):
        with pytest.raises(DecodeError, match="may only be set by the worker"):
            _decoded_by_worker(worker, store, _signed_as(worker, store, [[], {name: "x"}, {}]))


def test_a_control_message_passes_as_it_is(keys: tuple[Signing, Signing, Signing, str]) -> None:
    _, _, worker, store = keys
    ping = {"method": "ping", "arguments": {}, "destination": None, "reply_to": {"exchange": "x"}}
    assert _decoded_by_worker(worker, store, _signed_as(worker, store, ping)) == ping
