"""Small promises of the pod entry point."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kubetune.trainer.__main__ import gcs_credentials_from_env


def test_gcs_credentials_json_becomes_a_private_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS_JSON", '{"type": "service_account"}')
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    gcs_credentials_from_env()
    path = Path(os.environ["GOOGLE_APPLICATION_CREDENTIALS"])
    assert path.read_text() == '{"type": "service_account"}'
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.parent == tmp_path


def test_an_explicit_credentials_file_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS_JSON", "{}")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/var/run/creds.json")
    gcs_credentials_from_env()
    assert os.environ["GOOGLE_APPLICATION_CREDENTIALS"] == "/var/run/creds.json"
