"""Generate the FineTuneJob CustomResourceDefinition from the pydantic models.

The CRD is never edited by hand: `kubetune crd` prints it and `crds/` holds that output, checked
fresh by a test. pydantic's JSON Schema is turned into a *structural* OpenAPI v3 schema as the
API server requires: `$ref`s inlined, `anyOf [X, null]` → X (not nullable: the API server then
prunes an explicit `null` as if the field were absent, which is what the models do), JSON Schema
2020 bounds → OpenAPI 3.0 bounds, no `additionalProperties: false` (the server prunes instead),
no `default` (defaults live in code and show in status.effective, so GitOps sees no drift).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml
from kubetune.api._base import CEL_KEY
from kubetune.api.resource import API_VERSION, GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION
from kubetune.api.spec import FineTuneJobSpec
from kubetune.api.status import FineTuneJobStatus

# Fields a queue may set or a user may flip after the job started; every other spec field is
# frozen once status.startTime is set (a running trainer cannot change its model or data).
MUTABLE_AFTER_START = ("suspend", "cancel", "scheduling")


def frozen_spec(spec_wire: dict[str, Any]) -> dict[str, Any]:
    """The part of a wire spec that is frozen once training started (all but MUTABLE_AFTER_START)."""
    return {k: v for k, v in spec_wire.items() if k not in MUTABLE_AFTER_START}


def spec_digest(spec_wire: dict[str, Any]) -> str:
    """sha256 of the frozen part of a wire spec: what the trainer runs. The operator names the
    ConfigMap holding a started spec after it and compares it to tell an edited spec."""
    text = json.dumps(frozen_spec(spec_wire), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


# The spec blocks that decide the training trajectory: a checkpoint written under one of them is
# resumed only by a run with the same (output, evaluation, resources, scheduling and the like do
# not change what trains).
TRAINING_FIELDS = ("model", "dataset", "method", "hyperparameters")
# Inside them, what never changes the weights: validating the data in a separate Job or not,
# recomputing activations or keeping them.
_TRAINING_IGNORED = {"dataset": ("prevalidate",), "hyperparameters": ("gradientCheckpointing",)}


def training_digest(spec_wire: dict[str, Any]) -> str:
    """sha256 of the training-relevant part of a wire spec (TRAINING_FIELDS): recorded in every
    checkpoint's and the result's manifest, so that a rerun can tell a checkpoint or a finished
    output of this same training from one of another spec."""
    part = {k: spec_wire.get(k) for k in TRAINING_FIELDS}
    for block, names in _TRAINING_IGNORED.items():
        value = part.get(block)
        if isinstance(value, dict):
            part[block] = {k: v for k, v in value.items() if k not in names}
    text = json.dumps(part, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase"},
    {"name": "Method", "type": "string", "jsonPath": ".spec.method.adaptation", "description": "Adaptation method"},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.source", "description": "Base model"},
    {
        "name": "Progress",
        "type": "number",
        "jsonPath": ".status.progress.percent",
        "description": "Percent of steps done",
    },
    {
        "name": "Loss",
        "type": "number",
        "jsonPath": ".status.metrics.trainLoss",
        "description": "Latest training loss (4 decimals)",
    },
    {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta", "description": "Estimated time left"},
    {
        "name": "Eval",
        "type": "number",
        "jsonPath": ".status.metrics.evalLoss",
        "description": "Held-out loss",
        "priority": 1,
    },
    {
        "name": "Base",
        "type": "number",
        "jsonPath": ".status.metrics.baseEvalLoss",
        "description": "Base model held-out loss",
        "priority": 1,
    },
    {
        "name": "Reason",
        "type": "string",
        "jsonPath": ".status.reason",
        "description": "Why the job is in its phase",
        "priority": 1,
    },
    {"name": "Job", "type": "string", "jsonPath": ".status.jobName", "description": "Trainer Job", "priority": 1},
    {
        "name": "Serving",
        "type": "string",
        "jsonPath": ".status.serving.url",
        "description": "Endpoint serving the tuned model (spec.serving)",
        "priority": 1,
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

_DROP = {"title", "default", "examples"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        merged = dict(target)
        merged.update(node)  # the field's own description wins over the class docstring
        node = merged
    any_of = node.get("anyOf")
    if any_of and any(a == {"type": "null"} for a in any_of):
        rest = [a for a in any_of if a != {"type": "null"}]
        node.pop("anyOf")
        if len(rest) == 1:
            inner = _structural(rest[0], defs)
            inner.update({k: v for k, v in node.items() if k != CEL_KEY})
            if CEL_KEY in node or CEL_KEY in inner:
                inner[CEL_KEY] = inner.get(CEL_KEY, []) + node.get(CEL_KEY, [])
            node = inner
        else:
            node["anyOf"] = rest
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "additionalProperties" and (value is False or value is True):
            continue
        if key == "const":
            out["enum"] = [value]
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True
            continue
        if key in ("properties",):
            out[key] = {k: _structural(v, defs) for k, v in value.items()}
            continue
        out[key] = _structural(value, defs)
    if out.get("x-kubernetes-preserve-unknown-fields") and out.get("type") == "object":
        out.pop("additionalProperties", None)
    return out


def object_schema(model: type) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of one model (spec or status)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")  # type: ignore[attr-defined]
    defs = raw.pop("$defs", {})
    return _structural(raw, defs)


def _immutability_rule(spec: dict[str, Any]) -> dict[str, str]:
    required = set(spec.get("required", []))
    parts = []
    for field in spec["properties"]:
        if field in MUTABLE_AFTER_START:
            continue
        if field in required:
            parts.append(f"self.spec.{field} == oldSelf.spec.{field}")
        else:
            parts.append(
                f"(has(self.spec.{field}) == has(oldSelf.spec.{field}) && "
                f"(!has(self.spec.{field}) || self.spec.{field} == oldSelf.spec.{field}))"
            )
    return {
        "rule": "!has(oldSelf.status) || !has(oldSelf.status.startTime) || (" + " && ".join(parts) + ")",
        "message": (
            "spec is immutable once training has started (status.startTime is set); only "
            "suspend, cancel and scheduling may change. Create a new FineTuneJob to train differently."
        ),
    }


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    spec = object_schema(FineTuneJobSpec)
    status = object_schema(FineTuneJobStatus)
    root = {
        "type": "object",
        "description": (
            "FineTuneJob fine-tunes a language model: it names a base model, a dataset, a method "
            "and an output location; the kubetune operator runs the training as a batch/v1 Job "
            "and reports progress, metrics, checkpoints and the adapter's location in status."
        ),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": f"{API_VERSION}"},
            "kind": {"type": "string", "description": KIND},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        CEL_KEY: [_immutability_rule(spec)],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/part-of": "kubetune"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["all", "kubetune"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, data: str) -> Any:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def crd_yaml() -> str:
    header = "# Generated by `kubetune crd` from kubetune.api; do not edit. Regenerate with `make crd`.\n"
    return header + yaml.dump(crd(), Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)
