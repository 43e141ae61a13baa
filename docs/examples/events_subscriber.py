"""A downstream system that receives call events: a plain Celery app (docs/wire-format.md,
"Call events"). It needs nothing of calls-worker, only Celery.

    SUBSCRIBER_BROKER_URL=redis://localhost:6379/0 SUBSCRIBER_QUEUE=crm.call-events \\
    SUBSCRIBER_DATABASE=events.sqlite3 \\
        celery -A docs.examples.events_subscriber worker --pool solo -n crm@%h

It binds a durable queue of its own (SUBSCRIBER_QUEUE) to the topic exchange calls.events
for every kind ("call.#"; "call.expired" would take only expiries), so that it receives
every event whatever other subscribers do. Events arrive at least once: it keeps each
``eventId`` once (a redelivered or republished event changes nothing), and a call's events
in ``sequence`` order (one arriving after a later one of its call is stale). ``--pool solo``
handles one message at a time, in the order of the queue.

A subscriber that stops only makes its own queue grow; give it a length limit (see
docs/wire-format.md) if it may stop for long.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

app = Celery("subscriber", broker=os.environ["SUBSCRIBER_BROKER_URL"])
QUEUE = os.environ.get("SUBSCRIBER_QUEUE", "crm.call-events")
app.conf.update(
    task_queues=[
        Queue(QUEUE, Exchange("calls.events", type="topic", durable=True), routing_key="call.#",
              durable=True)
    ],
    # Acknowledged once handled: an event the subscriber crashed on comes back.
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    accept_content=["json"],
)
DATABASE = os.environ.get("SUBSCRIBER_DATABASE", "events.sqlite3")


def _database() -> sqlite3.Connection:
    connection = sqlite3.connect(DATABASE)
    connection.executescript(
        "CREATE TABLE IF NOT EXISTS events (event_id TEXT PRIMARY KEY, sequence INTEGER,"
        " kind TEXT, call_uuid TEXT, body TEXT);"
        "CREATE TABLE IF NOT EXISTS deliveries (n INTEGER PRIMARY KEY, event_id TEXT);"
        "CREATE TABLE IF NOT EXISTS calls (call_uuid TEXT PRIMARY KEY, sequence INTEGER,"
        " status TEXT)"
    )
    return connection


_database().close()  # its tables, before the first event


@app.task(name="calls.events.call_changed")
def call_changed(event: dict[str, Any]) -> None:
    import json

    with _database() as db:  # one transaction
        db.execute("INSERT INTO deliveries (event_id) VALUES (?)", (event["eventId"],))
        new = db.execute(
            "INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?, ?)",
            (event["eventId"], event["sequence"], event["kind"], event["callUuid"],
             json.dumps(event)),
        ).rowcount  # fmt: skip
        if not new:
            return  # seen before: at least once means sometimes twice
        # The call as this system knows it: only a later event of the call changes it.
        db.execute(
            "INSERT INTO calls VALUES (?, ?, ?) ON CONFLICT (call_uuid) DO UPDATE"
            " SET sequence = excluded.sequence, status = excluded.status"
            " WHERE excluded.sequence > calls.sequence",
            (event["callUuid"], event["sequence"], event["call"]["status"]),
        )
