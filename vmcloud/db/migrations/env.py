"""Alembic environment: run by vmcloud.db.api.upgrade with a connection in the config."""
from alembic import context

from vmcloud.db import models


def run_migrations() -> None:
    connection = context.config.attributes['connection']
    context.configure(connection=connection, target_metadata=models.Base.metadata,
                      render_as_batch=True)  # SQLite alters tables by copying them
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
