"""C-STORE: send a set of instances over one association and report each outcome.

Presentation contexts are proposed per SOP class with one transfer syntax
each, so the SCP's response shows exactly which syntaxes it accepts. The
proposed syntaxes are the instance's own, the default syntax the standard
requires beside it, Explicit VR Little Endian and Implicit VR Little Endian. An instance whose own
syntax was refused is sent uncompressed, with the same pixel values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import UID
from pynetdicom import Association
from pynetdicom.presentation import PresentationContext, build_context

from pacsbridge.dicomnet.association import Endpoint, association
from pacsbridge.dicomnet.failures import DicomNetworkError, Failure, FailureKind
from pacsbridge.dicomnet.instances import InstanceFile
from pacsbridge.dicomnet.status import StatusCategory, StatusMeaning, describe_status
from pacsbridge.dicomnet.syntaxes import (
    UNCOMPRESSED,
    codestream_fits,
    decode_to_native,
    relabel,
    syntaxes_to_propose,
)

LOGGER = logging.getLogger(__name__)

# PS3.8 9.3.2.2: presentation context IDs are odd numbers from 1 to 255.
MAX_CONTEXTS_PER_ASSOCIATION = 128


@dataclass
class StoreOutcome:
    """The outcome of sending one instance."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    category: StatusCategory
    meaning: str
    status: int | None = None
    # The transfer syntax the instance went out in, when it was sent.
    sent_transfer_syntax: str | None = None
    # How the instance was prepared: "as-is", "relabelled" or "decoded".
    conversion: str | None = None
    failure: Failure | None = None

    @property
    def stored(self) -> bool:
        return self.category in (StatusCategory.SUCCESS, StatusCategory.WARNING)

    def as_dict(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "sop_instance_uid": self.sop_instance_uid,
            "sop_class_uid": self.sop_class_uid,
            "stored": self.stored,
            "category": self.category.value,
            "status": self.status,
            "status_hex": None if self.status is None else f"0x{self.status:04X}",
            "meaning": self.meaning,
            "sent_transfer_syntax": self.sent_transfer_syntax,
            "conversion": self.conversion,
            "failure": None if self.failure is None else self.failure.as_dict(),
        }


@dataclass
class StoreResult:
    outcomes: list[StoreOutcome] = field(default_factory=list)

    @property
    def all_stored(self) -> bool:
        return bool(self.outcomes) and all(outcome.stored for outcome in self.outcomes)

    def as_dict(self) -> dict[str, object]:
        return {
            "all_stored": self.all_stored,
            "stored": sum(outcome.stored for outcome in self.outcomes),
            "failed": sum(not outcome.stored for outcome in self.outcomes),
            "instances": [outcome.as_dict() for outcome in self.outcomes],
        }


def build_contexts(instances: Sequence[InstanceFile]) -> list[PresentationContext]:
    """Return one presentation context per (SOP class, transfer syntax) the instances need."""
    pairs: list[tuple[str, str]] = []
    for instance in instances:
        for syntax in syntaxes_to_propose(UID(instance.transfer_syntax_uid)):
            pair = (instance.sop_class_uid, str(syntax))
            if pair not in pairs:
                pairs.append(pair)
    return [build_context(sop_class, [syntax]) for sop_class, syntax in pairs]


def batch_for_contexts(instances: Sequence[InstanceFile]) -> list[list[InstanceFile]]:
    """Split `instances` into batches whose contexts fit in one association each."""
    batches: list[list[InstanceFile]] = []
    current: list[InstanceFile] = []
    for instance in instances:
        if len(build_contexts([*current, instance])) > MAX_CONTEXTS_PER_ASSOCIATION:
            batches.append(current)
            current = []
        current.append(instance)
    if current:
        batches.append(current)
    return batches


def _accepted_syntaxes(assoc: Association, sop_class_uid: str) -> list[str]:
    return [
        str(cx.transfer_syntax[0])
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == sop_class_uid and cx.transfer_syntax
    ]


