"""Status reconciliation as pure functions (RELIABILITY O4, O5, O9, O10).

Fixtures are Job and Pod dicts shaped as the API server returns them for a current Job
controller (`SuccessCriteriaMet` + `Complete`, `FailureTarget` + `Failed`) and kubelet
(`containerStatuses[].state.terminated.message` carries the trainer's JSON summary).
"""

from __future__ import annotations

import copy
import json
import math
from datetime import UTC, datetime
from typing import Any

import pytest
from kubetune.api import FineTuneJobStatus
from kubetune.api.contract import PERMANENT_EXIT_CODE
from kubetune.operator.reconcile import (
    Prices,
    diff,
    end_job_patch,
    must_end_job,
    observe,
    parse_metrics,
    parse_termination,
    redact,
    transitions,
)
from kubetune.operator.settings import OperatorSettings

RUNNING_AT = datetime(2025, 3, 1, 10, 30, 0, tzinfo=UTC)
NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
LATER = datetime(2025, 3, 1, 13, 0, 0, tzinfo=UTC)
PRICES = Prices(gpu_price_per_hour_usd=2.5, grid_carbon_kg_per_kwh=0.4)
OUT = "s3://bucket/runs/demo"
JOB = "demo-train"
CANARY = "AKIAZZZZCANARY123456"
CANARY_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYCANARYKEY"


def ftj(
    status: dict | None = None, *, queue: str | None = None, suspend: bool = False, gpus: int = 2
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"source": "hf://Qwen/Qwen2.5-0.5B"},
        "dataset": {"train": "s3://bucket/data/train.jsonl"},
        "method": {"adaptation": "lora"},
        "resources": {"gpus": gpus},
        "output": {"uri": OUT},
    }
    if queue:
        spec["scheduling"] = {"queueName": queue}
    if suspend:
        spec["suspend"] = True
    obj = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "team-a", "uid": "1234", "generation": 3},
        "spec": spec,
    }
    obj["status"] = (
        status
        if status is not None
        else {"phase": "Pending", "jobName": JOB, "effective": {"batchSize": 8, "gpus": gpus}}
    )
    return obj


def job(
    *,
    suspend: bool = False,
    active: int = 0,
    failed: int = 0,
    start: str | None = None,
    conditions: list | None = None,
    completion: str | None = None,
    queue: str | None = None,
) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "kubetune", "batch.kubernetes.io/job-name": JOB}
    if queue:
        labels["kueue.x-k8s.io/queue-name"] = queue
    status: dict[str, Any] = {}
    if active:
        status["active"] = active
    if failed:
        status["failed"] = failed
    if start:
        status["startTime"] = start
    if conditions:
        status["conditions"] = conditions
    if completion:
        status["completionTime"] = completion
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": JOB, "namespace": "team-a", "labels": labels, "uid": "job-uid"},
        "spec": {
            "suspend": suspend,
            "backoffLimit": 3,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [PERMANENT_EXIT_CODE]},
                    },
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                ]
            },
            "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "trainer", "image": "trainer:1"}]}},
        },
        "status": status,
    }


def cond(type_: str, reason: str = "", message: str = "", when: str = "2025-03-01T11:00:00Z") -> dict[str, Any]:
    return {
        "type": type_,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastProbeTime": when,
        "lastTransitionTime": when,
    }


def pod(
    name: str,
    *,
    phase: str = "Running",
    started: str = "2025-03-01T10:00:00Z",
    finished: str | None = None,
    exit_code: int | None = None,
    message: str | None = None,
    gpus: int = 2,
    conditions: list | None = None,
) -> dict[str, Any]:
    if finished is None:
        state: dict[str, Any] = {"running": {"startedAt": started}}
    else:
        term: dict[str, Any] = {
            "exitCode": exit_code or 0,
            "reason": "Completed" if not exit_code else "Error",
            "startedAt": started,
            "finishedAt": finished,
            "containerID": "containerd://abc",
        }
        if message is not None:
            term["message"] = message
        state = {"terminated": term}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "team-a", "labels": {"batch.kubernetes.io/job-name": JOB}},
        "spec": {
            "containers": [
                {"name": "trainer", "resources": {"limits": {"nvidia.com/gpu": str(gpus), "memory": "40Gi"}}}
            ]
        },
        "status": {
            "phase": phase,
            "conditions": conditions or [],
            "containerStatuses": [
                {
                    "name": "trainer",
                    "ready": phase == "Running",
                    "restartCount": 0,
                    "image": "trainer:1",
                    "state": state,
                }
            ],
        },
    }


SUCCESS_SUMMARY = {
    "status": "succeeded",
    "adapter": {"uri": f"{OUT}/adapter", "manifestUri": f"{OUT}/manifest.json", "sha256": "a" * 64, "bytes": 123456},
    "metrics": {
        "trainLoss": 1.25,
        "evalLoss": 1.5,
        "baseEvalLoss": 2.25,
        "perplexity": math.exp(1.5),
        "tokenAccuracy": 0.61,
        "tokensPerSecond": 5400.0,
        "objectives": {"kdLoss": 0.3},
        "energyKWh": 1.2,
    },
    "checkpoints": [
        {"step": 100, "uri": f"{OUT}/checkpoints/step-100", "loss": 1.9, "time": "2025-03-01T10:20:00Z"},
        {"step": 200, "uri": f"{OUT}/checkpoints/step-200", "loss": 1.5, "time": "2025-03-01T10:40:00Z"},
        {"step": 300, "uri": f"{OUT}/checkpoints/step-300", "loss": 1.25, "time": "2025-03-01T10:59:00Z"},
    ],
    "checkpointCorrupt": [],
    "effective": {"batchSize": 8},
    "steps": 300,
    "durationSeconds": 3540.0,
}

