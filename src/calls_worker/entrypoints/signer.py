"""Which certificate signed a message, handed to the task that runs it.

Celery's ``auth`` serializer checks that a message was signed by a certificate of the
store, then returns only the body: the task cannot tell whose certificate it was. A
command that names a service account must be signed with that account's certificate
(domain/access.py), so the worker replaces the serializer's decoding with one that, once
Celery's own check passed, adds the signer's SHA-256 fingerprint to the task's keyword
arguments as ``signedBy``. Whatever a body says under that name itself is overwritten: only
the worker's decoding can set it, and only to a certificate whose signature it verified.
"""

from __future__ import annotations

from typing import Any, Final

from celery.security.serialization import SecureSerializer
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from kombu.serialization import register

from calls_worker.wire import Signing

SIGNED_BY: Final = "signedBy"


def certificate_sha256(pem: bytes) -> str:
    """The SHA-256 fingerprint (lower-case hex) of a PEM certificate."""
    return x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()).hex()


class SignerAwareSerializer(SecureSerializer):
    """Celery's signed serializer, whose decoded task body names its signer.

    A message this worker signed itself (a retry it published: the body's ``signedBy`` is
    the producer's, verified when the first copy was decoded) keeps the ``signedBy`` it
    carries. The worker's certificate must therefore be its own, not one it shares with
    producers.
    """

    def __init__(self, own_sha256: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._own_sha256 = own_sha256

    def deserialize(self, data: Any) -> Any:
        body = super().deserialize(data)  # raises unless a trusted certificate signed it
        signer = self._cert_store[self._unpack(data)["signer"]]  # type: ignore[attr-defined]
        fingerprint = signer._cert.fingerprint(hashes.SHA256()).hex()
        if fingerprint == self._own_sha256 and _signed_by(body) is not None:
            return body  # our own retry: signedBy is the producer's, checked before
        return with_signer(body, fingerprint)


def _kwargs_of_command(body: Any) -> dict[str, Any] | None:
    """The keyword arguments of a protocol-2 task body ``[args, kwargs, embed]`` that carries
    a ``command`` (a command or a listing); None for any other body (the sweep's, say)."""
    if isinstance(body, list | tuple) and len(body) == 3 and isinstance(body[1], dict):
        return body[1] if "command" in body[1] else None
    return None


def _signed_by(body: Any) -> Any:
    kwargs = _kwargs_of_command(body)
    return None if kwargs is None else kwargs.get(SIGNED_BY)


def with_signer(body: Any, fingerprint: str) -> Any:
    """A command's body with ``kwargs[signedBy]`` set; any other body as it is (a command
    in another shape then has no signer, and a claim it makes fails)."""
    kwargs = _kwargs_of_command(body)
    if kwargs is None:
        return body
    return [body[0], {**kwargs, SIGNED_BY: fingerprint}, body[2]]


def install(signing: Signing, digest: str = "sha256") -> None:
    """Sign and decode ``auth`` messages with SignerAwareSerializer (after Celery's
    setup_security, which registered its own under that name)."""
    from celery.security.certificate import Certificate, FSCertStore
    from celery.security.key import PrivateKey

    certificate = signing.certificate.read_bytes()
    serializer = SignerAwareSerializer(
        certificate_sha256(certificate),
        key=PrivateKey(signing.key.read_bytes()),
        cert=Certificate(certificate.decode()),
        cert_store=FSCertStore(signing.cert_store),
        digest=digest,
        serializer="json",
    )
    register("auth", serializer.serialize, serializer.deserialize,  # type: ignore[arg-type]
                      content_type="application/data", content_encoding="utf-8")  # fmt: skip
