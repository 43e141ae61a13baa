"""The wire format's names, shared by the worker and the producer client (no worker code).

See docs/wire-format.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

from calls_worker.domain.commands import CommandKind

COMMANDS_QUEUE: Final = "calls.commands"
SWEEPS_QUEUE: Final = "calls.sweeps"

TASK_NAMES: Final[dict[CommandKind, str]] = {
    "create": "calls.create",
    "add_attempt": "calls.add_attempt",
    "complete": "calls.complete",
    "cancel": "calls.cancel",
    "expire": "calls.expire",
}
SWEEP_TASK: Final = "calls.sweep"
PRUNE_TASK: Final = "calls.prune"
# A query, not a command: {"commandId": ...} → the outcome the database keeps for it.
OUTCOME_TASK: Final = "calls.outcome"
RECONCILE_TASK: Final = "calls.reconcile"
# A query, not a command: a page of calls, newest first (docs/wire-format.md).
LIST_TASK: Final = "calls.list"

# JSON only: pickle (or anything else that can run code when decoded) is refused.
CONTENT_TYPES: Final = ["json"]

# How long an outcome stays in the result backend: producers read an outcome within seconds
# of sending; one who comes later asks the database (calls.outcome), which keeps it 72 h.
RESULT_RETENTION_SECONDS: Final = 3600

# Longer than any task may run (celery_app.TASK_TIME_LIMIT): Redis redelivers a message
# not acknowledged within it. The default; workers take CALLS_WORKER_VISIBILITY_TIMEOUT_SECONDS.
VISIBILITY_TIMEOUT: Final = 3600


def celery_config(
    broker_url: str,
    result_backend_url: str,
    visibility_timeout: int = VISIBILITY_TIMEOUT,
    result_retention: int = RESULT_RETENTION_SECONDS,
) -> dict[str, Any]:
    """The Celery settings the worker and the producer client share."""
    return {
        "broker_url": broker_url,
        "result_backend": result_backend_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": CONTENT_TYPES,
        "result_accept_content": CONTENT_TYPES,
        "broker_transport_options": {"visibility_timeout": visibility_timeout},
        "result_backend_transport_options": {"visibility_timeout": visibility_timeout},
        "broker_connection_retry_on_startup": True,
        "result_expires": timedelta(seconds=result_retention),
        "task_default_queue": COMMANDS_QUEUE,
        "enable_utc": True,
        "timezone": "UTC",
    }


@dataclass(frozen=True)
class Signing:
    """Message signing with Celery's ``auth`` serializer: a key, its certificate, and a
    glob of the certificates whose signatures are trusted."""

    key: Path
    certificate: Path
    cert_store: str


def enable_signing(app: Any, signing: Signing) -> None:
    """Sign every task message this app sends and accept only signed ones.

    Results and control messages stay JSON (the outcome is not signed); task messages
    must carry a signature from a certificate of the store, or they are refused.
    """
    app.conf.update(
        task_serializer="auth",
        accept_content=["auth"],
        security_key=str(signing.key),
        security_certificate=str(signing.certificate),
        security_cert_store=signing.cert_store,
        security_digest="sha256",
    )
    # "auth" is registered by setup_security itself; JSON stays readable for results.
    app.setup_security(allowed_serializers=["json"], serializer="json")
