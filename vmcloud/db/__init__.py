"""The dispatcher's state in SQL (SQLAlchemy 2; SQLite by default, PostgreSQL when configured)."""
