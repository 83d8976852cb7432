"""spec.serving (issue 20) against a real kube-apiserver with KServe's own CRD installed.

The vendored LLMInferenceService CRD (tests/data/serving/, v1alpha1 only) is installed into the
1.20 server (and the InferenceService CRD, for the objects' schema check), so the object the operator builds passes KServe's real structural schema (pruning
included: a field KServe does not know would be dropped, and the test would see it gone). No
KServe controller and no kube-controller-manager run here: the test stands in for the Job
controller (a pod with the trainer's summary, the Job's Complete condition) and for KServe's
controller (the object's Ready condition and URL, written through its status subresource).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.api import GROUP, PLURAL, VERSION
from kubetune.api.manifest import load_yaml

from tests.k8s_harness import ApiServer, _strip_key, api_request, free_ports
from tests.real.e2e import OperatorProcess, diagnostics, get_json

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data" / "serving"
CRD = DATA / "llminferenceservices.serving.kserve.io.v1alpha1.json"
ISVC_CRD = DATA / "inferenceservices.serving.kserve.io.v1beta1.json"
GOLDEN = DATA / "golden"
LLMISVC = "/apis/serving.kserve.io/v1alpha1/namespaces/{ns}/llminferenceservices"
NAME = "support-bot-kserve"
SERVE = f"{NAME}-serve"
ADAPTER = "s3://models/support-bot-kserve/adapter"


def call(api: ApiServer, method: str, path: str, body: Any = None, merge: bool = False) -> tuple[int, dict[str, Any]]:
    return api_request(
        api.url, api.token, method, path, body, "application/merge-patch+json" if merge else "application/json"
    )


@pytest.fixture(scope="module")
def kserve_crd(apiserver: ApiServer) -> None:
    """POSTed rather than `kubectl apply`d: the CRD (434 KB) is larger than the 256 KiB
    last-applied annotation allows; CEL rules stripped (1.20)."""
    crd = _strip_key(json.loads(CRD.read_text()), "x-kubernetes-validations")
    code, body = call(apiserver, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    assert code in (201, 409), body
    deadline = time.monotonic() + 60
    while True:
        _, got = call(
            apiserver, "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}"
        )
        if any(
            c.get("type") == "Established" and c.get("status") == "True"
            for c in (got.get("status") or {}).get("conditions") or []
        ):
            return
        assert time.monotonic() < deadline, got.get("status")
        time.sleep(0.3)


def wait(api: ApiServer, namespace: str, operator: OperatorProcess, what: str, done: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        operator.check()
        result = done()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}\n" + diagnostics(api.kubeconfig, namespace, operator.tail())
        time.sleep(0.5)


def ftj_status(api: ApiServer, namespace: str) -> dict[str, Any]:
    return get_json(api.kubeconfig, "ftj", NAME, "-n", namespace).get("status") or {}


def succeed(api: ApiServer, namespace: str, job: str) -> None:
    """Stand in for the Job controller and kubelet: a pod the Job controls ends with the trainer's
    summary in its termination message, then the Job gets its Complete condition."""
    _, job_obj = call(api, "GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/{job}")
    ref = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": job,
        "uid": job_obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    labels = {"app.kubernetes.io/managed-by": "kubetune-operator", "job-name": job, "batch.kubernetes.io/job-name": job}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{job}-abcde", "labels": labels, "ownerReferences": [ref]},
        "spec": {"containers": [{"name": "trainer", "image": "trainer"}]},
    }
    code, body = call(api, "POST", f"/api/v1/namespaces/{namespace}/pods", pod)
    assert code == 201, body
    summary = {"status": "succeeded", "steps": 30, "adapter": {"uri": ADAPTER, "sha256": "a" * 64, "bytes": 1234}}
    code, body = call(
        api,
        "PATCH",
        f"/api/v1/namespaces/{namespace}/pods/{job}-abcde/status",
        {
            "status": {
                "phase": "Succeeded",
                "containerStatuses": [
                    {
                        "name": "trainer",
                        "image": "trainer",
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {
                            "terminated": {
                                "exitCode": 0,
                                "message": json.dumps(summary),
                                "startedAt": "2026-01-01T00:00:00Z",
                                "finishedAt": "2026-01-01T01:00:00Z",
                            }
                        },
                    }
                ],
            }
        },
        merge=True,
    )
    assert code == 200, body
    code, body = call(
        api,
        "PATCH",
        f"/apis/batch/v1/namespaces/{namespace}/jobs/{job}/status",
        {
            "status": {
                "startTime": "2026-01-01T00:00:00Z",
                "completionTime": "2026-01-01T01:00:00Z",
                "succeeded": 1,
                "conditions": [
                    {
                        "type": "Complete",
                        "status": "True",
                        "lastTransitionTime": "2026-01-01T01:00:00Z",
                        "lastProbeTime": "2026-01-01T01:00:00Z",
                    }
                ],
            }
        },
        merge=True,
    )
    assert code == 200, body


def test_kserve_object_is_created_after_success_and_its_readiness_reported(
    apiserver: ApiServer, kserve_crd: None, namespace: str, tmp_path: Path
) -> None:
    doc = load_yaml((REPO / "examples" / "serving" / "kserve.yaml").read_text())
    doc["metadata"]["namespace"] = namespace
    doc["spec"]["dataset"]["prevalidate"] = False  # no validation Job: this tier runs no kubelet
    code, created = call(apiserver, "POST", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}", doc)
    assert code == 201, created
    ports = free_ports(2)
    settings = {
        "KUBETUNE_METRICS_SCRAPE_INTERVAL_SECONDS": "0.5",
        "KUBETUNE_METRICS_PORT": str(ports[0]),
        "KUBETUNE_OPERATOR_METRICS_PORT": str(ports[1]),
        "KUBETUNE_SERVING_RECHECK_SECONDS": "1",
    }
    objects = LLMISVC.format(ns=namespace)
    with OperatorProcess(apiserver.kubeconfig, [namespace], tmp_path / "operator.log", settings=settings) as operator:
        job = wait(
            apiserver, namespace, operator, "status.jobName", lambda: ftj_status(apiserver, namespace).get("jobName")
        )
        time.sleep(2)  # four observe ticks while the job is not finished: nothing is served
        assert call(apiserver, "GET", f"{objects}/{SERVE}")[0] == 404
        succeed(apiserver, namespace, job)
        obj = wait(
            apiserver,
            namespace,
            operator,
            "the LLMInferenceService",
            lambda: (lambda r: r[1] if r[0] == 200 else None)(call(apiserver, "GET", f"{objects}/{SERVE}")),
        )
        # what the server stored after pruning with KServe's schema is what the operator built
        assert obj["spec"]["model"]["uri"] == "s3://models/mistral-7b-v0.1"
        assert obj["spec"]["model"]["lora"]["adapters"] == [{"name": "support-bot", "uri": ADAPTER}]
        assert obj["spec"]["template"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
        (ref,) = obj["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["uid"], ref["controller"]) == ("FineTuneJob", created["metadata"]["uid"], True)
        st = wait(
            apiserver,
            namespace,
            operator,
            "status.serving",
            lambda: (lambda s: s if (s.get("serving") or {}).get("kind") else None)(ftj_status(apiserver, namespace)),
        )
        assert st["phase"] == "Succeeded"
        assert st["serving"] == {
            "engine": "kserve",
            "kind": "LLMInferenceService",
            "name": SERVE,
            "model": "support-bot",
            "merged": False,
            "ready": False,
            "message": st["serving"]["message"],
        }
        (cond,) = [c for c in st["conditions"] if c["type"] == "Serving"]
        assert cond["status"] == "False" and cond["reason"] in ("ServingCreated", "ServingNotReady")

        # KServe's controller reports Ready (through the status subresource)
        code, body = call(
            apiserver,
            "PATCH",
            f"{objects}/{SERVE}/status",
            {
                "status": {
                    "url": f"http://{SERVE}.{namespace}.example.com",
                    "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T02:00:00Z"}],
                }
            },
            merge=True,
        )
        assert code == 200, body
        st = wait(
            apiserver,
            namespace,
            operator,
            "status.serving.ready",
            lambda: (lambda s: s if (s.get("serving") or {}).get("ready") else None)(ftj_status(apiserver, namespace)),
        )
        assert st["serving"]["url"] == f"http://{SERVE}.{namespace}.example.com/v1"
        (cond,) = [c for c in st["conditions"] if c["type"] == "Serving"]
        assert (cond["status"], cond["reason"]) == ("True", "ServingReady")

        # and not Ready again: re-read every KUBETUNE_SERVING_RECHECK_SECONDS
        code, body = call(
            apiserver,
            "PATCH",
            f"{objects}/{SERVE}/status",
            {
                "status": {
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "False",
                            "reason": "MinimumReplicasUnavailable",
                            "message": "0/1 replicas available",
                            "lastTransitionTime": "2026-01-01T03:00:00Z",
                        }
                    ]
                }
            },
            merge=True,
        )
        assert code == 200, body
        st = wait(
            apiserver,
            namespace,
            operator,
            "Serving back to ServingNotReady",
            lambda: (
                lambda s: (
                    s
                    if (s.get("serving") or {}).get("ready") is False
                    and (s.get("serving") or {}).get("message") == "0/1 replicas available"
                    else None
                )
            )(ftj_status(apiserver, namespace)),
        )
        (cond,) = [c for c in st["conditions"] if c["type"] == "Serving"]
        assert (cond["status"], cond["reason"]) == ("False", "ServingNotReady")
        operator.check()


def test_every_built_object_is_stored_as_built(apiserver: ApiServer, kserve_crd: None, namespace: str) -> None:
    """The golden objects of every engine (tests/data/serving/golden) created in the real server,
    InferenceService CRD included: nothing refused, nothing pruned (a field in the wrong place of
    KServe's structural schema, or of a 1.20 Deployment, would come back missing)."""
    crd = _strip_key(json.loads(ISVC_CRD.read_text()), "x-kubernetes-validations")
    code, body = call(apiserver, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    assert code in (201, 409), body
    plural = {
        "LLMInferenceService": "llminferenceservices",
        "InferenceService": "inferenceservices",
        "Deployment": "deployments",
        "Service": "services",
    }
    for golden in sorted(GOLDEN.glob("*.yaml")):
        for obj in yaml.safe_load_all(golden.read_text()):
            obj = copy.deepcopy(obj)
            obj["metadata"]["namespace"] = namespace
            root = "/api/v1" if obj["apiVersion"] == "v1" else f"/apis/{obj['apiVersion']}"
            collection = f"{root}/namespaces/{namespace}/{plural[obj['kind']]}"
            obj["metadata"]["name"] = f"{golden.stem}"[:50]
            deadline = time.monotonic() + 30
            while True:  # a CRD just created serves its resource a moment after Established
                code, stored = call(apiserver, "POST", collection, obj)
                if code != 404 or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            assert code == 201, (golden.name, obj["kind"], stored)
            assert_contains(stored["spec"], obj["spec"], f"{golden.name} {obj['kind']}.spec")


def assert_contains(stored: Any, sent: Any, where: str) -> None:
    """Everything sent came back (the server may add defaults, never drop what was sent)."""
    if isinstance(sent, dict):
        assert isinstance(stored, dict), where
        for key, value in sent.items():
            assert key in stored, f"{where}.{key} was pruned"
            assert_contains(stored[key], value, f"{where}.{key}")
    elif isinstance(sent, list):
        assert isinstance(stored, list) and len(stored) == len(sent), where
        for i, (a, b) in enumerate(zip(stored, sent)):
            assert_contains(a, b, f"{where}[{i}]")
    else:
        assert stored == sent, f"{where}: sent {sent!r}, stored {stored!r}"
