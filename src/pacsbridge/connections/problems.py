"""Validation problems that name the field, the value and the fix."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Severity(enum.StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class Problem:
    """One finding about one field: an error blocks saving, a warning does not."""

    severity: Severity
    field: str
    value: object
    reason: str
    fix: str

    @classmethod
    def error(cls, field: str, value: object, reason: str, fix: str) -> Problem:
        return cls(Severity.ERROR, field, value, reason, fix)

    @classmethod
    def warning(cls, field: str, value: object, reason: str, fix: str) -> Problem:
        return cls(Severity.WARNING, field, value, reason, fix)

    @property
    def message(self) -> str:
        # Strings are quoted as typed; repr() would double every backslash.
        shown = f"'{self.value}'" if isinstance(self.value, str) else repr(self.value)
        return f"{self.field} {shown} {self.reason}. {self.fix}"

    def as_dict(self) -> dict[str, object]:
        return {
            "severity": self.severity.value,
            "field": self.field,
            "value": self.value if isinstance(self.value, (str, int, float, type(None))) else repr(self.value),
            "reason": self.reason,
            "fix": self.fix,
            "message": self.message,
        }


class InvalidSettingsError(ValueError):
    """Raised when settings with errors are about to be used or stored."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(problem.message for problem in problems))


@dataclass(frozen=True)
class ValidationReport:
    problems: list[Problem]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == Severity.ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == Severity.WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_for_errors(self) -> None:
        if self.errors:
            raise InvalidSettingsError(self.errors)
