"""schemathesis against `kubetune api --cluster` (the Kubernetes backend on the kmock emulator,
uploads on a local fsspec store): for every operation of its OpenAPI document, generated requests
(valid and not, authenticated with a real key) never get a 5xx."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
import requests  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402

from tests.gateway.test_kube import DATA  # noqa: E402
from tests.kmock_harness import serve  # noqa: E402

EXAMPLES = 10
KEY = "key-a-0123456789abcdef"


async def test_no_operation_answers_a_server_error(tmp_path: Path) -> None:
    import uvicorn
    from kubernetes import client as k8s
    from kubetune.gateway.kube import KubeBackend
    from kubetune.gateway.server import kube_app

    started = time.time()
    access = tmp_path / "access.yaml"
    access.write_text(f"keys:\n  - {{name: a, key: {KEY}, namespace: team-a}}\n")
    async with serve() as kube:
        configuration = k8s.Configuration()
        configuration.host = kube.base_url
        app = kube_app(
            {
                "KUBETUNE_API_STORAGE": f"file://{tmp_path}/store",
                "KUBETUNE_API_ACCESS_FILE": str(access),
                "KUBETUNE_API_GPUS": "0",
            },
            client=KubeBackend.client_for(configuration),
        )
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            while not server.started:
                await asyncio.sleep(0.02)
            base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
            seen = await asyncio.to_thread(fuzz, base)
        finally:
            server.should_exit = True
            await asyncio.to_thread(thread.join, 10)
    assert all(codes for codes in seen.values())
    assert any(c == 200 for codes in seen.values() for c in codes)  # past the error paths too
    assert time.time() - started < 170


def fuzz(base: str) -> dict[str, set[int]]:
    auth = {"Authorization": f"Bearer {KEY}"}
    file_id = requests.post(
        f"{base}/v1/files", files={"file": ("t.jsonl", DATA)}, data={"purpose": "fine-tune"}, headers=auth, timeout=10
    ).json()["id"]
    job = requests.post(
        f"{base}/v1/fine_tuning/jobs",
        json={"model": "builtin://tiny-llama", "training_file": file_id},
        headers=auth,
        timeout=10,
    )
    assert job.status_code == 200, job.text
    schema = schemathesis.openapi.from_dict(requests.get(f"{base}/openapi.json", timeout=10).json())
    seen: dict[str, set[int]] = {}
    for operation in [result.ok() for result in schema.get_all_operations()]:
        codes = seen.setdefault(f"{operation.method.upper()} {operation.path}", set())

        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case) -> None:
            response = case.call(base_url=base, headers=auth, timeout=10)
            codes.add(response.status_code)
            assert response.status_code < 500, (case.method, case.formatted_path, response.text[:500])

        check()
    return seen
