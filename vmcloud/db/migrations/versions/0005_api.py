"""the REST API: its users and tokens, deployments' owner, the indexes pages of
deployments and snapshots are read along, hosts' chunk cache figures

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-22 10:00:00.000000
"""
import sqlalchemy as sa
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'api_users',
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('password_hash', sa.String(length=255), nullable=False),
        sa.Column('role', sa.String(length=16), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('name')
    )
    op.create_table(
        'api_tokens',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('user', sa.String(length=64), nullable=False),
        sa.Column('expires_at', sa.DateTime(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['user'], ['api_users.name'], ),
        sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_api_tokens_expires_at', 'api_tokens', ['expires_at'])
    op.create_index('ix_api_tokens_user', 'api_tokens', ['user'])
    # Rows of before: hosts whose next heartbeat tells their cache figures, deployments
    # of no owner (deployed over RPC). Columns added, no constraint: SQLite would copy
    # the deployments table, which its instances' foreign keys refuse (see 0003).
    with op.batch_alter_table('hosts', schema=None) as batch_op:
        for name in ('cache_bytes', 'fetched_bytes', 'peer_bytes'):
            batch_op.add_column(sa.Column(name, sa.BigInteger(), nullable=False,
                                          server_default=sa.text('0')))
    with op.batch_alter_table('deployments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('owner', sa.String(length=64), nullable=True))
    op.create_index('ix_deployments_created_at_id', 'deployments', ['created_at', 'id'])
    op.create_index('ix_deployments_cloud', 'deployments', ['cloud'])
    op.create_index('ix_deployments_application', 'deployments', ['application'])
    op.create_index('ix_snapshots_created_at_id', 'snapshots', ['created_at', 'id'])
