"""Scalar wire types shared by the spec: URIs, `auto`-able numbers, Kubernetes quantities.

Each type carries its own OpenAPI schema (what the CRD says) next to its Python check (what
`kubetune validate` says), so both reject the same input with the same meaning. Messages say
what is allowed, because they are read by someone fixing a manifest.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, Field, PlainValidator, WithJsonSchema

from kubetune.api._base import CEL_KEY, cel

MODEL_SCHEMES = ("hf", "s3", "gs", "gcs", "file", "pvc", "builtin")
DATA_SCHEMES = ("s3", "gs", "gcs", "file", "pvc", "http", "https")
OUTPUT_SCHEMES = ("s3", "gs", "gcs", "file", "pvc")


def _uri_pattern(schemes: tuple[str, ...], plain_paths: bool) -> str:
    scheme = "(" + "|".join(schemes) + r")://[^\s]+"
    # A plain path (no scheme) is a file on the local disk or a mounted volume.
    return f"^({scheme}|[^:\\s]+)$" if plain_paths else f"^{scheme}$"


def _uri(schemes: tuple[str, ...], plain_paths: bool, what: str) -> Any:
    pattern = _uri_pattern(schemes, plain_paths)
    compiled = re.compile(pattern)
    allowed = ", ".join(f"{s}://" for s in schemes) + (" or a plain path" if plain_paths else "")

    def check(value: str) -> str:
        if len(value) > 2048:
            raise ValueError(f"is {len(value)} characters long; at most 2048 are allowed")
        if not compiled.match(value):
            raise ValueError(f"{value!r} is not a valid {what}: use {allowed}")
        return value

    return Annotated[
        str,
        AfterValidator(check),
        WithJsonSchema({"type": "string", "minLength": 1, "maxLength": 2048, "pattern": pattern}),
    ]


ModelUri = _uri(MODEL_SCHEMES, plain_paths=True, what="model source")
DataUri = _uri(DATA_SCHEMES, plain_paths=True, what="dataset location")
OutputUri = _uri(OUTPUT_SCHEMES, plain_paths=True, what="output location")


def _numeric_string(value: Any) -> Any:
    # YAML 1.1 readers (PyYAML) load `2e-4` as a string while kubectl sends a number;
    # accept both spellings so a manifest means the same thing everywhere.
    if isinstance(value, str) and value != "auto":
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def _positive_int_or_auto(value: Any) -> Any:
    value = _numeric_string(value)
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be an integer ≥ 1 or \"auto\", got {value!r}")
    return value


AutoInt = Annotated[
    Union[int, Literal["auto"]],
    PlainValidator(_positive_int_or_auto),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            CEL_KEY: [
                cel(
                    "type(self) == string ? self == 'auto' : self >= 1",
                    'must be an integer >= 1 or "auto"',
                )
            ],
        }
    ),
]
"""An integer ≥ 1, or `auto` to let kubetune choose (the choice is recorded in status.effective)."""

def _positive_number(value: Any) -> float:
    if value == "auto":
        raise ValueError(
            'leave learningRate out to use the method\'s default ("auto" cannot be stored: the '
            "CRD types learningRate as a number, so that the API server can check it)"
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number > 0 (unquoted, e.g. 2e-4), got {value!r}")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"must be a finite number > 0, got {value!r}")
    return float(value)


PositiveNumber = Annotated[
    float,
    PlainValidator(_positive_number),
    # A typed node: a CEL rule on an untyped (x-kubernetes-preserve-unknown-fields) node makes a
    # current API server refuse the whole CRD ("unable to convert structural schema to CEL
    # declarations"), and a number-or-string union has no structural type. So the number is
    # typed, bounded by the schema, and "auto" is spelled by leaving the field out.
    WithJsonSchema({"type": "number", "minimum": 0, "exclusiveMinimum": True}),
]
"""A number > 0; unset means kubetune chooses (the choice is recorded in status.effective)."""

QUANTITY_PATTERN = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
_quantity = re.compile(QUANTITY_PATTERN)


def _check_quantity(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a Kubernetes quantity such as 8, 500m, 64Gi")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return str(value)
    if isinstance(value, str) and _quantity.match(value):
        return value
    raise ValueError(f"{value!r} is not a Kubernetes quantity: write e.g. 8, 500m, 64Gi")


Quantity = Annotated[
    Union[int, str],
    PlainValidator(_check_quantity),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            CEL_KEY: [cel("type(self) == string || self >= 0", "must not be negative")],
        }
    ),
]

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"

ShortString = Annotated[str, Field(max_length=253)]
"""A name-like string; bounded so CEL rules comparing it stay within the API server's cost budget."""