METRICS_TEXT = """# HELP kubetune_trainer_step Optimizer steps completed
# TYPE kubetune_trainer_step gauge
kubetune_trainer_step 120.0
# HELP kubetune_trainer_total_steps Optimizer steps planned
# TYPE kubetune_trainer_total_steps gauge
kubetune_trainer_total_steps 300.0
# TYPE kubetune_trainer_epoch gauge
kubetune_trainer_epoch 0.8
# TYPE kubetune_trainer_train_loss gauge
kubetune_trainer_train_loss 1.75
# TYPE kubetune_trainer_eval_loss gauge
kubetune_trainer_eval_loss 1.8
# TYPE kubetune_trainer_base_eval_loss gauge
kubetune_trainer_base_eval_loss 2.25
# TYPE kubetune_trainer_eval_token_accuracy_ratio gauge
kubetune_trainer_eval_token_accuracy_ratio 0.0
# TYPE kubetune_trainer_tokens_per_second gauge
kubetune_trainer_tokens_per_second 5100.5
# TYPE kubetune_trainer_progress_ratio gauge
kubetune_trainer_progress_ratio 0.4
# TYPE kubetune_trainer_eta_seconds gauge
kubetune_trainer_eta_seconds 2400.4
# TYPE kubetune_trainer_last_checkpoint_step gauge
kubetune_trainer_last_checkpoint_step 100.0
# TYPE kubetune_trainer_last_checkpoint_timestamp_seconds gauge
kubetune_trainer_last_checkpoint_timestamp_seconds 1.7408304e+09
# TYPE kubetune_trainer_gpu_power_watts gauge
kubetune_trainer_gpu_power_watts 1300.0
# HELP kubetune_trainer_gpu_energy_joules GPU energy used (NVML), summed over this pod's GPUs
# TYPE kubetune_trainer_gpu_energy_joules counter
kubetune_trainer_gpu_energy_joules_total 3.6e+06
kubetune_trainer_gpu_energy_joules_created 1.7408268e+09
# TYPE kubetune_trainer_objective_value gauge
kubetune_trainer_objective_value{name="kdLoss"} 0.42
kubetune_trainer_objective_value{name="adversarialKl"} 0.01
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 12.0
"""


def check(status: dict) -> dict:
    """Every result must be a valid status and a fixed point of its own wire form."""
    model = FineTuneJobStatus.model_validate(status)
    assert model.wire() == status
    return status


def conditions(status: dict) -> dict[str, dict]:
    return {c["type"]: c for c in status["conditions"]}


def failed_job(reason: str, message: str, failed: int) -> dict:
    conds = [cond("FailureTarget", reason, message), cond("Failed", reason, message)]
    return job(start="2025-03-01T10:00:00Z", failed=failed, conditions=conds)


def running_status() -> dict:
    """The status after the Job ran with a scraped checkpoint pointer and one retry."""
    pods = [pod("demo-train-a1b2c")]
    status = observe(
        ftj(), job(active=1, start="2025-03-01T10:00:00Z"), pods, parse_metrics(METRICS_TEXT), PRICES, RUNNING_AT
    )
    status["retries"] = 1
    return check(status)


# ------------------------------------------------------------------------------ channels


def test_parse_termination_reads_summary_and_exit_code() -> None:
    p = pod("p", phase="Succeeded", finished="2025-03-01T11:00:00Z", exit_code=0, message=json.dumps(SUCCESS_SUMMARY))
    summary = parse_termination(p)
    assert summary is not None and summary["status"] == "succeeded" and summary["exitCode"] == 0
    assert summary["finishedAt"] == "2025-03-01T11:00:00Z"
    # lastState is read too (a container that was restarted in place)
    cs = p["status"]["containerStatuses"][0]
    cs["lastState"], cs["state"] = cs.pop("state"), {"waiting": {"reason": "ContainerCreating"}}
    again = parse_termination(p)
    assert again is not None and again["steps"] == 300


@pytest.mark.parametrize(
    "message",
    [
        "",
        "not json",
        json.dumps(SUCCESS_SUMMARY)[:400],
        "[1, 2, 3]",
        "null",
        "\x00\xff{",
        "[" * 20000 + "]" * 20000,
        "{" + '"a":' * 5000,
        "x" * 100_000,
        json.dumps({"status": "failed"}) + "trailing",
    ],
)
def test_parse_termination_garbage_is_none(message: str) -> None:
    assert (
        parse_termination(pod("p", phase="Failed", finished="2025-03-01T11:00:00Z", exit_code=1, message=message))
        is None
    )


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"status": None},
        {"status": {"containerStatuses": "x"}},
        {"status": {"containerStatuses": [None, 3]}},
        pod("running"),
        pod("p", finished="2025-03-01T11:00:00Z", exit_code=1),
    ],
)
def test_parse_termination_odd_pods_are_none(obj: dict) -> None:
    assert parse_termination(obj) is None


