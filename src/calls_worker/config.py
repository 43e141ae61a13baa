"""Settings, read from the environment (prefix ``CALLS_WORKER_``) when asked, never at import."""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, PositiveInt, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from calls_worker.wire import Signing

LogLevel = Annotated[
    Literal["DEBUG", "INFO", "WARNING", "ERROR"],
    BeforeValidator(lambda value: value.upper() if isinstance(value, str) else value),
]
LogFormat = Literal["text", "json"]


class Settings(BaseSettings):
    """Everything the worker can be told. Unset URLs mean "use the embedded servers"."""

    model_config = SettingsConfigDict(env_prefix="CALLS_WORKER_", extra="ignore")

    database_url: str | None = Field(
        default=None,
        description="PostgreSQL URL shared with the Calls API; unset: the embedded PostgreSQL.",
    )
    broker_url: str | None = Field(
        default=None,
        description="The Celery broker: Redis (redis://, rediss://) or RabbitMQ (amqp://,"
        " amqps://; quorum queues, docs/wire-format.md); unset: the embedded Redis.",
    )
    result_backend_url: str | None = Field(
        default=None,
        description="Where outcomes are kept for producers: a redis:// URL, or a postgresql://"
        " one (the table worker_results); unset: the broker when it is Redis, the database"
        " when it is RabbitMQ.",
    )
    sweep_interval_seconds: PositiveInt = Field(
        default=60, description="How often beat runs the expiry sweep."
    )
    sweep_batch_size: PositiveInt | None = Field(
        default=None,
        description="Calls expired per transaction; bounds how long one batch holds row locks."
        " Unset: 1,000 with call events on (each call expired writes its event), 5,000 with"
        " them off; either holds its locks about 0.2–0.3 s (bench/README.md).",
    )
    reconcile_interval_seconds: PositiveInt = Field(
        default=3600,
        description="How often beat compares the due-calls record with the expiry rule and"
        " repairs any difference (each one counted in calls_worker_due_record_repairs_total).",
    )
    task_time_limit_seconds: int = Field(
        default=300,
        ge=2,
        description="Longest a command or sweep may run. Past its soft limit (30 s sooner, or "
        "half of it when that is shorter) a command is kept among the rejected ones; the "
        "hard limit ends the process running it. Keep it under the visibility timeout.",
    )
    visibility_timeout_seconds: PositiveInt = Field(
        default=3600,
        description="Redis redelivers a message not acknowledged within this; keep it above "
        "the 300 s a task may run (shorter only redelivers sooner, which is harmless). "
        "RabbitMQ has none: it redelivers when the worker's connection or process goes.",
    )
    command_max_retries: int = Field(
        default=8,
        ge=0,
        description="Retries of a command after a transient database error before it is "
        "kept among the rejected commands. While the database cannot take it there, the "
        "command is never given up: it stays queued and is retried until the database answers.",
    )
    command_retry_backoff_max_seconds: PositiveInt = Field(
        default=60,
        description="Longest pause between two retries of a command (exponential backoff "
        "with jitter, from 1 s).",
    )
    command_batch_size: int = Field(
        default=32,
        ge=1,
        le=64,
        description="Group commit: a worker process applies up to this many queued commands "
        "in one transaction, each with its own outcome, in the order they arrived. 1 applies "
        "each command on its own. At most 64.",
    )
    command_batch_wait_ms: int = Field(
        default=25,
        ge=0,
        le=50,
        description="Longest a command waits for its batch to fill before the batch is applied"
        " anyway (a lone command is never held longer). At most 50.",
    )
    max_message_bytes: PositiveInt = Field(
        default=1_048_576,
        description="A message larger than this is refused before it is decoded, and kept "
        "truncated to this size with the reason (commands are a few kilobytes).",
    )
    result_retention_seconds: PositiveInt = Field(
        default=3600,
        description="How long a command's outcome stays in the result backend (Redis or "
        "PostgreSQL) for its "
        "producer to read. Later, the producer client asks the database (calls.outcome), which "
        "keeps it PROCESSED_RETENTION_HOURS; see docs/scaling.md for what a day would cost.",
    )
    processed_retention_hours: PositiveInt = Field(
        default=72,
        description="How long a command's outcome is kept at least to answer a redelivery of "
        "it (far longer than the broker redelivers: its visibility timeout is an hour). "
        "Outcomes are forgotten a table at a time, so one is kept up to twice this. Read by "
        "`calls-worker migrate`, which stores it where only the database owner writes: the "
        "worker goes by the stored value (changing it takes a migrate).",
    )
    metrics_port: int = Field(
        default=9808,
        ge=0,
        le=65535,
        description="Port of this process's Prometheus /metrics (0: none).",
    )
    log_level: LogLevel = Field(
        default="INFO",
        description="What the worker and beat log: DEBUG, INFO, WARNING or ERROR (the"
        " commands' --loglevel overrides it).",
    )
    log_format: LogFormat = Field(
        default="text",
        description="text for people, json (one object a line) for machines (the commands'"
        " --log-format overrides it).",
    )
    command_log_level: LogLevel = Field(
        default="INFO",
        description="Level of the logger calls_worker.commands, which writes a line per"
        " command (its outcome) and per group commit. WARNING turns those lines off at high"
        " rates; warnings, errors and the metrics still count every command.",
    )
    flower_basic_auth: SecretStr | None = Field(
        default=None,
        description="user:password that Flower requires; Flower refuses to start without it.",
    )
    signing_key_file: Path | None = Field(
        default=None,
        description="PEM private key that signs messages (Celery's auth serializer); with "
        "the two below, only signed messages are accepted.",
    )
    signing_certificate_file: Path | None = Field(
        default=None, description="PEM certificate of the signing key."
    )
    signing_cert_store: str | None = Field(
        default=None, description="Glob of the PEM certificates whose signatures are trusted."
    )
    require_service_account: bool = Field(
        default=False,
        description="Refuse (forbidden) every command and listing that names no service "
        "account (serviceAccountUuid); docker-compose and the kustomize base set it.",
    )
    events: bool = Field(
        default=True,
        description="Call events (docs/wire-format.md, \"Call events\"): on, every change of a"
        " call writes an event in its transaction, and the workers publish them to the topic"
        " exchange calls.events; off (off, false, 0), nothing is written or published.",
    )
    events_task: str = Field(
        default="calls.events.call_changed",
        min_length=1,
        description="The task name call events are published under (subscribers register a"
        " task of this name).",
    )
    events_retention_hours: PositiveInt = Field(
        default=72,
        description="How long a published event stays in worker_call_events (for `calls-worker"
        " events tail`, and a subscriber catching up) before calls.prune drops its hour's"
        " partition. Read by `calls-worker migrate`, which sets it as the owner; the worker's"
        " own setting changes nothing. Unpublished events are never dropped.",
    )
    events_relay_batch_size: int = Field(
        default=500,
        ge=1,
        le=10_000,
        description="Events the relay publishes per transaction (it marks them published"
        " once the broker accepted all of them).",
    )
    events_relay_interval_ms: int = Field(
        default=200,
        ge=10,
        le=60_000,
        description="How often an idle relay looks for new events (a busy one does not wait);"
        " the least latency an event can have is about half of it.",
    )
    events_relay_lanes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Lanes of the relay: the calls are shared between them by their uuid, and"
        " each lane is published by one worker at a time (its advisory lock), so that as many"
        " workers publish at once. Set the same value on every worker: relays with different"
        " values publish some events twice (in order).",
    )
    events_watch_queues: str = Field(
        default="",
        description="Comma-separated subscriber queues bound to calls.events whose depth the"
        " metrics report (calls_worker_event_queue_messages). On Redis the bound queues are"
        " found by themselves; RabbitMQ does not tell a client its bindings, so name them.",
    )
    data_dir: Path = Field(
        default=Path(".calls-worker"),
        description="Where the embedded PostgreSQL and Redis keep their data.",
    )


