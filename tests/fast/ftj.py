"""What the fast-tier operator tests share: the FineTuneJob under test, paths, and stand-ins
for the Job controller and kubelet that write what those would write."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import aiohttp
import kopf
from kubetune.api.manifest import load_yaml as load_manifest_yaml
from kubetune.operator import handlers
from kubetune.operator.settings import OperatorSettings

from tests.kmock_harness import KubeEmulator, fetch

ROOT = pathlib.Path(__file__).resolve().parents[2]
FTJ = "kubetune.io/v1alpha1/finetunejobs"
JOBS = "batch/v1/jobs"
NS = "default"
NAME = "support-bot"
JOB = "support-bot-train"
SETTINGS = OperatorSettings(metrics_scrape_interval_seconds=0.3)


def ftj_path(name: str | None = None, sub: str | None = None) -> str:
    return (
        f"/apis/kubetune.io/v1alpha1/namespaces/{NS}/finetunejobs"
        + (f"/{name}" if name else "")
        + (f"/{sub}" if sub else "")
    )


def job_path(name: str | None = None) -> str:
    return f"/apis/batch/v1/namespaces/{NS}/jobs" + (f"/{name}" if name else "")


def manifest(prevalidate: bool = False, **spec_changes: Any) -> dict[str, Any]:
    obj = load_manifest_yaml((ROOT / "examples" / "lora.yaml").read_text())
    obj["spec"]["dataset"]["prevalidate"] = prevalidate
    obj["spec"].update(spec_changes)
    return obj


def registry_for(kube: KubeEmulator, settings: OperatorSettings = SETTINGS, **options: Any) -> kopf.OperatorRegistry:
    """A fresh registry with the operator's handlers, talking to `kube`."""
    registry = kopf.OperatorRegistry()
    handlers.register(registry, settings, api_url=kube.base_url, **options)
    return registry


async def delete(api: aiohttp.ClientSession, path: str) -> None:
    async with api.delete(path) as resp:
        assert resp.status in (200, 202), await resp.text()


async def events(api: aiohttp.ClientSession) -> list[dict[str, Any]]:
    listing = await fetch(api, f"/api/v1/namespaces/{NS}/events")
    assert listing is not None
    return listing["items"]


def condition(st: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in st.get("conditions", []) if c["type"] == ctype), None)


def pod_labels(job: str) -> dict[str, str]:
    """The labels the Job controller gives a pod: the template's (kubetune's, see
    builders.labels) and job-name."""
    return {"app.kubernetes.io/managed-by": "kubetune-operator", "job-name": job, "batch.kubernetes.io/job-name": job}


async def controller_ref(api: aiohttp.ClientSession, job: str) -> list[dict[str, Any]]:
    """The controller reference the Job controller puts on the pods it creates (the operator
    reads only pods the Job controls)."""
    obj = await fetch(api, job_path(job))
    uid = (obj or {}).get("metadata", {}).get("uid", "no-such-job")
    return [
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": job,
            "uid": uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


async def start_running(api: aiohttp.ClientSession, job: str = JOB) -> None:
    """Stand in for the Job controller: one active pod, a start time."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{job}-run01",
            "labels": pod_labels(job),
            "ownerReferences": await controller_ref(api, job),
        },
        "spec": {"containers": [{"name": "trainer", "image": "trainer"}]},
    }
    await create(api, f"/api/v1/namespaces/{NS}/pods", pod)
    await merge_patch(
        api,
        f"/api/v1/namespaces/{NS}/pods/{job}-run01/status",
        {
            "status": {
                "phase": "Running",
                "startTime": "2026-01-01T00:00:00Z",
                "containerStatuses": [{"name": "trainer", "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}],
            }
        },
    )
    await merge_patch(api, job_path(job) + "/status", {"status": {"startTime": "2026-01-01T00:00:00Z", "active": 1}})


async def create(api: aiohttp.ClientSession, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with api.post(path, json=body) as resp:
        assert resp.status == 201, await resp.text()
        return await resp.json()


async def merge_patch(api: aiohttp.ClientSession, path: str, body: dict[str, Any]) -> None:
    async with api.patch(path, data=json.dumps(body), headers={"Content-Type": "application/merge-patch+json"}) as resp:
        assert resp.status == 200, await resp.text()


def status(kube: KubeEmulator, name: str = NAME) -> dict[str, Any]:
    obj = kube.read_object(FTJ, NS, name) or {}
    return obj.get("status") or {}


async def posted(api: aiohttp.ClientSession, reason: str, kind: str | None = None) -> bool:
    events = await fetch(api, f"/api/v1/namespaces/{NS}/events")  # kopf posts events asynchronously
    assert events is not None
    return any(e["reason"] == reason and kind in (None, e["type"]) for e in events["items"])


def failed_reason(st: dict[str, Any]) -> str | None:
    return next(
        (c["reason"] for c in st.get("conditions", []) if c["type"] == "Failed" and c["status"] == "True"), None
    )


async def finish(api: aiohttp.ClientSession, job: str, condition: str, message: str | None = None) -> None:
    """Stand in for the Job controller and kubelet: one pod with a termination message, then the Job's condition."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{job}-abcde",
            "labels": pod_labels(job),
            "ownerReferences": await controller_ref(api, job),
        },
        "spec": {"containers": [{"name": "trainer", "image": "trainer"}]},
    }
    await create(api, f"/api/v1/namespaces/{NS}/pods", pod)
    terminated = {
        "exitCode": 0 if condition == "Complete" else 42,
        "startedAt": "2026-01-01T00:00:00Z",
        "finishedAt": "2026-01-01T00:10:00Z",
        **({"message": message} if message else {}),
    }
    await merge_patch(
        api,
        f"/api/v1/namespaces/{NS}/pods/{job}-abcde/status",
        {
            "status": {
                "phase": "Succeeded" if condition == "Complete" else "Failed",
                "containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}],
            }
        },
    )
    await merge_patch(
        api,
        job_path(job) + "/status",
        {
            "status": {
                "startTime": "2026-01-01T00:00:00Z",
                **(
                    {"completionTime": "2026-01-01T00:10:00Z", "succeeded": 1}
                    if condition == "Complete"
                    else {"failed": 1}
                ),
                "conditions": [{"type": condition, "status": "True", "lastTransitionTime": "2026-01-01T00:10:00Z"}],
            }
        },
    )
