"""The wire contract between the trainer pod and the operator, shared by both sides.

The trainer never talks to the Kubernetes API. It reports through three channels that the
operator reads: its exit code (permanent vs retriable failure), a JSON summary at the
termination-message path, and Prometheus metrics on a port. Both sides import these constants,
the summary model and the metric names from here, so the operator's podFailurePolicy and the
trainer's exit code, the summary the trainer writes and the one the operator reads, and the
series the trainer exports and the ones the operator scrapes cannot disagree.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Optional

from kubetune.api._base import WireModel
from kubetune.api.enums import StrEnum
from kubetune.api.status import (
    CHECKPOINTS_MAX,
    AdapterRef,
    CheckpointRef,
    DataReportSummary,
    Metrics,
    ResolvedHyperparameters,
)
from pydantic import Field, ValidationError

PERMANENT_EXIT_CODE = 3
"""Exit code for errors that retrying cannot fix: bad spec, bad data, incompatible teacher,
refused model files, a lost commit race. The Job's podFailurePolicy maps it to FailJob."""

PREEMPTED_EXIT_CODE = 143
"""Exit code after a SIGTERM was handled (checkpoint written): retriable, 128 + SIGTERM."""

DEFAULT_METRICS_PORT = 9090
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
TERMINATION_PATH_ENV = "KUBETUNE_TERMINATION_PATH"
METRICS_PORT_ENV = "KUBETUNE_METRICS_PORT"
CREDENTIALS_SECRET_ENV = "KUBETUNE_CREDENTIALS_SECRET"
"""The name of spec.output.credentialsSecret, set by the operator beside the Secret's optional
keys: a trainer that finds none of those keys knows the Secret is missing (or has none of the
expected keys) and fails at once with reason SecretMissing, instead of failing later on storage."""
JUDGE_API_KEY_ENV = "KUBETUNE_JUDGE_API_KEY"
"""The key `api-key` of spec.evaluation.judge.apiKeySecret, set by the operator through a
secretKeyRef on the training pod; the trainer sends it to the judge as a Bearer token."""
SUMMARY_MAX_BYTES = 4096
"""Kubernetes keeps at most 4 KiB of a termination message."""

SUMMARY_CHECKPOINTS_MAX = CHECKPOINTS_MAX
"""The summary lists at most this many checkpoints, as many as status.checkpoints holds."""


# ------------------------------------------------------------------------------- metrics

TRAINER_METRICS_PREFIX = "kubetune_trainer_"


class TrainerMetric(StrEnum):
    """Every series the trainer exports, by the sample name Prometheus (and the operator) sees.

    A counter's name ends in `_total` and an info metric's in `_info`: prometheus_client adds
    those suffixes itself, so the trainer registers `.family`.
    """

    STEP = "kubetune_trainer_step"
    TOTAL_STEPS = "kubetune_trainer_total_steps"
    EPOCH = "kubetune_trainer_epoch"
    TRAIN_LOSS = "kubetune_trainer_train_loss"
    EVAL_LOSS = "kubetune_trainer_eval_loss"
    BASE_EVAL_LOSS = "kubetune_trainer_base_eval_loss"
    TOKEN_ACCURACY = "kubetune_trainer_eval_token_accuracy_ratio"
    LEARNING_RATE = "kubetune_trainer_learning_rate"
    TOKENS_PER_SECOND = "kubetune_trainer_tokens_per_second"
    SAMPLES_PER_SECOND = "kubetune_trainer_samples_per_second"
    PROGRESS = "kubetune_trainer_progress_ratio"
    ETA = "kubetune_trainer_eta_seconds"
    TOKENS = "kubetune_trainer_tokens_total"
    LAST_CHECKPOINT_STEP = "kubetune_trainer_last_checkpoint_step"
    LAST_CHECKPOINT_TIME = "kubetune_trainer_last_checkpoint_timestamp_seconds"
    CHECKPOINT_STALL = "kubetune_trainer_checkpoint_stall_seconds"
    CHECKPOINT_UPLOAD = "kubetune_trainer_checkpoint_upload_seconds"
    GPU_MEMORY = "kubetune_trainer_gpu_memory_bytes"
    GPU_POWER = "kubetune_trainer_gpu_power_watts"
    GPU_ENERGY = "kubetune_trainer_gpu_energy_joules_total"
    OBJECTIVE = "kubetune_trainer_objective_value"
    """Labelled by `name` (OBJECTIVE_LABEL): kdLoss, adversarialKl, …"""
    GENERATION_SCORE = "kubetune_trainer_generation_score_ratio"
    """Mean score of generated sample answers, labelled by `model` (base, tuned) and `metric`
    (exactMatch, rougeL, bleu, chrf, jsonValid, regex, judgeWinRate for tuned)."""
    START_TIME = "kubetune_trainer_start_timestamp_seconds"
    EFFECTIVE = "kubetune_trainer_effective_info"
    """Value 1; its labels are the ResolvedHyperparameters field names (snake_case) and values."""

    @property
    def family(self) -> str:
        """The name to register with prometheus_client (without the suffix it adds)."""
        for suffix in ("_total", "_info"):
            if self.value.endswith(suffix):
                return self.value[: -len(suffix)]
        return self.value

    @property
    def key(self) -> str:
        """The sample name without the common prefix: the operator's key for it."""
        return self.value[len(TRAINER_METRICS_PREFIX) :]


