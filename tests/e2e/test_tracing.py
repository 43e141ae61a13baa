"""Traces through the queue: a producer's trace continues through each command's
application in a real worker, group commit included, and the spans arrive at an OTLP/HTTP
receiver; with no endpoint configured, nothing of OpenTelemetry is loaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from uuid import uuid4

from celery import Celery

from calls_worker.client import CallsClient
from tests.db_world import Db
from tests.e2e.conftest import own_worker, redis_database, wait_until
from tests.otlp import ReceivedSpan, otlp_receiver

CONSUMER = 5  # the protocol's SPAN_KIND_CONSUMER


def test_a_producers_trace_continues_through_each_command_of_a_batch(
    db: Db, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    broker = redis_database(redis_url, 4)
    organization = db.organization(2)
    person = {"personUuid": str(db.person(organization)), "organizationUuid": str(organization)}
    producer = TracerProvider().get_tracer("a-producer")
    with otlp_receiver() as receiver:
        worker = own_worker(database_url, broker, tmp_path, "traced",
                            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
                            OTEL_SERVICE_NAME="calls-worker-under-test",
                            OTEL_BSP_SCHEDULE_DELAY="100",
                            CALLS_WORKER_COMMAND_BATCH_WAIT_MS="50")  # fmt: skip
        try:
            with CallsClient(broker) as client:
                with producer.start_as_current_span("enrol donors") as enrolling:
                    handles = [client.send("create", person) for _ in range(5)]
                    handles.append(client.send("cancel", {"callUuid": str(uuid4())}))  # not_found
                outcomes = [handle.outcome(60) for handle in handles]
                untraced = client.send("create", person)  # no span current: no traceparent
                assert untraced.outcome(60)["ok"] is True
            with Celery("plain", set_as_current=False, broker=broker) as plain:
                plain.send_task("calls.create", kwargs={"command": person}, task_id="plain-1",
                                queue="calls.commands",
                                headers={"traceparent": "not-a-traceparent"})  # fmt: skip
            ids = [h.command_id for h in handles] + [untraced.command_id, "plain-1"]

            def command_spans() -> dict[str, ReceivedSpan] | None:
                spans = {str(s.attributes.get("messaging.message.id")): s
                         for s in receiver.received() if s.kind == CONSUMER}  # fmt: skip
                return spans if set(ids) <= set(spans) else None

            spans: Any = wait_until(command_spans, 60, "the command spans to arrive")
            batches = {s.span_id: s for s in receiver.received() if s.name == "calls.batch"}
        finally:
            worker.stop()

    assert [o["ok"] for o in outcomes] == [True] * 5 + [False]
    trace_id = format(enrolling.get_span_context().trace_id, "032x")
    parent = format(enrolling.get_span_context().span_id, "016x")
    for handle, outcome in zip(handles, outcomes, strict=True):
        span = spans[handle.command_id]
        assert (span.trace_id, span.parent_span_id) == (trace_id, parent)  # continued
        assert span.name == ("calls.create" if outcome["ok"] else "calls.cancel")
        assert span.service == "calls-worker-under-test"
        assert span.attributes["calls.command.settled"] == "done"
        assert span.attributes["calls.command.outcome"] == (
            "ok" if outcome["ok"] else outcome["error"]["code"])  # fmt: skip
        ((linked_trace, linked_span),) = span.links
        assert linked_span in batches  # the batch that applied it
        assert linked_trace == batches[linked_span].trace_id
        assert batches[linked_span].attributes["messaging.batch.message_count"] >= 1
    assert spans[handles[5].command_id].attributes["calls.command.outcome"] == "not_found"
    # Five creates sent in a burst share batches: group commit, traced all the same.
    assert len({spans[h.command_id].links[0][1] for h in handles[:5]}) < 5
    for own in (untraced.command_id, "plain-1"):  # no trace to continue: a trace of its own
        assert spans[own].parent_span_id == ""
        assert spans[own].trace_id != trace_id


def test_without_an_endpoint_nothing_of_opentelemetry_is_loaded() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    script = (
        "import sys\n"
        "from calls_worker.worker import batch_job, celery_app, tracing\n"
        "from datetime import UTC, datetime\n"
        "from calls_worker.client import CallsClient\n"
        "from calls_worker.wire import command_headers\n"
        "assert tracing.batch_spans([('calls.create', 'x', {'traceparent': 'y'}, (), {})])"
        " is None\n"
        "assert set(command_headers(datetime.now(UTC))) == {'sentAt'}\n"
        "loaded = [m for m in sys.modules if m.startswith('opentelemetry')]\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