def test_parse_metrics_maps_series() -> None:
    values = parse_metrics(METRICS_TEXT)
    assert values["step"] == 120 and values["total_steps"] == 300 and values["progress_ratio"] == 0.4
    assert values["gpu_energy_joules_total"] == 3.6e6
    assert values["objective:kdLoss"] == 0.42 and values["objective:adversarialKl"] == 0.01
    assert not any(k.startswith("python_") or k.endswith("_created") for k in values)


@pytest.mark.parametrize(
    "text", ["", "garbage{{{", "\x00\x01", "kubetune_trainer_step NaN\n", '# TYPE x gauge\nx{a="\n', None, 42]
)
def test_parse_metrics_garbage_does_not_raise(text: Any) -> None:
    assert parse_metrics(text) == {}


def test_parse_metrics_keeps_what_parsed() -> None:
    text = "kubetune_trainer_step 7\nthis is { not prometheus\nkubetune_trainer_total_steps 9\n"
    assert parse_metrics(text) == {"step": 7.0, "total_steps": 9.0}


# ----------------------------------------------------------------------- queue / suspend


@pytest.mark.parametrize(
    "queue,user_suspend,phase,reason",
    [
        ("gpu-queue", False, "Queued", "WaitingForAdmission"),
        (None, True, "Suspended", "SuspendedByUser"),
        ("gpu-queue", True, "Suspended", "SuspendedByUser"),
    ],
)
def test_suspended_job_is_queued_or_suspended_and_keeps_retries(
    queue: str | None, user_suspend: bool, phase: str, reason: str
) -> None:
    old = {
        "phase": "Running",
        "jobName": JOB,
        "retries": 2,
        "startTime": "2025-03-01T10:00:00Z",
        "conditions": [
            {
                "type": "Running",
                "status": "True",
                "reason": "TrainingStarted",
                "message": "",
                "lastTransitionTime": "2025-03-01T10:00:00Z",
                "observedGeneration": 3,
            }
        ],
    }
    # Kueue preempted: pods evicted with DisruptionTarget, one still terminating (not active).
    evicted = pod(
        "demo-train-old",
        phase="Failed",
        finished="2025-03-01T11:30:00Z",
        exit_code=143,
        conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByKueue"}],
    )
    terminating = pod("demo-train-term")
    terminating["metadata"]["deletionTimestamp"] = "2025-03-01T11:59:00Z"
    status = check(
        observe(
            ftj(old, queue=queue, suspend=user_suspend),
            job(suspend=True, queue=queue, start=None),
            [evicted, terminating],
            None,
            PRICES,
            NOW,
        )
    )
    assert status["phase"] == phase
    c = conditions(status)
    assert c[phase]["status"] == "True" and c[phase]["reason"] == reason
    assert c["Running"]["status"] == "False" and c["Running"]["lastTransitionTime"] == "2025-03-01T12:00:00Z"
    assert "Failed" not in c
    assert status["retries"] == 2  # O5: a disruption is not a retry
    assert status["observedGeneration"] == 3 and status["jobName"] == JOB
    assert [e[:2] for e in transitions(old, status)] == [("Normal", reason)]
    # later unsuspended → Running again, retries still unchanged
    again = check(
        observe(
            ftj(status, queue=queue),
            job(active=1, start="2025-03-01T12:05:00Z", queue=queue),
            [pod("demo-train-new", started="2025-03-01T12:05:10Z")],
            None,
            PRICES,
            LATER,
        )
    )
    assert again["phase"] == "Running" and again["retries"] == 2
    assert conditions(again)[phase]["status"] == "False"
    assert again["startTime"] == "2025-03-01T10:00:00Z"  # when training first started


def test_disruptions_not_retries_even_without_ignore_rule() -> None:
    j = job(active=1, failed=2, start="2025-03-01T10:00:00Z")
    j["spec"].pop("podFailurePolicy")
    evicted = pod(
        "e",
        phase="Failed",
        finished="2025-03-01T10:30:00Z",
        exit_code=143,
        conditions=[{"type": "DisruptionTarget", "status": "True"}],
    )
    crashed = pod("c", phase="Failed", finished="2025-03-01T10:40:00Z", exit_code=1)
    status = check(observe(ftj(), j, [evicted, crashed, pod("r")], None, PRICES, NOW))
    assert status["retries"] == 1


def test_no_job_yet_keeps_old_phase() -> None:
    old = {
        "phase": "Validating",
        "jobName": JOB,
        "conditions": [
            {
                "type": "DataValidated",
                "status": "True",
                "reason": "DataValid",
                "message": "",
                "lastTransitionTime": "2025-03-01T09:00:00Z",
            }
        ],
    }
    status = check(observe(ftj(old), None, [], None, PRICES, NOW))
    assert status["phase"] == "Validating" and status["observedGeneration"] == 3
    assert conditions(status)["DataValidated"]["status"] == "True"
    assert check(observe(ftj({}), None, [], None, PRICES, NOW)).get("phase") is None


