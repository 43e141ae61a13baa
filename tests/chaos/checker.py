"""The soak's checker: what the producer was told against what the database (and the
subscribers) hold, as a pure function of both, with nothing of the soak's machinery.

``reconcile`` takes a ``Told`` for each command the producer handed over and a ``Held``
snapshot, and returns every problem it finds; tests/unit/test_soak_checker.py feeds it
made-up states, each with one defect planted, and sees each fail. What must hold:

- each command has an outcome; an invalid one, and one stamped past the tolerance after a
  clock jump, is refused (``invalid``) and the invalid one kept; a poison message is kept
  with a failure outcome; every other one has a processed record equal to what its
  producer was told, and a duplicate (its id sent again) was told the first outcome;
- a call ends only through exactly one ok command of that end (complete, cancel, expire) or
  the sweep; an error outcome left no effect, for every kind of command (no call created,
  no attempt stored, no end);
- the outbox holds exactly one event for each ok change, carrying that outcome's call, and
  one ``call.expired`` (``expiry.by: sweep``) for each call the sweep expired: none for an
  error, a redelivery or a duplicate;
- a call's events, in ``sequence`` order, never go back (attempts never fewer, nothing after
  an end), and the database's call is its last event's;
- the sweep expired a call only at or over the maximum in force in its transaction (the
  event's ``expiry``), and no call is left requested at or over its owner's maximum;
- what the subscribers received is the outbox, repeats dropped;
- a resend (the producer sending a command again under its id, for want of an outcome) is
  a failure where the fault cannot lose a message, and elsewhere must be explained: the
  command was taken by the worker and not acknowledged when the fault struck, recorded so
  by the broker, or one of at most one per worker between taking a message and recording it.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

EVENT_OF = {"create": "call.created", "add_attempt": "call.attempt_added",
            "complete": "call.completed", "cancel": "call.cancelled",
            "expire": "call.expired"}  # fmt: skip
END_OF = {"complete": "completed", "cancel": "cancelled", "expire": "expired"}
SWEEP = "sweep"

Role = Literal["command", "duplicate", "invalid", "future", "poison"]


@dataclass(frozen=True)
class Told:
    """A command the producer handed over (the broker accepted it), and what it was told:
    ``outcome`` None for none at all, ``{"failed": why}`` when the worker gave up on it."""

    command_id: str
    kind: str
    payload: dict[str, Any] | str
    role: Role = "command"
    outcome: dict[str, Any] | None = None
    resent: int = 0

    @property
    def call_uuid(self) -> str | None:
        if not isinstance(self.payload, dict):
            return None
        value = self.payload.get("uuid" if self.kind == "create" else "callUuid")
        return None if value is None else str(value)


@dataclass(frozen=True)
class HeldEvent:
    """A row of the outbox: its ``sequence``, id, kind, call, the call after the change, and
    ``expiry`` for a ``call.expired``."""

    sequence: int
    event_id: str
    kind: str
    call_uuid: str
    call: dict[str, Any]
    expiry: dict[str, Any] | None = None

    @property
    def by_sweep(self) -> bool:
        return self.kind == "call.expired" and (self.expiry or {}).get("by") == SWEEP


@dataclass
class Held:
    """What the database holds of the soak's commands, and what the subscribers received."""

    processed: dict[str, dict[str, Any]]
    """Command id: its recorded outcome."""
    rejected: dict[str, list[str]]
    """Command id: the reasons it was kept among the rejected commands."""
    calls: dict[str, dict[str, Any]]
    """Call uuid: the call as an outcome shows it."""
    maxima: dict[str, int | None]
    """Call uuid: its person's owner's maximum now."""
    attempts: dict[tuple[str, str], int]
    """(call uuid, user uuid): how many attempt rows."""
    events: list[HeldEvent]
    received: list[str] | None = None
    """The event ids the subscribers received, repeats included (None: not collected)."""
    in_flight: set[str] | None = None
    """The command ids the worker held, taken and not acknowledged, when the fault struck."""
    in_transit: set[str] | None = None
    """Those of ``in_flight`` in no record of the broker's: taken off the queue and not (yet)
    recorded as delivered. A worker has at most one so, between the two steps of kombu's
    Redis transport; any more were lost before the fault struck."""
    consumers: int = 0
    """How many workers took messages when the fault struck (the bound on ``in_transit``)."""


@dataclass(frozen=True)
class Rules:
    """What the iteration's fault allows: ``resends`` "none" where it cannot lose a message,
    "explained" where it can (a Redis kill between taking a message and recording it)."""

    resends: Literal["none", "explained"] = "none"


