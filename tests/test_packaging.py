"""Packaging promises: one distribution, layered namespace packages, the stdlib `operator` intact."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_layering_contracts_hold() -> None:
    """import-linter: api imports neither; operator never imports the ML stack; the gateway (kubetune api) neither
    the ML stack, the operator nor the trainer but its torch-free data checks; trainer never kopf."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    run = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "4 kept, 0 broken" in run.stdout


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


# ------------------------------------------------------------------------ dependency hygiene


def _constraints() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def _requirements() -> list[str]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [r for r in project["dependencies"] + extras if not r.startswith("kubetune")]


def test_constraints_pin_every_dependency_inside_its_range() -> None:
    """constraints.txt (hack/lock.sh) pins what pyproject asks for, within pyproject's ranges: a
    stale lock after a changed range fails here, not in an image build."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = _constraints()
    for text in _requirements():
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in constraints.txt: run make lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{req.name}=={pins[name]} is outside {req.specifier}"
        )
    assert not any("+" in v for v in pins.values())  # no local labels: the CPU and CUDA torch both satisfy it


def test_floors_exclude_known_vulnerable_releases() -> None:
    from packaging.requirements import Requirement

    floors = {
        "torch": "2.6",
        "aiohttp": "3.12.14",
        "jinja2": "3.1.6",
        "urllib3": "2.5",
    }  # CVE-2025-32434, -53643, -27516, -50181
    declared = {Requirement(r).name.lower(): Requirement(r).specifier for r in _requirements()}
    for name, floor in floors.items():
        assert name in declared, name
        assert not declared[name].contains(_below(floor), prereleases=True), (name, declared[name])
        assert declared[name].contains(floor + ".0" if floor.count(".") < 2 else floor, prereleases=True)


def _below(version: str) -> str:
    """A release just below `version` (2.6 → 2.5.99)."""
    parts = [int(p) for p in version.split(".")]
    parts[-1] -= 1
    return ".".join(str(p) for p in parts) + ".99"


def test_ci_and_images_install_with_the_constraints() -> None:
    assert 'install -c constraints.txt -e ".[dev]"' in (ROOT / "Makefile").read_text()
    for dockerfile in ("operator/Dockerfile", "trainer/Dockerfile"):
        text = (ROOT / dockerfile).read_text()
        assert "COPY pyproject.toml constraints.txt ./" in text and "pip install -c constraints.txt" in text, dockerfile
