"""The trainer → operator contract: one summary model both sides use, bounded to 4 KiB.

The trainer builds its summary through `TrainerSummary` (a misspelt field is an error, not a
key the operator never reads); the operator reads it with `TrainerSummary.lenient` (what does not
validate is left out, garbage is no summary, nothing raises).
"""

from __future__ import annotations

import json
import math

import pytest
from kubetune.api.contract import (
    OPERATOR_READS,
    SUMMARY_MAX_BYTES,
    TRAINER_METRICS_PREFIX,
    TrainerMetric,
    TrainerSummary,
    bounded_summary,
    file_param,
)
from kubetune.api.status import Effective, ResolvedHyperparameters
from pydantic import ValidationError

OUT = "s3://bucket/runs/demo"


def full_summary(checkpoints: int = 3) -> TrainerSummary:
    return TrainerSummary(
        status="succeeded",
        adapter={"uri": f"{OUT}/adapter", "manifestUri": f"{OUT}/manifest.json", "sha256": "a" * 64, "bytes": 1234},
        metrics={
            "trainLoss": 1.25,
            "evalLoss": 1.5,
            "baseEvalLoss": 2.0,
            "perplexity": math.exp(1.5),
            "tokenAccuracy": 0.6,
            "tokensPerSecond": 5000.0,
            "objectives": {"kdLoss": 0.3},
            "energyKWh": 1.2,
        },
        checkpoints=[
            {"step": s, "uri": f"{OUT}/checkpoints/step-{s}", "loss": 1.0, "time": "2025-03-01T10:00:00Z"}
            for s in range(100, 100 * (checkpoints + 1), 100)
        ],
        checkpoint_corrupt=["step 50: sha256 mismatch"],
        effective={
            "epochs": 3,
            "learningRate": 2e-4,
            "batchSize": 8,
            "gradientAccumulation": 1,
            "precision": "bf16",
            "maxSeqLength": 2048,
            "validationSplit": 0.1,
            "parameters": 494_000_000,
            "checkpointEverySteps": 200,
        },
        steps=300,
        trainable_parameters=1000,
        duration_seconds=12.5,
        seconds_per_step=0.04,
    )


def test_the_trainer_cannot_misspell_a_field() -> None:
    with pytest.raises(ValidationError):
        TrainerSummary(status="succeeded", checkpionts=[])  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        TrainerSummary.model_validate({"status": "succeeded", "effective": {"learningrate": 1e-4}})
    with pytest.raises(ValidationError):
        TrainerSummary(status="done")  # type: ignore[arg-type]


def test_wire_is_camel_case_without_unset_fields_or_non_finite_numbers() -> None:
    s = TrainerSummary(
        status="failed",
        reason="InvalidData",
        message="bad",
        param="train.jsonl:3",
        metrics={"trainLoss": float("nan"), "evalLoss": 1.0},
    )
    assert s.wire() == {
        "status": "failed",
        "reason": "InvalidData",
        "message": "bad",
        "param": "train.jsonl:3",
        "metrics": {"evalLoss": 1.0},
    }
    assert json.loads(s.to_json()) == s.wire()
    wire = full_summary().wire()
    assert {"checkpointCorrupt", "trainableParameters", "durationSeconds"} <= wire.keys()
    assert wire["metrics"]["energyKWh"] == 1.2 and wire["effective"]["learningRate"] == 2e-4


def test_the_effective_block_is_the_status_effective_subset() -> None:
    assert set(ResolvedHyperparameters.model_fields) < set(Effective.model_fields)
    for name in (
        "epochs",
        "learning_rate",
        "batch_size",
        "gradient_accumulation",
        "precision",
        "max_seq_length",
        "validation_split",
        "checkpoint_every_steps",
    ):
        assert name in ResolvedHyperparameters.model_fields


