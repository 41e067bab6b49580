"""Prepare one instance for one PACS, once the association shows which transfer syntaxes the SCP accepts.

The order of the steps:

1. plan (before the association): read the header, repair what the rules
   repair, and list the transfer syntaxes to offer;
2. choose the first offered syntax the SCP accepted, recording a fallback;
3. decide whether the pixel data is kept byte for byte, relabelled or
   transcoded, and whether grey colour images become MONOCHROME2;
4. give a derived instance its deterministic new SOP Instance UID and point
   it at its source; rewrite references to instances derived earlier;
5. convert times to the SCP's time zone and text to its character set;
6. send the file as it is when nothing changed, else write a prepared copy.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from pacsbridge.connections.settings import MonochromeMode
from pacsbridge.dicomnet.instances import InstanceFile
from pacsbridge.prepare.errors import PreparationError
from pacsbridge.prepare.plan import (
    COLOUR_PHOTOMETRICS,
    NATIVE_SYNTAXES,
    Candidates,
    Preparation,
    candidates,
)
from pacsbridge.prepare.repair import PixelDataFacts, RepairResult, repair_file

LOGGER = logging.getLogger(__name__)

# The targets the writer encodes; anything else accepted is reached through one of these.
WRITER_TARGETS = frozenset({ExplicitVRLittleEndian, UID("1.2.840.10008.1.2.4.70"), JPEGBaseline8Bit})

# Derivation Description text of each step that makes a derived instance.
STEP_DESCRIPTIONS = {
    "monochrome": "grey colour image stored as MONOCHROME2",
    "multi-frame-class": "several frames moved from a single-frame SOP class to its multi-frame class",
    "frames-dropped": "incomplete frames left out",
    "uid-too-long": "UIDs over 64 characters replaced",
}

# CID 7202 codes for Purpose of Reference of a Source Image Sequence item.
UNCOMPRESSED_PREDECESSOR = ("121320", "DCM", "Uncompressed predecessor")
SOURCE_FOR_PROCESSING = ("121322", "DCM", "Source image for image processing operation")


@dataclass
class InstancePlan:
    """An instance's header, the repairs already made to it, and the syntaxes to offer."""

    instance: InstanceFile
    header: Dataset
    # Layout of the Pixel Data element; None for objects without pixel data.
    facts: PixelDataFacts | None
    candidates: Candidates
    sop_class_uid: str
    repair: RepairResult

    @property
    def own_syntax(self) -> UID:
        return UID(self.instance.transfer_syntax_uid)

    @property
    def has_pixels(self) -> bool:
        return self.facts is not None


@dataclass
class Prepared:
    """The payload to send for one instance: a file path (streamed) or, rarely, a data set."""

    payload: Path | Dataset
    syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    conversion: str
    notes: list[str] = field(default_factory=list)


class NotSendable(PreparationError):
    """None of the accepted transfer syntaxes can carry the instance."""


def plan_instance(instance: InstanceFile, preparation: Preparation) -> InstancePlan:
    """Read the header of `instance`, repair it where a documented rule allows, and list the syntaxes to offer."""
    header, facts, result = repair_file(instance.path)
    own = UID(instance.transfer_syntax_uid)
    return InstancePlan(
        instance=instance,
        header=header,
        facts=facts,
        candidates=candidates(header, own, facts is not None, preparation),
        sop_class_uid=str(header.SOPClassUID),
        repair=result,
    )


def _choose(plan: InstancePlan, accepted: list[str]) -> tuple[UID, list[str]]:
    offered = plan.candidates.syntaxes
    chosen = next((syntax for syntax in offered if syntax in accepted), None)
    if chosen is None:
        raise NotSendable(
            f"the SCP accepted none of the transfer syntaxes proposed for SOP class "
            f"{UID(plan.sop_class_uid).name} ({plan.sop_class_uid}), not even uncompressed",
            "Ask the PACS admin to accept this SOP class.",
        )
    notes = []
    if plan.candidates.note:
        notes.append(plan.candidates.note)
    wanted = plan.candidates.wanted or offered[0]
    if chosen != wanted:
        notes.append(f"{wanted.name} not accepted by the SCP: sent as {chosen.name}")
    return chosen, notes


