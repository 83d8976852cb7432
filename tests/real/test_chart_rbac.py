"""The quickstart runs end to end with the operator holding only the Helm chart's Role (RELIABILITY O11).

tests/chart proves offline that the chart grants exactly the calls in
tests/data/operator-api-usage.json. This is the other half, on the real apiserver tier with RBAC
and OwnerReferencesPermissionEnforcement on: the chart is rendered (namespaced scope, watching
the test's namespace; the operator's ServiceAccount `kubetune-system/kubetune-operator`, the
identity the harness has a token for), its ServiceAccounts, Role, RoleBinding and CRD are
applied with the real kubectl (the CRD with CEL stripped: 1.20), and the operator runs the
quickstart (tests/real/e2e.py) as that ServiceAccount, with the environment the chart's
Deployment gives it. It must succeed without a single Forbidden; and the same identity must be
refused what the chart never grants.

tests/cluster/test_e2e.py runs the operator as a pod of its image under this same Role, with a
token minted by the real token controller; this test keeps the stand-in because it also asserts,
with SelfSubjectAccessReviews, what the Role refuses, on the tier where a run costs seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.chart.render import CHART, NAMESPACE, env_of, one, render
from tests.k8s_harness import OPERATOR_SERVICE_ACCOUNT, ApiServer, install_crd, kubectl
from tests.real.e2e import QuickstartTrace, run_quickstart

RELEASE_NAMESPACE, OPERATOR_SA = OPERATOR_SERVICE_ACCOUNT
RBAC_KINDS = ("ServiceAccount", "Role", "RoleBinding")


def rendered(namespace: str) -> list[dict[str, Any]]:
    """The chart as `helm install kubetune -n kubetune-system` renders it for one watched namespace."""
    values = {"watch": {"scope": "Namespaced", "namespaces": [namespace]}, "serviceAccount": {"name": OPERATOR_SA}}
    return render(values, name="kubetune", namespace=RELEASE_NAMESPACE)


def apply(kubeconfig: Path, objs: list[dict[str, Any]]) -> None:
    kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}))


def allowed(kubeconfig: Path, verb: str, group: str, resource: str, namespace: str | None) -> bool:
    """The apiserver's own answer (a SelfSubjectAccessReview: no discovery, so kinds whose CRD is
    not installed here, such as Volcano's PodGroup, are asked about exactly as written)."""
    base, _, sub = resource.partition("/")
    attributes = {"verb": verb, "group": group, "resource": base, "subresource": sub}
    if namespace:
        attributes["namespace"] = namespace
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": attributes},
    }
    out = kubectl(kubeconfig, "create", "-o", "json", "-f", "-", input=json.dumps(review)).stdout
    return bool(json.loads(out)["status"].get("allowed"))


def test_quickstart_runs_under_the_charts_role(
    apiserver: ApiServer, namespace: str, s3_server: str, tmp_path: Path
) -> None:
    assert RELEASE_NAMESPACE == NAMESPACE and (CHART / "Chart.yaml").exists()
    admin = apiserver.kubeconfig
    objs = rendered(namespace)
    kubectl(admin, "create", "namespace", RELEASE_NAMESPACE, check=False)  # shared by the session's tests
    install_crd(admin, json.dumps(one(objs, "CustomResourceDefinition")))
    apply(admin, [o for o in objs if o["kind"] in RBAC_KINDS])

    role = one(objs, "Role")
    assert role["metadata"]["namespace"] == namespace
    binding = one(objs, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": RELEASE_NAMESPACE}]
    trainer_sa = kubectl(admin, "get", "serviceaccount", "kubetune-trainer", "-n", namespace, "-o", "json").stdout
    assert json.loads(trainer_sa)["automountServiceAccountToken"] is False

    operator = apiserver.service_account_kubeconfig(RELEASE_NAMESPACE, OPERATOR_SA)
    # What the Role grants, the apiserver grants; what it does not, the apiserver refuses.
    granted = [
        (v, g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
    ]
    assert len(granted) >= 10
    assert [t for t in granted if not allowed(operator, *t, namespace)] == []
    refused = [
        ("get", "", "secrets", namespace),
        ("list", "", "secrets", namespace),
        ("create", "", "pods", namespace),
        ("delete", "", "pods", namespace),
        ("delete", "", "configmaps", namespace),
        ("create", "batch", "jobs", "default"),
        ("list", "kubetune.io", "finetunejobs", None),
        ("create", "rbac.authorization.k8s.io", "rolebindings", namespace),
        ("escalate", "rbac.authorization.k8s.io", "roles", namespace),
        ("impersonate", "", "serviceaccounts", namespace),
        ("list", "", "namespaces", None),
        ("list", "apiextensions.k8s.io", "customresourcedefinitions", None),
    ]
    assert [t for t in refused if allowed(operator, *t)] == []

    # The operator with the Deployment's environment, except what run_quickstart chooses: free
    # ports (several operators run on this machine over a session) and a fast scrape interval.
    env = {k: v for k, v in env_of(one(objs, "Deployment")).items() if k.startswith("KUBETUNE_")}
    assert env["KUBETUNE_NAMESPACES"] == namespace
    for key in ("KUBETUNE_METRICS_PORT", "KUBETUNE_OPERATOR_METRICS_PORT", "KUBETUNE_METRICS_SCRAPE_INTERVAL_SECONDS"):
        env.pop(key)

    trace = QuickstartTrace()
    status = run_quickstart(
        apiserver, namespace, kubeconfig=operator, s3=s3_server, operator_settings=env, work_dir=tmp_path, trace=trace
    )
    assert status["phase"] == "Succeeded"
    assert status["adapter"]["uri"] == "s3://kubetune-demo/quickstart/adapter"
    log = trace.operator_log.read_text(errors="replace") if trace.operator_log else ""
    denied = [line for line in log.splitlines() if "Forbidden" in line or " 403" in line or "forbidden" in line]
    assert denied == [], "\n".join(denied[:20])


@pytest.mark.parametrize("kind", RBAC_KINDS)
def test_rendered_objects_apply(apiserver: ApiServer, namespace: str, kind: str) -> None:
    """Each kind the proof applies is accepted by the real apiserver's validation (server dry run)."""
    objs = [o for o in rendered(namespace) if o["kind"] == kind]
    assert objs
    kubectl(apiserver.kubeconfig, "create", "namespace", RELEASE_NAMESPACE, check=False)
    doc = json.dumps({"apiVersion": "v1", "kind": "List", "items": objs})
    kubectl(apiserver.kubeconfig, "apply", "--dry-run=server", "-f", "-", input=doc)
