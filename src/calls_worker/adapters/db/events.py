"""The outbox of call events (``worker_call_events``, migrations 0010 and 0013: partitioned by
the hour): what the relay publishes, what operators tail, and what is pruned.

Writers are the unit of work (``SqlCallEvents``, below) and the sweep's statement
(sweep.py); this module also reads and settles what they wrote.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from psycopg.types.json import Json
from sqlalchemy import Engine, text

from calls_worker.domain.events import CallEvent, event_json
from calls_worker.domain.outcome import call_json
from calls_worker.service.unit_of_work import CallEvents

from .transaction import OnTransaction

# Held (for its transaction) by the relay that publishes a lane: one relay a lane at a
# time, across every process of the deployment (the migration and the sweep hold ...001
# and ...002). Lane n takes RELAY_LOCK + n: lane 0's is the lock of the single relay of
# the releases before lanes.
RELAY_LOCK = 7_304_118_003
MAX_LANES = 64

_COLUMNS = (
    "seq, event_id, kind, occurred_at, call_uuid, organization_uuid,"
    " owning_organization_uuid, call, expiry"
)
# The partial index on unpublished events serves this, however large the table grows.
_PENDING = (
    f"SELECT {_COLUMNS}, recorded_at FROM worker_call_events WHERE published_at IS NULL"
    "{lane} ORDER BY seq LIMIT :limit"
)
# A call's lane: the first 32 bits of its uuid, modulo the lanes (lane_of, in Python).
_LANE = (" AND CAST(CAST('x' || substr(CAST(call_uuid AS text), 1, 8) AS bit(32)) AS bigint)"
         " % :lanes = :lane")
_PENDING_ALL, _PENDING_LANE = text(_PENDING.format(lane="")), text(_PENDING.format(lane=_LANE))
# A lost mark only publishes the events again (at least once): no need to wait for the disk.
# By the partition key too, so that only the partitions of those events are read.
_MARK = text(
    "UPDATE worker_call_events SET published_at = clock_timestamp()"
    " WHERE seq = ANY(:seqs) AND recorded_at = ANY(:recorded)"
)


def as_event(row: Any) -> dict[str, Any]:
    """A row of the outbox as the event it publishes."""
    return event_json(
        seq=row.seq, event_id=row.event_id, kind=row.kind, occurred_at=row.occurred_at,
        call_uuid=row.call_uuid, organization_uuid=row.organization_uuid,
        owning_organization_uuid=row.owning_organization_uuid, call=row.call,
        expiry=row.expiry,
    )  # fmt: skip


def lane_of(call_uuid: UUID | str, lanes: int) -> int:
    """The lane whose relay publishes the events of ``call_uuid``, of ``lanes``."""
    return int(str(call_uuid)[:8], 16) % lanes


def relay_batch(
    engine: Engine, limit: int, publish: Callable[[list[dict[str, Any]]], None], *,
    lane: int = 0, lanes: int = 1,
) -> int | None:  # fmt: skip
    """Publish up to ``limit`` unpublished events of lane ``lane`` of ``lanes`` (the calls
    lane_of gives it), oldest first, then mark them published.

    One transaction holds the lane's advisory lock from before it reads the events until
    their marks are committed, so no two relays ever publish the same event at once, and
    a relay that comes next reads only what is still unpublished. ``publish`` must return
    only once the broker has accepted every event (and raise otherwise): an event is
    marked after that, in the same transaction. A relay that dies between the two leaves
    the events unmarked, and the next one publishes them again (at least once, never
    skipped). How many were published; None when another relay holds the lane's lock.

    A call's events keep their order whatever the lanes: all of them are in one lane, and
    a round reads its lane's unpublished events in ``seq`` order, so an event goes out
    only after every earlier event of its call, in the same round or marked published
    before it. (Relays configured with different numbers of lanes would read some calls
    in two lanes at once: those events go out twice, in order, never out of it.)
    """
    with engine.connect() as connection:
        connection.execute(text("SET LOCAL synchronous_commit = off"))
        if not connection.execute(
            text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": RELAY_LOCK + lane}
        ).scalar():
            connection.rollback()
            return None
        if lanes > 1:
            rows = connection.execute(_PENDING_LANE, {"limit": limit, "lane": lane,
                                                      "lanes": lanes}).all()  # fmt: skip
        else:
            rows = connection.execute(_PENDING_ALL, {"limit": limit}).all()
        if rows:
            publish([as_event(row) for row in rows])
            connection.execute(_MARK, {"seqs": [row.seq for row in rows],
                                       "recorded": sorted({row.recorded_at for row in rows})})
        connection.commit()
        return len(rows)


@dataclass(frozen=True)
class KeptEvent:
    event: dict[str, Any]
    recorded_at: datetime
    published_at: datetime | None


def tail(
    engine: Engine, *, call_uuid: UUID | None = None, after: int | None = None,
    limit: int = 20,
) -> list[KeptEvent]:  # fmt: skip
    """The last ``limit`` events kept (of ``call_uuid``), oldest first; or, with ``after``,
    the first ``limit`` events whose ``seq`` is above it."""
    where = ["TRUE"]
    params: dict[str, Any] = {"limit": limit}
    if call_uuid is not None:
        where.append("call_uuid = :call")
        params["call"] = call_uuid
    if after is not None:
        where.append("seq > :after")
        params["after"] = after
    order = "ASC" if after is not None else "DESC"
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                f"SELECT {_COLUMNS}, recorded_at, published_at FROM worker_call_events"
                f" WHERE {' AND '.join(where)} ORDER BY seq {order} LIMIT :limit"
            ),
            params,
        ).all()
    kept = [KeptEvent(as_event(row), row.recorded_at, row.published_at) for row in rows]
    return kept if after is not None else kept[::-1]


def kept_events(engine: Engine, *, call_uuid: UUID | None = None) -> list[dict[str, Any]]:
    """Every event kept (of ``call_uuid``), in ``seq`` order (numbers start at 1)."""
    everything = tail(engine, call_uuid=call_uuid, after=0, limit=2**62)
    return [kept.event for kept in everything]


@dataclass(frozen=True)
class Backlog:
    unpublished: int
    oldest_age_seconds: float
    """How long the oldest unpublished event has waited since it was written (0: none)."""


def backlog(engine: Engine) -> Backlog:
    with engine.connect() as connection:
        count, age = connection.execute(
            text(
                "SELECT (SELECT count(*) FROM worker_call_events WHERE published_at IS NULL),"
                " coalesce(extract(epoch FROM now() - (SELECT recorded_at FROM"
                " worker_call_events WHERE published_at IS NULL ORDER BY seq LIMIT 1)), 0)"
            )
        ).one()
    return Backlog(int(count), max(0.0, float(age)))


@dataclass(frozen=True)
class Pruned:
    """What one prune of the outbox did (``calls_worker_prune_call_events``, 0013)."""

    created: int
    """Hourly partitions made ahead."""
    dropped: int
    """Partitions dropped whole: every event in them published longer ago than the
    retention."""
    dropped_rows_estimate: int
    """Their rows, as the statistics count them (not counted one by one)."""
    held: int
    """Partitions past the retention kept for an event unpublished or published since."""
    busy: int
    """Partitions not created or dropped because writes held the table for 2 s."""
    deleted: int
    """Events deleted one by one from the default partition (none in a normal run)."""


def prune_published(engine: Engine) -> Pruned:
    """Make the coming hours' partitions, drop the old ones whose events were all published
    longer ago than the retention the owner set (set_events_retention), and delete such
    events from the default partition. Unpublished events are never pruned."""
    with engine.begin() as connection:
        report = connection.execute(text("SELECT calls_worker_prune_call_events()")).scalar_one()
    return Pruned(created=report["created"], dropped=report["dropped"],
                  dropped_rows_estimate=report["droppedRowsEstimate"], held=report["held"],
                  busy=report["busy"], deleted=report["deleted"])  # fmt: skip


def set_events_retention(engine: Engine, keep: timedelta) -> None:
    """Keep published events for ``keep`` at least. Only the owner of the worker's objects
    may (``calls-worker migrate`` does, from CALLS_WORKER_EVENTS_RETENTION_HOURS): the
    worker's role reads it and cannot change it (0013)."""
    with engine.begin() as connection:
        connection.execute(text("UPDATE worker_call_events_retention SET keep = :keep"),
                           {"keep": keep})  # fmt: skip


