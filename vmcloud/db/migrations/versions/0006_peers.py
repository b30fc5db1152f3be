"""the peer exchange: hosts' peer chunk server URLs

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-29 10:00:00.000000
"""
import sqlalchemy as sa
from alembic import op


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Rows of before: hosts of no peer URL, so in no node's peer set until their
    # manager registers again with one. The server default stays, as 0003's.
    # '' as SQL text: a plain '' is reflected by SQLite as a default other than the model's.
    with op.batch_alter_table('hosts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('peer_url', sa.String(length=255), nullable=False,
                                      server_default=sa.text("''")))
