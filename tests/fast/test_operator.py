"""The real operator (kubetune.operator.handlers) against the kmock emulator: O1, O2, suspend,
invalid spec, and a finished Job reconciled into `.status` by the timer."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import aiohttp
import kopf
import pytest
from kubetune.api.manifest import load_yaml as load_manifest_yaml

from tests.fast.ftj import (
    FTJ,
    JOB,
    JOBS,
    NAME,
    NS,
    SETTINGS,
    create,
    failed_reason,
    fetch,
    finish,
    ftj_path,
    job_path,
    manifest,
    merge_patch,
    posted,
    registry_for,
    status,
)
from tests.kmock_harness import KubeEmulator, run_operator, wait_until

pytestmark = [pytest.mark.kmock]
ROOT = pathlib.Path(__file__).resolve().parents[2]


async def test_valid_job_creates_one_owned_job(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    async with run_operator(registry_for(kube), kube.base_url):
        created = await create(api, ftj_path(), manifest())
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
        st = status(kube)
        assert st["phase"] == "Pending"
        assert st["effective"]["estimatedGPUMemoryGiB"] > 0
        assert st["effective"]["gpus"] == 1 and st["effective"]["nodes"] == 1
        assert st["observedGeneration"] == 1
    job = kube.read_object(JOBS, NS, JOB)
    assert job is not None
    assert [r["uid"] for r in job["metadata"]["ownerReferences"]] == [created["metadata"]["uid"]]
    assert kube.count("create", JOBS) == 1
    obj = kube.read_object(FTJ, NS, NAME)
    assert obj is not None and not obj["metadata"].get("finalizers")  # O7: nothing can hang the delete


@pytest.mark.parametrize("limit", [0, 2])
async def test_worker_limit_reaches_kopf_and_every_job_is_served(
    kube: KubeEmulator, api: aiohttp.ClientSession, limit: int
) -> None:
    """KUBETUNE_WORKER_LIMIT bounds kopf's concurrent workers (0: unbounded); all jobs still get Jobs."""
    from dataclasses import replace

    from tests.kmock_harness import operator_settings

    kopf_settings = operator_settings()
    registry = registry_for(kube, replace(SETTINGS, worker_limit=limit))
    async with run_operator(registry, kube.base_url, settings=kopf_settings):
        for i in range(5):
            obj = manifest()
            obj["metadata"]["name"] = f"burst-{i}"
            await create(api, ftj_path(), obj)
        await wait_until(lambda: kube.count("create", JOBS) == 5, message="five Jobs")
    assert kopf_settings.batching.worker_limit == (limit or None)
    assert all(kube.read_object(JOBS, NS, f"burst-{i}-train") is not None for i in range(5))


async def test_invalid_spec_fails_without_a_job(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    bad = manifest(method={"adaptation": "lora", "lora": {"r": 0}})
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), bad)
        await wait_until(lambda: status(kube).get("phase") == "Failed", message="phase Failed")
        await wait_until(lambda: posted(api, "InvalidSpec", "Warning"), message="an InvalidSpec warning")
    st = status(kube)
    assert failed_reason(st) == "InvalidSpec"
    assert "spec.method.lora.r" in next(c["message"] for c in st["conditions"] if c["type"] == "Failed")
    assert kube.count("create", JOBS) == 0


async def test_o1_existing_owned_job_is_adopted(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    created = await create(api, ftj_path(), manifest())
    uid = created["metadata"]["uid"]
    ref = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": NAME, "uid": uid, "controller": True}
    await create(
        api,
        job_path(),
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": JOB, "ownerReferences": [ref]}, "spec": {}},
    )
    async with run_operator(registry_for(kube), kube.base_url):
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="the Job adopted")
        assert status(kube)["phase"] in ("Pending", "Running")
    assert kube.count("create", JOBS) == 2  # ours above + the operator's one 409
    jobs = await fetch(api, job_path())
    assert jobs is not None and [j["metadata"]["name"] for j in jobs["items"]] == [JOB]


async def test_o2_foreign_job_is_a_conflict(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    foreign = await create(
        api,
        job_path(),
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": JOB, "labels": {"team": "other"}}, "spec": {}},
    )
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest())
        await wait_until(lambda: status(kube).get("phase") == "Failed", message="phase Failed")
    assert failed_reason(status(kube)) == "ChildNameConflict"
    assert "jobName" not in status(kube)
    assert kube.read_object(JOBS, NS, JOB) == foreign  # untouched


async def test_suspend_is_propagated_to_the_job(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest())
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
        assert not (kube.read_object(JOBS, NS, JOB) or {})["spec"].get("suspend")
        await merge_patch(api, ftj_path(NAME), {"spec": {"suspend": True}})
        await wait_until(
            lambda: (kube.read_object(JOBS, NS, JOB) or {})["spec"].get("suspend") is True, message="the Job suspended"
        )
        await wait_until(lambda: status(kube).get("phase") == "Suspended", message="phase Suspended")


async def test_finished_job_is_reconciled_to_succeeded(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest())
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="status.jobName")
        summary = {
            "status": "succeeded",
            "steps": 30,
            "adapter": {"uri": "s3://models/support-bot/adapter", "sha256": "a" * 64, "bytes": 1234},
            "metrics": {"trainLoss": 1.25},
        }
        await finish(api, JOB, "Complete", json.dumps(summary))
        await wait_until(lambda: status(kube).get("phase") == "Succeeded", message="phase Succeeded")
        st = status(kube)
        assert st["adapter"]["uri"] == "s3://models/support-bot/adapter"
        assert st["metrics"]["trainLoss"] == 1.25
        assert st["effective"]["estimatedGPUMemoryGiB"] > 0  # kept by the timer's patches
        await wait_until(lambda: posted(api, "TrainingSucceeded"), message="a TrainingSucceeded event")


