"""The base every wire model shares: camelCase on the wire, unknown fields refused, CEL rules.

A FineTuneJob is written by people and GitOps tools; a typo such as `learningrate` must be an
error, not a silently ignored field, so every model forbids extra keys. Field names are
snake_case in Python and camelCase on the wire through one alias generator.

Rules that a plain schema bound cannot express are written twice, side by side: once as a CEL
`x-kubernetes-validations` rule that the API server enforces, once as a Python validator that
`kubetune validate` and the operator enforce. The test suite runs every invalid fixture through
both, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

CEL_KEY = "x-kubernetes-validations"


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One CEL rule as the CRD writes it; `field_path` points the error at a child field."""
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


def rules(*items: dict[str, str]) -> dict[str, Any]:
    """`json_schema_extra` carrying CEL rules for the object the model describes."""
    return {CEL_KEY: list(items)}


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
