"""RELIABILITY O3, O5–O10 against the real handlers on the kmock emulator: API faults, Kueue
admission, a deleted child Job, deletion while the operator is down, a spec changed after start,
repeated applies and a secret canary."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

import aiohttp
import pytest

from tests.fast.ftj import (
    FTJ,
    JOB,
    JOBS,
    NAME,
    NS,
    SETTINGS,
    condition,
    create,
    delete,
    events,
    failed_reason,
    fetch,
    finish,
    ftj_path,
    job_path,
    manifest,
    merge_patch,
    posted,
    registry_for,
    start_running,
    status,
)
from tests.kmock_harness import KubeEmulator, run_operator, verb_resource, wait_until

pytestmark = [pytest.mark.kmock]

STATUS_PATH = rf"/finetunejobs/{NAME}/status$"


def operator_requests(kube: KubeEmulator, verb: str, resource: str, since: int = 0) -> list:
    return [
        r
        for r in list(kube.requests)[since:]
        if r.user_agent.startswith(("kopf/", "kubetune-operator/")) and verb_resource(r) == (verb, resource)
    ]


# --------------------------------------------------------------------------------- O3


async def test_o3_throttled_job_create_waits_for_retry_after(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    kube.fail_next("POST", r"/jobs$", 429, headers={"Retry-After": "1"})
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest())
        await wait_until(lambda: status(kube).get("jobName") == JOB, timeout=15, message="status.jobName")
    posts = operator_requests(kube, "create", JOBS)
    assert [r.status for r in posts] == [429, 201]
    assert posts[1].timestamp - posts[0].timestamp >= 1.0  # Retry-After honoured
    assert kube.read_object(JOBS, NS, JOB) is not None
    assert status(kube)["phase"] == "Pending"


async def test_o3_status_patch_errors_converge_to_one_job(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    kube.fail_next("PATCH", STATUS_PATH, 500, times=3)
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest())
        await wait_until(lambda: status(kube).get("jobName") == JOB, timeout=20, message="status.jobName")
        st = status(kube)
        assert st["phase"] == "Pending" and st["observedGeneration"] == 1
    patches = operator_requests(kube, "patch", f"{FTJ}/status")
    assert [r.status for r in patches[:3]] == [500, 500, 500]
    assert len(patches) <= 8  # bounded: retried, then quiet
    creates = operator_requests(kube, "create", JOBS)
    assert {r.status for r in creates} <= {201, 409} and [r.status for r in creates].count(201) == 1
    jobs = await fetch(api, job_path())
    assert jobs is not None and [j["metadata"]["name"] for j in jobs["items"]] == [JOB]


async def test_o3_dropped_watch_is_resumed(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest())
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
        assert kube.drop_watches() >= 1
        await kube.wait_for_watches(FTJ)  # kopf watches again, from where it was
        await merge_patch(api, ftj_path(NAME), {"spec": {"suspend": True}})
        await wait_until(
            lambda: (kube.read_object(JOBS, NS, JOB) or {})["spec"].get("suspend") is True,
            message="the suspend seen through the new watch",
        )
    assert kube.count("create", JOBS) == 1


# --------------------------------------------------------------------------------- O5


async def test_o5_kueue_queued_then_admitted(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest(scheduling={"queueName": "team-a"}))
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
        job = kube.read_object(JOBS, NS, JOB) or {}
        assert job["spec"]["suspend"] is True  # created suspended: Kueue admits it
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        await asyncio.sleep(1.0)  # several timer ticks while waiting for admission
        st = status(kube)
        assert st["phase"] == "Queued" and failed_reason(st) is None
        await merge_patch(api, job_path(JOB), {"spec": {"suspend": False}})  # Kueue admits
        await start_running(api)
        await wait_until(lambda: status(kube).get("phase") == "Running", message="phase Running")
        await asyncio.sleep(0.7)
        assert (kube.read_object(JOBS, NS, JOB) or {})["spec"]["suspend"] is False  # not re-suspended
    st = status(kube)
    assert st.get("retries", 0) == 0
    assert (condition(st, "Queued") or {}).get("status") == "False"


# --------------------------------------------------------------------------------- O6

RECREATING = dataclasses.replace(SETTINGS, max_job_recreations=2)


async def test_o6_deleted_job_is_recreated_then_bounded(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    async with run_operator(registry_for(kube, RECREATING), kube.base_url):
        await create(api, ftj_path(), manifest())
        await wait_until(lambda: kube.read_object(JOBS, NS, JOB) is not None, message="the Job")
        first = kube.read_object(JOBS, NS, JOB) or {}
        for n in (1, 2):
            await delete(api, job_path(JOB))
            await wait_until(lambda n=n: status(kube).get("recreations") == n, message=f"recreation {n}")
            again = kube.read_object(JOBS, NS, JOB) or {}
            assert again["metadata"]["uid"] != first["metadata"]["uid"]
            # the same spec and output: the trainer resumes from the checkpoints committed there
            assert again["spec"]["template"] == first["spec"]["template"]
        await wait_until(lambda: posted(api, "JobRecreated", "Warning"), message="a JobRecreated warning")
        await delete(api, job_path(JOB))
        await wait_until(lambda: status(kube).get("phase") == "Failed", message="phase Failed")
        await asyncio.sleep(0.7)
    assert failed_reason(status(kube)) == "TooManyRecreations"
    assert kube.count("create", JOBS) == 3 and kube.read_object(JOBS, NS, JOB) is None


async def test_o6_finished_job_deleted_is_not_recreated(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest())
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
        await finish(api, JOB, "Complete", json.dumps({"status": "succeeded", "steps": 3}))
        await wait_until(lambda: status(kube).get("phase") == "Succeeded", message="phase Succeeded")
        await delete(api, job_path(JOB))  # cleanup after success
        await asyncio.sleep(1.0)
    assert kube.count("create", JOBS) == 1 and status(kube).get("phase") == "Succeeded"


# --------------------------------------------------------------------------------- O7


async def test_o7_delete_while_the_operator_is_down(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest())
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
    await delete(api, ftj_path(NAME))  # the operator is stopped: nothing may hang the delete
    assert kube.read_object(FTJ, NS, NAME) is None
    assert kube.read_object(JOBS, NS, JOB) is None  # removed through its ownerReference
    async with run_operator(registry_for(kube), kube.base_url):
        await asyncio.sleep(1.0)
    assert kube.count("create", JOBS) == 1  # nothing recreated for the deleted FineTuneJob


async def test_o7_delete_while_running(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest())
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
        await delete(api, ftj_path(NAME))
        assert kube.read_object(FTJ, NS, NAME) is None and kube.read_object(JOBS, NS, JOB) is None
        await asyncio.sleep(1.0)
    assert kube.count("create", JOBS) == 1
    assert not operator_requests(kube, "delete", JOBS)  # the garbage collector does it, not us


# --------------------------------------------------------------------------------- O8


async def test_o8_spec_change_after_start_is_reported_and_the_job_untouched(
    kube: KubeEmulator, api: aiohttp.ClientSession
) -> None:
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest())
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
        await start_running(api)
        await wait_until(lambda: status(kube).get("phase") == "Running", message="phase Running")
        before = kube.read_object(JOBS, NS, JOB)
        # the CRD's CEL rule refuses this on >= 1.25; the emulator, like 1.20, lets it through
        await merge_patch(api, ftj_path(NAME), {"spec": {"hyperparameters": {"epochs": 5}}})
        await wait_until(
            lambda: (condition(status(kube), "SpecImmutable") or {}).get("status") == "True", message="SpecImmutable"
        )
        message = (condition(status(kube), "SpecImmutable") or {})["message"]
        assert "spec.hyperparameters" in message and "Revert" in message
        await wait_until(lambda: posted(api, "SpecImmutable", "Warning"), message="a SpecImmutable warning")
        await merge_patch(api, ftj_path(NAME), {"spec": {"hyperparameters": {"epochs": 3}}})
        await wait_until(
            lambda: (condition(status(kube), "SpecImmutable") or {}).get("status") == "False",
            message="SpecImmutable cleared",
        )
        assert kube.read_object(JOBS, NS, JOB) == before  # never touched
    assert status(kube)["phase"] == "Running"
    assert not operator_requests(kube, "patch", JOBS) and kube.count("create", JOBS) == 1


# --------------------------------------------------------------------------------- O9


async def test_o9_repeated_applies_cause_no_writes(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    body = manifest()
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), body)
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
        await asyncio.sleep(0.7)  # settle: the timer's first observation
        mark = len(kube.requests)
        for _ in range(3):  # `kubectl apply` of an unchanged manifest
            await merge_patch(api, ftj_path(NAME), {"spec": body["spec"]})
        await asyncio.sleep(1.5)  # five timer ticks
        obj = kube.read_object(FTJ, NS, NAME) or {}
    assert obj["metadata"]["generation"] == 1  # nobody wrote the spec
    writes = [
        r
        for r in list(kube.requests)[mark:]
        if r.user_agent.startswith(("kopf/", "kubetune-operator/")) and r.method in ("PATCH", "PUT", "POST")
    ]
    assert writes == []  # no status churn, no annotation churn, no child writes
    assert kube.count("create", JOBS) == 1


# --------------------------------------------------------------------------------- O10

CANARY = "kt-canary-7f3c9a1e5b"


async def test_o10_secret_canary_never_leaks(
    kube: KubeEmulator, api: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await create(
        api,
        f"/api/v1/namespaces/{NS}/secrets",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "store-creds"},
            "stringData": {"AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE", "AWS_SECRET_ACCESS_KEY": CANARY},
        },
    )
    body = manifest()
    body["spec"]["output"]["credentialsSecret"] = "store-creds"
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), body)
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
        leaked_error = (
            f"upload to https://AKIAIOSFODNN7EXAMPLE:{CANARY}@s3.example.com/models failed: 403; "
            f"retrying https://s3.example.com/models?X-Amz-Signature={CANARY}&X-Amz-Credential={CANARY} "
            f"with aws_secret_access_key={CANARY} Authorization: Bearer {CANARY}"
        )
        summary = {"status": "failed", "reason": "StorageError", "message": leaked_error}
        await finish(api, JOB, "Failed", json.dumps(summary))
        await wait_until(lambda: status(kube).get("phase") == "Failed", message="phase Failed")
        await wait_until(lambda: posted(api, "StorageError", "Warning"), message="a StorageError warning")
    obj = kube.read_object(FTJ, NS, NAME) or {}
    message = (condition(obj["status"], "Failed") or {})["message"]
    assert "upload to https://***@s3.example.com/models failed: 403" in message  # the useful part stays
    assert CANARY not in json.dumps(obj)  # status and annotations
    assert CANARY not in json.dumps(await events(api))
    assert CANARY not in caplog.text
    job = kube.read_object(JOBS, NS, JOB) or {}
    assert CANARY not in json.dumps(job)
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {
        "name": "AWS_SECRET_ACCESS_KEY",
        "valueFrom": {"secretKeyRef": {"name": "store-creds", "key": "AWS_SECRET_ACCESS_KEY", "optional": True}},
    } in env
    assert not [
        r
        for r in kube.requests
        if r.user_agent.startswith(("kopf/", "kubetune-operator/")) and verb_resource(r)[1] == "v1/secrets"
    ]  # the operator never reads Secrets


async def test_o3_a_refused_status_patch_does_not_stop_reconciling(
    kube: KubeEmulator, api: aiohttp.ClientSession
) -> None:
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest())
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
        kube.fail_next("PATCH", STATUS_PATH, 422, times=2)  # e.g. a value an older API server refuses
        await start_running(api)
        await wait_until(lambda: status(kube).get("phase") == "Running", message="phase Running after two refusals")
        await finish(api, JOB, "Complete", json.dumps({"status": "succeeded", "steps": 3}))
        await wait_until(lambda: status(kube).get("phase") == "Succeeded", message="phase Succeeded")
    refused = [r for r in operator_requests(kube, "patch", f"{FTJ}/status") if r.status == 422]
    assert len(refused) == 2
