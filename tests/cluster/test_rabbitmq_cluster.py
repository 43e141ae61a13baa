"""A three-node RabbitMQ cluster losing a node, or its queue's leader, under a stream of
commands and their call events.

``calls.commands`` is a quorum queue with a replica on each node. The worker and the client
are given the three nodes' URLs (``;``-separated, each in an order of its own, so either
may be on the node the fault strikes) and fail over between them. Each iteration sends a
stream of attempts with publisher confirms (a send the broker did not confirm raised, and
was sent again under its command id), strikes at a random moment, and reconciles: every
confirmed command applied once (by identity: the attempt's userUuid), and every event the
outbox holds for the iteration's calls received by a subscriber's quorum queue on the
same cluster (at least once; duplicates are counted, and allowed).

The faults: SIGKILL of the node that leads ``calls.commands``, or of a follower (started
again 1.5-4 s later); the leader's node stopped and started; the leadership moved to
another member, every node staying up; a node cut off from the other two for 20-35 s
(rabbit_cluster.py: iptables rules on ``lo``), then let back.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu
import pytest
from kombu import Connection, Exchange, Queue

from calls_worker.client import CallsClient
from calls_worker.wire import EVENTS_EXCHANGE
from tests.cluster.rabbit_cluster import Cluster
from tests.cluster.report import Report
from tests.db_world import Db
from tests.e2e.conftest import own_worker
from tests.e2e.test_outages import by_identity
from tests.e2e.test_rabbitmq import TIMEOUT, _stream, person_of

ITERATIONS = int(os.environ.get("CALLS_WORKER_CLUSTER_ITERATIONS", "3"))
STREAM = 200
SUBSCRIBER = "cluster-test.events"
FAULTS = ["leader-kill", "follower-kill", "leader-stop-start", "leader-transfer", "minority-cut"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("rabbitmq-cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _subscriber(urls: str) -> Queue:
    """A subscriber's quorum queue for every call event, on the cluster, emptied."""
    queue = Queue(SUBSCRIBER, Exchange(EVENTS_EXCHANGE, type="topic", durable=True),
                  routing_key="call.#", durable=True,
                  queue_arguments={"x-queue-type": "quorum"})  # fmt: skip
    with Connection(urls, connect_timeout=5) as connection:
        bound = queue(connection.default_channel)
        bound.declare()
        bound.purge()
    return queue


def _received(urls: str, queue: Queue) -> list[str]:
    """The event ids waiting in the subscriber's queue, taken off it."""
    ids: list[str] = []
    with Connection(urls, connect_timeout=5) as connection:
        bound = queue(connection.default_channel)
        while (message := bound.get(no_ack=False)) is not None:
            ids.append(message.headers.get("id") or message.payload[1]["event"]["eventId"])
            message.ack()
    return ids


def _strike(fault: str, cluster: Cluster, rng: random.Random, worker_node: str) -> str:
    """The fault, on the node it names; what was struck. ``worker_node``: the node the
    worker connected to first (a cut strikes it or the leader, at random)."""
    leader = cluster.wait_members(3)
    if fault == "leader-transfer":
        was, now = cluster.transfer_leadership()
        return f"leadership {was} -> {now}"
    if fault == "minority-cut":
        node = cluster.node_named(rng.choice([leader, worker_node]))
        observer = next(other for other in cluster.nodes if other is not node)
        cluster.cut_off(node)
        until = time.monotonic() + rng.uniform(20.0, 35.0)
        felt = None
        while time.monotonic() < until:  # past net_ticktime: the peers see it gone
            if felt is None and node.name not in cluster.sees(observer):
                felt = time.monotonic()
            time.sleep(0.5)
        cluster.heal()
        assert felt is not None, f"the cut of {node.name} was not felt by {observer.name}"
        return (f"cut off {node.name}{' (the leader)' if node.name == leader else ''}"
                f"{' (the worker' + chr(39) + 's)' if node.name == worker_node else ''},"
                f" out of the cluster {until - felt:.0f} s")
    if fault == "follower-kill":
        name = rng.choice([node.name for node in cluster.nodes if node.name != leader])
    else:
        name = leader
    node = cluster.node_named(name)
    if fault == "leader-stop-start":
        node.stop()
    else:
        node.kill()
    time.sleep(rng.uniform(1.5, 4.0))
    node.start()
    return f"{fault} {name}"


