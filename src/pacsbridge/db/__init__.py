"""Persistence: SQLAlchemy models, Alembic migrations and the connection repository."""

from pacsbridge.db.connections import (
    DEFAULT_ORGANIZATION,
    ConnectionNotFoundError,
    check_connection,
    find_connection,
    find_organization,
    get_connection,
    get_or_create_organization,
    get_worklist_connection,
    list_connections,
    save_connection,
    to_settings,
    update_connection,
)
from pacsbridge.db import forwarding  # noqa: F401  (registers the forwarding tables on Base.metadata)
from pacsbridge.db.engine import DatabaseError, create_database_engine
from pacsbridge.db.models import Base, ConnectionRecord, Organization
from pacsbridge.db.schema import alembic_config, current_revision, downgrade, head_revision, migrate
from pacsbridge.db.session import close_database, create_session_factory, open_database

__all__ = [
    "DEFAULT_ORGANIZATION",
    "Base",
    "ConnectionNotFoundError",
    "ConnectionRecord",
    "DatabaseError",
    "Organization",
    "alembic_config",
    "check_connection",
    "close_database",
    "create_database_engine",
    "create_session_factory",
    "current_revision",
    "downgrade",
    "find_connection",
    "find_organization",
    "get_connection",
    "get_or_create_organization",
    "get_worklist_connection",
    "head_revision",
    "list_connections",
    "migrate",
    "open_database",
    "save_connection",
    "to_settings",
    "update_connection",
]