def test_created_not_started_stays_pending() -> None:
    status = check(observe(ftj(), job(), [], None, PRICES, NOW))
    assert status["phase"] == "Pending" and "Running" not in conditions(status)


# ------------------------------------------------------------------------------ running


def test_running_with_scraped_metrics_fills_progress_metrics_and_checkpoint() -> None:
    status = check(
        observe(
            ftj(),
            job(active=1, start="2025-03-01T10:00:00Z"),
            [pod("demo-train-a1b2c")],
            parse_metrics(METRICS_TEXT),
            PRICES,
            NOW,
        )
    )
    assert status["phase"] == "Running" and status["startTime"] == "2025-03-01T10:00:00Z"
    c = conditions(status)["Running"]
    assert c["status"] == "True" and c["reason"] == "TrainingStarted" and c["observedGeneration"] == 3
    assert status["progress"] == {
        "step": 120,
        "totalSteps": 300,
        "epoch": 0.8,
        "percent": 40.0,
        "etaSeconds": 2400,
        "eta": "40m00s",
    }
    m = status["metrics"]
    assert (
        m["trainLoss"] == 1.75 and m["evalLoss"] == 1.8 and m["baseEvalLoss"] == 2.25 and m["tokensPerSecond"] == 5100.5
    )
    assert m["perplexity"] == pytest.approx(math.exp(1.8))
    assert "tokenAccuracy" not in m  # an unset gauge (0) is not a measurement
    assert m["objectives"] == {"kdLoss": 0.42, "adversarialKl": 0.01}
    assert status["checkpoints"] == [
        {"step": 100, "uri": f"{OUT}/checkpoints/step-100", "time": "2025-03-01T12:00:00Z"}
    ]
    assert status["effective"] == {"batchSize": 8, "gpus": 2} and status["jobName"] == JOB and status["retries"] == 0
    assert "completionTime" not in status and "adapter" not in status
    assert transitions(ftj()["status"], status) == [
        ("Normal", "TrainingStarted", "Pending → Running: Job demo-train: the trainer runs in pod demo-train-a1b2c")
    ]


def test_cost_math() -> None:
    # two pods × 2 GPUs: one ran 10:00→11:00 then failed, one runs since 11:00 (now 12:00)
    pods = [
        pod("a", phase="Failed", started="2025-03-01T10:00:00Z", finished="2025-03-01T11:00:00Z", exit_code=1),
        pod("b", started="2025-03-01T11:00:00Z"),
        pod("pending", phase="Pending"),
    ]
    pods[2]["status"]["containerStatuses"][0]["state"] = {"waiting": {"reason": "ContainerCreating"}}
    scraped = {"gpu_energy_joules_total": 7.2e6}  # 2 kWh
    status = check(observe(ftj(), job(active=1, failed=1, start="2025-03-01T10:00:00Z"), pods, scraped, PRICES, NOW))
    assert status["cost"] == {"gpuHours": 4.0, "estimatedUSD": 10.0, "energyKWh": 2.0, "co2Kg": 0.8}
    # OperatorSettings-like objects and plain tuples both work; cost never decreases when pods vanish
    assert (
        observe(ftj(status), job(active=1, start="2025-03-01T10:00:00Z"), [], None, (1.0, 0.1), NOW)["cost"]["gpuHours"]
        == 4.0
    )
    settings = OperatorSettings(gpu_price_per_hour_usd=1.0, grid_carbon_kg_per_kwh=0.1)
    assert observe(ftj(), job(active=1, failed=1), pods, scraped, settings, NOW)["cost"] == {
        "gpuHours": 4.0,
        "estimatedUSD": 4.0,
        "energyKWh": 2.0,
        "co2Kg": 0.2,
    }
    # no GPU in the pod spec: spec.resources.gpus is used
    p = pod("cpu", started="2025-03-01T11:30:00Z")
    p["spec"]["containers"][0]["resources"] = {}
    status = check(observe(ftj(gpus=4), job(active=1, start="2025-03-01T11:30:00Z"), [p], None, PRICES, NOW))
    assert status["cost"] == {"gpuHours": 2.0, "estimatedUSD": 5.0}


# ---------------------------------------------------------------------------- succeeded