# A command's event (domain/events.py), written after its change. The owning organization
# is read with the call a command changes; a new call's is looked up here, in the same
# message as the insert (no round trip of its own). An expiry by command carries the
# maximum of the owning organization, read the same way.
_INSERT_EVENT = (
    "INSERT INTO worker_call_events (event_id, kind, occurred_at, call_uuid,"
    " organization_uuid, owning_organization_uuid, call, expiry) VALUES (%(id)s, %(kind)s,"
    " %(at)s, %(call_uuid)s, %(organization)s, {owner}, %(call)s, {expiry})"
)
_OWNER = "%(owner)s"
_OWNER_OF_PERSON = "(SELECT owning_organization_uuid FROM persons WHERE uuid = %(person)s)"
_EXPIRY_BY_COMMAND = (
    "json_build_object('by', 'command', 'attemptCount', %(attempts)s::int, 'maxCallAttempts',"
    " (SELECT max_call_attempts FROM organizations WHERE uuid = {owner}))"
)
_INSERT_EVENTS = {
    (known_owner, expiry): _INSERT_EVENT.format(
        owner=(owner := _OWNER if known_owner else _OWNER_OF_PERSON),
        expiry=_EXPIRY_BY_COMMAND.format(owner=owner) if expiry else "NULL",
    )
    for known_owner in (True, False)
    for expiry in (True, False)
}


class SqlCallEvents(OnTransaction, CallEvents):
    def add(self, event: CallEvent) -> None:
        call = event.call
        owner = call.owning_organization_uuid  # None for a new call: looked up in SQL
        self._transaction.write(
            _INSERT_EVENTS[(owner is not None, event.expired_by_command)],
            {"id": event.event_id, "kind": event.kind, "at": event.occurred_at,
             "call_uuid": call.uuid, "organization": call.organization_uuid, "owner": owner,
             "person": call.person_uuid, "call": Json(call_json(call)),
             "attempts": call.attempt_count},
        )  # fmt: skip


