"""The chart's `kubetune api` (gateway.*): off by default, one value (and its two requirements) to
enable, PSS-restricted, valid objects, the RBAC its Kubernetes backend was measured to need
(tests/data/gateway-api-usage.json), the access file mounted where the server reads it, and every
KUBETUNE_API_* variable one that kubetune.gateway.server reads."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import helm_python
import pytest

from tests.chart.pss import restricted_violations
from tests.chart.render import CHART, NAMESPACE, ROOT, WATCHED, of_kind, one, render, scenario
from tests.manifests import assert_valid

ENABLED = {
    "gateway": {
        "enabled": True,
        "storage": {"uri": "s3://models/kubetune-api", "credentialsSecret": "kubetune-s3"},
        "auth": {"secretName": "kubetune-api-access"},
    }
}
USAGE = json.loads((ROOT / "tests" / "data" / "gateway-api-usage.json").read_text())


def gateway_objects(values: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        o for o in render(values) if (o["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "gateway"
    ]


def merged(*parts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deployment(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(o for o in of_kind(objs, "Deployment") if o["metadata"]["name"].endswith("-gateway"))


def test_off_by_default() -> None:
    for name in ("defaults", "cluster-wide", "namespaced", "monitoring", "network-policy"):
        assert [o["metadata"]["name"] for o in scenario(name) if "gateway" in o["metadata"]["name"]] == [], name


@pytest.mark.parametrize(
    "values, missing",
    [
        ({"gateway": {"enabled": True, "auth": {"secretName": "x"}}}, "/gateway/storage/uri"),
        ({"gateway": {"enabled": True, "storage": {"uri": "s3://b/p"}}}, "/gateway/auth/secretName"),
        (
            {"gateway": {"enabled": True, "storage": {"uri": "not a url"}, "auth": {"secretName": "x"}}},
            "/gateway/storage/uri",
        ),
    ],
)
def test_enabling_needs_storage_and_a_way_to_authenticate(values: dict[str, Any], missing: str) -> None:
    with pytest.raises(Exception) as err:
        render(values)
    assert missing in str(err.value)


def test_objects_are_valid_restricted_and_lint_clean() -> None:
    objs = gateway_objects(merged(ENABLED, {"gateway": {"serviceMonitor": {"enabled": True}}}))
    assert sorted(o["kind"] for o in objs) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ]
    for obj in objs:
        if obj["kind"] != "ServiceMonitor":
            assert_valid(obj, "gateway")
    template = deployment(objs)["spec"]["template"]
    assert restricted_violations(template) == []
    (container,) = template["spec"]["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["command"] == ["kubetune", "api", "--cluster", "--host", "0.0.0.0", "--port", "8080"]
    report = helm_python.lint(CHART, ENABLED, strict=True, kube_version="v1.30.0", namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_the_service_and_monitor_reach_the_pods_port() -> None:
    objs = gateway_objects(merged(ENABLED, {"gateway": {"serviceMonitor": {"enabled": True}, "port": 9000}}))
    pod_labels = deployment(objs)["spec"]["template"]["metadata"]["labels"]
    service = one(objs, "Service")
    assert all(pod_labels[k] == v for k, v in service["spec"]["selector"].items())
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    (container,) = deployment(objs)["spec"]["template"]["spec"]["containers"]
    assert container["ports"] == [{"name": "http", "containerPort": 9000, "protocol": "TCP"}]
    assert container["command"][-2:] == ["--port", "9000"]
    monitor = one(objs, "ServiceMonitor")
    assert all(service["metadata"]["labels"][k] == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics" and monitor["spec"]["endpoints"][0]["port"] == "http"
    # the operator's Deployment and Service never select the gateway's pods, nor the reverse
    operator = next(
        o for o in render(ENABLED) if o["kind"] == "Deployment" and not o["metadata"]["name"].endswith("-gateway")
    )
    assert operator["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"


def granted(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (v, g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
    }


def test_rbac_is_the_measured_usage_in_the_watch_scope() -> None:
    measured = {(e["verb"], e["group"], e["resource"]) for e in USAGE["always"]}
    assert ("create", "kubetune.io", "finetunejobs") in measured and ("list", "", "events") in measured
    cluster = gateway_objects(ENABLED)
    assert granted(one(cluster, "ClusterRole")) == measured
    binding = one(cluster, "ClusterRoleBinding")
    sa = one(cluster, "ServiceAccount")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    assert deployment(cluster)["spec"]["template"]["spec"]["serviceAccountName"] == sa
    namespaced = gateway_objects(merged(ENABLED, {"watch": {"scope": "Namespaced", "namespaces": WATCHED}}))
    assert sorted(r["metadata"]["namespace"] for r in of_kind(namespaced, "Role")) == sorted(WATCHED)
    assert all(granted(r) == measured for r in of_kind(namespaced, "Role"))
    assert of_kind(namespaced, "ClusterRole") == [] and of_kind(namespaced, "ClusterRoleBinding") == []
    # no Secrets, no wildcards: the access file is mounted, not read through the API
    assert not any(g == "" and r == "secrets" for _, g, r in measured) and not any("*" in t for t in measured)


def test_kubernetes_tokens_bind_the_auth_delegator_role() -> None:
    without = gateway_objects(ENABLED)
    assert [b["roleRef"]["name"] for b in of_kind(without, "ClusterRoleBinding")] == ["kt-kubetune-gateway"]
    tokens = gateway_objects(merged(ENABLED, {"gateway": {"auth": {"kubernetesTokens": True, "secretName": ""}}}))
    names = {b["roleRef"]["name"] for b in of_kind(tokens, "ClusterRoleBinding")}
    assert names == {"kt-kubetune-gateway", "system:auth-delegator"}
    (container,) = deployment(tokens)["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBETUNE_API_KUBERNETES_TOKENS"] == "true" and env["KUBETUNE_API_ACCESS_FILE"] == ""
    assert [v["name"] for v in deployment(tokens)["spec"]["template"]["spec"]["volumes"]] == ["tmp"]


def test_the_environment_is_what_the_server_reads(tmp_path: Path) -> None:
    """Every KUBETUNE_API_* the Deployment sets is read by kubetune.gateway.server, and the app
    builds from exactly that environment (the access file swapped for a local copy)."""
    from kubetune.gateway import auth, server

    objs = gateway_objects(
        merged(
            ENABLED,
            {
                "gateway": {
                    "gpus": 2,
                    "checkpointEverySteps": 50,
                    "env": [{"name": "AWS_ENDPOINT_URL", "value": "http://minio:9000"}],
                }
            },
        )
    )
    pod = deployment(objs)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    read = set(re.findall(r'"(KUBETUNE_API_[A-Z_]+)"', Path(server.__file__).read_text()))
    # host and port are `kubetune api`'s options (the command line), the rest its environment
    assert {k for k in env if k.startswith("KUBETUNE_API_")} == read - {"KUBETUNE_API_HOST", "KUBETUNE_API_PORT"}
    assert env["KUBETUNE_API_STORAGE"] == "s3://models/kubetune-api" and env["KUBETUNE_API_GPUS"] == "2"
    assert env["KUBETUNE_API_CHECKPOINT_EVERY_STEPS"] == "50" and env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    # the Secret's access.yaml is mounted where KUBETUNE_API_ACCESS_FILE points
    mount = next(m for m in container["volumeMounts"] if m["name"] == "access")
    volume = next(v for v in pod["volumes"] if v["name"] == "access")
    assert volume["secret"]["secretName"] == "kubetune-api-access"
    assert volume["secret"]["items"] == [{"key": auth.ACCESS_FILE_KEY, "path": auth.ACCESS_FILE_KEY}]
    assert (
        env["KUBETUNE_API_ACCESS_FILE"] == f"{mount['mountPath']}/{auth.ACCESS_FILE_KEY}" and mount["readOnly"] is True
    )
    local = tmp_path / "access.yaml"
    local.write_text("keys:\n  - {name: a, key: 0123456789abcdefXYZ, namespace: team-a}\n")
    app = server.kube_app({**env, "KUBETUNE_API_ACCESS_FILE": str(local)}, client=object())
    assert {"/v1/files", "/v1/fine_tuning/jobs", "/healthz"} <= {getattr(r, "path", "") for r in app.routes}


def test_network_policy_with_networkpolicy_enabled() -> None:
    values = merged(
        ENABLED,
        {
            "networkPolicy": {"enabled": True, "apiServer": {"cidrs": ["10.0.0.1/32"], "ports": [443]}},
            "gateway": {
                "networkPolicy": {
                    "egressCidrs": ["52.216.0.0/15"],
                    "egressPorts": [443, 80],
                    "ingressFrom": [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}],
                }
            },
        },
    )
    objs = gateway_objects(values)
    policy = one(objs, "NetworkPolicy")
    assert_valid(policy, "gateway")
    pod_labels = deployment(objs)["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels[k] == v for k, v in policy["spec"]["podSelector"]["matchLabels"].items())
    assert policy["spec"]["ingress"] == [
        {"ports": [{"protocol": "TCP", "port": 8080}], "from": [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}]}
    ]
    egress = policy["spec"]["egress"]
    assert {"ports": [{"protocol": "TCP", "port": 443}], "to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}]} in egress
    assert {
        "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 80}],
        "to": [{"ipBlock": {"cidr": "52.216.0.0/15"}}],
    } in egress
    assert any(p.get("port") == 53 for rule in egress for p in rule["ports"])
    # the operator's own policy does not select the gateway's pods
    operator_policy = next(
        o for o in render(values) if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "kt-kubetune"
    )
    selector = operator_policy["spec"]["podSelector"]["matchLabels"]
    assert not all(pod_labels.get(k) == v for k, v in selector.items())
    assert of_kind(gateway_objects(ENABLED), "NetworkPolicy") == []
    report = helm_python.lint(CHART, values, strict=True, kube_version="v1.30.0", namespace=NAMESPACE)
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []
