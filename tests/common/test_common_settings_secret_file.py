"""Secret settings read from a file (<PREFIX>DATABASE_URL_FILE): the chart mounts the database
Secret read-only instead of putting the URL in the pod's environment."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import pytest

from atlasflow.common.errors import InvalidArgument
from atlasflow.common.settings import ServiceSettings
from atlasflow.gateway.settings import GatewaySettings
from atlasflow.ingest.settings import IngestSettings
from atlasflow.labels.settings import LabelsSettings
from atlasflow.ranking.settings import RankingSettings
from atlasflow.segmentation.settings import SegmentationSettings
from atlasflow.training.settings import TrainingSettings

URL = "postgresql://atlas:s3cr%21t-pw@db.example:5432/ranking"
P = "ATLASFLOW_RANKING_"


@dataclass(frozen=True)
class _Settings(ServiceSettings):
    database_url: str = ""


def _load(env: dict[str, str]) -> _Settings:
    return _Settings.from_env(P, env)


def test_url_from_file_is_stripped_and_never_in_repr(tmp_path):
    f = tmp_path / "database-url"
    f.write_text(URL + "\n")  # `kubectl create secret --from-file` keeps an editor's newline
    s = _load({P + "DATABASE_URL_FILE": str(f)})
    assert s.database_url == URL
    assert "s3cr" not in repr(s) and "db.example" not in repr(s)
    assert "database_url='<redacted>'" in repr(s)
    assert str(s.database_url) == URL and s.database_url.startswith("postgresql://")
    # the env value too is redacted in repr; the default stays empty
    assert "s3cr" not in repr(_load({P + "DATABASE_URL": URL}))
    assert _load({}).database_url == ""


def test_both_set_is_a_clear_error(tmp_path):
    f = tmp_path / "database-url"
    f.write_text(URL)
    with pytest.raises(InvalidArgument) as info:
        _load({P + "DATABASE_URL": URL, P + "DATABASE_URL_FILE": str(f)})
    assert info.value.reason == "SETTING_CONFLICT"
    assert P + "DATABASE_URL_FILE" in str(info.value) and "s3cr" not in str(info.value)


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "unreadable"])
def test_unreadable_or_empty_file_is_a_clear_error(tmp_path, case, caplog):
    f = tmp_path / "database-url"
    reason = "SETTING_FILE_UNREADABLE"
    if case == "directory":
        f.mkdir()
    elif case == "empty":
        f.write_text("  \n")
        reason = "SETTING_FILE_EMPTY"
    elif case == "unreadable":
        if os.geteuid() == 0:
            f.mkdir()  # root reads any mode: a directory is unreadable as a file for everyone
        else:
            f.write_text(URL)
            f.chmod(0)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(InvalidArgument) as info:
        _load({P + "DATABASE_URL_FILE": str(f)})
    assert info.value.reason == reason
    assert info.value.metadata == {"variable": P + "DATABASE_URL_FILE", "path": str(f)}
    assert str(f) in str(info.value)
    assert "s3cr" not in str(info.value) and "s3cr" not in caplog.text


@pytest.mark.parametrize(
    ("cls", "prefix"),
    [
        (IngestSettings, "ATLASFLOW_INGEST_"),
        (SegmentationSettings, "ATLASFLOW_SEGMENTATION_"),
        (RankingSettings, "ATLASFLOW_RANKING_"),
        (LabelsSettings, "ATLASFLOW_LABELS_"),
        (TrainingSettings, "ATLASFLOW_TRAINING_"),
        (GatewaySettings, "ATLASFLOW_GATEWAY_"),
    ],
)
def test_every_service_with_a_database_reads_the_file(tmp_path, cls, prefix):
    f = tmp_path / "url"
    f.write_text(URL)
    s = cls.from_env(prefix, {prefix + "DATABASE_URL_FILE": str(f)})
    assert s.database_url == URL
    assert "s3cr" not in repr(s)


def test_cli_db_upgrade_reads_the_url_file(tmp_path, monkeypatch, capsys):
    """`atlasflow db upgrade` (a Job or a shell in the pod) finds the URL where the service does."""
    from atlasflow.cli.main import main

    db_path = tmp_path / "ranking.sqlite3"
    (tmp_path / "database-url").write_text(f"{db_path}\n")
    monkeypatch.delenv("ATLASFLOW_RANKING_DATABASE_URL", raising=False)
    monkeypatch.setenv("ATLASFLOW_RANKING_DATABASE_URL_FILE", str(tmp_path / "database-url"))
    assert main(["db", "upgrade", "--service", "ranking"]) == 0
    assert "ranking: at revision" in capsys.readouterr().out
    assert db_path.is_file()
