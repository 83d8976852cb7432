"""The per-method facts (kubetune.api.methods) are the one home of what kubetune knows about each
method: these tests hold the trainer's registries, the spec's blocks and rules, the CRD's
`learningRate` description and the methods tables of README.md and docs/methods.md to them."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import pytest
from kubetune.api import estimate, spec
from kubetune.api.crd import crd
from kubetune.api.enums import Adaptation, Objective, Optimizer, TrainingType
from kubetune.api.methods import (
    ADAPTATIONS,
    OBJECTIVES,
    TRAINING_TYPES,
    Output,
    Served,
    adaptations,
    learning_rate_defaults,
    number,
)
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[2]


def _snake(camel: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in camel)


def _field_model(model: type, field: str) -> Any:
    """The pydantic model inside a field's `Optional[...]` annotation."""
    (inner,) = [a for a in typing.get_args(model.model_fields[field].annotation) if a is not type(None)]
    return inner


# ----------------------------------------------------------------------------- the tables


def test_one_row_per_enum_value_in_enum_order() -> None:
    assert list(ADAPTATIONS) == list(Adaptation)
    assert list(TRAINING_TYPES) == list(TrainingType)
    assert list(OBJECTIVES) == list(Objective)
    for table in (ADAPTATIONS, TRAINING_TYPES, OBJECTIVES):
        assert all(facts.name == name for name, facts in table.items())


def test_facts_hold_together() -> None:
    for facts in ADAPTATIONS.values():
        assert facts.default_learning_rate > 0
        assert facts.trains_base_weights == (facts.output == Output.FULL)
        assert not facts.targets or facts.block is not None, facts.name
        assert not (facts.lora or facts.quantized) or facts.targets, facts.name
        # Virtual tokens are exactly what cannot be served; an adapter is never servable as full weights
        # without a merge, and full weights never as a LoRA adapter.
        assert facts.virtual_tokens == (facts.served == Served.NONE), facts.name
        assert facts.served != Served.ADAPTER or facts.output == Output.ADAPTER, facts.name
    assert TRAINING_TYPES[TrainingType.SUPERVISED].block is None
    assert all(f.block == f.name.value for f in TRAINING_TYPES.values() if f.name != TrainingType.SUPERVISED)
    assert all(f.block == f.name.value for f in OBJECTIVES.values())


def test_number_writes_learning_rates_as_the_docs_do() -> None:
    assert [number(x) for x in (2e-4, 3e-2, 2.5e-5, 1e-4, 1.0)] == ["2e-4", "3e-2", "2.5e-5", "1e-4", "1e0"]


# ----------------------------------------------------------------------------- the spec


@pytest.mark.parametrize("kind", list(Adaptation))
def test_adaptation_block_is_a_method_field_of_its_model(kind: Adaptation) -> None:
    facts = ADAPTATIONS[kind]
    config = spec.Method(adaptation=kind).config()
    if facts.block is None:
        assert config is None
        return
    model = _field_model(spec.Method, _snake(facts.block))
    assert type(config) is model
    # The block's wire name is the field's alias, and it belongs to this adaptation only.
    assert spec.Method.model_fields[_snake(facts.block)].alias == facts.block
    other = next(a for a in Adaptation if a != kind)
    with pytest.raises(ValidationError, match=f"the {facts.block} block belongs to adaptation: {facts.block}"):
        spec.Method.model_validate({"adaptation": other.value, facts.block: {}})


def test_every_adaptation_field_of_method_has_facts() -> None:
    blocks = {f.block for f in ADAPTATIONS.values() if f.block}
    types = {f.block for f in TRAINING_TYPES.values() if f.block}
    fields = {f.alias or name for name, f in spec.Method.model_fields.items()}
    assert fields - blocks - types == {"adaptation", "type", "objectives", "optimizer"}


@pytest.mark.parametrize("kind", [t for t in TrainingType if t != TrainingType.SUPERVISED])
def test_training_type_block_and_whether_it_is_required(kind: TrainingType) -> None:
    facts = TRAINING_TYPES[kind]
    assert facts.block is not None
    model = _field_model(spec.Method, facts.block)
    if facts.block_required:
        with pytest.raises(ValidationError, match=f"type: {kind.value} needs a {facts.block} block"):
            spec.Method(adaptation=Adaptation.LORA, type=kind)
    else:
        assert type(spec.Method(adaptation=Adaptation.LORA, type=kind).training()) is model


