"""docs/reliability.md, from a full soak's counts (tests/chaos/__main__.py writes it)."""

from __future__ import annotations

from pathlib import Path

from tests.chaos.soak import Result, summary

REPORT = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"

HOW = {
    "pool-kill": "SIGKILL of the pool process, while it runs a command when it can be caught so",
    "main-kill": "SIGKILL of the worker's main process (and its pool); a new worker starts",
    "sigterm": "SIGTERM (warm shutdown); a new worker starts",
    "postgres-restart": "PostgreSQL stopped for 1.5–4 s, then started",
    "broker-restart": "Redis (append-only) shut down for 1.5–4 s, then started; the producer"
    " sends again, with the same command id, what it could not hand over",
    "two-beats": "a second beat starts, both sweeping every second",
    "clock-jump": "the producer's clock jumps by +3 h, −5 h or +30 h",
    "batch-main-kill": "group commit: commands sent in bursts of 40; SIGKILL of the main"
    " process (and its pool) while it holds ≥ 4 messages unacknowledged (a full buffer or a"
    " batch running); a new worker starts",
    "batch-pool-kill": "group commit: bursts of 40; SIGKILL of the pool process while a batch"
    " runs and ≥ 4 messages are held",
    "batch-postgres-stop": "group commit: bursts of 40; PostgreSQL stopped for 1.5–4 s while"
    " ≥ 4 messages are held (a batch running or buffered), then started",
    "batch-broker-restart": "group commit: bursts of 40; Redis shut down for 1.5–4 s while"
    " batches are buffered (≥ 4 messages held), then started",
}


def markdown(results: list[Result], *, seed: int, commit: str, date: str,
             minutes: float) -> str:  # fmt: skip
    table = summary(results)
    lines = [
        "# Reliability",
        "",
        f"Written by the full fault soak (`python -m tests.chaos`, {minutes:.0f} minutes on the",
        f"2-core development machine) on {date}, at commit `{commit}`, soak seed {seed}.",
        "`./dev test` runs the same soak reduced to 5 iterations of 300 commands a fault",
        "(the kills and outages in their batch form; tests/chaos/test_soak.py). For each",
        "fault, iterations of a stream of mixed",
        "commands (creates, attempts, completes, cancels, duplicates by command id, invalid",
        "ones) with the fault at a random moment, each reconciled by an independent checker",
        "(`tests/chaos/soak.py`: every accepted command applied once, by command id and by",
        "each attempt's identity; duplicates answered with the first outcome; invalid ones",
        "kept; one end state a call; the sweep expired exactly the calls at their maximum;",
        "no session idle in a transaction). *In flight*: iterations whose fault landed while",
        "commands were sent and not yet done, the worker busy (for the pool kill: Celery",
        "reported the task of the killed process lost; for the batch faults: also ≥ 4",
        "messages held by the worker at that moment). Every worker applies commands in",
        "batches (group commit, the default). *Resent*: commands the producer sent",
        "again, under their id, after 20 s without an outcome (docs/wire-format.md, Delivery:",
        "Redis can lose a message a killed worker had taken; a slow redelivery is resent too).",
        "",
        "| fault | how | iterations | commands | hit work in flight | resent | lost | doubled |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fault, row in table.items():
        lines.append(f"| {fault} | {HOW[fault]} | {row['iterations']} | {row['commands']:,} |"
                     f" {row['hits']} | {row['resent']} | {row['lost']} |"
                     f" {row['doubled']} |")  # fmt: skip
    seeds = ", ".join(f"{r.fault} {r.seed}" for r in results)
    lines += ["", f"Iteration seeds (replay one: `python -m tests.chaos --fault F --replay S`):"
              f" {seeds}.", ""]  # fmt: skip
    return "\n".join(lines)


# Sections of docs/reliability.md that other runs write (the RabbitMQ faults): kept when a
# soak rewrites the rest.
KEPT_SECTIONS = "\n## On RabbitMQ"


def with_kept_sections(report: str) -> str:
    """``report`` followed by the kept sections of the report it replaces."""
    existing = REPORT.read_text() if REPORT.exists() else ""
    if KEPT_SECTIONS not in existing:
        return report
    return report.rstrip("\n") + "\n\n" + existing[existing.index(KEPT_SECTIONS):].lstrip("\n")
