"""The committed CRD is the generator's output, structural, documented and free of defaults."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from kubetune.api.crd import MUTABLE_AFTER_START, crd, crd_yaml

CRD_FILE = Path("crds/finetunejobs.kubetune.io.yaml")


def walk(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its wire path."""
    if not isinstance(node, dict):
        return
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}" if path else name)
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], path + "[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], path + "{}")


def schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_committed_crd_is_fresh() -> None:
    assert CRD_FILE.read_text() == crd_yaml(), "crds/ is stale: run `make crd`"


def test_kubetune_crd_prints_the_committed_file() -> None:
    out = subprocess.run([sys.executable, "-m", "kubetune.cli", "crd"], capture_output=True, text=True, check=True)
    assert out.stdout == CRD_FILE.read_text()


def test_structural() -> None:
    for path, node in walk(schema()):
        text = yaml.safe_dump(node)
        assert "$ref" not in node and "allOf" not in node and "oneOf" not in node, path
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string") is True, f"{path}: anyOf outside int-or-string"
            assert {"type": "null"} not in node["anyOf"], path
        assert "additionalProperties" not in node or isinstance(node["additionalProperties"], dict), path
        assert (
            "type" in node or node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
        ), f"{path}: structural schemas need a type"
        assert "default" not in node, f"{path}: defaults live in code, not in the CRD"
        assert "$defs" not in text, path


def test_every_field_has_a_description() -> None:
    for path, node in walk(schema()):
        if path and not path.endswith(("[]", "{}")) and not path.startswith("metadata"):
            assert node.get("description", "").strip(), f"{path} has no description for kubectl explain"


def test_metadata_shape() -> None:
    spec = crd()["spec"]
    assert spec["names"]["shortNames"] == ["ftj"]
    assert spec["group"] == "kubetune.io" and spec["scope"] == "Namespaced"
    version = spec["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    for wanted in ("Phase", "Method", "Model", "Progress", "Loss", "Age"):
        assert wanted in columns


def test_printer_columns_point_at_real_fields() -> None:
    root = schema()
    for column in crd()["spec"]["versions"][0]["additionalPrinterColumns"]:
        parts = column["jsonPath"].strip(".").split(".")
        if parts[0] == "metadata":
            continue
        node = root
        for part in parts:
            node = node["properties"][part]
        assert node.get("type") in ("string", "number", "integer"), column


def test_immutable_fields_are_bounded_for_cel_cost() -> None:
    """The immutability rule compares spec subtrees; unbounded strings or lists would make the
    API server's CEL cost estimate reject the CRD on install."""
    spec = schema()["properties"]["spec"]
    for field, sub in spec["properties"].items():
        if field in MUTABLE_AFTER_START:
            continue
        for path, node in walk(sub, f"spec.{field}"):
            if node.get("type") == "string":
                assert "maxLength" in node or "enum" in node, f"{path}: string without maxLength"
            if node.get("type") == "array":
                assert "maxItems" in node, f"{path}: list without maxItems"
            if node.get("type") == "object" and "additionalProperties" in node:
                assert "maxProperties" in node, f"{path}: map without maxProperties"


def test_immutability_rule_lists_every_frozen_field() -> None:
    rule = schema()["x-kubernetes-validations"][0]["rule"]
    for field in schema()["properties"]["spec"]["properties"]:
        assert (f"self.spec.{field}" in rule) == (field not in MUTABLE_AFTER_START), field


def untyped_rule_nodes(root: dict[str, Any]) -> list[str]:
    """Paths of schema nodes that carry CEL rules but have no CEL type (no `type`, not int-or-string)."""
    return [
        path or "<root>"
        for path, node in walk(root)
        if node.get("x-kubernetes-validations") and not (node.get("type") or node.get("x-kubernetes-int-or-string"))
    ]


def test_cel_rules_sit_on_typed_nodes() -> None:
    """A current API server compiles every rule against the CEL type of its node, and an untyped
    node (no `type`, e.g. only x-kubernetes-preserve-unknown-fields) has none: the server then
    refuses the *whole* CRD ("unable to convert structural schema to CEL declarations"). 1.20
    and cel-python could not see this; this check keeps the class of bug from coming back."""
    committed = yaml.safe_load(CRD_FILE.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert untyped_rule_nodes(committed) == []
    assert sum(1 for _, node in walk(committed) if node.get("x-kubernetes-validations")) >= 5  # the walk sees rules


def test_untyped_rule_check_catches_the_learning_rate_bug() -> None:
    """The check above fails on the shape of the bug it guards against (learningRate, 2026-12)."""
    bad = {
        "type": "object",
        "properties": {
            "learningRate": {
                "x-kubernetes-preserve-unknown-fields": True,
                "x-kubernetes-validations": [{"rule": "self > 0"}],
            },
            "batchSize": {"x-kubernetes-int-or-string": True, "x-kubernetes-validations": [{"rule": "self != 0"}]},
        },
    }
    assert untyped_rule_nodes(bad) == ["learningRate"]


_CEL_ESCAPE = re.compile(r"""\\(?:[\\'"`?abfnrtv]|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[0-3][0-7]{2})""")
_CEL_STRING = re.compile(r"'((?:[^'\\]|\\.)*)'")


def test_cel_string_literals_use_only_cel_escapes() -> None:
    """CEL has no `\\.` escape (cel-python let one through; the 1.36 server refused the whole CRD):
    every backslash in a rule's string literal must start an escape CEL knows."""
    bad = []
    for path, node in walk(yaml.safe_load(CRD_FILE.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]):
        for rule in node.get("x-kubernetes-validations", []):
            for literal in _CEL_STRING.findall(rule["rule"]):
                if _CEL_ESCAPE.sub("", literal).count("\\"):
                    bad.append((path, literal))
    assert bad == []
    assert _CEL_ESCAPE.sub("", r"a\.b").count("\\") == 1  # the check sees the bug it guards against