@pytest.mark.parametrize("kind", list(Objective))
def test_objective_block_and_whether_it_is_required(kind: Objective) -> None:
    facts = OBJECTIVES[kind]
    model = _field_model(spec.ObjectiveTerm, _snake(facts.block))
    if facts.block_required:
        with pytest.raises(ValidationError, match=f"type: {kind.value} needs an? {facts.block} block"):
            spec.ObjectiveTerm(type=kind)
    else:
        assert type(spec.ObjectiveTerm(type=kind).config()) is model


def test_reference_model_follows_the_type() -> None:
    lora = {"adaptation": "lora"}
    for kind, facts in TRAINING_TYPES.items():
        block = {"grpo": {"graders": [{"name": "g", "type": "regex", "pattern": "x"}]}} if kind == "grpo" else {}
        method = spec.Method.model_validate({**lora, "type": kind.value, **block})
        assert method.needs_reference() == facts.reference_model, kind
    assert not spec.Method.model_validate({**lora, "type": "dpo", "dpo": {"referenceFree": True}}).needs_reference()


def test_spec_constants_read_the_facts() -> None:
    assert spec.PREFERENCE_ADAPTATIONS == (Adaptation.FULL, Adaptation.LORA, Adaptation.QLORA, Adaptation.DORA)
    assert spec.SERVABLE_AS_LORA == (Adaptation.LORA, Adaptation.QLORA)
    assert spec.UNSERVABLE == spec.VIRTUAL_TOKENS == (Adaptation.PREFIX_TUNING, Adaptation.PROMPT_TUNING)
    for kind, facts in ADAPTATIONS.items():
        assert spec.served_merged(kind) == (facts.served == Served.MERGED)
        workload = estimate.gpu_workload(7_000_000_000, kind)
        assert (workload.trainable < workload.parameters) == facts.frozen_base
        assert (workload.weight_dtype == "nf4") == facts.quantized


def _rules(node: dict[str, Any]) -> list[str]:
    return [r["rule"] for r in node.get("x-kubernetes-validations", [])]


def _listed(rule: str, subject: str) -> list[str]:
    match = re.search(re.escape(subject) + r" in \[([^\]]*)\]", rule)
    assert match is not None, rule
    return re.findall(r"'([^']*)'", match.group(1))


def test_cel_rules_name_the_adaptations_the_facts_say() -> None:
    """The CEL rules spell the adaptation lists out; they must be the lists of the facts."""
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    preference = [
        r for r in _rules(schema["properties"]["method"]) if "self.type == 'supervised' || self.adaptation" in r
    ]
    assert len(preference) == 1
    assert _listed(preference[0], "self.adaptation") == [a.value for a in adaptations(preference=True)]
    virtual = [r for r in _rules(schema) if "self.method.adaptation in" in r]
    assert len(virtual) == 3  # output.format: merged, serving, packing
    for rule in virtual:
        assert _listed(rule, "self.method.adaptation") == [a.value for a in adaptations(virtual_tokens=True)]
    assert adaptations(virtual_tokens=True) == adaptations(served=Served.NONE)


# -------------------------------------------------------------------- learningRate description


def _defaults_in(description: str) -> dict[str, str]:
    """`… default: 2e-5 for full and layers; 1e-4 for transfer; …` → {"full": "2e-5", …}."""
    listed = description.split("default: ", 1)[1].rstrip(".")
    out = {}
    for part in listed.split("; "):
        lr, names = part.split(" for ", 1)
        for name in re.split(r", | and ", names):
            out[name] = lr
    return out


def test_learning_rate_description_gives_every_adaptation_its_default() -> None:
    crd_file = (ROOT / "crds/finetunejobs.kubetune.io.yaml").read_text()
    import yaml

    committed = yaml.safe_load(crd_file)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    node = committed["properties"]["spec"]["properties"]["hyperparameters"]["properties"]["learningRate"]
    expected = {a.value: number(f.default_learning_rate) for a, f in ADAPTATIONS.items()}
    assert _defaults_in(node["description"]) == expected
    assert _defaults_in(spec.Hyperparameters.model_fields["learning_rate"].description or "") == expected
    assert learning_rate_defaults() in (ROOT / "docs/api.md").read_text()
    # The numbers the trainer really uses (methods read them from the facts; the gateway scales LoRA's).
    from kubetune.gateway import translate

    assert translate.LORA_LEARNING_RATE == 2e-4
    assert expected == {
        "full": "2e-5",
        "layers": "2e-5",
        "transfer": "1e-4",
        "gradualUnfreeze": "5e-5",
        "lora": "2e-4",
        "qlora": "2e-4",
        "dora": "2e-4",
        "ia3": "3e-3",
        "prefixTuning": "3e-2",
        "promptTuning": "3e-2",
    }


