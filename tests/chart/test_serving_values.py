"""The chart's `serving` values (issue 20): the settings reach the operator, the serving RBAC and
the vLLM egress exist only with serving.enabled (tests/chart/test_rbac.py checks the rules equal the
measured usage)."""

from __future__ import annotations

from typing import Any

from kubetune.operator.settings import OperatorSettings

from tests.chart.render import of_kind, one, render

SERVING_GROUP = "serving.kserve.io"


def operator_env(objs: list[dict[str, Any]]) -> dict[str, str]:
    (container,) = [c for c in one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def test_serving_settings_reach_the_operator() -> None:
    env = operator_env(
        render({"serving": {"vllmImage": "registry.example/vllm@sha256:" + "a" * 64, "recheckSeconds": 60}})
    )
    settings = OperatorSettings.from_env(env)
    assert settings.serving_vllm_image == "registry.example/vllm@sha256:" + "a" * 64
    assert settings.serving_recheck_seconds == 60
    defaults = OperatorSettings.from_env(operator_env(render({})))
    assert defaults.serving_vllm_image == OperatorSettings().serving_vllm_image
    assert defaults.serving_recheck_seconds == OperatorSettings().serving_recheck_seconds


def _grants(objs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {
        (g, r)
        for role in of_kind(objs, "ClusterRole") + of_kind(objs, "Role")
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }


def test_serving_rbac_only_when_enabled() -> None:
    off, on = _grants(render({})), _grants(render({"serving": {"enabled": True}}))
    assert (
        not {(g, r) for g, r in off if g == SERVING_GROUP}
        and ("", "secrets") not in off
        and ("apps", "deployments") not in off
    )
    assert {
        (SERVING_GROUP, "llminferenceservices"),
        (SERVING_GROUP, "inferenceservices"),
        ("apps", "deployments"),
        ("", "secrets"),
    } <= on


def _operator_egress(values: dict[str, Any]) -> list[dict[str, Any]]:
    (policy,) = [p for p in of_kind(render(values), "NetworkPolicy") if p["metadata"]["name"] == "kt-kubetune"]
    return policy["spec"]["egress"]


def test_operator_may_reach_vllm_endpoints_only_with_serving() -> None:
    base = {"networkPolicy": {"enabled": True}}
    ports = lambda egress: [[p["port"] for p in rule.get("ports", [])] for rule in egress]
    assert [8000] not in ports(_operator_egress(base))
    assert [8000, 8080] in ports(
        _operator_egress({**base, "serving": {"enabled": True, "endpointPorts": [8000, 8080]}})
    )