@pytest.mark.timeout(ITERATIONS * 420)
@pytest.mark.parametrize("fault", FAULTS)
def test_a_cluster_fault_under_a_stream_of_commands(
    fault: str, cluster: Cluster, db: Db, database_url: str, tmp_path: Path,
    cluster_report: Report,
) -> None:  # fmt: skip
    seed = int(os.environ.get("CALLS_WORKER_CLUSTER_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    for iteration in range(ITERATIONS):
        iteration_seed = rng.randrange(2**32)
        print(f"rabbitmq-{fault} iteration {iteration}: seed {iteration_seed}")
        counted = _one(fault, cluster, db, database_url, tmp_path / str(iteration),
                       random.Random(iteration_seed))  # fmt: skip
        cluster_report.record(f"rabbitmq-{fault}", seed=iteration_seed, **counted)
        assert (counted["lost"], counted["doubled"], counted["events_missing"]) == (0, 0, 0), (
            counted
        )


def _one(fault: str, cluster: Cluster, db: Db, database_url: str, base: Path,
         rng: random.Random) -> dict[str, Any]:  # fmt: skip
    base.mkdir(parents=True)
    kombu.pools.reset()
    nodes = [node.url for node in cluster.nodes]
    worker_urls = ";".join(rng.sample(nodes, len(nodes)))
    client_urls = ";".join(rng.sample(nodes, len(nodes)))
    subscriber = _subscriber(client_urls)
    person = person_of(db)
    worker = own_worker(database_url, worker_urls, base, f"cluster{rng.randrange(10**6)}")
    accepted: list[Any] = []
    refused: list[str] = []
    try:
        with CallsClient(client_urls, database_url) as client:
            calls = [client.send("create", person).outcome(TIMEOUT)["call"]["uuid"]
                     for _ in range(5)]  # fmt: skip
            producer = _stream(client, calls, STREAM, 0.05, accepted, refused)
            time.sleep(rng.uniform(1.0, 7.0))
            first = next(node.name for node in cluster.nodes
                         if node.url == worker_urls.split(";")[0])  # fmt: skip
            struck = _strike(fault, cluster, rng, first)
            producer.join()
            outcomes = [handle.outcome(TIMEOUT) for handle in accepted]
        cluster.wait_members(3)
    finally:
        worker.stop()
    # Whether the fault reached the worker: its consumer lost its node and failed over.
    failovers = worker.output().count("Connection to broker lost")
    assert all(o["ok"] for o in outcomes), [o for o in outcomes if not o["ok"]][:3]
    sent = {(h.command["callUuid"], h.command["userUuid"]) for h in accepted}
    lost, doubled = by_identity(db, calls, sent)
    # Every event the outbox holds for these calls has been published (the relay marks an
    # event once the broker confirmed it), and reached the subscriber.
    kept = {str(row[0]) for row in db.sql(
        "SELECT event_id FROM worker_call_events WHERE call_uuid = ANY(CAST(:c AS uuid[]))",
        c=calls).all()}  # fmt: skip
    deadline = time.monotonic() + 60
    received: list[str] = []
    while time.monotonic() < deadline:
        received += _received(client_urls, subscriber)
        if kept <= set(received):
            break
        time.sleep(1)
    return {
        "commands": len(sent), "lost": lost, "doubled": doubled, "resent": len(refused),
        "events": len(kept), "events_missing": len(kept - set(received)),
        "events_twice": len(received) - len(set(received)), "worker_failovers": failovers,
        "struck": struck,
    }  # fmt: skip
