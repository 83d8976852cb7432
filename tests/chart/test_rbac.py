"""The operator's RBAC is exactly what it uses (RELIABILITY O11) and never more than it may have.

`tests/data/operator-api-usage.json` lists the (verb, group, resource) triples the operator was
seen to call, split into `always`, `peering` and `serving` (spec.serving's requests beyond
`always`). For each chart scope (a ClusterRole, or a Role in each watched namespace), peering on
and off and serving.enabled on and off, the rules bound to the operator's ServiceAccount must grant
every used triple and no other. Independently of usage, no role the chart ships may hold a
wildcard, pods/create or escalate/bind/impersonate, nor Secrets beyond `get` with serving.enabled.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from typing import Any

import pytest

from tests.chart.render import NAMESPACE, ROOT, SCENARIOS, WATCHED, of_kind, one, render, scenario

USAGE = json.loads((ROOT / "tests" / "data" / "operator-api-usage.json").read_text())
SA = "kt-kubetune"
_spec = importlib.util.spec_from_file_location("chart_rbac", ROOT / "hack" / "chart_rbac.py")
assert _spec and _spec.loader
chart_rbac = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(chart_rbac)

Triple = tuple[str, str, str]


def granted(rules: list[dict[str, Any]]) -> set[Triple]:
    return {(v, g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def operator_roles(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every Role/ClusterRole some binding gives the operator's ServiceAccount."""
    bound = set()
    for binding in of_kind(objs, "RoleBinding") + of_kind(objs, "ClusterRoleBinding"):
        if {"kind": "ServiceAccount", "name": SA, "namespace": NAMESPACE} in binding["subjects"]:
            bound.add((binding["roleRef"]["kind"], binding["metadata"].get("namespace"), binding["roleRef"]["name"]))
    roles = [
        r
        for r in of_kind(objs, "Role") + of_kind(objs, "ClusterRole")
        if (r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"]) in bound
    ]
    assert len(roles) == len(bound), "a binding points at a role the chart does not ship"
    return roles


CASES: dict[str, dict[str, Any]] = {
    "cluster": {"watch": {"scope": "Cluster"}},
    "cluster+peering": {"watch": {"scope": "Cluster"}, "peering": {"enabled": True}},
    "namespaced": {"watch": {"scope": "Namespaced", "namespaces": WATCHED}},
    "namespaced+peering": {"watch": {"scope": "Namespaced", "namespaces": WATCHED}, "peering": {"enabled": True}},
    "cluster+serving": {"watch": {"scope": "Cluster"}, "serving": {"enabled": True}},
    "namespaced+peering+serving": {
        "watch": {"scope": "Namespaced", "namespaces": WATCHED},
        "peering": {"enabled": True},
        "serving": {"enabled": True},
    },
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_granted_equals_used(case: str) -> None:
    values = CASES[case]
    scope = "namespaced" if values["watch"]["scope"] == "Namespaced" else "cluster"
    expected = chart_rbac.expected(USAGE, scope=scope, peering_on="peering" in values, serving_on="serving" in values)
    roles = operator_roles(render(values))
    if scope == "namespaced":
        assert sorted((r["kind"], r["metadata"]["namespace"]) for r in roles) == [("Role", ns) for ns in WATCHED]
    else:
        assert [r["kind"] for r in roles] == ["ClusterRole"]
    for role in roles:
        have = granted(role["rules"])
        assert expected - have == set(), f"used but not granted: {sorted(expected - have)}"
        assert have - expected == set(), f"granted but never used: {sorted(have - expected)}"


def test_usage_file_has_the_agreed_shape() -> None:
    assert set(USAGE) - {"_comment"} == {"always", "peering", "serving"}
    for entry in USAGE["always"] + USAGE["peering"] + USAGE["serving"]:
        assert set(entry) == {"verb", "group", "resource"} and all(isinstance(v, str) for v in entry.values())


FORBIDDEN_VERBS = {"escalate", "bind", "impersonate", "*"}


@pytest.mark.parametrize(
    "name", sorted(SCENARIOS) + ["cluster+peering", "cluster+serving", "namespaced+peering+serving"]
)
def test_no_role_grants_what_it_must_never(name: str) -> None:
    objs = scenario(name) if name in SCENARIOS else render(CASES[name])
    serving = "serving" in CASES.get(name, {})
    for role in of_kind(objs, "Role") + of_kind(objs, "ClusterRole"):
        for rule in role["rules"]:
            where = f"{role['kind']} {role['metadata']['name']}: {rule}"
            assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"], where
            assert not rule.get("nonResourceURLs") and not rule.get("resourceNames"), where
            assert not FORBIDDEN_VERBS & set(rule["verbs"]), where
            if "secrets" in rule["resources"] and rule["apiGroups"] == [""]:
                # only the vllmEndpoint API key, read with serving.enabled; never listed or watched
                assert serving and rule["verbs"] == ["get"] and rule["resources"] == ["secrets"], where
            assert not ("pods" in rule["resources"] and "" in rule["apiGroups"] and "create" in rule["verbs"]), where
            assert "pods/exec" not in rule["resources"] and "pods/attach" not in rule["resources"], where


def test_trainer_service_account_has_no_binding() -> None:
    for name in SCENARIOS:
        for binding in of_kind(scenario(name), "RoleBinding") + of_kind(scenario(name), "ClusterRoleBinding"):
            assert all(s["name"] != "kubetune-trainer" for s in binding["subjects"]), binding["metadata"]["name"]


def test_people_get_finetunejobs_through_the_built_in_roles() -> None:
    roles = {r["metadata"]["name"]: r for r in of_kind(scenario("defaults"), "ClusterRole")}
    edit, view = roles["kt-kubetune-edit"], roles["kt-kubetune-view"]
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert granted(edit["rules"]) == {
        (v, "kubetune.io", "finetunejobs")
        for v in ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
    }
    assert granted(view["rules"]) == {
        (v, "kubetune.io", r) for v in ("get", "list", "watch") for r in ("finetunejobs", "finetunejobs/status")
    }
    assert not [
        r
        for r in of_kind(render({"rbac": {"aggregateToDefaultRoles": False}}), "ClusterRole")
        if "aggregate" in str(r["metadata"]["labels"])
    ]


def test_operator_role_is_bound_to_the_deployments_account() -> None:
    objs = scenario("defaults")
    deployment = one(objs, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == SA
    assert one(objs, "ClusterRoleBinding")["subjects"] == [
        {"kind": "ServiceAccount", "name": SA, "namespace": NAMESPACE}
    ]


def test_rules_file_is_generated_from_the_usage() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "hack" / "chart_rbac.py"), "--check"], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
