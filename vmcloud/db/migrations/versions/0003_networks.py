"""guest networks: networks and their ports, hosts' VTEP addresses, deployments' health
checks

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08 10:00:00.000000
"""
import sqlalchemy as sa
from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'networks',
        sa.Column('id', sa.String(length=36), nullable=False),
        sa.Column('deployment_id', sa.String(length=36), nullable=False),
        sa.Column('vni', sa.Integer(), nullable=False),
        sa.Column('cidr', sa.String(length=43), nullable=False),
        sa.Column('state', sa.String(length=32), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['deployment_id'], ['deployments.id'], ),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('cidr'),
        sa.UniqueConstraint('deployment_id'),
        sa.UniqueConstraint('vni')
    )
    op.create_table(
        'ports',
        sa.Column('id', sa.String(length=36), nullable=False),
        sa.Column('network_id', sa.String(length=36), nullable=False),
        sa.Column('address', sa.String(length=45), nullable=False),
        sa.Column('mac', sa.String(length=17), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('instance_id', sa.String(length=36), nullable=True),
        sa.Column('host', sa.String(length=255), nullable=True),
        sa.ForeignKeyConstraint(['instance_id'], ['instances.id'], ),
        sa.ForeignKeyConstraint(['network_id'], ['networks.id'], ),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('instance_id'),
        sa.UniqueConstraint('mac'),
        sa.UniqueConstraint('network_id', 'address'),
        sa.UniqueConstraint('network_id', 'host')
    )
    # Rows of before: hosts of no VTEP (they never ran a guest network), deployments
    # ready at the boot-done marker, filled in by the server defaults. These stay (unlike
    # 0002's): dropping one on SQLite copies the table, and dropping the old deployments
    # table fails its instances' foreign keys (which cannot be turned off inside the
    # upgrade's transaction). Deployments of before have no network: their instances
    # run on without a NIC; new ones get one.
    # '' as SQL text: a plain '' is reflected by SQLite as a default other than the model's.
    columns = (('hosts', 'vtep_address', 64, sa.text("''")),
               ('deployments', 'health', 2000, '{}'))
    for table, name, length, default in columns:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column(name, sa.String(length=length), nullable=False,
                                          server_default=default))