def _writable(plan: InstancePlan, accepted: list[str]) -> UID:
    """Return the first offered and accepted syntax that the writer can encode."""
    for syntax in plan.candidates.syntaxes:
        if syntax in accepted and (syntax in WRITER_TARGETS or syntax == ImplicitVRLittleEndian):
            return syntax
    raise NotSendable(
        f"the pixel data must be re-encoded, but the SCP accepted no uncompressed or JPEG syntax for SOP class "
        f"{UID(plan.sop_class_uid).name}",
        "Ask the PACS admin to accept Explicit VR Little Endian for this SOP class.",
    )


# An instance's own identity is not a reference: a second copy of an instance in one send must keep it.
OWN_UID_TAGS = frozenset({0x00080018, 0x00020003})


def _rewrite_references(dataset: Dataset, uid_map: dict[str, str], *, top_level: bool = True) -> int:
    """Replace every referenced UI value found in `uid_map`, in sequences too; return how many were replaced."""
    replaced = 0
    for element in dataset:
        if top_level and element.tag in OWN_UID_TAGS:
            continue
        if element.VR == "SQ":
            for item in element.value or DicomSequence():
                replaced += _rewrite_references(item, uid_map, top_level=False)
        elif element.VR == "UI" and element.value:
            values = list(element.value) if element.VM > 1 else [element.value]
            new = [uid_map.get(str(value), str(value)) for value in values]
            if new != [str(value) for value in values]:
                replaced += sum(a != str(b) for a, b in zip(new, values, strict=True))
                element.value = new if element.VM > 1 else new[0]
    return replaced