def test_succeeded_takes_adapter_metrics_checkpoints_from_summary() -> None:
    old = running_status()
    done = pod(
        "demo-train-a1b2c", phase="Succeeded", finished="2025-03-01T11:00:00Z", message=json.dumps(SUCCESS_SUMMARY)
    )
    j = job(
        start="2025-03-01T10:00:00Z",
        completion="2025-03-01T11:00:05Z",
        conditions=[cond("SuccessCriteriaMet", "CompletionsReached"), cond("Complete", "CompletionsReached")],
    )
    status = check(observe(ftj(old), j, [done], None, PRICES, NOW))
    assert status["phase"] == "Succeeded" and status["completionTime"] == "2025-03-01T11:00:05Z"
    c = conditions(status)
    assert c["Succeeded"]["status"] == "True" and c["Succeeded"]["reason"] == "TrainingSucceeded"
    assert f"{OUT}/adapter" in c["Succeeded"]["message"]
    assert c["Running"]["status"] == "False" and "CheckpointCorrupt" not in c
    assert status["adapter"] == SUCCESS_SUMMARY["adapter"]
    m = status["metrics"]
    assert (m["evalLoss"], m["baseEvalLoss"], m["trainLoss"], m["tokenAccuracy"]) == (1.5, 2.25, 1.25, 0.61)
    assert m["objectives"] == {"kdLoss": 0.3, "adversarialKl": 0.01}
    assert (
        status["progress"]["step"] == 300
        and status["progress"]["percent"] == 100
        and status["progress"]["etaSeconds"] == 0
    )
    assert [cp["step"] for cp in status["checkpoints"]] == [100, 200, 300]
    assert status["checkpoints"][0]["loss"] == 1.9  # the summary's details replace the scraped pointer
    assert status["cost"]["energyKWh"] == 1.2 and status["cost"]["co2Kg"] == pytest.approx(0.48)
    assert status["cost"]["gpuHours"] == 2.0  # 2 GPUs × 1 h
    assert status["retries"] == 1
    events = transitions(old, status)
    assert events[0][:2] == ("Normal", "TrainingSucceeded") and "Running → Succeeded" in events[0][2]


def test_checkpoints_kept_to_the_trainer_retention_and_corrupt_condition() -> None:
    summary = copy.deepcopy(SUCCESS_SUMMARY)
    summary["checkpoints"] = [
        {"step": s, "uri": f"{OUT}/checkpoints/step-{s}", "loss": 1.0, "time": "2025-03-01T10:00:00Z"}
        for s in range(100, 900, 100)
    ]
    summary["checkpointCorrupt"] = ["step 50: sha256 mismatch in adapter_model.safetensors"]
    done = pod("p", phase="Succeeded", finished="2025-03-01T11:00:00Z", message=json.dumps(summary))
    j = job(conditions=[cond("Complete", "CompletionsReached")])
    status = check(observe(ftj(), j, [done], None, PRICES, NOW))
    assert [c["step"] for c in status["checkpoints"]] == [600, 700, 800]  # spec.checkpointing.keep defaults to 3
    corrupt = conditions(status)["CheckpointCorrupt"]
    assert corrupt["status"] == "True" and corrupt["reason"] == "CheckpointCorrupt" and "step 50" in corrupt["message"]
    assert status["completionTime"] == "2025-03-01T11:00:00Z"  # from the Complete condition
    events = transitions(ftj()["status"], status)
    assert ("Warning", "CheckpointCorrupt") in [e[:2] for e in events]


# ------------------------------------------------------------------------------- failed


FAILURES = [
    (
        "BackoffLimitExceeded",
        "Job has reached the specified backoff limit",
        4,
        1,
        {"status": "failed", "reason": "Error", "message": "RuntimeError: CUDA error"},
        "BackoffLimitExceeded",
        4,
    ),
    ("DeadlineExceeded", "Job was active longer than specified deadline", 1, 143, None, "DeadlineExceeded", 1),
    (
        "PodFailurePolicy",
        "Container trainer for pod team-a/demo-train-x failed with exit code 3 matching FailJob rule at index 0",
        1,
        PERMANENT_EXIT_CODE,
        {"status": "failed", "reason": "InvalidData", "message": "train.jsonl:17: no assistant turn"},
        "InvalidData",
        1,
    ),
    (
        "PodFailurePolicy",
        "exit code 3",
        1,
        PERMANENT_EXIT_CODE,
        {"status": "failed", "reason": "IncompatibleTeacher", "message": "vocab differs"},
        "IncompatibleTeacher",
        1,
    ),
    (
        "PodFailurePolicy",
        "exit code 3",
        1,
        PERMANENT_EXIT_CODE,
        {"status": "failed", "reason": "Preposterous", "message": "?"},
        "PermanentError",
        1,
    ),
    ("PodFailurePolicy", "exit code 3", 1, PERMANENT_EXIT_CODE, None, "PermanentError", 1),
    ("SomethingNew", "", 1, 1, None, "PermanentError", 1),
]


@pytest.mark.parametrize("job_reason,job_message,failed,exit_code,summary,expected,retries", FAILURES)
def test_failure_reasons_map_and_keep_checkpoint_pointer(
    job_reason: str, job_message: str, failed: int, exit_code: int, summary: dict | None, expected: str, retries: int
) -> None:
    old = running_status()
    pointer = old["checkpoints"][-1]
    last = pod(
        "demo-train-last",
        phase="Failed",
        finished="2025-03-01T11:50:00Z",
        exit_code=exit_code,
        message=json.dumps(summary) if summary else "",
    )
    status = check(observe(ftj(old), failed_job(job_reason, job_message, failed), [last], None, PRICES, NOW))
    assert status["phase"] == "Failed"
    c = conditions(status)
    assert c["Failed"]["status"] == "True" and c["Failed"]["reason"] == expected
    if summary:
        assert summary["message"] in c["Failed"]["message"]
    if job_message:
        assert job_message in c["Failed"]["message"]
    assert c["Running"]["status"] == "False" and c["Running"]["reason"] == expected
    assert status["checkpoints"][-1] == pointer  # O4: the last checkpoint pointer is kept
    assert status["completionTime"] == "2025-03-01T11:00:00Z"  # the Failed condition's time
    assert status["retries"] == retries
    events = transitions(old, status)
    assert events == [("Warning", expected, events[0][2])] and "Running → Failed" in events[0][2]


