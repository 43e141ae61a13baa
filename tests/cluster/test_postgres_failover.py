"""A PostgreSQL failover under a stream of commands: the primary SIGKILLed at a random
moment, the standby promoted a random while later.

The worker's URL names both servers with ``target_session_attrs=read-write`` (what a
deployment with a standby gives it). Each iteration has a pair, a worker (retry budget 1)
and a beat sweeping every second of its own, and reconciles every command the producer
was told was applied with what the new primary holds, by identity.

- Synchronous replication: nothing acknowledged is lost, nothing doubled.
- Asynchronous: the primary's walsender is stopped (SIGSTOP) a moment before the kill, so
  the commits of that moment reach the primary only. (Stopping the standby's walreceiver
  instead does not make the window: on loopback the walsender's writes wait in the
  receiver's socket buffer, and the walreceiver reads them once continued, after the
  primary died. Measured: 0 lost that way.) They were acknowledged, and the
  promoted standby does not have them: the loss is counted, and must happen (the test
  proves the window it documents).

Either way: no command is given up while there is no primary; the worker pauses and
resumes on the new one; the sweep expires what came due across the switch, the relay
publishes every event the new primary holds, and no two sweeps ever overlap.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import redis

from calls_worker.adapters.db.engine import build_engine
from calls_worker.adapters.db.migrate import upgrade
from calls_worker.client import CallsClient
from calls_worker.wire import PRUNE_TASK, SWEEPS_QUEUE
from tests.cluster.pg_pair import Pair
from tests.cluster.report import Report
from tests.db_world import ISSUED, Db
from tests.e2e.conftest import (
    Process,
    control_app_for,
    free_ports,
    redis_database,
    wait_for_worker,
    wait_until,
    worker_env,
)
from tests.e2e.test_outages import by_identity

ITERATIONS = int(os.environ.get("CALLS_WORKER_CLUSTER_ITERATIONS", "3"))
STREAM = 200  # attempts an iteration, 20 a second
LIMITED = 12  # calls of an organization whose maximum is 1: each attempt makes one due


@pytest.mark.timeout(ITERATIONS * 240)
@pytest.mark.parametrize("synchronous", [True, False], ids=["synchronous", "asynchronous"])
def test_a_failover_under_a_stream_of_commands(
    synchronous: bool, redis_url: str, tmp_path: Path, cluster_report: Report
) -> None:
    seed = int(os.environ.get("CALLS_WORKER_CLUSTER_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    fault = "postgres-failover-" + ("sync" if synchronous else "async")
    for iteration in range(ITERATIONS):
        iteration_seed = rng.randrange(2**32)
        print(f"{fault} iteration {iteration}: seed {iteration_seed}")
        counted = _one_failover(synchronous, redis_url, tmp_path / str(iteration),
                                random.Random(iteration_seed))  # fmt: skip
        cluster_report.record(fault, seed=iteration_seed, **counted)
        if synchronous:
            assert (counted["lost"], counted["doubled"]) == (0, 0), counted
        else:
            assert counted["doubled"] == 0, counted
            # The window was made certain: some acknowledged commits never reached the
            # standby, and the failover lost them.
            assert counted["lost"] > 0, counted


def _one_failover(synchronous: bool, redis_url: str, base: Path,
                  rng: random.Random) -> dict[str, int]:  # fmt: skip
    pair = Pair(base / "pg", synchronous=synchronous)
    pair.start()
    broker = redis_database(redis_url, 2)
    redis.Redis.from_url(broker).flushdb()
    processes: list[Process] = []
    try:
        engine = build_engine(pair.url(), pool_size=2)
        upgrade(engine)
        db = Db(engine)
        unlimited, limited = db.organization(None), db.organization(1)
        env = worker_env(pair.url(), broker, base, CALLS_WORKER_COMMAND_MAX_RETRIES="1",
                         CALLS_WORKER_COMMAND_RETRY_BACKOFF_MAX_SECONDS="1",
                         CALLS_WORKER_SWEEP_INTERVAL_SECONDS="1")  # fmt: skip
        worker = Process(["worker", "-c", "2", "-n", "failover@%h"], env, base / "worker.log")
        processes.append(worker)
        beat = Process(["beat"], {**env, "CALLS_WORKER_METRICS_PORT": str(free_ports(1))},
                       base / "beat.log")
        processes.append(beat)
        control = control_app_for(broker)
        wait_for_worker(control, "failover", worker)
        control.close()
        with CallsClient(broker) as client:

            def create(owner: Any) -> str:
                person = {"personUuid": str(db.person(owner)), "organizationUuid": str(owner)}
                outcome = client.send("create", person).outcome(60)
                assert outcome["ok"], outcome
                return str(outcome["call"]["uuid"])

            calls = [create(unlimited) for _ in range(5)]
            due = [create(limited) for _ in range(LIMITED)]
            handles: list[Any] = []
            due_handles: list[Any] = []

            def stream() -> None:
                for n in range(STREAM):
                    command = {"callUuid": calls[n % 5], "userUuid": str(uuid4()),
                               "attemptedAt": ISSUED}  # fmt: skip
                    handles.append(client.send("add_attempt", command))
                    if n % (STREAM // LIMITED) == 0 and len(due_handles) < LIMITED:
                        command = {"callUuid": due[len(due_handles)], "userUuid": str(uuid4()),
                                   "attemptedAt": ISSUED}  # fmt: skip
                        due_handles.append(client.send("add_attempt", command))
                    time.sleep(0.05)

            producer = threading.Thread(target=stream)
            producer.start()
            time.sleep(rng.uniform(1.0, 7.0))
            engine.dispose()
            if synchronous:
                pair.primary.kill()
            else:
                sender = pair.primary.walsender_pid()
                assert sender is not None, "the primary streams to the standby"
                os.kill(sender, signal.SIGSTOP)
                time.sleep(rng.uniform(0.5, 1.5))  # commits the standby does not get
                pair.primary.kill()  # the stopped walsender with it
            killed_at = time.time()
            time.sleep(rng.uniform(1.0, 4.0))  # no primary at all
            pair.standby.promote()
            producer.join()
            outcomes = [h.outcome(180) for h in handles + due_handles]
        assert all(o["ok"] for o in outcomes), [o for o in outcomes if not o["ok"]][:3]
        engine = build_engine(pair.url(), pool_size=1)
        db = Db(engine)
        sent = {(h.command["callUuid"], h.command["userUuid"]) for h in handles}
        lost, doubled = by_identity(db, calls, sent)
        # Resumed on the new primary: the sweep expires every limited call that has its
        # attempt there, and the relay publishes every event the new primary holds.
        wait_until(lambda: db.sql(
            "SELECT count(*) = 0 FROM calls WHERE uuid = ANY(CAST(:c AS uuid[]))"
            " AND attempt_count >= 1 AND status = 'requested'", c=due).scalar(),
            60, "the sweep to expire the due calls on the new primary")  # fmt: skip
        wait_until(lambda: db.sql(
            "SELECT count(*) = 0 FROM worker_call_events WHERE published_at IS NULL"
        ).scalar(), 60, "the relay to publish every event on the new primary")  # fmt: skip
        # The hourly prune (the outcomes' rotation, the events' partitions) runs there too.
        control = control_app_for(broker)
        pruned = control.send_task(PRUNE_TASK, queue=SWEEPS_QUEUE).get(timeout=60)
        control.close()
        assert pruned["rotated"] is False, pruned  # its retention has not passed
        assert pruned["retentionHours"] == 72, pruned
        runs = db.sql(
            "SELECT finished_at - make_interval(secs => duration_seconds) AS started,"
            " finished_at FROM worker_sweep_runs WHERE NOT skipped ORDER BY finished_at"
        ).all()
        overlaps = sum(1 for a, b in itertools.pairwise(runs)
                       if b.started < a.finished_at)  # fmt: skip
        after = sum(1 for run in runs if run.started.timestamp() > killed_at)
        given_up = db.sql("SELECT count(*) FROM worker_rejected_commands").scalar()
        engine.dispose()
    finally:
        for process in processes:
            process.stop()
        pair.stop()
    log = worker.output()
    assert "takes no more commands off calls.commands" in log, "it paused with no primary"
    assert "the database answers again" in log, "and resumed on the new one"
    assert given_up == 0, "no command was given up for want of a primary"
    assert overlaps == 0, "two sweeps ran at once"
    assert after > 0, "the sweep ran on the new primary"
    return {"commands": len(sent), "lost": lost, "doubled": doubled,
            "sweeps_on_the_new_primary": after}  # fmt: skip
