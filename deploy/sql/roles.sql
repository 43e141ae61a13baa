-- Roles for calls-worker in the database it shares with the Calls API (run as a superuser
-- or the database owner, then set the passwords). Two roles:
--   calls_worker_migrator  owns the schema objects; `calls-worker migrate` runs as it
--   calls_worker_app       what the worker, beat and Flower run as: DML on what they
--                          use, nothing else (no DDL, no TRUNCATE, no other tables)
-- The tests run this file with the role names replaced, and run the worker as the app role.

CREATE ROLE calls_worker_migrator LOGIN;
CREATE ROLE calls_worker_app LOGIN;
GRANT CREATE, USAGE ON SCHEMA public TO calls_worker_migrator;
GRANT USAGE ON SCHEMA public TO calls_worker_app;
