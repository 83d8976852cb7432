"""The FineTuneJob resource as a whole, and turning a manifest into it with readable errors.

`parse_manifest` is what `kubetune validate`, the operator and the trainer call. Its errors are
`Problem(path, message)` pairs whose path is the wire (camelCase) path a user sees in their YAML,
e.g. `spec.method.lora.r`, and whose message says what is allowed.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import re
import typing
from dataclasses import dataclass
from typing import Any, Literal, Optional, TypedDict

from kubetune.api._base import WireModel
from kubetune.api.spec import FineTuneJobSpec
from kubetune.api.status import FineTuneJobStatus
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class ObjectMeta(BaseModel):
    """The part of Kubernetes object metadata kubetune reads; the rest passes through."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(description="Object name (DNS subdomain, at most 253 characters).")
    namespace: Optional[str] = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    uid: Optional[str] = None
    generation: Optional[int] = None

    @field_validator("name")
    @classmethod
    def _dns_subdomain(cls, name: str) -> str:
        if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
            raise ValueError(f"{name!r} is not a valid name: use at most 253 lowercase letters, digits, '-' and '.'")
        return name


class FineTuneJob(WireModel):
    """A fine-tuning run of a language model, reconciled by the kubetune operator."""

    api_version: Literal["kubetune.io/v1alpha1"] = Field(alias="apiVersion", description="kubetune.io/v1alpha1")
    kind: Literal["FineTuneJob"] = Field(description="FineTuneJob")
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: Optional[FineTuneJobStatus] = None


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest, at a wire path such as `spec.method.lora.r`."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


def _as_json(obj: Any) -> str:
    # Validating JSON in strict mode accepts exactly what the API server accepts: "16" is not
    # an integer and "yes" is not a boolean, while enum names and int-for-float are fine.
    return json.dumps(obj, default=str)


# Wire input is matched by wire (camelCase) names only: the Python names (`learning_rate`) are
# not fields of the CRD, and the API server would prune them silently.
class _ValidateOptions(TypedDict):
    strict: bool
    by_alias: bool
    by_name: bool


_WIRE: _ValidateOptions = {"strict": True, "by_alias": True, "by_name": False}


INT64 = (-(2**63), 2**63 - 1)


def json_problems(value: Any, path: str = "") -> list[Problem]:
    """What the API server's JSON cannot carry: infinities and NaN, integers outside int64, and
    values that are not JSON at all. (YAML reads `.inf` and 10**30; JSON and Kubernetes do not.)"""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, float):
        return [] if math.isfinite(value) else [Problem(path, f"must be a finite number, not {value}")]
    if isinstance(value, int):
        if INT64[0] <= value <= INT64[1]:
            return []
        return [Problem(path, "is outside the 64-bit integer range the API server accepts")]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in json_problems(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in json_problems(v, f"{path}[{i}]")]
    return [Problem(path, f"a {type(value).__name__} is not a JSON value")]


def prune_nulls(value: Any, schema: dict[str, Any]) -> Any:
    """`value` without the `null`s the API server prunes: a field the CRD declares and does not
    mark nullable, set to null, is dropped as if absent (none of ours is nullable). Content the
    schema leaves open (x-kubernetes-preserve-unknown-fields, such as an affinity) is kept as is."""
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), dict) else None
        out = {}
        for key, item in value.items():
            sub = props.get(key) or extra
            if sub is None:
                out[key] = item  # unknown here: the models refuse it (or it is open content)
            elif item is not None:
                out[key] = prune_nulls(item, sub)
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune_nulls(item, schema["items"]) for item in value]
    return value


@functools.cache
def _spec_schema() -> dict[str, Any]:
    from kubetune.api.crd import object_schema  # the CRD generator imports this module

    return object_schema(FineTuneJobSpec)


def parse_manifest(obj: Any) -> tuple[FineTuneJob | None, list[Problem]]:
    """Validate a decoded manifest. Returns the model, or None and every problem found."""
    if not isinstance(obj, dict):
        return None, [Problem("", f"a manifest must be a mapping, got {type(obj).__name__}")]
    if problems := json_problems(obj):
        return None, problems
    if isinstance(obj.get("spec"), dict):
        obj = {**obj, "spec": prune_nulls(obj["spec"], _spec_schema())}
    try:
        return FineTuneJob.model_validate_json(_as_json(obj), **_WIRE), []
    except ValidationError as err:
        return None, problems_from(err, FineTuneJob)


def parse_spec(spec: Any) -> tuple[FineTuneJobSpec | None, list[Problem]]:
    """Validate a bare spec (the JSON the operator hands the trainer); paths start at `spec`."""
    if problems := json_problems(spec, "spec"):
        return None, problems
    spec = prune_nulls(spec, _spec_schema())
    try:
        return FineTuneJobSpec.model_validate_json(_as_json(spec), **_WIRE), []
    except ValidationError as err:
        return None, problems_from(err, FineTuneJobSpec, prefix=("spec",))


def problems_from(err: ValidationError, root: type[BaseModel], prefix: tuple[Any, ...] = ()) -> list[Problem]:
    out: list[Problem] = []
    for e in err.errors():
        loc = prefix + tuple(e["loc"])
        path = _path(loc)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = _unknown_field_message(root, tuple(e["loc"]))
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        elif e["type"] == "literal_error" and path in ("apiVersion", "kind"):
            msg = f"must be {API_VERSION if path == 'apiVersion' else KIND}"
        out.append(Problem(path, msg))
    return out


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _fields_by_alias(model: type[BaseModel]) -> dict[str, Any]:
    return {(f.alias or name): f.annotation for name, f in model.model_fields.items()}


def _unwrap(tp: Any) -> Any:
    """The model class inside Optional[...] / list[...] / Annotated[...], if any."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in typing.get_args(tp):
            found = _unwrap(arg)
            if isinstance(found, type) and issubclass(found, BaseModel):
                return found
        return None
    if origin in (list, dict):
        return _unwrap(typing.get_args(tp)[-1])
    return tp


def _unknown_field_message(root: type[BaseModel], loc: tuple[Any, ...]) -> str:
    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        model = _unwrap(_fields_by_alias(model).get(part))
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return "unknown field"
    allowed = sorted(_fields_by_alias(model))
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown field; {hint}allowed here: {', '.join(allowed)}"
