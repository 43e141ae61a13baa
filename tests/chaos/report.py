"""docs/reliability.md, from a full soak's counts (tests/chaos/__main__.py writes it)."""

from __future__ import annotations

from pathlib import Path

from tests.chaos.soak import Result, summary

REPORT = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"

HOW = {
    "pool-kill": "SIGKILL of a worker's pool processes while one of them runs a command",
    "main-kill": "SIGKILL of the worker's main process (and its pool); a new worker starts",
    "sigterm": "SIGTERM (warm shutdown); a new worker starts",
    "postgres-restart": "PostgreSQL stopped for 1.5–4 s, then started",
    "broker-restart": "Redis (append-only) shut down for 1.5–4 s, then started; the producer"
    " sends again, with the same command id, what it could not hand over",
    "two-beats": ("a second beat starts, both sweeping every second, and the soak asks for"
                  " a sweep every 20 ms until the commands are answered (many beats)"),
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
    "rabbitmq-main-kill": "RabbitMQ, bursts of 40: SIGKILL of a worker's main process (and its"
    " pool) while a command's or a sweep's transaction is open; a new worker starts",
    "rabbitmq-node-restart": "RabbitMQ, bursts of 40: the node stopped while a transaction is"
    " open, started again 1.5–4 s later; the producer sends again what was not confirmed",
    "rabbitmq-postgres-stop": "RabbitMQ, bursts of 40: PostgreSQL stopped for 1.5–4 s while a"
    " transaction is open, then started",
    "rabbitmq-poison": "RabbitMQ, bursts of 40: one create, at the drawn moment, kills the pool"
    " process applying its batch before it commits, every time it is delivered; hit when its"
    " first batch held others",
}


def markdown(results: list[Result], *, seed: int, commit: str, date: str,
             minutes: float) -> str:  # fmt: skip
    table = summary(results)
    lines = [
        "# Reliability",
        "",
        f"Written by the full fault soak (`python -m tests.chaos`, {minutes:.0f} minutes on the",
        f"2-core development machine) on {date}, at commit `{commit}`, soak seed {seed}.",
        "`./dev test` runs the same soak reduced to 3 iterations of 300 commands a fault on",
        "Redis and 2 on RabbitMQ (tests/chaos/test_soak.py). For each fault, iterations of a",
        "stream of mixed commands (creates, attempts, completes, cancels, duplicates by",
        "command id, invalid ones), each call performed by an organization other than its",
        "person's owner, while the API changes the owners' maxima and moves donors; two",
        "workers of two pool processes and a beat sweeping every second. The fault strikes at",
        "a moment drawn across the whole run, at the first instant after it at which work is",
        "in flight (messages held and not acknowledged, or a command's or sweep's transaction",
        "open; for the kills and the broker stop, seen with the producer paused and the",
        "workers stopped). An iteration whose fault found nothing in flight (a poison",
        "batched alone on a busy machine) is drawn again, up to as many more as were asked",
        "for, and its losses and doubles count all the same. Each iteration is reconciled",
        "by the checker of",
        "`tests/chaos/checker.py` (each rule has a unit test that plants its defect):",
        "every outcome against its record; no effect behind an error; each call's end",
        "explained by one ok command or the sweep; the outbox one event per ok change and",
        "per sweep expiry, none for an error or a duplicate, each call's sequence in order;",
        "what two subscribers of the events exchange received equal to the outbox; a sweep",
        "expiry only at the maximum in force; no session idle in a transaction. *Resent*:",
        "commands the producer sent again, under their id, 20 s or more after it sent them,",
        "once the broker no longer held them (not queued, not delivered to a live worker) and",
        "the worker had not answered them (a slow backlog is waited for). Only the Redis",
        "kills and Redis restarts resend (they can lose a message a worker had taken), and",
        "each resend must be a command the snapshot at the fault shows taken and not",
        "acknowledged, at most one per worker of them in no record of the broker's; under",
        "every other fault a lost command is one without an outcome.",
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
