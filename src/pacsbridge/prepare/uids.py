"""Deterministic UIDs for derived instances.

A derived instance (lossy compression, monochrome conversion and the like) needs a new
SOP Instance UID. The UID must be the same every time the same source is converted in
the same way, so that a retry or a resend replaces the earlier copy in the PACS instead
of adding a duplicate. Random UIDs (such as pydicom's `generate_uid()` without
`entropy_srcs`) are therefore never used here.
"""

from __future__ import annotations

import uuid

from pydicom.uid import UID

# Name-based UUIDs (RFC 9562 version 5) need a namespace UUID. This one is fixed for
# pacsbridge. Changing it changes every derived UID, so PACS would store duplicates.
DERIVED_UID_NAMESPACE = uuid.UUID("d7b1e7fb-ea89-40fe-a12e-783efbd50b0e")

# A UUID is 128 bits and its decimal form has at most 39 digits, so a "2.25." UID has
# at most 44 characters, within the 64-character limit of the UI value representation.
UUID_UID_ROOT = "2.25."


def derived_uid(source_uid: str, conversion: str) -> UID:
    """Return a UID of the form "2.25.<decimal UUID>" for `source_uid` converted by `conversion`.

    The UUID is a version 5 UUID of the source UID and the conversion name (for example
    "jpeg-baseline q90", "monochrome", "uid-too-long"), so equal inputs give equal UIDs and
    different conversions of one source give different UIDs. `source_uid` may be invalid
    (too long, for example), because its text is only hashed.

    Raises ValueError if either argument is empty.
    """
    source = source_uid.strip("\x00 ")
    if not source:
        raise ValueError("source_uid is empty: pass the UID of the source instance")
    if not conversion:
        raise ValueError("conversion is empty: pass a name for the conversion, such as 'monochrome'")

    # A UID cannot contain a line feed, so the first one ends the source UID and no two
    # (source, conversion) pairs give the same name.
    name_based = uuid.uuid5(DERIVED_UID_NAMESPACE, f"{source}\n{conversion}")
    return UID(f"{UUID_UID_ROOT}{name_based.int}")
