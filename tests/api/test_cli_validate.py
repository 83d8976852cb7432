"""`kubetune validate`: exit codes, FILE[#doc]: path: message lines, YAML errors with file:line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.api.test_invalid_manifests import CANONICAL, mutate


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kubetune.cli", *args], capture_output=True, text=True)


def test_valid_file_exits_zero(tmp_path: Path) -> None:
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(CANONICAL))
    out = run("validate", str(f))
    assert out.returncode == 0
    assert out.stdout.strip() == f"{f}: ok (FineTuneJob support-bot, lora)"


def test_multi_document_names_the_document(tmp_path: Path) -> None:
    bad = mutate(CANONICAL, {"spec.method.lora.r": 0})
    other = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}
    f = tmp_path / "many.yaml"
    f.write_text(yaml.safe_dump_all([CANONICAL, other, bad]))
    out = run("validate", str(f))
    assert out.returncode == 1
    assert f"{f}#1: ok" in out.stdout
    assert f"{f}#3: spec.method.lora.r: Input should be greater than or equal to 1" in out.stdout
    assert "ConfigMap" not in out.stdout


def test_yaml_syntax_error_gives_line(tmp_path: Path) -> None:
    f = tmp_path / "broken.yaml"
    f.write_text("apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\nspec:\n  model: {source: x\n  dataset: [\n")
    out = run("validate", str(f))
    assert out.returncode == 1
    assert out.stdout.startswith(f"{f}:5:") or out.stdout.startswith(f"{f}:6:"), out.stdout
    assert "invalid YAML" in out.stdout and "Traceback" not in out.stderr


def test_missing_file_and_wrong_kind(tmp_path: Path) -> None:
    out = run("validate", str(tmp_path / "nope.yaml"))
    assert out.returncode == 1 and "no such file" in out.stdout and "Traceback" not in out.stderr
    f = tmp_path / "kind.yaml"
    f.write_text(yaml.safe_dump({**CANONICAL, "apiVersion": "kubetune.io/v1"}))
    out = run("validate", str(f))
    assert out.returncode == 1 and f"{f}: apiVersion: must be kubetune.io/v1alpha1" in out.stdout


def test_typo_suggests_the_field(tmp_path: Path) -> None:
    f = tmp_path / "typo.yaml"
    f.write_text(yaml.safe_dump(mutate(CANONICAL, {"spec.hyperparameters.learningrate": 1e-4})))
    out = run("validate", str(f))
    assert "spec.hyperparameters.learningrate: unknown field; did you mean learningRate?" in out.stdout


def test_yaml12_floats(tmp_path: Path) -> None:
    # PyYAML alone would read 2e-4 as a string; kubectl reads a number. We must agree with kubectl.
    f = tmp_path / "lr.yaml"
    f.write_text(yaml.safe_dump(CANONICAL).replace("learningRate: 0.0002", "learningRate: 2e-4"))
    assert "learningRate: 2e-4" in f.read_text()
    from kubetune.api.manifest import load_job

    assert load_job(str(f)).spec.hyperparameters.learning_rate == 2e-4


def test_bad_name(tmp_path: Path) -> None:
    f = tmp_path / "name.yaml"
    f.write_text(yaml.safe_dump(mutate(CANONICAL, {"metadata.name": "Support_Bot"})))
    out = run("validate", str(f))
    assert out.returncode == 1 and f"{f}: metadata.name: " in out.stdout
