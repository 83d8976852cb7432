"""Validate an object against the generated CRD offline, as the API server would.

Null pruning first (a non-nullable field set to null is dropped), then three checks, in the order
the API server applies them: unknown fields (kubectl's default
strict field validation rejects them), the OpenAPI v3 schema (openapi-schema-validator, OAS 3.0)
and the CEL `x-kubernetes-validations` rules (cel-python), with `oldSelf` bound for transition
rules on updates. Errors carry the wire path of the offending field, like the models' errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import celpy
from openapi_schema_validator import OAS30Validator

CEL = "x-kubernetes-validations"
_env = celpy.Environment()
_programs: dict[str, Any] = {}


@dataclass(frozen=True)
class SchemaError:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def _join(path: str, part: Any) -> str:
    if isinstance(part, int):
        return f"{path}[{part}]"
    return f"{path}.{part}" if path else str(part)


def _unknown_fields(schema: dict[str, Any], data: Any, path: str, out: list[SchemaError]) -> None:
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(data, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in data.items():
            if props is not None and key in props:
                _unknown_fields(props[key], value, _join(path, key), out)
            elif isinstance(extra, dict):
                _unknown_fields(extra, value, _join(path, key), out)
            elif props is not None and path != "metadata":
                out.append(SchemaError(_join(path, key), "unknown field"))
    elif isinstance(data, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(data):
            _unknown_fields(schema["items"], item, _join(path, i), out)


def _openapi(schema: dict[str, Any], data: Any) -> list[SchemaError]:
    validator = OAS30Validator(schema)
    out = []
    for err in validator.iter_errors(data):
        path = ""
        for part in err.absolute_path:
            path = _join(path, part)
        if err.validator == "required" and isinstance(err.instance, dict):
            # The API server names the missing field itself: "spec.model: Required value".
            for name in err.validator_value:
                if name not in err.instance:
                    out.append(SchemaError(_join(path, name), "Required value"))
            continue
        out.append(SchemaError(path, err.message))
    return out


def _program(rule: str) -> Any:
    if rule not in _programs:
        _programs[rule] = _env.program(_env.compile(rule))
    return _programs[rule]


def holds(rule: str, data: Any, old: Any = None) -> bool:
    """Whether the CEL `rule` holds for `self` = data (and `oldSelf` = old), as the API server decides."""
    activation = {"self": celpy.json_to_cel(data)}
    if old is not None:
        activation["oldSelf"] = celpy.json_to_cel(old)
    try:
        result = _program(rule).evaluate(activation)
        return bool(result) if not isinstance(result, celpy.CELEvalError) else False
    except Exception:  # an evaluation error rejects the object, as in the API server
        return False


def _cel(schema: dict[str, Any], data: Any, old: Any, path: str, out: list[SchemaError]) -> None:
    if data is None:
        return
    for rule in schema.get(CEL, []):
        if "oldSelf" in rule["rule"] and old is None:
            continue  # transition rules run on updates only
        ok = holds(rule["rule"], data, old)
        if not ok:
            out.append(
                SchemaError(path + rule.get("fieldPath", "") if rule.get("fieldPath") else path, rule["message"])
            )
    if isinstance(data, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, value in data.items():
            sub = props.get(key) or (extra if isinstance(extra, dict) else None)
            if sub is not None:
                child_old = old.get(key) if isinstance(old, dict) else None
                _cel(sub, value, child_old, _join(path, key), out)
    elif isinstance(data, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(data):
            # Kubernetes correlates list items for transition rules only for map lists; none here.
            _cel(schema["items"], item, None, _join(path, i), out)


def _prune_nulls(schema: dict[str, Any], data: Any) -> Any:
    """The API server drops a declared field whose value is null unless its schema says
    `nullable: true` (before validation); content under x-kubernetes-preserve-unknown-fields and
    undeclared keys are left alone."""
    if isinstance(data, dict) and schema.get("type") == "object":
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), dict) else None
        out = {}
        for key, value in data.items():
            sub = props.get(key) or extra
            if sub is not None and value is None and not sub.get("nullable"):
                continue
            out[key] = _prune_nulls(sub, value) if sub is not None else value
        return out
    if isinstance(data, list) and isinstance(schema.get("items"), dict):
        return [_prune_nulls(schema["items"], item) for item in data]
    return data


def validate(crd: dict[str, Any], obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[SchemaError]:
    """Every error the API server would report for creating `obj` (or updating `old` to it)."""
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    obj = _prune_nulls(schema, obj)
    old = _prune_nulls(schema, old) if old is not None else None
    errors: list[SchemaError] = []
    _unknown_fields(schema, obj, "", errors)
    errors += _openapi(schema, obj)
    _cel(schema, obj, old, "", errors)
    return errors
