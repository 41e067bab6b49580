"""Upload DICOM files into an archive and queue them for its linked PACS (a transactional outbox).

An upload has two phases:

1. `prepare_file` checks one file with `inspect_file`, reads its study and
   patient attributes and copies it into the blob store. It touches no
   database, so a long upload of large files holds no database lock.
2. `store_files` adds the `Study`, `Instance` and `Delivery` rows of every
   prepared file in the caller's transaction. Each file gets its own
   savepoint, so a file that hits a conflict leaves no rows behind while the
   others are kept. The deliveries are created in the same savepoint as
   their instance, so after the commit a delivery exists exactly for each
   stored instance and linked PACS.

The whole call is one transaction rather than one per file: the caller owns
it (as everywhere in pacsbridge.db), the database part is short because the
blobs are already written, and a failed commit leaves nothing visible. A
blob of a file whose rows were never committed stays in the blob store
unreferenced, which is harmless.
"""

from __future__ import annotations

import enum
import logging
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pacsbridge.db import DEFAULT_ORGANIZATION, ConnectionRecord
from pacsbridge.db.forwarding import (
    UID_MAX_LENGTH,
    Archive,
    Delivery,
    Instance,
    InstanceState,
    Study,
)
from pacsbridge.db.models import utc_now
from pacsbridge.dicomnet.instances import InstanceFile
from pacsbridge.ingest.archives import get_archive, new_delivery, record_audit_event
from pacsbridge.ingest.blobstore import BlobStore
from pacsbridge.ingest.files import UnreadableFileError, expand_paths, inspect_file
from pacsbridge.ingest.testimages import TEST_DATA_LABEL
from pacsbridge.ingest.worklist_item import (
    WorklistItemError,
    WorklistPick,
    write_with_worklist_item,
)

LOGGER = logging.getLogger(__name__)

# Patient IDs of the studies that `pacsbridge test-images` writes start with this.
TEST_PATIENT_ID_PREFIX = "PB-TEST"

# Study columns filled from the file: column name -> (DICOM keyword, tag as printed in messages).
STUDY_ATTRIBUTES = {
    "patient_name": ("PatientName", "Patient's Name (0010,0010)"),
    "patient_id": ("PatientID", "Patient ID (0010,0020)"),
    "issuer_of_patient_id": ("IssuerOfPatientID", "Issuer of Patient ID (0010,0021)"),
    "patient_birth_date": ("PatientBirthDate", "Patient's Birth Date (0010,0030)"),
    "patient_sex": ("PatientSex", "Patient's Sex (0010,0040)"),
    "accession_number": ("AccessionNumber", "Accession Number (0008,0050)"),
    "study_date": ("StudyDate", "Study Date (0008,0020)"),
    "study_description": ("StudyDescription", "Study Description (0008,1030)"),
}


DATE_COLUMNS = frozenset({"patient_birth_date", "study_date"})
# Old files carry dates in the ACR-NEMA 300 form YYYY.MM.DD, which PS3.5 (DA) calls not
# compliant. They are stored as YYYYMMDD like any other date.
_ACR_NEMA_DATE = re.compile(r"[0-9]{4}\.[0-9]{2}\.[0-9]{2}")
# Free text that is only shown, so a value longer than the column is cut to fit.
TRUNCATED_COLUMNS = frozenset({"study_description"})


class FileOutcome(enum.StrEnum):
    # A new instance, stored and queued for every linked PACS.
    ACCEPTED = "accepted"
    # The same SOP Instance UID with the same bytes is stored already: nothing changed.
    DUPLICATE = "duplicate"
    # The same SOP Instance UID with different bytes: stored as a second version, not forwarded.
    NEEDS_ATTENTION = "needs-attention"
    # Not stored at all; `FileResult.reason` gives the cause.
    REJECTED = "rejected"


