"""Add the TLS options of connections, the organization CAs and the SCU client certificates.

Revision ID: 0002
Revises: 0001

As in 0001, enum values are written out instead of imported, and constraint
names are wrapped in op.f() because they already follow the naming convention.
Private keys are stored only encrypted (see pacsbridge.tls.secret_key).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

CLIENT_CERTIFICATE_STATUSES = ("active", "retiring", "retired")


def upgrade() -> None:
    # Existing rows get false, the default of both options before this revision.
    with op.batch_alter_table("connections") as batch:
        batch.add_column(sa.Column("server_name", sa.String(255), nullable=True))
        batch.add_column(
            sa.Column("check_hostname", sa.Boolean(), nullable=False, server_default=sa.text("false"))
        )
        batch.add_column(
            sa.Column("legacy_ciphers", sa.Boolean(), nullable=False, server_default=sa.text("false"))
        )

    op.create_table(
        "certificate_authorities",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("organization_id", sa.Integer(), nullable=False),
        sa.Column("certificate_pem", sa.Text(), nullable=False),
        sa.Column("encrypted_private_key", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_certificate_authorities")),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_certificate_authorities_organization_id_organizations"),
            ondelete="RESTRICT",
        ),
        sa.UniqueConstraint("organization_id", name=op.f("uq_certificate_authorities_organization_id")),
    )

    statuses = ", ".join(repr(status) for status in CLIENT_CERTIFICATE_STATUSES)
    op.create_table(
        "client_certificates",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("connection_id", sa.Integer(), nullable=False),
        sa.Column("certificate_pem", sa.Text(), nullable=False),
        sa.Column("encrypted_private_key", sa.Text(), nullable=False),
        sa.Column("serial", sa.String(64), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retire_after", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_client_certificates")),
        sa.ForeignKeyConstraint(
            ["connection_id"],
            ["connections.id"],
            name=op.f("fk_client_certificates_connection_id_connections"),
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint("fingerprint", name=op.f("uq_client_certificates_fingerprint")),
        sa.CheckConstraint(f"status IN ({statuses})", name=op.f("ck_client_certificates_status")),
    )
    op.create_index(op.f("ix_client_certificates_connection_id"), "client_certificates", ["connection_id"])
    op.create_index(
        op.f("uq_client_certificates_one_active_per_connection"),
        "client_certificates",
        ["connection_id"],
        unique=True,
        sqlite_where=sa.text("status = 'active'"),
        postgresql_where=sa.text("status = 'active'"),
    )


def downgrade() -> None:
    op.drop_index(op.f("uq_client_certificates_one_active_per_connection"), table_name="client_certificates")
    op.drop_index(op.f("ix_client_certificates_connection_id"), table_name="client_certificates")
    op.drop_table("client_certificates")
    op.drop_table("certificate_authorities")
    with op.batch_alter_table("connections") as batch:
        batch.drop_column("legacy_ciphers")
        batch.drop_column("check_hostname")
        batch.drop_column("server_name")
