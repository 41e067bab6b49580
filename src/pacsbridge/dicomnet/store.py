"""C-STORE: send a set of instances over one association and report each outcome.

Presentation contexts are proposed per SOP class with one transfer syntax
each, so the SCP's response shows exactly which syntaxes it accepts. What is
proposed comes from the connection's preparation settings
(`pacsbridge.prepare.plan`): the configured syntax first, then the
uncompressed ones as the fallback. Each instance is then prepared for the
syntax the SCP accepted (`pacsbridge.prepare.pipeline`) and streamed from a
file, so a large loop never sits in memory whole.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.uid import UID
from pynetdicom import Association
from pynetdicom.presentation import PresentationContext, build_context

from pacsbridge.dicomnet.association import Endpoint, association
from pacsbridge.dicomnet.failures import DicomNetworkError, Failure, FailureKind
from pacsbridge.dicomnet.instances import InstanceFile
from pacsbridge.dicomnet.status import StatusCategory, StatusMeaning, describe_status
from pacsbridge.prepare.errors import PreparationError
from pacsbridge.prepare.pipeline import (
    InstancePlan,
    NotSendable,
    plan_instance,
    prepare_instance,
)
from pacsbridge.prepare.plan import AS_RECEIVED, Preparation

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
    # How the instance was prepared: "as-is", "relabelled", "decoded" or "transcoded".
    conversion: str | None = None
    failure: Failure | None = None
    # The SOP Instance UID sent, when preparation derived a new instance.
    sent_sop_instance_uid: str | None = None
    # What preparation changed or could not do (fallbacks, repairs, times left as received).
    notes: list[str] = field(default_factory=list)

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
            "sent_sop_instance_uid": self.sent_sop_instance_uid or self.sop_instance_uid,
            "notes": list(self.notes),
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


def build_contexts(plans: Sequence[InstancePlan]) -> list[PresentationContext]:
    """Return one presentation context per (SOP class, transfer syntax) the planned instances may need."""
    pairs: list[tuple[str, str]] = []
    for plan in plans:
        for syntax in plan.candidates.syntaxes:
            pair = (plan.sop_class_uid, str(syntax))
            if pair not in pairs:
                pairs.append(pair)
    return [build_context(sop_class, [syntax]) for sop_class, syntax in pairs]


def batch_for_contexts(plans: Sequence[InstancePlan]) -> list[list[InstancePlan]]:
    """Split `plans` into batches whose contexts fit in one association each."""
    batches: list[list[InstancePlan]] = []
    current: list[InstancePlan] = []
    for plan in plans:
        if len(build_contexts([*current, plan])) > MAX_CONTEXTS_PER_ASSOCIATION:
            batches.append(current)
            current = []
        current.append(plan)
    if current:
        batches.append(current)
    return batches


def _accepted_syntaxes(assoc: Association, sop_class_uid: str) -> list[str]:
    return [
        str(cx.transfer_syntax[0])
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == sop_class_uid and cx.transfer_syntax
    ]


def _preparation_failure(instance: InstanceFile, exc: PreparationError) -> StoreOutcome:
    kind = FailureKind.NO_PRESENTATION_CONTEXT if isinstance(exc, NotSendable) else FailureKind.PREPARATION
    failure = Failure(kind, f"Not sent: {exc.reason}.", exc.action, False)
    return instance.failed(StatusCategory.FAILURE, failure.summary, failure)


@dataclass
class _SendContext:
    endpoint: Endpoint
    preparation: Preparation
    workdir: Path
    # Old -> new UIDs of the instances prepared so far, for rewriting references.
    uid_map: dict[str, str] = field(default_factory=dict)


def _send_one(assoc: Association, plan: InstancePlan, context: _SendContext) -> StoreOutcome:
    instance = plan.instance
    endpoint = context.endpoint
    accepted = _accepted_syntaxes(assoc, plan.sop_class_uid)
    try:
        prepared = prepare_instance(plan, context.preparation, accepted, context.workdir, context.uid_map)
    except PreparationError as exc:
        return _preparation_failure(instance, exc)
    syntax, conversion = prepared.syntax, prepared.conversion
    sent_uid = prepared.sop_instance_uid if prepared.sop_instance_uid != instance.sop_instance_uid else None

    LOGGER.debug("sending %s as %s (%s)", prepared.sop_instance_uid, syntax, conversion)
    try:
        response = assoc.send_c_store(prepared.payload)
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
    finally:
        if isinstance(prepared.payload, Path) and prepared.payload.parent == context.workdir:
            prepared.payload.unlink(missing_ok=True)
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
        sent_sop_instance_uid=sent_uid,
        notes=prepared.notes,
    )


def _send_batch(
    context: _SendContext,
    batch: list[InstancePlan],
    on_outcome: Callable[[StoreOutcome], None],
) -> None:
    endpoint = context.endpoint
    try:
        with association(endpoint, build_contexts(batch)) as assoc:
            for index, plan in enumerate(batch):
                if not assoc.is_established:
                    failure = Failure(
                        FailureKind.CONNECTION_LOST,
                        "The association broke off before this instance was sent.",
                        "Check the SCP's log; the instance can be sent again safely.",
                        transient=True,
                    )
                    for rest in batch[index:]:
                        on_outcome(rest.instance.failed(StatusCategory.FAILURE, failure.summary, failure))
                    return
                on_outcome(_send_one(assoc, plan, context))
    except DicomNetworkError as exc:
        for plan in batch:
            on_outcome(plan.instance.failed(StatusCategory.FAILURE, exc.failure.summary, exc.failure))


def store_instances(
    endpoint: Endpoint,
    instances: Iterable[InstanceFile],
    *,
    preparation: Preparation = AS_RECEIVED,
    on_outcome: Callable[[StoreOutcome], None] | None = None,
) -> StoreResult:
    """Send `instances` to `endpoint` by C-STORE, prepared by the rules of `preparation`, and return each outcome.

    One association carries them all, unless their presentation contexts do
    not fit in one. Images go before the objects without pixel data, so that
    references to images that became derived instances can be rewritten.
    Preparation and association failures become failed outcomes rather than
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

    plans: list[InstancePlan] = []
    for instance in instances:
        try:
            plans.append(plan_instance(instance, preparation))
        except PreparationError as exc:
            record(_preparation_failure(instance, exc))
    plans.sort(key=lambda plan: not plan.has_pixels)
    with tempfile.TemporaryDirectory(prefix="pacsbridge-prepared-") as workdir:
        context = _SendContext(endpoint, preparation, Path(workdir))
        for batch in batch_for_contexts(plans):
            _send_batch(context, batch, record)
    return result
