"""Fill a migrated database with a realistic data set, set-based, in about a minute per
million calls.

    python -m bench.generate --database-url URL --calls 1000000

1,000 organizations (maximum 3–6 attempts, every tenth with none), one person per call,
calls 70% requested and 30% in end states, 5% managed externally, about 2.5 attempts a
call, placed so that about 10% of the requested calls managed here are at or over their
owning organization's limit. Seeded: the same size gives the same data.

Calls are created over 59 days, one after the other. Triggers are off during the load (as
for any bulk load) and what they keep — attempt_count, worker_due_calls and
worker_call_reach — is then computed set-based.
"""

from __future__ import annotations

import argparse
import time

from sqlalchemy import Engine, text

from calls_worker.adapters.db.engine import build_engine
from calls_worker.adapters.db.migrate import upgrade

ORGANIZATIONS = 1_000

LOAD = """
SET session_replication_role = replica;  -- no triggers during the bulk load
SELECT setseed(0.42);

INSERT INTO organizations (uuid, name, max_call_attempts)
SELECT gen_random_uuid(), 'organization ' || i,
       CASE WHEN i % 10 = 0 THEN NULL ELSE 3 + i % 4 END
FROM generate_series(1, :organizations) AS i;

CREATE TEMP TABLE bench_org AS
SELECT row_number() OVER (ORDER BY uuid) AS n, uuid, max_call_attempts FROM organizations;

CREATE TEMP TABLE bench_plan AS
SELECT i,
       gen_random_uuid() AS person_uuid,
       gen_random_uuid() AS call_uuid,
       1 + (i::bigint * 7919) % :organizations AS owner_n,
       1 + (i::bigint * 104729) % :organizations AS performer_n,
       random() AS r_status,
       random() AS r_external,
       random() AS r_due,
       random() AS r_attempts
FROM generate_series(1, :calls) AS i;

INSERT INTO persons (uuid, owning_organization_uuid)
SELECT p.person_uuid, o.uuid FROM bench_plan p JOIN bench_org o ON o.n = p.owner_n;

CREATE TEMP TABLE bench_calls AS
SELECT p.i,
       p.call_uuid,
       p.person_uuid,
       perf.uuid AS organization_uuid,
       CASE WHEN p.r_status < 0.70 THEN 'requested'
            WHEN p.r_status < 0.85 THEN 'completed'
            WHEN p.r_status < 0.93 THEN 'cancelled'
            ELSE 'expired' END AS status,
       p.r_external < 0.05 AS external,
       -- Requested calls managed here whose owner has a maximum: 11.7% at or over it (10% of
       -- all requested calls), the rest below. Others: a spread for a mean of ~2.5 attempts.
       CASE WHEN p.r_status < 0.70 AND p.r_external >= 0.05
                 AND owner.max_call_attempts IS NOT NULL
            THEN CASE WHEN p.r_due < 0.117
                      THEN owner.max_call_attempts + (p.r_attempts * 2)::int
                      ELSE (p.r_attempts * owner.max_call_attempts)::int
                           % owner.max_call_attempts END
            ELSE 1 + (p.r_attempts * 4)::int END AS attempts
FROM bench_plan p
JOIN bench_org owner ON owner.n = p.owner_n
JOIN bench_org perf ON perf.n = p.performer_n;

INSERT INTO calls (uuid, status, type, person_uuid, organization_uuid, external_metadata,
                   attempt_count, created_at, updated_at, completed_at, cancelled_at, expired_at)
SELECT call_uuid, status, 'verification', person_uuid, organization_uuid,
       CASE WHEN external THEN '{"source": "bench"}'::jsonb END,
       attempts, now() - interval '60 days' + i * (interval '59 days' / :calls),
       now() - interval '1 day',
       CASE WHEN status = 'completed' THEN now() - interval '1 day' END,
       CASE WHEN status = 'cancelled' THEN now() - interval '1 day' END,
       CASE WHEN status = 'expired' THEN now() - interval '1 day' END
FROM bench_calls;

INSERT INTO call_attempts (uuid, call_uuid, user_uuid, attempted_at)
SELECT gen_random_uuid(), c.call_uuid, '00000000-0000-4000-8000-000000000001',
       now() - interval '20 days' + k * interval '1 hour'
FROM bench_calls c, generate_series(1, c.attempts) AS k;

INSERT INTO worker_due_calls (call_uuid, due_since)
SELECT c.uuid, now() - interval '1 hour'
FROM calls c
JOIN persons p ON p.uuid = c.person_uuid
JOIN organizations o ON o.uuid = p.owning_organization_uuid
WHERE c.status = 'requested' AND c.external_metadata IS NULL
  AND o.max_call_attempts IS NOT NULL AND c.attempt_count >= o.max_call_attempts;

-- Who reaches each call: its performing organization, and its person's owner.
INSERT INTO worker_call_reach (organization_uuid, created_at, call_uuid)
SELECT organization_uuid, created_at, uuid FROM calls;
INSERT INTO worker_call_reach (organization_uuid, created_at, call_uuid)
SELECT p.owning_organization_uuid, c.created_at, c.uuid
FROM calls c JOIN persons p ON p.uuid = c.person_uuid
WHERE p.owning_organization_uuid <> c.organization_uuid;

SET session_replication_role = origin;
"""


def generate(engine: Engine, calls: int) -> dict[str, float]:
    """Load the data set into ``engine``'s (migrated, empty) database; what it holds."""
    started = time.perf_counter()
    with engine.begin() as connection:
        for statement in LOAD.split(";\n"):
            if statement.strip():
                connection.execute(
                    text(statement), {"organizations": ORGANIZATIONS, "calls": calls}
                )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE"))
        counts = connection.execute(
            text(
                "SELECT (SELECT count(*) FROM calls) AS calls,"
                " (SELECT count(*) FROM calls WHERE status = 'requested') AS requested,"
                " (SELECT count(*) FROM calls WHERE external_metadata IS NOT NULL) AS external,"
                " (SELECT count(*) FROM call_attempts) AS attempts,"
                " (SELECT count(*) FROM worker_due_calls) AS due"
            )
        ).one()
    return {**counts._asdict(), "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--calls", type=int, default=1_000_000)
    arguments = parser.parse_args()
    if not 1_000 <= arguments.calls <= 5_000_000:
        parser.error("--calls: from 1,000 to 5,000,000")
    engine = build_engine(arguments.database_url, pool_size=1)
    upgrade(engine)
    print(generate(engine, arguments.calls))
    engine.dispose()


if __name__ == "__main__":
    main()
