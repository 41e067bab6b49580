"""The identity of a DICOM file to be sent: path, SOP class, SOP instance and transfer syntax."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pacsbridge.dicomnet.failures import Failure
from pacsbridge.dicomnet.status import StatusCategory

if TYPE_CHECKING:
    from pacsbridge.dicomnet.store import StoreOutcome


@dataclass(frozen=True)
class InstanceFile:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    number_of_frames: int = 1

    def failed(
        self,
        category: StatusCategory,
        meaning: str,
        failure: Failure | None = None,
        *,
        sent_transfer_syntax: str | None = None,
    ) -> StoreOutcome:
        """Return an outcome for this instance that records it as not stored."""
        from pacsbridge.dicomnet.store import StoreOutcome

        return StoreOutcome(
            path=self.path,
            sop_instance_uid=self.sop_instance_uid,
            sop_class_uid=self.sop_class_uid,
            category=category,
            meaning=meaning,
            sent_transfer_syntax=sent_transfer_syntax,
            failure=failure,
        )
