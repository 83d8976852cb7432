"""Invalid manifests are refused by the models *and* by the generated CRD, at the same field.

Each row mutates the canonical support-bot manifest. The models must report a problem at exactly
the expected wire path; the CRD (OpenAPI schema + CEL, offline) must report an error at or below
it. If one side accepts what the other refuses, the API and the CRD have drifted apart.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api import parse_manifest
from tests.crd_offline import validate as crd_validate

CANONICAL: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "support-bot"},
    "spec": {
        "model": {"source": "hf://mistralai/Mistral-7B-v0.1"},
        "dataset": {"train": "s3://data/support/train.jsonl", "format": "chat"},
        "method": {
            "adaptation": "lora",
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["q_proj", "v_proj"]},
        },
        "hyperparameters": {"epochs": 3, "learningRate": 2e-4},
        "output": {"uri": "s3://models/support-bot"},
    },
}

DELETE = object()

# (id, {dotted path: new value or DELETE}, expected wire path of the problem)
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("lora-rank-zero", {"spec.method.lora.r": 0}, "spec.method.lora.r"),
    ("lora-rank-string", {"spec.method.lora.r": "16"}, "spec.method.lora.r"),
    ("lora-dropout-one", {"spec.method.lora.dropout": 1.0}, "spec.method.lora.dropout"),
    ("lr-zero", {"spec.hyperparameters.learningRate": 0}, "spec.hyperparameters.learningRate"),
    ("lr-word", {"spec.hyperparameters.learningRate": "fast"}, "spec.hyperparameters.learningRate"),
    ("batch-zero", {"spec.hyperparameters.batchSize": 0}, "spec.hyperparameters.batchSize"),
    ("batch-word", {"spec.hyperparameters.batchSize": "many"}, "spec.hyperparameters.batchSize"),
    ("epochs-negative", {"spec.hyperparameters.epochs": -1}, "spec.hyperparameters.epochs"),
    ("split-zero", {"spec.dataset.validationSplit": 0}, "spec.dataset.validationSplit"),
    ("split-too-big", {"spec.dataset.validationSplit": 0.7}, "spec.dataset.validationSplit"),
    (
        "validation-and-split",
        {"spec.dataset.validation": "s3://data/val.jsonl", "spec.dataset.validationSplit": 0.1},
        "spec.dataset",
    ),
    ("prevalidate-word", {"spec.dataset.prevalidate": "yes"}, "spec.dataset.prevalidate"),
    ("workload-priority-without-queue", {"spec.scheduling.workloadPriorityClassName": "batch-low"}, "spec.scheduling"),
    ("format-csv", {"spec.dataset.format": "csv"}, "spec.dataset.format"),
    ("gpus-negative", {"spec.resources.gpus": -1}, "spec.resources.gpus"),
    ("memory-word", {"spec.resources.memory": "lots"}, "spec.resources.memory"),
    ("adaptation-typo", {"spec.method.adaptation": "lorax"}, "spec.method.adaptation"),
    ("block-for-other-adaptation", {"spec.method.qlora": {"r": 8}}, "spec.method"),
    ("optimizer-unknown", {"spec.method.optimizer": "sgd"}, "spec.method.optimizer"),
    ("objective-unknown", {"spec.method.objectives": [{"type": "distill"}]}, "spec.method.objectives[0].type"),
    ("distillation-without-block", {"spec.method.objectives": [{"type": "distillation"}]}, "spec.method.objectives[0]"),
    (
        "distillation-without-teacher",
        {"spec.method.objectives": [{"type": "distillation", "distillation": {"temperature": 2}}]},
        "spec.method.objectives[0].distillation.teacher",
    ),
    (
        "objective-block-mismatch",
        {"spec.method.objectives": [{"type": "adversarial", "reweighting": {}}]},
        "spec.method.objectives[0]",
    ),
    (
        "objective-twice",
        {"spec.method.objectives": [{"type": "adversarial"}, {"type": "adversarial"}]},
        "spec.method",
    ),
    (
        "guide-teacher-without-teacher",
        {"spec.method.objectives": [{"type": "attentionGuidance", "attentionGuidance": {"guide": "teacher"}}]},
        "spec.method.objectives[0].attentionGuidance",
    ),
    (
        "qlora-reweighting-vmap",
        {
            "spec.method": {
                "adaptation": "qlora",
                "objectives": [{"type": "reweighting", "reweighting": {"estimator": "vmap"}}],
            }
        },
        "spec.method",
    ),
    (
        "prompt-text-without-text",
        {"spec.method": {"adaptation": "promptTuning", "promptTuning": {"init": "text"}}},
        "spec.method.promptTuning",
    ),
    ("unfreeze-factor-below-one", {"spec.method": {"adaptation": "gradualUnfreeze", "gradualUnfreeze": {"discriminativeFactor": 0.5}}}, "spec.method.gradualUnfreeze.discriminativeFactor"),
    ("qlora-int8", {"spec.method": {"adaptation": "qlora", "qlora": {"quantType": "int8"}}}, "spec.method.qlora.quantType"),
    ("model-scheme", {"spec.model.source": "ftp://models/x"}, "spec.model.source"),
    ("model-missing", {"spec.model": DELETE}, "spec.model"),
    ("output-missing", {"spec.output": DELETE}, "spec.output"),
    ("unknown-hyperparameter", {"spec.hyperparameters.learningrate": 1e-4}, "spec.hyperparameters.learningrate"),
    ("unknown-spec-field", {"spec.epochs": 3}, "spec.epochs"),
    ("queue-name-invalid", {"spec.scheduling": {"queueName": "Team_A"}}, "spec.scheduling.queueName"),
    ("toleration-operator", {"spec.scheduling": {"tolerations": [{"key": "gpu", "operator": "Maybe"}]}}, "spec.scheduling.tolerations[0].operator"),
    ("checkpoint-every-zero", {"spec.checkpointing": {"everySteps": 0}}, "spec.checkpointing.everySteps"),
    ("retries-too-many", {"spec.maxRetries": 101}, "spec.maxRetries"),
    ("suffix-spaces", {"spec.suffix": "My Bot"}, "spec.suffix"),
    ("packing-word", {"spec.dataset.packing": "yes"}, "spec.dataset.packing"),
    ("deadline-zero", {"spec.activeDeadlineSeconds": 0}, "spec.activeDeadlineSeconds"),
    ("snake-case-field", {"spec.hyperparameters.learning_rate": 1e-4}, "spec.hyperparameters.learning_rate"),
    ("lr-auto", {"spec.hyperparameters.learningRate": "auto"}, "spec.hyperparameters.learningRate"),
    ("node-selector-key", {"spec.scheduling": {"nodeSelector": {"bad key": "v"}}}, "spec.scheduling.nodeSelector"),
    ("node-selector-value", {"spec.scheduling": {"nodeSelector": {"disk": "ssd!"}}}, "spec.scheduling.nodeSelector.disk"),
    ("toleration-key", {"spec.scheduling": {"tolerations": [{"key": "bad key", "operator": "Exists"}]}}, "spec.scheduling.tolerations[0].key"),
    ("toleration-empty-key-equal", {"spec.scheduling": {"tolerations": [{"operator": "Equal", "value": "x"}]}}, "spec.scheduling.tolerations[0]"),
    ("toleration-exists-with-value", {"spec.scheduling": {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "x"}]}}, "spec.scheduling.tolerations[0]"),
    ("toleration-seconds-without-noexecute", {"spec.scheduling": {"tolerations": [{"key": "gpu", "tolerationSeconds": 60}]}}, "spec.scheduling.tolerations[0]"),
    ("priority-class-invalid", {"spec.scheduling": {"priorityClassName": "High_Priority"}}, "spec.scheduling.priorityClassName"),
    ("scheduler-name-invalid", {"spec.scheduling": {"schedulerName": "my scheduler"}}, "spec.scheduling.schedulerName"),
    ("gpu-type-invalid", {"spec.resources": {"gpuType": "NVIDIA H100 80GB"}}, "spec.resources.gpuType"),
    ("gpu-resource-invalid", {"spec.resources": {"gpuResource": "nvidia.com/gpu/x"}}, "spec.resources.gpuResource"),
    (
        "packing-prefix-tuning",
        {"spec.method": {"adaptation": "prefixTuning"}, "spec.dataset.packing": True},
        "spec",
    ),
    (
        "merged-prompt-tuning",
        {"spec.method": {"adaptation": "promptTuning"}, "spec.output.format": "merged"},
        "spec",
    ),
]


def mutate(manifest: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(manifest)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            node.pop(leaf)
        else:
            node[leaf] = value
    return out


def crd() -> dict[str, Any]:
    return yaml.safe_load(Path("crds/finetunejobs.kubetune.io.yaml").read_text())


def test_there_are_at_least_25_cases() -> None:
    assert len(CASES) >= 25


def test_canonical_is_valid_in_both() -> None:
    job, problems = parse_manifest(CANONICAL)
    assert problems == [] and job is not None
    assert crd_validate(crd(), CANONICAL) == []


@pytest.mark.parametrize(("changes", "path"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_models_reject_at_path(changes: dict[str, Any], path: str) -> None:
    job, problems = parse_manifest(mutate(CANONICAL, changes))
    assert job is None
    assert path in [p.path for p in problems], problems
    for p in problems:
        assert p.message and "Traceback" not in p.message


@pytest.mark.parametrize(("changes", "path"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_crd_rejects_at_path(changes: dict[str, Any], path: str) -> None:
    errors = crd_validate(crd(), mutate(CANONICAL, changes))
    assert errors, "the CRD accepts what the models refuse"
    assert any(e.path == path or e.path.startswith(path + ".") or e.path.startswith(path + "[") for e in errors), errors


def test_cli_reports_each_case_with_path(tmp_path: Path) -> None:
    """`kubetune validate` exits 1 and prints FILE: path: message for every invalid fixture."""
    files = []
    for case_id, changes, path in CASES:
        f = tmp_path / f"{case_id}.yaml"
        f.write_text(yaml.safe_dump(mutate(CANONICAL, changes)))
        files.append((f, path))
    run = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "validate", *(str(f) for f, _ in files)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1, run.stdout
    assert "Traceback" not in run.stdout + run.stderr
    for f, path in files:
        assert f"{f}: {path}: " in run.stdout, (f, path, run.stdout)
        assert f"{f}: ok" not in run.stdout
