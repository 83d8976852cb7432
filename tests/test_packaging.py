"""Packaging promises: one distribution, layered namespace packages, the stdlib `operator` intact."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_layering_contracts_hold() -> None:
    """import-linter: api imports neither; operator never imports the ML stack; trainer never kopf."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    run = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 kept, 0 broken" in run.stdout


def test_stdlib_operator_not_shadowed() -> None:
    run = subprocess.run(
        [sys.executable, "-c", "import operator; print(operator.add(1, 2))"], cwd=ROOT, capture_output=True, text=True
    )
    assert run.stdout.strip() == "3", run.stderr


def test_namespace_portions_have_no_init() -> None:
    for root in ("api", "operator", "trainer"):
        assert not (ROOT / root / "kubetune" / "__init__.py").exists(), root
        assert (ROOT / root / "kubetune" / root / "__init__.py").exists(), root


def test_console_script() -> None:
    exe = shutil.which("kubetune") or str(Path(sys.executable).parent / "kubetune")
    run = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "validate" in run.stdout and "crd" in run.stdout


def test_api_imports_without_ml_or_cluster_stack() -> None:
    code = (
        "import sys, kubetune.api, kubetune.api.crd, kubetune.cli;"
        "bad = [m for m in ('torch', 'transformers', 'kopf', 'kubernetes') if m in sys.modules];"
        "print(bad)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.stdout.strip() == "[]", run.stdout + run.stderr
