"""End-to-end pieces for the cluster tier: the operator as a pod of its built image, installed from
the Helm chart, and FineTuneJobs that train in real pods of the built trainer image.

:func:`install_operator` renders charts/kubetune with Helm's engine (tests/chart/render.py) for one
watched namespace, with the built images (``imagePullPolicy: Never``: no registry) and free host
ports, and applies what it renders except the CRD (which lives on the 1.36 CRD server). Two
changes are made to the rendered Deployment, both because this cluster has no pod network: the
pod uses the host's network (``hostNetwork``) and reaches the API server at 127.0.0.1
(``KUBERNETES_SERVICE_HOST``/``PORT``; there is no kube-proxy to route the ``kubernetes``
Service's cluster IP). Everything else — the ServiceAccount and its token, the namespaced Role and
RoleBinding, the security context, the probe, the settings — is the chart's.

:func:`quickstart_on_s3` is examples/quickstart.yaml as a user of this cluster would apply it:
its dataset uploaded to the S3 bucket (moto, on loopback: reachable from host-network pods),
``credentialsSecret`` naming a Secret with the bucket's credentials.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.chart.render import render
from tests.cluster.conftest import BuiltImages, wait_for
from tests.cluster_harness import Cluster
from tests.k8s_harness import free_ports, kubectl
from tests.real.e2e import (
    DEFAULT_CREDENTIALS_SECRET,
    MOTO_CREDENTIALS,
    apply_secret,
    diagnostics,
    prepare_output,
    quickstart_manifest,
    s3_client,
)

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data"
BUCKET = "kubetune-demo"
TERMINAL = ("Succeeded", "Failed", "Cancelled")


def image_values(image: str) -> dict[str, str]:
    repository, _, tag = image.rpartition(":")
    return {"repository": repository, "tag": tag, "pullPolicy": "Never"}


def apply(kubeconfig: Path, objs: list[dict[str, Any]]) -> None:
    kubectl(kubeconfig, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}))


@dataclass
class OperatorPod:
    """The operator's pod; :meth:`check` raises (with its log) once its container has restarted."""

    cluster: Cluster
    namespace: str
    name: str

    def log(self) -> str:
        out = kubectl(self.cluster.kubeconfig, "logs", "-n", self.namespace, self.name, check=False)
        return out.stdout + out.stderr

    def check(self) -> None:
        pod = json.loads(
            kubectl(self.cluster.kubeconfig, "get", "pod", self.name, "-n", self.namespace, "-o", "json").stdout
        )
        for status in pod["status"].get("containerStatuses") or []:
            if status.get("restartCount") or "terminated" in (status.get("state") or {}):
                previous = kubectl(
                    self.cluster.kubeconfig, "logs", "-n", self.namespace, self.name, "--previous", check=False
                )
                raise AssertionError(f"the operator pod {self.name} crashed: {status}\n{previous.stdout}{self.log()}")


