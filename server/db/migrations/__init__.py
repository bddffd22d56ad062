"""Alembic's environment and edgeloop's schema revisions (run through ``server.db.migrate``)."""
