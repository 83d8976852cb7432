"""The OpenAI flow against `kubetune api` in cluster mode, on the real apiserver tier.

The official `openai` client → `kubetune api --cluster` (the real CLI as a subprocess:
kubetune.gateway.server's Kubernetes backend) → a FineTuneJob in the key's namespace → the operator (subprocess) and the stand-in
kubelet run its validation and trainer Jobs (the trainer reads the upload from moto's S3 through the
credentials Secret and writes the adapter there) → `jobs.retrieve` until succeeded → events,
checkpoints, the `ft:` model; a second key (another namespace) sees none of it; the namespace's
webhook receives `fine_tuning.job.succeeded` once, signed; a malformed upload fails its job with
`error.param` naming the line (`training_file:12`).

The gateway runs with exactly the RBAC the Helm chart renders for it (its Role in the watched
namespace, generated from the measured API usage, and system:auth-delegator for Kubernetes
tokens), bound to the one ServiceAccount identity this tier has a token for
(`gateway.serviceAccount.name` pointed at it): the flow must pass without a single Forbidden. A
Kubernetes token (that ServiceAccount's) is accepted through TokenReview + SubjectAccessReview for
the namespace named by `project=` (the OpenAI-Project header).
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tests.chart.render import render
from tests.k8s_harness import OPERATOR_SERVICE_ACCOUNT, ApiServer, free_ports, kubectl
from tests.real.e2e import (
    MOTO_CREDENTIALS,
    REPO,
    JobRunner,
    OperatorProcess,
    apply_secret,
    diagnostics,
    get_json,
    kubetune_binary,
    s3_client,
    tail,
)
from tests.standin_kubelet import StandinKubelet

BUCKET = "kubetune-api"
SECRET_NAME = "kubetune-api-s3"
KEY_A = "sk-kt-real-tier-a-0123456789"
KEY_B = "sk-kt-real-tier-b-0123456789"
DATA = REPO / "examples" / "data" / "support-chat.jsonl"


class Hooks(http.server.BaseHTTPRequestHandler):
    """A webhook receiver: verifies each delivery with the Standard Webhooks reference library."""

    secret = ""
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        from standardwebhooks.webhooks import Webhook, WebhookVerificationError

        body = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
        try:
            payload, verified = Webhook(self.secret).verify(body, dict(self.headers.items())), True
        except WebhookVerificationError:
            payload, verified = json.loads(body), False
        type(self).received.append({"id": self.headers.get("webhook-id"), "payload": payload, "verified": verified})
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_openai_client_against_kubetune_api_on_the_cluster(
    apiserver: ApiServer, namespace: str, s3_server: str, tmp_path: Path
) -> None:
    import openai
    from kubetune.gateway.webhooks import new_secret

    admin = apiserver.kubeconfig
    sa_namespace, sa_name = OPERATOR_SERVICE_ACCOUNT
    other = f"{namespace[:56]}-other"  # key B's namespace, which the gateway may use too
    kubectl(admin, "create", "namespace", other)
    chart = render(
        {
            "watch": {"scope": "Namespaced", "namespaces": [namespace, other]},
            "gateway": {
                "enabled": True,
                "storage": {"uri": f"s3://{BUCKET}/gateway", "credentialsSecret": SECRET_NAME},
                "auth": {"secretName": "unused", "kubernetesTokens": True},
                "serviceAccount": {"name": sa_name},
            },
        },
        name="kubetune",
        namespace=sa_namespace,
    )
    rbac = [
        o
        for o in chart
        if o["kind"] in ("Role", "RoleBinding", "ClusterRoleBinding")
        and o["metadata"]["labels"].get("app.kubernetes.io/component") == "gateway"
    ]
    assert sorted(o["kind"] for o in rbac) == ["ClusterRoleBinding", "Role", "Role", "RoleBinding", "RoleBinding"]
    kubectl(admin, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": rbac}))
    gateway_kubeconfig = apiserver.service_account_kubeconfig(sa_namespace, sa_name)
    client = s3_client(s3_server)
    try:
        client.create_bucket(Bucket=BUCKET)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    apply_secret(admin, namespace, SECRET_NAME, {**MOTO_CREDENTIALS, "AWS_ENDPOINT_URL": s3_server})

    Hooks.secret, Hooks.received = new_secret(), []
    hooks = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    access = tmp_path / "access.yaml"
    access.write_text(
        f"keys:\n  - {{name: a, key: {KEY_A}, namespace: {namespace}, organization: org-real}}\n"
        f"  - {{name: b, key: {KEY_B}, namespace: {other}}}\n"
        f"webhooks:\n  - namespace: {namespace}\n    url: http://127.0.0.1:{hooks.server_port}/hook\n"
        f"    secret: {Hooks.secret}\n"
    )
    port, trainer_port, operator_port = free_ports(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_API")}  # KUBETUNE_API_URL too
    env.update(
        KUBECONFIG=str(gateway_kubeconfig),
        KUBETUNE_API_KUBERNETES_TOKENS="true",
        PYTHONWARNINGS="ignore:Unverified HTTPS request",
        AWS_ENDPOINT_URL=s3_server,
        KUBETUNE_API_STORAGE=f"s3://{BUCKET}/gateway",
        KUBETUNE_API_CREDENTIALS_SECRET=SECRET_NAME,
        KUBETUNE_API_GPUS="0",
        KUBETUNE_API_CHECKPOINT_EVERY_STEPS="2",
        KUBETUNE_API_ACCESS_FILE=str(access),
        KUBETUNE_API_WEBHOOK_POLL_SECONDS="0.5",
        **MOTO_CREDENTIALS,
    )
    gateway_log = tmp_path / "gateway.log"
    with open(gateway_log, "wb") as log:
        gateway = subprocess.Popen(
            [kubetune_binary(), "api", "--cluster", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    operator = OperatorProcess(
        admin,
        [namespace],
        tmp_path / "operator.log",
        settings={
            "KUBETUNE_METRICS_SCRAPE_INTERVAL_SECONDS": "0.5",
            "KUBETUNE_METRICS_PORT": str(trainer_port),
            "KUBETUNE_OPERATOR_METRICS_PORT": str(operator_port),
        },
    )
    kubelet = StandinKubelet(admin, log_dir=tmp_path / "pods", drop_env_prefixes=("AWS_",))
    runner = JobRunner(kubelet, namespace, cwd=REPO, timeout=300)

    def fail(message: str) -> AssertionError:
        return AssertionError(
            f"{message}\n--- gateway log ---\n{tail(gateway_log)}\n"
            + diagnostics(admin, namespace, *runner.errors, operator.tail(), runner.pod_logs())
        )

    try:
        operator.start()
        runner.start()
        base_url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 30
        while True:  # the gateway is up once it answers
            try:
                openai.OpenAI(base_url=base_url, api_key=KEY_A, max_retries=0).models.list()
                break
            except openai.APIConnectionError:
                if gateway.poll() is not None or time.monotonic() > deadline:
                    raise fail("kubetune api did not start") from None
                time.sleep(0.3)
        a = openai.OpenAI(base_url=base_url, api_key=KEY_A)
        b = openai.OpenAI(base_url=base_url, api_key=KEY_B)
        lines = DATA.read_text().splitlines(keepends=True)[:24]
        upload = a.files.create(file=("support.jsonl", "".join(lines).encode()), purpose="fine-tune")
        assert upload.bytes == len("".join(lines).encode()) and upload.filename == "support.jsonl"
        job = a.fine_tuning.jobs.create(
            model="builtin://tiny-llama",
            training_file=upload.id,
            suffix="support",
            hyperparameters={"n_epochs": 1, "batch_size": 4},
        )
        assert job.status == "validating_files" and job.organization_id == "org-real"
        ftj = get_json(admin, "ftj", job.id, "-n", namespace)
        assert ftj["metadata"]["labels"]["openai.kubetune.io/job-id"] == job.id
        assert ftj["spec"]["dataset"]["train"] == f"s3://{BUCKET}/gateway/{namespace}/files/{upload.id}.jsonl"
        assert ftj["spec"]["output"]["credentialsSecret"] == SECRET_NAME

        # Key B acts in another namespace: A's objects do not exist for it.
        with pytest.raises(openai.NotFoundError):
            b.fine_tuning.jobs.retrieve(job.id)
        with pytest.raises(openai.NotFoundError):
            b.files.content(upload.id)
        assert b.fine_tuning.jobs.list().data == [] and b.files.list().data == []

        statuses: list[str] = []
        deadline = time.monotonic() + 300
        while True:
            operator.check()
            if runner.errors:
                raise fail("the stand-in kubelet failed")
            job = a.fine_tuning.jobs.retrieve(job.id)
            if not statuses or statuses[-1] != job.status:
                statuses.append(job.status)
            if job.status in ("succeeded", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                raise fail(f"job {job.id} not finished after 300 s (statuses: {statuses})")
            time.sleep(1)
        if job.status != "succeeded":
            raise fail(f"job {job.id} ended {job.status}: {job.error}")
        assert statuses[0] == "validating_files" and "running" in statuses, statuses
        assert job.fine_tuned_model == f"ft:tiny-llama:org-real:support:{job.id.removeprefix('ftjob-')}"
        assert job.finished_at and job.finished_at >= job.created_at and job.hyperparameters.n_epochs == 1

        events = a.fine_tuning.jobs.list_events(job.id, limit=100).data
        assert events[0].message == "The job has successfully completed"
        assert events[-1].message == f"Created fine-tuning job: {job.id}"
        assert any(e.type == "metrics" and e.data.get("step") for e in events)
        checkpoints = a.fine_tuning.jobs.checkpoints.list(job.id).data
        assert checkpoints and checkpoints[0].step_number >= checkpoints[-1].step_number > 0
        assert all(
            c.fine_tuning_job_id == job.id and c.fine_tuned_model_checkpoint.startswith(job.fine_tuned_model)
            for c in checkpoints
        )
        assert job.fine_tuned_model in [m.id for m in a.models.list().data]
        assert a.models.retrieve(job.fine_tuned_model).owned_by == "org-real"
        assert b.models.list().data == []
        # The adapter is where the job's output says, in the tenant's prefix.
        listing = client.list_objects_v2(Bucket=BUCKET, Prefix=f"gateway/{namespace}/jobs/{job.id}/")
        assert any(o["Key"].endswith("manifest.json") for o in listing.get("Contents", []))

        deadline = time.monotonic() + 20
        while not Hooks.received and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.5)  # a few more polls: still once
        assert [(h["verified"], h["payload"]["type"], h["payload"]["data"]) for h in Hooks.received] == [
            (True, "fine_tuning.job.succeeded", {"id": job.id})
        ]
        annotations = get_json(admin, "ftj", job.id, "-n", namespace)["metadata"]["annotations"]
        assert annotations["openai.kubetune.io/webhook-succeeded"] == "delivered"

        # A malformed file: the operator's validation Job fails the job, the error names the line.
        bad = lines[:11] + ['{"messages": [{"role": "user", "content": "no answer"}]}\n']
        bad_file = a.files.create(file=("bad.jsonl", "".join(bad).encode()), purpose="fine-tune")
        bad_job = a.fine_tuning.jobs.create(model="builtin://tiny-llama", training_file=bad_file.id)
        deadline = time.monotonic() + 120
        while (bad_job := a.fine_tuning.jobs.retrieve(bad_job.id)).status not in ("succeeded", "failed", "cancelled"):
            if time.monotonic() > deadline or runner.errors:
                raise fail(f"the malformed job {bad_job.id} did not fail in 120 s: {bad_job.status}")
            time.sleep(1)
        assert bad_job.status == "failed" and bad_job.error is not None, bad_job
        assert bad_job.error.param == "training_file:12" and bad_file.id in bad_job.error.message, bad_job.error
        assert f"s3://{BUCKET}" not in bad_job.error.message  # the user's file id, not our storage path

        # A Kubernetes token: reviewed by the API server, allowed in the namespace its RBAC covers.
        token = apiserver.service_account_token(sa_namespace, sa_name)
        k = openai.OpenAI(base_url=base_url, api_key=token, project=namespace)
        assert [j.id for j in k.fine_tuning.jobs.list().data] == [bad_job.id, job.id]
        assert openai.OpenAI(base_url=base_url, api_key=token, project=other).fine_tuning.jobs.list().data == []
        with pytest.raises(openai.PermissionDeniedError, match="may not list finetunejobs"):
            openai.OpenAI(base_url=base_url, api_key=token, project="kube-system").fine_tuning.jobs.list()
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base_url, api_key="not-a-token-nor-a-key", max_retries=0).files.list()
        denied = [
            line
            for line in gateway_log.read_text(errors="replace").splitlines()
            if "orbidden" in line or " 403" in line
        ]
        assert denied == [], "\n".join(denied[:20])
    finally:
        runner.stop()
        kubelet.close()
        operator.stop()
        gateway.terminate()
        try:
            gateway.wait(10)
        except subprocess.TimeoutExpired:
            gateway.kill()
            gateway.wait(10)
        hooks.shutdown()
        hooks.server_close()
        kubectl(admin, "delete", "namespace", other, "--wait=false", check=False)
