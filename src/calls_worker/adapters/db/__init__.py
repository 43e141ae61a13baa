"""PostgreSQL: tables, engine, repositories and migrations."""
