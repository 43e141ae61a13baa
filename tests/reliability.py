"""What the single-scenario fault tests saw, shown at the end of a test run.

docs/reliability.md is the fault soak's report (tests/chaos); these records are the
deterministic scenarios beside it, each injected at one chosen moment.
"""

from __future__ import annotations

from dataclasses import dataclass

SCENARIOS: dict[str, tuple[str, str, str]] = {
    "killed-before-commit": (
        "worker killed mid-command, before the commit",
        "SIGKILL of the pool process while its transaction waits on a row lock",
        "redelivered and applied exactly once",
    ),
    "killed-after-commit": (
        "worker killed after the commit, before the ack",
        "SIGKILL of the pool process right after its commit (a fault loaded with --include)",
        "redelivered; the redelivery returns the first outcome and changes nothing",
    ),
    "warm-shutdown": (
        "warm shutdown",
        "SIGTERM to a worker with commands running and waiting",
        "running ones finish, the rest are handled by another worker; none lost or doubled",
    ),
    "database-outage": (
        "PostgreSQL outage",
        "a throw-away PostgreSQL stopped for 10 s, ten times the worker's retry budget"
        " (1 retry, 1 s apart), under a stream of commands and a binary message",
        "the worker stops taking commands until the database answers; none given up (the"
        " ones it held retry past their budget), then all applied once; the binary message"
        " waits and is kept once the database answers; none idle in transaction",
    ),
    "broker-restart": (
        "Redis restart",
        "a throw-away Redis (append-only) shut down and started again under a stream of commands",
        "every command the producer saw accepted is applied once",
    ),
    "rabbitmq-worker-killed": (
        "RabbitMQ: workers killed at random",
        "SIGKILL under a stream of 300 commands at random moments: the pool process three"
        " times, the whole worker twice (started again at once)",
        "every command applied once; nothing waits for a timeout to come back",
    ),
    "rabbitmq-node-restart": (
        "RabbitMQ: node restarted",
        "a throw-away RabbitMQ node stopped and started twice at random moments under a"
        " stream of 200 commands; sends it did not confirm are sent again",
        "every send the broker confirmed is applied once",
    ),
    "rabbitmq-database-outage": (
        "RabbitMQ: 5-minute PostgreSQL outage",
        "a throw-away PostgreSQL stopped for five minutes under a stream of 100 commands",
        "the worker stops taking commands; nothing dead-lettered; all applied once after",
    ),
    "two-beats": (
        "two beats",
        "two beat processes, sweeping every second, while calls reach their limit",
        "each exhausted call expired once",
    ),
    "sweep-command-race": (
        "sweep vs command race",
        "completes, expires and attempts racing batched sweeps on the same calls (two connections)",
        "exactly one end state per call; a completed call never expired",
    ),
    "signed-messages": (
        "forged, unsigned, replayed and relabelled messages",
        "a worker that accepts only signed commands gets a forged and an unsigned one, a"
        " captured signed attempt sent again under two new ids, a signed cancel relabelled as"
        " an expire, and a binary body",
        "all refused and kept with the reason, the worker alive; the signed ones handled once",
    ),
    "due-record-race": (
        "due record vs changes of a maximum",
        "a maximum lowered or raised, or a person moved, while an attempt is added or the call"
        " completed (two connections, both statements before either commit, random orders)",
        "the due record lists exactly the calls the rule says are due (lost: due, unlisted;"
        " doubled: listed, not due)",
    ),
    "relay-kill": (
        "call-event relays killed",
        "two relays, each worker killed (SIGKILL, its whole process group) with probability 0.3"
        " after every round in which its relay published and before it marked, over a stream"
        " of creates, attempts, completes, cancels and sweeps; restarted each time",
        "every event the database holds reaches the subscriber's queue (lost), none it does"
        " not hold; a call's events in order once repeats are dropped, and no more repeats"
        " than one batch per kill (doubled)",
    ),
    "clock-skew": (
        "clock skew",
        "frozen worker clock, producer timestamps hours ahead, and a year ahead",
        "the data decides the outcome; absurd future timestamps refused",
    ),
}


@dataclass
class Record:
    runs: int = 0
    commands: int = 0
    lost: int = 0
    doubled: int = 0
    failed: int = 0
    """Test runs of the scenario that failed (whether or not they got to count)."""


class Reliability:
    """Collects what the scenario tests saw during one test session."""

    def __init__(self) -> None:
        self.records: dict[str, Record] = {}

    def record(self, scenario: str, *, commands: int, lost: int, doubled: int) -> None:
        assert scenario in SCENARIOS, scenario
        record = self.records.setdefault(scenario, Record())
        record.runs += 1
        record.commands += commands
        record.lost += lost
        record.doubled += doubled

    def fail(self, scenario: str) -> None:
        """A test of ``scenario`` failed: its row says so, counted or not."""
        assert scenario in SCENARIOS, scenario
        self.records.setdefault(scenario, Record()).failed += 1

    def complete(self) -> bool:
        return not self.missing()

    def missing(self) -> list[str]:
        """The scenarios no test recorded in this session."""
        return [key for key in SCENARIOS if key not in self.records]

    def markdown(self) -> str:
        lines = [
            "Single-scenario fault tests, each at one chosen moment (the soak: reliability.md)",
            "",
            "| scenario | how | must hold | test runs | failed | commands or calls | lost"
            " | doubled |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for key, (name, how, must) in SCENARIOS.items():
            if (r := self.records.get(key)) is None:
                continue  # not run in this session (a selection, or stopped early)
            lines.append(f"| {name} | {how} | {must} | {max(r.runs, r.failed)} | {r.failed}"
                         f" | {r.commands} | {r.lost} | {r.doubled} |")  # fmt: skip
        lines += [
            "",
            "",
        ]
        return "\n".join(lines)


def counted(applied: list[int], expected: int) -> tuple[int, int]:
    """(lost, doubled) of commands whose effects were counted ``applied`` per target."""
    lost = sum(max(0, expected - n) for n in applied)
    doubled = sum(max(0, n - expected) for n in applied)
    return lost, doubled