@contextmanager
def install_operator(
    cluster: Cluster,
    images: BuiltImages,
    namespace: str,
    *,
    scrape_interval: float = 1.0,
    release_namespace: str | None = None,
) -> Iterator[OperatorPod]:
    """The chart's operator, running as a pod in ``release_namespace`` and watching ``namespace``.
    The Deployment is deleted on exit (the namespace too when it was made here), and the pod's
    log is part of any failure message."""
    assert cluster.api is not None
    admin = cluster.kubeconfig
    release_ns = release_namespace or f"{namespace}-kt"
    metrics_port, health_port, trainer_port = free_ports(3, "0.0.0.0")
    values = {
        "watch": {"scope": "Namespaced", "namespaces": [namespace]},
        "image": image_values(images.operator),
        "crds": {"install": False},
        "operator": {"scrapeIntervalSeconds": scrape_interval, "metricsPort": metrics_port, "healthPort": health_port},
        "trainer": {"image": image_values(images.trainer), "metricsPort": trainer_port, "hostNetwork": True},
    }
    objs = [o for o in render(values, name="kubetune", namespace=release_ns) if o["kind"] != "CustomResourceDefinition"]
    (deployment,) = [o for o in objs if o["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    pod |= {"hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet"}
    api_port = cluster.api.url.rsplit(":", 1)[1]
    (container,) = pod["containers"]
    container["env"] += [
        {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
        {"name": "KUBERNETES_SERVICE_PORT", "value": api_port},
    ]
    kubectl(admin, "create", "namespace", release_ns, check=False)
    apply(admin, objs)
    name = deployment["metadata"]["name"]
    try:
        kubectl(admin, "rollout", "status", f"deployment/{name}", "-n", release_ns, "--timeout=120s", timeout=180)
        pods = json.loads(kubectl(admin, "get", "pods", "-n", release_ns, "-o", "json").stdout)["items"]
        (pod_name,) = [p["metadata"]["name"] for p in pods if p["metadata"]["name"].startswith(name)]
        operator = OperatorPod(cluster, release_ns, pod_name)
        # kopf is up once it logs; a crash at start-up shows here, not as a 10-minute timeout.
        wait_for(
            "the operator to start",
            lambda: operator.check() or "has finished" in operator.log(),
            90,
            diagnose=operator.log,
        )  # kopf: "Initial authentication has finished." after logging in
        yield operator
    finally:
        kubectl(
            admin,
            "delete",
            "deployment",
            name,
            "-n",
            release_ns,
            "--wait=true",
            "--timeout=60s",
            check=False,
            timeout=90,
        )
        if release_namespace is None:
            kubectl(admin, "delete", "namespace", release_ns, "--wait=false", check=False)


def operator_log(cluster: Cluster, namespace: str, lines: int = 80) -> str:
    out = kubectl(
        cluster.kubeconfig,
        "logs",
        "-n",
        f"{namespace}-kt",
        "-l",
        "app.kubernetes.io/name=kubetune",
        f"--tail={lines}",
        check=False,
    )
    return f"--- operator pod log ---\n{out.stdout}{out.stderr}"


def pod_logs(cluster: Cluster, namespace: str, lines: int = 40) -> str:
    pods = json.loads(kubectl(cluster.kubeconfig, "get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
    out = []
    for p in pods:
        name = p["metadata"]["name"]
        log = kubectl(cluster.kubeconfig, "logs", "-n", namespace, name, f"--tail={lines}", check=False)
        out.append(f"--- pod {name} ({(p.get('status') or {}).get('phase')}) ---\n{log.stdout}{log.stderr}")
    return "\n".join(out)


def explain(cluster: Cluster, namespace: str) -> str:
    """Everything a failed test should print: objects, events, operator and pod logs, kubelet tail."""
    return diagnostics(
        cluster.kubeconfig,
        namespace,
        operator_log(cluster, namespace),
        pod_logs(cluster, namespace),
        f"--- kubelet ---\n{cluster.logs('kubelet', 20)}",
    )


def quickstart_on_s3(
    cluster: Cluster, namespace: str, s3: str, name: str = "quickstart", overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The quickstart manifest with its data uploaded to s3://kubetune-demo/<namespace>/data/, its
    output under s3://kubetune-demo/<namespace>/<name> (emptied), and the credentials Secret."""
    client = s3_client(s3)
    prefix = f"{namespace}/{name}"
    prepare_output(s3, f"s3://{BUCKET}/{prefix}")
    for f in ("support-chat.jsonl", "support-chat-eval.jsonl"):
        client.upload_file(str(DATA / f), BUCKET, f"{namespace}/data/{f}")
    apply_secret(
        cluster.kubeconfig, namespace, DEFAULT_CREDENTIALS_SECRET, {**MOTO_CREDENTIALS, "AWS_ENDPOINT_URL": s3}
    )
    doc = quickstart_manifest(
        DEFAULT_CREDENTIALS_SECRET,
        {
            "metadata.name": name,
            "spec.dataset.train": f"s3://{BUCKET}/{namespace}/data/support-chat.jsonl",
            "spec.dataset.validation": f"s3://{BUCKET}/{namespace}/data/support-chat-eval.jsonl",
            "spec.output.uri": f"s3://{BUCKET}/{prefix}",
            **(overrides or {}),
        },
    )
    return doc


def submit(cluster: Cluster, namespace: str, doc: dict[str, Any], tmp_path: Path) -> Path:
    """``kubectl apply -f`` of the manifest, as a file (what a user does)."""
    path = tmp_path / f"{doc['metadata']['name']}.yaml"
    path.write_text(json.dumps(doc, indent=1))
    kubectl(cluster.kubeconfig, "apply", "-n", namespace, "-f", str(path))
    return path


def ftj(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    return json.loads(kubectl(cluster.kubeconfig, "get", "ftj", name, "-n", namespace, "-o", "json").stdout)


def job_pods(cluster: Cluster, namespace: str, job: str) -> list[dict[str, Any]]:
    out = kubectl(cluster.kubeconfig, "get", "pods", "-n", namespace, "-l", f"job-name={job}", "-o", "json").stdout
    return sorted(json.loads(out)["items"], key=lambda p: p["metadata"]["creationTimestamp"])


def watch_phases(
    cluster: Cluster,
    namespace: str,
    name: str,
    timeout: float,
    until: tuple[str, ...] = TERMINAL,
    on_status: Any = None,
    operator: OperatorPod | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Poll the FineTuneJob until its phase is in ``until``; returns (object, distinct phases seen).
    With ``operator``, a crashed operator pod fails at once."""
    phases: list[str] = []
    seen: dict[str, Any] = {}

    def probe() -> bool:
        if operator is not None:
            operator.check()
        obj = ftj(cluster, namespace, name)
        phase = (obj.get("status") or {}).get("phase")
        if phase and (not phases or phases[-1] != phase):
            phases.append(phase)
        if on_status is not None:
            on_status(obj)
        seen["obj"] = obj
        return phase in until

    wait_for(
        f"FineTuneJob {name} to reach {'/'.join(until)}",
        probe,
        timeout,
        interval=1.0,
        diagnose=lambda: f"phases seen: {phases}\n{explain(cluster, namespace)}",
    )
    return seen["obj"], phases


def container_of(cluster: Cluster, pod: dict[str, Any]) -> str:
    """The Docker id of a pod's trainer container (kubelet's containerID is docker://ID)."""
    for status in pod["status"].get("containerStatuses") or []:
        if status.get("name") == "trainer" and status.get("containerID", "").startswith("docker://"):
            return status["containerID"].removeprefix("docker://")
    raise AssertionError(f"pod {pod['metadata']['name']} has no running trainer container: {pod['status']}")


def committed_checkpoints(s3: str, output_uri: str) -> list[int]:
    """Steps whose checkpoint manifest (the commit marker) is in the bucket."""
    bucket, _, prefix = output_uri.removeprefix("s3://").partition("/")
    out = s3_client(s3).list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/checkpoints/")
    return sorted(
        int(k["Key"].split("/step-")[1].split("/")[0])
        for k in out.get("Contents", [])
        if k["Key"].endswith("/manifest.json") and "/step-" in k["Key"]
    )


def sleep_past_backoff(seconds: float = 15.0) -> None:
    """The 1.20 Job controller retries a failed pod after 10 s: wait past it before asserting none came."""
    time.sleep(seconds)
