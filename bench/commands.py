"""Command throughput through the real worker, beside no-op Celery tasks, same run.

    python -m bench.commands [--commands 5000] [--rounds 5] [--batch 32] [--batch-wait-ms 10]

Four workers run with the production settings (Redis broker and result backend, JSON,
late acks, a prefork pool of 2, task events) side by side, each on its own queue, and are
measured in turns. Each round sends a burst of no-op tasks to the plain no-op worker
(prefetch 1, one task at a time: Celery's cost per task), a burst to the batched no-op
(batched exactly as commands are: the ceiling of group commit), then creates and one
add-attempt for each call created, to the worker with group commit and to one with
``CALLS_WORKER_COMMAND_BATCH_SIZE=1`` (each command on its own, as before group commit).
A fifth worker, with ``CALLS_WORKER_EVENTS=off``, takes the same creates and add-attempts:
the cost of call events (the others write one per command, and their relays publish it
to a subscriber queue bound for every kind, as in production with one subscriber).
A sixth traces every command (OpenTelemetry, ``OTEL_EXPORTER_OTLP_ENDPOINT`` set, the
SDK's default batch processor) to an OTLP/HTTP receiver this benchmark starts on
127.0.0.1 (tests/otlp.py: it decodes and keeps every span, as a collector would), each
message carrying a producer's ``traceparent``: the cost of tracing, against the worker
without it in the same round, and the spans that arrived against those expected.
A burst is timed from the first publish to the last outcome stored, and compared with
the no-op bursts of its round; the round with the median ratio is the figure (the
machine's speed drifts between rounds, so rates are only compared within one). Goals:
both commands ≥ 1.0× the no-op task (moonshot 1.5×), and ≥ 0.8× the batched no-op;
with events ≥ 0.9× without; traced ≥ 0.9× untraced.

The lag of call events under that load: for every event the bursts wrote, from its
change's transaction to the relay's mark after the broker accepted it (the outbox's
``recorded_at`` and ``published_at``). Goal: p99 ≤ 1 s.

Then the latency: creates sent at a steady 10% of the measured peak, each timed from its
publish to its outcome's arrival (the result backend's publish); goal p99 ≤ batch wait +
50 ms.

Also reported, per command: the CPU time of the worker's main process, its pool
processes, PostgreSQL, Redis and the producer (all on the same machine), which is where
the time of a command goes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import psutil
import redis
from celery import Celery

from bench.common import Row, print_table, write_results
from bench.fixtures import broker, fresh_database, seed_person
from bench.noop_worker import BATCHED_NOOP_QUEUE, NOOP_QUEUE, NOOP_TASK
from bench.workers import bench_env, process, wait_for_ping
from calls_worker.config import Settings
from calls_worker.wire import COMMANDS_QUEUE, TASK_NAMES, celery_config
from tests.otlp import otlp_receiver

Message = tuple[str, str, dict[str, Any], dict[str, str]]
"""A task name, its queue, its keyword arguments and its headers of ours."""

CONCURRENCY = "2"
SINGLE_QUEUE = "bench.commands.single"
"""The queue of the worker that applies each command on its own (batch size 1)."""
OFF_QUEUE = "bench.commands.events-off"
"""The queue of the worker with call events off."""
TRACED_QUEUE = "bench.commands.traced"
"""The queue of the worker that traces every command."""
SUBSCRIBER_QUEUE = "bench.commands.call-events"
PARTS = ("main", "pool", "postgres", "redis", "producer")


def publish_and_wait(app: Celery, broker: str, messages: list[Message]) -> float:
    """Seconds from the first publish until every outcome is stored."""
    connection = redis.Redis.from_url(broker)
    ids = [str(uuid4()) for _ in messages]
    started = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for task_id, (name, queue, kwargs, headers) in zip(ids, messages, strict=True):
            app.send_task(name, kwargs=kwargs, task_id=task_id, queue=queue, producer=producer,
                          headers=headers)  # fmt: skip
    keys = [f"celery-task-meta-{task_id}" for task_id in ids]
    for start in range(0, len(keys), 1000):  # outcomes arrive roughly in publishing order
        chunk = keys[start : start + 1000]
        while connection.exists(*chunk) < len(chunk):
            time.sleep(0.02)
    seconds = time.perf_counter() - started
    connection.close()
    return seconds


def _cpu_seconds(processes: Iterable[psutil.Process]) -> float:
    total = 0.0
    for p in processes:
        try:
            times = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _named(prefix: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith(prefix)]


class CpuMeter:
    """CPU seconds spent by each part of the system during a burst."""

    def __init__(self, worker_pid: int) -> None:
        self._worker = psutil.Process(worker_pid)
        self._me = psutil.Process()

    def _read(self) -> dict[str, float]:
        return {
            "main": _cpu_seconds([self._worker]),
            "pool": _cpu_seconds(self._worker.children(recursive=True)),
            "postgres": _cpu_seconds(_named("postgres")),
            "redis": _cpu_seconds(_named("redis")),
            "producer": _cpu_seconds([self._me]),
        }

    def measure(self, burst: Callable[[], float]) -> tuple[float, dict[str, float]]:
        before = self._read()
        seconds = burst()
        after = self._read()
        return seconds, {part: after[part] - before[part] for part in PARTS}


DEFAULT_BATCH: int = Settings.model_fields["command_batch_size"].default
DEFAULT_BATCH_WAIT_MS: int = Settings.model_fields["command_batch_wait_ms"].default


def run(count: int, rounds: int, batch: int = DEFAULT_BATCH,
        batch_wait_ms: int = DEFAULT_BATCH_WAIT_MS) -> list[Row]:  # fmt: skip
    logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    kinds = ("noop", "noop_batched", "create", "add_attempt", "create_single",
             "add_attempt_single", "create_off", "add_attempt_off", "create_traced",
             "add_attempt_traced")  # fmt: skip
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    cpu: dict[str, list[dict[str, float]]] = {kind: [] for kind in rates}
    with (fresh_database("calls_worker_bench_commands") as url, broker() as broker_url,
          otlp_receiver() as receiver):  # fmt: skip
        organization, person = seed_person(url, None)
        app = Celery("bench-producer", set_as_current=False)
        app.conf.update(celery_config(broker_url, broker_url))
        env = bench_env(url, broker_url, CALLS_WORKER_COMMAND_BATCH_SIZE=str(batch),
                        CALLS_WORKER_COMMAND_BATCH_WAIT_MS=str(batch_wait_ms))  # fmt: skip
        single_env = {**env, "CALLS_WORKER_COMMAND_BATCH_SIZE": "1"}
        off_env = {**env, "CALLS_WORKER_EVENTS": "off"}
        traced_env = {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                      "OTEL_SERVICE_NAME": "calls-worker-bench"}  # fmt: skip
        noop_argv = ["-m", "bench.noop_worker", broker_url, "--concurrency", CONCURRENCY]
        batched_argv = [*noop_argv, "--queue", BATCHED_NOOP_QUEUE, "--batch", str(batch),
                        "--batch-wait-ms", str(batch_wait_ms), "--name", "noopbatched"]  # fmt: skip
        worker_argv = ["-m", "calls_worker", "worker", "-Q", COMMANDS_QUEUE, "-c", CONCURRENCY,
                       "-n", "bench@%h"]  # fmt: skip
        single_argv = ["-m", "calls_worker", "worker", "-Q", SINGLE_QUEUE, "-c", CONCURRENCY,
                       "-n", "single@%h"]  # fmt: skip
        off_argv = ["-m", "calls_worker", "worker", "-Q", OFF_QUEUE, "-c", CONCURRENCY,
                    "-n", "off@%h"]  # fmt: skip
        traced_argv = ["-m", "calls_worker", "worker", "-Q", TRACED_QUEUE, "-c", CONCURRENCY,
                       "-n", "traced@%h"]  # fmt: skip
        subscriber(broker_url)
        try:
            with (
                process(noop_argv, env, logs / "noop.log") as noop,
                process(batched_argv, env, logs / "noop-batched.log") as noop_batched,
                process(worker_argv, env, logs / "worker.log") as worker,
                process(single_argv, single_env, logs / "single.log") as single,
                process(off_argv, off_env, logs / "off.log") as off,
                process(traced_argv, traced_env, logs / "traced.log") as traced,
            ):
                for name in ("noop@", "noopbatched@", "bench@", "single@", "off@", "traced@"):
                    wait_for_ping(broker_url, name)
                meters = {
                    "noop": CpuMeter(noop.pid), "noop_batched": CpuMeter(noop_batched.pid),
                    "worker": CpuMeter(worker.pid), "single": CpuMeter(single.pid),
                    "off": CpuMeter(off.pid), "traced": CpuMeter(traced.pid),
                }  # fmt: skip
                for _ in range(rounds):
                    for kind, messages in _round(count, organization, person).items():
                        meter = meters[_worker_of(kind)]
                        seconds, spent = meter.measure(
                            partial(publish_and_wait, app, broker_url, messages)
                        )
                        rates[kind].append(count / seconds)
                        cpu[kind].append({part: 1000 * s / count for part, s in spent.items()})
                    subscriber(broker_url)  # emptied: what it received costs Redis memory
                traced_sent = 2 * count * rounds
                deadline = time.monotonic() + 60  # the last spans go within 5 s (the SDK's)
                while (time.monotonic() < deadline
                       and len(_command_spans(receiver)) < traced_sent):  # fmt: skip
                    time.sleep(0.5)
                spans = {"expected": traced_sent, "received": len(_command_spans(receiver)),
                         "batch_spans": sum(s.name == "calls.batch"
                                            for s in receiver.received()),
                         "continued_the_producers_trace": sum(
                             s.parent_span_id != "" for s in _command_spans(receiver))}  # fmt: skip
                peak = statistics.median(rates["create"])
                latencies = send_to_outcome(app, broker_url, organization, person, peak * 0.1)
                lags = event_lags(url)
        finally:
            app.close()
            subscriber(broker_url, delete=True)
    return _rows(count, rounds, batch, batch_wait_ms, rates, cpu, latencies, peak, lags, spans)


def _command_spans(receiver: Any) -> list[Any]:
    return [s for s in receiver.received() if s.name.startswith("calls.") and s.kind == 5]


def subscriber(broker_url: str, *, delete: bool = False) -> None:
    """The queue of one subscriber to every kind of call event, declared and emptied."""
    from kombu import Connection, Queue

    from calls_worker.worker.relay import EXCHANGE

    with Connection(broker_url) as connection:
        queue = Queue(SUBSCRIBER_QUEUE, EXCHANGE, routing_key="call.#", durable=True)(
            connection.default_channel)  # fmt: skip
        queue.declare()
        queue.purge()
        if delete:
            queue.delete()


def event_lags(database_url: str, timeout: float = 120) -> list[float]:
    """Once every event is published: for each, seconds from its change to its mark."""
    from sqlalchemy import text

    from calls_worker.adapters.db.engine import build_engine

    engine = build_engine(database_url, pool_size=1)
    try:
        deadline = time.monotonic() + timeout
        with engine.connect() as connection:
            while connection.execute(text(
                "SELECT count(*) FROM worker_call_events WHERE published_at IS NULL"
            )).scalar_one():  # fmt: skip
                connection.rollback()
                if time.monotonic() > deadline:
                    raise RuntimeError("the relay did not publish every event")
                time.sleep(0.2)
            return [float(lag) for (lag,) in connection.execute(text(
                "SELECT extract(epoch FROM published_at - recorded_at) FROM worker_call_events"
            ))]  # fmt: skip
    finally:
        engine.dispose()


def _rows(count: int, rounds: int, batch: int, batch_wait_ms: int,
          rates: dict[str, list[float]], cpu: dict[str, list[dict[str, float]]],
          latencies: list[float], peak: float, lags: list[float],
          spans: dict[str, int]) -> list[Row]:  # fmt: skip
    rows = []
    for kind in ("create", "add_attempt"):
        # Each round's burst is compared with the no-op bursts sent just before it; the
        # round with the median ratio is the figure (the lower middle one for an even count).
        for baseline, goal_ratio, goal in (
            ("noop", 1.0, "≥ 1.0× baseline (moonshot 1.5×)"),
            ("noop_batched", 0.8, "≥ 0.8× baseline"),
            ("single", None, "(before group commit, for comparison)"),
            ("off", 0.9, "≥ 0.9× baseline"),
            ("traced", None, ""),
        ):
            own = baseline in ("single", "off", "traced")
            base_rates = rates[f"{kind}_{baseline}" if own else baseline]
            ratios = [rate / base for rate, base in zip(rates[kind], base_rates, strict=True)]
            middle = sorted(range(rounds), key=ratios.__getitem__)[(rounds - 1) // 2]
            rate, base_rate = rates[kind][middle], base_rates[middle]
            base_cpu = cpu[f"{kind}_{baseline}" if own else baseline]
            details = {
                "commands": count,
                "rounds": rounds,
                "batch_size": batch,
                "batch_wait_ms": batch_wait_ms,
                "statistic": "the round with the median ratio",
                "concurrency": int(CONCURRENCY),
                "rates": [round(r, 1) for r in rates[kind]],
                "baseline_rates": [round(r, 1) for r in base_rates],
                "ratios": [round(r, 3) for r in ratios],
                "cpu_ms_per_command": _median_parts(cpu[kind]),
                "baseline_cpu_ms_per_task": _median_parts(base_cpu),
            }
            label = {"noop": "no-op Celery task /s",
                     "noop_batched": "no-op batched the same way /s",
                     "single": f"{kind} with batch size 1 /s",
                     "off": f"{kind} with events off /s",
                     "traced": f"{kind} untraced /s"}[baseline]  # fmt: skip
            met = True if goal_ratio is None else rate >= goal_ratio * base_rate
            versus = {"noop": "no-op", "noop_batched": "batched no-op",
                      "single": "batch size 1", "off": "events off",
                      "traced": "untraced"}[baseline]  # fmt: skip
            if baseline == "traced":  # the traced worker against the one that is not
                ratios = [base / rate for rate, base in zip(rates[kind], base_rates, strict=True)]
                middle = sorted(range(rounds), key=ratios.__getitem__)[(rounds - 1) // 2]
                rate, base_rate = base_rates[middle], rates[kind][middle]
                met = rate >= 0.9 * base_rate and spans["received"] == spans["expected"]
                details |= {"ratios": [round(r, 3) for r in ratios], "spans": spans,
                            "rates": [round(r, 1) for r in base_rates],
                            "baseline_rates": [round(r, 1) for r in rates[kind]],
                            "cpu_ms_per_command": _median_parts(base_cpu),
                            "baseline_cpu_ms_per_task": _median_parts(cpu[kind])}  # fmt: skip
                rows.append(Row("commands", f"{kind} commands/s traced (OTLP/HTTP) vs untraced",
                                rate, "/s", label, base_rate,
                                "≥ 0.9× baseline, every span received", met, details))  # fmt: skip
                continue
            rows.append(Row("commands", f"{kind} commands/s ({count:,}, batches ≤ {batch})"
                            f" vs {versus}", rate, "/s", label, base_rate, goal, met,
                            details))  # fmt: skip
    p99 = _percentile(latencies, 99) * 1000
    rows.append(Row(
        "commands", f"p99 send → outcome at 10% of peak ({peak * 0.1:.0f} creates/s)", p99, "ms",
        "batch wait + 50 ms", batch_wait_ms + 50.0, "≤ baseline", p99 <= batch_wait_ms + 50,
        {"sent": len(latencies), "p50_ms": round(_percentile(latencies, 50) * 1000, 2),
         "p90_ms": round(_percentile(latencies, 90) * 1000, 2),
         "max_ms": round(max(latencies) * 1000, 2), "peak_creates_per_s": round(peak, 1)},
    ))  # fmt: skip
    lag_p99 = _percentile(lags, 99)
    rows.append(Row(
        "commands", f"call-event lag p99 under the bursts ({len(lags):,} events)", lag_p99, "s",
        "", None, "≤ 1 s", lag_p99 <= 1.0,
        {"events": len(lags), "p50_s": round(_percentile(lags, 50), 3),
         "p90_s": round(_percentile(lags, 90), 3), "max_s": round(max(lags), 3),
         "measured": "outbox recorded_at (the change's transaction) to published_at (the"
                     " relay's mark, after the broker accepted it)"},
    ))  # fmt: skip
    return rows


def _worker_of(kind: str) -> str:
    if kind.startswith("noop"):
        return kind
    for own in ("single", "off", "traced"):
        if kind.endswith(f"_{own}"):
            return own
    return "worker"


def _percentile(values: list[float], percent: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(percent / 100 * (len(ordered) - 1)))]


def send_to_outcome(app: Celery, broker: str, organization: UUID, person: UUID, rate: float,
                    seconds: float = 20.0) -> list[float]:  # fmt: skip
    """Creates sent at ``rate`` a second for ``seconds``; for each, the time from its publish
    to the result backend's announcement of its outcome (what a waiting producer hears)."""
    connection = redis.Redis.from_url(broker)
    # redis-py types pubsub() from 8.2 on; through a typed name it checks on 8.1 too.
    make_listener: Callable[..., redis.client.PubSub] = connection.pubsub
    listener = make_listener(ignore_subscribe_messages=True)
    listener.psubscribe("celery-task-meta-*")
    listener.get_message(timeout=1.0)
    sent: dict[str, float] = {}
    heard: dict[str, float] = {}

    def listen(until: float) -> None:
        while time.perf_counter() < until:
            left = until - time.perf_counter()
            message = listener.get_message(timeout=max(0.0, min(0.005, left)))
            if message is not None:
                heard[message["channel"].decode().removeprefix("celery-task-meta-")] = (
                    time.perf_counter()
                )

    count = max(1, int(rate * seconds))
    interval = 1 / rate
    started = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for n in range(count):
            listen(started + n * interval)
            task_id = str(uuid4())
            command = {"personUuid": str(person), "organizationUuid": str(organization),
                       "issuedAt": datetime.now(UTC).isoformat()}  # fmt: skip
            sent[task_id] = time.perf_counter()
            app.send_task(TASK_NAMES["create"], kwargs={"command": command}, task_id=task_id,
                          queue=COMMANDS_QUEUE, producer=producer)  # fmt: skip
    deadline = time.perf_counter() + 30
    while len(heard.keys() & sent.keys()) < len(sent) and time.perf_counter() < deadline:
        listen(time.perf_counter() + 0.1)
    listener.close()
    connection.close()
    missing = len(sent) - len(heard.keys() & sent.keys())
    if missing:
        raise RuntimeError(f"{missing} of {len(sent)} outcomes were not announced within 30 s")
    return [heard[task_id] - at for task_id, at in sent.items()]


