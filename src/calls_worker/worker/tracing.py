"""Traces of commands (OpenTelemetry), exported over OTLP/HTTP when an endpoint is set.

On only when ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is
set (the variables every OpenTelemetry SDK reads; ``OTEL_SDK_DISABLED=true`` turns it off
again). Off, nothing of OpenTelemetry is imported and a batch costs one dictionary lookup.

Celery's own signals (task_prerun and the like, which instrumentations hook) never fire
for commands: a pool process applies them in batches (group commit, batch_job.py). So
the batch path makes the spans itself, in the pool process:

- ``calls.batch``: the batch, from its start in the pool process to its outcomes stored;
- one span per command, named after its task (``calls.create``…), kind CONSUMER, whose
  parent is the producer's span when the message carries a W3C ``traceparent`` header
  (and ``tracestate``): the producer's trace continues through the command's
  application. It starts and ends with its batch (a batch is one transaction: its
  commands commit together) and links to the batch's span. Its attributes: the command
  id, the batch's size, what became of the message (done, retried, gave_up, requeue) and
  the outcome's code.

The standard variables apply as they do for any SDK: ``OTEL_SERVICE_NAME`` (default
``calls-worker``), ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_EXPORTER_OTLP_HEADERS``, the
batch processor's ``OTEL_BSP_*``. Spans are sent by a thread of each pool process, in
batches, and flushed when the process ends.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
CONTEXT_HEADERS = ("traceparent", "tracestate")
SERVICE_NAME = "calls-worker"

_providers: dict[int, Any] = {}
"""This process's tracer provider (by pid: a forked pool process makes its own; the
exporting thread of its parent did not come with it)."""


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether spans are exported: an OTLP endpoint is set, and the SDK not disabled."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(environ.get(variable, "").strip() for variable in ENDPOINT_VARIABLES)


def _tracer() -> Any:
    pid = os.getpid()
    if pid not in _providers:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        name = os.environ.get("OTEL_SERVICE_NAME") or SERVICE_NAME
        provider = TracerProvider(resource=Resource.create({"service.name": name}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        _providers.clear()
        _providers[pid] = provider
    return _providers[pid].get_tracer("calls_worker")


def shutdown() -> None:
    """Send what this process has not sent yet (a pool process that ends)."""
    provider = _providers.pop(os.getpid(), None)
    if provider is not None:
        provider.shutdown()


class BatchSpans:
    """The spans of one batch: ``end`` them with what became of each message."""

    def __init__(self, items: Sequence[tuple[str, str, Mapping[str, Any], Any, Any]]) -> None:
        from opentelemetry.trace import Link, SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        tracer = _tracer()
        propagator = TraceContextTextMapPropagator()
        size = len(items)
        self._batch = tracer.start_span(
            "calls.batch", kind=SpanKind.INTERNAL,
            attributes={"messaging.batch.message_count": size},
        )  # fmt: skip
        link = [Link(self._batch.get_span_context())]
        self._commands = []
        for task_name, command_id, request, _args, _kwargs in items:
            headers = request if isinstance(request, Mapping) else {}
            carrier = {key: headers[key] for key in CONTEXT_HEADERS
                       if isinstance(headers.get(key), str)}  # fmt: skip
            self._commands.append(tracer.start_span(
                task_name, context=propagator.extract(carrier), kind=SpanKind.CONSUMER,
                links=link,
                attributes={
                    "messaging.system": "celery",
                    "messaging.operation.type": "process",
                    "messaging.destination.name": "calls.commands",
                    "messaging.message.id": str(command_id),
                    "messaging.batch.message_count": size,
                },
            ))  # fmt: skip

    def end(self, settled: Sequence[tuple[str, str | None]]) -> None:
        """``settled``: for each message, what became of it and its outcome's code."""
        for span, (what, code) in zip(self._commands, settled, strict=True):
            span.set_attribute("calls.command.settled", what)
            if code is not None:
                span.set_attribute("calls.command.outcome", code)
            span.end()
        self._batch.end()

    def failed(self, error: BaseException) -> None:
        """The batch raised: every span ends with the error."""
        from opentelemetry.trace import Status, StatusCode

        for span in (*self._commands, self._batch):
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, repr(error)))
            span.end()


def batch_spans(
    items: Sequence[tuple[str, str, Mapping[str, Any], Any, Any]],
) -> BatchSpans | None:
    """The spans of a batch starting now; None (nothing imported) when tracing is off."""
    return BatchSpans(items) if enabled() else None
