"""What the due-record's locking costs a writer: attempts under migration 0004's triggers
(no lock) against 0005's (a shared advisory lock on the owning organization, the person
and the organization read in statements of their own), in the same run.

Two databases on one server, one migrated to 0004 and one to head, each with the same
organizations, persons and calls. Each round inserts the same number of attempts into
each, one per transaction, as the API or a command does, alternating which goes first;
the figure is the median over the rounds of head's time per attempt, beside 0004's.

    python -m bench.triggers --attempts 5000 --rounds 5
"""

from __future__ import annotations

import argparse
import random
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from sqlalchemy import Engine, text

from bench.common import Row, median, print_table, timed, write_results
from bench.fixtures import empty_database
from calls_worker.adapters.db.engine import build_engine
from calls_worker.adapters.db.migrate import head_revision

ORGANIZATIONS = 50
CALLS = 2000


@contextmanager
def migrated_to(revision: str) -> Iterator[Engine]:
    name = f"calls_worker_bench_triggers_{revision}_{uuid.uuid4().hex[:8]}"
    with empty_database(name, revision) as url:
        engine = build_engine(url, pool_size=1)
        try:
            yield engine
        finally:
            engine.dispose()


def seed(engine: Engine, rng: random.Random) -> list[uuid.UUID]:
    """Organizations allowing many attempts (no call becomes due: every attempt pays the
    trigger's check, none the insert into the record), a person a call."""
    organizations = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(ORGANIZATIONS)]
    calls = []
    with engine.begin() as connection:
        for organization in organizations:
            connection.execute(
                text("INSERT INTO organizations VALUES (:o, 'bench', 1000000)"), {"o": organization}
            )
        for _ in range(CALLS):
            person, call = uuid.UUID(int=rng.getrandbits(128)), uuid.UUID(int=rng.getrandbits(128))
            connection.execute(
                text("INSERT INTO persons VALUES (:p, :o)"),
                {"p": person, "o": rng.choice(organizations)},
            )
            connection.execute(
                text("INSERT INTO calls (uuid, person_uuid, organization_uuid)"
                     " SELECT :c, :p, owning_organization_uuid FROM persons WHERE uuid = :p"),
                {"c": call, "p": person},
            )  # fmt: skip
            calls.append(call)
    return calls


def insert_attempts(engine: Engine, calls: list[uuid.UUID], order: list[int]) -> None:
    with engine.connect() as connection:
        for index in order:
            connection.execute(
                text("INSERT INTO call_attempts (call_uuid, user_uuid, attempted_at)"
                     " VALUES (:c, :c, now())"),
                {"c": calls[index]},
            )  # fmt: skip
            connection.commit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attempts", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="Do not update results.json.")
    args = parser.parse_args()

    head = head_revision() or "head"
    with ExitStack() as stack:
        engines = {"0004": stack.enter_context(migrated_to("0004")),
                   head: stack.enter_context(migrated_to(head))}  # fmt: skip
        calls = {name: seed(engine, random.Random(7)) for name, engine in engines.items()}
        per_attempt: dict[str, list[float]] = {name: [] for name in engines}
        rng = random.Random(11)
        for round_number in range(args.rounds):
            order = [rng.randrange(CALLS) for _ in range(args.attempts)]
            names = list(engines) if round_number % 2 == 0 else list(reversed(engines))
            for name in names:
                seconds, _ = timed(lambda n=name, o=order: insert_attempts(engines[n], calls[n], o))
                per_attempt[name].append(seconds / args.attempts * 1000)
        for name, engine in engines.items():
            with engine.connect() as connection:
                counted = connection.execute(text("SELECT sum(attempt_count) FROM calls")).scalar()
            assert counted == args.attempts * args.rounds, (name, counted)

    value, baseline = median(per_attempt[head]), median(per_attempt["0004"])
    row = Row(
        benchmark="triggers",
        figure=f"attempt insert+commit, {head} triggers (median of {args.rounds})",
        value=value,
        unit="ms",
        baseline="0004 triggers, no lock",
        baseline_value=baseline,
        goal="≤ 1.15×",
        passed=value <= 1.15 * baseline,
        details={"rounds_ms": per_attempt, "attempts_per_round": args.attempts},
    )
    print_table([row])
    for name, values in per_attempt.items():
        print(f"  {name}: " + ", ".join(f"{v:.3f}" for v in values) + " ms an attempt")
    if not args.no_write:
        write_results([row])


if __name__ == "__main__":
    main()
