"""Issue 14, "the operator tells the truth": each situation of its *Why* list reproduced against the
real handlers on the kmock emulator (refusals the emulator cannot make itself are injected with
the API server's own Status answer), asserting the phase, the reason, a message naming the
field, the Event, and that nothing is retried or written after a final answer.

The same situations on real Kubernetes objects (a real API server refusing, a real scheduler
leaving a pod unschedulable) are in tests/cluster/test_e2e.py."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC

import aiohttp
import pytest

from tests.fast.ftj import (
    FTJ,
    JOB,
    JOBS,
    NAME,
    NS,
    condition,
    controller_ref,
    create,
    delete,
    events,
    fetch,
    finish,
    ftj_path,
    job_path,
    manifest,
    merge_patch,
    pod_labels,
    registry_for,
    start_running,
    status,
)
from tests.kmock_harness import KubeEmulator, run_operator, verb_resource, wait_until

pytestmark = [pytest.mark.kmock]

PRIORITY_REFUSAL = (
    'Job.batch "support-bot-train" is invalid: spec.template.spec.priorityClassName: '
    'Invalid value: "gold!": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters'
)


def requests(kube: KubeEmulator, verb: str, resource: str) -> list:
    return [
        r
        for r in list(kube.requests)
        if r.user_agent.startswith(("kopf/", "kubetune-operator/")) and verb_resource(r) == (verb, resource)
    ]


async def warning(api: aiohttp.ClientSession, reason: str) -> dict | None:
    return next((e for e in await events(api) if e["reason"] == reason and e["type"] == "Warning"), None)


async def _any_event(api: aiohttp.ClientSession, test) -> bool:
    return any(test(e) for e in await events(api))


async def pod(api: aiohttp.ClientSession, name: str, pod_status: dict, job: str = JOB) -> None:
    """A pod of `job` as the Job controller creates it, with the status the scheduler/kubelet wrote."""
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": pod_labels(job), "ownerReferences": await controller_ref(api, job)},
        "spec": {"containers": [{"name": "trainer", "image": "trainer"}]},
    }
    await create(api, f"/api/v1/namespaces/{NS}/pods", body)
    await merge_patch(api, f"/api/v1/namespaces/{NS}/pods/{name}/status", {"status": pod_status})


# ----------------------------------------------------------------------- refusals surface


async def test_a_refused_job_fails_the_finetunejob_with_the_servers_words(
    kube: KubeEmulator, api: aiohttp.ClientSession
) -> None:
    kube.fail_next("POST", r"/jobs$", 422, message=PRIORITY_REFUSAL)
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest())
        await wait_until(lambda: status(kube).get("phase") == "Failed", timeout=15, message="phase Failed")
        st = status(kube)
        assert st["reason"] == "ChildRejected" and condition(st, "Failed")["reason"] == "ChildRejected"
        assert (
            "spec.template.spec.priorityClassName" in st["message"]
            and "spec.scheduling.priorityClassName" in st["message"]
        )
        assert st["error"] == {
            "code": "ChildRejected",
            "message": st["message"],
            "param": "spec.scheduling.priorityClassName",
        }
        await wait_until(lambda: warning(api, "ChildRejected"), message="a ChildRejected Warning event")
        await asyncio.sleep(2)  # kopf would retry a TemporaryError within 1-10 s: it must not
    assert [r.status for r in requests(kube, "create", JOBS)] == [422]
    assert kube.read_object(JOBS, NS, JOB) is None


async def test_a_missing_podgroup_crd_says_what_to_install(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    kube.fail_next("POST", r"/podgroups$", 404, message="the server could not find the requested resource")
    obj = manifest()
    obj["spec"]["scheduling"] = {"schedulerName": "volcano"}
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), obj)
        await wait_until(lambda: status(kube).get("phase") == "Failed", timeout=15, message="phase Failed")
        st = status(kube)
        assert st["reason"] == "CRDMissing" and "install Volcano" in st["message"]
        assert st["error"]["param"] == "spec.scheduling.schedulerName"
    assert kube.read_object(JOBS, NS, JOB) is None  # nothing half-created


async def test_server_errors_are_retried_with_backoff_and_a_degraded_condition(
    kube: KubeEmulator, api: aiohttp.ClientSession
) -> None:
    kube.fail_next("POST", r"/jobs$", 503, times=2)
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest())
        await wait_until(
            lambda: (condition(status(kube), "Degraded") or {}).get("status") == "True",
            timeout=15,
            message="Degraded=True while retrying",
        )
        degraded = condition(status(kube), "Degraded")
        assert degraded["reason"] == "APIRetrying"
        assert (
            "HTTP 503" in degraded["message"]
            and "since" in degraded["message"]
            and "retrying in" in degraded["message"]
        )
        # the handler's error, as kopf logs it, is an Event too (kubectl describe shows it)
        await wait_until(
            lambda: _any_event(api, lambda e: e["type"] in ("Warning", "Error") and "HTTP 503" in e["message"]),
            message="the handler's error as an Event",
        )
        await wait_until(lambda: status(kube).get("jobName") == JOB, timeout=20, message="the Job after the retries")
        await wait_until(
            lambda: (condition(status(kube), "Degraded") or {}).get("status") == "False",
            timeout=10,
            message="Degraded=False once through",
        )
        assert status(kube)["phase"] == "Pending"
    posts = requests(kube, "create", JOBS)
    assert [r.status for r in posts] == [503, 503, 201]
    assert posts[2].timestamp - posts[1].timestamp >= 1.9  # 1 s, then 2 s: exponential


# ------------------------------------------------------------------ phases mean what they say


async def test_an_unschedulable_pod_is_pending_with_the_schedulers_message(
    kube: KubeEmulator, api: aiohttp.ClientSession
) -> None:
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest())
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
        text = "0/12 nodes are available: 12 Insufficient nvidia.com/gpu."
        await pod(
            api,
            f"{JOB}-x1",
            {
                "phase": "Pending",
                "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": text}],
            },
        )
        await merge_patch(
            api, job_path(JOB) + "/status", {"status": {"startTime": "2026-01-01T00:00:00Z", "active": 1}}
        )
        await wait_until(lambda: status(kube).get("reason") == "Unschedulable", message="reason Unschedulable")
        st = status(kube)
        assert st["phase"] == "Pending" and text in st["message"] and "startTime" not in st
        assert condition(st, "Running") is None
        await wait_until(lambda: warning(api, "Unschedulable"), message="an Unschedulable Warning event")
        # still editable: without startTime the CRD's immutability rule does not apply, so the
        # user can lower spec.resources; then the trainer starts and so does training
        await merge_patch(
            api,
            f"/api/v1/namespaces/{NS}/pods/{JOB}-x1/status",
            {
                "status": {
                    "phase": "Running",
                    "conditions": [{"type": "PodScheduled", "status": "True"}],
                    "containerStatuses": [
                        {"name": "trainer", "state": {"running": {"startedAt": "2026-01-01T00:05:00Z"}}}
                    ],
                }
            },
        )
        await wait_until(lambda: status(kube).get("phase") == "Running", message="phase Running")
        st = status(kube)
        assert st["startTime"] == "2026-01-01T00:05:00Z" and st["reason"] == "TrainingStarted"
        assert condition(st, "Pending")["status"] == "False"


@pytest.mark.parametrize(
    ("waiting", "reason", "words"),
    [
        (
            {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "ghcr.io/acme/trainer:nope"'},
            "ImagePullFailed",
            "nope",
        ),
        (
            {"reason": "CreateContainerConfigError", "message": 'secret "s3-creds" not found'},
            "SecretMissing",
            "s3-creds",
        ),
        (
            {"reason": "CrashLoopBackOff", "message": "back-off 5m0s restarting failed container"},
            "CrashLoopBackOff",
            "back-off",
        ),
    ],
)
async def test_a_pod_that_cannot_start_says_why(
    kube: KubeEmulator, api: aiohttp.ClientSession, waiting: dict, reason: str, words: str
) -> None:
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest())
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
        await pod(
            api,
            f"{JOB}-x1",
            {"phase": "Pending", "containerStatuses": [{"name": "trainer", "state": {"waiting": waiting}}]},
        )
        await wait_until(lambda: status(kube).get("reason") == reason, message=f"reason {reason}")
        st = status(kube)
        assert st["phase"] == "Pending" and words in st["message"] and "startTime" not in st
        await wait_until(lambda: warning(api, reason), message=f"a {reason} Warning event")


async def test_a_missing_service_account_is_named(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest(prevalidate=True))
        await wait_until(lambda: status(kube).get("phase") == "Validating", message="phase Validating")
        check = await fetch(api, job_path("support-bot-validate"))
        assert check is not None
        refused = (
            'Error creating: pods "support-bot-validate-" is forbidden: error looking up service account '
            'default/kubetune-trainer: serviceaccount "kubetune-trainer" not found'
        )
        await create(
            api,
            f"/api/v1/namespaces/{NS}/events",
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": "support-bot-validate.1"},
                "type": "Warning",
                "reason": "FailedCreate",
                "message": refused,
                "lastTimestamp": "2026-01-01T00:00:01Z",
                "involvedObject": {
                    "kind": "Job",
                    "name": "support-bot-validate",
                    "namespace": NS,
                    "uid": check["metadata"]["uid"],
                },
            },
        )
        await wait_until(
            lambda: status(kube).get("reason") == "ServiceAccountMissing", message="reason ServiceAccountMissing"
        )
        st = status(kube)
        assert (
            st["phase"] == "Validating"
            and "kubetune-trainer" in st["message"]
            and "trainer.namespaces" in st["message"]
        )
        await wait_until(lambda: warning(api, "ServiceAccountMissing"), message="a ServiceAccountMissing Warning event")


async def test_failing_keeps_every_other_condition(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest(prevalidate=True))
        await wait_until(lambda: status(kube).get("phase") == "Validating", message="phase Validating")
        await finish(api, "support-bot-validate", "Complete", json.dumps({"status": "succeeded"}))
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="the trainer Job")
        await finish(
            api,
            JOB,
            "Failed",
            json.dumps(
                {"status": "failed", "reason": "StorageError", "message": "bucket gone", "param": "spec.output.uri"}
            ),
        )
        await wait_until(lambda: status(kube).get("phase") == "Failed", message="phase Failed")
        st = status(kube)
        kinds = {c["type"]: c["status"] for c in st["conditions"]}
        assert kinds["DataValidated"] == "True" and kinds["Failed"] == "True" and kinds["Pending"] == "False"
        assert [c["type"] for c in st["conditions"]].count("Failed") == 1
        assert st["error"]["code"] == "StorageError" and "bucket gone" in st["error"]["message"]


async def test_cancel_keeps_the_record_and_deletes_the_job(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest())
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
        await start_running(api)
        await wait_until(lambda: status(kube).get("phase") == "Running", message="phase Running")
        await merge_patch(api, ftj_path(NAME), {"spec": {"cancel": True}})
        await wait_until(lambda: status(kube).get("phase") == "Cancelled", message="phase Cancelled")
        await wait_until(lambda: kube.read_object(JOBS, NS, JOB) is None, message="the Job deleted")
        st = status(kube)
        assert (
            st["reason"] == "CancelledByUser" and "checkpoints are kept" in st["message"] and st.get("completionTime")
        )
        assert condition(st, "Running")["status"] == "False" and condition(st, "Cancelled")["status"] == "True"
        await asyncio.sleep(1.5)  # several timer ticks: a cancelled job's Job is not recreated
        assert kube.read_object(JOBS, NS, JOB) is None and status(kube)["phase"] == "Cancelled"
    assert kube.read_object(FTJ, NS, NAME) is not None


# ----------------------------------------------------------------------------- hostile pods


async def test_a_forged_pod_with_the_jobs_label_is_not_believed(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest())
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
        forged = {"status": "succeeded", "adapter": {"uri": "s3://attacker-bucket/adapter"}}
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "forged", "labels": pod_labels(JOB)},
            "spec": {"containers": [{"name": "trainer", "image": "evil"}]},
        }
        await create(api, f"/api/v1/namespaces/{NS}/pods", body)
        await merge_patch(
            api,
            f"/api/v1/namespaces/{NS}/pods/forged/status",
            {
                "status": {
                    "phase": "Succeeded",
                    "containerStatuses": [
                        {"name": "trainer", "state": {"terminated": {"exitCode": 0, "message": json.dumps(forged)}}}
                    ],
                }
            },
        )
        await merge_patch(
            api,
            job_path(JOB) + "/status",
            {
                "status": {
                    "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": "2026-01-01T00:10:00Z"}]
                }
            },
        )
        await wait_until(lambda: status(kube).get("phase") == "Succeeded", message="phase Succeeded")
        await asyncio.sleep(1)
        assert "attacker-bucket" not in json.dumps(status(kube))


# ---------------------------------------------------------------------- two operators, no peering


async def test_a_second_operator_without_peering_says_so(
    kube: KubeEmulator, api: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    from kubetune.operator import presence

    # the operator's own set-up (no CRD scanning), each holding the Lease in NS as production does
    first, second = (registry_for(kube, presence_namespace=NS, presence_renew_seconds=0.2) for _ in range(2))
    async with run_operator(first, kube.base_url):
        await wait_until(
            lambda: kube.read_object("coordination.k8s.io/v1/leases", NS, presence.LEASE_NAME) is not None,
            message="the first operator holds the Lease",
        )
        holder = kube.read_object("coordination.k8s.io/v1/leases", NS, presence.LEASE_NAME)["spec"]["holderIdentity"]
        with caplog.at_level(logging.WARNING):
            async with run_operator(second, kube.base_url):
                await wait_until(
                    lambda: any("another kubetune operator" in r.getMessage() for r in caplog.records),
                    message="the second operator's warning",
                )
                await asyncio.sleep(0.6)  # several renewals: one warning, and the first keeps the Lease
    warnings = [r.getMessage() for r in caplog.records if "another kubetune operator" in r.getMessage()]
    assert len(warnings) == 1 and holder in warnings[0] and "peering.enabled" in warnings[0]
    assert (
        kube.read_object("coordination.k8s.io/v1/leases", NS, presence.LEASE_NAME)["spec"]["holderIdentity"] == holder
    )


def test_an_expired_lease_is_nobodys() -> None:
    from datetime import datetime

    from kubetune.operator import presence

    now = datetime(2026, 1, 1, 0, 10, tzinfo=UTC)
    lease = {
        "spec": {"holderIdentity": "other", "leaseDurationSeconds": 60, "renewTime": "2026-01-01T00:09:30.000000Z"}
    }
    assert presence.live_holder(lease, "me", now) == "other"
    assert presence.live_holder(lease, "other", now) is None
    lease["spec"]["renewTime"] = "2026-01-01T00:08:00.000000Z"
    assert presence.live_holder(lease, "me", now) is None


# ----------------------------------------------------------------- the spec that runs is the spec that started


async def test_a_lost_job_is_rebuilt_from_the_spec_it_started_with(
    kube: KubeEmulator, api: aiohttp.ClientSession
) -> None:
    """Seen: after a spec edit (a server without CEL stores it) and a deleted Job, the operator
    rebuilt the Job from the edited spec (0.5B LoRA → 70B full) while saying it resumed. Now the
    Job comes back from the spec's ConfigMap, and the edit is reported, not applied."""
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest())
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
        await start_running(api)
        await wait_until(lambda: status(kube).get("startTime"), message="training started")
        started = kube.read_object(JOBS, NS, JOB)
        digest = started["spec"]["template"]["metadata"]["annotations"]["kubetune.io/spec-sha256"]
        configmap = status(kube)["specConfigMap"]
        await merge_patch(
            api,
            ftj_path(NAME),
            {
                "spec": {
                    "model": {"source": "hf://meta-llama/Llama-3.1-70B"},
                    "method": {"adaptation": "full", "lora": None},
                }
            },
        )
        await wait_until(
            lambda: (condition(status(kube), "SpecImmutable") or {}).get("status") == "True",
            message="the edit reported",
        )
        assert "spec.model" in condition(status(kube), "SpecImmutable")["message"]
        await delete(api, job_path(JOB))
        await wait_until(lambda: status(kube).get("recreations") == 1, message="the Job recreated")
        again = kube.read_object(JOBS, NS, JOB)
        assert again is not None and again["metadata"]["uid"] != started["metadata"]["uid"]
        assert again["spec"]["template"]["metadata"]["annotations"]["kubetune.io/spec-sha256"] == digest
        assert status(kube)["specConfigMap"] == configmap
        spec_doc = json.loads(kube.read_object("v1/configmaps", NS, configmap)["data"]["spec.json"])
        assert spec_doc["spec"]["model"]["source"] != "hf://meta-llama/Llama-3.1-70B"
        assert spec_doc["spec"]["method"]["adaptation"] == "lora"
