"""Three throw-away RabbitMQ nodes of a test's own (tests/e2e/rabbitmq_node.py's, each with
its own name, ports and data folder) joined into one cluster on loopback.

A node can be cut off from the others (a minority partition) with iptables rules on
``lo``: each node runs as a group of its own, and the rules drop the Erlang distribution
traffic between the cut node's group and the others' distribution ports, both ways. Its
AMQP port stays open to clients, as a node cut off from its peers but not from every
client would. The nodes run with ``cluster_partition_handling = pause_minority`` (the
setting RabbitMQ advises for three nodes and more) and a 10 s ``net_ticktime``, so a cut
is noticed within seconds rather than a minute.
"""

from __future__ import annotations

import grp
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

from tests.conftest import unreachable
from tests.e2e.rabbitmq_node import RabbitNode

QUEUE = "calls.commands"
CONF = "cluster_partition_handling = pause_minority\nnet_ticktime = 10\n"


def _group(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        subprocess.run(["groupadd", "--system", name], check=True)
        return grp.getgrnam(name).gr_gid


class Cluster:
    def __init__(self, base: Path, size: int = 3) -> None:
        self.nodes = [RabbitNode(base / f"node{n}", conf=CONF, group=_group(f"calls-rabbit{n}"))
                      for n in range(size)]  # fmt: skip
        self._cut: list[list[str]] = []

    def urls(self) -> str:
        """The broker URL a deployment gives the worker and the client: every node, in
        order, ``;``-separated (Celery's list of failover brokers)."""
        return ";".join(node.url for node in self.nodes)

    def start(self) -> None:
        first, *others = self.nodes
        first.start()
        for node in others:
            node.start()
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
        running = first.ctl("cluster_status", "--formatter", "json")
        for node in self.nodes:
            assert node.name in running, f"{node.name} is not in the cluster: {running}"

    def node_named(self, name: str) -> RabbitNode:
        return next(node for node in self.nodes if node.name == name)

    def running(self) -> list[RabbitNode]:
        return [node for node in self.nodes if node.process is not None]

    def ctl(self, *args: str) -> str:
        """rabbitmqctl on the first running node."""
        return self.running()[0].ctl(*args)

    def members(self, queue: str = QUEUE) -> tuple[str, list[str]]:
        """The queue's leader and its members (node names)."""
        out = self.ctl("list_queues", "-q", "--no-table-headers", "name", "leader", "members")
        for line in out.splitlines():
            parts = line.split(None, 2)
            if parts and parts[0] == queue and len(parts) == 3:
                return parts[1], re.findall(r"[\w.-]+@[\w.-]+", parts[2])
        raise AssertionError(f"no queue {queue}: {out}")

    def status(self, queue: str = QUEUE) -> list[dict[str, object]]:
        """``rabbitmq-queues quorum_status``: a row per member (its node, Raft state, ...)."""
        out = self.running()[0].ctl("quorum_status", queue, "--formatter", "json",
                                    program="rabbitmq-queues")  # fmt: skip
        rows: list[dict[str, object]] = json.loads(out)
        return rows

    def wait_members(self, count: int, queue: str = QUEUE, timeout: float = 120) -> str:
        """Until the queue has a leader and ``count`` members that follow it; its leader."""
        deadline = time.monotonic() + timeout
        seen: object = None
        while time.monotonic() < deadline:
            try:
                seen = rows = self.status(queue)
                states = {str(row["Node Name"]): str(row["Raft State"]) for row in rows}
                leaders = [node for node, state in states.items() if state == "leader"]
                following = [node for node, state in states.items() if state == "follower"]
                if len(leaders) == 1 and 1 + len(following) >= count:
                    return leaders[0]
            except Exception as error:  # a node on its way up or down
                seen = error
            time.sleep(0.5)
        raise AssertionError(f"{queue} did not have {count} members in step: {seen}")

    def transfer_leadership(self, queue: str = QUEUE) -> tuple[str, str]:
        """The queue's leader handed to another member, every node staying up (RabbitMQ
        3.10's CLI has no command for it: Ra's own transfer, through ``eval``)."""
        leader, members = self.members(queue)
        target = next(member for member in members if member != leader)
        out = self.node_named(leader).ctl("eval", _TRANSFER.format(
            queue=queue, leader=leader, target=target))  # fmt: skip
        if "ok" not in out and "already_leader" not in out:
            raise RuntimeError(f"transfer of {queue} to {target}: {out}")
        return leader, target

    def cut_off(self, node: RabbitNode) -> None:
        """A minority partition: ``node`` and its peers no longer reach each other."""
        if shutil.which("iptables") is None:
            unreachable("iptables is not installed: no partition of the cluster's nodes")
        others = [other for other in self.nodes if other is not node]
        ports = ",".join(str(other.dist_port) for other in others)
        rules = [["-m", "owner", "--gid-owner", str(node.group), "-p", "tcp",
                  "-m", "multiport", "--dports", ports, "-j", "DROP"]]  # fmt: skip
        rules += [["-m", "owner", "--gid-owner", str(other.group), "-p", "tcp",
                   "--dport", str(node.dist_port), "-j", "DROP"] for other in others]  # fmt: skip
        for rule in rules:
            subprocess.run(["iptables", "-A", "OUTPUT", "-o", "lo", *rule], check=True)
            self._cut.append(rule)

    def sees(self, observer: RabbitNode) -> list[str]:
        """The nodes ``observer`` counts running in its cluster."""
        status = json.loads(observer.ctl("cluster_status", "--formatter", "json"))
        return list(status.get("running_nodes", []))

    def heal(self) -> None:
        while self._cut:
            rule = self._cut.pop()
            subprocess.run(["iptables", "-D", "OUTPUT", "-o", "lo", *rule], check=True)

    def stop(self) -> None:
        self.heal()
        for node in self.nodes:
            node.kill()


# The queue's Ra cluster name is that of its record.
_TRANSFER = (
    "{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, <<\"{queue}\">>)),"
    " {{Name, _}} = amqqueue:get_pid(Q),"
    " ra:transfer_leadership({{Name, '{leader}'}}, {{Name, '{target}'}})."
)