@dataclass
class Findings:
    lost: int = 0
    doubled: int = 0
    problems: list[str] = field(default_factory=list)

    def add(self, problem: str, *, lost: bool = False, doubled: bool = False) -> None:
        self.problems.append(problem)
        self.lost += lost
        self.doubled += doubled


def _canonical(call: Any) -> str:
    return json.dumps(call, sort_keys=True)


def reconcile(told: Sequence[Told], held: Held, rules: Rules = Rules()) -> Findings:
    found = Findings()
    first = _outcomes(told, held, rules, found)
    _effects(told, first, held, found)
    _events(told, first, held, found)
    return found


def _outcomes(told: Sequence[Told], held: Held, rules: Rules,
              found: Findings) -> dict[str, Told]:  # fmt: skip
    """Each command's outcome against the record; the first sending of each command id
    whose outcome the record keeps (what the effects are checked against)."""
    first: dict[str, Told] = {}
    if rules.resends == "explained" and held.in_transit is not None:
        transit = sorted({item.command_id for item in told
                          if item.resent and item.command_id in held.in_transit})  # fmt: skip
        if len(transit) > held.consumers:
            found.add(f"{len(transit)} resent commands were neither queued nor recorded as"
                      f" delivered when the fault struck, where {held.consumers} workers can"
                      f" hold at most one each so: {transit}")  # fmt: skip
    for item in told:
        if item.resent:
            explained = rules.resends == "explained" and item.command_id in (held.in_flight or ())
            if not explained:
                found.add(f"command {item.command_id} was resent {item.resent} times"
                          + (" and the worker was not holding it when the fault struck"
                             if rules.resends == "explained" else
                             " under a fault that loses no message"))  # fmt: skip
        outcome = item.outcome
        if outcome is None:
            found.add(f"command {item.command_id} ({item.kind}, {item.role}) got no outcome",
                      lost=True)  # fmt: skip
            continue
        if item.role == "invalid":
            if item.command_id not in held.rejected:
                found.add(f"invalid command {item.command_id} was not kept", lost=True)
            if (outcome.get("error") or {}).get("code") != "invalid":
                found.add(f"invalid command {item.command_id} was told {outcome}")
            continue
        if item.role == "poison":
            if item.command_id not in held.rejected:
                found.add(f"poison {item.command_id} was not kept", lost=True)
            if "failed" not in outcome:
                found.add(f"poison {item.command_id} was told {outcome}, not a failure")
            continue
        record = held.processed.get(item.command_id)
        if record is None:
            found.add(f"command {item.command_id} ({item.kind}) has no processed record",
                      lost=True)  # fmt: skip
            continue
        if outcome != record:
            found.add(f"command {item.command_id} was told {outcome}, recorded {record}",
                      doubled=True)  # fmt: skip
        if item.role == "future" and (outcome.get("error") or {}).get("code") != "invalid":
            found.add(f"command {item.command_id}, stamped past the tolerance, was told"
                      f" {outcome}", doubled=True)  # fmt: skip
        earlier = first.get(item.command_id)
        if earlier is None:
            first[item.command_id] = item
        elif earlier.outcome != outcome:
            found.add(f"command {item.command_id} sent again was told another outcome",
                      doubled=True)  # fmt: skip
    return first


def _ok(item: Told) -> bool:
    return bool((item.outcome or {}).get("ok"))


