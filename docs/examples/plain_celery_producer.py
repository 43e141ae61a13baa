"""A Celery producer that is not calls_worker's client, sending to a worker on RabbitMQ.

Celery declares the queue it publishes to; declared as Celery's default (a classic queue)
it meets the worker's quorum queue and RabbitMQ closes the channel with
PRECONDITION_FAILED. So declare it exactly as the worker does (docs/wire-format.md,
"RabbitMQ"). Only Celery and kombu are needed.
"""

from celery import Celery
from kombu import Exchange, Queue

QUEUE_ARGUMENTS = {
    "x-queue-type": "quorum",
    "x-delivery-limit": 20,
    "x-dead-letter-exchange": "calls.dead-letters",
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
}


def producer(broker_url: str, result_backend_url: str) -> Celery:
    """``result_backend_url``: the worker's CALLS_WORKER_RESULT_BACKEND_URL (a Redis)."""
    app = Celery("my-producer", broker=broker_url, backend=result_backend_url)
    app.conf.update(
        task_queues=[
            Queue("calls.commands", Exchange("calls.commands", "topic", durable=True),
                  routing_key="calls.commands", durable=True, queue_arguments=QUEUE_ARGUMENTS),
        ],
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # Publisher confirms: send_task returns once RabbitMQ has the message.
        broker_transport_options={"confirm_publish": True},
    )
    return app


# app = producer("amqp://user:password@rabbitmq:5672//", "redis://redis:6379/0")
# result = app.send_task("calls.create", queue="calls.commands", task_id="my-command-id",
#                        kwargs={"command": {"personUuid": "...", "organizationUuid": "..."}},
#                        headers={"sentAt": datetime.now(UTC).isoformat()})  # for the figures
# result.get(timeout=10)   # {"ok": true, "call": {...}}