OBJECTIVE_LABEL = "name"
GENERATION_LABELS = ("model", "metric")

OPERATOR_READS = frozenset(
    {
        TrainerMetric.STEP,
        TrainerMetric.TOTAL_STEPS,
        TrainerMetric.EPOCH,
        TrainerMetric.PROGRESS,
        TrainerMetric.ETA,
        TrainerMetric.TRAIN_LOSS,
        TrainerMetric.EVAL_LOSS,
        TrainerMetric.BASE_EVAL_LOSS,
        TrainerMetric.TOKEN_ACCURACY,
        TrainerMetric.TOKENS_PER_SECOND,
        TrainerMetric.OBJECTIVE,
        TrainerMetric.LAST_CHECKPOINT_STEP,
        TrainerMetric.LAST_CHECKPOINT_TIME,
        TrainerMetric.GPU_ENERGY,
        TrainerMetric.EFFECTIVE,
    }
)
"""The series the operator maps to `.status` (progress, metrics, checkpoints, cost, effective)."""


# ------------------------------------------------------------------------------- summary


class SummaryStatus(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    PREEMPTED = "preempted"
    VALIDATED = "validated"
    """The validation Job's (`--validate-only`) success."""


class SummaryMetrics(Metrics):
    """The final numbers; `energyKWh` goes to status.cost, the rest to status.metrics."""

    energy_kwh: Optional[float] = Field(
        default=None, ge=0, alias="energyKWh", description="GPU energy from NVML, summed over the pod's GPUs."
    )


class TrainerSummary(WireModel):
    """The JSON the trainer writes to its termination-message path (≤ SUMMARY_MAX_BYTES).

    The trainer builds it through this model (unknown fields are refused, as for every wire
    model); the operator reads it with `lenient`, which drops what it cannot validate.
    """

    status: SummaryStatus = Field(description="succeeded, failed, preempted, or validated (the data-validation Job).")
    role: Optional[str] = Field(default=None, description="`worker` in the summary of a torchrun rank other than 0.")
    rank: Optional[int] = Field(default=None, ge=0, description="Global rank of a worker.")
    reason: Optional[str] = Field(
        default=None,
        max_length=128,
        description="CamelCase reason of a failure: InvalidData, InvalidSpec, StorageError, …",
    )
    message: Optional[str] = Field(default=None, description="What went wrong and what to do.")
    param: Optional[str] = Field(
        default=None, max_length=1024, description="The spec field or file:line a user error is about, when known."
    )
    steps: Optional[int] = Field(default=None, ge=0, description="Optimizer steps done.")
    metrics: Optional[SummaryMetrics] = Field(default=None, description="Final training and evaluation numbers.")
    adapter: Optional[AdapterRef] = Field(default=None, description="The committed result.")
    checkpoints: Optional[list[CheckpointRef]] = Field(
        default=None,
        description="The committed checkpoints the trainer keeps after pruning, oldest first (the newest when trimmed).",
    )
    checkpoint_corrupt: Optional[list[str]] = Field(
        default=None, description="Checkpoints skipped on resume, each `step N: why`."
    )
    effective: Optional[ResolvedHyperparameters] = Field(
        default=None, description="The hyperparameters resolved from `auto` and the defaults."
    )
    trainable_parameters: Optional[int] = Field(default=None, ge=0)
    duration_seconds: Optional[float] = Field(default=None, ge=0)
    checkpoint_stall_seconds: Optional[float] = Field(default=None, ge=0)
    seconds_per_step: Optional[float] = Field(default=None, ge=0)
    examples: Optional[int] = Field(default=None, ge=0, description="Training examples (validation Job).")
    validation_examples: Optional[int] = Field(default=None, ge=0, description="Held-out examples (validation Job).")
    warnings: Optional[list[str]] = Field(default=None, description="Data warnings (validation Job).")
    data_report: Optional[DataReportSummary] = Field(
        default=None, description="The dataset report's summary (status.dataReport)."
    )
    report_uri: Optional[str] = Field(
        default=None, max_length=2048, description="Location of report.html in the output."
    )

    def wire(self) -> dict[str, Any]:
        """camelCase, without unset fields, empty defaults (an empty `objectives`) nor
        non-finite numbers (a diverged loss): JSON has no NaN."""
        return _finite(self.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True, mode="json"))

    def to_json(self) -> str:
        return json.dumps(self.wire(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def lenient(cls, data: Any) -> TrainerSummary | None:
        """The summary in `data` (JSON text or a decoded object) with every field that does not
        validate left out — unknown keys, wrong types, out-of-range numbers, a bad list item —
        or None when no summary is left (not JSON, not an object, no valid `status`). Never raises."""
        try:
            if isinstance(data, (str, bytes, bytearray)):
                data = json.loads(data)
            if not isinstance(data, Mapping):
                return None
            data = _plain(data)
            for _ in range(_MAX_PASSES):
                try:
                    return cls.model_validate(data)
                except ValidationError as err:
                    locs = [_error_loc(e) for e in err.errors()]
                    if not locs or any(loc == () for loc in locs):
                        return None
                    data = _prune(data, locs)
        except (ValueError, TypeError, RecursionError):  # garbage, odd types, deeply nested JSON
            return None
        return None


def file_param(file: str, line: int = 0) -> str:
    """A summary's `param` for a data problem: `file:line` (line 0: the file as a whole), the
    file's tail kept when it is long."""
    where = file if len(file) <= 200 else "…" + file[-199:]
    return f"{where}:{line}" if line else where


_MAX_PASSES = 8


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items() if not (isinstance(v, float) and not math.isfinite(v))}
    if isinstance(value, list):
        return [_finite(v) for v in value if not (isinstance(v, float) and not math.isfinite(v))]
    return value


def _plain(value: Any) -> Any:
    """A private deep copy as dicts and lists, so pruning never touches the caller's object."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _error_loc(error: Any) -> tuple[Any, ...]:
    """Where to prune for one error: a missing field voids its parent; a bad dict key, its entry."""
    loc = tuple(error.get("loc") or ())
    if loc and loc[-1] == "[key]":
        loc = loc[:-1]
    if error.get("type") == "missing":
        loc = loc[:-1]
    return loc


_GONE = object()


def _prune(data: Any, locs: list[tuple[Any, ...]]) -> Any:
    """`data` without the values at `locs`; list items are removed after all marks (indexes stay valid)."""
    for loc in locs:
        parent = data
        for part in loc[:-1]:
            if (isinstance(parent, Mapping) and part in parent) or (
                isinstance(parent, list) and isinstance(part, int) and 0 <= part < len(parent)
            ):
                parent = parent[part]
            else:
                parent = None
                break
        last = loc[-1]
        if isinstance(parent, dict):
            parent.pop(last, None)
        elif isinstance(parent, list) and isinstance(last, int) and 0 <= last < len(parent):
            parent[last] = _GONE
    return _sweep(data)


def _sweep(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sweep(v) for k, v in value.items() if v is not _GONE}
    if isinstance(value, list):
        return [_sweep(v) for v in value if v is not _GONE]
    return value


_LEAST_IMPORTANT = (
    "duration_seconds",
    "seconds_per_step",
    "checkpoint_stall_seconds",
    "trainable_parameters",
    "warnings",
    "checkpoint_corrupt",
    "report_uri",
    "data_report",
)


def bounded_summary(summary: TrainerSummary) -> str:
    """`summary` as compact JSON within SUMMARY_MAX_BYTES, dropping the least important parts
    first: run diagnostics, data warnings, the corrupt-checkpoint list, per-objective numbers,
    the oldest checkpoints (down to the newest one), the resolved hyperparameters; then the
    message is shortened. The status, reason, param, steps and adapter stay."""
    s = summary.model_copy(deep=True)

    def excess() -> int:
        return len(s.to_json().encode()) - SUMMARY_MAX_BYTES

    for name in _LEAST_IMPORTANT:
        if excess() <= 0:
            return s.to_json()
        setattr(s, name, None)
    if excess() > 0 and s.metrics is not None:
        s.metrics.objectives = {}
    while excess() > 0 and s.checkpoints and len(s.checkpoints) > 1:
        s.checkpoints = s.checkpoints[1:]
    if excess() > 0:
        s.effective = None
    if excess() > 0 and s.message:
        full, lo, hi = s.message, 0, len(s.message)
        while lo < hi:  # the longest prefix that fits (escapes make bytes per character vary)
            mid = (lo + hi + 1) // 2
            s.message = full[:mid] + "…"
            lo, hi = (mid, hi) if excess() <= 0 else (lo, mid - 1)
        s.message = full[:lo] + "…"
    if excess() > 0:
        s.checkpoints = None
    if excess() <= 0:
        return s.to_json()
    # Only pathological URIs get here: keep what the operator needs to classify the run.
    return TrainerSummary(status=s.status, reason=s.reason, steps=s.steps).to_json()
