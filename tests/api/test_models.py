"""Model-level promises: descriptions everywhere, camelCase wire, canonical manifests, defaults."""

from __future__ import annotations

import typing
from typing import Any

import pytest
from kubetune.api import FineTuneJobSpec, FineTuneJobStatus, parse_manifest
from kubetune.api.enums import Adaptation
from kubetune.api.spec import LoraConfig, QLoraConfig
from pydantic import BaseModel

from tests.api.test_invalid_manifests import CANONICAL, mutate


def models(root: type[BaseModel]) -> set[type[BaseModel]]:
    seen: set[type[BaseModel]] = set()

    def visit(tp: Any) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp in seen:
                return
            seen.add(tp)
            for f in tp.model_fields.values():
                visit(f.annotation)
        for arg in typing.get_args(tp):
            visit(arg)

    visit(root)
    return seen


@pytest.mark.parametrize("root", [FineTuneJobSpec, FineTuneJobStatus])
def test_every_field_documented_and_camel(root: type[BaseModel]) -> None:
    for model in models(root):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            alias = field.alias or name
            assert "_" not in alias, f"{model.__name__}.{name} is not camelCase on the wire"


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"spec.method": {"adaptation": "qlora", "qlora": {"r": 64, "alpha": 16}}},
        {"spec.method": {"adaptation": "full"}},
        {"spec.scheduling": {"queueName": "team-a"}},
        {"spec.resources": {"gpus": 2}},
    ],
    ids=["lora", "qlora", "full", "kueue", "two-gpus"],
)
def test_canonical_manifests(changes: dict[str, Any]) -> None:
    job, problems = parse_manifest(mutate(CANONICAL, changes))
    assert problems == []
    assert job is not None and job.spec.output.uri == "s3://models/support-bot"


def test_qlora_defaults_are_nf4_double_quant() -> None:
    job, _ = parse_manifest(
        mutate(CANONICAL, {"spec.method": {"adaptation": "qlora", "qlora": {"r": 64, "alpha": 16}}})
    )
    assert job is not None
    block = job.spec.method.config()
    assert isinstance(block, QLoraConfig)
    assert (block.quant_type, block.double_quant, block.r, block.alpha) == ("nf4", True, 64, 16)


def test_config_falls_back_to_code_defaults() -> None:
    job, _ = parse_manifest(mutate(CANONICAL, {"spec.method": {"adaptation": "lora"}}))
    assert job is not None and job.spec.method.config() == LoraConfig()
    assert job.spec.method.adaptation == Adaptation.LORA
    assert job.spec.hyperparameters.epochs == 3 and job.spec.hyperparameters.batch_size == "auto"


def test_auto_and_numbers() -> None:
    job, _ = parse_manifest(mutate(CANONICAL, {"spec.hyperparameters": {"epochs": "auto", "batchSize": 8}}))
    assert job is not None
    hp = job.spec.hyperparameters
    assert (hp.epochs, hp.learning_rate, hp.batch_size) == ("auto", None, 8)


def test_wire_round_trip() -> None:
    job, _ = parse_manifest(CANONICAL)
    assert job is not None
    wire = job.spec.wire()
    assert wire["method"]["lora"]["targetModules"] == ["q_proj", "v_proj"]
    assert FineTuneJobSpec.model_validate(wire) == job.spec


def test_unset_target_modules_stay_out_of_the_wire_form() -> None:
    """Unset targetModules means the model family's default (resolved by the trainer, shown in
    status.effective): nothing is added to the wire form, so the spec digest does not carry it."""
    from kubetune.api.spec import DoraConfig, IA3Config

    assert LoraConfig().wire() == {"r": 16, "alpha": 32, "dropout": 0.05}
    assert DoraConfig(r=8).wire() == {"r": 8, "alpha": 32, "dropout": 0.05}
    assert QLoraConfig().wire()["targetModules"] == ["all-linear"]  # qlora's default fits every family: kept as it was
    assert IA3Config().wire() == {}
    assert IA3Config(target_modules=["c_attn"]).wire() == {"targetModules": ["c_attn"]}


def test_status_aliases() -> None:
    status = FineTuneJobStatus.model_validate({"cost": {"estimatedUSD": 1.5, "energyKWh": 2.0, "co2Kg": 0.5}})
    assert status.wire()["cost"] == {"estimatedUSD": 1.5, "energyKWh": 2.0, "co2Kg": 0.5}
