"""Connection settings and their validation."""

from pacsbridge.connections.problems import InvalidSettingsError, Problem, Severity, ValidationReport
from pacsbridge.connections.settings import (
    Compression,
    ConnectionKind,
    ConnectionSettings,
    MonochromeMode,
    ScuAuthentication,
    TlsMode,
    validate_settings,
)

__all__ = [
    "Compression",
    "ConnectionKind",
    "ConnectionSettings",
    "InvalidSettingsError",
    "MonochromeMode",
    "Problem",
    "ScuAuthentication",
    "Severity",
    "TlsMode",
    "ValidationReport",
    "validate_settings",
]
