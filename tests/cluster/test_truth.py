"""Issue 14 on a real cluster: what the operator reports when real components refuse, wait or stop.

The same situations are reproduced case by case on the kmock emulator (tests/fast/
test_operator_truth.py); here the words come from the real components, so the tests prove the
operator reads what they actually write: the 1.20 API server refusing a PodGroup of a CRD it does
not serve, the Job controller's FailedCreate events (Priority and ServiceAccount admission), the
real scheduler's "Insufficient nvidia.com/gpu", and the Job controller and kubelet stopping a
cancelled job's pod (SIGTERM → a checkpoint). Setup as in test_e2e.py (tests/cluster_harness.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.cluster.conftest import BuiltImages, wait_for
from tests.cluster.e2e import (
    committed_checkpoints,
    explain,
    ftj,
    install_operator,
    job_pods,
    quickstart_on_s3,
    submit,
    watch_phases,
)
from tests.cluster_harness import Cluster
from tests.k8s_harness import kubectl


def reason_of(cluster: Cluster, ns: str, name: str) -> str | None:
    return (ftj(cluster, ns, name).get("status") or {}).get("reason")


def warning_events(cluster: Cluster, ns: str, name: str) -> list[dict[str, Any]]:
    out = kubectl(cluster.kubeconfig, "get", "events", "-n", ns, "-o", "json").stdout
    return [
        e
        for e in json.loads(out)["items"]
        if e["involvedObject"].get("name") == name
        and e["involvedObject"].get("kind") == "FineTuneJob"
        and e["type"] == "Warning"
    ]


def test_refusals_surface_with_the_servers_words(
    cluster: Cluster, images: BuiltImages, cluster_namespace: str, s3_server: str, tmp_path: Path
) -> None:
    """Three refusals no stand-in can produce: a PodGroup of a CRD the server does not serve
    (Volcano not installed: HTTP 404), a PriorityClass that does not exist (the Priority
    admission plugin refuses the pod: FailedCreate), and a namespace whose trainer ServiceAccount
    was deleted (ServiceAccount admission: FailedCreate on the validation Job)."""
    ns, admin = cluster_namespace, cluster.kubeconfig
    with install_operator(cluster, images, ns) as operator:
        volcano = quickstart_on_s3(
            cluster,
            ns,
            s3_server,
            name="gang",
            overrides={"spec.scheduling": {"schedulerName": "volcano"}, "spec.dataset.prevalidate": False},
        )
        submit(cluster, ns, volcano, tmp_path)
        final, _ = watch_phases(cluster, ns, "gang", timeout=120, operator=operator)
        status = final["status"]
        assert status["phase"] == "Failed" and status["reason"] == "CRDMissing", explain(cluster, ns)
        assert "install Volcano" in status["message"] and status["error"]["param"] == "spec.scheduling.schedulerName"
        assert json.loads(kubectl(admin, "get", "jobs", "-n", ns, "-o", "json").stdout)["items"] == []
        assert any(e["reason"] == "CRDMissing" for e in warning_events(cluster, ns, "gang"))

        priority = quickstart_on_s3(
            cluster,
            ns,
            s3_server,
            name="vip",
            overrides={"spec.scheduling": {"priorityClassName": "no-such-class"}, "spec.dataset.prevalidate": False},
        )
        submit(cluster, ns, priority, tmp_path)
        wait_for(
            "reason PodCreationFailed",
            lambda: reason_of(cluster, ns, "vip") == "PodCreationFailed",
            120,
            interval=1.0,
            diagnose=lambda: explain(cluster, ns),
        )
        status = ftj(cluster, ns, "vip")["status"]
        assert status["phase"] == "Pending" and "no-such-class" in status["message"], status
        assert "startTime" not in status  # nothing started: the spec stays editable
        kubectl(admin, "delete", "ftj", "vip", "-n", ns, "--wait=false")

        kubectl(admin, "delete", "serviceaccount", "kubetune-trainer", "-n", ns)
        nosa = quickstart_on_s3(cluster, ns, s3_server, name="nosa")
        submit(cluster, ns, nosa, tmp_path)
        wait_for(
            "reason ServiceAccountMissing",
            lambda: reason_of(cluster, ns, "nosa") == "ServiceAccountMissing",
            120,
            interval=1.0,
            diagnose=lambda: explain(cluster, ns),
        )
        status = ftj(cluster, ns, "nosa")["status"]
        assert status["phase"] == "Validating" and "kubetune-trainer" in status["message"], status
        assert "trainer.namespaces" in status["message"]
        assert any(e["reason"] == "ServiceAccountMissing" for e in warning_events(cluster, ns, "nosa"))
        operator.check()


def test_unschedulable_then_fixed_by_editing_the_spec(
    cluster: Cluster, images: BuiltImages, cluster_namespace: str, s3_server: str, tmp_path: Path
) -> None:
    """A GPU on a node without one: the real scheduler's message, phase Pending, no startTime (so the
    CEL rule still lets the user edit resources); the edit rebuilds the Job, which trains."""
    ns, admin = cluster_namespace, cluster.kubeconfig
    doc = quickstart_on_s3(
        cluster,
        ns,
        s3_server,
        name="greedy",
        overrides={"spec.resources": {"gpus": 1}, "spec.dataset.prevalidate": False},
    )
    with install_operator(cluster, images, ns) as operator:
        submit(cluster, ns, doc, tmp_path)
        wait_for(
            "reason Unschedulable",
            lambda: reason_of(cluster, ns, "greedy") == "Unschedulable",
            120,
            interval=1.0,
            diagnose=lambda: explain(cluster, ns),
        )
        status = ftj(cluster, ns, "greedy")["status"]
        assert status["phase"] == "Pending" and "Insufficient nvidia.com/gpu" in status["message"], status
        assert "startTime" not in status and not any(c["type"] == "Running" for c in status["conditions"])
        assert any(e["reason"] == "Unschedulable" for e in warning_events(cluster, ns, "greedy"))
        old_uid = json.loads(kubectl(admin, "get", "job", "greedy-train", "-n", ns, "-o", "json").stdout)["metadata"][
            "uid"
        ]

        kubectl(
            admin,
            "patch",
            "ftj",
            "greedy",
            "-n",
            ns,
            "--type=merge",
            "-p",
            json.dumps({"spec": {"resources": {"gpus": 0}}}),
        )
        final, phases = watch_phases(cluster, ns, "greedy", timeout=600, operator=operator)
        job = json.loads(kubectl(admin, "get", "job", "greedy-train", "-n", ns, "-o", "json").stdout)
    assert final["status"]["phase"] == "Succeeded", explain(cluster, ns)
    assert job["metadata"]["uid"] != old_uid  # rebuilt from the edited spec
    assert "nvidia.com/gpu" not in json.dumps(job["spec"]["template"]["spec"]["containers"][0]["resources"])
    assert final["status"]["specConfigMap"].startswith("greedy-spec-")
    assert "Running" in phases, phases


def test_cancel_keeps_the_record_and_a_checkpoint(
    cluster: Cluster, images: BuiltImages, cluster_namespace: str, s3_server: str, tmp_path: Path
) -> None:
    """spec.cancel on a running job: the Job is deleted, the kubelet stops the pod with SIGTERM,
    the trainer commits a checkpoint on its way out, and the FineTuneJob stays, Cancelled."""
    ns, admin = cluster_namespace, cluster.kubeconfig
    doc = quickstart_on_s3(
        cluster,
        ns,
        s3_server,
        name="stopme",
        overrides={
            "spec.hyperparameters.epochs": 20,
            "spec.checkpointing": {"everySteps": 1000, "keep": 2},
            "spec.dataset.prevalidate": False,
        },
    )
    output = doc["spec"]["output"]["uri"]
    with install_operator(cluster, images, ns) as operator:
        submit(cluster, ns, doc, tmp_path)
        wait_for(
            "training to report progress",
            lambda: ((ftj(cluster, ns, "stopme").get("status") or {}).get("progress") or {}).get("step", 0) > 0,
            300,
            interval=1.0,
            diagnose=lambda: explain(cluster, ns),
        )
        assert committed_checkpoints(s3_server, output) == []  # everySteps 1000: none yet
        kubectl(admin, "patch", "ftj", "stopme", "-n", ns, "--type=merge", "-p", json.dumps({"spec": {"cancel": True}}))
        final, _ = watch_phases(cluster, ns, "stopme", timeout=120, operator=operator)
        wait_for(
            "the Job and its pod to go",
            lambda: (
                not job_pods(cluster, ns, "stopme-train")
                and kubectl(admin, "get", "job", "stopme-train", "-n", ns, check=False).returncode != 0
            ),
            180,
            interval=1.0,
            diagnose=lambda: explain(cluster, ns),
        )
        refused = kubectl(
            admin,
            "patch",
            "ftj",
            "stopme",
            "-n",
            ns,
            "--type=merge",
            "-p",
            json.dumps({"spec": {"cancel": False}}),
            check=False,
        )
    status = final["status"]
    assert status["phase"] == "Cancelled" and status["reason"] == "CancelledByUser", status
    assert committed_checkpoints(s3_server, output), "SIGTERM should have committed a checkpoint"
    assert refused.returncode != 0 and "cancel cannot be undone" in refused.stderr, refused.stderr
    assert ftj(cluster, ns, "stopme")["status"]["phase"] == "Cancelled"
