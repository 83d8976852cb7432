"""spec.serving (issue 20) against the real handlers on the kmock emulator: the serving object is
created once the job Succeeded (never before), owned by the FineTuneJob unless retained, and its
own status (the test stands in for KServe's controller and the Deployment controller) drives
status.serving and the Serving condition; a refused create (403: the chart's serving RBAC is off)
and a cluster without KServe say what to do."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import aiohttp
import kmock
import pytest

from tests.fast.ftj import (
    JOB,
    NAME,
    NS,
    SETTINGS,
    condition,
    create,
    finish,
    ftj_path,
    manifest,
    merge_patch,
    registry_for,
    status,
)
from tests.kmock_harness import VERBS, KubeEmulator, run_operator, wait_until

pytestmark = [pytest.mark.kmock]

LLMISVC = "serving.kserve.io/v1alpha1/llminferenceservices"
ISVC = "serving.kserve.io/v1beta1/inferenceservices"
DEPLOYMENTS = "apps/v1/deployments"
SERVE = f"{NAME}-serve"
RECHECK = dataclasses.replace(SETTINGS, serving_recheck_seconds=0.5)  # a Ready object is re-read this often
ADAPTER = "s3://models/support-bot/adapter"


def declare(kube: KubeEmulator, resource: str, kind: str) -> None:
    """Install a kind in the emulator (its discovery then lists it), as a CRD or a built-in would."""
    kube.resources[resource] = kmock.ResourceInfo(
        kind=kind, singular=kind.lower(), namespaced=True, verbs=VERBS, subresources={"status"}, shortnames=set()
    )


def serving_manifest(**serving: Any) -> dict[str, Any]:
    return manifest(serving={"engine": "kserve", "modelName": "support-bot", **serving})


async def succeed(api: aiohttp.ClientSession) -> None:
    """Stand in for the Job controller and kubelet: the trainer pod ends with its summary, the Job Completes."""
    summary = {"status": "succeeded", "steps": 30, "adapter": {"uri": ADAPTER, "sha256": "a" * 64, "bytes": 1234}}
    await finish(api, JOB, "Complete", json.dumps(summary))


def serving_condition(kube: KubeEmulator) -> dict[str, Any]:
    return condition(status(kube), "Serving") or {}


async def test_kserve_object_after_succeeded_owned_and_ready_when_it_says(
    kube: KubeEmulator, api: aiohttp.ClientSession
) -> None:
    declare(kube, LLMISVC, "LLMInferenceService")
    declare(kube, ISVC, "InferenceService")
    async with run_operator(registry_for(kube, RECHECK), kube.base_url):
        ftj = await create(api, ftj_path(), serving_manifest())
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
        await asyncio.sleep(1)  # a few observe ticks while training: nothing is served yet
        assert kube.read_object(LLMISVC, NS, SERVE) is None and "serving" not in status(kube)
        await succeed(api)
        await wait_until(
            lambda: kube.read_object(LLMISVC, NS, SERVE) is not None, timeout=15, message="the LLMInferenceService"
        )
        assert kube.read_object(ISVC, NS, SERVE) is None  # the LLM kind is preferred where both are installed
        obj = kube.read_object(LLMISVC, NS, SERVE)
        assert obj["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "name": NAME,
                "uid": ftj["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert obj["spec"]["model"]["lora"]["adapters"] == [{"name": "support-bot", "uri": ADAPTER}]
        await wait_until(
            lambda: serving_condition(kube).get("reason") in ("ServingCreated", "ServingNotReady"),
            message="ServingCreated",
        )
        st = status(kube)
        assert st["phase"] == "Succeeded"
        assert st["serving"]["kind"] == "LLMInferenceService" and st["serving"]["name"] == SERVE
        assert st["serving"]["model"] == "support-bot" and st["serving"]["ready"] is False
        assert serving_condition(kube)["status"] == "False"
        # KServe's controller reports the object Ready, with its URL
        await merge_patch(
            api,
            f"/apis/serving.kserve.io/v1alpha1/namespaces/{NS}/llminferenceservices/{SERVE}/status",
            {
                "status": {
                    "url": "http://support-bot-serve.default.example.com",
                    "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T02:00:00Z"}],
                }
            },
        )
        await wait_until(
            lambda: status(kube).get("serving", {}).get("ready") is True, timeout=15, message="status.serving.ready"
        )
        st = status(kube)
        assert st["serving"]["url"] == "http://support-bot-serve.default.example.com/v1"
        assert serving_condition(kube)["status"] == "True" and serving_condition(kube)["reason"] == "ServingReady"
        # and back: the object stops being Ready
        await merge_patch(
            api,
            f"/apis/serving.kserve.io/v1alpha1/namespaces/{NS}/llminferenceservices/{SERVE}/status",
            {"status": {"conditions": [{"type": "Ready", "status": "False", "message": "pods crash-looping"}]}},
        )
        await wait_until(
            lambda: serving_condition(kube).get("reason") == "ServingNotReady", timeout=15, message="ServingNotReady"
        )
        assert status(kube)["serving"]["ready"] is False and status(kube)["serving"]["message"] == "pods crash-looping"


async def test_retained_vllm_deployment_has_no_owner_and_reads_replicas(
    kube: KubeEmulator, api: aiohttp.ClientSession
) -> None:
    declare(kube, DEPLOYMENTS, "Deployment")
    # the Deployment and Service of a former run, retained (no owner), carry our labels: adopted and patched
    labels = {"app.kubernetes.io/managed-by": "kubetune-operator", "kubetune.io/finetunejob": NAME}
    await create(
        api,
        f"/api/v1/namespaces/{NS}/services",
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": SERVE, "labels": labels}, "spec": {}},
    )
    await create(
        api,
        f"/apis/apps/v1/namespaces/{NS}/deployments",
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": SERVE, "labels": labels}, "spec": {}},
    )
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest(serving={"engine": "vllm", "retain": True, "vllm": {"replicas": 1}}))
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
        await succeed(api)
        await wait_until(
            lambda: (kube.read_object("v1/services", NS, SERVE) or {}).get("spec", {}).get("ports"),
            timeout=15,
            message="the Service patched",
        )
        await wait_until(
            lambda: (kube.read_object(DEPLOYMENTS, NS, SERVE) or {}).get("spec", {}).get("template"),
            timeout=15,
            message="the Deployment patched",
        )
        deployment = kube.read_object(DEPLOYMENTS, NS, SERVE)
        service = kube.read_object("v1/services", NS, SERVE)
        assert (
            "ownerReferences" not in deployment["metadata"]
            and service is not None
            and "ownerReferences" not in service["metadata"]
        )
        fetch_command = deployment["spec"]["template"]["spec"]["initContainers"][0]["command"]
        assert fetch_command[fetch_command.index("--uri") + 1] == ADAPTER
        await wait_until(lambda: status(kube).get("serving", {}).get("kind") == "Deployment", message="status.serving")
        assert status(kube)["serving"]["url"] == f"http://{SERVE}.{NS}.svc:8000/v1"
        await merge_patch(
            api,
            f"/apis/apps/v1/namespaces/{NS}/deployments/{SERVE}/status",
            {"status": {"availableReplicas": 1, "conditions": [{"type": "Available", "status": "True"}]}},
        )
        await wait_until(
            lambda: serving_condition(kube).get("reason") == "ServingReady", timeout=15, message="ServingReady"
        )
        assert status(kube)["serving"]["ready"] is True


async def test_forbidden_says_to_enable_serving_in_the_chart(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    declare(kube, LLMISVC, "LLMInferenceService")
    kube.fail_next(
        "POST",
        r"/llminferenceservices$",
        403,
        message='llminferenceservices.serving.kserve.io is forbidden: User "system:serviceaccount:kubetune:kubetune" '
        'cannot create resource "llminferenceservices"',
    )
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), serving_manifest())
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
        await succeed(api)
        await wait_until(
            lambda: serving_condition(kube).get("reason") == "ServingFailed", timeout=15, message="ServingFailed"
        )
        cond = serving_condition(kube)
        assert cond["status"] == "False" and "serving.enabled" in cond["message"] and "HTTP 403" in cond["message"]
        assert status(kube)["phase"] == "Succeeded"  # the training result stands
        assert kube.read_object(LLMISVC, NS, SERVE) is None


async def test_no_kserve_says_to_install_it(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), serving_manifest())
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
        await succeed(api)
        await wait_until(
            lambda: serving_condition(kube).get("reason") == "ServingCRDMissing",
            timeout=15,
            message="ServingCRDMissing",
        )
        cond = serving_condition(kube)
        assert (
            cond["status"] == "False"
            and "install KServe" in cond["message"]
            and "spec.serving.engine" in cond["message"]
        )
        assert status(kube)["serving"]["engine"] == "kserve" and "kind" not in status(kube)["serving"]


async def test_vllm_endpoint_registers_the_adapter_with_the_api_key(
    kube: KubeEmulator, api: aiohttp.ClientSession
) -> None:
    from aiohttp import web

    declare(kube, "v1/secrets", "Secret")
    seen: list[tuple[dict[str, Any], str | None]] = []

    async def load(request: web.Request) -> web.Response:
        seen.append((await request.json(), request.headers.get("Authorization")))
        return web.Response(text="Success: LoRA adapter added successfully.")

    app = web.Application()
    app.router.add_post("/v1/load_lora_adapter", load)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        await create(
            api,
            f"/api/v1/namespaces/{NS}/secrets",
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "vllm-key"}, "data": {"api-key": "c2VrcmV0"}},
        )
        async with run_operator(registry_for(kube), kube.base_url):
            await create(
                api,
                ftj_path(),
                manifest(
                    serving={
                        "engine": "vllmEndpoint",
                        "modelName": "support-bot",
                        "vllmEndpoint": {"url": url, "apiKeySecret": "vllm-key"},
                    }
                ),
            )
            await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
            await asyncio.sleep(0.7)
            assert seen == []  # not before the job succeeded
            await succeed(api)
            await wait_until(
                lambda: serving_condition(kube).get("reason") == "AdapterRegistered",
                timeout=15,
                message="AdapterRegistered",
            )
            assert seen[0] == ({"lora_name": "support-bot", "lora_path": ADAPTER}, "Bearer sekret")
            st = status(kube)["serving"]
            assert st["ready"] is True and st["kind"] == "VLLMEndpoint" and st["url"] == f"{url}/v1"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("resource", "kind"), [(LLMISVC, "LLMInferenceService"), (ISVC, "InferenceService")])
async def test_an_existing_object_of_ours_is_adopted_and_patched(
    kube: KubeEmulator, api: aiohttp.ClientSession, resource: str, kind: str
) -> None:
    """A restarted operator (or a second tick) meets its own object: 409, then patched to what was built."""
    declare(kube, resource, kind)
    group_version, plural = resource.rsplit("/", 1)
    async with run_operator(registry_for(kube), kube.base_url):
        ftj = await create(api, ftj_path(), serving_manifest())
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
        owner = {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "name": NAME,
            "uid": ftj["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
        await create(
            api,
            f"/apis/{group_version}/namespaces/{NS}/{plural}",
            {
                "apiVersion": group_version,
                "kind": kind,
                "metadata": {"name": SERVE, "ownerReferences": [owner]},
                "spec": {"stale": True},
            },
        )
        await succeed(api)
        await wait_until(
            lambda: (
                (kube.read_object(resource, NS, SERVE) or {})
                .get("spec", {})
                .get("model" if kind == "LLMInferenceService" else "predictor")
                is not None
            ),
            timeout=15,
            message="the object patched",
        )
        await wait_until(lambda: status(kube).get("serving", {}).get("kind") == kind, message="status.serving.kind")


async def test_a_foreign_object_holding_the_name_is_left_alone(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    declare(kube, DEPLOYMENTS, "Deployment")
    await create(
        api,
        f"/apis/apps/v1/namespaces/{NS}/deployments",
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": SERVE}, "spec": {"replicas": 3}},
    )
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest(serving={"engine": "vllm"}))
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
        await succeed(api)
        await wait_until(
            lambda: serving_condition(kube).get("reason") == "ServingFailed", timeout=15, message="ServingFailed"
        )
        assert "not owned by this FineTuneJob" in serving_condition(kube)["message"]
    assert kube.read_object(DEPLOYMENTS, NS, SERVE)["spec"] == {"replicas": 3}
