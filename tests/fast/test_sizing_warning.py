"""The InsufficientGPUMemory warning (issue 14): a job whose estimate exceeds its GPU type's
memory gets the condition and a Warning Event when its Job is created, and still runs (the
estimate is a rule of thumb); with prevalidation, the DataValidated condition is kept."""

from __future__ import annotations

import json

import aiohttp
import pytest

from tests.fast.ftj import (
    JOB,
    JOBS,
    NS,
    condition,
    create,
    finish,
    ftj_path,
    manifest,
    posted,
    registry_for,
    status,
)
from tests.kmock_harness import KubeEmulator, run_operator, wait_until

pytestmark = [pytest.mark.kmock]
TOO_BIG = {
    "model": {"source": "hf://meta-llama/Llama-3.1-70B"},
    "method": {"adaptation": "full"},
    "resources": {"gpus": 1, "gpuType": "NVIDIA-H100-80GB-HBM3"},
}


async def test_a_job_too_big_for_its_gpu_gets_a_warning_and_its_job(
    kube: KubeEmulator, api: aiohttp.ClientSession
) -> None:
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest(**TOO_BIG))
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
        await wait_until(
            lambda: posted(api, "InsufficientGPUMemory", "Warning"), message="an InsufficientGPUMemory warning"
        )
    st = status(kube)
    cond = condition(st, "InsufficientGPUMemory")
    assert cond is not None and cond["status"] == "True" and cond["reason"] == "InsufficientGPUMemory"
    assert "exceeds the 79.6 GiB of NVIDIA-H100-80GB-HBM3" in cond["message"]
    assert st["phase"] == "Pending" and st["effective"]["estimatedGPUMemoryGiB"] > 79.6
    assert kube.read_object(JOBS, NS, JOB) is not None


async def test_a_job_that_fits_gets_no_warning(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest(resources={"gpus": 1, "gpuType": "NVIDIA-A100-SXM4-80GB"}))
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
    assert condition(status(kube), "InsufficientGPUMemory") is None


async def test_after_validation_the_warning_joins_data_validated(
    kube: KubeEmulator, api: aiohttp.ClientSession
) -> None:
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest(prevalidate=True, **TOO_BIG))
        await wait_until(
            lambda: kube.read_object(JOBS, NS, "support-bot-validate") is not None, message="the validation Job"
        )
        await finish(api, "support-bot-validate", "Complete", json.dumps({"status": "succeeded"}))
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
    st = status(kube)
    data = condition(st, "DataValidated")
    assert data is not None and data["status"] == "True"
    warning = condition(st, "InsufficientGPUMemory")
    assert warning is not None and warning["status"] == "True"
