"""Smoke tests of the kmock-based fast tier: kopf + KubeEmulator, and the emulator's own gaps."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import kopf
import pytest

from tests.kmock_harness import (
    KubeEmulator,
    fetch,
    run_operator,
    verb_resource,
    wait_until,
)

pytestmark = [pytest.mark.kmock, pytest.mark.asyncio]

FTJ = "kubetune.io/v1alpha1/finetunejobs"
JOBS = "batch/v1/jobs"
NS = "default"


def ftj_path(name: str | None = None, sub: str | None = None, ns: str = NS) -> str:
    return (
        f"/apis/kubetune.io/v1alpha1/namespaces/{ns}/finetunejobs"
        + (f"/{name}" if name else "")
        + (f"/{sub}" if sub else "")
    )


def job_path(name: str | None = None, ns: str = NS) -> str:
    return f"/apis/batch/v1/namespaces/{ns}/jobs" + (f"/{name}" if name else "")


def ftj(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {"model": "tiny-llama", **spec},
    }


async def gone(api: aiohttp.ClientSession, path: str) -> bool:
    return await fetch(api, path) is None


async def create(api: aiohttp.ClientSession, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with api.post(path, json=body) as resp:
        assert resp.status == 201, await resp.text()
        return await resp.json()


async def patch(
    api: aiohttp.ClientSession, path: str, body: Any, *, json_patch: bool = False
) -> aiohttp.ClientResponse:
    ctype = "application/json-patch+json" if json_patch else "application/merge-patch+json"
    async with api.patch(path, data=json.dumps(body), headers={"Content-Type": ctype}) as resp:
        await resp.read()
        return resp


async def next_events(resp: aiohttp.ClientResponse, count: int, timeout: float = 5) -> list[tuple[str, str]]:
    events = []
    for _ in range(count):
        line = await asyncio.wait_for(resp.content.readline(), timeout)
        event = json.loads(line)
        events.append((event["type"], event["object"]["metadata"]["name"]))
    return events


def make_registry(base_url: str) -> kopf.OperatorRegistry:
    """A tiny operator: a FineTuneJob gets an adopted batch/v1 Job and status.phase=Running."""
    registry = kopf.OperatorRegistry()

    @kopf.on.create("kubetune.io", "v1alpha1", "finetunejobs", registry=registry)
    async def create_job(body: kopf.Body, name: str, namespace: str | None, patch: kopf.Patch, **_: Any) -> None:
        job: dict[str, Any] = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name},
            "spec": {
                "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "train", "image": "trainer"}]}}
            },
        }
        kopf.adopt(job, owner=body)
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base_url}{job_path(ns=namespace or NS)}", json=job) as resp:
                if resp.status == 429:
                    raise kopf.TemporaryError("throttled", delay=float(resp.headers.get("Retry-After", 1)))
                if resp.status != 409:  # 409: created by an earlier attempt
                    resp.raise_for_status()
        patch.status["phase"] = "Running"
        kopf.info(body, reason="JobCreated", message=f"Job {name} is created")

    return registry


async def handled(api: aiohttp.ClientSession, name: str) -> bool:
    """The FineTuneJob is Running and its Job exists, owned by it (by uid)."""
    obj, job = await fetch(api, ftj_path(name)), await fetch(api, job_path(name))
    if obj is None or job is None or obj.get("status", {}).get("phase") != "Running":
        return False
    owners = job["metadata"].get("ownerReferences", [])
    assert [(o["kind"], o["name"], o["uid"]) for o in owners] == [("FineTuneJob", name, obj["metadata"]["uid"])]
    return True


async def posted(api: aiohttp.ClientSession, reason: str, uid: str) -> bool:
    events = await fetch(api, f"/api/v1/namespaces/{NS}/events")
    assert events is not None
    return any(e["reason"] == reason and e["involvedObject"]["uid"] == uid for e in events["items"])


@pytest.mark.repeat(20)  # the acceptance: 20 passes in a row, every CI run
async def test_smoke_create_adopt_status_delete_gc(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    async with run_operator(make_registry(kube.base_url), kube.base_url):
        created = await create(api, ftj_path(), ftj("smoke"))
        assert created["metadata"]["generation"] == 1 and created["metadata"]["uid"]
        await wait_until(lambda: handled(api, "smoke"), message="the FineTuneJob to be handled")
        await wait_until(lambda: posted(api, "JobCreated", created["metadata"]["uid"]), message="a k8s event")

        async with api.delete(ftj_path("smoke")) as resp:
            assert resp.status == 200
        await wait_until(lambda: gone(api, ftj_path("smoke")), message="the deletion")  # no finalizer hangs it
        await wait_until(lambda: gone(api, job_path("smoke")), message="the GC")  # via ownerReferences
    assert kube.count("create", JOBS) == 1
    assert kube.count("patch", FTJ + "/status") >= 1


async def test_watch_resumes_from_resource_version(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    a = await create(api, ftj_path(), ftj("a"))
    since = a["metadata"]["resourceVersion"]
    await create(api, ftj_path(), ftj("b"))
    assert (await patch(api, ftj_path("a"), {"metadata": {"labels": {"x": "y"}}})).status == 200

    url = ftj_path() + f"?watch=true&resourceVersion={since}"
    async with api.get(url) as resp:
        assert await next_events(resp, 2) == [("ADDED", "b"), ("MODIFIED", "a")]
        async with api.delete(ftj_path("b")):
            pass
        await create(api, ftj_path(), ftj("c"))
        # Exactly the later events, nothing replayed twice, nothing in between.
        assert await next_events(resp, 2) == [("DELETED", "b"), ("ADDED", "c")]

    async with api.get(ftj_path() + "?watch=true") as resp:  # no resourceVersion: the current state
        assert await next_events(resp, 2) == [("ADDED", "a"), ("ADDED", "c")]
    async with api.get(ftj_path() + "?watch=true&labelSelector=x%3Dy") as resp:
        assert await next_events(resp, 1) == [("ADDED", "a")]
        await create(api, ftj_path(), {**ftj("d"), "metadata": {"name": "d", "labels": {"x": "y"}}})
        assert await next_events(resp, 1) == [("ADDED", "d")]  # 'c' & other non-matching are skipped


async def test_watch_subscribes_before_replay(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    listing = await fetch(api, ftj_path())
    assert listing is not None
    names = [f"n{i}" for i in range(30)]
    url = ftj_path() + f"?watch=true&resourceVersion={listing['metadata']['resourceVersion']}"
    async with api.get(url) as resp:
        # Creations race with the watch's start: each must be seen exactly once, in order.
        await asyncio.gather(*(create(api, ftj_path(), ftj(name)) for name in names))
        events = await next_events(resp, len(names))
    assert sorted(events) == sorted(("ADDED", name) for name in names)
    objs = [kube.read_object(FTJ, NS, name) for name in names]
    by_rv = sorted(objs, key=lambda o: int(o["metadata"]["resourceVersion"]))  # type: ignore[index]
    assert [name for _, name in events] == [o["metadata"]["name"] for o in by_rv]  # type: ignore[index]


async def test_failed_json_patch_test_answers_422(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    obj = await create(api, ftj_path(), ftj("p"))
    rv = obj["metadata"]["resourceVersion"]
    ops = [{"op": "add", "path": "/metadata/finalizers", "value": ["kubetune.io/x"]}]

    stale = [{"op": "test", "path": "/metadata/resourceVersion", "value": "stale"}] + ops
    resp = await patch(api, ftj_path("p"), stale, json_patch=True)
    assert resp.status == 422
    current = await fetch(api, ftj_path("p"))
    assert current is not None and current["metadata"]["resourceVersion"] == rv  # unchanged

    fresh = [{"op": "test", "path": "/metadata/resourceVersion", "value": rv}] + ops
    async with api.patch(
        ftj_path("p"), data=json.dumps(fresh), headers={"Content-Type": "application/json-patch+json"}
    ) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["metadata"]["finalizers"] == ["kubetune.io/x"]
    assert int(body["metadata"]["resourceVersion"]) > int(rv)
    assert body["metadata"]["generation"] == 1  # a metadata-only change


async def test_429_retry_after_on_job_post_delays_the_retry(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    kube.fail_next("POST", r"^/apis/batch/v1/namespaces/[^/]+/jobs$", 429, headers={"Retry-After": "1"})
    async with run_operator(make_registry(kube.base_url), kube.base_url):
        await create(api, ftj_path(), ftj("throttled"))
        await wait_until(lambda: handled(api, "throttled"), message="the FineTuneJob to be handled")
    posts = [r for r in kube.requests if verb_resource(r) == ("create", JOBS)]
    assert [r.status for r in posts] == [429, 201]
    assert posts[1].timestamp - posts[0].timestamp >= 1.0


async def test_kopf_client_retries_5xx_and_obeys_retry_after(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    status_path = r"^/apis/kubetune.io/v1alpha1/namespaces/[^/]+/finetunejobs/[^/]+/status$"
    kube.fail_next("PATCH", status_path, 503)
    kube.fail_next("PATCH", status_path, 429, headers={"Retry-After": "1"})
    async with run_operator(make_registry(kube.base_url), kube.base_url):
        await create(api, ftj_path(), ftj("flaky"))
        await wait_until(lambda: handled(api, "flaky"), message="the FineTuneJob to be handled")
    patches = [r for r in kube.requests if verb_resource(r) == ("patch", FTJ + "/status")]
    assert [r.status for r in patches] == [503, 429, 200]
    assert patches[2].timestamp - patches[1].timestamp >= 1.0


async def test_dropped_watch_is_resumed(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    async with run_operator(make_registry(kube.base_url), kube.base_url):
        await kube.wait_for_watches(FTJ)
        await create(api, ftj_path(), ftj("before"))
        await wait_until(lambda: handled(api, "before"), message="the 1st FineTuneJob to be handled")

        watches_before = kube.count("watch", FTJ)
        assert kube.drop_watches() >= 1
        await create(api, ftj_path(), ftj("after"))  # possibly while kopf is reconnecting
        await wait_until(lambda: handled(api, "after"), message="the 2nd FineTuneJob to be handled")

    watches = [r for r in kube.requests if verb_resource(r) == ("watch", FTJ)]
    assert len(watches) > watches_before
    assert watches[-1].query.get("resourceVersion")  # resumed, not restarted from scratch
    assert kube.count("list", FTJ) == 1


async def test_object_semantics(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    # Generation: +1 on spec changes only; /status changes only the status.
    await create(api, ftj_path(), {**ftj("g"), "status": {"phase": "Ignored"}})
    await patch(api, ftj_path("g"), {"spec": {"model": "other"}, "status": {"phase": "Ignored"}})
    await patch(api, ftj_path("g", "status"), {"spec": {"model": "ignored"}, "status": {"phase": "Running"}})
    await patch(api, ftj_path("g"), {"metadata": {"annotations": {"a": "b"}}})
    obj = await fetch(api, ftj_path("g"))
    assert obj is not None
    assert obj["metadata"]["generation"] == 2
    assert obj["spec"]["model"] == "other" and obj["status"] == {"phase": "Running"}

    # PUT with a stale resourceVersion conflicts; with the current one it replaces.
    async with api.put(ftj_path("g"), json={**obj, "metadata": {**obj["metadata"], "resourceVersion": "1"}}) as resp:
        assert resp.status == 409
    async with api.put(ftj_path("g"), json={**obj, "spec": {"model": "put"}}) as resp:
        assert resp.status == 200 and (await resp.json())["spec"] == {"model": "put"}

    # Label selectors on lists.
    await create(api, ftj_path(), {**ftj("l"), "metadata": {"name": "l", "labels": {"team": "a", "tier": "x"}}})
    for selector, expected in [
        ("team=a", ["l"]),
        ("team!=a", ["g"]),
        ("team", ["l"]),
        ("!team", ["g"]),
        ("team in (a,b),tier=x", ["l"]),
        ("team notin (a)", ["g"]),
    ]:
        listing = await fetch(api, ftj_path() + f"?labelSelector={selector}")
        assert listing is not None
        assert [o["metadata"]["name"] for o in listing["items"]] == expected, selector

    # Finalizers hold the deletion; emptying them completes it and garbage-collects the dependents.
    owner = await create(api, ftj_path(), {**ftj("f"), "metadata": {"name": "f", "finalizers": ["x/y"]}})
    ref = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "f", "uid": owner["metadata"]["uid"]}
    await create(api, job_path(), {"metadata": {"name": "f-job", "ownerReferences": [ref]}})
    async with api.delete(ftj_path("f")) as resp:
        assert resp.status == 200
    terminating = await fetch(api, ftj_path("f"))
    assert terminating is not None and terminating["metadata"]["deletionTimestamp"]
    assert await fetch(api, job_path("f-job")) is not None
    await patch(api, ftj_path("f"), {"metadata": {"finalizers": None}})
    assert await fetch(api, ftj_path("f")) is None
    assert await fetch(api, job_path("f-job")) is None
