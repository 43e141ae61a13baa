-- Privileges of calls_worker_app, granted by `calls-worker migrate --grant-to ROLE` (run as
-- calls_worker_migrator, after every upgrade: a new table gets its grants there), which
-- puts ROLE in place of calls_worker_app. Triggers act as their owner (migrations 0004,
-- 0005), so writers need nothing on the tables the triggers keep.

-- The API's tables: the worker reads the directory, and writes calls and attempts.
GRANT SELECT ON organizations, persons, pledge_cases TO calls_worker_app;
GRANT SELECT, INSERT, UPDATE ON calls TO calls_worker_app;
GRANT SELECT, INSERT ON call_attempts TO calls_worker_app;

-- The worker's own tables.
-- A view of the two tables of outcomes; its trigger writes the current one (0008).
GRANT SELECT, INSERT ON worker_processed_commands TO calls_worker_app;
GRANT SELECT ON worker_processed_rotation TO calls_worker_app;                   -- status
GRANT SELECT, INSERT, UPDATE ON worker_rejected_commands TO calls_worker_app;   -- UPDATE: replayed, dismissed
GRANT SELECT, INSERT ON worker_sweep_runs TO calls_worker_app;
-- UPDATE: the sweep locks the rows it takes (SELECT … FOR UPDATE).
GRANT SELECT, UPDATE, DELETE ON worker_due_calls TO calls_worker_app;
GRANT SELECT ON calls_worker_alembic_version TO calls_worker_app;                -- status
-- INSERT, UPDATE: `calls-worker service-accounts add/disable` with the worker's URL.
GRANT SELECT, INSERT, UPDATE ON worker_service_accounts TO calls_worker_app;
GRANT SELECT ON worker_call_reach, worker_secrets TO calls_worker_app;           -- listing
-- Outcomes for producers when the result backend is PostgreSQL (0009); DELETE: expiry.
GRANT SELECT, INSERT, UPDATE, DELETE ON worker_results TO calls_worker_app;
-- Call events (0010, 0013): INSERT with each change (numbered by worker_call_events_seq);
-- UPDATE: the relay marks them published; DELETE: the previous release's calls.prune
-- (revoked in the next release; this one drops partitions through the function below).
GRANT SELECT, INSERT, UPDATE, DELETE ON worker_call_events TO calls_worker_app;
GRANT SELECT ON worker_call_events_retention TO calls_worker_app;               -- status
GRANT USAGE ON SEQUENCE worker_rejected_commands_id_seq, worker_sweep_runs_id_seq,
    worker_call_events_seq TO calls_worker_app;
-- Beat's periodic check of the due-calls record (SECURITY DEFINER: it repairs as the owner).
GRANT EXECUTE ON FUNCTION calls_worker_reconcile_due_calls() TO calls_worker_app;
-- calls.prune: forget the outcomes older than the retention, a table at a time (0008), by
-- the retention the owner set (0011; the worker's role cannot change it).
GRANT EXECUTE ON FUNCTION calls_worker_rotate_processed_commands() TO calls_worker_app;
-- calls.prune: make the coming hours' partitions of call events, drop the old ones whole,
-- by the retention the owner set (0013).
GRANT EXECUTE ON FUNCTION calls_worker_prune_call_events() TO calls_worker_app;
-- The previous release's call (its argument is ignored); revoked with it in the next release.
GRANT EXECUTE ON FUNCTION calls_worker_rotate_processed_commands(interval) TO calls_worker_app;
