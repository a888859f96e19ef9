"""Alembic migrations: the only way maintctl's schema is created or changed."""
