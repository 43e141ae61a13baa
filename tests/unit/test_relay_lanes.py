"""How a relay goes round its lanes (worker/relay.py): every lane gets its round, a busy
lane does not starve the others, and the relay rests once a whole turn found little."""

from __future__ import annotations

from typing import Any
from unittest.mock import MagicMock

import pytest

from calls_worker.worker import relay as relay_module
from calls_worker.worker.relay import Relay

BATCH = 10


def run_rounds(monkeypatch: pytest.MonkeyPatch, lanes: int, published: Any,
               rounds: int) -> tuple[list[int], int]:  # fmt: skip
    """The lanes of ``rounds`` rounds, each publishing ``published(lane)``; and how many
    times the relay rested."""
    seen: list[int] = []
    relay = Relay("postgresql://unused", MagicMock(), batch_size=BATCH, interval=0.5,
                  lanes=lanes)  # fmt: skip
    rests = 0

    def one_round(engine: Any, limit: int, publish: Any, *, lane: int, lanes: int) -> Any:
        assert (limit, lanes) == (BATCH, relay.lanes)
        seen.append(lane)
        if len(seen) >= rounds:
            relay._stop.set()
        return published(lane)

    def rest(timeout: float) -> bool:
        nonlocal rests
        rests += 1
        return relay._stop.is_set()

    monkeypatch.setattr(relay_module, "relay_batch", one_round)
    monkeypatch.setattr(relay_module, "build_engine", lambda *a, **k: MagicMock())
    monkeypatch.setattr(relay_module, "relay_metrics", MagicMock)
    monkeypatch.setattr(relay._stop, "wait", rest)
    relay.run()
    return seen, rests


def test_a_busy_lane_does_not_starve_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    seen, rests = run_rounds(monkeypatch, 3, lambda lane: BATCH if lane == 0 else 0, 30)
    assert {seen.count(lane) for lane in range(3)} == {10}  # each lane every third round
    assert rests == 0  # lane 0 always had a full batch: never a whole idle turn


def test_it_rests_once_a_whole_turn_found_little(monkeypatch: pytest.MonkeyPatch) -> None:
    seen, rests = run_rounds(monkeypatch, 4, lambda lane: None if lane == 2 else 3, 12)
    assert sorted(set(seen)) == [0, 1, 2, 3]
    assert rests == 3  # after every turn of 4 rounds: a lane held by another relay, or little


def test_one_lane_is_the_relay_of_before(monkeypatch: pytest.MonkeyPatch) -> None:
    results = iter([BATCH, 2] * 3)
    seen, rests = run_rounds(monkeypatch, 1, lambda lane: next(results), 6)
    assert seen == [0] * 6
    assert rests == 3  # after each round with less than a batch, as before lanes