class _NotSendable(Exception):
    def __init__(self, reason: str, action: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.action = action


def _prepare(instance: InstanceFile, accepted: list[str]) -> tuple[str | Path | Dataset, str, str]:
    """Choose how to send `instance` given the syntaxes accepted for its SOP class.

    Returns what to pass to C-STORE, the transfer syntax it goes out in and
    the conversion made. Raises `_NotSendable` when nothing accepted fits.
    """
    own = instance.transfer_syntax_uid
    if own in accepted:
        # Streamed from the file, so pixel data goes out byte for byte.
        return instance.path, own, "as-is"

    ds = dcmread(instance.path)
    for target in accepted:
        if target not in UNCOMPRESSED and codestream_fits(ds, UID(target)):
            return relabel(ds, UID(target)), target, "relabelled"
    native = [syntax for syntax in accepted if syntax in UNCOMPRESSED]
    if not native:
        raise _NotSendable(
            f"the SCP accepted none of the transfer syntaxes proposed for SOP class "
            f"{UID(instance.sop_class_uid).name} ({instance.sop_class_uid}), not even uncompressed",
            "Ask the PACS admin to accept this SOP class.",
        )
    try:
        decode_to_native(ds)
    except ValueError as exc:
        raise _NotSendable(
            f"the SCP does not accept {UID(own).name} for this SOP class, and {exc}",
            "Ask the PACS admin to accept this transfer syntax, or convert the file with another tool.",
        ) from None
    return ds, native[0], "decoded"


def _send_one(assoc: Association, instance: InstanceFile, endpoint: Endpoint) -> StoreOutcome:
    accepted = _accepted_syntaxes(assoc, instance.sop_class_uid)
    try:
        payload, syntax, conversion = _prepare(instance, accepted)
    except _NotSendable as exc:
        failure = Failure(FailureKind.NO_PRESENTATION_CONTEXT, f"Not sent: {exc.reason}.", exc.action, False)
        return instance.failed(StatusCategory.FAILURE, failure.summary, failure)

    LOGGER.debug("sending %s as %s (%s)", instance.sop_instance_uid, syntax, conversion)
    try:
        response = assoc.send_c_store(payload)
    except (ValueError, AttributeError, TypeError, KeyError) as exc:
        # pynetdicom raises these when the data set cannot be encoded in the
        # accepted syntax; nothing was sent for this instance.
        failure = Failure(
            FailureKind.ENCODING,
            f"Not sent: the data set could not be encoded as {UID(syntax).name} ({exc}).",
            "Check the file with a DICOM validator such as dciodvfy, or export it again from its source.",
            transient=False,
        )
        return instance.failed(StatusCategory.FAILURE, failure.summary, failure)
    if response is None or "Status" not in response:
        failure = Failure(
            FailureKind.DIMSE_TIMEOUT,
            f"No C-STORE response within {endpoint.dimse_timeout:g} s, or the association broke off.",
            "Check the SCP's log; raise the DIMSE timeout if the SCP is slow to store large loops.",
            transient=True,
        )
        return instance.failed(StatusCategory.FAILURE, failure.summary, failure, sent_transfer_syntax=syntax)
    meaning: StatusMeaning = describe_status(int(response.Status), service="storage")
    comment = str(response.get("ErrorComment", "") or "").strip()
    text = meaning.meaning if not comment else f"{meaning.meaning} ({comment})"
    return StoreOutcome(
        path=instance.path,
        sop_instance_uid=instance.sop_instance_uid,
        sop_class_uid=instance.sop_class_uid,
        category=meaning.category,
        meaning=text,
        status=meaning.code,
        sent_transfer_syntax=syntax,
        conversion=conversion,
    )


def _send_batch(
    endpoint: Endpoint,
    batch: list[InstanceFile],
    on_outcome: Callable[[StoreOutcome], None],
) -> None:
    try:
        with association(endpoint, build_contexts(batch)) as assoc:
            for index, instance in enumerate(batch):
                if not assoc.is_established:
                    failure = Failure(
                        FailureKind.CONNECTION_LOST,
                        "The association broke off before this instance was sent.",
                        "Check the SCP's log; the instance can be sent again safely.",
                        transient=True,
                    )
                    for rest in batch[index:]:
                        on_outcome(rest.failed(StatusCategory.FAILURE, failure.summary, failure))
                    return
                on_outcome(_send_one(assoc, instance, endpoint))
    except DicomNetworkError as exc:
        for instance in batch:
            on_outcome(instance.failed(StatusCategory.FAILURE, exc.failure.summary, exc.failure))


def store_instances(
    endpoint: Endpoint,
    instances: Iterable[InstanceFile],
    *,
    on_outcome: Callable[[StoreOutcome], None] | None = None,
) -> StoreResult:
    """Send `instances` to `endpoint` by C-STORE and return each instance's outcome.

    One association carries them all, unless their presentation contexts do
    not fit in one. Association failures become failed outcomes rather than
    exceptions, so every instance gets exactly one outcome.
    """
    result = StoreResult()

    def record(outcome: StoreOutcome) -> None:
        result.outcomes.append(outcome)
        if outcome.status is not None:
            LOGGER.info(
                "C-STORE %s to %s: %s 0x%04X",
                outcome.sop_instance_uid,
                endpoint.address,
                outcome.category.value,
                outcome.status,
            )
        else:
            # No response: either nothing was sent (the association failed, or the data set could not be
            # encoded), or the data set was sent and the response never came.
            summary = outcome.failure.summary if outcome.failure is not None else outcome.meaning
            summary = summary.removeprefix("Not sent: ")
            LOGGER.info(
                "C-STORE %s to %s: %s: %s",
                outcome.sop_instance_uid,
                endpoint.address,
                "not sent" if outcome.sent_transfer_syntax is None else "no response",
                summary,
            )
        if on_outcome is not None:
            on_outcome(outcome)

    for batch in batch_for_contexts(list(instances)):
        _send_batch(endpoint, batch, record)
    return result