def test_failure_message_is_bounded() -> None:
    summary = {"status": "failed", "reason": "InvalidData", "message": "x" * 3000}
    last = pod(
        "p", phase="Failed", finished="2025-03-01T11:50:00Z", exit_code=PERMANENT_EXIT_CODE, message=json.dumps(summary)
    )
    status = check(observe(ftj(), failed_job("PodFailurePolicy", "m", 1), [last], None, PRICES, NOW))
    assert len(conditions(status)["Failed"]["message"].encode()) <= 1024


# -------------------------------------------------------------------------- O9: no churn


def test_repeated_observation_gives_no_patch_and_stable_transition_times() -> None:
    scraped = parse_metrics(METRICS_TEXT)
    j, pods = job(active=1, start="2025-03-01T10:00:00Z"), [pod("demo-train-a1b2c")]
    first = observe(ftj(), j, pods, scraped, PRICES, NOW)
    assert diff(ftj()["status"], first) is not None
    second = observe(ftj(first), j, pods, scraped, PRICES, NOW)
    assert diff(first, second) is None and transitions(first, second) == []
    # an hour later with new metrics: only what changed is patched, transition times stay
    scraped2 = dict(scraped, step=240.0, progress_ratio=0.8)
    third = check(observe(ftj(second), j, pods, scraped2, PRICES, LATER))
    patch = diff(second, third)
    assert patch is not None
    assert set(patch) == {"progress", "cost"} and patch["progress"] == {"step": 240, "percent": 80.0}
    assert conditions(third)["Running"]["lastTransitionTime"] == conditions(first)["Running"]["lastTransitionTime"]


def test_finished_job_observed_again_gives_no_patch() -> None:
    done = pod("p", phase="Succeeded", finished="2025-03-01T11:00:00Z", message=json.dumps(SUCCESS_SUMMARY))
    j = job(conditions=[cond("Complete", "CompletionsReached")], completion="2025-03-01T11:00:05Z")
    first = observe(ftj(), j, [done], None, PRICES, NOW)
    # the API server returns 1.0 as 1: still no patch
    roundtrip = json.loads(json.dumps(first).replace("100.0", "100"))
    assert diff(roundtrip, observe(ftj(roundtrip), j, [done], None, PRICES, LATER)) is None
    # pods garbage-collected later: nothing is lost
    assert diff(first, observe(ftj(first), j, [], None, PRICES, LATER)) is None


def test_diff_is_a_minimal_merge_patch() -> None:
    old = {
        "phase": "Running",
        "progress": {"step": 1, "percent": 1.0},
        "checkpoints": [{"step": 1, "uri": "u"}],
        "adapter": {"uri": "x"},
    }
    new = {
        "phase": "Running",
        "progress": {"step": 2, "percent": 1},
        "checkpoints": [{"step": 1, "uri": "u"}, {"step": 2, "uri": "v"}],
    }
    assert diff(old, new) == {"progress": {"step": 2}, "checkpoints": new["checkpoints"], "adapter": None}
    assert diff(old, copy.deepcopy(old)) is None
    assert diff({}, {"retries": 0, "conditions": []}) is None  # empty defaults are not a change
    assert diff({}, {"retries": 1}) == {"retries": 1}
    assert diff({"retries": 1}, {"retries": 0}) == {"retries": 0}
    assert diff({"a": True}, {"a": 1}) == {"a": 1}


# ------------------------------------------------------------------------- O10: secrets


def test_secret_canary_never_reaches_status_or_events() -> None:
    message = (
        f"botocore.exceptions.ClientError: AccessDenied for key {CANARY} "
        f"aws_secret_access_key={CANARY_SECRET} url=https://bucket.s3.amazonaws.com/x?X-Amz-Signature=CANARYSIG123&a=b "
        f"s3://user:CANARYPASS@host/x explicit-CANARY-VALUE"
    )
    summary = {"status": "failed", "reason": "StorageError", "message": message}
    last = pod(
        "p", phase="Failed", finished="2025-03-01T11:50:00Z", exit_code=PERMANENT_EXIT_CODE, message=json.dumps(summary)
    )
    j = failed_job("PodFailurePolicy", f"pod failed; token {CANARY}", 1)
    old = running_status()
    status = check(observe(ftj(old), j, [last], None, PRICES, NOW, secrets=["explicit-CANARY-VALUE"]))
    events = transitions(old, status)
    blob = json.dumps(status) + json.dumps(events)
    for leaked in (CANARY, CANARY_SECRET, "CANARYSIG123", "CANARYPASS", "explicit-CANARY-VALUE"):
        assert leaked not in blob
    assert (
        conditions(status)["Failed"]["reason"] == "StorageError"
        and "AccessDenied" in conditions(status)["Failed"]["message"]
    )


