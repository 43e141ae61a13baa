"""The wire format's names, shared by the worker and the producer client (no worker code).

See docs/wire-format.md.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

from calls_worker.domain.commands import CommandKind

COMMANDS_QUEUE: Final = "calls.commands"
SWEEPS_QUEUE: Final = "calls.sweeps"

# RabbitMQ only (docs/wire-format.md, "RabbitMQ"). Both queues are quorum queues, declared
# with exactly these arguments by the worker and by the producer client; a producer that
# declares them otherwise gets PRECONDITION_FAILED. A message delivered DELIVERY_LIMIT + 1
# times without being settled (its worker killed each time: a poison message) goes to the
# dead-letter exchange, whose queue the worker moves into the rejected commands.
DEAD_LETTER_EXCHANGE: Final = "calls.dead-letters"
DEAD_LETTERS_QUEUE: Final = "calls.dead-letters"
DELIVERY_LIMIT: Final = 20
QUEUE_ARGUMENTS: Final[dict[str, Any]] = {
    "x-queue-type": "quorum",
    "x-delivery-limit": DELIVERY_LIMIT,
    "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
    # Dead-lettered only once the dead-letter queue has it (RabbitMQ ≥ 3.10); needs
    # reject-publish: a queue at a length limit refuses new messages instead of dropping.
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
}

TASK_NAMES: Final[dict[CommandKind, str]] = {
    "create": "calls.create",
    "add_attempt": "calls.add_attempt",
    "complete": "calls.complete",
    "cancel": "calls.cancel",
    "expire": "calls.expire",
}
# A command id (the task message's id header) is a printable string of 1 to this many
# characters; the worker keeps a message with another one, unapplied (docs/wire-format.md).
COMMAND_ID_LIMIT: Final = 200
SWEEP_TASK: Final = "calls.sweep"
PRUNE_TASK: Final = "calls.prune"
# A query, not a command: {"commandId": ...} → the outcome the database keeps for it.
OUTCOME_TASK: Final = "calls.outcome"
RECONCILE_TASK: Final = "calls.reconcile"
# A query, not a command: a page of calls, newest first (docs/wire-format.md).
LIST_TASK: Final = "calls.list"

# A command message's header (docs/wire-format.md, "Headers"): when the producer sent it,
# ISO 8601 with its offset (e.g. 2026-03-01T09:00:00.123+00:00). The worker times a command
# from it to its outcome (calls_worker_command_latency_seconds), and beat the age of the
# oldest queued command; a message without it, or with one it cannot read, is counted and
# handled as any other, untimed. It never changes what the command does.
SENT_AT_HEADER: Final = "sentAt"


def sent_at_header(now: datetime) -> dict[str, str]:
    """The header for a message sent at ``now`` (an aware datetime)."""
    return {SENT_AT_HEADER: now.isoformat(timespec="milliseconds")}


def command_headers(now: datetime) -> dict[str, str]:
    """A command message's headers of ours: when it is sent (``sentAt``), and the producer's
    trace (W3C ``traceparent`` and ``tracestate``) when the producer uses OpenTelemetry,
    so that its trace continues through the command in the worker. A producer that has
    not imported OpenTelemetry has nothing of it imported here."""
    headers = sent_at_header(now)
    if "opentelemetry" in sys.modules:
        from opentelemetry.propagate import inject

        carrier: dict[str, str] = {}
        inject(carrier)
        headers |= {key: carrier[key] for key in ("traceparent", "tracestate") if key in carrier}
    return headers


def sent_at(headers: Any) -> float | None:
    """The Unix time a message's ``sentAt`` header says; None without a readable one."""
    value = headers.get(SENT_AT_HEADER) if isinstance(headers, dict) else None
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return None if when.tzinfo is None else when.timestamp()


# Call events (docs/wire-format.md, "Call events"): the relay publishes each as a Celery
# task message (task EVENTS_TASK, or CALLS_WORKER_EVENTS_TASK; JSON; keyword arguments
# {"event": {...}}) to the durable topic exchange EVENTS_EXCHANGE, routing key its kind.
# Each subscriber binds a durable queue of its own, for the kinds it wants ("call.*": all).
EVENTS_EXCHANGE: Final = "calls.events"
EVENTS_TASK: Final = "calls.events.call_changed"
EVENT_KINDS: Final = (
    "call.created",
    "call.attempt_added",
    "call.completed",
    "call.cancelled",
    "call.expired",
)

# JSON only: pickle (or anything else that can run code when decoded) is refused.
CONTENT_TYPES: Final = ["json"]

