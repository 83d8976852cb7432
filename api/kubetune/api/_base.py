"""The base every wire model shares: camelCase on the wire, unknown fields refused, CEL rules.

A FineTuneJob is written by people and GitOps tools; a typo such as `learningrate` must be an
error, not a silently ignored field, so every model forbids extra keys. Field names are
snake_case in Python and camelCase on the wire through one alias generator.

Rules that a plain schema bound cannot express are declared once, as a :class:`Rule` in the
model they belong to (`model_config = WireModel.model_config | {"json_schema_extra": rules(...)}`).
A rule holds the CEL expression the API server enforces (an `x-kubernetes-validations` entry of
the generated CRD), the message both sides report, the optional fieldPath, and the Python
predicate over the model that `kubetune validate` and the operator enforce: one validator on
:class:`WireModel` runs the predicates of the model's rules in their declared order and raises
the rule's message. Where the Python side names the offending value (`explain`), the CRD keeps the
general message. A rule of a field type (a URI, a label map, a list of named items) is declared
the same way beside the type: the type's JSON schema carries `rule.wire()` and its validator calls
`rule.enforce(value)`. Each rule also carries a passing and a failing example (wire form);
tests/api/test_rules.py finds every declared rule, checks that CEL (cel-python) and the predicate
agree on both and that the model reports the rule's message, and that every CEL rule of the CRD
is a declared rule, so the two halves of a rule cannot drift apart.

Transition rules (`oldSelf`) compare two versions of an object, which a model never sees; they
stay plain :func:`cel` entries (tests/api/test_immutability.py covers them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import InitErrorDetails, PydanticCustomError

CEL_KEY = "x-kubernetes-validations"
SKIP_RULES = "kubetune.skip_rules"
"""Validation context key: parse without running the models' declared rules (tests look at a rule's
predicate alone on an object the rule refuses)."""


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, Any]:
    """One CEL rule as the CRD writes it; `field_path` points the error at a child field."""
    out: dict[str, Any] = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


@dataclass(frozen=True)
class Rule:
    """One rule of an object, declared once for both the API server and Python.

    `cel` is the expression over `self` (the object, wire form) that must hold; `check` is the same
    predicate over the parsed model (True when the rule holds). `message` is what both report;
    `explain`, when given, is the more specific message Python reports for a model that breaks the
    rule (naming the value). CEL reports at `field_path` (e.g. `.initText`); Python reports at the
    object unless `at_field`, then at `field_path` as well. `passes` and `fails` are wire-form
    examples of the object, valid but for this rule, that the test runs through both sides.

    A rule of a field type (a URI, a label map, a list) sits in the type's JSON schema
    (`CEL_KEY: [rule.wire()]`); its predicate takes the wire value and the type's validator calls
    :meth:`enforce` where it checks that property.
    """

    cel: str
    message: str
    check: Callable[[Any], bool]
    passes: Any
    fails: Any
    field_path: str | None = None
    explain: Callable[[Any], str] | None = None
    at_field: bool = False

    def __post_init__(self) -> None:
        if self.at_field and not self.field_path:
            raise ValueError("a rule reported at its field needs a field_path")

    def wire(self) -> dict[str, Any]:
        """The rule as the CRD writes it."""
        return cel(self.cel, self.message, self.field_path)

    def enforce(self, value: Any) -> None:
        """Raise the rule's Python message unless `value` keeps the rule."""
        if not self.check(value):
            raise ValueError(self.python_message(value))

    def python_message(self, model: Any) -> str:
        """The message Python reports for `model`, which breaks the rule."""
        return self.explain(model) if self.explain else self.message

    def field(self) -> str:
        """The wire name of the field the rule points at (`field_path` without its leading dot)."""
        return (self.field_path or "").lstrip(".")


class Rules:
    """A model's declared rules, as its `json_schema_extra`: the JSON schema generator calls it to
    write the CEL rules into the CRD, :class:`WireModel` reads it to run their Python predicates.
    A plain :func:`cel` entry (a transition rule) is written to the CRD only."""

    def __init__(self, *items: Rule | dict[str, Any]) -> None:
        self.items = items

    def __call__(self, schema: dict[str, Any], cls: type | None = None) -> None:
        schema[CEL_KEY] = [r.wire() if isinstance(r, Rule) else r for r in self.items]

    def __repr__(self) -> str:
        return f"Rules({len(self.items)} rules)"


def rules(*items: Rule | dict[str, Any]) -> Rules:
    """`json_schema_extra` declaring the rules of the object the model describes."""
    return Rules(*items)


def declared_rules(model: type[BaseModel]) -> tuple[Rule, ...]:
    """The rules declared for `model` (its own, or inherited with its config)."""
    extra = model.model_config.get("json_schema_extra")
    return tuple(r for r in extra.items if isinstance(r, Rule)) if isinstance(extra, Rules) else ()


def _snake(wire: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in wire)


class WireModel(BaseModel):
    """camelCase on the wire, strict about unknown keys, documented field by field."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=False,
        validate_default=False,
    )

    def wire(self) -> dict[str, Any]:
        """The object as it is written to the API server: camelCase, unset fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")

    @model_validator(mode="after")
    def _declared_rules(self, info: ValidationInfo) -> Self:
        """Run the Python predicates of the model's rules, in declared order. Rules reported at a
        field are all reported together (as field validators would be); otherwise the first
        broken rule is reported at the object."""
        if info.context and info.context.get(SKIP_RULES):
            return self
        broken = [r for r in declared_rules(type(self)) if not r.check(self)]
        at_field = [r for r in broken if r.at_field]
        if at_field:
            raise ValidationError.from_exception_data(
                type(self).__name__,
                [
                    InitErrorDetails(
                        type=PydanticCustomError("value_error", "{message}", {"message": r.python_message(self)}),
                        loc=(r.field(),),
                        input=getattr(self, _snake(r.field()), None),
                    )
                    for r in at_field
                ],
            )
        if broken:
            raise ValueError(broken[0].python_message(self))
        return self
