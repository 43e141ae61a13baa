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

-- Nobody creates temporary tables here unless granted it by name: PUBLIC holds TEMPORARY on
-- every database by default, and a temporary table is one more way to put an object of
-- one's own in front of another role's code (the triggers name every object, and search
-- pg_temp last, as well). If the API's role needs temporary tables, grant it TEMPORARY.
-- And no role may create objects in the public schema (PostgreSQL 15 and later already
-- say so; older versions let PUBLIC do it).
DO $$
BEGIN
    EXECUTE 'REVOKE TEMPORARY ON DATABASE ' || quote_ident(current_database()) || ' FROM PUBLIC';
END
$$;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