def _round(count: int, organization: UUID, person: UUID) -> dict[str, list[Message]]:
    """One round's bursts, in the order they are sent: fresh calls each round."""
    now = datetime.now(UTC).isoformat()
    create, add_attempt = TASK_NAMES["create"], TASK_NAMES["add_attempt"]
    bursts: dict[str, list[Message]] = {
        "noop": [(NOOP_TASK, NOOP_QUEUE, {"command": {}}, {}) for _ in range(count)],
        "noop_batched": [
            (NOOP_TASK, BATCHED_NOOP_QUEUE, {"command": {}}, {}) for _ in range(count)
        ],
    }
    for suffix, queue in (("", COMMANDS_QUEUE), ("_single", SINGLE_QUEUE), ("_off", OFF_QUEUE),
                          ("_traced", TRACED_QUEUE)):  # fmt: skip
        calls = [str(uuid4()) for _ in range(count)]
        traced = suffix == "_traced"
        bursts[f"create{suffix}"] = [(create, queue, {"command": {
            "uuid": call, "personUuid": str(person), "organizationUuid": str(organization),
            "issuedAt": now}}, _traceparent() if traced else {}) for call in calls]  # fmt: skip
        bursts[f"add_attempt{suffix}"] = [(add_attempt, queue, {"command": {
            "callUuid": call, "userUuid": str(person), "attemptedAt": now,
            "issuedAt": now}}, _traceparent() if traced else {}) for call in calls]  # fmt: skip
    return bursts


def _traceparent() -> dict[str, str]:
    """A producer's W3C trace context: a trace and a span of its own, sampled."""
    return {"traceparent": f"00-{uuid4().hex}-{uuid4().hex[:16]}-01"}


def _median_parts(samples: list[dict[str, float]]) -> dict[str, float]:
    return {part: round(statistics.median(s[part] for s in samples), 2) for part in PARTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--batch-wait-ms", type=int, default=DEFAULT_BATCH_WAIT_MS)
    arguments = parser.parse_args()
    rows = run(arguments.commands, arguments.rounds, arguments.batch, arguments.batch_wait_ms)
    print_table(rows)
    for row in rows:
        if "rates" not in row.details:
            print(f"  {row.figure}: {row.details}")
            continue
        print(f"  {row.figure} vs {row.baseline}: rounds {row.details['rates']},"
              f" baseline {row.details['baseline_rates']}, ratios {row.details['ratios']}")
        print(f"    CPU ms per command {row.details['cpu_ms_per_command']}")
        print(f"    CPU ms per baseline {row.details['baseline_cpu_ms_per_task']}")
    write_results(rows)


if __name__ == "__main__":
    main()