# ----------------------------------------------------------------------------- the trainer


def test_trainer_methods_are_the_facts() -> None:
    from kubetune.trainer import methods
    from kubetune.trainer.methods import _base, targets

    assert list(methods.REGISTRY) == list(Adaptation)
    for kind, cls in methods.REGISTRY.items():
        facts = ADAPTATIONS[kind]
        assert cls.adaptation == kind and cls.facts is facts
        assert cls.default_learning_rate == facts.default_learning_rate
        assert cls.block == facts.block
        # A peft method saves an adapter; the others the model's own weights.
        assert issubclass(cls, _base.PeftMethod) == (facts.output == Output.ADAPTER), kind
    assert set(targets.LORA_BLOCKS) == {f.block for f in ADAPTATIONS.values() if f.lora}


@pytest.mark.parametrize("kind", list(Adaptation))
def test_trainer_method_hooks_follow_the_facts(kind: Adaptation) -> None:
    """Quantised loading and targets come from the facts; hooks a method does not use do nothing."""
    from kubetune.trainer import methods

    method = methods.build(kind, spec.Method(adaptation=kind).config())
    assert ("quantization_config" in method.load_kwargs("cpu")) == ADAPTATIONS[kind].quantized
    if kind == Adaptation.GRADUAL_UNFREEZE:
        assert method.param_groups(1e-4, 0.0) == [] and len(method.callbacks()) == 1  # groups appear in apply
    else:
        assert method.param_groups(1e-4, 0.0) is None and method.callbacks() == []
    if not ADAPTATIONS[kind].targets:
        assert method.resolve_targets(object()) is None


def test_trainer_objectives_share_one_base() -> None:
    from kubetune.trainer import objectives
    from kubetune.trainer.objectives import _base

    registry = objectives._registry()
    assert list(registry) == list(Objective)
    assert all(issubclass(cls, _base.Objective) for cls in registry.values())
    assert {k for k, cls in registry.items() if cls.needs_logits} == {Objective.REWEIGHTING, Objective.ADVERSARIAL}


# ----------------------------------------------------------------------------- the docs


def _methods_table(path: Path) -> dict[str, list[str]]:
    """The rows of the methods table (the one with a `default lr` column), by method name."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method | what trains | default lr |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    assert header[:5] == ["method", "what trains", "default lr", "loss", "reference"], header
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == len(header), line
        rows[cells[0]] = cells
    return rows


@pytest.mark.parametrize("doc", ["README.md", "docs/methods.md"])
def test_methods_table_agrees_with_the_facts(doc: str) -> None:
    rows = _methods_table(ROOT / doc)
    expected_names = set()
    for kind, facts in ADAPTATIONS.items():
        name = f"`{kind.value}`"
        expected_names.add(name)
        _, trains, lr, _, reference, *_ = rows[name]
        assert (trains, lr, reference) == (facts.summary, number(facts.default_learning_rate), facts.reference), kind
    for kind, ofacts in OBJECTIVES.items():
        name = f"`{kind.value}`" + (f" ({ofacts.alias})" if ofacts.alias else "")
        expected_names.add(name)
        _, _, lr, loss, reference, *_ = rows[name]
        assert (lr, loss, reference) == ("(adaptation's)", ofacts.summary, ofacts.reference), kind
    for ttype, tfacts in TRAINING_TYPES.items():
        if ttype == TrainingType.SUPERVISED:
            assert rows["`full`"][3] == tfacts.summary  # the first row names the supervised loss
            continue
        name = f"`type: {ttype.value}`"
        expected_names.add(name)
        _, _, lr, loss, reference, *_ = rows[name]
        assert (lr, loss, reference) == ("(adaptation's)", tfacts.summary, tfacts.reference), ttype
    optimizers = {r for r in rows if r not in expected_names}
    assert {o.strip("`") for r in optimizers for o in r.split(" · ")} == {o.value for o in Optimizer}
    # Each adaptation row links its example.
    for kind in Adaptation:
        assert f"examples/methods/{kind.value}.yaml)" in rows[f"`{kind.value}`"][5]


def test_readme_and_docs_methods_tables_are_the_same() -> None:
    readme = _methods_table(ROOT / "README.md")
    docs = _methods_table(ROOT / "docs/methods.md")
    assert {k: [c.replace("](../", "](") for c in v] for k, v in docs.items()} == readme
