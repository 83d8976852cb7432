"""The operator's own /metrics (operator/kubetune/operator/metrics.py), served while it runs:
FineTuneJobs by phase follow the watch, transitions and reconcile time are counted, and a failed
API request shows up by verb, resource and code."""

from __future__ import annotations

import socket

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fast.ftj import JOB, create, delete, ftj_path, manifest, registry_for, status
from tests.kmock_harness import KubeEmulator, run_operator, wait_until

pytestmark = [pytest.mark.kmock]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def by_phase(samples: dict, phase: str) -> float:
    return samples[("kubetune_operator_finetunejobs", (("phase", phase),))]


async def test_operator_metrics_are_served(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    port = free_port()
    kube.fail_next("POST", r"/jobs$", 503)
    async with run_operator(registry_for(kube, metrics_port=port), kube.base_url):
        before = await scrape(port)
        await create(api, ftj_path(), manifest())
        bad = manifest(method={"adaptation": "lora", "lora": {"r": 0}})
        bad["metadata"]["name"] = "broken"
        await create(api, ftj_path(), bad)
        await wait_until(
            lambda: status(kube).get("jobName") == JOB and status(kube, "broken").get("phase") == "Failed",
            timeout=15,
            message="one Pending, one Failed",
        )

        async def counted() -> bool:
            now = await scrape(port)
            return by_phase(now, "Pending") == 1 and by_phase(now, "Failed") == 1

        await wait_until(counted, message="the per-phase gauge")
        after = await scrape(port)
        assert by_phase(after, "Running") == 0
        errors = ("kubetune_operator_api_errors_total", (("code", "503"), ("resource", "jobs"), ("verb", "create")))
        assert after[errors] - before.get(errors, 0.0) == 1
        failed = ("kubetune_operator_transitions_total", (("from", "None"), ("to", "Failed")))
        assert after[failed] - before.get(failed, 0.0) == 1
        reconciles = ("kubetune_operator_reconcile_duration_seconds_count", ())
        assert after[reconciles] > before[reconciles]

        await delete(api, ftj_path("broken"))

        async def forgotten() -> bool:
            return by_phase(await scrape(port), "Failed") == 0

        await wait_until(forgotten, message="a deleted FineTuneJob leaves the gauge")
    with pytest.raises(aiohttp.ClientConnectionError):  # the server stops with the operator
        await scrape(port)
