"""The chart renders with real Helm, lints clean and yields valid, restricted objects (issue 7).

Every scenario of `render.SCENARIOS` is rendered by Helm's engine and every built-in object is
checked against the Kubernetes 1.30 OpenAPI schema in strict mode (kubernetes-validate). The
Prometheus Operator and kopf kinds are not in that schema set; they get a structural check. The
operator Deployment must pass the restricted Pod Security profile, and its `KUBETUNE_*`
variables must read back through `OperatorSettings.from_env` as the values say.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any
from urllib.parse import urlsplit

import helm_python
import pytest
from kubetune.operator import __main__ as operator_main
from kubetune.operator.settings import ENV_PREFIX, OperatorSettings, env_name

from tests.chart.pss import restricted_violations
from tests.chart.render import (
    CHART,
    DIGEST,
    NAMESPACE,
    SCENARIOS,
    WATCHED,
    chart,
    env_of,
    of_kind,
    one,
    render,
    scenario,
)
from tests.manifests import assert_valid

# Kinds from CRDs that kubernetes-validate has no schema for: checked by `structural` instead.
CUSTOM_KINDS = {"ServiceMonitor", "PodMonitor", "KopfPeering", "ClusterKopfPeering"}


def structural(obj: dict[str, Any]) -> None:
    """The fields the Prometheus Operator / kopf need, with the right types."""
    meta = obj["metadata"]
    assert isinstance(meta["name"], str) and meta["name"]
    if obj["kind"] in ("ServiceMonitor", "PodMonitor"):
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        assert meta["namespace"] == NAMESPACE
        endpoints = obj["spec"]["endpoints" if obj["kind"] == "ServiceMonitor" else "podMetricsEndpoints"]
        assert [e["port"] for e in endpoints] == ["metrics"]
        assert all(e["path"] == "/metrics" for e in endpoints)
        assert isinstance(obj["spec"]["selector"]["matchLabels"], dict)
    else:
        assert obj["apiVersion"] == "kopf.dev/v1" and meta["name"] == operator_main.PEERING_NAME
        assert ("namespace" in meta) == (obj["kind"] == "KopfPeering")


@pytest.mark.parametrize(
    "values", [{}] + [v for v in SCENARIOS.values() if v], ids=["defaults"] + [k for k, v in SCENARIOS.items() if v]
)
def test_lint_is_clean(values: dict[str, Any]) -> None:
    report = helm_python.lint(CHART, values, strict=True, kube_version="v1.30.0", namespace=NAMESPACE)
    assert report["errors"] == []
    # Severity 1 is informational ("icon is recommended"); warnings and errors are 2 and 3.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_object_is_valid(name: str) -> None:
    objs = scenario(name)
    assert objs
    for obj in objs:
        if obj["kind"] in CUSTOM_KINDS:
            structural(obj)
            continue
        assert_valid(obj, name)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_operator_pod_is_restricted(name: str) -> None:
    deployment = one(scenario(name), "Deployment")
    assert restricted_violations(deployment["spec"]["template"]) == []


def test_operator_deployment_shape() -> None:
    deployment = one(scenario("defaults"), "Deployment")
    spec, pod = deployment["spec"], deployment["spec"]["template"]["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    assert pod["enableServiceLinks"] is False
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "kubetune.operator"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    # The probe hits kopf's liveness endpoint where __main__ tells kopf to serve it.
    liveness = urlsplit(operator_main.liveness_endpoint(OperatorSettings().health_port) or "")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == liveness.path and ports[probe["port"]] == liveness.port
    assert ports["metrics"] == 8000
    # The only writable path is a size-limited /tmp.
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}]
    assert container["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}


def test_images_by_tag_and_by_digest() -> None:
    version = chart().metadata["appVersion"]
    default = one(scenario("defaults"), "Deployment")
    assert default["spec"]["template"]["spec"]["containers"][0]["image"] == f"ghcr.io/kubetune/operator:{version}"
    assert env_of(default)["KUBETUNE_TRAINER_IMAGE"] == f"ghcr.io/kubetune/trainer:{version}"
    pinned = one(scenario("digest"), "Deployment")
    assert pinned["spec"]["template"]["spec"]["containers"][0]["image"] == f"ghcr.io/kubetune/operator@{DIGEST}"
    assert env_of(pinned)["KUBETUNE_TRAINER_IMAGE"] == f"ghcr.io/kubetune/trainer@{DIGEST}"
    tagged = one(
        render({"image": {"tag": "0.2.0-rc.1", "repository": "registry.example.com:5000/ml/kubetune-operator"}}),
        "Deployment",
    )
    assert (
        tagged["spec"]["template"]["spec"]["containers"][0]["image"]
        == "registry.example.com:5000/ml/kubetune-operator:0.2.0-rc.1"
    )


def test_default_env_reads_back_as_the_operator_defaults() -> None:
    """values.yaml and OperatorSettings agree on every default (only the image tag is the chart's)."""
    env = env_of(one(scenario("defaults"), "Deployment"))
    settings = OperatorSettings.from_env(env)
    version = chart().metadata["appVersion"]
    assert settings == dataclasses.replace(OperatorSettings(), trainer_image=f"ghcr.io/kubetune/trainer:{version}")


NOT_FROM_THE_CHART = {"api_url"}
"""Settings the chart leaves unset: the operator pod reaches the API server as its ServiceAccount."""


def test_every_setting_is_exposed_and_every_variable_is_a_setting() -> None:
    env = {k for k in env_of(one(scenario("defaults"), "Deployment")) if k.startswith(ENV_PREFIX)}
    fields = {env_name(f.name) for f in dataclasses.fields(OperatorSettings) if f.name not in NOT_FROM_THE_CHART}
    assert fields <= env, f"settings the chart does not set: {sorted(fields - env)}"
    assert env <= fields, f"variables no setting reads: {sorted(env - fields)}"


def test_a_variable_name_is_derived_from_its_setting_only() -> None:
    """The chart's schema quotes variable names through `env_name`: a name that is no setting fails."""
    assert env_name("worker_limit") == "KUBETUNE_WORKER_LIMIT"
    assert env_name("api_url") == "KUBETUNE_API_URL"
    with pytest.raises(KeyError, match="gpu_watts"):
        env_name("gpu_watts")


def test_custom_values_reach_the_operator_settings() -> None:
    values = {
        "watch": {"scope": "Namespaced", "namespaces": WATCHED},
        "peering": {"enabled": True},
        "kueue": {"enabled": False},
        "operator": {"scrapeIntervalSeconds": 12.5, "metricsPort": 8123, "maxJobRecreations": 0},
        "trainer": {
            "image": {"repository": "registry.example.com/trainer", "tag": "1.2.3", "pullPolicy": "Always"},
            "serviceAccount": {"name": "ml-trainer"},
            "metricsPort": 9191,
            "terminationGracePeriodSeconds": 600,
            "allowedOutputPrefixes": ["s3://models/", "gs://ml-artifacts/team-a/"],
            "volumes": {
                "tmpSizeLimit": "1Gi",
                "scratchSizeLimit": "1Ti",
                "hfCacheSizeLimit": "10Gi",
                "cacheSizeLimit": "500Gi",
                "sharedMemoryDefault": "16Gi",
            },
            "validation": {"cpu": "500m", "memory": "2Gi", "deadlineSeconds": 7200000},
        },
        "cost": {"gpuPricePerHourUSD": 3.1, "gridCarbonKgPerKWh": 0.05},
    }
    env = env_of(one(render(values), "Deployment"))
    assert OperatorSettings.from_env(env) == OperatorSettings(
        trainer_image="registry.example.com/trainer:1.2.3",
        image_pull_policy="Always",
        trainer_service_account="ml-trainer",
        termination_grace_period_seconds=600,
        gpu_price_per_hour_usd=3.1,
        grid_carbon_kg_per_kwh=0.05,
        metrics_scrape_interval_seconds=12.5,
        metrics_port=9191,
        validation_cpu="500m",
        validation_memory="2Gi",
        validation_deadline_seconds=7200000,
        tmp_size_limit="1Gi",
        scratch_size_limit="1Ti",
        hf_cache_size_limit="10Gi",
        cache_size_limit="500Gi",
        shared_memory_default="16Gi",
        allowed_output_prefix="s3://models/,gs://ml-artifacts/team-a/",
        kueue=False,
        namespaces=tuple(WATCHED),
        peering=True,
        max_job_recreations=0,
        operator_metrics_port=8123,
    )


def test_trainer_service_account_lands_where_jobs_run() -> None:
    def accounts(values: dict[str, Any]) -> list[tuple[str, bool]]:
        return [
            (sa["metadata"]["namespace"], sa["automountServiceAccountToken"])
            for sa in of_kind(render(values), "ServiceAccount")
            if sa["metadata"]["name"] == "kubetune-trainer"
        ]

    assert accounts({}) == [(NAMESPACE, False)]
    assert accounts(SCENARIOS["namespaced"]) == [(ns, False) for ns in WATCHED]
    assert accounts({"trainer": {"serviceAccount": {"namespaces": ["ml", "research"]}}}) == [
        ("ml", False),
        ("research", False),
    ]
    assert accounts({"trainer": {"serviceAccount": {"create": False}}}) == []


def test_optional_objects_follow_their_switches() -> None:
    kinds = lambda objs: sorted({o["kind"] for o in objs})
    assert kinds(scenario("defaults")) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "Deployment",
        "ServiceAccount",
    ]
    monitoring = scenario("monitoring")
    assert {"Service", "ServiceMonitor", "PodMonitor", "ConfigMap"} <= set(kinds(monitoring))
    pod_monitor = one(monitoring, "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/managed-by": "kubetune-operator",
        "kubetune.io/role": "train",
    }
    assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}
    assert one(monitoring, "ServiceMonitor")["metadata"]["labels"]["release"] == "prom"
    nothing = render(
        {
            "rbac": {"create": False, "aggregateToDefaultRoles": False},
            "crds": {"install": False},
            "serviceAccount": {"create": False},
            "trainer": {"serviceAccount": {"create": False}},
        }
    )
    assert kinds(nothing) == ["Deployment"]


