"""Which certificate signed a message, handed to the task that runs it.

Celery's ``auth`` serializer checks that a message was signed by a certificate of the
store, then returns only the body: the task cannot tell whose certificate it was. A
command that names a service account must be signed with that account's certificate
(domain/access.py), so the worker replaces the serializer's decoding with one that, once
Celery's own check passed, adds the signer's SHA-256 fingerprint to the task's keyword
arguments as ``signedBy``.

What a sender writes can never become the signer:
- A signed task body must be protocol 2's ``[args, kwargs, embed]``. Celery's strategy
  would also take a dict with ``args``/``kwargs`` (the hybrid shape, with or without a
  ``task`` header), and build the task's arguments from it after the check, past this
  decoding: a body with any of ``args``, ``kwargs`` or ``task`` is refused here, so the
  message is kept among the rejected ones and nothing runs. (A dict without them is a
  control message, signed with the same serializer, and passes as it is.)
- ``signedBy`` and ``signedOriginal`` are the worker's names: whatever a body of a command,
  a listing or an outcome query says under them is replaced, and any other body that uses
  them is refused.
- No certificate is trusted to vouch for another, the worker's own neither. A retry the
  worker republishes is signed with the worker's key, so it carries the producer's signed
  message as it came (``signedOriginal``); each delivery verifies that original again,
  checks that it says exactly what the retry says, and names its signer. Holding the
  worker's key (beat, an operator's shell) therefore lets one sign as the worker and as
  nobody else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from celery.exceptions import SecurityError
from celery.security.serialization import SecureSerializer
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from kombu.serialization import register
from kombu.utils.encoding import bytes_to_str

from calls_worker.wire import Signing

SIGNED_BY: Final = "signedBy"
SIGNED_ORIGINAL: Final = "signedOriginal"
WORKERS_NAMES: Final = frozenset({SIGNED_BY, SIGNED_ORIGINAL})
"""Keyword arguments only the worker's decoding sets."""
# What Celery's strategy reads a task's arguments from in a dict body (control messages,
# the other dicts signed with the same serializer, have none of them).
TASK_KEYS: Final = frozenset({"args", "kwargs", "task"})
# The keyword argument of the tasks that act for a sender: commands and listings, outcome
# queries.
SENDERS_ARGUMENTS: Final = frozenset({"command", "query"})


def certificate_sha256(pem: bytes) -> str:
    """The SHA-256 fingerprint (lower-case hex) of a PEM certificate."""
    return x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()).hex()


def protocol2(body: Any) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """``body`` as protocol 2's ``[args, kwargs, embed]``; SecurityError for any other shape."""
    if (isinstance(body, list | tuple) and len(body) == 3 and isinstance(body[0], list | tuple)
            and isinstance(body[1], dict) and isinstance(body[2], dict | None)):  # fmt: skip
        return list(body[0]), body[1], body[2] or {}
    shape = type(body).__name__ + (f" with keys {sorted(map(str, body))}"
                                   if isinstance(body, Mapping) else "")  # fmt: skip
    raise SecurityError(f"a signed body must be [args, kwargs, embed] (protocol 2); got a {shape}")


def as_sent(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments a sender wrote, without those of the worker's decoding."""
    return {key: value for key, value in kwargs.items() if key not in WORKERS_NAMES}


class SignerAwareSerializer(SecureSerializer):
    """Celery's signed serializer, whose decoded task body names its signer (see the
    module's docstring). Raises SecurityError, like Celery's, for what it refuses."""

    def deserialize(self, data: Any) -> Any:
        body = super().deserialize(data)  # raises unless a trusted certificate signed it
        if isinstance(body, Mapping) and not TASK_KEYS & set(body):
            return body  # a control message (ping, shutdown): no task arguments in it
        args, kwargs, embed = protocol2(body)
        if not SENDERS_ARGUMENTS & set(kwargs):
            if WORKERS_NAMES & set(kwargs):
                named = sorted(WORKERS_NAMES & set(kwargs))
                raise SecurityError(f"{named} may only be set by the worker, on a command,"
                                    " listing or outcome query")  # fmt: skip
            return [args, kwargs, embed]
        signer, original = self._signer(data), bytes_to_str(data)
        carried = kwargs.get(SIGNED_ORIGINAL)
        if carried is not None:
            if not isinstance(carried, str):
                raise SecurityError(f"{SIGNED_ORIGINAL} must be a signed message (a string)")
            first_args, first_kwargs, _ = protocol2(super().deserialize(carried.encode()))
            if WORKERS_NAMES & set(first_kwargs) or (first_args, first_kwargs) != (
                args, as_sent(kwargs)
            ):
                raise SecurityError(f"{SIGNED_ORIGINAL} does not say what the message says")
            signer, original = self._signer(carried), carried
        return [args, {**as_sent(kwargs), SIGNED_BY: signer, SIGNED_ORIGINAL: original}, embed]

    def _signer(self, data: Any) -> str:
        """The fingerprint of the certificate that signed ``data`` (verified already)."""
        certificate = self._cert_store[self._unpack(data)["signer"]]  # type: ignore[attr-defined]
        fingerprint: str = certificate._cert.fingerprint(hashes.SHA256()).hex()
        return fingerprint


def install(signing: Signing, digest: str = "sha256") -> None:
    """Sign and decode ``auth`` messages with SignerAwareSerializer (after Celery's
    setup_security, which registered its own under that name)."""
    from celery.security.certificate import Certificate, FSCertStore
    from celery.security.key import PrivateKey

    certificate = signing.certificate.read_bytes()
    serializer = SignerAwareSerializer(
        key=PrivateKey(signing.key.read_bytes()),
        cert=Certificate(certificate.decode()),
        cert_store=FSCertStore(signing.cert_store),
        digest=digest,
        serializer="json",
    )
    register("auth", serializer.serialize, serializer.deserialize,  # type: ignore[arg-type]
                      content_type="application/data", content_encoding="utf-8")  # fmt: skip
