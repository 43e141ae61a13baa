"""The broker seen from outside Celery: queue lengths for metrics and the status command."""

from __future__ import annotations

from calls_worker.wire import COMMANDS_QUEUE, SWEEPS_QUEUE


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
    """Messages waiting in each queue (Redis lists named after the queues)."""
    import redis

    connection = redis.Redis.from_url(broker_url, socket_timeout=5)
    try:
        return {queue: int(connection.llen(queue)) for queue in (COMMANDS_QUEUE, SWEEPS_QUEUE)}
    finally:
        connection.close()
