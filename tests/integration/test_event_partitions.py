"""The outbox partitioned by the hour (migration 0013): partitions made ahead, dropped whole
once every event in them was published longer ago than the owner's retention, never with
an event unpublished; the default partition pruned row by row; the events of an upgraded
database kept, numbered on, and dropped whole in their turn."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest
from sqlalchemy import Engine, text

from calls_worker.adapters.db.engine import build_engine
from calls_worker.adapters.db.events import (
    Pruned,
    prune_published,
    relay_batch,
    set_events_retention,
)
from calls_worker.adapters.db.migrate import downgrade, upgrade
from tests.db_world import Db

HOUR = timedelta(hours=1)


@pytest.fixture
def fresh(empty_database_url: str) -> Iterator[Engine]:
    engine = build_engine(empty_database_url, pool_size=2)
    try:
        yield engine
    finally:
        engine.dispose()


def this_hour() -> datetime:
    return datetime.now(UTC).replace(minute=0, second=0, microsecond=0)


def partitions(db: Db) -> list[str]:
    return list(db.sql(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'worker_call_events'::regclass ORDER BY 1").scalars())  # fmt: skip


def event(db: Db, recorded: datetime, published: datetime | None, call: str | None = None) -> int:
    """An event row as the outbox holds one; its ``seq``."""
    seq: int = db.sql(
        "INSERT INTO worker_call_events (event_id, kind, occurred_at, call_uuid,"
        " organization_uuid, call, recorded_at, published_at) VALUES (:id, 'call.created',"
        " :at, :call, :org, '{}', :at, :published) RETURNING seq",
        id=uuid4(), at=recorded, call=call or uuid4(), org=uuid4(), published=published,
    ).scalar()  # fmt: skip
    return seq


def hour_partition(db: Db, start: datetime) -> str:
    """A partition for an hour behind us, as the prune made it when that hour was ahead."""
    name = f"worker_call_events_{start:%Y%m%d%H}"
    low, high = start.isoformat(), (start + HOUR).isoformat()
    db.sql(f"CREATE TABLE {name} PARTITION OF worker_call_events"
           f" FOR VALUES FROM ('{low}') TO ('{high}')")  # fmt: skip
    return name


def test_the_coming_hours_are_made_ahead_and_an_old_hour_is_dropped_whole(fresh: Engine) -> None:
    upgrade(fresh)
    db = Db(fresh)
    now = this_hour()
    made = partitions(db)
    assert f"worker_call_events_{now:%Y%m%d%H}" in made
    assert f"worker_call_events_{now + 6 * HOUR:%Y%m%d%H}" in made
    assert "worker_call_events_default" in made
    set_events_retention(fresh, HOUR)

    done = hour_partition(db, now - 3 * HOUR)  # all published 2 h ago and more: dropped
    unpublished = hour_partition(db, now - 4 * HOUR)  # one left to publish: kept
    late = hour_partition(db, now - 5 * HOUR)  # one published a minute ago: kept
    for _ in range(3):
        event(db, now - 3 * HOUR + timedelta(minutes=5), now - 2 * HOUR)
    event(db, now - 4 * HOUR, now - 3 * HOUR)
    event(db, now - 4 * HOUR, None)
    event(db, now - 5 * HOUR, now - 4 * HOUR)
    event(db, now - 5 * HOUR, datetime.now(UTC) - timedelta(minutes=1))
    db.sql(f"ANALYZE {done}")

    pruned = prune_published(fresh)
    assert (pruned.dropped, pruned.held, pruned.deleted, pruned.busy) == (1, 2, 0, 0)
    assert pruned.dropped_rows_estimate == 3
    left = partitions(db)
    assert done not in left
    assert {unpublished, late} <= set(left)
    assert db.sql("SELECT count(*) FROM worker_call_events").scalar() == 4
    assert prune_published(fresh).created == 0  # made already


def test_while_the_prune_reads_the_old_hours_commands_write_their_events_unhindered(
    fresh: Engine, empty_database_url: str
) -> None:
    """Making a partition and dropping one each take the whole table's ACCESS EXCLUSIVE
    lock until the commit: every command writing an event waits while it is held. So the
    prune makes and drops last, after what it reads. Here its read of an old hour is held
    up (a lock on that partition), in a call that also makes an hour ahead: meanwhile an
    event is written at once. (Made first, as it was, the hour ahead held the table.)"""
    upgrade(fresh)
    db = Db(fresh)
    now = this_hour()
    set_events_retention(fresh, HOUR)
    old = hour_partition(db, now - 3 * HOUR)
    event(db, now - 3 * HOUR, now - 2 * HOUR)
    db.sql(f"DROP TABLE worker_call_events_{now + 6 * HOUR:%Y%m%d%H}")  # made again by it
    writer = build_engine(empty_database_url, pool_size=1)
    done: list[Pruned] = []
    try:
        with fresh.connect() as holder:
            holder.execute(text(f"LOCK TABLE {old} IN ACCESS EXCLUSIVE MODE"))
            pruning = threading.Thread(target=lambda: done.append(prune_published(writer)))
            pruning.start()
            deadline = time.monotonic() + 10
            while not db.sql(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE '%calls_worker_prune_call_events%'").scalar():  # fmt: skip
                assert time.monotonic() < deadline, "the prune never waited for the old hour"
                time.sleep(0.01)
            with fresh.begin() as command:  # the prune's lock_timeout is 2 s: within that
                command.execute(text("SET LOCAL lock_timeout = '500ms'"))
                command.execute(text(
                    "INSERT INTO worker_call_events (event_id, kind, occurred_at, call_uuid,"
                    " organization_uuid, call) VALUES (gen_random_uuid(), 'call.created',"
                    " now(), gen_random_uuid(), gen_random_uuid(), '{}')"))  # fmt: skip
            assert not done, "the prune did not wait for the old hour"
            holder.rollback()
        pruning.join(10)
    finally:
        writer.dispose()
    assert [(p.created, p.dropped) for p in done] == [(1, 1)]
    assert old not in partitions(db)


def test_what_the_default_partition_caught_is_deleted_row_by_row(fresh: Engine) -> None:
    upgrade(fresh)
    db = Db(fresh)
    set_events_retention(fresh, HOUR)
    old = this_hour() - 10 * HOUR  # no hourly partition there: the default one takes it
    event(db, old, old + HOUR)
    event(db, old, None)  # unpublished: stays
    event(db, old, datetime.now(UTC))  # published just now: stays
    assert db.sql("SELECT count(*) FROM worker_call_events_default").scalar() == 3
    pruned = prune_published(fresh)
    assert (pruned.deleted, pruned.dropped) == (1, 0)
    assert db.sql("SELECT count(*) FROM worker_call_events_default").scalar() == 2


def test_an_upgrade_keeps_the_events_numbers_them_on_and_drops_them_whole_later(
    fresh: Engine,
) -> None:
    upgrade(fresh, "0012")
    db = Db(fresh)
    call = str(uuid4())
    before = [event(db, datetime.now(UTC), None, call) for _ in range(3)]
    db.sql("INSERT INTO worker_call_events (event_id, kind, occurred_at, call_uuid,"
           " organization_uuid, call) VALUES (gen_random_uuid(), 'call.created', now(),"
           " gen_random_uuid(), gen_random_uuid(), '{}')")  # a number taken, then deleted
    db.sql("DELETE FROM worker_call_events WHERE call_uuid <> :c", c=call)
    upgrade(fresh)
    assert "worker_call_events_before_0013" in partitions(db)
    after = event(db, datetime.now(UTC), None, call)  # in it too: it runs to the next hour
    assert after > max(before) + 1  # on from the identity's last number, never reused
    published: list[int] = []
    relay_batch(fresh, 10, lambda events: published.extend(e["sequence"] for e in events))
    assert published == [*before, after]  # the call's order, across the two
    # Past the retention, the events from before the upgrade go whole too.
    set_events_retention(fresh, timedelta(0))
    db.sql("ALTER TABLE worker_call_events DETACH PARTITION worker_call_events_before_0013")
    db.sql("UPDATE worker_call_events_before_0013 SET recorded_at = now() - interval '3 hours',"
           " published_at = now() - interval '2 hours'")  # fmt: skip
    db.sql("ALTER TABLE worker_call_events ATTACH PARTITION worker_call_events_before_0013"
           f" FOR VALUES FROM (MINVALUE) TO ('{(this_hour() - HOUR).isoformat()}')")  # older
    assert prune_published(fresh).dropped == 1
    assert "worker_call_events_before_0013" not in partitions(db)
    kept = event(db, datetime.now(UTC), None)
    downgrade(fresh, "0012")  # and back: the events kept, numbered on
    assert list(db.sql("SELECT seq FROM worker_call_events").scalars()) == [kept]
    assert event(db, datetime.now(UTC), None) > kept
