"""The README's flow on a real cluster: kubectl apply → the operator pod → real Jobs → real pods of
the trainer image → S3 → Succeeded. And the three ways a run goes wrong that only real components
show: a permanent failure (no retries), a pod killed mid-training (the real Job controller
replaces it; the new pod resumes), and a deleted FineTuneJob (the real garbage collector).

What is real here: kubectl; the API server (1.20) and, for FineTuneJobs, the 1.36 CRD server with
CEL; RBAC (the operator authenticates with its ServiceAccount token, minted by the token
controller, and holds only the chart's Role); the Job controller, garbage collector and
scheduler; the kubelet running Docker containers of the images built from our Dockerfiles. What
is not: S3 is moto on loopback; the trainer image's base is Debian with CPU torch, not CUDA; pods
use the host network (no CNI). See tests/cluster_harness.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.cluster.conftest import BuiltImages, wait_for
from tests.cluster.e2e import (
    committed_checkpoints,
    container_of,
    explain,
    ftj,
    install_operator,
    job_pods,
    quickstart_on_s3,
    sleep_past_backoff,
    submit,
    watch_phases,
)
from tests.cluster_harness import Cluster
from tests.k8s_harness import kubectl
from tests.real.e2e import parse_table, s3_client, verify_output


def test_quickstart_in_real_pods(
    cluster: Cluster, images: BuiltImages, cluster_namespace: str, s3_server: str, tmp_path: Path
) -> None:
    ns, admin = cluster_namespace, cluster.kubeconfig
    doc = quickstart_on_s3(cluster, ns, s3_server)
    rows: list[dict[str, str]] = []

    def capture_running(obj: dict) -> None:
        status = obj.get("status") or {}
        percent = (status.get("progress") or {}).get("percent")
        if not rows and status.get("phase") == "Running" and percent and 0 < percent < 100:
            rows.extend(parse_table(kubectl(admin, "get", "ftj", "-n", ns).stdout))

    with install_operator(cluster, images, ns) as operator:
        submit(cluster, ns, doc, tmp_path)
        final, phases = watch_phases(
            cluster, ns, "quickstart", timeout=600, on_status=capture_running, operator=operator
        )
        operator_log = operator.log()
    status = final["status"]
    assert status["phase"] == "Succeeded", explain(cluster, ns)
    assert phases[0] == "Validating" and phases[-1] == "Succeeded" and "Running" in phases, phases
    assert rows and rows[0]["PHASE"] == "Running", rows  # kubectl get ftj while it trained
    assert status["adapter"]["uri"] == f"{doc['spec']['output']['uri']}/adapter", status
    assert status["metrics"]["evalLoss"] < status["metrics"]["baseEvalLoss"], status["metrics"]
    verified = verify_output(doc["spec"]["output"]["uri"], s3_server)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    # Real pods of the built images ran it: the validation and the training Job each had one.
    for job, image in (("quickstart-validate", images.trainer), ("quickstart-train", images.trainer)):
        (pod,) = job_pods(cluster, ns, job)
        assert pod["status"]["phase"] == "Succeeded" and pod["spec"]["nodeName"] == "localhost", pod["status"]
        assert pod["spec"]["containers"][0]["image"] == image
        assert pod["status"]["containerStatuses"][0]["containerID"].startswith("docker://")
    logs = kubectl(admin, "logs", "-n", ns, "job/quickstart-train").stdout
    assert "training:" in logs and "saving the adapter" in logs, logs[-2000:]
    # The operator pod (the chart's Deployment, the built image) logs what it does.
    assert "Handler 'children' succeeded" in operator_log, operator_log[-2000:]


def test_permanent_failure_fails_at_once_without_retries(
    cluster: Cluster, images: BuiltImages, cluster_namespace: str, s3_server: str, tmp_path: Path
) -> None:
    """A dataset the trainer refuses (a conversation with no assistant turn at line 3) and no
    prevalidation: the trainer pod exits with the permanent code, and the FineTuneJob fails at
    once with the trainer's reason and FILE:LINE message, without using its retries.

    What 1.20 shows that a stand-in hid: it prunes podFailurePolicy, and its Job controller
    starts a replacement pod the moment the first one fails (no back-off before the first retry).
    The operator then ends the Job itself (activeDeadlineSeconds in the past), so the replacement
    is stopped within about one scrape interval instead of failing backoffLimit times. Clusters with
    podFailurePolicy (Kubernetes >= 1.26) fail the Job on the first exit with no replacement at
    all; 1.20 cannot show that, so tests/real and tests/fast cover it with the stand-in Job
    controller."""
    ns = cluster_namespace
    doc = quickstart_on_s3(cluster, ns, s3_server, name="bad-data", overrides={"spec.dataset.prevalidate": False})
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    bad = "\n".join(
        [good] * 2 + [json.dumps({"messages": [{"role": "user", "content": "only a question"}]})] + [good] * 60
    )
    s3_client(s3_server).put_object(Bucket="kubetune-demo", Key=f"{ns}/data/bad.jsonl", Body=bad.encode())
    doc["spec"]["dataset"]["train"] = f"s3://kubetune-demo/{ns}/data/bad.jsonl"
    with install_operator(cluster, images, ns, scrape_interval=1.0) as operator:
        submit(cluster, ns, doc, tmp_path)
        final, phases = watch_phases(cluster, ns, "bad-data", timeout=300, operator=operator)
        sleep_past_backoff()  # the Job controller's later retries come after 10 s, 20 s, ...
        # A replacement still being stopped (deletionTimestamp set) is gone a moment later.
        pods = wait_for(
            "the replacement pod to be stopped",
            lambda: (
                [p for p in job_pods(cluster, ns, "bad-data-train") if not p["metadata"].get("deletionTimestamp")]
                or None
            ),
            60,
        )
        job = json.loads(kubectl(cluster.kubeconfig, "get", "job", "bad-data-train", "-n", ns, "-o", "json").stdout)
    status = final["status"]
    assert status["phase"] == "Failed", (phases, explain(cluster, ns))
    (failed,) = [c for c in status["conditions"] if c["type"] == "Failed"]
    assert failed["reason"] == "InvalidData", failed
    assert "bad.jsonl:3" in failed["message"], failed["message"]  # the trainer's own message, file:line
    assert status.get("retries", 0) == 0, status
    first = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert first["exitCode"] == 3, first
    # The operator ended the Job: no retry beyond the immediate replacement, which was stopped.
    assert "podFailurePolicy" not in job["spec"] and job["spec"]["activeDeadlineSeconds"] == 1, job["spec"]
    assert any(c["type"] == "Failed" and c["status"] == "True" for c in job["status"]["conditions"]), job["status"]
    assert len(pods) <= 2 and job["status"].get("failed", 0) <= 2, [p["metadata"]["name"] for p in pods]
    for replacement in pods[1:]:  # stopped by the Job controller at the deadline, or failed the same way
        assert replacement["status"]["phase"] == "Failed", replacement["status"]


def test_killed_pod_is_replaced_and_resumes(
    cluster: Cluster, images: BuiltImages, cluster_namespace: str, s3_server: str, tmp_path: Path
) -> None:
    """The trainer container is SIGKILLed after a checkpoint was committed; the real Job
    controller starts a new pod, which resumes from that checkpoint and finishes."""
    ns, admin = cluster_namespace, cluster.kubeconfig
    doc = quickstart_on_s3(
        cluster,
        ns,
        s3_server,
        name="killed",
        overrides={
            "spec.hyperparameters.epochs": 3,
            "spec.checkpointing": {"everySteps": 5, "keep": 2},
            "spec.dataset.prevalidate": False,
        },
    )
    output = doc["spec"]["output"]["uri"]
    with install_operator(cluster, images, ns) as operator:
        submit(cluster, ns, doc, tmp_path)
        wait_for(
            "a committed checkpoint",
            lambda: committed_checkpoints(s3_server, output),
            300,
            interval=0.5,
            diagnose=lambda: explain(cluster, ns),
        )
        (first,) = job_pods(cluster, ns, "killed-train")
        cluster.docker.docker("kill", "--signal=KILL", container_of(cluster, first))
        resumed_from = max(committed_checkpoints(s3_server, output))
        final, _ = watch_phases(cluster, ns, "killed", timeout=600, operator=operator)
        pods = job_pods(cluster, ns, "killed-train")
        second_log = kubectl(admin, "logs", "-n", ns, pods[-1]["metadata"]["name"]).stdout if len(pods) > 1 else ""
    status = final["status"]
    assert status["phase"] == "Succeeded", explain(cluster, ns)
    assert len(pods) == 2, [p["metadata"]["name"] for p in pods]
    killed = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert killed["exitCode"] == 137 and pods[0]["status"]["phase"] == "Failed", killed
    assert pods[1]["status"]["phase"] == "Succeeded"
    resumed = [
        int(line.rsplit(" ", 1)[1]) for line in second_log.splitlines() if "resuming from checkpoint step" in line
    ]
    assert resumed and resumed[0] >= resumed_from, second_log[-2000:]
    assert status["retries"] == 1, status
    verified = verify_output(output, s3_server)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_deleting_the_finetunejob_collects_job_and_pods(
    cluster: Cluster, images: BuiltImages, cluster_namespace: str, s3_server: str, tmp_path: Path
) -> None:
    """ownerReferences across the aggregation boundary: the Job (1.20) is owned by the FineTuneJob
    (1.36 CRD server); the real garbage collector removes the Job, then its pods."""
    ns, admin = cluster_namespace, cluster.kubeconfig
    doc = quickstart_on_s3(
        cluster,
        ns,
        s3_server,
        name="deleted",
        overrides={"spec.hyperparameters.epochs": 5, "spec.dataset.prevalidate": False},
    )
    with install_operator(cluster, images, ns) as operator:
        submit(cluster, ns, doc, tmp_path)
        watch_phases(cluster, ns, "deleted", timeout=300, until=("Running",), operator=operator)
        wait_for("the trainer pod", lambda: job_pods(cluster, ns, "deleted-train"), 60)
        started = time.monotonic()
        kubectl(admin, "delete", "ftj", "deleted", "-n", ns, "--wait=true", "--timeout=60s", timeout=90)

        marks: dict[str, float] = {}

        def gone() -> bool:
            jobs = json.loads(kubectl(admin, "get", "jobs", "-n", ns, "-o", "json").stdout)["items"]
            if not jobs:
                marks.setdefault("job", time.monotonic() - started)
            return not jobs and not job_pods(cluster, ns, "deleted-train")

        wait_for(
            "the Job and its pods to be garbage-collected",
            gone,
            180,
            interval=1.0,
            diagnose=lambda: explain(cluster, ns),
        )
        seconds = time.monotonic() - started
        # The operator does not bring it back: a deleted FineTuneJob is not a lost Job.
        time.sleep(3)
        assert json.loads(kubectl(admin, "get", "jobs", "-n", ns, "-o", "json").stdout)["items"] == []
    assert kubectl(admin, "get", "ftj", "deleted", "-n", ns, check=False).returncode != 0
    print(f"garbage collection: Job gone after {marks.get('job', seconds):.1f} s, its pods after {seconds:.1f} s")


def test_ftj_columns_on_the_real_server(cluster: Cluster, cluster_namespace: str) -> None:
    """Printer columns come from the 1.36 CRD server (server-side Table) through the aggregator.
    (`kubectl explain` cannot be shown here: the standalone CRD server publishes no OpenAPI
    document for custom resources, which a full kube-apiserver does; tests/real/test_proof.py
    proves `explain` on the 1.20 API server, which publishes the same schema.)"""
    admin = cluster.kubeconfig
    from tests.api.test_invalid_manifests import CANONICAL

    obj = json.loads(json.dumps(CANONICAL))
    kubectl(admin, "apply", "-n", cluster_namespace, "-f", "-", input=json.dumps(obj))
    header = kubectl(admin, "get", "ftj", "-n", cluster_namespace).stdout.splitlines()[0].split()
    assert header[:3] == ["NAME", "PHASE", "METHOD"], header
    wide = kubectl(admin, "get", "ftj", "-n", cluster_namespace, "-o", "wide").stdout.splitlines()[0]
    assert "EVAL" in wide and "JOB" in wide, wide
    assert ftj(cluster, cluster_namespace, "support-bot")["spec"]["hyperparameters"]["learningRate"] == 2e-4