def _code_item(code: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def mark_derived(
    header: Dataset,
    new_uid: str,
    purpose: tuple[str, str, str],
    description: str,
    *,
    source_class_uid: str | None = None,
) -> None:
    """Make `header` a derived instance with SOP Instance UID `new_uid`, referencing its source.

    The source's SOP class and instance go into a new Source Image Sequence item
    (earlier items stay); Image Type becomes DERIVED; the description is
    appended to Derivation Description.
    """
    source = Dataset()
    # A repair may already have moved the header to another SOP class; the source keeps its own.
    source.ReferencedSOPClassUID = source_class_uid or header.SOPClassUID
    source.ReferencedSOPInstanceUID = header.SOPInstanceUID
    source.PurposeOfReferenceCodeSequence = [_code_item(purpose)]
    sequence = list(header.get("SourceImageSequence", []))
    header.SourceImageSequence = [*sequence, source]
    header.SOPInstanceUID = new_uid
    header.file_meta.MediaStorageSOPInstanceUID = new_uid
    if "ImageType" in header and header.ImageType:
        values = list(header.ImageType) if header["ImageType"].VM > 1 else [header.ImageType]
        values[0] = "DERIVED"
        header.ImageType = values
    previous = str(header.get("DerivationDescription", "") or "").strip()
    text = f"{previous}; {description}" if previous else description
    header.DerivationDescription = text[:1024]


def _meta_matches(plan: InstancePlan, header: Dataset) -> bool:
    """Tell whether the file meta names the instance's SOP class, instance and syntax, as streaming needs."""
    meta = header.file_meta
    return (
        str(meta.get("MediaStorageSOPInstanceUID", "")) == str(header.get("SOPInstanceUID", ""))
        and str(meta.get("MediaStorageSOPClassUID", "")) == str(header.get("SOPClassUID", ""))
        and str(meta.get("TransferSyntaxUID", "")) == str(plan.own_syntax)
    )


def _wants_monochrome(plan: InstancePlan, preparation: Preparation, transcoding: bool) -> bool:
    """Tell whether a colour image whose content is grey becomes MONOCHROME2 here.

    Only where the pixel data is decoded anyway: transcoding, or received
    uncompressed. A compressed instance sent as received keeps its colour.
    """
    header = plan.header
    if preparation.monochrome != MonochromeMode.B_MODE_ONLY or not plan.has_pixels:
        return False
    if int(header.get("SamplesPerPixel", 1) or 1) != 3:
        return False
    if str(header.get("PhotometricInterpretation", "")).strip() not in COLOUR_PHOTOMETRICS:
        return False
    if not (transcoding or plan.own_syntax in NATIVE_SYNTAXES):
        return False
    from pacsbridge.prepare.frames import iter_frames
    from pacsbridge.prepare.monochrome import source_is_grey

    return source_is_grey(iter_frames(plan.instance.path), "RGB")


def _relabels(plan: InstancePlan, chosen: UID) -> bool:
    from pacsbridge.dicomnet.syntaxes import DEFAULT_BESIDE, codestream_fits
    from pacsbridge.prepare.frames import iter_encapsulated_frames

    if DEFAULT_BESIDE.get(plan.own_syntax) != chosen:
        return False
    try:
        return codestream_fits(plan.own_syntax, chosen, iter_encapsulated_frames(plan.instance.path))
    except PreparationError:
        # Frames that cannot be split out are not relabelled; the caller decodes or sends them as received.
        return False


def prepare_instance(
    plan: InstancePlan,
    preparation: Preparation,
    accepted: list[str],
    workdir: Path,
    uid_map: dict[str, str],
) -> Prepared:
    """Prepare the planned instance for an SCP that accepted `accepted` for its SOP class.

    `uid_map` collects old -> new UIDs across the instances of one send, so that
    references to an instance derived earlier are rewritten. When the pixel data
    cannot be decoded or re-encoded but the SCP accepts the received syntax, the
    instance goes in that syntax, with a note. Raises `PreparationError` when
    the instance cannot be prepared at all.
    """
    local_map = dict(uid_map)
    try:
        prepared = _prepare(plan, preparation, accepted, workdir, local_map, forced=None)
    except NotSendable:
        raise
    except PreparationError as exc:
        own = plan.own_syntax
        if not plan.has_pixels or str(own) not in accepted or "frames-dropped" in plan.repair.conversions:
            raise
        local_map = dict(uid_map)
        prepared = _prepare(plan, preparation, accepted, workdir, local_map, forced=own)
        prepared.notes.insert(0, f"pixel data not converted ({exc.reason}): sent in its received transfer syntax")
    uid_map.update(local_map)
    return prepared


def _prepare(
    plan: InstancePlan,
    preparation: Preparation,
    accepted: list[str],
    workdir: Path,
    uid_map: dict[str, str],
    *,
    forced: UID | None,
) -> Prepared:
    """Prepare the instance; with `forced`, keep its pixel data in that (its own) syntax."""
    from pacsbridge.prepare import charset, timezone
    from pacsbridge.prepare.pixels import PixelTarget, write_prepared
    from pacsbridge.prepare.uids import derived_uid

    header = copy.deepcopy(plan.header)
    source_uid = str(header.SOPInstanceUID)
    if forced is None:
        chosen, notes = _choose(plan, accepted)
    else:
        chosen, notes = forced, []
    notes = [*plan.repair.repairs, *notes]
    changed = bool(plan.repair.repairs)

    own = plan.own_syntax
    keep = not plan.has_pixels or chosen == own or _relabels(plan, chosen)
    if keep and plan.has_pixels and "frames-dropped" in plan.repair.conversions and not own.is_encapsulated:
        # Copying native data would send the partial frame too: the complete frames are written anew.
        # Encapsulated data keeps the codestreams of its complete frames, re-itemized by the writer.
        keep = False
    monochrome = forced is None and _wants_monochrome(plan, preparation, transcoding=not keep)
    if monochrome:
        keep = False
    if not keep and chosen not in WRITER_TARGETS and chosen != ImplicitVRLittleEndian:
        # The pixel data must be written anew, in a syntax the writer encodes.
        chosen = _writable(plan, accepted)
    target = chosen if chosen in WRITER_TARGETS else ExplicitVRLittleEndian
    if keep:
        conversion = "as-is" if chosen == own else "relabelled"
    elif target != ExplicitVRLittleEndian:
        conversion = "transcoded"
    else:
        conversion = "decoded" if own.is_compressed else "rewritten"
    lossy_step = not keep and target == JPEGBaseline8Bit

    uid_map.update(plan.repair.uid_map)
    if _rewrite_references(header, uid_map):
        changed = True
        notes.append("references to prepared instances rewritten")

    steps: list[str] = []
    # The repair already gave over-long UIDs their replacements, which are the new UIDs.
    steps += [step for step in plan.repair.conversions if step != "uid-too-long"]
    if lossy_step:
        steps.append(f"jpeg-baseline q{preparation.jpeg_quality}")
    if monochrome:
        steps.append("monochrome")
    if steps:
        new_uid = derived_uid(source_uid, "+".join(steps))
        if lossy_step:
            purpose = UNCOMPRESSED_PREDECESSOR
            description = f"Lossy compressed by pacsbridge: JPEG Baseline, quality {preparation.jpeg_quality}"
        else:
            purpose = SOURCE_FOR_PROCESSING
            description = "Prepared by pacsbridge: " + ", ".join(STEP_DESCRIPTIONS.get(step, step) for step in steps)
        if monochrome and lossy_step:
            description += "; grey colour image stored as MONOCHROME2"
        mark_derived(header, new_uid, purpose, description, source_class_uid=plan.instance.sop_class_uid)
        if monochrome and ("UltrasoundColorDataPresent" in header or header.get("Modality") == "US"):
            header.UltrasoundColorDataPresent = 0
        uid_map[source_uid] = new_uid
        changed = True
        if monochrome:
            notes.append("grey colour image stored as MONOCHROME2")
        notes.append(f"new SOP Instance UID {new_uid} (derived from {source_uid})")

    if preparation.timezone:
        report = timezone.convert_timezone(header, preparation.timezone)
        changed |= report.changed
        if report.changed:
            notes.append(f"times converted to {preparation.timezone} ({report.new_offset})")
        notes += report.flags
    if preparation.character_set:
        text_report = charset.encode_text(header, preparation.character_set)
        changed |= text_report.changed
        if text_report.changed:
            notes.append(f"text re-encoded as {preparation.character_set}")
        notes += text_report.flags

    sop_class = str(header.SOPClassUID)
    sop_instance = str(header.SOPInstanceUID)
    if keep and chosen == own and not changed and _meta_matches(plan, header):
        return Prepared(plan.instance.path, str(own), sop_class, sop_instance, "as-is", notes)

    if keep and chosen != own:
        header.file_meta.TransferSyntaxUID = chosen
    header.file_meta.MediaStorageSOPClassUID = header.SOPClassUID
    header.file_meta.MediaStorageSOPInstanceUID = header.SOPInstanceUID
    destination = workdir / f"{sop_instance}.dcm"
    if not plan.has_pixels:
        # Nothing to stream: pydicom writes the whole object in its own transfer syntax.
        header.save_as(destination, enforce_file_format=True)
        return Prepared(destination, str(chosen), sop_class, sop_instance, "rewritten", notes)
    pixel_target = PixelTarget(
        syntax=chosen if keep else target,
        quality=preparation.jpeg_quality,
        monochrome=monochrome,
        keep_pixel_data=keep,
    )
    write_prepared(plan.instance.path, destination, header, pixel_target)
    if chosen == ImplicitVRLittleEndian and not keep:
        # The writer writes Explicit VR; pynetdicom re-encodes a data set in the accepted syntax.
        return Prepared(
            dcmread(destination),
            str(chosen),
            sop_class,
            sop_instance,
            conversion,
            notes,
        )
    return Prepared(destination, str(chosen), sop_class, sop_instance, conversion, notes)


__all__ = [
    "InstancePlan",
    "NotSendable",
    "Prepared",
    "mark_derived",
    "plan_instance",
    "prepare_instance",
]