def test_redact_patterns() -> None:
    assert redact(f"id={CANARY} ok") == "id=*** ok"
    assert redact("AWS_SECRET_ACCESS_KEY = 'abc/def+ghi' rest") == "AWS_SECRET_ACCESS_KEY = '***' rest"
    assert redact("s3://k:s@bucket/p") == "s3://***@bucket/p"
    assert redact("Authorization: Bearer abcdefghijkl") == "Authorization: Bearer ***"
    assert redact("value hunter2xx here", ["hunter2xx"]) == "value *** here"
    assert redact("plain text file..txt") == "plain text file..txt"


# ------------------------------------------------------------------------------- robustness


@pytest.mark.parametrize(
    "old",
    [
        None,
        "garbage",
        {"phase": "Nope", "retries": -3},
        {"conditions": [{"type": "Bogus"}], "progress": {"percent": 900}},
        {"checkpoints": "x", "metrics": {"tokenAccuracy": 7, "trainLoss": 1.0}, "cost": {"gpuHours": -1}},
    ],
)
def test_odd_old_status_and_summary_still_validate(old: Any) -> None:
    bad = {
        "status": "succeeded",
        "adapter": {"uri": "s3://b/a", "sha256": "nothex"},
        "metrics": {"tokenAccuracy": 3.0, "evalLoss": "x", "trainLoss": float("nan"), "objectives": {"a": "b", "c": 1}},
        "checkpoints": [{"step": "x"}, 5, {"step": 4, "uri": "u"}],
        "steps": -1,
    }
    done = pod("p", phase="Succeeded", finished="2025-03-01T11:00:00Z", message=json.dumps(bad).replace("NaN", "1e999"))
    j = job(conditions=[cond("Complete", "CompletionsReached")])
    obj = ftj()
    obj["status"] = old
    status = check(
        observe(
            obj,
            j,
            [done, {"status": "odd"}],
            {"step": float("inf"), "eval_loss": -1.0, "objective:x": 1.0},
            PRICES,
            NOW,
        )
    )
    assert status["phase"] == "Succeeded" and status["adapter"] == {"uri": "s3://b/a"}
    assert status["checkpoints"] == [{"step": 4, "uri": "u"}] and status["metrics"]["objectives"] == {
        "c": 1.0,
        "x": 1.0,
    }


# ------------------------------------------- a permanent exit where podFailurePolicy was pruned


def pruned(job_obj: dict[str, Any]) -> dict[str, Any]:
    """The Job as an API server without podFailurePolicy (Kubernetes < 1.26, or the gate off) stores it."""
    out = copy.deepcopy(job_obj)
    out["spec"].pop("podFailurePolicy")
    return out


def test_permanent_exit_without_pod_failure_policy_fails_and_ends_the_job() -> None:
    """1.20 prunes podFailurePolicy: the Job controller would retry a bad dataset on GPUs. The
    operator sees the permanent exit, reports the trainer's reason at once and ends the Job."""
    summary = {"status": "failed", "reason": "InvalidData", "message": "train.jsonl:17: no assistant turn"}
    failed_pod = pod(
        "demo-train-a",
        phase="Failed",
        finished="2025-03-01T11:50:00Z",
        exit_code=PERMANENT_EXIT_CODE,
        message=json.dumps(summary),
    )
    running = pruned(job(active=0, failed=1, start="2025-03-01T10:00:00Z"))
    assert must_end_job(running, [failed_pod])
    assert end_job_patch() == {"spec": {"activeDeadlineSeconds": 1}}
    status = check(observe(ftj(running_status()), running, [failed_pod], None, PRICES, NOW))
    failed = conditions(status)["Failed"]
    assert status["phase"] == "Failed" and failed["reason"] == "InvalidData"
    assert "no assistant turn" in failed["message"] and "permanent exit code 3" in failed["message"]
    assert status["retries"] == running_status().get("retries", 0)  # the permanent exit is no retry
    # After the patch the Job controller fails the Job by its deadline: the reason stays the trainer's.
    ended = pruned(failed_job("DeadlineExceeded", "Job was active longer than specified deadline", 1))
    ended["spec"]["activeDeadlineSeconds"] = 1
    assert not must_end_job(ended, [failed_pod])
    again = check(observe(ftj(status), ended, [failed_pod], None, PRICES, NOW))
    assert (
        conditions(again)["Failed"]["reason"] == "InvalidData"
        and "permanent exit code" in conditions(again)["Failed"]["message"]
    )
    assert diff(status, again) is None or "conditions" not in (diff(status, again) or {})


def test_no_end_job_when_the_policy_is_there_or_nothing_is_permanent() -> None:
    permanent = pod("p", phase="Failed", finished="2025-03-01T11:50:00Z", exit_code=PERMANENT_EXIT_CODE)
    ordinary = pod("q", phase="Failed", finished="2025-03-01T11:50:00Z", exit_code=1)
    disrupted = pod(
        "r",
        phase="Failed",
        finished="2025-03-01T11:50:00Z",
        exit_code=PERMANENT_EXIT_CODE,
        conditions=[{"type": "DisruptionTarget", "status": "True"}],
    )
    assert not must_end_job(job(failed=1), [permanent])  # the Job's own podFailurePolicy acts
    assert not must_end_job(pruned(job(failed=1)), [ordinary])  # retriable: backoffLimit decides
    assert not must_end_job(pruned(job(failed=1)), [disrupted])  # a preemption is no verdict
    done = pruned(job(conditions=[cond("Failed", "BackoffLimitExceeded")]))
    assert not must_end_job(done, [permanent])  # already over


