"""The tables, as SQLAlchemy Core sees them. The migrations are the source of truth for DDL.

The first five are a contract with the Calls API, which shares this database and inserts
into them directly; the ``worker_`` tables are the worker's own.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    Table,
    Text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSON, JSONB, UUID

metadata = MetaData()

organizations = Table(
    "organizations",
    metadata,
    Column("uuid", UUID(as_uuid=True), primary_key=True),
    Column("name", Text, nullable=False),
    Column("max_call_attempts", Integer, nullable=True),
)

persons = Table(
    "persons",
    metadata,
    Column("uuid", UUID(as_uuid=True), primary_key=True),
    Column("owning_organization_uuid", UUID(as_uuid=True), ForeignKey("organizations.uuid")),
)

pledge_cases = Table(
    "pledge_cases",
    metadata,
    Column("uuid", UUID(as_uuid=True), primary_key=True),
    Column("person_uuid", UUID(as_uuid=True), ForeignKey("persons.uuid")),
)

calls = Table(
    "calls",
    metadata,
    Column("uuid", UUID(as_uuid=True), primary_key=True),
    Column("status", Text, nullable=False),
    Column("type", Text, nullable=False),
    Column("person_uuid", UUID(as_uuid=True), ForeignKey("persons.uuid"), nullable=False),
    Column("pledge_case_uuid", UUID(as_uuid=True), ForeignKey("pledge_cases.uuid")),
    Column(
        "organization_uuid", UUID(as_uuid=True), ForeignKey("organizations.uuid"), nullable=False
    ),
    Column("requested_by", UUID(as_uuid=True)),
    Column("result", Text),
    Column("notes", Text),
    # none_as_null: a missing externalMetadata must be SQL NULL, never JSON null, because
    # "external_metadata IS NULL" is what makes a call managed here.
    Column("external_metadata", JSONB(none_as_null=True)),
    Column("attempt_count", Integer, nullable=False),
    Column("completed_by", UUID(as_uuid=True)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("completed_at", DateTime(timezone=True)),
    Column("cancelled_at", DateTime(timezone=True)),
    Column("expired_at", DateTime(timezone=True)),
)

call_attempts = Table(
    "call_attempts",
    metadata,
    Column("uuid", UUID(as_uuid=True), primary_key=True),
    Column("call_uuid", UUID(as_uuid=True), ForeignKey("calls.uuid"), nullable=False),
    Column("user_uuid", UUID(as_uuid=True), nullable=False),
    Column("attempted_at", DateTime(timezone=True), nullable=False),
)

processed_commands = Table(
    "worker_processed_commands",
    metadata,
    Column("command_id", Text, primary_key=True),
    Column("kind", Text, nullable=False),
    Column("call_uuid", UUID(as_uuid=True)),
    Column("outcome", JSONB, nullable=False),
    Column("processed_at", DateTime(timezone=True), nullable=False),
    Column("service_account_uuid", UUID(as_uuid=True)),
)

service_accounts = Table(
    "worker_service_accounts",
    metadata,
    Column("uuid", UUID(as_uuid=True), primary_key=True),
    Column("name", Text, nullable=False),
    Column(
        "organization_uuid", UUID(as_uuid=True), ForeignKey("organizations.uuid"), nullable=False
    ),
    Column("scopes", ARRAY(Text), nullable=False),
    Column("certificate_sha256", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("disabled_at", DateTime(timezone=True)),
)

call_reach = Table(
    "worker_call_reach",
    metadata,
    Column("organization_uuid", UUID(as_uuid=True), primary_key=True),
    Column("created_at", DateTime(timezone=True), primary_key=True),
    Column("call_uuid", UUID(as_uuid=True), primary_key=True),
)

rejected_commands = Table(
    "worker_rejected_commands",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("task_name", Text, nullable=False),
    Column("command_id", Text),
    Column("raw_body", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("details", JSONB, nullable=False),
    Column("replayed_at", DateTime(timezone=True)),
    Column("dismissed_at", DateTime(timezone=True)),
    Column("replayed_as", Text),
)

sweep_runs = Table(
    "worker_sweep_runs",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("swept_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=False),
    Column("duration_seconds", Float, nullable=False),
    Column("expired", Integer, nullable=False),
    Column("batches", Integer, nullable=False),
    Column("skipped", Boolean, nullable=False),
)

due_calls = Table(
    "worker_due_calls",
    metadata,
    Column("call_uuid", UUID(as_uuid=True), ForeignKey("calls.uuid"), primary_key=True),
    Column("due_since", DateTime(timezone=True), nullable=False),
)

call_events = Table(
    "worker_call_events",
    metadata,
    Column("seq", BigInteger, primary_key=True),
    Column("event_id", UUID(as_uuid=True), nullable=False),
    Column("kind", Text, nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("call_uuid", UUID(as_uuid=True), nullable=False),
    Column("organization_uuid", UUID(as_uuid=True), nullable=False),
    Column("owning_organization_uuid", UUID(as_uuid=True)),
    Column("call", JSON, nullable=False),
    Column("expiry", JSON),
    Column("recorded_at", DateTime(timezone=True), primary_key=True),  # the partition key
    Column("published_at", DateTime(timezone=True)),
)
