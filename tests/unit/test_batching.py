"""The main process's side of group commit, with Celery's requests and timer faked: when a
buffer is flushed, and how each message of a batch is settled on each path. (The paths
through real worker processes: tests/e2e/test_batching.py.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from billiard.einfo import ExceptionInfo
from billiard.exceptions import WorkerLostError

from calls_worker.adapters.db import journal
from calls_worker.worker import batching
from calls_worker.worker.batch_job import DONE, GAVE_UP, REQUEUE, RETRIED
from calls_worker.worker.batching import BatchRequest, CommandBatcher
from calls_worker.worker.consumer import _tolerate_lost_channel


class FakeTimer:
    def __init__(self) -> None:
        self.pending: list[tuple[float, Callable[[], None]]] = []

    def call_after(self, seconds: float, fun: Callable[[], None]) -> None:
        self.pending.append((seconds, fun))

    def fire(self) -> None:
        due, self.pending = self.pending, []
        for _, fun in due:
            fun()


class FakeConsumer:
    def __init__(self) -> None:
        self.timer = FakeTimer()


class FakeRequest:
    """What a batch uses of a Celery request, recording how it was settled."""

    task: Any = None

    def __init__(self, n: int, stored: bool = False, redelivered: bool = False) -> None:
        self.id = f"command-{n}"
        self.delivery_info = {"redelivered": redelivered}
        self.type = "calls.create"
        self.request_dict = {"id": self.id, "sentAt": f"2026-03-01T09:00:0{n}+00:00"}
        self.settled: list[str] = []
        self.events: list[str] = []
        self.stored = stored

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        self.settled.append("accepted")

    def on_success(self, failed_retval_runtime: tuple[bool, Any, float]) -> None:
        self.settled.append("ack")

    def on_failure(self, exc_info: Any) -> None:
        # Celery's own path for a lost worker: acknowledged when the outcome was stored,
        # requeued otherwise (task_reject_on_worker_lost).
        self.settled.append("ack" if self.stored else "requeue")

    def on_timeout(self, soft: bool, timeout: float) -> None:
        self.settled.append("soft-timeout" if soft else "hard-timeout")

    def acknowledge(self) -> None:
        self.settled.append("ack")

    def reject(self, requeue: bool = False) -> None:
        self.settled.append("requeue" if requeue else "drop")

    def send_event(self, kind: str, **_: Any) -> None:
        self.events.append(kind)


@pytest.fixture(autouse=True)
def _no_worker_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batching, "task_ready", lambda request: None)
    monkeypatch.setattr(batching, "worker_metrics", lambda: _Metrics())
    ANSWERED.clear()


ANSWERED: list[tuple[str, float | None]] = []


class _Metrics:
    def batch_failed(self, reason: str) -> None:
        pass

    def answered(self, task_name: str, sent: float | None, now: float) -> None:
        ANSWERED.append((task_name, sent))

    def rejection(self, stage: str) -> None:
        pass


def batcher(size: int = 3) -> tuple[CommandBatcher, list[BatchRequest], FakeConsumer]:
    consumer = FakeConsumer()
    sent: list[BatchRequest] = []
    return CommandBatcher(consumer, sent.append, size, 0.01), sent, consumer


def test_a_full_buffer_goes_at_once_and_a_partial_one_when_its_wait_ends() -> None:
    b, sent, consumer = batcher(3)
    requests = [FakeRequest(n) for n in range(4)]
    for request in requests:
        b.add(request)
    assert [r.id for r in sent[0].requests] == ["command-0", "command-1", "command-2"]
    assert len(sent) == 1  # the fourth waits for its batch to fill...
    consumer.timer.fire()
    assert [r.id for r in sent[1].requests] == ["command-3"]  # ...no longer than the wait


def test_a_timer_of_an_emptied_buffer_flushes_nothing() -> None:
    b, sent, consumer = batcher(2)
    b.add(FakeRequest(0))
    b.add(FakeRequest(1))  # full: flushed, but the first one's timer is still pending
    b.add(FakeRequest(2))
    consumer.timer.fire()  # the old timer and the new one fire
    assert [[r.id for r in s.requests] for s in sent] == [["command-0", "command-1"],
                                                           ["command-2"]]  # fmt: skip


def test_after_a_lost_connection_the_buffer_is_dropped_and_the_next_command_has_a_timer() -> None:
    """The broker redelivers what the lost channel held; a new request after the reconnect
    gets a timer of its own even though the old one never fires (a wedged timer would hold
    a lone command for good: celery-batches issues 99 and 107)."""
    b, sent, consumer = batcher(5)
    b.add(FakeRequest(0))
    consumer.timer.pending.clear()  # the reconnect drops the old connection's timers
    b.forget()
    b.add(FakeRequest(1))
    assert consumer.timer.pending, "no flush timer for the command after the reconnect"
    consumer.timer.fire()
    assert [[r.id for r in s.requests] for s in sent] == [["command-1"]]


def test_a_redelivered_command_skips_the_buffer_and_goes_alone() -> None:
    """The broker's redelivered flag, not this process's memory, says that a message's
    batch failed: whichever worker it reaches applies it alone."""
    b, sent, _ = batcher(5)
    b.add(FakeRequest(0))
    b.add(FakeRequest(7, redelivered=True))
    assert [[r.id for r in s.requests] for s in sent] == [["command-7"]]
    assert [r.id for r in b.buffer] == ["command-0"]


def batch(requests: list[FakeRequest]) -> tuple[BatchRequest, list[tuple[float, Any]]]:
    later: list[tuple[float, Any]] = []
    return BatchRequest(requests, None, lambda s, f: later.append((s, f))), later  # type: ignore[arg-type]


def test_each_message_is_settled_as_its_pool_process_says() -> None:
    requests = [FakeRequest(n) for n in range(5)]
    b, _ = batch(requests)
    b.on_accepted(123, 0.0)
    b.on_return([(DONE, "ok"), (RETRIED, "retry"), (GAVE_UP, "kept"), (REQUEUE, "later"),
                 (REQUEUE, "its batch ran past the soft time limit")])  # fmt: skip
    assert [r.settled for r in requests] == [["accepted", "ack"], ["accepted", "ack"],
                                             ["accepted", "ack"], ["accepted", "requeue"],
                                             ["accepted", "requeue"]]  # fmt: skip
    assert requests[1].events == ["task-retried"]
    assert requests[2].events == ["task-failed"]
    # Timed from their sentAt: the one applied and the one given up (its failure is its
    # outcome); not the one retried, nor those requeued (they come back to be answered).
    assert ANSWERED == [("calls.create", 1772355600.0), ("calls.create", 1772355602.0)]


def test_a_lost_pool_process_requeues_what_was_not_stored() -> None:
    requests = [FakeRequest(0, stored=True), FakeRequest(1), FakeRequest(2)]
    b, _ = batch(requests)
    try:
        raise WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL).")
    except WorkerLostError:
        b.on_error(ExceptionInfo())
    assert [r.settled for r in requests] == [["ack"], ["requeue"], ["requeue"]]


def test_a_batch_that_raises_is_never_acknowledged_its_messages_come_back() -> None:
    requests = [FakeRequest(0), FakeRequest(1)]
    b, later = batch(requests)
    try:
        raise RuntimeError("a defect")
    except RuntimeError:
        b.on_error(ExceptionInfo())
    assert [r.settled for r in requests] == [[], []]  # not at once: after a pause
    (pause, requeue), = later
    assert pause == batching.REQUEUE_PAUSE_SECONDS
    requeue()
    assert [r.settled for r in requests] == [["requeue"], ["requeue"]]


class _Watch:
    def __init__(self) -> None:
        self.reported = 0

    def report_away(self, what: str = "the database") -> None:
        self.reported += 1


class _Runtime:
    def __init__(self) -> None:
        self.database_watch = _Watch()

    def unpooled_engine(self) -> None:
        return None


@pytest.mark.parametrize("database_keeps_it", [True, False])
def test_a_command_that_raises_alone_is_given_up_and_kept(
    monkeypatch: pytest.MonkeyPatch, database_keeps_it: bool
) -> None:
    """Alone, a batch that raises is its command's doing: kept and acknowledged, as Celery
    does for a lone task, instead of coming back for ever (on RabbitMQ, to the dead letters
    with a false reason). While the database cannot keep it, it goes back to the queue."""
    kept: list[dict[str, Any]] = []

    def record_rejected(engine: Any, **values: Any) -> int:
        if not database_keeps_it:
            raise ConnectionError("the database is away")
        kept.append(values)
        return 41

    runtime = _Runtime()
    monkeypatch.setattr(batching, "runtime_of", lambda app: runtime)
    monkeypatch.setattr(journal, "record_rejected", record_rejected)
    monkeypatch.setattr(batching, "worker_metrics", lambda: _Metrics())
    request = FakeRequest(3, redelivered=True)
    request.args, request.kwargs = (), {"command": {"callUuid": "x"}}  # type: ignore[attr-defined]
    b, later = batch([request])
    b.task = type("Task", (), {"app": None})()
    try:
        raise RuntimeError("a defect")
    except RuntimeError:
        b.on_error(ExceptionInfo())
    if database_keeps_it:
        assert request.settled == ["ack"]
        assert request.events == ["task-failed"]
        assert kept[0]["command_id"] == "command-3"
        assert "a defect" in kept[0]["reason"]
        assert later == []
    else:
        assert request.settled == []
        (_, requeue), = later
        requeue()
        assert request.settled == ["requeue"]
        assert runtime.database_watch.reported == 1


def test_a_hard_time_limit_is_handled_for_each_message_as_celery_does() -> None:
    requests = [FakeRequest(0), FakeRequest(1)]
    b, _ = batch(requests)
    b.on_timeout(False, 300)
    assert [r.settled for r in requests] == [["hard-timeout"], ["hard-timeout"]]


class LostChannelMessage:
    """What kombu's Redis transport does settling a message whose channel was closed with
    its connection: AttributeError, from the event loop, where it would end the worker."""

    def __init__(self) -> None:
        self.settled: list[str] = []

    def ack_log_error(self, logger: Any, errors: Any, multiple: bool = False) -> None:
        raise AttributeError("'NoneType' object has no attribute 'hostname'")

    def reject_log_error(self, logger: Any, errors: Any, requeue: bool = False) -> None:
        if requeue:
            raise AttributeError("'NoneType' object has no attribute 'hostname'")
        raise ValueError("not a lost channel")


def test_a_message_of_a_lost_connection_is_left_to_the_broker() -> None:
    message = LostChannelMessage()
    with pytest.raises(AttributeError):
        message.ack_log_error(None, ())
    _tolerate_lost_channel(message)
    message.ack_log_error(None, ())  # raises nothing: left to the broker, which redelivers it
    message.reject_log_error(None, (), requeue=True)
    with pytest.raises(ValueError, match="not a lost channel"):  # anything else still raises
        message.reject_log_error(None, ())


def test_batching_off_is_a_batch_of_one() -> None:
    """CALLS_WORKER_COMMAND_BATCH_SIZE=1: each command goes to the pool at once, alone, by
    the same path as a batch (there is no other)."""
    b, sent, consumer = batcher(1)
    for n in range(3):
        b.add(FakeRequest(n))
    assert [[r.id for r in s.requests] for s in sent] == [["command-0"], ["command-1"],
                                                           ["command-2"]]  # fmt: skip
    consumer.timer.fire()
    assert len(sent) == 3


def test_a_command_tasks_body_applies_nothing() -> None:
    """Commands take one path, the consumer's batches: a command task's body, if ever
    called (``apply``, another consumer), refuses, and CommandTask.on_failure keeps the
    command among the rejected ones."""
    from calls_worker.worker.tasks import NotApplied, _command_task

    body = _command_task("create")
    fake_task = type("Task", (), {"request": type("Request", (), {"id": "c-1"})()})()
    with pytest.raises(NotApplied, match="c-1"):
        body(fake_task, command={"personUuid": "x"})
