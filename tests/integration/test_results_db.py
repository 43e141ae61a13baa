"""Outcomes kept for producers in PostgreSQL (adapters/results.py, migration 0009): Celery's own
result API on a real database."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any
from uuid import uuid4

from celery import Celery
from sqlalchemy import Engine

from calls_worker.adapters.db import journal
from calls_worker.wire import celery_config, close_app
from tests.db_world import Db

AMQP = "amqp://guest:guest@127.0.0.1:5672//"


def app_on(database_url: str, retention: int = 3600) -> Celery:
    app = Celery("results-test", set_as_current=False)
    app.conf.update(celery_config(AMQP, database_url, result_retention=retention))
    return app


def test_an_outcome_stored_is_read_back_by_another_producer_then_forgotten(
    database_url: str, db: Db
) -> None:
    worker, producer = app_on(database_url), app_on(database_url)
    try:
        command_id = str(uuid4())
        worker.backend.mark_as_done(command_id, {"ok": True, "call": {"uuid": "x"}})
        result = producer.AsyncResult(command_id)
        assert result.get(timeout=5, interval=0.01) == {"ok": True, "call": {"uuid": "x"}}
        stored = db.sql("SELECT value FROM worker_results").scalar()
        assert json.loads(stored)["status"] == "SUCCESS"  # JSON text, not a pickle
        result.forget()
        assert producer.AsyncResult(command_id).state == "PENDING"
        assert db.sql("SELECT count(*) FROM worker_results").scalar() == 0
    finally:
        close_app(worker)
        close_app(producer)


def test_a_batch_stores_every_outcome_in_one_statement_the_last_of_a_twice_sent_id(
    database_url: str, db: Db
) -> None:
    app = app_on(database_url)
    try:
        backend: Any = app.backend
        pairs = [(backend.get_key_for_task(f"c{n}"), json.dumps({"n": n})) for n in range(3)]
        pairs.append((backend.get_key_for_task("c1"), json.dumps({"n": "again"})))
        backend.set_many(pairs)  # one statement may not write a row twice: deduplicated
        keys = [backend.get_key_for_task(f"c{n}") for n in (0, 1, 2, 9)]
        assert [None if v is None else json.loads(v) for v in backend.mget(keys)] == [
            {"n": 0}, {"n": "again"}, {"n": 2}, None,
        ]  # fmt: skip
    finally:
        close_app(app)


def test_an_expired_outcome_is_gone_at_once_and_pruned_later(
    database_url: str, db: Db, engine: Engine
) -> None:
    app = app_on(database_url, retention=3600)
    try:
        app.backend.mark_as_done("old", {"ok": True})
        app.backend.mark_as_done("new", {"ok": True})
        db.sql("UPDATE worker_results SET expires_at = now() - interval '1 second'"
               " WHERE key = 'celery-task-meta-old'")  # fmt: skip
        assert app.AsyncResult("old").state == "PENDING"  # invisible once expired
        assert app.AsyncResult("new").state == "SUCCESS"
        assert journal.forget_expired_results(engine) == 1
        kept = db.sql("SELECT key, expires_at - now() FROM worker_results").one()
        assert kept[0] == "celery-task-meta-new"
        assert timedelta(minutes=59) < kept[1] <= timedelta(hours=1)  # the retention
    finally:
        close_app(app)
