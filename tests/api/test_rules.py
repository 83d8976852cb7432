"""Every rule declared once agrees with itself: CEL (cel-python) and the Python predicate.

The rules are found from the declarations (each model's `rules(...)`, :func:`declared_rules`), not
listed here: for each, its CEL expression and its Python predicate must accept the rule's passing
example and refuse its failing one, and the model must report the rule's message (or its more
specific Python message) at the declared place. Every rule in the generated CRD must come from a
declaration, so a CEL rule without a Python twin cannot be added. tests/api/test_invalid_manifests.py
runs whole manifests through both sides; tests/cluster/test_cel.py sends them to a real 1.36 server.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import kubetune.api.spec  # noqa: F401  (imports every model of the FineTuneJob)
import pytest
from kubetune.api import pod, types
from kubetune.api._base import SKIP_RULES, Rule, WireModel, declared_rules
from kubetune.api.crd import crd
from pydantic import ValidationError

from tests.crd_offline import holds


def _models(cls: type[WireModel] = WireModel) -> Iterator[type[WireModel]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _models(sub)


DECLARED: list[tuple[type[WireModel], Rule]] = [
    (model, rule) for model in dict.fromkeys(_models()) for rule in declared_rules(model)
]
IDS = [f"{model.__name__}:{rule.message[:60]}" for model, rule in DECLARED]


def _crd_rules(node: Any) -> Iterator[dict[str, str]]:
    if isinstance(node, dict):
        yield from node.get("x-kubernetes-validations", [])
        for value in node.values():
            yield from _crd_rules(value)
    elif isinstance(node, list):
        for item in node:
            yield from _crd_rules(item)


def _message(err: dict[str, Any]) -> str:
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


def test_the_rules_are_found() -> None:
    """The discovery sees the models' rules (a walk that found none would pass every test below)."""
    owners = {model.__name__ for model, _ in DECLARED}
    assert len(DECLARED) >= 60
    assert {"Method", "SubGrader", "Grader", "FineTuneJobSpec", "Toleration", "PodOverrides", "EnvVar"} <= owners


@pytest.mark.parametrize(("model", "rule"), DECLARED, ids=IDS)
def test_cel_and_python_agree(model: type[WireModel], rule: Rule) -> None:
    assert holds(rule.cel, rule.passes), "CEL refuses the passing example"
    assert not holds(rule.cel, rule.fails), "CEL accepts the failing example"

    assert rule.check(model.model_validate(rule.passes))
    broken = model.model_validate(rule.fails, context={SKIP_RULES: True})
    assert not rule.check(broken), "the Python predicate accepts the failing example"

    with pytest.raises(ValidationError) as caught:
        model.model_validate(rule.fails)
    errors = caught.value.errors()
    assert len(errors) == 1, errors
    assert _message(errors[0]) == rule.python_message(broken)
    assert errors[0]["loc"] == ((rule.field(),) if rule.at_field else ())


def _value_rules() -> list[Rule]:
    """The rules of field types (URIs, names, label maps, lists): module-level Rules beside the
    types whose validators enforce them."""
    found: dict[int, Rule] = {}
    for module in (types, pod):
        for value in vars(module).values():
            if isinstance(value, Rule):
                found[id(value)] = value
    return list(found.values())


VALUE_RULES = _value_rules()


@pytest.mark.parametrize("rule", VALUE_RULES, ids=[r.message[:60] for r in VALUE_RULES])
def test_value_rules_agree(rule: Rule) -> None:
    assert holds(rule.cel, rule.passes), "CEL refuses the passing example"
    assert not holds(rule.cel, rule.fails), "CEL accepts the failing example"
    assert rule.check(rule.passes)
    assert not rule.check(rule.fails)
    with pytest.raises(ValueError) as caught:
        rule.enforce(rule.fails)
    assert str(caught.value) == rule.python_message(rule.fails)
    rule.enforce(rule.passes)


def test_every_crd_rule_is_declared_with_a_python_check() -> None:
    """Each CEL rule of the CRD is a declared Rule (with a Python predicate): a model's, or a field
    type's. Only transition rules (oldSelf) are plain CEL: the models see one object at a time
    (tests/api/test_immutability.py covers them)."""
    declared = {(r.cel, r.message, r.field_path) for _, r in DECLARED} | {
        (r.cel, r.message, r.field_path) for r in VALUE_RULES
    }
    in_crd = list(_crd_rules(crd()))
    undeclared = [r for r in in_crd if (r["rule"], r["message"], r.get("fieldPath")) not in declared]
    assert [r["message"] for r in undeclared if "oldSelf" not in r["rule"]] == []
    assert len(undeclared) == 2  # the immutability rule and cancel's: the only transition rules
    assert len(in_crd) > len(DECLARED)  # the walk sees the rules (shared types appear more than once)
