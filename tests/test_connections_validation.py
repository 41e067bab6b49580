"""Validation rules of connection settings, checked before anything is stored."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from pacsbridge.config import load_config
from pacsbridge.connections import ConnectionKind, ConnectionSettings, Severity, validate_settings
from pacsbridge.db import close_database, get_connection, open_database, save_connection


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


def problems_for(field: str, **changes: object) -> tuple[list[str], list[str]]:
    """Return the reasons of the errors and warnings reported for `field`."""
    report = validate_settings(make_settings(**changes))
    errors = [problem.reason for problem in report.errors if problem.field == field]
    warnings = [problem.reason for problem in report.warnings if problem.field == field]
    return errors, warnings


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    factory = open_database(load_config(tmp_path / "data", environ={}))
    yield factory
    close_database(factory)


def test_default_settings_are_valid() -> None:
    report = validate_settings(make_settings())

    assert report.ok
    assert report.problems == []


@pytest.mark.parametrize("field", ["calling_ae_title", "called_ae_title"])
@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "A" * 17,
        "PACS\\01",
        "PACS\x07",
        "PACS\n",
        "PACS\x7f",
        "ÄRZTE",
        "東京",
    ],
    ids=["empty", "all-spaces", "17-chars", "backslash", "bell", "newline", "delete", "umlaut", "kanji"],
)
def test_ae_title_invalid_values(field: str, value: str) -> None:
    errors, _ = problems_for(field, **{field: value})

    assert len(errors) == 1, errors


@pytest.mark.parametrize("value", ["A", "A" * 16, "POCUS_01", "US-1.2", " PACS"])
def test_ae_title_valid_values(value: str) -> None:
    errors, _ = problems_for("called_ae_title", called_ae_title=value)

    assert errors == []


def test_ae_title_lower_case_warns() -> None:
    errors, warnings = problems_for("calling_ae_title", calling_ae_title="pocus01")

    assert errors == []
    assert len(warnings) == 1
    assert "lower-case" in warnings[0]


def test_ae_title_embedded_space_warns() -> None:
    errors, warnings = problems_for("called_ae_title", called_ae_title="MAIN PACS")

    assert errors == []
    assert len(warnings) == 1
    assert "embedded spaces" in warnings[0]


def test_ae_title_case_kept_in_database(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        _, report = save_connection(
            session, make_settings(calling_ae_title="PoCus 01", called_ae_title="pacs_main")
        )
        assert report.ok
        assert len(report.warnings) == 3

    with sessions.begin() as session:
        record = get_connection(session, "PACS Radiology")
        assert record.calling_ae_title == "PoCus 01"
        assert record.called_ae_title == "pacs_main"


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "pacs.hospital.test",
        "pacs-01.radiology.hospital.test",
        "pacs.hospital.test.",
        "127.0.0.1",
        "10.1.2.3",
        "::1",
        "[::1]",
        "fe80::1",
        "2001:db8::10",
    ],
)
def test_host_valid_values(host: str) -> None:
    errors, _ = problems_for("host", host=host)

    assert errors == []


@pytest.mark.parametrize(
    "host",
    [
        "",
        "   ",
        " pacs.hospital.test",
        "pacs hospital",
        "pacs_01.hospital.test",
        "-pacs.hospital.test",
        "pacs-.hospital.test",
        "pacs..hospital.test",
        "a" * 64 + ".test",
        "pacs.hospital.test/path",
        "2001:db8::zz",
    ],
)
def test_host_invalid_values(host: str) -> None:
    errors, _ = problems_for("host", host=host)

    assert len(errors) == 1


@pytest.mark.parametrize("port", [1, 104, 2762, 11112, 65535])
def test_port_valid_values(port: int) -> None:
    errors, _ = problems_for("port", port=port)

    assert errors == []


@pytest.mark.parametrize("port", [0, 65536, -1, "abc", "104", 104.0, True, None])
def test_port_invalid_values(port: object) -> None:
    errors, _ = problems_for("port", port=port)

    assert errors == ["is not a TCP port"]


@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/New_York", "Asia/Tokyo", "UTC"])
def test_timezone_valid_values(zone: str) -> None:
    errors, _ = problems_for("timezone", timezone=zone)

    assert errors == []


@pytest.mark.parametrize("zone", ["Mars/Olympus", "", "Europe/berlin_x", "../etc/passwd", "/etc/localtime"])
def test_timezone_invalid_values(zone: str) -> None:
    errors, _ = problems_for("timezone", timezone=zone)

    assert errors == ["is not an IANA time zone"]


@pytest.mark.parametrize(
    "charset",
    [
        "ISO_IR 100",
        "ISO_IR 6",
        "ISO_IR 192",
        "GB18030",
        "GBK",
        "ISO 2022 IR 100",
        "\\ISO 2022 IR 87",
        "ISO 2022 IR 6\\ISO 2022 IR 87",
        "\\ISO 2022 IR 87\\ISO 2022 IR 159",
        "ISO 2022 IR 6\\ISO 2022 IR 149",
        "ISO 2022 IR 13\\ISO 2022 IR 87",
    ],
)
def test_character_set_valid_values(charset: str) -> None:
    errors, _ = problems_for("character_set", character_set=charset)

    assert errors == []


@pytest.mark.parametrize(
    "charset",
    [
        "ISO_IR 999",
        "latin1",
        "UTF-8",
        "iso_ir 100",
        "",
        "ISO_IR 100\\ISO_IR 192",
        "ISO 2022 IR 6\\ISO_IR 192",
        "\\ISO 2022 IR 87\\GB18030",
        "ISO 2022 IR 6\\ISO 2022 IR 999",
    ],
)
def test_character_set_invalid_values(charset: str) -> None:
    errors, _ = problems_for("character_set", character_set=charset)

    assert len(errors) == 1


def test_timeouts_default_to_300_seconds() -> None:
    settings = make_settings()

    assert settings.acse_timeout == 300
    assert settings.dimse_timeout == 300
    assert settings.connection_timeout == 300


@pytest.mark.parametrize("field", ["acse_timeout", "dimse_timeout", "connection_timeout"])
@pytest.mark.parametrize("value", [0, -1, 0.0, 86_401, math.nan, math.inf, "abc", "30", True, None])
def test_timeout_invalid_values(field: str, value: object) -> None:
    errors, _ = problems_for(field, **{field: value})

    assert errors == ["is not a valid timeout"]


@pytest.mark.parametrize("value", [0.5, 1, 30, 300, 86_400])
def test_timeout_valid_values(value: float) -> None:
    errors, _ = problems_for("dimse_timeout", dimse_timeout=value)

    assert errors == []


def test_every_problem_reported_at_once() -> None:
    report = validate_settings(
        make_settings(
            kind="pacx",
            host="bad host",
            port=0,
            calling_ae_title="",
            called_ae_title="A" * 17,
            timezone="Mars/Olympus",
            character_set="ISO_IR 999",
            acse_timeout=-1,
        )
    )

    fields = sorted(problem.field for problem in report.problems if problem.severity == Severity.ERROR)
    assert fields == [
        "acse_timeout",
        "called_ae_title",
        "calling_ae_title",
        "character_set",
        "host",
        "kind",
        "port",
        "timezone",
    ]
