"""Liveness asks the process, never the broker (worker/health.py)."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter

from calls_worker.worker import health


def free_port() -> int:
    """A port nothing listens on (a broker away)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def listening() -> Iterator[int]:
    """A port that accepts connections, as a broker's would."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield int(server.getsockname()[1])


@pytest.fixture
def stale(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop last ran longer ago than liveness allows."""
    monkeypatch.setattr(health.HEARTBEAT, "at", health.HEARTBEAT.at - 10_000)


def test_a_running_loop_is_alive_whatever_the_broker() -> None:
    health.HEARTBEAT.beat()
    assert health.worker_alive(f"redis://127.0.0.1:{free_port()}/0")[0] is True


def test_a_stopped_loop_with_the_broker_answering_is_wedged(stale: None, listening: int) -> None:
    assert health.worker_alive(f"redis://127.0.0.1:{listening}/0")[0] is False
    assert health.worker_alive(f"amqp://guest:guest@127.0.0.1:{listening}//")[0] is False


def test_a_stopped_loop_while_the_broker_is_away_is_alive(stale: None) -> None:
    """The consumer is reconnecting: restarting the worker would mend nothing."""
    ok, reason = health.worker_alive(f"redis://127.0.0.1:{free_port()}/0")
    assert ok is True
    assert "broker is away" in reason


def test_beat_is_alive_while_its_scheduler_ticks(monkeypatch: pytest.MonkeyPatch) -> None:
    health.HEARTBEAT.beat()
    assert health.beat_alive()[0] is True
    monkeypatch.setattr(health.HEARTBEAT, "at", health.HEARTBEAT.at - 10_000)
    assert health.beat_alive()[0] is False


def test_healthz_answers_apart_from_the_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = CollectorRegistry()
    Counter("calls_worker_test_total", "A counter.", registry=registry).inc()
    verdict = {"ok": True}
    port = free_port()
    health.serve(port, registry, lambda: (verdict["ok"], "because"))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert b"calls_worker_test_total 1.0" in response.read()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        assert response.read() == b"because\n"
    verdict["ok"] = False
    with pytest.raises(urllib.error.HTTPError) as failed:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
    assert failed.value.code == 503
    failed.value.close()


def test_a_process_whose_metrics_port_is_taken_ends_saying_which_setting_to_change(
    listening: int,
) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", "import prometheus_client as p, time;"
         "from calls_worker.worker import health;"
         f"health.serve({listening}, p.CollectorRegistry(), lambda: (True, 'ok'));"
         "time.sleep(5); print('still running')"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == health.EXIT_PORT_TAKEN
    assert f"cannot serve metrics and /healthz on port {listening}" in done.stderr
    assert "CALLS_WORKER_METRICS_PORT" in done.stderr
    assert "still running" not in done.stdout


def test_run_picks_free_metrics_ports_when_the_default_ones_are_taken() -> None:
    import click

    from calls_worker.cli.supervisor import METRICS_ORDER, metrics_ports

    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))  # noqa: S104 - as a first run's worker would
        held.listen()
        taken = int(held.getsockname()[1])
        picked = metrics_ports(taken, explicit=False)
        assert set(picked) == set(METRICS_ORDER)
        assert taken not in picked.values()
        assert len(set(picked.values())) == 3
        for port in picked.values():
            with socket.socket() as probe:
                probe.bind(("0.0.0.0", port))  # noqa: S104 - free, as it says
        with pytest.raises(click.ClickException, match="set CALLS_WORKER_METRICS_PORT"):
            metrics_ports(taken, explicit=True)  # chosen by the user: refused, naming it
    assert metrics_ports(0, explicit=True) == dict.fromkeys(METRICS_ORDER, 0)


def test_the_sent_at_header_is_read_only_when_it_says_a_moment() -> None:
    from datetime import UTC, datetime, timedelta, timezone

    from calls_worker.wire import sent_at, sent_at_header

    moment = datetime(2026, 3, 1, 9, 0, 0, 123000, tzinfo=timezone(timedelta(hours=2)))
    header = sent_at_header(moment)
    assert header == {"sentAt": "2026-03-01T09:00:00.123+02:00"}
    assert sent_at(header) == moment.timestamp()
    utc = datetime(2026, 3, 1, 7, tzinfo=UTC)
    assert sent_at({"sentAt": "2026-03-01T07:00:00Z"}) == utc.timestamp()
    for unreadable in ({}, {"sentAt": "2026-03-01T09:00:00"}, {"sentAt": "yesterday"},
                       {"sentAt": 1772355600}, {"sentAt": "2" * 100}, None, "sentAt"):  # fmt: skip
        assert sent_at(unreadable) is None, unreadable


def test_a_broker_is_reachable_when_any_node_of_its_list_is(listening: int) -> None:
    """A cluster's nodes, as the worker is given them: the first one down is not the broker
    away (the liveness probe must not restart a worker that failed over)."""
    down = free_port()
    assert health.broker_reachable(f"amqp://g:g@127.0.0.1:{down}//;amqp://g:g@127.0.0.1:{listening}//")
    assert not health.broker_reachable(f"amqp://g:g@127.0.0.1:{down}//;amqp://g:g@127.0.0.1:{down}//")