def _effects(told: Sequence[Told], first: dict[str, Told], held: Held,
             found: Findings) -> None:  # fmt: skip
    """What each command did to the calls, against its outcome."""
    created_ok = {item.call_uuid for item in first.values() if item.kind == "create" and _ok(item)}
    ends: dict[str, list[Told]] = {}
    for item in first.values():
        call = item.call_uuid
        if call is None:
            continue
        ok = _ok(item)
        if item.kind == "create":
            if ok and call not in held.calls:
                found.add(f"create {item.command_id} said ok; call {call} does not exist",
                          lost=True)  # fmt: skip
            if not ok and call in held.calls and call not in created_ok:
                found.add(f"create {item.command_id} was refused; call {call} exists",
                          doubled=True)  # fmt: skip
        elif item.kind == "add_attempt":
            assert isinstance(item.payload, dict)
            stored = held.attempts.get((call, str(item.payload["userUuid"])), 0)
            if stored != (1 if ok else 0):
                found.add(f"attempt {item.command_id} ({'ok' if ok else 'refused'}) stored"
                          f" {stored} times", lost=ok and stored == 0, doubled=stored > ok)
        else:
            ends.setdefault(call, []).append(item)
    swept = Counter(e.call_uuid for e in held.events if e.by_sweep)
    for uuid, row in held.calls.items():
        status = row["status"]
        by_command = [i for i in ends.get(uuid, []) if _ok(i)]
        refused = [i for i in ends.get(uuid, []) if not _ok(i) and END_OF[i.kind] == status]
        ways = len(by_command) + swept[uuid]
        if status in END_OF.values():
            if ways != 1:
                found.add(f"call {uuid} is {status}, ended by {[i.kind for i in by_command]}"
                          f" and {swept[uuid]} sweeps", lost=ways == 0, doubled=ways > 1)
            elif by_command and END_OF[by_command[0].kind] != status:
                found.add(f"call {uuid} is {status}, its {by_command[0].kind} said ok",
                          lost=True)  # fmt: skip
            if refused and not by_command and not swept[uuid]:
                found.add(f"call {uuid} is {status}; its {refused[0].kind}"
                          f" {refused[0].command_id} was told {refused[0].outcome}",
                          doubled=True)  # fmt: skip
        elif ways:
            found.add(f"call {uuid} is {status}, though {ways} changes ended it", lost=True)
        maximum = held.maxima.get(uuid)
        if (status == "requested" and row.get("externalMetadata") is None
                and maximum is not None and row["attemptCount"] >= maximum):  # fmt: skip
            found.add(f"call {uuid} is left requested at {row['attemptCount']} attempts,"
                      f" its maximum {maximum}", lost=True)  # fmt: skip


def _events(told: Sequence[Told], first: dict[str, Told], held: Held,
            found: Findings) -> None:  # fmt: skip
    """The outbox against the ok changes, each call's events in order, and the subscribers."""
    expected = Counter((EVENT_OF[i.kind], _canonical((i.outcome or {})["call"]))
                       for i in first.values() if _ok(i))  # fmt: skip
    written = Counter((e.kind, _canonical(e.call)) for e in held.events if not e.by_sweep)
    for (kind, call), count in (expected - written).items():
        found.add(f"no {kind} event for an ok change of call {json.loads(call)['uuid']}"
                  f" ({count})", lost=True)  # fmt: skip
    for (kind, call), count in (written - expected).items():
        found.add(f"a {kind} event of call {json.loads(call)['uuid']} that no ok change"
                  f" explains ({count})", doubled=True)  # fmt: skip
    for event in held.events:
        if not event.by_sweep:
            continue
        expiry = event.expiry or {}
        maximum = expiry.get("maxCallAttempts")
        if maximum is None or expiry.get("attemptCount", -1) < maximum:
            found.add(f"the sweep expired call {event.call_uuid} at {expiry}", doubled=True)
    by_call: dict[str, list[HeldEvent]] = {}
    for event in sorted(held.events, key=lambda e: e.sequence):
        by_call.setdefault(event.call_uuid, []).append(event)
    for uuid, events in by_call.items():
        for before, after in itertools.pairwise(events):
            if (after.call["attemptCount"] < before.call["attemptCount"]
                    or before.call["status"] != "requested"):  # fmt: skip
                found.add(f"call {uuid}: event {after.sequence} ({after.kind},"
                          f" {after.call['status']}, {after.call['attemptCount']} attempts)"
                          f" comes after {before.sequence} ({before.kind},"
                          f" {before.call['status']}, {before.call['attemptCount']})")
        if uuid in held.calls and _canonical(held.calls[uuid]) != _canonical(events[-1].call):
            differ = sorted(k for k in {*held.calls[uuid], *events[-1].call}
                            if _canonical(held.calls[uuid].get(k))
                            != _canonical(events[-1].call.get(k)))  # fmt: skip
            found.add(f"call {uuid} differs from its last event's call"
                      f" ({events[-1].kind}, sequence {events[-1].sequence}) in"
                      + "".join(f" {k}: {held.calls[uuid].get(k)!r} against"
                                f" {events[-1].call.get(k)!r};" for k in differ))  # fmt: skip
    if held.received is not None:
        outbox, received = {e.event_id for e in held.events}, set(held.received)
        if outbox - received:
            found.add(f"{len(outbox - received)} events of the outbox never reached the"
                      " subscribers", lost=True)  # fmt: skip
        if received - outbox:
            found.add(f"the subscribers received {len(received - outbox)} events the outbox"
                      " does not hold", doubled=True)  # fmt: skip