def test_peering_objects_match_the_operator() -> None:
    cluster = scenario("cluster-wide")
    (peering,) = of_kind(cluster, "ClusterKopfPeering")
    assert peering["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    assert env_of(one(cluster, "Deployment"))["KUBETUNE_PEERING"] == "true"
    crds = {c["metadata"]["name"]: c for c in of_kind(cluster, "CustomResourceDefinition")}
    assert set(crds) == {"finetunejobs.kubetune.io", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    assert all(c["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for c in crds.values())
    namespaced = render({"watch": {"scope": "Namespaced", "namespaces": WATCHED}, "peering": {"enabled": True}})
    assert [p["metadata"]["namespace"] for p in of_kind(namespaced, "KopfPeering")] == WATCHED


def test_network_policies() -> None:
    objs = scenario("network-policy")
    policies = {(p["metadata"]["namespace"], p["metadata"]["name"]): p["spec"] for p in of_kind(objs, "NetworkPolicy")}
    assert set(policies) == {
        (NAMESPACE, "kt-kubetune"),
        ("team-a", "kt-kubetune-trainer"),
        ("team-b", "kt-kubetune-trainer"),
    }
    operator = policies[(NAMESPACE, "kt-kubetune")]
    assert operator["policyTypes"] == ["Ingress", "Egress"]
    assert operator["ingress"] == [
        {
            "ports": [{"protocol": "TCP", "port": 8000}],
            "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        }
    ]
    dns, api, scrape = operator["egress"]
    assert {"protocol": "UDP", "port": 53} in dns["ports"]
    assert api == {"ports": [{"protocol": "TCP", "port": 443}], "to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}]}
    assert scrape["ports"] == [{"protocol": "TCP", "port": 9090}]
    assert scrape["to"][0]["namespaceSelector"]["matchExpressions"][0]["values"] == WATCHED
    trainer = policies[("team-a", "kt-kubetune-trainer")]
    assert trainer["podSelector"] == {"matchLabels": {"app.kubernetes.io/managed-by": "kubetune-operator"}}
    assert trainer["egress"][-1] == {
        "ports": [{"protocol": "TCP", "port": 443}],
        "to": [{"ipBlock": {"cidr": "52.216.0.0/15"}}],
    }
    operator_peer = trainer["ingress"][0]["from"][0]
    assert operator_peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}
    assert operator_peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"


BAD_VALUES: dict[str, tuple[dict[str, Any], str]] = {
    "unknown key": ({"image": {"tga": "v1"}}, "additional properties 'tga'"),
    "unknown top-level key": ({"replicas": 2}, "additional properties 'replicas'"),
    "bad digest": ({"image": {"digest": "sha256:abc"}}, "/image/digest"),
    "bad pull policy": ({"trainer": {"image": {"pullPolicy": "Sometimes"}}}, "/trainer/image/pullPolicy"),
    "scope not an enum value": ({"watch": {"scope": "cluster"}}, "/watch/scope"),
    "namespaced without namespaces": ({"watch": {"scope": "Namespaced"}}, "minItems"),
    "cluster with namespaces": ({"watch": {"namespaces": ["team-a"]}}, "maxItems"),
    "namespace not a DNS label": ({"watch": {"scope": "Namespaced", "namespaces": ["Team_A"]}}, "/watch/namespaces/0"),
    "port out of range": ({"operator": {"metricsPort": 70000}}, "/operator/metricsPort"),
    "negative price": ({"cost": {"gpuPricePerHourUSD": -1}}, "/cost/gpuPricePerHourUSD"),
    "string for a number": ({"cost": {"gridCarbonKgPerKWh": "0.4"}}, "/cost/gridCarbonKgPerKWh"),
    "bad quantity": ({"trainer": {"volumes": {"scratchSizeLimit": "lots"}}}, "/trainer/volumes/scratchSizeLimit"),
    "bad duration": ({"metrics": {"podMonitor": {"interval": "30"}}}, "/metrics/podMonitor/interval"),
    "bad CIDR": (
        {"networkPolicy": {"trainer": {"egressCidrs": ["s3.amazonaws.com"]}}},
        "/networkPolicy/trainer/egressCidrs/0",
    ),
    "prefix with a comma": (
        {"trainer": {"allowedOutputPrefixes": ["s3://a/,s3://b/"]}},
        "/trainer/allowedOutputPrefixes/0",
    ),
    "bool as string": ({"peering": {"enabled": "yes"}}, "/peering/enabled"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_are_rejected(case: str) -> None:
    values, where = BAD_VALUES[case]
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(where)):
        chart().validate_schema(values)
    with pytest.raises(helm_python.HelmValuesError):
        render(values)


def test_endpoints_listen_on_the_pod_ip_by_default() -> None:
    """Issue 14: the liveness and metrics endpoints bind the pod's IP, not 0.0.0.0."""
    (container,) = one(scenario("defaults"), "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    settings = OperatorSettings.from_env({"KUBETUNE_BIND_ADDRESS": env["KUBETUNE_BIND_ADDRESS"]["value"]})
    assert settings.listen_address({"POD_IP": "10.244.1.7"}) == "10.244.1.7"
    assert settings.listen_address({}) == "0.0.0.0"  # outside a pod (kubetune operator on a laptop)
    assert OperatorSettings(bind_address="0.0.0.0").listen_address({"POD_IP": "10.244.1.7"}) == "0.0.0.0"
    assert operator_main.liveness_endpoint(8080, "fd00::7") == "http://[fd00::7]:8080/healthz"
