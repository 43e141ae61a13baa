#!/bin/sh
# First start of the compose PostgreSQL: the two roles of deploy/sql/roles.sql, with their
# passwords. psql's :'var' quotes each password as a literal.
set -eu
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" -f /calls-worker-sql/roles.sql
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" \
  -v migrator="$CALLS_WORKER_MIGRATOR_PASSWORD" -v app="$CALLS_WORKER_APP_PASSWORD" <<'SQL'
ALTER ROLE calls_worker_migrator PASSWORD :'migrator';
ALTER ROLE calls_worker_app PASSWORD :'app';
SQL
