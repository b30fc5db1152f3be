"""snapshots that land on peer nodes first: each item replicated, then persistent

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-30 10:00:00.000000
"""
import sqlalchemy as sa
from alembic import op


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

COLUMNS = ('replicated', 'persistent')


def upgrade() -> None:
    # Items of before went to the warehouse whole: each one stored (available) is both
    # replicated and persistent, the others neither. The server defaults fill the rows,
    # then go (the model sets every value); only snapshot_items is copied by SQLite's
    # batch mode, and no table refers to it.
    with op.batch_alter_table('snapshot_items', schema=None) as batch_op:
        for name in COLUMNS:
            batch_op.add_column(sa.Column(name, sa.Boolean(), nullable=False,
                                          server_default=sa.false()))
    op.execute("UPDATE snapshot_items SET replicated = true, persistent = true "
               "WHERE state = 'available'")
    with op.batch_alter_table('snapshot_items', schema=None) as batch_op:
        for name in COLUMNS:
            batch_op.alter_column(name, existing_type=sa.Boolean(), existing_nullable=False,
                                  server_default=None)
