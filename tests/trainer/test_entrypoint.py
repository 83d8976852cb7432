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


def _validate_only(tmp_path: Path, manifest: dict) -> tuple[int, dict]:
    import json

    import yaml
    from kubetune.trainer.__main__ import main

    spec, term = tmp_path / "job.yaml", tmp_path / "termination"
    spec.write_text(yaml.safe_dump(manifest))
    code = main(["--spec", str(spec), "--validate-only", "--metrics-port", "-1", "--termination-path", str(term)])
    return code, json.loads(term.read_text())


def _manifest(tmp_path: Path, **spec: object) -> dict:
    body = {
        "model": {"source": "builtin://tiny-llama"},
        "dataset": {"train": str(tmp_path / "train.jsonl")},
        "method": {"adaptation": "lora"},
        "output": {"uri": (tmp_path / "out").as_uri()},
        **spec,
    }
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "t"}, "spec": body}


def test_a_spec_error_names_the_field_in_the_summary(tmp_path: Path) -> None:
    from kubetune.api.contract import PERMANENT_EXIT_CODE, TrainerSummary

    code, summary = _validate_only(tmp_path, _manifest(tmp_path, hyperparameters={"learningrate": 1}))
    assert code == PERMANENT_EXIT_CODE
    assert summary["status"] == "failed" and summary["reason"] == "InvalidSpec"
    assert summary["param"] == "spec.hyperparameters.learningrate" and "learningRate" in summary["message"]
    assert TrainerSummary.model_validate(summary)  # what the trainer writes is the contract, strictly


def test_a_data_error_names_the_file_and_line_in_the_summary(tmp_path: Path) -> None:
    from kubetune.api.contract import PERMANENT_EXIT_CODE

    (tmp_path / "train.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        '{"messages": oops}\n'
    )
    code, summary = _validate_only(tmp_path, _manifest(tmp_path))
    assert code == PERMANENT_EXIT_CODE and summary["reason"] == "InvalidData"
    assert summary["param"] == f"{tmp_path / 'train.jsonl'}:2"


def test_a_missing_credentials_secret_is_named_before_any_storage_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator passes the Secret's name beside its optional keys; none arriving means the
    Secret is missing (optional keys would otherwise fail much later, as a storage error)."""
    from kubetune.api.contract import CREDENTIALS_SECRET_ENV, PERMANENT_EXIT_CODE
    from kubetune.api.pod import CREDENTIAL_KEYS

    for key in CREDENTIAL_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(CREDENTIALS_SECRET_ENV, "s3-creds")
    code, summary = _validate_only(tmp_path, _manifest(tmp_path))
    assert code == PERMANENT_EXIT_CODE
    assert summary["reason"] == "SecretMissing" and summary["param"] == "spec.output.credentialsSecret"
    assert "s3-creds" in summary["message"] and "AWS_ACCESS_KEY_ID" in summary["message"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")  # one key arrived: the Secret exists
    code, summary = _validate_only(tmp_path, _manifest(tmp_path))
    assert summary["reason"] != "SecretMissing"
