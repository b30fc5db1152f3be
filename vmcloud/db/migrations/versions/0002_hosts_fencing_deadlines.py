"""host states and identities, build and upload deadlines, snapshot cut times

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 14:55:00.000000
"""
import sqlalchemy as sa
from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Rows of hosts registered before: up (or not), of no node; the server defaults
    # fill them, then go (the models set every value).
    columns = (('state', 32, 'up'), ('node_id', 64, ''), ('incarnation', 36, ''))
    with op.batch_alter_table('hosts', schema=None) as batch_op:
        for name, length, default in columns:
            batch_op.add_column(sa.Column(name, sa.String(length=length), nullable=False,
                                          server_default=default))
    with op.batch_alter_table('hosts', schema=None) as batch_op:
        for name, length, _ in columns:
            batch_op.alter_column(name, existing_type=sa.String(length=length),
                                  existing_nullable=False, server_default=None)
    op.execute("UPDATE hosts SET state = 'unknown' WHERE NOT up")
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('deadline', sa.DateTime(), nullable=True))
    with op.batch_alter_table('snapshot_items', schema=None) as batch_op:
        batch_op.add_column(sa.Column('frozen_at', sa.Double(), nullable=True))
        batch_op.add_column(sa.Column('thawed_at', sa.Double(), nullable=True))
        batch_op.add_column(sa.Column('deadline', sa.DateTime(), nullable=True))
