"""The error every preparation step raises when an instance cannot be prepared."""

from __future__ import annotations


class PreparationError(Exception):
    """An instance cannot be prepared for a PACS as configured.

    `reason` states what is wrong and `action` what the admin can do. Neither
    contains patient data: they name elements by keyword and tag, never by value.
    """

    def __init__(self, reason: str, action: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.action = action
