"""The Job controller / kubelet stand-in, against the real apiserver.

The stand-in exists for what the cluster tier's 1.20 Job controller cannot do (Job ``suspend``,
Indexed completion, ``podFailurePolicy``, the ≥ 1.31 terminal conditions); these tests keep it
honest: pods, status and conditions shaped as a current Job controller and kubelet write them.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.k8s_harness import ApiServer, kubectl
from tests.standin_kubelet import StandinKubelet

SCRIPT = """
import os, sys
with open(os.environ["KUBETUNE_TERMINATION_PATH"], "w") as f:
    f.write(f"{os.environ['GREETING']} from {os.environ['POD_NAME']}/{os.environ['POD_NAMESPACE']}"
            f" token={os.environ['API_TOKEN']} arg={sys.argv[1]}")
print("hello on stdout")
print("hello on stderr", file=sys.stderr)
sys.exit(int(os.environ["EXIT_CODE"]))
"""


def job_manifest(name: str, exit_code: int) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {"app": "standin-test"}},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"role": "trainer"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "trainer",
                            "image": "ghcr.io/kubetune/trainer:test",
                            "command": ["python", "-c", SCRIPT],
                            "args": ["$(GREETING)-arg"],
                            "env": [
                                {"name": "GREETING", "value": "hello"},
                                {"name": "EXIT_CODE", "value": str(exit_code)},
                                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                                {
                                    "name": "POD_NAMESPACE",
                                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                                },
                                {"name": "API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                            ],
                        }
                    ],
                },
            },
        },
    }


def get(api: ApiServer, *args: str) -> dict[str, Any]:
    return json.loads(kubectl(api.kubeconfig, "get", "-o", "json", *args).stdout)


@pytest.fixture
def kubelet(apiserver: ApiServer, tmp_path: Path) -> Iterator[StandinKubelet]:
    with StandinKubelet(apiserver.kubeconfig, log_dir=tmp_path / "logs") as k:
        yield k


@pytest.fixture
def secret(apiserver: ApiServer, namespace: str) -> None:
    data = base64.b64encode(b"s3cr3t").decode()
    doc = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "data": {"token": data}}
    kubectl(apiserver.kubeconfig, "apply", "-n", namespace, "-f", "-", input=json.dumps(doc))


@pytest.mark.parametrize("exit_code", [0, 3])
def test_run_job(apiserver: ApiServer, namespace: str, kubelet: StandinKubelet, secret: None, exit_code: int) -> None:
    name = f"train-{exit_code}"
    kubectl(apiserver.kubeconfig, "apply", "-n", namespace, "-f", "-", input=json.dumps(job_manifest(name, exit_code)))
    # No kube-controller-manager in this tier: the Job alone makes no Pod.
    assert get(apiserver, "pods", "-n", namespace)["items"] == []

    run = kubelet.run_job(name, namespace)

    ok = exit_code == 0
    assert run.succeeded is ok and len(run.pods) == 1
    pod_name = run.pods[0].pod_name
    expected = f"hello from {pod_name}/{namespace} token=s3cr3t arg=hello-arg"
    assert run.exit_code == exit_code and run.termination_message == expected
    log = run.pods[0].log_path.read_text()
    assert "hello on stdout" in log and "hello on stderr" in log

    job = get(apiserver, "job", name, "-n", namespace)
    pods = get(apiserver, "pods", "-n", namespace, "-l", f"job-name={name}")["items"]
    assert [p["metadata"]["name"] for p in pods] == [pod_name]
    pod = pods[0]

    # The pod as the Job controller would have made it.
    assert pod_name.startswith(f"{name}-") and len(pod_name) == len(name) + 6
    labels = pod["metadata"]["labels"]
    uid = job["metadata"]["uid"]
    assert labels["job-name"] == labels["batch.kubernetes.io/job-name"] == name
    assert labels["controller-uid"] == uid and labels["role"] == "trainer"
    (owner,) = pod["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("Job", name, uid, True)

    # ... and as the kubelet would have left it.
    assert pod["status"]["phase"] == ("Succeeded" if ok else "Failed")
    (cs,) = pod["status"]["containerStatuses"]
    term = cs["state"]["terminated"]
    assert term["exitCode"] == exit_code
    assert term["reason"] == ("Completed" if ok else "Error")
    assert term["message"] == expected

    status = job["status"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert status.get("active", 0) == 0 and status["startTime"]
    if ok:
        assert status["succeeded"] == 1 and "failed" not in status
        assert conditions["Complete"]["status"] == "True"
        assert "Failed" not in conditions
        assert status["completionTime"] >= status["startTime"]
    else:
        assert status["failed"] == 1 and "succeeded" not in status
        assert conditions["Failed"]["status"] == "True"
        assert conditions["Failed"]["reason"] == "BackoffLimitExceeded"
        assert "Complete" not in conditions and "completionTime" not in status


def test_backoff_limit_retries(apiserver: ApiServer, namespace: str, kubelet: StandinKubelet, secret: None) -> None:
    manifest = job_manifest("flaky", 2)
    manifest["spec"]["backoffLimit"] = 1
    kubectl(apiserver.kubeconfig, "apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    run = kubelet.run_job("flaky", namespace)
    assert not run.succeeded and [p.exit_code for p in run.pods] == [2, 2]
    job = get(apiserver, "job", "flaky", "-n", namespace)
    assert job["status"]["failed"] == 2
    pods = get(apiserver, "pods", "-n", namespace, "-l", "job-name=flaky")["items"]
    assert sorted(p["status"]["phase"] for p in pods) == ["Failed", "Failed"]


def test_steps_and_intermediate_states(apiserver: ApiServer, namespace: str, kubelet: StandinKubelet) -> None:
    """The building blocks one by one, as an operator test drives them; also url + token."""
    manifest = job_manifest("steps", 0)
    manifest["spec"]["template"]["spec"]["containers"][0]["env"] = [{"name": "X", "value": "1"}]
    manifest["spec"]["template"]["spec"]["containers"][0]["command"] = [
        sys.executable,
        "-c",
        "import sys; print('boom', file=sys.stderr); sys.exit(7)",
    ]
    manifest["spec"]["template"]["spec"]["containers"][0]["args"] = []
    manifest["spec"]["template"]["spec"]["containers"][0]["terminationMessagePolicy"] = "FallbackToLogsOnError"
    kubectl(apiserver.kubeconfig, "apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    with StandinKubelet(url=apiserver.url, token=apiserver.token, log_dir=kubelet.log_dir) as k:
        pod = k.pod_for("steps", namespace)
        pod = k.set_pod_phase(pod, "Pending")
        assert k.read_pod(pod["metadata"]["name"], namespace)["status"]["phase"] == "Pending"
        pod = k.set_pod_phase(pod, "Running")
        got = k.read_pod(pod["metadata"]["name"], namespace)["status"]
        assert got["phase"] == "Running" and "running" in got["containerStatuses"][0]["state"]
        job = k.set_job_status("steps", namespace, active=1, start_time="2024-05-01T10:00:00Z")
        assert job["status"] == {"active": 1, "startTime": "2024-05-01T10:00:00Z"}
        code, message = k.run_container(pod)
        assert code == 7 and message == "boom"  # no message written: the log's tail
        k.finish_pod(pod, 137, "OOMKilled-ish")
        term = k.read_pod(pod["metadata"]["name"], namespace)["status"]["containerStatuses"][0]["state"]["terminated"]
        assert (term["exitCode"], term["message"]) == (137, "OOMKilled-ish")