@dataclass(frozen=True)
class PreparedFile:
    """One file after the checks of phase 1: either a rejection reason or the blob and the attributes to store."""

    path: Path
    rejection: str | None = None
    instance: InstanceFile | None = None
    study_instance_uid: str | None = None
    sha256: str | None = None
    size: int | None = None
    study_attributes: dict[str, str | None] = field(default_factory=dict)
    is_test_image: bool = False
    # Stored in Study.worklist_attributes when the upload attached a worklist item.
    worklist_attributes: dict[str, object] | None = None


@dataclass(frozen=True)
class FileResult:
    path: Path
    result: FileOutcome
    reason: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    instance_id: int | None = None
    # Delivery state per linked PACS name, for an instance stored by this upload.
    deliveries: dict[str, str] = field(default_factory=dict)
    # Why a delivery is in needs-attention, per linked PACS name.
    delivery_reasons: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True for accepted and duplicate files, which need no action."""
        return self.result in (FileOutcome.ACCEPTED, FileOutcome.DUPLICATE)

    def as_dict(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "result": self.result.value,
            "reason": self.reason,
            "sop_instance_uid": self.sop_instance_uid,
            "study_instance_uid": self.study_instance_uid,
            "instance_id": self.instance_id,
            "deliveries": dict(self.deliveries),
            "delivery_reasons": dict(self.delivery_reasons),
        }


@dataclass
class UploadResult:
    archive: str
    files: list[FileResult] = field(default_factory=list)

    @property
    def counts(self) -> Counter[FileOutcome]:
        return Counter(result.result for result in self.files)

    @property
    def ok(self) -> bool:
        """True when every file was accepted or was a duplicate."""
        return all(result.ok for result in self.files)


# Phase 1: files and blobs --------------------------------------------------------


def prepare_file(blobs: BlobStore, path: Path, worklist: WorklistPick | None = None) -> PreparedFile:
    """Check one file and copy it into the blob store.

    With `worklist`, the blob is a copy of the file that carries the worklist
    item's patient and order identification (see `pacsbridge.ingest.worklist_item`),
    and the study columns are read from that copy.
    A file that fails the checks, or cannot be read or copied, returns a rejection instead of raising.
    """
    if worklist is None:
        return _prepare_file(blobs, path, None, Path())
    with tempfile.TemporaryDirectory(prefix="pacsbridge-upload-") as folder:
        return _prepare_file(blobs, path, worklist, Path(folder) / "with-worklist-item.dcm")


def _prepare_file(blobs: BlobStore, path: Path, worklist: WorklistPick | None, rewritten: Path) -> PreparedFile:
    """Prepare `path`, writing the copy with the worklist item (if any) to `rewritten` first."""
    source = path
    try:
        before = path.stat()
        instance = inspect_file(path)
        header = _read_header(path)
        study_instance_uid = _study_instance_uid(header)
        _check_uids(instance, study_instance_uid)
        if worklist is not None:
            write_with_worklist_item(path, rewritten, worklist)
            source = rewritten
            # Reading the copy back checks that it is a valid file, and gives the study values it carries.
            inspect_file(rewritten)
            header = _read_header(rewritten)
            study_instance_uid = _study_instance_uid(header)
            _check_uids(instance, study_instance_uid)
        attributes = _study_attributes(header)
    except (UnreadableFileError, WorklistItemError) as exc:
        return PreparedFile(path=path, rejection=str(exc))
    except OSError as exc:
        return PreparedFile(path=path, rejection=f"cannot be read ({exc.strerror or exc}): check the file")

    try:
        sha256, size = blobs.put_file(source)
        after = path.stat()
    except OSError as exc:
        # The source was readable a moment ago, so this is most likely the blob folder.
        return PreparedFile(
            path=path,
            rejection=f"cannot be copied into the blob store {blobs.folder} ({exc.strerror or exc}): "
            "check free space and permissions there",
        )
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or (
        worklist is None and size != before.st_size
    ):
        return PreparedFile(
            path=path,
            rejection="the file changed while it was read: upload it again once it is completely written",
        )
    return PreparedFile(
        path=path,
        instance=instance,
        study_instance_uid=study_instance_uid,
        sha256=sha256,
        size=size,
        study_attributes=attributes,
        is_test_image=_is_test_image(header),
        worklist_attributes=worklist.study_attributes() if worklist is not None else None,
    )


def _read_header(path: Path) -> Dataset:
    # inspect_file has read the whole file already, so this read succeeds unless the file changed.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise UnreadableFileError(
            f"not readable as DICOM on the second read ({exc}): upload it again once it is completely written"
        ) from None


def _study_instance_uid(header: Dataset) -> str:
    value = str(header.get("StudyInstanceUID", "") or "").strip()
    if not value:
        raise UnreadableFileError(
            "the data set has no Study Instance UID (0020,000D), so it cannot be grouped into a study; "
            "export it again from its source"
        )
    return value


def _check_uids(instance: InstanceFile, study_instance_uid: str) -> None:
    for label, value in (
        ("SOP Instance UID (0008,0018)", instance.sop_instance_uid),
        ("SOP Class UID (0008,0016)", instance.sop_class_uid),
        ("Transfer Syntax UID (0002,0010)", instance.transfer_syntax_uid),
        ("Study Instance UID (0020,000D)", study_instance_uid),
    ):
        if len(value) > UID_MAX_LENGTH:
            raise UnreadableFileError(
                f"the {label} has {len(value)} characters, more than the {UID_MAX_LENGTH} that DICOM allows; "
                "export the file again from its source"
            )


def _study_attributes(header: Dataset) -> dict[str, str | None]:
    """Return the Study columns read from `header`; the file itself is stored and sent unchanged."""
    attributes: dict[str, str | None] = {}
    for column, (keyword, label) in STUDY_ATTRIBUTES.items():
        element = header.get(keyword)
        text = "" if element is None else str(element).strip()
        if "\x00" in text:
            raise UnreadableFileError(f"the {label} contains a NUL character; correct it at the source")
        if column in DATE_COLUMNS and _ACR_NEMA_DATE.fullmatch(text):
            text = text.replace(".", "")
        max_length = Study.__table__.c[column].type.length
        if max_length is not None and len(text) > max_length:
            if column not in TRUNCATED_COLUMNS:
                # Longer than the DICOM maximum of its VR. A shortened identifier could
                # match another patient or exam, so the file is rejected instead.
                raise UnreadableFileError(
                    f"the {label} has {len(text)} characters, more than the {max_length} that can be stored; "
                    "correct it at the source"
                )
            text = text[:max_length]
        attributes[column] = text or None
    return attributes


def _is_test_image(header: Dataset) -> bool:
    """Return True for the synthetic images of `pacsbridge test-images`, found by their patient ID or label."""
    patient_id = str(header.get("PatientID", "") or "")
    descriptions = (str(header.get(keyword, "") or "") for keyword in ("StudyDescription", "SeriesDescription"))
    return patient_id.startswith(TEST_PATIENT_ID_PREFIX) or any(TEST_DATA_LABEL in text for text in descriptions)


# Phase 2: rows ---------------------------------------------------------------------


def store_files(
    session: Session,
    archive_name: str,
    prepared: Sequence[PreparedFile],
    *,
    organization: str = DEFAULT_ORGANIZATION,
    actor: str,
) -> UploadResult:
    """Add the rows of the prepared files to the archive, one savepoint per file.

    Writes an `archive.upload` AuditEvent when any instance was stored.
    Raises ArchiveNotFoundError for an unknown archive. Any error other than a
    unique-constraint conflict propagates, and the caller's transaction must
    then be rolled back.
    """
    archive = get_archive(session, archive_name, organization=organization)
    connections = [link.connection for link in archive.links]
    result = UploadResult(archive=archive.name)
    for file in prepared:
        if file.rejection is not None:
            result.files.append(_rejected(file, file.rejection))
            continue
        result.files.append(_store_with_retry(session, archive, connections, file))

    counts = result.counts
    if counts[FileOutcome.ACCEPTED] or counts[FileOutcome.NEEDS_ATTENTION]:
        record_audit_event(
            session,
            archive.organization_id,
            "archive.upload",
            actor,
            {
                "archive_id": archive.id,
                "archive": archive.name,
                "instance_ids": [
                    file.instance_id
                    for file in result.files
                    if file.result in (FileOutcome.ACCEPTED, FileOutcome.NEEDS_ATTENTION)
                ],
                **{outcome.value: counts[outcome] for outcome in FileOutcome},
            },
        )
    LOGGER.info(
        "Upload to archive id=%d: %d accepted, %d duplicate, %d needs attention, %d rejected",
        archive.id,
        counts[FileOutcome.ACCEPTED],
        counts[FileOutcome.DUPLICATE],
        counts[FileOutcome.NEEDS_ATTENTION],
        counts[FileOutcome.REJECTED],
    )
    return result


def upload_files(
    session: Session,
    blobs: BlobStore,
    archive_name: str,
    paths: Iterable[Path],
    *,
    organization: str = DEFAULT_ORGANIZATION,
    actor: str,
    worklist: WorklistPick | None = None,
) -> UploadResult:
    """Upload the files named by `paths` (folders are walked) into the archive: both phases in one call.

    All blobs are written before the first database statement. `worklist`
    attaches a worklist item to every file (see `prepare_file`). Returns one
    `FileResult` per file; commit the session to make the accepted files visible.
    """
    prepared = [prepare_file(blobs, path, worklist) for path in expand_paths(paths)]
    return store_files(session, archive_name, prepared, organization=organization, actor=actor)


def _store_with_retry(
    session: Session, archive: Archive, connections: list[ConnectionRecord], file: PreparedFile
) -> FileResult:
    # A conflict means that another upload stored the same study or instance
    # after our checks. On the second try the checks see its rows.
    for attempt in (1, 2):
        try:
            with session.begin_nested():
                return _store_one(session, archive, connections, file)
        except IntegrityError as exc:
            LOGGER.warning(
                "Upload conflict on SOP Instance UID %s, try %d: %s",
                file.instance.sop_instance_uid if file.instance else None,
                attempt,
                exc.orig,
            )
    return _rejected(file, "another upload stored the same study or instance at the same moment: upload it again")


def _store_one(
    session: Session, archive: Archive, connections: list[ConnectionRecord], file: PreparedFile
) -> FileResult:
    assert file.instance is not None
    assert file.study_instance_uid is not None
    assert file.sha256 is not None
    organization_id = archive.organization_id
    study = session.scalar(
        select(Study).where(
            Study.organization_id == organization_id, Study.study_instance_uid == file.study_instance_uid
        )
    )
    if study is not None and study.archive_id != archive.id:
        return _rejected(
            file,
            f"study {file.study_instance_uid} is already stored in archive {study.archive.name!r}: "
            f"upload its files to {study.archive.name!r}",
        )

    # NOTE: on PostgreSQL, two uploads of different versions of one SOP Instance UID that
    # commit at the same moment can both be stored as ok, because the unique constraint
    # covers (organization, SOP Instance UID, SHA-256). A unique index over ok rows would close this.
    versions = session.scalars(
        select(Instance)
        .where(Instance.organization_id == organization_id, Instance.sop_instance_uid == file.instance.sop_instance_uid)
        .order_by(Instance.id)
    ).all()
    same = next((version for version in versions if version.blob_sha256 == file.sha256), None)
    if same is not None and same.state == InstanceState.NEEDS_ATTENTION:
        # Uploading a conflicting version again must not look like success.
        return _result(file, FileOutcome.NEEDS_ATTENTION, same.reason, same)
    if same is not None:
        return _result(file, FileOutcome.DUPLICATE, f"already stored as instance {same.id}", same)

    if study is not None and study.is_test and not archive.is_test and not file.is_test_image:
        return _rejected(
            file,
            f"study {file.study_instance_uid} is stored as test data, but this file is not a pacsbridge test "
            f"image (Patient ID starting {TEST_PATIENT_ID_PREFIX!r} or the label {TEST_DATA_LABEL!r}): "
            "real and test images cannot share a study",
        )
    if study is None:
        study = _new_study(session, archive, file)
    elif study.worklist_attributes is None and file.worklist_attributes is not None:
        study.worklist_attributes = file.worklist_attributes

    if versions:
        return _store_conflicting_version(session, study, file, versions[0])

    instance = _new_instance(session, study, file, InstanceState.OK, reason=None)
    deliveries = create_deliveries(session, instance, study, connections)
    result = _result(file, FileOutcome.ACCEPTED, None, instance)
    for connection, delivery in zip(connections, deliveries, strict=True):
        result.deliveries[connection.name] = delivery.state.value
        if delivery.reason:
            result.delivery_reasons[connection.name] = delivery.reason
    return result


def _store_conflicting_version(session: Session, study: Study, file: PreparedFile, stored: Instance) -> FileResult:
    reason = (
        f"SOP Instance UID {stored.sop_instance_uid} is already stored as instance {stored.id} with different "
        f"content (stored version SHA-256 {stored.blob_sha256}, this file SHA-256 {file.sha256}). This version "
        "is kept as a separate instance and not forwarded, and the stored one is unchanged. Find out which "
        "version is correct before sending again."
    )
    instance = _new_instance(session, study, file, InstanceState.NEEDS_ATTENTION, reason=reason)
    LOGGER.warning(
        "Instance id=%d has the SOP Instance UID of instance id=%d with different content; not forwarded",
        instance.id,
        stored.id,
    )
    return _result(file, FileOutcome.NEEDS_ATTENTION, reason, instance)


def create_deliveries(
    session: Session, instance: Instance, study: Study, connections: list[ConnectionRecord]
) -> list[Delivery]:
    """Add the outbox rows of a new instance: one per linked PACS, queued or needs-attention by the delivery rules."""
    deliveries = [new_delivery(instance, study, connection) for connection in connections]
    session.add_all(deliveries)
    session.flush()
    return deliveries


def _new_study(session: Session, archive: Archive, file: PreparedFile) -> Study:
    assert file.study_instance_uid is not None
    study = Study(
        organization_id=archive.organization_id,
        archive_id=archive.id,
        study_instance_uid=file.study_instance_uid,
        is_test=archive.is_test or file.is_test_image,
        created_at=utc_now(),
        worklist_attributes=file.worklist_attributes,
        **file.study_attributes,
    )
    session.add(study)
    session.flush()
    LOGGER.info("Created study id=%d in archive id=%d is_test=%s", study.id, archive.id, study.is_test)
    return study


def _new_instance(
    session: Session, study: Study, file: PreparedFile, state: InstanceState, *, reason: str | None
) -> Instance:
    assert file.instance is not None
    assert file.sha256 is not None
    assert file.size is not None
    instance = Instance(
        organization_id=study.organization_id,
        study_id=study.id,
        sop_instance_uid=file.instance.sop_instance_uid,
        sop_class_uid=file.instance.sop_class_uid,
        transfer_syntax_uid=file.instance.transfer_syntax_uid,
        number_of_frames=file.instance.number_of_frames,
        blob_sha256=file.sha256,
        size=file.size,
        state=state,
        reason=reason,
        created_at=utc_now(),
    )
    session.add(instance)
    session.flush()
    return instance


def _rejected(file: PreparedFile, reason: str) -> FileResult:
    return FileResult(
        path=file.path,
        result=FileOutcome.REJECTED,
        reason=reason,
        sop_instance_uid=file.instance.sop_instance_uid if file.instance else None,
        study_instance_uid=file.study_instance_uid,
    )


def _result(
    file: PreparedFile,
    outcome: FileOutcome,
    reason: str | None,
    instance: Instance,
) -> FileResult:
    return FileResult(
        path=file.path,
        result=outcome,
        reason=reason,
        sop_instance_uid=instance.sop_instance_uid,
        study_instance_uid=file.study_instance_uid,
        instance_id=instance.id,
    )