# How long an outcome stays in the result backend: producers read an outcome within seconds
# of sending; one who comes later asks the database (calls.outcome), which keeps it 72 h.
RESULT_RETENTION_SECONDS: Final = 3600

# Longer than any task may run (celery_app.TASK_TIME_LIMIT): Redis redelivers a message
# not acknowledged within it. The default; workers take CALLS_WORKER_VISIBILITY_TIMEOUT_SECONDS.
VISIBILITY_TIMEOUT: Final = 3600


def is_amqp(broker_url: str) -> bool:
    """Whether the broker is RabbitMQ (``amqp://``, ``amqps://``); else it is Redis."""
    return broker_url.partition("://")[0] in ("amqp", "amqps", "pyamqp")


def is_postgres(url: str) -> bool:
    return url.partition("://")[0] in ("postgres", "postgresql", "postgresql+psycopg")


# Outcomes in PostgreSQL: the worker's own table, as a Celery result backend (adapters/results.py).
POSTGRES_RESULTS: Final = "calls_worker.adapters.results:PostgresResults"


def result_backend(broker_url: str, result_backend_url: str | None) -> str:
    """Where outcomes go, as Celery names a result backend: ``result_backend_url`` when set
    (Redis, or PostgreSQL: the worker's table of results), else the broker when it is Redis.
    A RabbitMQ broker keeps no results: it needs one of the two named."""
    url = result_backend_url or broker_url
    if is_postgres(url):
        return f"{POSTGRES_RESULTS}+{url}"
    if is_amqp(url):
        raise ValueError(
            "with a RabbitMQ broker, outcomes need a result backend: a redis:// URL, or the "
            "postgresql:// URL of the worker's database (CALLS_WORKER_RESULT_BACKEND_URL)"
        )
    return url


def amqp_queues() -> list[Any]:
    """The two queues as RabbitMQ has them: durable quorum queues, each bound to a topic
    exchange of its own name with its name as routing key. Topic, not Celery's default
    direct: a retry's countdown then waits in RabbitMQ (Celery's native delayed delivery),
    not in the worker, whose prefetch a quorum queue does not let grow for it."""
    from kombu import Exchange, Queue

    return [
        Queue(
            name, Exchange(name, "topic", durable=True), routing_key=name, durable=True,
            queue_arguments=dict(QUEUE_ARGUMENTS),
        )
        for name in (COMMANDS_QUEUE, SWEEPS_QUEUE)
    ]


def dead_letters_queue() -> Any:
    """Where RabbitMQ puts a message past the delivery limit: a durable quorum queue on a
    fanout exchange (a dead-lettered message keeps its routing key, the queue's name)."""
    from kombu import Exchange, Queue

    return Queue(DEAD_LETTERS_QUEUE, Exchange(DEAD_LETTER_EXCHANGE, "fanout", durable=True),
                 durable=True, queue_arguments={"x-queue-type": "quorum"})  # fmt: skip


def celery_config(
    broker_url: str,
    result_backend_url: str | None = None,
    visibility_timeout: int = VISIBILITY_TIMEOUT,
    result_retention: int = RESULT_RETENTION_SECONDS,
) -> dict[str, Any]:
    """The Celery settings the worker and the producer client share. ``result_backend_url``:
    see ``result_backend`` (unset with a RabbitMQ broker: no results, for control only)."""
    if result_backend_url is None and is_amqp(broker_url):
        backend = "disabled"
    else:
        backend = result_backend(broker_url, result_backend_url)
    amqp: dict[str, Any] = {}
    if is_amqp(broker_url):
        amqp = {
            "task_queues": amqp_queues(),
            # Publisher confirms: a send returns once the broker has the message (a quorum
            # queue: a majority of its nodes), and raises when the broker refused it.
            "broker_transport_options": {"confirm_publish": True},
        }
    return {
        "broker_url": broker_url,
        "result_backend": backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": CONTENT_TYPES,
        "result_accept_content": CONTENT_TYPES,
        # Redis only (RabbitMQ's acknowledgements are its own: no timeout redelivers).
        "broker_transport_options": {"visibility_timeout": visibility_timeout},
        "result_backend_transport_options": {"visibility_timeout": visibility_timeout},
        "broker_connection_retry_on_startup": True,
        "result_expires": timedelta(seconds=result_retention),
        "task_default_queue": COMMANDS_QUEUE,
        "enable_utc": True,
        "timezone": "UTC",
        **amqp,
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


def close_app(app: Any) -> None:
    """Close a Celery app and the connections of its result backend (PostgreSQL's pool)."""
    dispose = getattr(app._backend, "dispose", None)  # only a backend already made
    if dispose is not None:
        dispose()
    app.close()
