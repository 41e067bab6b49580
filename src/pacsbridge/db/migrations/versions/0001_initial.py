"""Create the organizations and connections tables.

Revision ID: 0001
Revises:

The enum values are written out here instead of imported from the application,
so this migration keeps creating the same schema when the enums change later.
Constraint names are wrapped in op.f() because they already follow the naming
convention of pacsbridge.db.models, which would otherwise be applied twice.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

KINDS = ("pacs", "mwl")
TLS_MODES = ("inactive", "active", "encryption-only")
SCU_AUTHENTICATIONS = ("anonymous", "client-certificate")
COMPRESSIONS = ("as-received", "none", "jpeg-lossless", "jpeg-baseline")
MONOCHROME_MODES = ("never", "b-mode-only")


def _in_values(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(value) for value in values)})"


def upgrade() -> None:
    op.create_table(
        "organizations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_organizations")),
        sa.UniqueConstraint("name", name=op.f("uq_organizations_name")),
    )

    op.create_table(
        "connections",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("organization_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("calling_ae_title", sa.String(16), nullable=False),
        sa.Column("called_ae_title", sa.String(16), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("character_set", sa.String(256), nullable=False),
        sa.Column("tls_mode", sa.String(32), nullable=False),
        sa.Column("scp_certificate_pem", sa.Text(), nullable=True),
        sa.Column("pinned_fingerprint", sa.String(64), nullable=True),
        sa.Column("scu_authentication", sa.String(32), nullable=False),
        sa.Column("image_compression", sa.String(32), nullable=False),
        sa.Column("loop_compression", sa.String(32), nullable=False),
        sa.Column("monochrome", sa.String(32), nullable=False),
        sa.Column("acse_timeout", sa.Float(), nullable=False),
        sa.Column("dimse_timeout", sa.Float(), nullable=False),
        sa.Column("connection_timeout", sa.Float(), nullable=False),
        sa.Column("test_only", sa.Boolean(), nullable=False),
        sa.Column("worklist_filters", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_connections")),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_connections_organization_id_organizations"),
            ondelete="RESTRICT",
        ),
        sa.UniqueConstraint("organization_id", "name", name=op.f("uq_connections_organization_id_name")),
        sa.CheckConstraint(_in_values("kind", KINDS), name=op.f("ck_connections_kind")),
        sa.CheckConstraint("port BETWEEN 1 AND 65535", name=op.f("ck_connections_port")),
        sa.CheckConstraint(_in_values("tls_mode", TLS_MODES), name=op.f("ck_connections_tls_mode")),
        sa.CheckConstraint(
            _in_values("scu_authentication", SCU_AUTHENTICATIONS), name=op.f("ck_connections_scu_authentication")
        ),
        sa.CheckConstraint(
            _in_values("image_compression", COMPRESSIONS), name=op.f("ck_connections_image_compression")
        ),
        sa.CheckConstraint(_in_values("loop_compression", COMPRESSIONS), name=op.f("ck_connections_loop_compression")),
        sa.CheckConstraint(_in_values("monochrome", MONOCHROME_MODES), name=op.f("ck_connections_monochrome")),
        sa.CheckConstraint(
            "acse_timeout > 0 AND dimse_timeout > 0 AND connection_timeout > 0",
            name=op.f("ck_connections_timeouts_positive"),
        ),
    )

    # An organization queries at most one Modality Worklist. A partial unique
    # index enforces that even when two writers race.
    op.create_index(
        op.f("uq_connections_one_mwl_per_organization"),
        "connections",
        ["organization_id"],
        unique=True,
        sqlite_where=sa.text("kind = 'mwl'"),
        postgresql_where=sa.text("kind = 'mwl'"),
    )


def downgrade() -> None:
    op.drop_index(op.f("uq_connections_one_mwl_per_organization"), table_name="connections")
    op.drop_table("connections")
    op.drop_table("organizations")
