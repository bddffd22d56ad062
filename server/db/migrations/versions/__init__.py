"""edgeloop's schema revisions, oldest first: ``NNNN_slug.py`` (Alembic skips this file)."""
