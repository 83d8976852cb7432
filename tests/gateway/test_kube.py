"""kubetune.gateway.kube against the kmock emulator (the fast tier): files in object storage per
namespace, jobs as FineTuneJobs in the key's namespace, status/events/checkpoints/models from the
FineTuneJob, cancel/pause/resume through its spec, webhooks once per transition, tenancy, and the
API server's refusals as OpenAI errors.

The emulator records every request; `test_gateway_api_usage` folds the gateway's into
tests/data/gateway-api-usage.json, from which hack/chart_rbac.py writes the gateway's Role.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import pytest
import pytest_asyncio
from kubetune.gateway.backend import Conflict, Forbidden, Invalid, NotFound, Tenant, Unavailable
from kubetune.gateway.kube import GATEWAY_AGENT, WEBHOOK_ANNOTATION, KubeBackend, KubeSettings
from kubetune.gateway.objects import JobCreate
from kubetune.gateway.webhooks import WebhookConfig, WebhookSender, new_secret

from tests.gateway.test_webhooks import Receiver
from tests.kmock_harness import KubeEmulator, serve

pytestmark = pytest.mark.kmock

FTJ = "kubetune.io/v1alpha1/finetunejobs"
A = Tenant("team-a", "org-alpha", "key-a")
B = Tenant("team-b", "org-beta", "key-b")
EXAMPLE = {
    "messages": [
        {"role": "user", "content": "How do I reset my password?"},
        {"role": "assistant", "content": "Open Settings, then Security, then Reset."},
    ]
}
DATA = ("\n".join(json.dumps(EXAMPLE) for _ in range(12)) + "\n").encode()
USAGE: set[tuple[str, str]] = set()
LATER = "2100-01-01T00:10:00Z"  # after the jobs' creation, whenever the test runs


RECORDED: set[str] = set()


@pytest_asyncio.fixture
async def kube(request: pytest.FixtureRequest) -> AsyncIterator[KubeEmulator]:
    async with serve() as emulator:
        yield emulator
        USAGE.update(gateway_usage(emulator))
        RECORDED.add(request.node.originalname)


def gateway_usage(kube: KubeEmulator) -> set[tuple[str, str]]:
    from tests.kmock_harness import verb_resource

    return {verb_resource(r) for r in list(kube.requests) if r.user_agent.startswith(GATEWAY_AGENT)}


def backend_for(kube: KubeEmulator, tmp_path: Path, **kwargs: Any) -> KubeBackend:
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = kube.base_url
    settings = KubeSettings(storage=f"file://{tmp_path}/store", credentials_secret="kubetune-s3", gpus=0)
    return KubeBackend(KubeBackend.client_for(configuration), settings, **kwargs)


async def chunks(data: bytes, size: int = 100) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def set_status(api: aiohttp.ClientSession, namespace: str, name: str, status: dict[str, Any]) -> None:
    path = f"/apis/kubetune.io/v1alpha1/namespaces/{namespace}/finetunejobs/{name}/status"
    async with api.patch(
        path, data=json.dumps({"status": status}), headers={"Content-Type": "application/merge-patch+json"}
    ) as r:
        assert r.status == 200, await r.text()


async def post_event(
    api: aiohttp.ClientSession, namespace: str, obj: dict[str, Any], reason: str, kind: str, message: str
) -> None:
    ev = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": "ev-"},
        "reason": reason,
        "type": kind,
        "message": message,
        "lastTimestamp": "2026-01-01T00:05:00Z",
        "involvedObject": {
            "kind": obj["kind"],
            "name": obj["metadata"]["name"],
            "uid": obj["metadata"]["uid"],
            "namespace": namespace,
            "apiVersion": obj["apiVersion"],
        },
    }
    async with api.post(f"/api/v1/namespaces/{namespace}/events", json=ev) as r:
        assert r.status == 201, await r.text()


async def test_files_jobs_status_events_checkpoints_models_and_tenancy(kube: KubeEmulator, tmp_path: Path) -> None:
    backend = backend_for(kube, tmp_path)
    f = await backend.create_file(A, "support.jsonl", "fine-tune", chunks(DATA))
    record = json.loads((tmp_path / "store" / "team-a" / "files" / f"{f.id}.json").read_text())
    assert (f.bytes, f.filename, record["sha256"]) == (len(DATA), "support.jsonl", hashlib.sha256(DATA).hexdigest())
    assert (tmp_path / "store" / "team-a" / "files" / f"{f.id}.jsonl").read_bytes() == DATA
    assert b"".join([c async for c in await backend.file_content(A, f.id)]) == DATA

    request = JobCreate(
        model="builtin://tiny-llama",
        training_file=f.id,
        suffix="support",
        seed=7,
        hyperparameters={"n_epochs": 1},
        metadata={"team": "support"},
    )
    job = await backend.create_job(A, request)
    assert job.status == "validating_files" and job.organization_id == "org-alpha" and job.seed == 7
    obj = kube.read_object(FTJ, "team-a", job.id)
    assert obj is not None and obj["metadata"]["labels"]["openai.kubetune.io/job-id"] == job.id
    spec = obj["spec"]
    assert spec["dataset"]["train"] == f"file://{tmp_path}/store/team-a/files/{f.id}.jsonl"
    assert spec["output"] == {
        "uri": f"file://{tmp_path}/store/team-a/jobs/{job.id}",
        "credentialsSecret": "kubetune-s3",
    }
    assert spec["hyperparameters"] == {"epochs": 1, "seed": 7} and spec["suffix"] == "support"

    # Tenancy: key B can neither read, list, download, delete, nor act on A's objects.
    for call in (
        backend.get_file(B, f.id),
        backend.file_content(B, f.id),
        backend.delete_file(B, f.id),
        backend.get_job(B, job.id),
        backend.cancel_job(B, job.id),
        backend.pause_job(B, job.id),
        backend.list_events(B, job.id, after=None, limit=10),
        backend.list_checkpoints(B, job.id, after=None, limit=10),
    ):
        with pytest.raises(NotFound):
            await call
    assert (await backend.list_files(B, purpose=None, after=None, limit=100)).data == []
    assert (await backend.list_jobs(B, after=None, limit=100, metadata={})).data == []
    with pytest.raises(Invalid) as err:  # B cannot train on A's file either
        await backend.create_job(B, JobCreate(model="builtin://tiny-llama", training_file=f.id))
    assert err.value.param == "training_file"
    assert [x.id for x in (await backend.list_files(A, purpose="fine-tune", after=None, limit=100)).data] == [f.id]
    assert [x.id for x in (await backend.list_jobs(A, after=None, limit=100, metadata={"team": "support"})).data] == [
        job.id
    ]
    assert (await backend.list_jobs(A, after=None, limit=100, metadata={"team": "other"})).data == []
    with pytest.raises(NotFound):
        await backend.get_file(A, "../team-b/files/x")  # ids never reach a path unchecked
    # A FineTuneJob labelled by hand (no request annotation) is no OpenAI job: not listed, not found.
    fake = "ftjob-" + "0" * 24
    async with aiohttp.ClientSession(base_url=kube.base_url) as api:
        async with api.post(
            "/apis/kubetune.io/v1alpha1/namespaces/team-a/finetunejobs",
            json={
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": fake, "labels": {"openai.kubetune.io/job-id": fake}},
                "spec": obj["spec"],
            },
        ) as r:
            assert r.status == 201
    with pytest.raises(NotFound):
        await backend.get_job(A, fake)
    assert [x.id for x in (await backend.list_jobs(A, after=None, limit=100, metadata={})).data] == [job.id]

    # The operator's status and Events become the OpenAI job, events and checkpoints.
    async with aiohttp.ClientSession(base_url=kube.base_url) as api:
        await set_status(
            api,
            "team-a",
            job.id,
            {
                "phase": "Running",
                "startTime": "2026-01-01T00:01:00Z",
                "progress": {"step": 20, "totalSteps": 40, "percent": 50.0, "etaSeconds": 60},
                "metrics": {"trainLoss": 1.25},
                "checkpoints": [
                    {"step": 10, "uri": "s3://x/checkpoints/step-10", "loss": 1.9, "time": "2026-01-01T00:02:00Z"},
                    {"step": 20, "uri": "s3://x/checkpoints/step-20", "loss": 1.25, "time": "2026-01-01T00:03:00Z"},
                ],
            },
        )
        await post_event(api, "team-a", obj, "TrainingStarted", "Normal", "the trainer started")
        await post_event(api, "team-a", obj, "Unschedulable", "Warning", "no node has a free GPU")
        other = {**obj, "metadata": {**obj["metadata"], "uid": "someone-else", "name": "other"}}
        await post_event(api, "team-a", other, "Noise", "Normal", "not about this job")
    running = await backend.get_job(A, job.id)
    assert running.status == "running" and running.estimated_finish is not None
    events = (await backend.list_events(A, job.id, after=None, limit=50)).data
    messages = {e.message: e for e in events}
    assert "the trainer started" in messages and "not about this job" not in messages
    assert messages["no node has a free GPU"].level == "warn"
    assert f"Created fine-tuning job: {job.id}" in messages
    metric = next(e for e in events if e.type == "metrics")
    assert metric.data == {"step": 20, "total_steps": 40, "train_loss": 1.25}
    page = await backend.list_events(A, job.id, after=None, limit=2)
    assert page.has_more and len(page.data) == 2
    rest = await backend.list_events(A, job.id, after=page.last_id, limit=50)
    assert {e.id for e in page.data}.isdisjoint(e.id for e in rest.data) and len(page.data) + len(rest.data) == len(
        events
    )
    checkpoints = (await backend.list_checkpoints(A, job.id, after=None, limit=10)).data
    assert [c.step_number for c in checkpoints] == [20, 10]
    assert (
        checkpoints[0].fine_tuned_model_checkpoint.endswith(":ckpt-step-20")
        and checkpoints[0].metrics.train_loss == 1.25
    )

    # pause / resume = spec.suspend; cancel = spec.cancel.
    paused = await backend.pause_job(A, job.id)
    assert paused.status == "queued" and kube.read_object(FTJ, "team-a", job.id)["spec"]["suspend"] is True
    resumed = await backend.resume_job(A, job.id)
    assert resumed.status == "running" and kube.read_object(FTJ, "team-a", job.id)["spec"]["suspend"] is False
    with pytest.raises(Conflict, match="not paused"):
        await backend.resume_job(A, job.id)

    async with aiohttp.ClientSession(base_url=kube.base_url) as api:
        await set_status(api, "team-a", job.id, {"phase": "Succeeded", "completionTime": LATER})
    done = await backend.get_job(A, job.id)
    assert done.status == "succeeded" and done.finished_at == 4102445400
    assert done.fine_tuned_model == f"ft:tiny-llama:org-alpha:support:{job.id.removeprefix('ftjob-')}"
    assert [m.id for m in await backend.list_models(A)] == [done.fine_tuned_model]
    assert (await backend.get_model(A, done.fine_tuned_model)).owned_by == "org-alpha"
    assert await backend.list_models(B) == []
    with pytest.raises(NotFound):
        await backend.get_model(B, done.fine_tuned_model)
    with pytest.raises(Conflict, match="already succeeded"):
        await backend.cancel_job(A, job.id)
    assert (await backend.list_events(A, job.id, after=None, limit=1)).data[
        0
    ].message == "The job has successfully completed"

    second = await backend.create_job(A, JobCreate(model="builtin://tiny-llama", training_file=f.id))
    cancelled = await backend.cancel_job(A, second.id)
    assert cancelled.status == "cancelled" and kube.read_object(FTJ, "team-a", second.id)["spec"]["cancel"] is True

    # A failure's param names the uploaded file's line, in OpenAI's terms.
    third = await backend.create_job(A, JobCreate(model="builtin://tiny-llama", training_file=f.id))
    uri = f"file://{tmp_path}/store/team-a/files/{f.id}.jsonl"
    async with aiohttp.ClientSession(base_url=kube.base_url) as api:
        await set_status(
            api,
            "team-a",
            third.id,
            {
                "phase": "Failed",
                "completionTime": "2026-01-01T00:10:00Z",
                "error": {"code": "InvalidData", "param": f"{uri}:3", "message": f"{uri}:3: no assistant message"},
            },
        )
    failed = await backend.get_job(A, third.id)
    assert failed.status == "failed" and failed.error.param == "training_file:3"
    assert failed.error.message == f"{f.id} (support.jsonl):3: no assistant message"

    deleted = await backend.delete_file(A, f.id)
    assert deleted.deleted and not (tmp_path / "store" / "team-a" / "files" / f"{f.id}.jsonl").exists()
    with pytest.raises(NotFound):
        await backend.get_file(A, f.id)


async def test_a_failed_upload_keeps_nothing(kube: KubeEmulator, tmp_path: Path) -> None:
    backend = backend_for(kube, tmp_path)

    async def broken() -> AsyncIterator[bytes]:
        yield DATA[:50]
        raise Invalid("the file has more than 1 lines", param="file")

    with pytest.raises(Invalid):
        await backend.create_file(A, "x.jsonl", "fine-tune", broken())
    assert list((tmp_path / "store" / "team-a" / "files").iterdir()) == []
    assert (await backend.list_files(A, purpose=None, after=None, limit=10)).data == []


async def test_api_server_refusals_become_openai_errors(kube: KubeEmulator, tmp_path: Path) -> None:
    backend = backend_for(kube, tmp_path)
    f = await backend.create_file(A, "d.jsonl", "fine-tune", chunks(DATA))
    request = JobCreate(model="builtin://tiny-llama", training_file=f.id)
    kube.fail_next(
        "POST", r"/finetunejobs$", 403, message='finetunejobs.kubetune.io is forbidden: User "x" cannot create'
    )
    with pytest.raises(Forbidden, match="gateway Role"):
        await backend.create_job(A, request)
    kube.fail_next("POST", r"/finetunejobs$", 503)
    with pytest.raises(Unavailable) as err:
        await backend.create_job(A, request)
    assert err.value.retry_after and err.value.status == 503
    kube.fail_next("GET", r"/finetunejobs$", 500)
    with pytest.raises(Unavailable):
        await backend.list_jobs(A, after=None, limit=10, metadata={})
    with pytest.raises(Invalid) as bad:  # the job's webhook needs the namespace's secret
        await backend.create_job(
            A,
            JobCreate(
                model="builtin://tiny-llama",
                training_file=f.id,
                metadata={"webhook_url": "https://hooks.example.com/x"},
            ),
        )
    assert bad.value.param == "metadata.webhook_url"
    assert kube.count("create", FTJ) == 2  # the refused ones only; the invalid one never reached the API


async def test_webhooks_are_delivered_once_per_transition_with_the_annotation_as_ledger(
    kube: KubeEmulator, tmp_path: Path
) -> None:
    secret = new_secret()
    receiver = Receiver(secret, [500])
    own = Receiver(secret, [])  # a job's own endpoint (metadata.webhook_url), signed with the namespace's secret
    app = aiohttp.web.Application()
    app.router.add_post("/hook", receiver.handle)
    app.router.add_post("/job-hook", own.handle)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"  # type: ignore[union-attr]
    configs = [WebhookConfig(namespace="team-a", url=url, secret=secret)]
    backend = backend_for(kube, tmp_path, webhooks=lambda: configs, sender=WebhookSender(base_delay=0.05))
    try:
        f = await backend.create_file(A, "d.jsonl", "fine-tune", chunks(DATA))
        job = await backend.create_job(A, JobCreate(model="builtin://tiny-llama", training_file=f.id))
        other = await backend.create_job(
            B,
            JobCreate(
                model="builtin://tiny-llama",
                training_file=(await backend.create_file(B, "d.jsonl", "fine-tune", chunks(DATA))).id,
            ),
        )
        routed = await backend.create_job(
            A,
            JobCreate(
                model="builtin://tiny-llama",
                training_file=f.id,
                metadata={"webhook_url": url.replace("/hook", "/job-hook")},
            ),
        )
        assert await backend.poll_webhooks() == 0  # nothing finished yet
        async with aiohttp.ClientSession(base_url=kube.base_url) as api:
            await set_status(api, "team-a", job.id, {"phase": "Succeeded", "completionTime": "2026-01-01T00:10:00Z"})
            await set_status(api, "team-b", other.id, {"phase": "Succeeded", "completionTime": "2026-01-01T00:10:00Z"})
        assert (await backend.cancel_job(A, routed.id)).status == "cancelled"
        assert await backend.poll_webhooks() == 1  # team-b has no webhook; the cancel waits for the operator
        async with aiohttp.ClientSession(base_url=kube.base_url) as api:
            await set_status(api, "team-a", routed.id, {"phase": "Cancelled", "completionTime": "2026-01-01T00:10:00Z"})
        assert await backend.poll_webhooks() == 1
        assert await backend.poll_webhooks() == 0  # claimed: never twice
        await backend.dispatcher.sender.drain(10)
        assert await backend.poll_webhooks() == 0
        annotations = kube.read_object(FTJ, "team-a", job.id)["metadata"]["annotations"]
        assert annotations[WEBHOOK_ANNOTATION + "succeeded"] == "delivered"
        assert [r["verified"] for r in receiver.received] == [True, True]  # the 500, then the retry
        assert receiver.received[-1]["payload"]["type"] == "fine_tuning.job.succeeded"
        assert receiver.received[-1]["payload"]["data"] == {"id": job.id}
        assert [(r["verified"], r["payload"]["type"], r["payload"]["data"]["id"]) for r in own.received] == [
            (True, "fine_tuning.job.cancelled", routed.id)
        ]
        # A second gateway (a restart) finds the ledger and sends nothing again.
        again = backend_for(kube, tmp_path, webhooks=lambda: configs)
        assert await again.poll_webhooks() == 0
        await again.close()
    finally:
        await backend.close()
        await runner.cleanup()


async def test_the_cluster_app_over_http_keys_tenancy_metrics(kube: KubeEmulator, tmp_path: Path) -> None:
    """`kubetune api`'s cluster mode (kubetune.gateway.server) over real HTTP: 401 in OpenAI's
    envelope, each key in its own namespace, /metrics counting requests by route template."""
    import uvicorn
    from kubernetes import client as k8s
    from kubetune.gateway.server import ConfigError, kube_app

    access = tmp_path / "access.yaml"
    access.write_text(
        "keys:\n  - {name: a, key: key-a-0123456789abcdef, namespace: team-a}\n"
        "  - {name: b, key: key-b-0123456789abcdef, namespace: team-b, organization: org-b}\n"
    )
    configuration = k8s.Configuration()
    configuration.host = kube.base_url
    env = {
        "KUBETUNE_API_STORAGE": f"file://{tmp_path}/store",
        "KUBETUNE_API_ACCESS_FILE": str(access),
        "KUBETUNE_API_GPUS": "0",
    }
    with pytest.raises(ConfigError, match="KUBETUNE_API_STORAGE"):
        kube_app({**env, "KUBETUNE_API_STORAGE": ""}, client=object())
    with pytest.raises(ConfigError, match="KUBETUNE_API_GPUS"):
        kube_app({**env, "KUBETUNE_API_GPUS": "one"}, client=object())
    app = kube_app(env, client=KubeBackend.client_for(configuration))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}") as http:
            async with http.get("/v1/files") as r:
                assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"
            key_a = {"Authorization": "Bearer key-a-0123456789abcdef"}
            key_b = {"Authorization": "Bearer key-b-0123456789abcdef"}
            form = aiohttp.FormData()
            form.add_field("purpose", "fine-tune")
            form.add_field("file", DATA, filename="train.jsonl", content_type="application/jsonl")
            async with http.post("/v1/files", data=form, headers=key_a) as r:
                assert r.status == 200, await r.text()
                file_id = (await r.json())["id"]
            async with http.post(
                "/v1/fine_tuning/jobs", json={"model": "builtin://tiny-llama", "training_file": file_id}, headers=key_a
            ) as r:
                assert r.status == 200, await r.text()
                job = await r.json()
            assert job["organization_id"] == "org-team-a" and kube.read_object(FTJ, "team-a", job["id"]) is not None
            for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content", f"/v1/fine_tuning/jobs/{job['id']}"):
                async with http.get(path, headers=key_b) as r:
                    assert r.status == 404, path
            async with http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=key_b) as r:
                assert r.status == 404
            async with http.get("/v1/fine_tuning/jobs", headers=key_b) as r:
                assert (await r.json())["data"] == []
            async with http.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=key_a) as r:
                assert (await r.json())["status"] == "validating_files"
            async with http.get("/healthz") as r:
                assert r.status == 200
            async with http.get("/metrics") as r:
                text = await r.text()
        assert 'kubetune_api_requests_total{code="404",method="GET",route="/v1/files/{file_id}"} 1.0' in text
        assert 'kubetune_api_requests_total{code="200",method="POST",route="/v1/fine_tuning/jobs"} 1.0' in text
        assert 'kubetune_api_requests_total{code="401",method="GET",route="/v1/files"} 1.0' in text
        assert f'route="/v1/fine_tuning/jobs/{job["id"]}"' not in text  # templates, never ids
        assert 'kubetune_api_request_duration_seconds_count{method="POST",route="/v1/files"} 1.0' in text
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def test_gateway_api_usage() -> None:
    """What the tests above saw the gateway do (run after them: pytest keeps file order); the
    gateway's Role in the chart is generated from tests/data/gateway-api-usage.json."""
    from tests.api_usage import split

    usage_file = Path(__file__).resolve().parents[1] / "data" / "gateway-api-usage.json"
    recording = {
        name for name, fn in globals().items() if name.startswith("test_") and "kube" in fn.__code__.co_varnames[:3]
    }
    if recording != RECORDED:
        pytest.skip(f"a partial run ({len(RECORDED)} of {len(recording)} recording tests) cannot know the usage")
    measured = sorted(
        {(verb, *split(resource)) for verb, resource in USAGE if not resource.startswith("/")},
        key=lambda t: (t[1], t[2], t[0]),
    )
    document = {"always": [{"verb": v, "group": g, "resource": r} for v, g, r in measured]}
    text = json.dumps(document, indent=2) + "\n"
    import os

    if os.environ.get("KUBETUNE_UPDATE_GOLDEN") == "1":
        usage_file.write_text(text)
    assert usage_file.read_text() == text, (
        "the gateway's API usage changed: rerun with KUBETUNE_UPDATE_GOLDEN=1 and `make chart-rbac`"
    )