ENV_PREFIX = "CALLS_WORKER_"

# The sweep's batch when CALLS_WORKER_SWEEP_BATCH_SIZE is unset: measured to hold their
# locks about as long (bench/README.md), and to be as fast as larger ones, or faster.
SWEEP_BATCH_WITH_EVENTS = 1000
SWEEP_BATCH_WITHOUT_EVENTS = 5000


def sweep_batch_size(settings: Settings) -> int:
    """The sweep's batch size: the one set, else the default for events on or off."""
    if settings.sweep_batch_size is not None:
        return settings.sweep_batch_size
    return SWEEP_BATCH_WITH_EVENTS if settings.events else SWEEP_BATCH_WITHOUT_EVENTS


def signing_of(settings: Settings) -> Signing | None:
    """The message signing configured, if any (all three settings, or none)."""
    parts = (
        settings.signing_key_file,
        settings.signing_certificate_file,
        settings.signing_cert_store,
    )
    if not any(parts):
        return None
    key, certificate, store = parts
    if key is None or certificate is None or store is None:
        raise ValueError(
            "message signing needs SIGNING_KEY_FILE, SIGNING_CERTIFICATE_FILE and "
            "SIGNING_CERT_STORE together"
        )
    return Signing(key=key, certificate=certificate, cert_store=store)


def _from_files(environ: Mapping[str, str]) -> dict[str, Any]:
    """``CALLS_WORKER_X_FILE=/path`` sets X from the file's content (for mounted secrets),
    unless ``CALLS_WORKER_X`` itself is set."""
    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        variable = f"{ENV_PREFIX}{name.upper()}"
        path = environ.get(f"{variable}_FILE")
        if path and variable not in environ:
            values[name] = Path(path).read_text().strip()
    return values


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings of this process, read from the environment on first use."""
    return Settings(**_from_files(os.environ))


def settings_table() -> str:
    """The settings as a Markdown table, for the README (a test keeps the two equal)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = "unset" if field.default is None else f"`{field.default}`"
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | {default} | {field.description} |")
    rows.append(
        f"\nEvery variable can instead be read from a file: `{ENV_PREFIX}X_FILE=/path` "
        "(for mounted secrets)."
    )
    return "\n".join(rows)
