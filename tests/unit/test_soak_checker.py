"""The soak's checker (tests/chaos/checker.py) against made-up states: a consistent one
passes; each defect the soak must catch, planted one at a time, fails it."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from tests.chaos.checker import Held, HeldEvent, Rules, Told, reconcile

C1, C2, C3 = "c1", "c2", "c3"


def call(uuid: str, status: str = "requested", attempts: int = 0) -> dict[str, Any]:
    return {"uuid": uuid, "status": status, "attemptCount": attempts,
            "attempts": [f"u{n}" for n in range(attempts)], "externalMetadata": None,
            "updatedAt": f"{status}-{attempts}"}  # fmt: skip


def ok(state: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "call": state}


def error(code: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code}}


class World:
    """Call 1: created, one attempt, cancelled; a complete after it refused (conflict).
    Call 2: created, three attempts (its owner's maximum), expired by the sweep. An invalid
    command (kept), a duplicate of an attempt, a poison message (kept, failed)."""

    def __init__(self) -> None:
        self.told: list[Told] = [
            Told("k1", "create", {"uuid": C1}, outcome=ok(call(C1))),
            Told("k2", "add_attempt", {"callUuid": C1, "userUuid": "u1"},
                 outcome=ok(call(C1, attempts=1))),
            Told("k3", "cancel", {"callUuid": C1}, outcome=ok(call(C1, "cancelled", 1))),
            Told("k8", "complete", {"callUuid": C1}, outcome=error("conflict")),
            Told("k4", "create", {"uuid": C2}, outcome=ok(call(C2))),
            *[Told(f"k{4 + n}", "add_attempt", {"callUuid": C2, "userUuid": f"v{n}"},
                   outcome=ok(call(C2, attempts=n))) for n in (1, 2, 3)],
            Told("k2", "add_attempt", {"callUuid": C1, "userUuid": "u1"}, role="duplicate",
                 outcome=ok(call(C1, attempts=1))),
            Told("i1", "cancel", '{"callUuid": 7}', role="invalid", outcome=error("invalid")),
            Told("p1", "create", {"uuid": "p"}, role="poison", outcome={"failed": "died"}),
        ]  # fmt: skip
        self.held = Held(
            processed={t.command_id: t.outcome for t in self.told
                       if t.role in ("command", "duplicate") and t.outcome is not None},
            rejected={"i1": ["invalid"], "p1": ["delivered more than 20 times"]},
            calls={C1: call(C1, "cancelled", 1), C2: call(C2, "expired", 3)},
            maxima={C1: 3, C2: 3},
            attempts={(C1, "u1"): 1, (C2, "v1"): 1, (C2, "v2"): 1, (C2, "v3"): 1},
            events=[
                HeldEvent(1, "e1", "call.created", C1, call(C1)),
                HeldEvent(2, "e2", "call.attempt_added", C1, call(C1, attempts=1)),
                HeldEvent(3, "e3", "call.cancelled", C1, call(C1, "cancelled", 1)),
                HeldEvent(4, "e4", "call.created", C2, call(C2)),
                *[HeldEvent(4 + n, f"e{4 + n}", "call.attempt_added", C2, call(C2, attempts=n))
                  for n in (1, 2, 3)],
                HeldEvent(8, "e8", "call.expired", C2, call(C2, "expired", 3),
                          {"by": "sweep", "attemptCount": 3, "maxCallAttempts": 3}),
            ],
            received=["e1", "e2", "e3", "e3", "e4", "e5", "e6", "e7", "e8"],  # a repeat
        )  # fmt: skip

    def told_as(self, command_id: str, **changes: Any) -> None:
        """The sending(s) of ``command_id`` changed, and its record with it."""
        for n, item in enumerate(self.told):
            if item.command_id == command_id:
                fields = {**item.__dict__, **changes}
                self.told[n] = Told(**fields)
        if "outcome" in changes:
            self.held.processed[command_id] = changes["outcome"]


def test_a_consistent_state_passes() -> None:
    world = World()
    found = reconcile(world.told, world.held)
    assert found.problems == []
    assert (found.lost, found.doubled) == (0, 0)


def resent_quietly(world: World) -> None:  # the producer resent a dropped command
    world.told_as("k5", resent=1)


def applied_but_told_conflict(world: World) -> None:  # a cancel applied, answered conflict
    world.told_as("k3", outcome=error("conflict"))
    world.held.events = [e for e in world.held.events if e.kind != "call.cancelled"]


def ended_twice(world: World) -> None:  # a race: a complete and the sweep both ended call 2
    world.told.append(Told("k9", "complete", {"callUuid": C2},
                           outcome=ok(call(C2, "completed", 3))))
    world.held.processed["k9"] = ok(call(C2, "completed", 3))
    world.held.events.append(HeldEvent(9, "e9", "call.completed", C2, call(C2, "completed", 3)))
    world.held.received.append("e9")  # type: ignore[union-attr]


def far_future_applied(world: World) -> None:  # stamped a day ahead after a clock jump
    world.told.append(Told("f1", "add_attempt", {"callUuid": C3, "userUuid": "w1"},
                           role="future", outcome=ok(call(C3, attempts=1))))  # fmt: skip
    world.held.processed["f1"] = ok(call(C3, attempts=1))


def event_for_a_refusal(world: World) -> None:  # call.cancelled written for a refused cancel
    world.held.events.append(HeldEvent(9, "e9", "call.completed", C1, call(C1, "cancelled", 1)))
    world.held.received.append("e9")  # type: ignore[union-attr]


def event_missing(world: World) -> None:
    world.held.events = [e for e in world.held.events if e.event_id != "e2"]
    world.held.received = [r for r in world.held.received or [] if r != "e2"]


def event_with_another_call(world: World) -> None:
    world.held.events[1] = HeldEvent(2, "e2", "call.attempt_added", C1, call(C1, attempts=2))


def sequence_goes_back(world: World) -> None:
    events = world.held.events
    events[5], events[6] = (HeldEvent(6, "e6", "call.attempt_added", C2, call(C2, attempts=3)),
                            HeldEvent(7, "e7", "call.attempt_added", C2, call(C2, attempts=2)))


def swept_below_the_maximum(world: World) -> None:
    world.held.events[-1] = HeldEvent(8, "e8", "call.expired", C2, call(C2, "expired", 3),
                                      {"by": "sweep", "attemptCount": 3, "maxCallAttempts": 4})


def left_requested_at_the_limit(world: World) -> None:
    world.held.calls[C3] = call(C3, attempts=3)
    world.held.maxima[C3] = 3


def subscriber_missed_one(world: World) -> None:
    world.held.received = [r for r in world.held.received or [] if r != "e4"]


def subscriber_got_a_stranger(world: World) -> None:
    world.held.received = [*(world.held.received or []), "e99"]


def refused_create_created(world: World) -> None:
    world.told.append(Told("k10", "create", {"uuid": C3}, outcome=error("not_found")))
    world.held.processed["k10"] = error("not_found")
    world.held.calls[C3] = call(C3)
    world.held.maxima[C3] = 3


def refused_attempt_stored(world: World) -> None:
    world.told_as("k8", kind="add_attempt", payload={"callUuid": C1, "userUuid": "u8"})
    world.held.attempts[(C1, "u8")] = 1


def attempt_stored_twice(world: World) -> None:
    world.held.attempts[(C2, "v2")] = 2


def database_differs_from_the_last_change(world: World) -> None:
    world.held.calls[C1] = {**call(C1, "cancelled", 1), "notes": "changed behind our back"}


def told_other_than_recorded(world: World) -> None:
    for n, item in enumerate(world.told):
        if item.command_id == "k6":
            world.told[n] = Told(**{**item.__dict__, "outcome": error("conflict")})


def duplicate_told_another(world: World) -> None:
    world.told[-3] = Told("k2", "add_attempt", {"callUuid": C1, "userUuid": "u1"},
                          role="duplicate", outcome=error("conflict"))  # fmt: skip


def no_outcome(world: World) -> None:
    world.told_as("k7", outcome=None)


def invalid_not_kept(world: World) -> None:
    del world.held.rejected["i1"]


def poison_told_ok(world: World) -> None:
    world.told_as("p1", outcome=ok(call("p")))


def ended_without_a_cause(world: World) -> None:
    world.held.calls[C1] = call(C1, "completed", 1)


@pytest.mark.parametrize(("defect", "said"), [
    (resent_quietly, "k5 was resent 1 times"),
    (applied_but_told_conflict, "its cancel k3 was told"),
    (ended_twice, "ended by ['complete'] and 1 sweeps"),
    (far_future_applied, "stamped past the tolerance, was told {'ok': True"),
    (event_for_a_refusal, "event of call c1 that no ok change explains"),
    (event_missing, "no call.attempt_added event for an ok change of call c1"),
    (event_with_another_call, "no call.attempt_added event for an ok change of call c1"),
    (sequence_goes_back, "call c2: event 7"),
    (swept_below_the_maximum, "the sweep expired call c2"),
    (left_requested_at_the_limit, "call c3 is left requested"),
    (subscriber_missed_one, "never reached the subscribers"),
    (subscriber_got_a_stranger, "events the outbox does not hold"),
    (refused_create_created, "create k10 was refused; call c3 exists"),
    (refused_attempt_stored, "attempt k8 (refused) stored 1 times"),
    (attempt_stored_twice, "attempt k6 (ok) stored 2 times"),
    (database_differs_from_the_last_change, "call c1 differs from its last event's call"),
    (told_other_than_recorded, "command k6 was told"),
    (duplicate_told_another, "command k2 sent again was told another outcome"),
    (no_outcome, "command k7 (add_attempt, command) got no outcome"),
    (invalid_not_kept, "invalid command i1 was not kept"),
    (poison_told_ok, "poison p1 was told"),
    (ended_without_a_cause, "call c1 is completed, its cancel said ok"),
])  # fmt: skip
def test_each_planted_defect_fails_the_check_by_its_rule(
    defect: Callable[[World], None], said: str
) -> None:
    world = World()
    defect(world)
    found = reconcile(world.told, world.held)
    assert any(said in problem for problem in found.problems), found.problems


def test_a_resend_passes_only_where_the_fault_can_lose_a_message_and_it_was_held() -> None:
    world = World()
    resent_quietly(world)
    assert reconcile(world.told, world.held, Rules("none")).problems
    assert reconcile(world.told, world.held, Rules("explained")).problems  # not held
    explained = copy.deepcopy(world.held)
    explained.in_flight = {"k5"}
    assert reconcile(world.told, explained, Rules("explained")).problems == []
    assert reconcile(world.told, explained, Rules("none")).problems


def test_more_resends_between_taking_and_recording_than_workers_fail() -> None:
    """A command lost before the fault (taken off the queue and acknowledged unapplied) looks,
    at the fault, like one a worker is between taking and recording; each worker can be so
    with one message only."""
    world = World()
    resent_quietly(world)
    world.told_as("k6", resent=1)
    held = copy.deepcopy(world.held)
    held.in_flight = {"k5", "k6"}
    held.in_transit = {"k5", "k6"}
    held.consumers = 2
    assert reconcile(world.told, held, Rules("explained")).problems == []
    held.consumers = 1
    problems = reconcile(world.told, held, Rules("explained")).problems
    assert any("2 resent commands were neither queued" in p for p in problems), problems
    held.in_transit = {"k6"}  # k5 recorded by the broker as delivered
    assert reconcile(world.told, held, Rules("explained")).problems == []


def test_a_fault_that_found_nothing_in_flight_is_drawn_again_until_enough_did(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An iteration that missed counts its losses but proves nothing of its fault: the soak
    runs more, up to as many again as asked for, and fails when fewer than asked for hit."""
    import random
    from types import SimpleNamespace

    from tests.chaos import soak

    def scene_drawing(hits: list[bool]) -> Any:
        draws = iter(hits)
        monkeypatch.setattr(soak, "run_iteration", lambda scene, fault, the_plan: soak.Result(
            fault, the_plan.seed, 1, next(draws), 0, 0))  # fmt: skip
        return SimpleNamespace(broker=SimpleNamespace(kind="rabbitmq"))

    scene = scene_drawing([True, False, True])
    results = soak.soak_in(scene, ("rabbitmq-poison",), 2, 1, random.Random(1), log=print)
    assert [r.hit_in_flight for r in results] == [True, False, True]
    assert soak.failures(results, 2) == []
    scene = scene_drawing([False, False, True, False])
    results = soak.soak_in(scene, ("rabbitmq-poison",), 2, 1, random.Random(1), log=print)
    assert len(results) == 4  # no more than twice the iterations asked for
    assert soak.failures(results, 2) == ["rabbitmq-poison: hit work in flight in 1 of 4"]
    assert soak.failures(results) == ["rabbitmq-poison: hit work in flight in 1 of 4"]
    scene = scene_drawing([True, True])
    results = soak.soak_in(scene, ("rabbitmq-poison",), 2, 1, random.Random(1), log=print)
    assert len(results) == 2
    assert soak.failures(results, 2) == []
