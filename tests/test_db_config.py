"""Data directory and database URL configuration."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pacsbridge.config import ConfigError, load_config, prepare_data_dir


def test_defaults_relative_to_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    config = load_config(environ={})

    assert config.data_dir == tmp_path / "pacsbridge-data"
    assert config.blob_dir == tmp_path / "pacsbridge-data" / "blobs"
    assert config.database_url.get_backend_name() == "sqlite"
    assert config.database_url.database == str(tmp_path / "pacsbridge-data" / "pacsbridge.sqlite3")


def test_data_dir_from_environment(tmp_path: Path) -> None:
    config = load_config(environ={"PACSBRIDGE_DATA_DIR": str(tmp_path / "from-env")})

    assert config.data_dir == tmp_path / "from-env"
    assert config.database_url.database == str(tmp_path / "from-env" / "pacsbridge.sqlite3")


def test_data_dir_argument_overrides_environment(tmp_path: Path) -> None:
    config = load_config(tmp_path / "from-option", environ={"PACSBRIDGE_DATA_DIR": str(tmp_path / "from-env")})

    assert config.data_dir == tmp_path / "from-option"


def test_relative_data_dir_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    config = load_config("relative/dir", environ={})

    assert config.data_dir == tmp_path / "relative" / "dir"
    assert config.data_dir.is_absolute()


def test_postgresql_url_from_environment(tmp_path: Path) -> None:
    config = load_config(
        tmp_path,
        environ={"PACSBRIDGE_DATABASE_URL": "postgresql+psycopg://pb:s3cret@127.0.0.1:5432/test"},
    )

    assert config.database_url.drivername == "postgresql+psycopg"
    assert config.database_url.host == "127.0.0.1"
    assert config.database_url.database == "test"
    assert config.blob_dir == tmp_path / "blobs"
    assert "s3cret" not in config.database_url_for_display
    assert "s3cret" not in repr(config)


def test_database_url_argument_overrides_environment(tmp_path: Path) -> None:
    config = load_config(
        tmp_path,
        database_url="sqlite://",
        environ={"PACSBRIDGE_DATABASE_URL": "postgresql+psycopg://pb@127.0.0.1:5432/test"},
    )

    assert config.database_url.get_backend_name() == "sqlite"


def test_invalid_database_url_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PACSBRIDGE_DATABASE_URL") as caught:
        load_config(tmp_path, environ={"PACSBRIDGE_DATABASE_URL": "not a url:s3cret"})

    assert "s3cret" not in str(caught.value)


def test_load_config_creates_nothing(tmp_path: Path) -> None:
    load_config(tmp_path / "data", environ={})

    assert not (tmp_path / "data").exists()


def test_prepare_creates_nested_directories(tmp_path: Path) -> None:
    config = load_config(tmp_path / "a" / "b c" / "東京", environ={})

    prepare_data_dir(config)
    prepare_data_dir(config)

    assert config.data_dir.is_dir()
    assert config.blob_dir.is_dir()


def test_prepare_rejects_file_as_data_dir(tmp_path: Path) -> None:
    data_file = tmp_path / "data"
    data_file.write_text("not a directory")

    with pytest.raises(ConfigError, match="not a directory") as caught:
        prepare_data_dir(load_config(data_file, environ={}))

    assert str(data_file) in str(caught.value)
    assert "--data-dir" in str(caught.value)


def test_prepare_rejects_path_below_file(tmp_path: Path) -> None:
    data_file = tmp_path / "data"
    data_file.write_text("not a directory")

    with pytest.raises(ConfigError, match="cannot be created or written") as caught:
        prepare_data_dir(load_config(data_file / "sub", environ={}))

    assert str(data_file / "sub") in str(caught.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to a read-only directory, so the check cannot fail")
def test_prepare_rejects_read_only_directory(tmp_path: Path) -> None:
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="cannot be created or written"):
            prepare_data_dir(load_config(read_only, environ={}))
    finally:
        read_only.chmod(0o700)


def test_prepare_reports_failed_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Stands in for a read-only mount, which root cannot otherwise get in a test.
    def fail_write(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("pacsbridge.config.tempfile.TemporaryFile", fail_write)

    with pytest.raises(ConfigError, match="cannot be created or written .Permission denied.") as caught:
        prepare_data_dir(load_config(tmp_path / "data", environ={}))

    assert str(tmp_path / "data") in str(caught.value)
