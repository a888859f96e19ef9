"""Persistence: tables, sessions and Alembic helpers, the event log writer."""
