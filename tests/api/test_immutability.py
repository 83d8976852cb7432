"""Spec fields freeze once training started; suspend and scheduling stay mutable (CEL, offline)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.api.test_invalid_manifests import CANONICAL
from tests.crd_offline import validate

CRD = yaml.safe_load(Path("crds/finetunejobs.kubetune.io.yaml").read_text())


def started(obj: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    out["status"] = {"phase": "Running", "startTime": "2026-11-21T10:00:00Z"}
    return out


def changed(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    *parents, leaf = path.split(".")
    node = out
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return out


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("spec.model.source", "hf://mistralai/Mistral-7B-v0.3"),
        ("spec.method.lora.r", 32),
        ("spec.hyperparameters.learningRate", 1e-4),
        ("spec.dataset.train", "s3://data/other.jsonl"),
        ("spec.output.uri", "s3://models/elsewhere"),
        ("spec.resources", {"gpus": 4}),
        ("spec.image", "registry.example.com/trainer:v2"),
    ],
)
def test_frozen_after_start(path: str, value: Any) -> None:
    old = started(CANONICAL)
    new = changed(old, path, value)
    errors = validate(CRD, new, old=old)
    assert any("immutable" in e.message for e in errors), errors
    # Before training started the same change is allowed.
    before = copy.deepcopy(CANONICAL)
    assert validate(CRD, changed(before, path, value), old=before) == []


@pytest.mark.parametrize(
    ("path", "value"),
    [("spec.suspend", True), ("spec.scheduling", {"queueName": "team-b", "nodeSelector": {"pool": "h100"}})],
)
def test_mutable_after_start(path: str, value: Any) -> None:
    old = started(CANONICAL)
    assert validate(CRD, changed(old, path, value), old=old) == []


def test_status_updates_pass() -> None:
    old = started(CANONICAL)
    new = copy.deepcopy(old)
    new["status"]["progress"] = {"step": 10, "totalSteps": 100, "percent": 10.0}
    assert validate(CRD, new, old=old) == []
