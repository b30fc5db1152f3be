"""the gateway: clouds and their hosts, applications, gateways, deployments' cloud,
application, service and listener port, hosts' CPU load

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-15 10:00:00.000000
"""
import datetime

import sqlalchemy as sa
from alembic import op


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

# The default cloud's limit when the upgrade is not told [gateway]
# default_connection_limit (vmcloud.db.api.Database.upgrade tells it).
DEFAULT_CONNECTION_LIMIT = 1000


def upgrade() -> None:
    clouds = op.create_table(
        'clouds',
        sa.Column('name', sa.String(length=32), nullable=False),
        sa.Column('connection_limit', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('name')
    )
    op.create_table(
        'cloud_hosts',
        sa.Column('cloud', sa.String(length=32), nullable=False),
        sa.Column('host', sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(['cloud'], ['clouds.name'], ),
        sa.ForeignKeyConstraint(['host'], ['hosts.name'], ),
        sa.PrimaryKeyConstraint('cloud', 'host')
    )
    op.create_table(
        'applications',
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('image', sa.String(length=255), nullable=False),
        sa.Column('boot', sa.String(length=4000), nullable=False),
        sa.Column('health', sa.String(length=2000), nullable=False),
        sa.Column('vcpus', sa.Integer(), nullable=False),
        sa.Column('memory_mib', sa.Integer(), nullable=False),
        sa.Column('port', sa.Integer(), nullable=False),
        sa.Column('protocol', sa.String(length=8), nullable=False),
        sa.Column('connection_limit', sa.Integer(), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('name')
    )
    op.create_table(
        'gateways',
        sa.Column('name', sa.String(length=255), nullable=False),
        sa.Column('vtep_address', sa.String(length=64), nullable=False),
        sa.Column('last_seen', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('name')
    )
    # The cloud every deployment of before is in, and plain deploys use. Its limit is
    # [gateway] default_connection_limit as the database is made (or brought to this
    # revision); later, `vmcloud cloud update default` changes it.
    limit = op.get_context().config.attributes.get('default_connection_limit',
                                                   DEFAULT_CONNECTION_LIMIT)
    op.bulk_insert(clouds, [{'name': 'default', 'connection_limit': limit,
                             'created_at': datetime.datetime.now(datetime.timezone.utc)
                             .replace(tzinfo=None)}])
    # Rows of before, filled in by the server defaults: hosts of an unknown load (their
    # next heartbeat says), deployments of the default cloud, of no application, not
    # exposed. No foreign key and a unique index rather than a constraint: either would
    # make SQLite copy the deployments table, which its instances' foreign keys refuse
    # (see 0003).
    with op.batch_alter_table('hosts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cpus', sa.Integer(), nullable=False,
                                      server_default=sa.text('0')))
        batch_op.add_column(sa.Column('cpu_busy', sa.Float(), nullable=False,
                                      server_default=sa.text('0')))
    with op.batch_alter_table('deployments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cloud', sa.String(length=32), nullable=False,
                                      server_default='default'))
        batch_op.add_column(sa.Column('application', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('port', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('protocol', sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column('listener_port', sa.Integer(), nullable=True))
    op.create_index('ix_deployments_listener_port', 'deployments', ['listener_port'],
                    unique=True)
