"""What a RabbitMQ broker changes in the configuration, and the pause of the commands queue
while the database is away (no server: a fake consumer and a fake database)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import pytest

from calls_worker.cli.servers import Servers
from calls_worker.config import Settings
from calls_worker.wire import (
    COMMANDS_QUEUE,
    POSTGRES_RESULTS,
    QUEUE_ARGUMENTS,
    SWEEPS_QUEUE,
    celery_config,
    result_backend,
)
from calls_worker.worker import outage
from calls_worker.worker.consumer import (
    already_settled,
    dead_letter_reason,
    expired_command,
)
from calls_worker.worker.outage import CommandsPause, DatabaseWatch

AMQP = "amqp://guest:guest@rabbit:5672//"
PG = "postgresql://app@db:5432/calls"


def test_rabbitmq_queues_are_quorum_queues_with_a_delivery_limit_and_confirms() -> None:
    config = celery_config(AMQP, PG)
    queues = {q.name: q for q in config["task_queues"]}
    assert set(queues) == {COMMANDS_QUEUE, SWEEPS_QUEUE}
    for name, queue in queues.items():
        assert queue.queue_arguments == QUEUE_ARGUMENTS
        assert queue.durable
        assert queue.exchange.name == name
        assert queue.exchange.type == "topic"  # a retry's countdown waits in RabbitMQ
    assert QUEUE_ARGUMENTS["x-queue-type"] == "quorum"
    assert QUEUE_ARGUMENTS["x-dead-letter-strategy"] == "at-least-once"
    assert QUEUE_ARGUMENTS["x-overflow"] == "reject-publish"  # what at-least-once needs
    assert config["broker_transport_options"] == {"confirm_publish": True}
    assert config["result_backend"] == f"{POSTGRES_RESULTS}+{PG}"


def test_redis_keeps_its_configuration() -> None:
    config = celery_config("redis://r:6379/0", "redis://r:6379/1")
    assert "task_queues" not in config
    assert config["broker_transport_options"] == {"visibility_timeout": 3600}
    assert config["result_backend"] == "redis://r:6379/1"


def test_where_outcomes_go() -> None:
    assert result_backend("redis://r/0", None) == "redis://r/0"
    assert result_backend(AMQP, "redis://r/1") == "redis://r/1"
    assert result_backend(AMQP, "postgres://app@db/calls") == (
        f"{POSTGRES_RESULTS}+postgres://app@db/calls"
    )
    with pytest.raises(ValueError, match="RabbitMQ broker, outcomes need a result backend"):
        result_backend(AMQP, None)
    # Control messages need no result backend.
    assert celery_config(AMQP)["result_backend"] == "disabled"


def test_with_rabbitmq_and_nothing_else_outcomes_go_to_the_database(tmp_path: Any) -> None:
    servers = Servers(Settings(database_url=PG, broker_url=AMQP, data_dir=tmp_path))
    assert servers.result_backend_url(start=False) == PG
    redis = Servers(Settings(database_url=PG, broker_url="redis://r/0", data_dir=tmp_path))
    assert redis.result_backend_url(start=False) == "redis://r/0"


def test_why_rabbitmq_dead_lettered_a_message() -> None:
    limit = dead_letter_reason({"x-first-death-reason": "delivery_limit",
                                "x-first-death-queue": "calls.commands"})  # fmt: skip
    assert "from calls.commands: delivered more than 20 times" in limit
    expired = dead_letter_reason({"x-first-death-reason": "expired",
                                  "x-first-death-queue": "calls.commands"})  # fmt: skip
    assert "from calls.commands: expired there before a worker took it" in expired


@pytest.mark.parametrize(
    ("reason", "queue", "settled"),
    [
        ("rejected", "calls.commands", True),  # a worker rejects only what it has kept
        ("rejected", "calls.sweeps", True),
        ("expired", "calls.sweeps", True),  # a superseded sweep
        ("expired", "calls.commands", False),  # a command sent with expires: kept
        ("expired", None, False),
        ("delivery_limit", "calls.commands", False),
        ("maxlen", "calls.commands", False),
        (None, None, False),
    ],
)
def test_which_dead_letters_need_no_keeping(
    reason: str | None, queue: str | None, settled: bool
) -> None:
    headers = {k: v for k, v in (("x-first-death-reason", reason),
                                 ("x-first-death-queue", queue)) if v is not None}  # fmt: skip
    assert already_settled(headers) is settled


NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("headers", "kept"),
    [
        ({"task": "calls.create", "expires": "2026-12-04T11:59:59+00:00"}, True),
        ({"task": "calls.cancel", "expires": "2026-12-04T11:59:59"}, True),  # naive: UTC
        ({"task": "calls.cancel", "expires": "2026-12-04T13:59:59+02:00"}, True),
        ({"task": "calls.create", "expires": "2026-12-04T12:00:01+00:00"}, False),
        ({"task": "calls.create", "expires": None}, False),
        ({"task": "calls.create"}, False),
        ({"task": "calls.create", "expires": "not a time"}, False),  # Celery refuses it
        ({"task": "calls.sweep", "expires": "2026-12-04T11:00:00+00:00"}, False),  # dropped
        ({"task": "calls.list", "expires": "2026-12-04T11:00:00+00:00"}, False),
        ("not a dict", False),
    ],
)
def test_a_command_past_its_expires_is_kept_unapplied(headers: Any, kept: bool) -> None:
    reason = expired_command(headers, NOW)
    assert (reason is not None) is kept
    if kept:
        assert reason is not None
        assert reason.startswith("expired: its expires (2026-12-04T")


class FakeTaskConsumer:
    def __init__(self) -> None:
        self.queues = {COMMANDS_QUEUE}

    def consuming_from(self, queue: str) -> bool:
        return queue in self.queues


class FakeConsumer:
    def __init__(self) -> None:
        self.task_consumer = FakeTaskConsumer()

    def cancel_task_queue(self, queue: str) -> None:
        self.task_consumer.queues.discard(queue)

    def add_task_queue(self, queue: str) -> None:
        self.task_consumer.queues.add(queue)


def test_the_commands_queue_pauses_while_the_database_is_away(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(outage, "PROBE_SECONDS", 0.01)
    answers = threading.Event()

    def database_answers() -> bool:
        if not answers.is_set():
            raise OSError("connection refused")
        return True

    watch, consumer = DatabaseWatch(), FakeConsumer()
    pause = CommandsPause(consumer, watch, COMMANDS_QUEUE, database_answers)
    pause.check()
    assert consumer.task_consumer.consuming_from(COMMANDS_QUEUE)  # nothing reported yet
    watch.report_away()  # a pool process found the database away
    pause.check()
    assert not consumer.task_consumer.consuming_from(COMMANDS_QUEUE)
    for _ in range(5):
        pause.check()  # still away: stays paused, whatever is reported meanwhile
        watch.report_away()
    assert not consumer.task_consumer.consuming_from(COMMANDS_QUEUE)
    answers.set()
    assert pause._answered.wait(5)
    pause.check()
    assert consumer.task_consumer.consuming_from(COMMANDS_QUEUE)
    assert pause.paused_since is None
    pause.check()  # an outage reported before the resume does not pause it again
    assert consumer.task_consumer.consuming_from(COMMANDS_QUEUE)


def test_a_worker_that_does_not_take_commands_is_not_paused() -> None:
    watch, consumer = DatabaseWatch(), FakeConsumer()
    consumer.task_consumer.queues.clear()  # a sweeps-only worker
    pause = CommandsPause(consumer, watch, COMMANDS_QUEUE, lambda: True)
    watch.report_away()
    pause.check()
    assert pause.paused_since is None
    assert not consumer.task_consumer.consuming_from(COMMANDS_QUEUE)
