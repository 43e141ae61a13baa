"""A message whose headers the database cannot store as they are (NUL, over-long values) is
kept once, escaped, and never loops: the worker goes on answering valid commands, without
pausing. Anyone who can publish can send one, before any signature check."""

from __future__ import annotations

import json
import time
from typing import Any
from uuid import uuid4

import pytest
from kombu import Connection

from calls_worker.client import CallsClient
from calls_worker.wire import DEAD_LETTERS_QUEUE, is_amqp
from tests.db_world import Db
from tests.e2e.conftest import Process, wait_until

pytestmark = pytest.mark.brokers("redis", "rabbitmq")

TIMEOUT = 60
LONG = 100_000


def publish(broker_url: str, queue: str, body: bytes, *, headers: dict[str, Any],
            content_type: str) -> None:  # fmt: skip
    """A message as any AMQP or Redis client could publish it (no Celery)."""
    with Connection(broker_url) as connection:
        channel: Any = connection.channel()
        if is_amqp(broker_url):
            channel.confirm_select()
        channel.basic_publish(
            channel.prepare_message(body, priority=0, content_type=content_type,
                                    content_encoding="utf-8", headers=headers,
                                    properties={"delivery_mode": 2}),
            exchange="", routing_key=queue,
        )  # fmt: skip
        channel.close()


def cases(mark: str, amqp: bool) -> dict[str, dict[str, Any]]:
    """Each header the consumer stores, with NUL and over-long; ``mark`` starts each id."""
    # AMQP's content type is a short string (255 bytes at most): as long as it can be.
    long_type = "application/" + "z" * (200 if amqp else LONG)
    return {
        "NUL in the task": {"task": "calls.\x00create", "id": f"{mark}-task-nul"},
        "over-long task": {"task": "calls." + "t" * LONG, "id": f"{mark}-task-long"},
        "NUL in the id": {"task": "calls.create", "id": f"{mark}-id-nul-\x00"},
        "over-long id": {"task": "calls.create", "id": f"{mark}-id-long-" + "i" * LONG},
        "NUL in the content type": {"task": "calls.create", "id": f"{mark}-type-nul",
                                    "content_type": "application/\x00json"},
        "over-long content type": {"task": "calls.create", "id": f"{mark}-type-long",
                                   "content_type": long_type},
    }  # fmt: skip


def kept_count(db: Db, mark: str) -> dict[str, int]:
    rows = db.sql("SELECT command_id FROM worker_rejected_commands WHERE command_id LIKE :m",
                  m=f"{mark}-%").scalars().all()  # fmt: skip
    counts: dict[str, int] = {}
    for command_id in rows:
        key = "-".join(command_id.split("-")[5:7])  # task-nul, id-long, ...
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_unstorable_headers_are_kept_escaped_once_and_commands_go_on(
    db: Db, worker: Process, client: CallsClient, broker_url: str
) -> None:
    mark = str(uuid4())
    sent = cases(mark, is_amqp(broker_url))
    organization = db.organization(3)
    person = {"personUuid": str(db.person(organization)), "organizationUuid": str(organization)}
    log_before = len(worker.output())
    for case in sent.values():
        headers = {k: v for k, v in case.items() if k != "content_type"}
        publish(broker_url, "calls.commands", json.dumps([[], {"command": person}, {}]).encode(),
                headers=headers, content_type=case.get("content_type", "application/json"))
        assert client.send("create", person).outcome(TIMEOUT)["ok"] is True
    expected = {"task-nul", "task-long", "id-nul", "id-long", "type-nul", "type-long"}
    wait_until(lambda: set(kept_count(db, mark)) == expected, TIMEOUT, "each message kept")
    time.sleep(3)  # a message that looped would be kept again, or wait in a pause
    assert kept_count(db, mark) == dict.fromkeys(expected, 1)
    log = worker.output()[log_before:]
    assert "could not keep" not in log
    assert "takes no more commands" not in log  # never paused for a database that answers
    assert "dropped" not in log  # escaped, each could be kept
    # None of them was applied: the only calls of this person are the valid creates.
    calls = db.sql("SELECT count(*) FROM calls WHERE person_uuid = :p",
                   p=person["personUuid"]).scalar()  # fmt: skip
    assert calls == len(sent)
    kept = db.sql("SELECT command_id, task_name, reason FROM worker_rejected_commands"
                  " WHERE command_id LIKE :m", m=f"{mark}-%").all()  # fmt: skip
    for command_id, task_name, reason in kept:
        for text in (command_id, task_name, reason):
            assert "\x00" not in text
            assert len(text) <= 10_000
    by_id = {"-".join(command_id.split("-")[5:7]): (task_name, reason)
             for command_id, task_name, reason in kept}  # fmt: skip
    assert "\\x00" in by_id["task-nul"][0]
    assert "command id has" in by_id["id-long"][1]
    assert "NUL" in by_id["id-nul"][1]
    assert "not accepted" in by_id["type-nul"][1]


@pytest.mark.brokers("rabbitmq")
def test_a_dead_letter_with_unstorable_headers_is_kept_once_not_looped(
    db: Db, worker: Process, client: CallsClient, broker_url: str
) -> None:
    mark = str(uuid4())
    headers = {"task": "calls.\x00create", "id": f"{mark}-dead-nul-\x00" + "d" * LONG,
               "x-first-death-reason": "delivery_limit",
               "x-first-death-queue": "calls.\x00commands"}  # fmt: skip
    publish(broker_url, DEAD_LETTERS_QUEUE, b"\x00binary", headers=headers,
            content_type="application/json")
    wait_until(lambda: kept_count(db, mark) == {"dead-nul": 1}, TIMEOUT, "the dead letter kept")
    time.sleep(3)
    assert kept_count(db, mark) == {"dead-nul": 1}
    organization = db.organization(3)
    person = {"personUuid": str(db.person(organization)), "organizationUuid": str(organization)}
    assert client.send("create", person).outcome(TIMEOUT)["ok"] is True
