"""What the operator makes of the trainer's contract: status.checkpoints mirrors the checkpoints
the trainer keeps, status.effective gets the hyperparameters it resolved, and a failure is one
structured status.error {code, message, param}."""

from __future__ import annotations

import copy
import json
from typing import Any

from kubetune.api.contract import PERMANENT_EXIT_CODE, TrainerSummary
from kubetune.operator.reconcile import checkpoints_kept, error_info, observe, parse_metrics, parse_termination

from tests.operator.test_reconcile import (
    CANARY,
    NOW,
    OUT,
    PRICES,
    SUCCESS_SUMMARY,
    check,
    cond,
    failed_job,
    ftj,
    job,
    pod,
    running_status,
)

RUNNING = job(active=1, start="2025-03-01T10:00:00Z")
COMPLETE = job(conditions=[cond("SuccessCriteriaMet", "CompletionsReached"), cond("Complete", "CompletionsReached")])


def with_keep(obj: dict[str, Any], keep: int) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    obj["spec"]["checkpointing"] = {"keep": keep}
    return obj


def scraped_checkpoint(step: int) -> dict[str, Any]:
    return parse_metrics(f"kubetune_trainer_step {step + 1}\nkubetune_trainer_last_checkpoint_step {step}\n")


def test_while_running_the_list_is_capped_at_the_trainer_retention() -> None:
    status: dict[str, Any] = ftj()["status"]
    for step in (10, 20, 30, 40):
        status = check(observe(with_keep(ftj(status), 2), RUNNING, [pod("p")], scraped_checkpoint(step), PRICES, NOW))
    assert [c["step"] for c in status["checkpoints"]] == [30, 40]
    assert checkpoints_kept(ftj()) == 3  # spec.checkpointing.keep's default
    assert checkpoints_kept(with_keep(ftj(), 100)) == 20  # what status.checkpoints holds


def test_the_summary_drops_checkpoints_the_trainer_pruned() -> None:
    old = running_status()  # a scraped pointer to step 100
    summary = copy.deepcopy(SUCCESS_SUMMARY)
    summary["checkpoints"] = [{"step": s, "uri": f"{OUT}/checkpoints/step-{s}", "loss": 1.0} for s in (200, 300)]
    done = pod("p", phase="Succeeded", finished="2025-03-01T11:00:00Z", message=json.dumps(summary))
    status = check(observe(ftj(old), COMPLETE, [done], None, PRICES, NOW))
    assert [c["step"] for c in status["checkpoints"]] == [200, 300]
    # a summary without the list (trimmed for size) keeps what status knew
    del summary["checkpoints"]
    done = pod("p", phase="Succeeded", finished="2025-03-01T11:00:00Z", message=json.dumps(summary))
    assert [c["step"] for c in check(observe(ftj(old), COMPLETE, [done], None, PRICES, NOW))["checkpoints"]] == [100]


def test_effective_merges_the_trainer_resolved_values_with_the_operator_ones() -> None:
    summary = copy.deepcopy(SUCCESS_SUMMARY)
    summary["effective"] = {
        "epochs": 3,
        "learningRate": 2e-4,
        "batchSize": 16,
        "gradientAccumulation": 1,
        "precision": "bf16",
        "maxSeqLength": 2048,
        "validationSplit": 0.1,
        "checkpointEverySteps": 200,
        "newKnob": 7,
    }
    done = pod("p", phase="Succeeded", finished="2025-03-01T11:00:00Z", message=json.dumps(summary))
    obj = ftj(
        {
            "phase": "Running",
            "effective": {"image": "trainer:1", "gpus": 2, "nodes": 1, "estimatedGPUMemoryGiB": 9.5, "batchSize": 1},
        }
    )
    status = check(observe(obj, COMPLETE, [done], None, PRICES, NOW))
    assert status["effective"] == {
        "image": "trainer:1",
        "gpus": 2,
        "nodes": 1,
        "estimatedGPUMemoryGiB": 9.5,
        "epochs": 3,
        "learningRate": 2e-4,
        "batchSize": 16,
        "gradientAccumulation": 1,
        "precision": "bf16",
        "maxSeqLength": 2048,
        "validationSplit": 0.1,
        "checkpointEverySteps": 200,
    }


def test_the_effective_info_metric_fills_effective_while_running() -> None:
    text = (
        "# TYPE kubetune_trainer_effective_info gauge\n"
        'kubetune_trainer_effective_info{batch_size="4",learning_rate="0.0003",precision="fp32",epochs="x",bogus="1"} 1.0\n'
    )
    status = check(observe(ftj(), RUNNING, [pod("p")], parse_metrics(text), PRICES, NOW))
    assert status["effective"] == {"batchSize": 4, "gpus": 2, "learningRate": 3e-4, "precision": "fp32"}


def failed_with(summary: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    last = pod(
        "demo-train-last",
        phase="Failed",
        finished="2025-03-01T11:50:00Z",
        exit_code=PERMANENT_EXIT_CODE,
        message=json.dumps(summary),
    )
    j = failed_job("PodFailurePolicy", "exit code 3", 1)
    old = running_status()
    return old, j, check(observe(ftj(old), j, [last], None, PRICES, NOW))


def test_a_failure_is_one_structured_error() -> None:
    summary = {
        "status": "failed",
        "reason": "InvalidData",
        "message": f"train.jsonl:17: no assistant turn (key {CANARY})",
        "param": "s3://bucket/data/train.jsonl:17",
    }
    old, j, status = failed_with(summary)
    error = status["error"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert error == {"code": "InvalidData", "message": failed["message"], "param": "s3://bucket/data/train.jsonl:17"}
    assert "no assistant turn" in error["message"] and CANARY not in json.dumps(error)
    # the pod with the summary garbage-collected later: the error stays as it was (no patch)
    assert observe(ftj(status), j, [], None, PRICES, NOW)["error"] == error
    # not failed (any more): no error
    assert "error" not in running_status()
    assert "error" not in check(
        observe(ftj({**running_status(), "error": error}), RUNNING, [pod("p")], None, PRICES, NOW)
    )


def test_a_failure_without_a_summary_has_no_param() -> None:
    last = pod("p", phase="Failed", finished="2025-03-01T11:50:00Z", exit_code=1, message="")
    status = check(
        observe(
            ftj(running_status()), failed_job("BackoffLimitExceeded", "backoff limit", 4), [last], None, PRICES, NOW
        )
    )
    assert status["error"]["code"] == "BackoffLimitExceeded" and "param" not in status["error"]


def test_error_info_is_redacted_and_bounded() -> None:
    out = error_info("InvalidSpec", "x" * 5000 + f" {CANARY}", f"spec.output.uri {CANARY}", secrets=["hunter22"])
    assert out["code"] == "InvalidSpec" and len(out["message"].encode()) <= 1024
    assert out["param"] == "spec.output.uri ***"
    assert error_info("InvalidSpec", "m") == {"code": "InvalidSpec", "message": "m"}
    assert error_info("InvalidSpec", "m", "  ")["message"] == "m" and "param" not in error_info(
        "InvalidSpec", "m", "  "
    )


def test_parse_termination_reads_the_contract_and_ignores_unknown_keys() -> None:
    summary = {**SUCCESS_SUMMARY, "aFieldFromTheFuture": [1, 2], "param": None}
    p = pod("p", phase="Succeeded", finished="2025-03-01T11:00:00Z", exit_code=0, message=json.dumps(summary))
    parsed = parse_termination(p)
    assert parsed is not None and "aFieldFromTheFuture" not in parsed and parsed["exitCode"] == 0
    assert TrainerSummary.lenient(parsed) is not None
