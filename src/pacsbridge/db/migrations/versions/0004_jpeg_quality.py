"""Add the JPEG Baseline quality of each connection.

Revision ID: 0004
Revises: 0003

Existing connections get the default quality, 90.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("connections", schema=None) as batch_op:
        batch_op.add_column(sa.Column("jpeg_quality", sa.Integer(), nullable=False, server_default="90"))
        batch_op.create_check_constraint("jpeg_quality", "jpeg_quality BETWEEN 1 AND 100")


def downgrade() -> None:
    with op.batch_alter_table("connections", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_connections_jpeg_quality"), type_="check")
        batch_op.drop_column("jpeg_quality")
