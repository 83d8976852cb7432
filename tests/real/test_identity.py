"""The real tier's ServiceAccount identity and ownerReference admission, on which RBAC proofs rest.

Without a kube-controller-manager no ServiceAccount gets a token, so the harness registers the
chart's operator identity (``system:serviceaccount:kubetune-system:kubetune-operator``) in the
apiserver's static token file; RoleBindings to that ServiceAccount then apply as on a cluster.
The apiserver also runs OwnerReferencesPermissionEnforcement, so a child created with
``blockOwnerDeletion: true`` (as kubetune's builders render) needs ``update`` on
``finetunejobs/finalizers``: the Helm chart's Role must grant it, and this tier notices if not.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubetune.api import GROUP, PLURAL

from tests.k8s_harness import (
    OPERATOR_SERVICE_ACCOUNT,
    ApiServer,
    kubectl,
    service_account_username,
)
from tests.real.e2e import quickstart_manifest

SA_NAMESPACE, SA_NAME = OPERATOR_SERVICE_ACCOUNT


def apply(api: ApiServer, namespace: str, *docs: dict[str, Any]) -> None:
    kubectl(
        api.kubeconfig,
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(docs)}),
    )


def role(name: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": name}, "rules": rules}


def binding(name: str, role_name: str, subject: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role_name},
        "subjects": [subject],
    }


SA_SUBJECT = {"kind": "ServiceAccount", "name": SA_NAME, "namespace": SA_NAMESPACE}


def test_service_account_identity(apiserver: ApiServer, namespace: str) -> None:
    """The token authenticates as the ServiceAccount (user name and groups) and RBAC applies."""
    sa_kubeconfig = apiserver.service_account_kubeconfig(SA_NAMESPACE, SA_NAME)
    denied = kubectl(sa_kubeconfig, "get", "configmaps", "-n", namespace, check=False)
    user = service_account_username(SA_NAMESPACE, SA_NAME)
    assert denied.returncode != 0 and f'User "{user}" cannot list resource "configmaps"' in denied.stderr

    # Bound as a ServiceAccount subject...
    apply(
        apiserver,
        namespace,
        role("read-cm", [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}]),
        binding("sa-reads-cm", "read-cm", SA_SUBJECT),
    )
    assert kubectl(sa_kubeconfig, "get", "configmaps", "-n", namespace).returncode == 0
    # ... and through its group, as for a real ServiceAccount token.
    apply(
        apiserver,
        namespace,
        role("read-secrets", [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]}]),
        binding(
            "group-reads-secrets",
            "read-secrets",
            {
                "kind": "Group",
                "name": f"system:serviceaccounts:{SA_NAMESPACE}",
                "apiGroup": "rbac.authorization.k8s.io",
            },
        ),
    )
    assert kubectl(sa_kubeconfig, "get", "secrets", "-n", namespace).returncode == 0
    # kubectl's impersonation of the same identity agrees (for `auth can-i` checks).
    can = kubectl(
        apiserver.kubeconfig,
        "auth",
        "can-i",
        "list",
        "secrets",
        "-n",
        namespace,
        f"--as={user}",
        f"--as-group=system:serviceaccounts:{SA_NAMESPACE}",
        check=False,
    )
    assert can.stdout.strip() == "yes"

    with pytest.raises(KeyError, match="registered: kubetune-system/kubetune-operator"):
        apiserver.service_account_kubeconfig("default", "someone-else")


def test_block_owner_deletion_needs_finalizers_permission(apiserver: ApiServer, namespace: str) -> None:
    """OwnerReferencesPermissionEnforcement: a Job owned by a FineTuneJob with blockOwnerDeletion
    (as the operator creates it) is refused without ``update`` on ``finetunejobs/finalizers``."""
    kubectl(apiserver.kubeconfig, "apply", "-n", namespace, "-f", "-", input=json.dumps(quickstart_manifest(None)))
    owner = json.loads(kubectl(apiserver.kubeconfig, "get", "ftj", "quickstart", "-n", namespace, "-o", "json").stdout)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": "owned",
            "ownerReferences": [
                {
                    "apiVersion": owner["apiVersion"],
                    "kind": owner["kind"],
                    "name": "quickstart",
                    "uid": owner["metadata"]["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}}},
    }
    apply(
        apiserver,
        namespace,
        role(
            "jobs",
            [
                {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get"]},
                {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get"]},
            ],
        ),
        binding("sa-jobs", "jobs", SA_SUBJECT),
    )
    sa_kubeconfig = apiserver.service_account_kubeconfig(SA_NAMESPACE, SA_NAME)

    refused = kubectl(sa_kubeconfig, "create", "-n", namespace, "-f", "-", input=json.dumps(job), check=False)
    assert refused.returncode != 0
    assert (
        "cannot set blockOwnerDeletion if an ownerReference refers to a resource you can't set finalizers on"
        in refused.stderr
    )

    apply(
        apiserver,
        namespace,
        role("finalizers", [{"apiGroups": [GROUP], "resources": [f"{PLURAL}/finalizers"], "verbs": ["update"]}]),
        binding("sa-finalizers", "finalizers", SA_SUBJECT),
    )
    kubectl(sa_kubeconfig, "create", "-n", namespace, "-f", "-", input=json.dumps(job))