async def test_prevalidation_then_training(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest(prevalidate=True))
        await wait_until(lambda: status(kube).get("phase") == "Validating", message="phase Validating")
        assert kube.read_object(JOBS, NS, "support-bot-validate") is not None
        assert kube.read_object(JOBS, NS, JOB) is None  # no GPU requested before the data is checked
        report = {
            "examples": 300,
            "validationExamples": 40,
            "duplicates": 2,
            "overlap": 1,
            "piiFindings": 3,
            "piiPolicy": "warn",
        }
        await finish(api, "support-bot-validate", "Complete", json.dumps({"status": "validated", "dataReport": report}))
        await wait_until(lambda: status(kube).get("jobName") == JOB, message="the trainer Job")
        st = status(kube)
        assert st["phase"] == "Pending"
        assert st["dataReport"] == report  # the dataset report's summary, from the validation pod
        assert [(c["type"], c["status"], c["reason"]) for c in st["conditions"]] == [
            ("DataValidated", "True", "DataValid"),
            ("Pending", "True", "JobPending"),
        ]
        assert st["reason"] == "JobPending"  # the phase's reason, as `kubectl get ftj -o wide` shows it
    assert kube.count("create", JOBS) == 2


async def test_prevalidation_failure_is_invalid_data(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    async with run_operator(registry_for(kube), kube.base_url):
        await create(api, ftj_path(), manifest(prevalidate=True))
        await wait_until(lambda: status(kube).get("phase") == "Validating", message="phase Validating")
        summary = {"status": "failed", "reason": "InvalidData", "message": 'train.jsonl line 3: no "messages" field'}
        await finish(api, "support-bot-validate", "Failed", json.dumps(summary))
        await wait_until(lambda: status(kube).get("phase") == "Failed", message="phase Failed")
        await wait_until(lambda: posted(api, "InvalidData", "Warning"), message="an InvalidData warning")
    st = status(kube)
    assert failed_reason(st) == "InvalidData"
    assert "train.jsonl line 3" in next(c["message"] for c in st["conditions"] if c["type"] == "Failed")
    assert kube.read_object(JOBS, NS, JOB) is None and "jobName" not in st


@pytest.mark.parametrize(
    "args, namespaces, clusterwide, standalone",
    [
        ([], [], True, True),
        (["-n", "ml", "-n", "research", "--peering"], ["ml", "research"], False, False),
        (["--all-namespaces", "--standalone"], [], True, True),
    ],
)
async def test_cli_operator_runs_kopf(
    monkeypatch: pytest.MonkeyPatch, args: list[str], namespaces: list[str], clusterwide: bool, standalone: bool
) -> None:
    from click.testing import CliRunner
    from kubetune.cli import main

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(kopf, "run", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("KUBETUNE_NAMESPACES", raising=False)
    monkeypatch.delenv("KUBETUNE_PEERING", raising=False)
    monkeypatch.setenv("KUBETUNE_PEERING_PRIORITY", "7")
    result = CliRunner().invoke(main, ["operator", *args])
    assert result.exit_code == 0, result.output
    [call] = calls
    assert (call["namespaces"], call["clusterwide"], call["standalone"]) == (namespaces, clusterwide, standalone)
    assert call["registry"] is kopf.get_default_registry()
    assert call["priority"] == 7


def test_kopf_run_module_registers_the_handlers() -> None:
    """`kopf run -m kubetune.operator` imports the package: the default registry must be filled."""
    import subprocess
    import sys

    code = (
        "import kopf, kubetune.operator;"
        "r = kopf.get_default_registry();"
        "print(len(list(r._changing.get_all_handlers())), len(list(r._spawning.get_all_handlers())))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    changing, spawning = map(int, out)
    assert changing >= 2 and spawning >= 1


async def test_multi_node_volcano_children(kube: KubeEmulator, api: aiohttp.ClientSession) -> None:
    body = load_manifest_yaml((ROOT / "examples" / "multi-node-volcano.yaml").read_text())
    body["spec"]["dataset"]["prevalidate"] = False
    del body["metadata"]["namespace"]
    name = body["metadata"]["name"]
    kube.fail_next("POST", r"/services$", 409)  # a name taken, then gone by the time it is read: retried
    async with run_operator(registry_for(kube), kube.base_url):
        created = await create(api, ftj_path(), body)
        await wait_until(lambda: status(kube, name).get("jobName") == f"{name}-train", message="status.jobName")
    uid = created["metadata"]["uid"]
    job = kube.read_object(JOBS, NS, f"{name}-train") or {}
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["template"]["spec"]["schedulerName"] == "volcano"
    group = kube.read_object("scheduling.volcano.sh/v1beta1/podgroups", NS, f"{name}-train") or {}
    assert group["spec"]["minMember"] == body["spec"]["resources"]["nodes"]
    assert [r["uid"] for r in group["metadata"]["ownerReferences"]] == [uid]
    service = kube.read_object("v1/services", NS, f"{name}-train") or {}
    assert service["spec"]["clusterIP"] == "None"
    assert kube.count("get", "v1/services") == 1 and kube.count("create", "v1/services") == 2
