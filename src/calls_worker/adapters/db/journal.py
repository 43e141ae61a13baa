"""What the worker records about itself: rejected commands (to look at and replay) and
sweep runs (for operators and the status command)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Engine, and_, func, select, text, update

from calls_worker.domain.errors import FieldError

from .sweep import calls_with_owning_organization, exhausted
from .tables import (
    calls,
    due_calls,
    organizations,
    processed_commands,
    rejected_commands,
    sweep_runs,
)

# Any constant will do: one sweep at a time across every worker and beat.
SWEEP_LOCK = 7_304_118_002


@dataclass(frozen=True)
class RejectedCommand:
    id: int
    received_at: datetime
    task_name: str
    command_id: str | None
    raw_body: str
    reason: str
    details: list[dict[str, str]]
    replayed_at: datetime | None
    dismissed_at: datetime | None = None
    replayed_as: str | None = None
    """The command id a replay sent it under (its own, or a replay id)."""


def record_rejected(
    engine: Engine,
    *,
    task_name: str,
    command_id: str | None,
    raw_body: str,
    reason: str,
    details: Sequence[FieldError] = (),
    once: bool = False,
) -> int:
    """Keep a command that could not be handled, with why; its id.

    Whatever a sender put in them, the values are made storable first (storable_text,
    body_text): a database that answers never refuses them for what they hold.

    ``once``: if the same command (id, body and reason) is kept already and waits for an
    operator, that record's id, and nothing new (a redelivery of an invalid command: it is
    invalid the same way each time).
    """
    with engine.begin() as connection:
        if once and command_id is not None:
            kept = connection.execute(
                select(rejected_commands.c.id).where(
                    rejected_commands.c.command_id == storable_text(command_id, NAME_LIMIT),
                    rejected_commands.c.raw_body == body_text(raw_body),
                    rejected_commands.c.reason == storable_text(reason, REASON_LIMIT),
                    _waiting(),
                ).order_by(rejected_commands.c.id).limit(1)
            ).scalar()
            if kept is not None:
                return int(kept)
        rejected_id: int = connection.execute(
            rejected_commands.insert()
            .values(
                received_at=func.now(),
                task_name=storable_text(task_name, NAME_LIMIT),
                command_id=None if command_id is None else storable_text(command_id, NAME_LIMIT),
                raw_body=body_text(raw_body),
                reason=storable_text(reason, REASON_LIMIT),
                details=[{"field": storable_text(d.field, REASON_LIMIT),
                          "reason": storable_text(d.reason, REASON_LIMIT)}
                         for d in details],
            )
            .returning(rejected_commands.c.id)
        ).scalar_one()
        return rejected_id


def _waiting() -> ColumnElement[bool]:
    """A rejected command neither replayed nor dismissed: it waits for an operator."""
    return and_(rejected_commands.c.replayed_at.is_(None),
                rejected_commands.c.dismissed_at.is_(None))  # fmt: skip


def list_rejected(
    engine: Engine,
    *,
    include_settled: bool = False,
    limit: int | None = 100,
    since: datetime | None = None,
    reason: str | None = None,
) -> list[RejectedCommand]:
    """The rejected commands waiting for an operator (with ``include_settled``, the replayed
    and dismissed ones too), oldest first; received at ``since`` or later, and whose reason
    contains ``reason`` (any case), when given."""
    query = select(rejected_commands).order_by(rejected_commands.c.id).limit(limit)
    if not include_settled:
        query = query.where(_waiting())
    if since is not None:
        query = query.where(rejected_commands.c.received_at >= since)
    if reason is not None:
        query = query.where(rejected_commands.c.reason.icontains(reason, autoescape=True))
    with engine.connect() as connection:
        return [RejectedCommand(**row._mapping) for row in connection.execute(query)]


def dismiss_rejected(engine: Engine, ids: Sequence[int]) -> list[int]:
    """Mark these rejected commands dismissed (an operator decided they need nothing more);
    the ids of those that were waiting, and now are not."""
    with engine.begin() as connection:
        return list(connection.execute(
            update(rejected_commands)
            .where(rejected_commands.c.id.in_(list(ids)), _waiting())
            .values(dismissed_at=func.now())
            .returning(rejected_commands.c.id)
        ).scalars())  # fmt: skip


def get_rejected(engine: Engine, rejected_id: int) -> RejectedCommand | None:
    with engine.connect() as connection:
        row = connection.execute(
            select(rejected_commands).where(rejected_commands.c.id == rejected_id)
        ).one_or_none()
    return None if row is None else RejectedCommand(**row._mapping)


def processed_outcome(engine: Engine, command_id: str) -> dict[str, Any] | None:
    """The outcome stored for ``command_id``, when, and the service account that sent it
    (None: not applied, or pruned)."""
    with engine.connect() as connection:
        row = connection.execute(
            select(processed_commands.c.outcome, processed_commands.c.processed_at,
                   processed_commands.c.service_account_uuid)
            .where(processed_commands.c.command_id == command_id)
        ).one_or_none()  # fmt: skip
    return None if row is None else {"outcome": row.outcome, "processedAt": row.processed_at,
                                     "serviceAccountUuid": row.service_account_uuid}  # fmt: skip


def mark_replayed(engine: Engine, rejected_id: int, command_id: str) -> None:
    """Record that the rejected command was sent again, under ``command_id``."""
    with engine.begin() as connection:
        connection.execute(
            update(rejected_commands)
            .where(rejected_commands.c.id == rejected_id)
            .values(replayed_at=func.now(), replayed_as=command_id)
        )


@dataclass(frozen=True)
class Rotation:
    """What a rotation of the outcome records did (migration 0008)."""

    swapped: bool
    """The previous outcomes were forgotten and their table is current now."""
    current_since: datetime
    kept_since: datetime | None
    """When the oldest table of outcomes kept became current (None: nothing older)."""
    keep: timedelta
    """The retention the rotation went by (the owner's)."""


def rotate_processed(engine: Engine) -> Rotation:
    """Forget the outcomes of the previous table when the current one has been current for
    the retention (``worker_processed_rotation.keep``, the owner's: set_processed_retention):
    TRUNCATE it (one transaction), then make it current (another); each outcome is thus kept
    the retention to twice that. No row is deleted one by one.

    Raises OperationalError (lock_not_available) when the commands in flight held the
    previous table for 2 s: nothing changed, and the next run tries again.
    """
    swapped = False
    for _ in range(2):  # emptied, then swapped
        with engine.begin() as connection:
            step = connection.execute(
                text("SELECT calls_worker_rotate_processed_commands()")
            ).scalar_one()
        swapped = step == "swapped"
        if step != "emptied":
            break
    with engine.connect() as connection:
        current_since, previous_since, keep = connection.execute(
            text("SELECT current_since, previous_since, keep FROM worker_processed_rotation")
        ).one()
    return Rotation(swapped=swapped, current_since=current_since, kept_since=previous_since,
                    keep=keep)  # fmt: skip


def set_processed_retention(engine: Engine, keep: timedelta) -> None:
    """Keep command outcomes for ``keep`` at least (to twice that) from the next rotation on.

    Only the owner of the worker's objects may (``calls-worker migrate`` does, from
    CALLS_WORKER_PROCESSED_RETENTION_HOURS): the worker's role reads it and cannot change it,
    so nothing holding the worker's credentials can make it forget outcomes early (0011).
    """
    with engine.begin() as connection:
        connection.execute(text("UPDATE worker_processed_rotation SET keep = :keep"),
                           {"keep": keep})  # fmt: skip


def forget_expired_results(engine: Engine) -> int:
    """Delete the outcomes kept for producers (worker_results, adapters/results.py) past their
    expiry; how many. Readers never see them once expired: this only frees the space."""
    with engine.begin() as connection:
        deleted = connection.execute(text("DELETE FROM worker_results WHERE expires_at <= now()"))
        return int(deleted.rowcount)


@contextmanager
def exclusive_sweep(engine: Engine) -> Iterator[bool]:
    """Whether this process may sweep now: True for one holder at a time, across processes.

    Does not wait: a second sweep (two beats, or a manual sweep during a scheduled one)
    gets False at once instead of queueing behind the first.
    """
    with engine.connect() as connection:
        locked = bool(
            connection.execute(
                text("SELECT pg_try_advisory_lock(:key)"), {"key": SWEEP_LOCK}
            ).scalar()
        )
        connection.commit()
        try:
            yield locked
        finally:
            if locked:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": SWEEP_LOCK})
                connection.commit()


def reconcile_due_calls(engine: Engine) -> tuple[int, int]:
    """Compare the due-calls record with the expiry rule and repair every difference;
    ``(missing, stale)``: calls due but not listed, and listed but not due.

    The triggers keep the record exact for writers at READ COMMITTED (PostgreSQL's
    default); a difference means something went around them (another isolation level,
    triggers disabled, a hand). Each difference is repaired with the call's row and its
    owning organization locked, as the triggers lock them, so a concurrent change is
    neither lost nor undone.
    """
    with engine.begin() as connection:
        missing, stale = connection.execute(
            text("SELECT missing, stale FROM calls_worker_reconcile_due_calls()")
        ).one()
    return int(missing), int(stale)


def record_sweep_run(
    engine: Engine,
    *,
    swept_at: datetime,
    duration_seconds: float,
    expired: int,
    batches: int,
    skipped: bool,
) -> None:
    with engine.begin() as connection:
        connection.execute(
            sweep_runs.insert().values(
                swept_at=swept_at,
                duration_seconds=duration_seconds,
                expired=expired,
                batches=batches,
                skipped=skipped,
            )
        )


def last_sweep_run(engine: Engine) -> dict[str, Any] | None:
    with engine.connect() as connection:
        row = connection.execute(
            select(sweep_runs).where(~sweep_runs.c.skipped).order_by(sweep_runs.c.id.desc())
        ).first()
    return None if row is None else dict(row._mapping)


def exhausted_by_organization(engine: Engine) -> list[dict[str, Any]]:
    """What a sweep would expire now, by owning organization (a dry run: nothing changes)."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(
                organizations.c.uuid,
                organizations.c.name,
                organizations.c.max_call_attempts,
                func.count(calls.c.uuid).label("calls"),
            )
            .select_from(calls_with_owning_organization())
            .where(exhausted())
            .group_by(organizations.c.uuid)
            .order_by(func.count(calls.c.uuid).desc())
        )
        return [
            {
                "organizationUuid": str(row.uuid),
                "name": row.name,
                "maxCallAttempts": row.max_call_attempts,
                "calls": row.calls,
            }
            for row in rows
        ]


@dataclass(frozen=True)
class OperationalFigures:
    """What operators watch, read in one go (metrics and the status command)."""

    requested: int
    exhausted: int
    sweep_lag_seconds: float
    rejected_waiting: int
    last_sweep: dict[str, Any] | None

    @property
    def last_sweep_at(self) -> datetime | None:
        return None if self.last_sweep is None else self.last_sweep["swept_at"]


def operational_figures(engine: Engine) -> OperationalFigures:
    """Counts of requested and exhausted calls, the sweep lag, rejected commands waiting.

    The sweep lag is how long the oldest exhausted call has waited since it became due
    (``worker_due_calls.due_since``, the commit that took it to its limit; 0 when none waits).
    """
    with engine.connect() as connection:
        requested = connection.execute(
            select(func.count()).select_from(calls).where(calls.c.status == "requested")
        ).scalar_one()
        exhausted_count, lag = connection.execute(
            select(
                func.count(),
                func.coalesce(
                    func.extract("epoch", func.now() - func.min(due_calls.c.due_since)), 0
                ),
            ).select_from(due_calls)
        ).one()
        rejected_waiting = connection.execute(
            select(func.count())
            .select_from(rejected_commands)
            .where(_waiting())
        ).scalar_one()
    return OperationalFigures(
        requested=requested,
        exhausted=exhausted_count,
        sweep_lag_seconds=max(0.0, float(lag)),
        rejected_waiting=rejected_waiting,
        last_sweep=last_sweep_run(engine),
    )


# How much of a header a rejected message keeps (task name, command id), and of a reason.
NAME_LIMIT = 200
REASON_LIMIT = 10_000


def storable_text(text: str, limit: int) -> str:
    """``text`` as PostgreSQL's text can hold it: NUL (which it refuses) and lone surrogates
    (which are no UTF-8) written as escapes, and at most ``limit`` characters (the rest
    counted, not kept)."""
    text = str(text)
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > limit:
        kept = limit - 40
        text = f"{text[:kept]}… ({len(text) - kept} more characters)"
    return text


def body_text(body: bytes | str) -> str:
    """A message body as text to store: UTF-8 as is, anything else (or text with NUL, which
    PostgreSQL's text cannot hold) as ``base64:...``."""
    import base64

    if isinstance(body, str):
        if "\x00" not in body and body.isascii():
            return body
        body = body.encode("utf-8", "surrogatepass")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = "\x00"
    if "\x00" in text:
        return "base64:" + base64.b64encode(body).decode("ascii")
    return text


def dumps(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=False)