def test_a_replacement_after_a_permanent_exit_is_no_retry() -> None:
    permanent = pod(
        "a",
        phase="Failed",
        finished="2025-03-01T11:50:00Z",
        exit_code=PERMANENT_EXIT_CODE,
        message=json.dumps({"status": "failed", "reason": "InvalidData", "message": "bad"}),
    )
    earlier = pod("b", phase="Failed", started="2025-03-01T11:00:00Z", finished="2025-03-01T11:10:00Z", exit_code=1)
    replacement = pod(
        "c", phase="Failed", started="2025-03-01T11:50:01Z", finished="2025-03-01T11:50:02Z", exit_code=137
    )
    ended = pruned(failed_job("DeadlineExceeded", "Job was active longer than specified deadline", 3))
    status = check(
        observe(ftj({"phase": "Running", "jobName": JOB}), ended, [earlier, permanent, replacement], None, PRICES, NOW)
    )
    assert status["retries"] == 1  # the transient failure before the verdict, not the replacement after it
    assert conditions(status)["Failed"]["reason"] == "InvalidData"


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (42, "42s"), (61, "1m01s"), (3900, "1h05m"), (200000, "2d07h")]
)
def test_eta_reads_like_a_duration(seconds: int, text: str) -> None:
    from kubetune.operator.reconcile import human_duration

    assert human_duration(seconds) == text


def test_losses_are_rounded_to_four_decimals() -> None:
    status = observe(
        ftj(),
        job(active=1, start="2025-03-01T10:00:00Z"),
        [pod("demo-train-a1b2c")],
        {"train_loss": 1.234567891, "eval_loss": 2.000049},
        PRICES,
        NOW,
    )
    assert status["metrics"]["trainLoss"] == 1.2346 and status["metrics"]["evalLoss"] == 2.0


def test_an_idle_running_job_writes_nothing_tick_after_tick() -> None:
    """Issue 14, scale: cost moved on every tick, so every running job cost a status PATCH per
    tick. Nothing changed but the clock: no patch; a cost step (3 GPU-minutes and 2 %) later: one."""
    from datetime import timedelta

    from kubetune.operator.reconcile import diff

    page = parse_metrics(METRICS_TEXT)
    first = observe(ftj(), job(active=1, start="2025-03-01T10:00:00Z"), [pod("demo-train-a1b2c")], page, PRICES, NOW)
    current = ftj(first)
    for tick in range(1, 4):
        again = observe(
            current,
            job(active=1, start="2025-03-01T10:00:00Z"),
            [pod("demo-train-a1b2c")],
            page,
            PRICES,
            NOW + timedelta(seconds=30 * tick),
        )
        assert diff(first, again) is None, diff(first, again)
    later = observe(
        current,
        job(active=1, start="2025-03-01T10:00:00Z"),
        [pod("demo-train-a1b2c")],
        page,
        PRICES,
        NOW + timedelta(hours=1),
    )
    assert set(diff(first, later) or {}) == {"cost"} and later["cost"]["gpuHours"] > first["cost"]["gpuHours"]


def test_succeeded_takes_generation_scores_and_the_data_report_from_summary() -> None:
    """status.metrics.generation (base vs tuned sample scores, the judge) and status.dataReport."""
    summary = copy.deepcopy(SUCCESS_SUMMARY)
    summary["metrics"]["generation"] = {
        "samples": 8,
        "base": {"rougeL": 0.125, "bleu": 0.05},
        "tuned": {"rougeL": 0.5, "bleu": 0.25},
        "judge": {"tunedWins": 5, "baseWins": 1, "ties": 2, "winRate": 0.75, "model": "judge"},
    }
    summary["dataReport"] = {
        "examples": 300,
        "validationExamples": 40,
        "duplicates": 3,
        "overlap": 1,
        "piiFindings": 2,
        "piiPolicy": "redact",
        "estimatedGPUHours": 0.5,
        "bogus": "dropped",
    }
    done = pod("demo-train-a1b2c", phase="Succeeded", finished="2025-03-01T11:00:00Z", message=json.dumps(summary))
    j = job(conditions=[cond("Complete", "CompletionsReached")])
    status = check(observe(ftj(running_status()), j, [done], None, PRICES, NOW))
    gen = status["metrics"]["generation"]
    assert gen["tuned"] == {"rougeL": 0.5, "bleu": 0.25} and gen["base"]["rougeL"] == 0.125
    assert gen["judge"]["winRate"] == 0.75 and gen["judge"]["tunedWins"] == 5
    assert status["dataReport"] == {
        "examples": 300,
        "validationExamples": 40,
        "duplicates": 3,
        "overlap": 1,
        "piiFindings": 2,
        "piiPolicy": "redact",
        "estimatedGPUHours": 0.5,
    }
