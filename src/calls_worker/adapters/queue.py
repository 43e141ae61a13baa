"""The broker seen from outside Celery: queue lengths for metrics and the status command."""

from __future__ import annotations

from calls_worker.wire import COMMANDS_QUEUE, SWEEPS_QUEUE


def queue_lengths(broker_url: str) -> dict[str, int]:
    """Messages waiting in each queue (Redis lists named after the queues)."""
    import redis

    connection = redis.Redis.from_url(broker_url, socket_timeout=5)
    try:
        return {queue: int(connection.llen(queue)) for queue in (COMMANDS_QUEUE, SWEEPS_QUEUE)}
    finally:
        connection.close()
