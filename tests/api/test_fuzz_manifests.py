"""Fuzzed manifests (RELIABILITY I1): one truth, bounded, never a traceback.

Thousands of manifests are made by mutating valid ones at paths of the CRD's schema with values of
every JSON type (and some JSON cannot carry: infinities, integers beyond int64). For each:

* the models never raise, and answer in bounded time;
* the models accept exactly what the CRD accepts (OpenAPI schema, unknown fields and CEL, checked
  offline here; tests/cluster/test_cel.py sends a sample to the real 1.36 server);
* what JSON cannot carry is refused with its path (the API server could never receive it).

Random YAML text goes through the manifest reader too: it either reads or fails with a
ManifestError naming the file (and line), never anything else. Deterministic: a fixed seed, a
fixed count (`derandomize`), so CI runs the same 2,000+ examples every time.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubetune.api.manifest import ManifestError, load_documents
from kubetune.api.resource import json_problems, parse_manifest

from tests.api.test_invalid_manifests import CANONICAL
from tests.crd_offline import validate as crd_validate

CRD = yaml.safe_load(Path("crds/finetunejobs.kubetune.io.yaml").read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
EXAMPLES = [
    CANONICAL,
    *(
        yaml.load(p.read_text(), Loader=__import__("kubetune.api.manifest", fromlist=["Loader"]).Loader)
        for p in sorted(Path("examples").glob("*.yaml"))[:6]
    ),
]
FUZZ = settings(max_examples=2000, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))


def schema_paths(node: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    """Every (path, schema node) below spec, lists entered at index 0."""
    out = [(path, node)]
    for name, child in (node.get("properties") or {}).items():
        out += schema_paths(child, (*path, name))
    if isinstance(node.get("items"), dict):
        out += schema_paths(node["items"], (*path, "0"))
    return out


PATHS = [(p, n) for p, n in schema_paths(SCHEMA) if p[:1] == ("spec",) and len(p) > 1]


def near(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values a user might plausibly write at this node: its enum, bounds and their neighbours."""
    opts: list[Any] = list(node.get("enum") or [])
    for key in ("minimum", "maximum", "minLength", "maxLength"):
        if isinstance(node.get(key), (int, float)):
            v = node[key]
            opts += [v, v - 1, v + 1] if key in ("minimum", "maximum") else ["x" * int(v), "x" * (int(v) + 1)]
    if node.get("type") == "boolean":
        opts += [True, False, "true", "yes", 1]
    if node.get("x-kubernetes-int-or-string"):
        opts += ["auto", "16", 0, 1, 8, "8Gi", "500m", "1e999999999"]
    if node.get("type") == "number":
        opts += [0, 0.5, 1, 2e-4, -1.0, 1e308]
    if node.get("type") == "string":
        opts += [
            "",
            "a",
            "s3://b/k",
            "hf://org/m",
            "pvc://claim/p",
            "Team_A",
            "team-a",
            "q_proj",
            "lorax",
            "a/b",
            "x" * 64,
            "\u00e9",
            "kubernetes.io/os",
            "-bad-",
            "NoSchedule",
            "Exists",
        ]
    if node.get("type") == "array":
        opts += [[], ["q_proj"], [{}], [{"type": "distillation"}]]
    if node.get("type") == "object":
        opts += [{}, {"a": "b"}, {"kubernetes.io/os": "linux"}, {"bad key": "v"}]
    return st.sampled_from(opts) if opts else st.nothing()


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**66), max_value=2**66)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=10), c, max_size=3), max_leaves=8
)
KEYS = st.sampled_from(
    ["learning_rate", "trust_remote_code", "batch_size", "learningrate", "epochs", "extra", "x-y", ""]
)


def put(obj: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node: Any = obj
    for part in path[:-1]:
        if isinstance(node, list):
            if not node or not isinstance(node[0], (dict, list)):
                node[:1] = [{}]  # an earlier mutation may have left a scalar where the path goes on
            node = node[0]
            continue
        if not isinstance(node.get(part), (dict, list)):
            node[part] = {}
        node = node[part]
    if isinstance(node, list):
        node[:] = [value]
    elif isinstance(node, dict):
        node[path[-1]] = value


def drop(obj: dict[str, Any], path: tuple[str, ...]) -> None:
    node: Any = obj
    for part in path[:-1]:
        node = node[0] if isinstance(node, list) and node else node.get(part) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(path[-1], None)


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    obj = copy.deepcopy(draw(st.sampled_from(EXAMPLES)))
    for _ in range(draw(st.integers(1, 3))):
        path, node = draw(st.sampled_from(PATHS))
        action = draw(st.sampled_from(["near", "near", "any", "drop", "key"]))
        if action == "near":
            value = draw(near(node) | JSON_SCALARS)
            put(obj, path, value)
        elif action == "any":
            put(obj, path, draw(JSON_VALUES))
        elif action == "drop":
            drop(obj, path)
        else:
            put(obj, (*path[:-1], draw(KEYS)), draw(JSON_SCALARS))
    return obj


def _accepts_crd(obj: dict[str, Any]) -> tuple[bool, list[Any]]:
    errors = crd_validate(CRD, obj)
    return not errors, errors


@FUZZ
@given(mutated())
def test_models_agree_with_the_crd(obj: dict[str, Any]) -> None:
    job, problems = parse_manifest(obj)
    assert (job is None) == bool(problems)
    if json_problems(obj):  # infinities, int64 overflow: the API server can never receive them
        assert job is None and all(p.path for p in problems)
        return
    crd_ok, crd_errors = _accepts_crd(obj)
    assert (job is not None) == crd_ok, (problems, crd_errors)


YAML_PIECES = st.sampled_from(
    [
        "a: 1\n",
        "b: [1, 2]\n",
        "- x\n",
        "&a [1]\n",
        "*a\n",
        "c: *a\n",
        "? x\n",
        ": y\n",
        "!!str ",
        "!!binary ",
        "!!python/name:os ",
        "'q",
        '"\\ud800"',
        "{",
        "}",
        "[",
        "]",
        "<<: *a\n",
        "k: &k {x: 1}\n",
        "d: 2024-01-01\n",
        "e: .inf\n",
        "f: 1e999\n",
        "---\n",
        "...\n",
        "%YAML 1.1\n",
        "  ",
        "\t",
        "\x00",
        "#c\n",
        "g: 99999999999999999999999\n",
        "h: 0x1F\n",
        "i: 12:30\n",
    ]
)


@FUZZ
@given(st.lists(YAML_PIECES | st.text(max_size=8), max_size=25).map("".join))
def test_any_text_reads_or_fails_with_a_manifest_error(text: str) -> None:
    try:
        docs = load_documents("fuzz.yaml", text)
    except ManifestError as err:
        assert str(err).startswith("fuzz.yaml")
        return
    for doc in docs:
        parse_manifest(doc.data) if isinstance(doc.data, dict) else None
