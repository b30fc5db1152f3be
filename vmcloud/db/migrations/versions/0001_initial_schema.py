"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-26 08:01:55.065584
"""
import sqlalchemy as sa
from alembic import op


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'deployments',
        sa.Column('id', sa.String(length=36), nullable=False),
        sa.Column('image', sa.String(length=255), nullable=False),
        sa.Column('count', sa.Integer(), nullable=False),
        sa.Column('min_count', sa.Integer(), nullable=False),
        sa.Column('vcpus', sa.Integer(), nullable=False),
        sa.Column('memory_mib', sa.Integer(), nullable=False),
        sa.Column('boot', sa.String(length=4000), nullable=False),
        sa.Column('state', sa.String(length=32), nullable=False),
        sa.Column('reason', sa.String(length=2000), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('id')
    )
    op.create_table(
        'hosts',
        sa.Column('name', sa.String(length=255), nullable=False),
        sa.Column('up', sa.Boolean(), nullable=False),
        sa.Column('vcpus', sa.Integer(), nullable=False),
        sa.Column('memory_mib', sa.Integer(), nullable=False),
        sa.Column('disk_bytes_free', sa.BigInteger(), nullable=False),
        sa.Column('last_heartbeat', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('name')
    )
    op.create_table(
        'instances',
        sa.Column('id', sa.String(length=36), nullable=False),
        sa.Column('name', sa.String(length=255), nullable=False),
        sa.Column('deployment_id', sa.String(length=36), nullable=False),
        sa.Column('image', sa.String(length=255), nullable=False),
        sa.Column('host', sa.String(length=255), nullable=True),
        sa.Column('state', sa.String(length=32), nullable=False),
        sa.Column('reason', sa.String(length=2000), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('failed_hosts', sa.String(length=2000), nullable=False),
        sa.Column('boot_seconds', sa.Double(), nullable=True),
        sa.Column('fetched_bytes', sa.BigInteger(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['deployment_id'], ['deployments.id'], ),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('name')
    )
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_instances_deployment_id'),
                              ['deployment_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_instances_host'), ['host'], unique=False)

    op.create_table(
        'snapshots',
        sa.Column('id', sa.String(length=36), nullable=False),
        sa.Column('deployment_id', sa.String(length=36), nullable=False),
        sa.Column('state', sa.String(length=32), nullable=False),
        sa.Column('reason', sa.String(length=2000), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['deployment_id'], ['deployments.id'], ),
        sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('snapshots', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_snapshots_deployment_id'),
                              ['deployment_id'], unique=False)

    op.create_table(
        'snapshot_items',
        sa.Column('snapshot_id', sa.String(length=36), nullable=False),
        sa.Column('instance_id', sa.String(length=36), nullable=False),
        sa.Column('state', sa.String(length=32), nullable=False),
        sa.Column('version', sa.String(length=255), nullable=False),
        sa.Column('reason', sa.String(length=2000), nullable=False),
        sa.Column('pause_ms', sa.Double(), nullable=True),
        sa.Column('dirty_bytes', sa.BigInteger(), nullable=False),
        sa.Column('uploaded_bytes', sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(['instance_id'], ['instances.id'], ),
        sa.ForeignKeyConstraint(['snapshot_id'], ['snapshots.id'], ),
        sa.PrimaryKeyConstraint('snapshot_id', 'instance_id')
    )
