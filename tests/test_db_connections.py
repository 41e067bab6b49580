"""Connection repository on a SQLite file: save, read, update and the rules around them."""

from __future__ import annotations

import datetime as dt
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from pacsbridge.config import load_config
from pacsbridge.connections import (
    Compression,
    ConnectionKind,
    ConnectionSettings,
    InvalidSettingsError,
    MonochromeMode,
    ScuAuthentication,
    TlsMode,
    ValidationReport,
    validate_settings,
)
from pacsbridge.db import connections as repository
from pacsbridge.db import (
    ConnectionNotFoundError,
    ConnectionRecord,
    Organization,
    close_database,
    find_connection,
    get_connection,
    get_worklist_connection,
    list_connections,
    open_database,
    save_connection,
    to_settings,
    update_connection,
)
from pacsbridge.db.models import utc_now

UNICODE_NAME = "Radiologie Zürich – 東京"


def make_settings(**changes: object) -> ConnectionSettings:
    settings = ConnectionSettings(
        name="PACS Radiology",
        kind=ConnectionKind.PACS,
        host="127.0.0.1",
        port=104,
        calling_ae_title="POCUS01",
        called_ae_title="PACS",
    )
    return settings.replace(**changes)


def make_certificate_pem(common_name: str = "pacs.hospital.test") -> tuple[str, str]:
    """Return a self-signed certificate and its private key, both PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    certificate_pem = certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    return certificate_pem, key_pem


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    factory = open_database(load_config(tmp_path / "data", environ={}))
    yield factory
    close_database(factory)


def count_rows(sessions: sessionmaker[Session], model: type[object]) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def test_save_and_read_back_all_fields(sessions: sessionmaker[Session]) -> None:
    certificate_pem, _ = make_certificate_pem()
    settings = make_settings(
        name=UNICODE_NAME,
        host="::1",
        port=2762,
        timezone="Europe/Berlin",
        character_set="\\ISO 2022 IR 87",
        tls_mode=TlsMode.ACTIVE,
        scp_certificate_pem=certificate_pem,
        pinned_fingerprint="ab" * 32,
        scu_authentication=ScuAuthentication.CLIENT_CERTIFICATE,
        image_compression=Compression.JPEG_LOSSLESS,
        loop_compression=Compression.JPEG_BASELINE,
        monochrome=MonochromeMode.B_MODE_ONLY,
        acse_timeout=10.5,
        dimse_timeout=60,
        connection_timeout=5,
        test_only=True,
        worklist_filters={"modality": "US", "station": "Zürich 東京", "days": [0, 1]},
    )
    with sessions.begin() as session:
        record, report = save_connection(session, settings)
        assert report.ok
        assert record.id is not None

    with sessions.begin() as session:
        stored = to_settings(get_connection(session, UNICODE_NAME))

    assert stored == settings
    assert isinstance(stored.kind, ConnectionKind)
    assert isinstance(stored.dimse_timeout, float)


def test_default_organization_created_on_first_save(sessions: sessionmaker[Session]) -> None:
    assert count_rows(sessions, Organization) == 0

    with sessions.begin() as session:
        record, _ = save_connection(session, make_settings())
        assert record.organization.name == "default"
    with sessions.begin() as session:
        save_connection(session, make_settings(name="Second PACS"))

    assert count_rows(sessions, Organization) == 1


def test_unicode_name_round_trip(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        save_connection(session, make_settings(name=UNICODE_NAME))

    with sessions.begin() as session:
        names = [record.name for record in list_connections(session)]
        decomposed = unicodedata.normalize("NFD", UNICODE_NAME)
        found_decomposed = find_connection(session, decomposed)

    assert names == [UNICODE_NAME]
    assert found_decomposed is not None
    assert found_decomposed.name == UNICODE_NAME


def test_timestamps_are_aware_utc(sessions: sessionmaker[Session]) -> None:
    before = utc_now()
    with sessions.begin() as session:
        save_connection(session, make_settings())

    with sessions.begin() as session:
        record = get_connection(session, "PACS Radiology")
        assert record.created_at.tzinfo is not None
        assert record.created_at.utcoffset() == dt.timedelta(0)
        assert record.created_at >= before
        assert record.updated_at == record.created_at


def test_save_with_errors_stores_nothing(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session, pytest.raises(InvalidSettingsError) as caught:
        save_connection(
            session, make_settings(port=0, calling_ae_title="", timezone="Mars/Olympus", acse_timeout=-1)
        )

    fields = sorted(problem.field for problem in caught.value.problems)
    assert fields == ["acse_timeout", "calling_ae_title", "port", "timezone"]
    assert count_rows(sessions, ConnectionRecord) == 0
    assert count_rows(sessions, Organization) == 0


def test_save_returns_warnings(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        _, report = save_connection(session, make_settings(calling_ae_title="pocus01"))

    assert report.ok
    assert [problem.field for problem in report.warnings] == ["calling_ae_title"]
    assert count_rows(sessions, ConnectionRecord) == 1


def test_duplicate_name_rejected(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        save_connection(session, make_settings())

    with sessions.begin() as session, pytest.raises(InvalidSettingsError) as caught:
        save_connection(session, make_settings(host="10.0.0.7"))

    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].field == "name"
    assert "already used" in caught.value.problems[0].reason
    assert count_rows(sessions, ConnectionRecord) == 1


def test_same_name_in_other_organization_allowed(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        save_connection(session, make_settings())
        save_connection(session, make_settings(), organization="Clinic B")

    with sessions.begin() as session:
        default_names = [record.name for record in list_connections(session)]
        other_names = [record.name for record in list_connections(session, organization="Clinic B")]

    assert default_names == ["PACS Radiology"]
    assert other_names == ["PACS Radiology"]


def test_second_worklist_rejected_naming_first(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        save_connection(session, make_settings(name="Hospital MWL", kind=ConnectionKind.MWL, port=11112))

    with sessions.begin() as session, pytest.raises(InvalidSettingsError) as caught:
        save_connection(session, make_settings(name="Other MWL", kind=ConnectionKind.MWL, port=11113))

    problem = caught.value.problems[0]
    assert problem.field == "kind"
    assert "'Hospital MWL'" in problem.reason
    with sessions.begin() as session:
        worklist = get_worklist_connection(session)
        assert worklist is not None
        assert worklist.name == "Hospital MWL"
    assert count_rows(sessions, ConnectionRecord) == 1


def test_worklist_allowed_per_organization(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        save_connection(session, make_settings(name="MWL", kind="mwl"))
        save_connection(session, make_settings(name="MWL", kind="mwl"), organization="Clinic B")

    assert count_rows(sessions, ConnectionRecord) == 2


def test_database_rejects_second_worklist_row(sessions: sessionmaker[Session]) -> None:
    # The partial unique index, not only the repository check, keeps one worklist per organization.
    with sessions.begin() as session:
        first, _ = save_connection(session, make_settings(name="MWL", kind="mwl"))
        organization_id = first.organization_id

    values = {field: getattr(first, field) for field in ("host", "port", "calling_ae_title", "called_ae_title")}
    with sessions() as session, pytest.raises(IntegrityError):
        session.add(
            ConnectionRecord(
                organization_id=organization_id,
                name="MWL 2",
                kind=ConnectionKind.MWL,
                timezone="UTC",
                character_set="ISO_IR 100",
                tls_mode=TlsMode.INACTIVE,
                scu_authentication=ScuAuthentication.ANONYMOUS,
                image_compression=Compression.AS_RECEIVED,
                loop_compression=Compression.AS_RECEIVED,
                monochrome=MonochromeMode.NEVER,
                acse_timeout=300.0,
                dimse_timeout=300.0,
                connection_timeout=300.0,
                **values,
            )
        )
        session.commit()


def test_get_unknown_name_lists_known(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        save_connection(session, make_settings(name="B PACS"))
        save_connection(session, make_settings(name="a PACS"))

    with sessions.begin() as session, pytest.raises(ConnectionNotFoundError) as caught:
        get_connection(session, "Missing")

    assert caught.value.known_names == ["a PACS", "B PACS"]
    assert "'Missing'" in str(caught.value)
    assert "'a PACS', 'B PACS'" in str(caught.value)


def test_get_unknown_name_without_connections(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session, pytest.raises(ConnectionNotFoundError) as caught:
        get_connection(session, "Missing")

    assert caught.value.known_names == []
    assert "No connections are stored yet" in str(caught.value)


def test_list_filters_by_kind(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        save_connection(session, make_settings(name="PACS 1"))
        save_connection(session, make_settings(name="PACS 2"))
        save_connection(session, make_settings(name="MWL", kind="mwl"))

    with sessions.begin() as session:
        pacs = [record.name for record in list_connections(session, kind=ConnectionKind.PACS)]
        everything = [record.name for record in list_connections(session)]

    assert pacs == ["PACS 1", "PACS 2"]
    assert everything == ["MWL", "PACS 1", "PACS 2"]


def test_update_changes_only_given_fields(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        record, _ = save_connection(session, make_settings(timezone="Europe/Berlin", test_only=True))
        created_at = record.created_at

    with sessions.begin() as session:
        record, report = update_connection(session, "PACS Radiology", port=11112, dimse_timeout=30)
        assert report.ok

    with sessions.begin() as session:
        stored = get_connection(session, "PACS Radiology")
        assert stored.port == 11112
        assert stored.dimse_timeout == 30.0
        assert stored.timezone == "Europe/Berlin"
        assert stored.test_only is True
        assert stored.created_at == created_at
        assert stored.updated_at > created_at


def test_update_with_errors_changes_nothing(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        save_connection(session, make_settings())

    with sessions.begin() as session, pytest.raises(InvalidSettingsError) as caught:
        update_connection(session, "PACS Radiology", port=65536, host="10.0.0.9", called_ae_title="A\\B")

    assert sorted(problem.field for problem in caught.value.problems) == ["called_ae_title", "port"]
    with sessions.begin() as session:
        stored = get_connection(session, "PACS Radiology")
        assert stored.port == 104
        assert stored.host == "127.0.0.1"
        assert stored.called_ae_title == "PACS"
        assert stored.updated_at == stored.created_at


def test_update_renames(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        save_connection(session, make_settings())

    with sessions.begin() as session:
        update_connection(session, "PACS Radiology", name=UNICODE_NAME)

    with sessions.begin() as session:
        names = [record.name for record in list_connections(session)]
    assert names == [UNICODE_NAME]


def test_update_rename_to_taken_name_rejected(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        save_connection(session, make_settings(name="One"))
        save_connection(session, make_settings(name="Two"))

    with sessions.begin() as session, pytest.raises(InvalidSettingsError) as caught:
        update_connection(session, "Two", name="One")

    assert caught.value.problems[0].field == "name"


def test_update_to_second_worklist_rejected(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        save_connection(session, make_settings(name="MWL", kind="mwl"))
        save_connection(session, make_settings(name="PACS"))

    with sessions.begin() as session, pytest.raises(InvalidSettingsError) as caught:
        update_connection(session, "PACS", kind="mwl")

    assert caught.value.problems[0].field == "kind"
    assert "'MWL'" in caught.value.problems[0].reason


def test_update_worklist_itself_allowed(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        save_connection(session, make_settings(name="MWL", kind="mwl"))

    with sessions.begin() as session:
        record, _ = update_connection(session, "MWL", port=4242, kind=ConnectionKind.MWL)

    assert record.port == 4242


def test_update_unknown_field_raises(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        save_connection(session, make_settings())

    with sessions.begin() as session, pytest.raises(TypeError, match="colour"):
        update_connection(session, "PACS Radiology", colour="blue")


def test_update_unknown_name_raises(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session, pytest.raises(ConnectionNotFoundError):
        update_connection(session, "Missing", port=105)


def test_update_without_change_keeps_timestamp(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        record, _ = save_connection(session, make_settings())
        created_at = record.created_at

    with sessions.begin() as session:
        record, _ = update_connection(session, "PACS Radiology", port=104)

    assert record.updated_at == created_at


def test_certificate_stored_and_private_key_rejected(sessions: sessionmaker[Session]) -> None:
    certificate_pem, key_pem = make_certificate_pem()

    with sessions.begin() as session, pytest.raises(InvalidSettingsError) as caught:
        save_connection(session, make_settings(tls_mode="active", scp_certificate_pem=certificate_pem + key_pem))
    assert caught.value.problems[0].field == "scp_certificate"
    assert "PRIVATE KEY" not in str(caught.value)
    assert count_rows(sessions, ConnectionRecord) == 0

    with sessions.begin() as session:
        save_connection(session, make_settings(tls_mode="active", scp_certificate_pem=certificate_pem))
    with sessions.begin() as session:
        assert get_connection(session, "PACS Radiology").scp_certificate_pem == certificate_pem


def test_active_tls_without_certificate_rejected(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session, pytest.raises(InvalidSettingsError) as caught:
        save_connection(session, make_settings(tls_mode="active"))

    assert caught.value.problems[0].field == "scp_certificate"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("x" * 201, "more than the 200"),
        ("PACS\nRadiology", "line break"),
        ("PACS\tRadiology", "control character"),
        ("PACS\u2028Radiology", "line break"),
    ],
    ids=["too-long", "newline", "tab", "line-separator"],
)
def test_unstorable_names_rejected(sessions: sessionmaker[Session], name: str, reason: str) -> None:
    with sessions.begin() as session, pytest.raises(InvalidSettingsError) as caught:
        save_connection(session, make_settings(name=name))

    assert caught.value.problems[0].field == "name"
    assert reason in caught.value.problems[0].reason


def test_name_of_200_characters_stored(sessions: sessionmaker[Session]) -> None:
    name = "東" * 200
    with sessions.begin() as session:
        save_connection(session, make_settings(name=name))

    with sessions.begin() as session:
        assert get_connection(session, name).name == name


def test_name_with_outer_spaces_warns(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        _, report = save_connection(session, make_settings(name=" PACS "))

    assert [problem.field for problem in report.warnings] == ["name"]


def test_too_long_character_set_rejected(sessions: sessionmaker[Session]) -> None:
    charset = "\\".join(["ISO 2022 IR 87"] * 20)

    with sessions.begin() as session, pytest.raises(InvalidSettingsError) as caught:
        save_connection(session, make_settings(character_set=charset))

    assert caught.value.problems[0].field == "character_set"
    assert "more than the 256" in caught.value.problems[0].reason


@pytest.mark.parametrize(
    "filters",
    [["US"], {"when": dt.date(2024, 1, 1)}, {"limit": float("nan")}, {1: "US"}],
    ids=["list", "date", "nan", "int-key"],
)
def test_unstorable_worklist_filters_rejected(sessions: sessionmaker[Session], filters: object) -> None:
    with sessions.begin() as session, pytest.raises(InvalidSettingsError) as caught:
        save_connection(session, make_settings(worklist_filters=filters))

    assert caught.value.problems[0].field == "worklist_filters"


def test_string_values_normalized_on_save(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        record, _ = save_connection(
            session, make_settings(kind="pacs", tls_mode="encryption-only", acse_timeout=30, scp_certificate_pem="")
        )

    assert record.kind is ConnectionKind.PACS
    assert record.tls_mode is TlsMode.ENCRYPTION_ONLY
    assert record.acse_timeout == 30.0
    assert isinstance(record.acse_timeout, float)
    assert record.scp_certificate_pem is None


def test_conflict_found_only_by_database_reported(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulates a concurrent writer: the pre-check finds no conflict, but the unique index does.
    with sessions.begin() as session:
        save_connection(session, make_settings())

    def check_without_conflicts(session: Session, settings: ConnectionSettings, **_: object) -> ValidationReport:
        return validate_settings(settings)

    monkeypatch.setattr(repository, "check_connection", check_without_conflicts)
    with sessions.begin() as session:
        with pytest.raises(InvalidSettingsError) as caught:
            save_connection(session, make_settings(host="10.0.0.7"))
        # The savepoint was rolled back, so the transaction is still usable.
        save_connection(session, make_settings(name="Other PACS"))

    assert caught.value.problems[0].field == "name"
    assert count_rows(sessions, ConnectionRecord) == 2


def test_nul_character_rejected(sessions: sessionmaker[Session]) -> None:
    certificate_pem, _ = make_certificate_pem()

    with sessions.begin() as session, pytest.raises(InvalidSettingsError) as caught:
        save_connection(session, make_settings(tls_mode="active", scp_certificate_pem=certificate_pem + "\x00"))

    problem = caught.value.problems[0]
    assert problem.field == "scp_certificate"
    assert problem.reason == "contains a NUL character"
    assert problem.value == "(not shown)"
    assert count_rows(sessions, ConnectionRecord) == 0
