"""``calls-worker events tail``: the call events the outbox keeps, for operators.

Reads ``worker_call_events`` (published or not: the events are kept
CALLS_WORKER_EVENTS_RETENTION_HOURS after publication), never the broker.
"""

from __future__ import annotations

import json
import time
from typing import Any
from uuid import UUID

import click

from calls_worker.adapters.db.events import KeptEvent, tail
from calls_worker.cli.directory import database_engine
from calls_worker.cli.output import Group
from calls_worker.cli.params import COUNT, SECONDS

# How far back --follow looks again for events that took a lower number but committed
# after a higher one was shown (numbers are taken at insert, not at commit).
FOLLOW_SLACK = 1000


def line(kept: KeptEvent) -> str:
    """One event in a line: when, what, which call, and where it stands."""
    event = kept.event
    call = event["call"]
    detail = f"status={call['status']} attempts={call['attemptCount']}"
    if (expiry := event.get("expiry")) is not None:
        detail += f" by {expiry['by']} (max {expiry['maxCallAttempts']})"
    state = "published" if kept.published_at is not None else "pending"
    return (
        f"{event['sequence']:>8}  {event['occurredAt']}  {event['kind']:<18}  "
        f"{event['callUuid']}  {detail}  [{state}]"
    )


def _show(kept: KeptEvent, as_json: bool) -> None:
    click.echo(json.dumps(kept.event, ensure_ascii=False) if as_json else line(kept))


@click.group(cls=Group, name="events")
def events() -> None:
    """Call events: every change of a call, as subscribers receive it."""


@events.command(name="tail")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events as they are written.")
@click.option("--call", "call_uuid", type=click.UUID, help="Only the events of this call.")
@click.option("--json", "as_json", is_flag=True, help="Each event as published, a JSON line.")
@click.option("--lines", "-n", type=COUNT, default=20, show_default=True,
              help="How many of the latest events to print first.")  # fmt: skip
@click.option("--interval", type=SECONDS, default=1.0, show_default=True, hidden=True)
def tail_command(follow: bool, call_uuid: UUID | None, as_json: bool, lines: int,
                 interval: float) -> None:  # fmt: skip
    """Print the latest call events, oldest first (with --follow, then the new ones).

    A line: sequence, when it happened, kind, call, its status and attempts (an expiry
    says by whom, and the maximum), and whether the relay published it yet.
    """
    with database_engine() as engine:
        shown: dict[int, None] = {}
        for kept in tail(engine, call_uuid=call_uuid, limit=lines):
            _show(kept, as_json)
            shown[kept.event["sequence"]] = None
        if not follow:
            return
        # What was there before is not new: below the first event shown (or, with none
        # shown, at the latest there is), nothing is printed. Above it, a number missing
        # from what was shown belonged to a change not committed yet: printed once it is.
        if shown:
            floor = min(shown) - 1
        else:
            floor = max((k.event["sequence"] for k in tail(engine, call_uuid=call_uuid,
                                                            limit=1)), default=0)  # fmt: skip
        try:
            while True:
                time.sleep(interval)
                # Look again a little below the highest number shown: an event numbered
                # earlier may have committed later.
                after = max(floor, max(shown, default=0) - FOLLOW_SLACK)
                for kept in tail(engine, call_uuid=call_uuid, after=after, limit=10_000):
                    if kept.event["sequence"] not in shown:
                        _show(kept, as_json)
                        shown[kept.event["sequence"]] = None
                while len(shown) > 4 * FOLLOW_SLACK:
                    del shown[next(iter(shown))]
        except KeyboardInterrupt:
            pass


COMMANDS: list[Any] = [events]
