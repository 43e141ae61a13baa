"""The sweep's statements: a batch of due calls expired in one statement, and the
``call.expired`` events of the calls it expired in the next; ``exhausted``, the SQL twin
of ``domain.policy.is_exhausted``."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Integer,
    and_,
    delete,
    func,
    insert,
    literal,
    literal_column,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import UUID as PG_UUID

from calls_worker.domain.model import CallStatus

from .call_json import call_json_sql, key
from .tables import call_events, calls, due_calls, organizations, persons


def exhausted() -> ColumnElement[bool]:
    """``policy.is_exhausted`` in SQL, over ``calls`` joined to the person's owning organization.

    Served by the partial index ``calls_requested_managed_idx``.
    """
    return and_(
        calls.c.status == CallStatus.REQUESTED.value,
        calls.c.external_metadata.is_(None),
        organizations.c.max_call_attempts.is_not(None),
        calls.c.attempt_count >= organizations.c.max_call_attempts,
    )


def calls_with_owning_organization() -> Any:
    """``calls`` joined to the organization that owns the called person (it sets the limit)."""
    return calls.join(persons, persons.c.uuid == calls.c.person_uuid).join(
        organizations, organizations.c.uuid == persons.c.owning_organization_uuid
    )


def swept_event(now: datetime, expired: Any, owner: Any, max_call_attempts: Any) -> list[Any]:
    """The columns (EVENT_COLUMNS) of the ``call.expired`` event the sweep writes for a row
    of ``expired`` (calls as the UPDATE left them, RETURNING their columns), whose owning
    organization and its maximum are ``owner`` and ``max_call_attempts``."""
    return [
        func.gen_random_uuid(),
        literal_column("'call.expired'"),
        literal(now, call_events.c.occurred_at.type),
        expired.c.uuid,
        expired.c.organization_uuid,
        owner,
        call_json_sql(expired),
        func.json_build_object(
            key("by"), key("sweep"),
            key("attemptCount"), expired.c.attempt_count,
            key("maxCallAttempts"), max_call_attempts,
        ),
    ]  # fmt: skip


EVENT_COLUMNS = [
    "event_id", "kind", "occurred_at", "call_uuid", "organization_uuid",
    "owning_organization_uuid", "call", "expiry",
]  # fmt: skip


def expire_batch(now: datetime, limit: int, *, events: bool = True) -> Any:
    """One sweep batch, in one statement (one round trip):

    - take up to ``limit`` rows of worker_due_calls, oldest first, that no other sweep holds;
    - of their calls, lock those no command holds, checking ``exhausted()`` again on the
      calls themselves, so that only a call exhausted now is expired;
    - expire them and remove their rows from worker_due_calls, with the rows of calls
      that had ended already (a stale entry must not hold a place in every batch);
    - with ``events``, return what each expired call's ``call.expired`` event says of its
      expiry (its owner and maximum), for the next statement to write the events with
      (swept_events).

    The sweep keeps worker_due_calls itself here, so it asks the due-tracking trigger to
    stand aside for its transaction (``calls_worker.sweeping``), sparing a call of the
    trigger for every row it expires.
    """
    settings = [func.set_config("calls_worker.sweeping", "on", True).label("on")]
    if not events:
        # A batch lost in a crash before it reached the disk is redone by the next sweep
        # (the calls are still due), so it need not wait for the WAL flush. Not with
        # events: the relay could publish the event of a change the crash then took back.
        settings.append(func.set_config("synchronous_commit", "off", True).label("async"))
    stand_aside = select(*settings).cte("stand_aside")
    batch = (
        select(due_calls.c.call_uuid)
        .select_from(due_calls.join(stand_aside, true()))
        .order_by(due_calls.c.due_since)
        .limit(limit)
        .with_for_update(of=due_calls, skip_locked=True)
        .cte("batch")
    )
    # "= ANY(ARRAY(...))" rather than joins: it makes the planner fetch the few calls by
    # primary key instead of hashing every requested call for each batch.
    taken = (
        select(
            calls.c.uuid,
            organizations.c.uuid.label("owner"),
            organizations.c.max_call_attempts,
            exhausted().label("due"),
            and_(
                calls.c.status == CallStatus.REQUESTED.value, calls.c.external_metadata.is_(None)
            ).label("open"),
        )
        .select_from(calls_with_owning_organization())
        .where(calls.c.uuid == func.any(func.array(select(batch.c.call_uuid).scalar_subquery())))
        .with_for_update(of=calls, skip_locked=True)
        .cte("taken")
    )
    expired = (
        update(calls)
        .where(
            calls.c.uuid
            == func.any(func.array(select(taken.c.uuid).where(taken.c.due).scalar_subquery()))
        )
        .values(status=CallStatus.EXPIRED.value, expired_at=now, updated_at=now)
        .returning(calls.c.uuid)
        .cte("expired")
    )
    # A call that ended (or became external) cannot be due again whatever any organization
    # does, and this transaction holds its row: its entry is stale, whoever left it.
    cleared = select(taken.c.uuid).where(~taken.c.open).cte("cleared")
    removed = (
        delete(due_calls)
        .where(
            due_calls.c.call_uuid
            == func.any(
                func.array(
                    select(expired.c.uuid).union_all(select(cleared.c.uuid)).scalar_subquery()
                )
            )
        )
        .cte("removed")
    )
    by_owner = (
        select(taken.c.owner, func.count().label("expired"))
        .select_from(taken.join(expired, expired.c.uuid == taken.c.uuid))
        .group_by(taken.c.owner)
        .subquery("by_owner")
    )
    statement = select(
        select(func.count()).select_from(batch).scalar_subquery().label("examined"),
        select(func.count()).select_from(expired).scalar_subquery().label("expired"),
        select(func.count()).select_from(cleared).scalar_subquery().label("cleared"),
        select(func.json_object_agg(by_owner.c.owner, by_owner.c.expired))
        .scalar_subquery()
        .label("by_organization"),
        select(func.array_agg(expired.c.uuid)).scalar_subquery().label("expired_calls"),
    ).add_cte(removed)
    if events:
        # What each event's expiry says (the owner and its maximum the decision used); the
        # events themselves are written by the next statement (swept_events).
        statement = statement.add_columns(
            select(func.json_agg(func.json_build_array(
                taken.c.uuid, taken.c.owner, taken.c.max_call_attempts)))
            .select_from(taken.join(expired, expired.c.uuid == taken.c.uuid))
            .scalar_subquery().label("expiries")
        )  # fmt: skip
    return statement


def swept_events(now: datetime, expiries: list[list[Any]]) -> Any:
    """The ``call.expired`` events of the calls a sweep batch just expired, in a statement
    of their own: its snapshot sees every attempt committed before it, and the calls are
    this transaction's (locked). Written in the expiring statement itself, an event listed
    the attempts of that statement's snapshot: an attempt committed after it began, and
    before it reached (and locked) the call, was counted (attemptCount, read from the row
    it locked) but not listed (the soak found such an event)."""
    given = func.unnest(
        literal([UUID(str(e[0])) for e in expiries], ARRAY(PG_UUID(as_uuid=True))),
        literal([None if e[1] is None else UUID(str(e[1])) for e in expiries],
                ARRAY(PG_UUID(as_uuid=True))),
        literal([e[2] for e in expiries], ARRAY(Integer)),
    ).table_valued("uuid", "owner", "max_call_attempts").render_derived(name="given")  # fmt: skip
    return insert(call_events).from_select(
        EVENT_COLUMNS,
        select(*swept_event(now, calls, given.c.owner, given.c.max_call_attempts))
        .select_from(calls.join(given, given.c.uuid == calls.c.uuid))
        .order_by(calls.c.uuid),
    )