def test_lenient_reads_what_validates_and_ignores_the_rest() -> None:
    text = json.dumps(
        {
            "status": "succeeded",
            "fromANewerTrainer": {"x": 1},
            "exitCode": 0,
            "adapter": {"uri": "s3://b/a", "sha256": "nothex"},
            "metrics": {"tokenAccuracy": 3.0, "evalLoss": "x", "trainLoss": 1.5, "objectives": {"a": "b", "c": 1}},
            "checkpoints": [{"step": "x"}, 5, {"step": 4, "uri": "u"}, {"uri": "no-step"}],
            "effective": {"batchSize": 0, "precision": "bf16", "newKnob": 1},
            "steps": -1,
            "param": "spec.dataset.train",
        }
    )
    s = TrainerSummary.lenient(text)
    assert s is not None
    assert s.wire() == {
        "status": "succeeded",
        "param": "spec.dataset.train",
        "metrics": {"trainLoss": 1.5, "objectives": {"c": 1.0}},
        "adapter": {"uri": "s3://b/a"},
        "checkpoints": [{"step": 4, "uri": "u"}],
        "effective": {"precision": "bf16"},
    }
    assert TrainerSummary.lenient(json.loads(text)) == s  # a decoded object too, left untouched
    assert json.loads(text)["adapter"]["sha256"] == "nothex"


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "not json",
        "[1, 2]",
        "null",
        "{}",
        '{"status": "done"}',
        '{"message": "no status"}',
        "[" * 20000 + "]" * 20000,
        b"\xff\xfe",
        42,
        None,
        {"status": ["failed"]},
    ],
)
def test_lenient_garbage_is_no_summary(garbage: object) -> None:
    assert TrainerSummary.lenient(garbage) is None


def test_bounded_summary_fits_and_drops_the_least_important_first() -> None:
    small = full_summary()
    assert json.loads(bounded_summary(small)) == small.wire()  # nothing dropped when it fits

    big = full_summary(checkpoints=20)
    big.message = "m" * 2500
    big.warnings = ["w" * 200] * 5
    text = bounded_summary(big)
    out = json.loads(text)
    assert len(text.encode()) <= SUMMARY_MAX_BYTES
    assert "durationSeconds" not in out and "warnings" not in out  # diagnostics go first
    assert out["adapter"] == big.wire()["adapter"] and out["steps"] == 300 and out["effective"]
    assert out["checkpoints"][-1]["step"] == 2000  # the newest stay
    assert 1 <= len(out["checkpoints"]) < 20
    assert big.checkpoints is not None and len(big.checkpoints) == 20  # the caller's object is not changed


def test_a_long_message_is_shortened_last_and_param_stays() -> None:
    s = TrainerSummary(
        status="failed", reason="InvalidData", message="é" * 3000 + "x" * 3000, param="data/train.jsonl:17"
    )
    text = bounded_summary(s)
    out = json.loads(text)
    assert len(text.encode()) <= SUMMARY_MAX_BYTES and len(text.encode()) > SUMMARY_MAX_BYTES - 16  # as much as fits
    assert out["reason"] == "InvalidData" and out["param"] == "data/train.jsonl:17"
    assert out["message"].startswith("ééé") and out["message"].endswith("…")


def test_pathological_uris_still_give_a_valid_summary() -> None:
    s = TrainerSummary(
        status="succeeded", steps=7, adapter={"uri": "s3://b/" + "a" * 2040, "manifestUri": "s3://b/" + "m" * 2040}
    )
    out = json.loads(bounded_summary(s))
    assert out == {"status": "succeeded", "steps": 7}


def test_file_param_keeps_the_tail_of_long_paths() -> None:
    assert file_param("train.jsonl", 3) == "train.jsonl:3"
    assert file_param("train.jsonl", 0) == "train.jsonl"
    long = file_param("/d/" + "x" * 500 + "/train.jsonl", 12)
    assert long.startswith("…") and long.endswith("/train.jsonl:12") and len(long) <= 210


def test_metric_names() -> None:
    for metric in TrainerMetric:
        assert (
            metric.value.startswith(TRAINER_METRICS_PREFIX)
            and metric.key == metric.value[len(TRAINER_METRICS_PREFIX) :]
        )
    assert TrainerMetric.GPU_ENERGY.family == "kubetune_trainer_gpu_energy_joules"
    assert TrainerMetric.EFFECTIVE.family == "kubetune_trainer_effective"
    assert TrainerMetric.STEP.family == TrainerMetric.STEP.value
    assert set(TrainerMetric) >= OPERATOR_READS
