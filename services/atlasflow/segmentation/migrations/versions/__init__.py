"""Segmentation's Alembic revisions (one module per revision; see the package docstring)."""
