"""Shared checks of the Kubernetes objects we generate (the operator's children, serving objects,
the chart): schema validity against the upstream OpenAPI, and golden files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

K8S_VERSION = "1.30"
"""The Kubernetes OpenAPI the built-in kinds are validated against (kubernetes-validate)."""


def assert_valid(obj: dict[str, Any], where: str = "") -> None:
    """`obj` is valid for its built-in kind, strictly (unknown fields are errors)."""
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        prefix = f"{where}: " if where else ""
        pytest.fail(f"{prefix}{obj['kind']} {obj['metadata']['name']}: {err.message} at {'.'.join(map(str, err.path))}")


def assert_golden(objs: list[dict[str, Any]], path: Path, writer: str) -> None:
    """`objs` equal the YAML documents in `path`; KUBETUNE_UPDATE_GOLDEN=1 rewrites it (`writer`
    names the test that does, in the file's first line)."""
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump_all(objs, sort_keys=False, width=120)
        path.write_text(f"# Rendered by {writer} (KUBETUNE_UPDATE_GOLDEN=1 rewrites it).\n{text}")
    assert path.exists(), f"{path} is missing: run with KUBETUNE_UPDATE_GOLDEN=1"
    assert list(yaml.safe_load_all(path.read_text())) == objs
