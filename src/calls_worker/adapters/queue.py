"""The broker seen from outside Celery: queue lengths for metrics, the status command and
the tests; the worker's RabbitMQ queues deleted (a test's or a benchmark's leftovers)."""

from __future__ import annotations

import json
from contextlib import suppress
from typing import Any

from calls_worker.wire import (
    COMMANDS_QUEUE,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTERS_QUEUE,
    EVENTS_EXCHANGE,
    SWEEPS_QUEUE,
    is_amqp,
)

# Where kombu's Redis transport keeps the bindings of an exchange: a set of
# "routing key<SEP>pattern<SEP>queue" (kombu.transport.redis: keyprefix_queue, sep).
_REDIS_BINDINGS = "_kombu.binding.%s"
_REDIS_BINDING_SEP = "\x06\x16"


def memory(redis_url: str) -> tuple[int, int]:
    """(used, maximum) bytes of the Redis at ``redis_url``; maximum 0: none set."""
    import redis

    connection = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        info = connection.info("memory")
        return int(info["used_memory"]), int(info.get("maxmemory", 0))
    finally:
        connection.close()


def queue_lengths(broker_url: str) -> dict[str, int]:
    """Messages waiting in each queue: Redis lists named after the queues; on RabbitMQ the
    ready messages of each queue (and of the dead-letter queue), 0 for one not declared yet."""
    if is_amqp(broker_url):
        return _amqp_lengths(broker_url)
    import redis

    connection = redis.Redis.from_url(broker_url, socket_timeout=5)
    try:
        return {queue: int(connection.llen(queue)) for queue in (COMMANDS_QUEUE, SWEEPS_QUEUE)}
    finally:
        connection.close()


def oldest_command_sent_at(broker_url: str) -> float | None:
    """When the producer sent the command at the head of ``calls.commands`` (the next one a
    worker takes), from its sentAt header, as a Unix time; None when the queue is empty or
    its head has no readable header. Redis only: kombu's Redis transport pushes on the
    left and takes from the right, so the head is read without taking it. RabbitMQ cannot
    show a message without delivering it (and a quorum queue counts each delivery towards
    its delivery limit), so this raises NotImplementedError there."""
    if is_amqp(broker_url):
        raise NotImplementedError("RabbitMQ cannot show a queue's head without delivering it")
    import redis

    from calls_worker.wire import sent_at

    connection = redis.Redis.from_url(broker_url, socket_timeout=5)
    try:
        head = connection.lindex(COMMANDS_QUEUE, -1)
    finally:
        connection.close()
    if head is None:
        return None
    with suppress(ValueError, TypeError):
        return sent_at(json.loads(head).get("headers"))
    return None


def waiting(broker_url: str, queue: str) -> int:
    """Messages waiting in ``queue`` (on RabbitMQ the ready ones; 0 for one not declared)."""
    if is_amqp(broker_url):
        return _amqp_lengths(broker_url, (queue,))[queue]
    import redis

    connection = redis.Redis.from_url(broker_url, socket_timeout=5)
    try:
        return int(connection.llen(queue))
    finally:
        connection.close()


def forget_amqp_queues(broker_url: str, others: tuple[str, ...] = ()) -> None:
    """Delete the worker's RabbitMQ queues and exchanges, and ``others`` (queues with an
    exchange of their own name): what an earlier test or benchmark left. Never the worker's
    own business: its queues are declared, never deleted."""
    from kombu import Connection

    with Connection(broker_url, connect_timeout=3) as connection:
        connection.ensure_connection(max_retries=1)
        channel: Any = connection.channel()
        for queue in (COMMANDS_QUEUE, SWEEPS_QUEUE, DEAD_LETTERS_QUEUE, *others):
            channel.queue_delete(queue)
        for exchange in (COMMANDS_QUEUE, SWEEPS_QUEUE, DEAD_LETTER_EXCHANGE, *others):
            channel.exchange_delete(exchange)
        channel.close()


def event_queue_lengths(broker_url: str, named: list[str]) -> dict[str, int]:
    """Messages waiting in each subscriber queue of the call events: on Redis every queue
    bound to the calls.events exchange, found in kombu's bindings, and those ``named``; on
    RabbitMQ, which tells a client no bindings, those ``named`` that exist."""
    if is_amqp(broker_url):
        return _amqp_lengths(broker_url, named, missing=None)
    import redis

    connection = redis.Redis.from_url(broker_url, socket_timeout=5)
    try:
        bound = {
            (member.decode() if isinstance(member, bytes) else member).split(_REDIS_BINDING_SEP)[-1]
            for member in connection.smembers(_REDIS_BINDINGS % EVENTS_EXCHANGE)
        }
        return {queue: int(connection.llen(queue)) for queue in sorted(bound | set(named))}
    finally:
        connection.close()


def _amqp_lengths(
    broker_url: str,
    queues: list[str] | tuple[str, ...] = (COMMANDS_QUEUE, SWEEPS_QUEUE, DEAD_LETTERS_QUEUE),
    missing: int | None = 0,
) -> dict[str, int]:
    """Ready messages of each of ``queues``; one not declared counts ``missing`` (None:
    left out)."""
    from amqp.exceptions import NotFound
    from kombu import Connection

    lengths: dict[str, int] = {}
    with Connection(broker_url, connect_timeout=5) as connection:
        connection.ensure_connection(max_retries=1)
        for queue in queues:
            channel: Any = connection.channel()
            try:
                _name, ready, _consumers = channel.queue_declare(queue, passive=True)
                lengths[queue] = int(ready)
            except NotFound:  # closes the channel: each queue asks on a channel of its own
                if missing is not None:
                    lengths[queue] = missing
            finally:
                with suppress(Exception):  # a channel the broker closed already
                    channel.close()
    return lengths
