"""The FineTuneJob's `.status` computed from what the cluster shows: pure functions, no I/O.

A kopf handler reads the FineTuneJob, its trainer Job, the Job's pods and (on a timer) the
trainer's /metrics text, then calls `observe` and patches what `diff` returns (DESIGN style 1).
Keeping the mapping pure — the clock is an argument, Kubernetes objects are plain dicts as the
API returns them — is what lets every phase/reason row, the no-churn promise (RELIABILITY O9)
and the redaction promise (O10) be tested without a cluster.

Channels read here (DESIGN, "Channels between trainer and operator"): Job conditions and
counters; each trainer container's termination message, a JSON summary of at most 4 KiB written
by `python -m kubetune.trainer`; and Prometheus text scraped from the running pod.

Nothing here raises on bad input from the trainer or the cluster: a garbage termination message
or metrics page is treated as absent, and numbers the status schema would refuse are dropped.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

from kubetune.api.conditions import ConditionType, Reason
from kubetune.api.contract import (
    OBJECTIVE_LABEL,
    PERMANENT_EXIT_CODE,
    SUMMARY_MAX_BYTES,
    TRAINER_METRICS_PREFIX,
    TrainerMetric,
    TrainerSummary,
)
from kubetune.api.crd import MUTABLE_AFTER_START, spec_digest
from kubetune.api.enums import Phase
from kubetune.api.resource import parse_spec
from kubetune.api.spec import Checkpointing
from kubetune.api.status import (
    CHECKPOINTS_MAX,
    AdapterRef,
    CheckpointRef,
    Condition,
    Cost,
    DataReportSummary,
    Effective,
    ErrorInfo,
    FineTuneJobStatus,
    Metrics,
    Progress,
    ResolvedHyperparameters,
)
from kubetune.operator import redaction
from kubetune.operator.names import CONTAINER, KUEUE_QUEUE_LABEL, SPEC_DIGEST_ANNOTATION
from pydantic import BaseModel, ValidationError

MESSAGE_MAX_BYTES = 1024
METRICS_PREFIX = TRAINER_METRICS_PREFIX
_TERMINATION_MAX_BYTES = 4 * SUMMARY_MAX_BYTES  # the kubelet keeps 4 KiB; more is not ours
_METRICS_MAX_BYTES = 1 << 20

# Reasons a trainer summary may carry that name a permanent, user-fixable failure.
TRAINER_PERMANENT_REASONS = frozenset(
    r.value
    for r in (
        Reason.INVALID_DATA,
        Reason.INVALID_SPEC,
        Reason.INCOMPATIBLE_TEACHER,
        Reason.STORAGE_ERROR,
        Reason.SECRET_MISSING,
    )
)
JOB_FAILURE_REASONS = {
    "BackoffLimitExceeded": Reason.BACKOFF_LIMIT_EXCEEDED,
    "MaxFailedIndexesExceeded": Reason.BACKOFF_LIMIT_EXCEEDED,
    "FailedIndexes": Reason.BACKOFF_LIMIT_EXCEEDED,
    "DeadlineExceeded": Reason.DEADLINE_EXCEEDED,
}
PHASE_CONDITIONS = (
    ConditionType.PENDING,
    ConditionType.QUEUED,
    ConditionType.SUSPENDED,
    ConditionType.RUNNING,
    ConditionType.SUCCEEDED,
    ConditionType.FAILED,
    ConditionType.CANCELLED,
)
_WARNING_REASONS = frozenset(
    r.value
    for r in (
        Reason.CHECKPOINT_CORRUPT,
        Reason.SPEC_IMMUTABLE,
        Reason.CHILD_NAME_CONFLICT,
        Reason.TOO_MANY_RECREATIONS,
        Reason.CHILD_REJECTED,
        Reason.CRD_MISSING,
        Reason.SERVICE_ACCOUNT_MISSING,
        Reason.SECRET_MISSING,
        Reason.POD_CREATION_FAILED,
        Reason.API_RETRYING,
        Reason.UNSCHEDULABLE,
        Reason.IMAGE_PULL_FAILED,
        Reason.CONTAINER_CONFIG_ERROR,
        Reason.CRASH_LOOP_BACK_OFF,
        Reason.INSUFFICIENT_GPU_MEMORY,
    )
)


class Prices(NamedTuple):
    """What cost is computed from; `OperatorSettings` has the same attribute names and also fits."""

    gpu_price_per_hour_usd: float
    grid_carbon_kg_per_kwh: float


# ------------------------------------------------------------------------------- redaction

# The patterns live in `redaction` (the log filter uses them too); `redact` is applied to every
# message and URI this module writes to status (and so to Events): the trainer's summary may
# quote an exception that echoes a signed URL or a key.
redact = redaction.redact


def _bounded(text: str, limit: int = MESSAGE_MAX_BYTES) -> str:
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode(errors="ignore") + "…"


def _message(text: Any, secrets: Iterable[str]) -> str:
    return _bounded(redact(str(text or ""), secrets).strip())


# ------------------------------------------------------------------------ trainer channels


def controlled_by_job(pod: Any, job_uid: str | None) -> bool:
    """Whether `pod`'s controller reference is the Job with uid `job_uid`.

    The `job-name` label is no proof: anyone who may create pods in the namespace can copy it
    (RELIABILITY O16). The Job controller sets a controller reference with the Job's uid on the
    pods it creates, and adopts no pod that has another controller."""
    if not job_uid:
        return False
    return any(
        isinstance(ref, Mapping)
        and ref.get("controller") is True
        and ref.get("kind") == "Job"
        and ref.get("uid") == job_uid
        for ref in _list(_get(pod, "metadata", "ownerReferences"))
    )


def owned_pods(pods: Iterable[Any], job: Mapping[str, Any] | None) -> list[dict]:
    """The pods among `pods` that `job` controls (see `controlled_by_job`): the only pods whose
    termination message, metrics and counts the operator may read; none when the Job has no uid."""
    uid = _get(job, "metadata", "uid")
    return [p for p in pods if isinstance(p, dict) and controlled_by_job(p, uid if isinstance(uid, str) else None)]


def _container_status(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    statuses = [s for s in _list(_get(pod, "status", "containerStatuses")) if isinstance(s, dict)]
    named = [s for s in statuses if s.get("name") == CONTAINER]
    return (named or statuses)[0] if statuses else None


def _terminated(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    cs = _container_status(pod)
    for key in ("state", "lastState"):
        term = _get(cs, key, "terminated")
        if isinstance(term, dict):
            return term
    return None


def parse_termination(pod: dict) -> dict | None:
    """The trainer's summary (`TrainerSummary`, wire camelCase) from the pod's termination
    message, with `exitCode` (and `finishedAt`) added; None when the container has not terminated
    or the message is no summary (truncated, garbage, oversized, no valid `status`). Fields that
    do not validate are left out. Never raises."""
    try:
        term = _terminated(pod)
        if term is None:
            return None
        text = term.get("message")
        if not isinstance(text, str) or not text.strip() or len(text) > _TERMINATION_MAX_BYTES:
            return None
        parsed = TrainerSummary.lenient(text)
        if parsed is None:
            return None
        summary = parsed.wire()
        code = term.get("exitCode")
        if isinstance(code, int) and not isinstance(code, bool):
            summary["exitCode"] = code
        if isinstance(term.get("finishedAt"), str):
            summary["finishedAt"] = term["finishedAt"]
        return summary
    except (ValueError, TypeError, RecursionError):  # garbage, odd types, deeply nested JSON: no summary
        return None


def parse_metrics(text: str) -> dict[str, float | str]:
    """The trainer's series (`TrainerMetric`) from Prometheus text, keyed by `TrainerMetric.key`:
    `kubetune_trainer_step` → `step`, a counter's `…_total` sample keeps its suffix,
    `objective_value{name="kdLoss"}` → `objective:kdLoss`, and each label of
    `effective_info{batch_size="8"}` → `effective:batch_size` (a string). Other series,
    `_created` samples and non-finite values are skipped; on garbage, whatever parsed."""
    from prometheus_client.parser import text_string_to_metric_families

    if not isinstance(text, str):
        return {}
    text = text[:_METRICS_MAX_BYTES]
    out: dict[str, float | str] = {}

    def take(chunk: str) -> None:
        for family in text_string_to_metric_families(chunk):
            for sample in family.samples:
                _take_sample(out, sample.name, sample.labels, sample.value)

    try:
        take(text)
    except _PARSE_ERRORS:  # one bad line stops the parser: retry line by line, keep what parses
        for line in text.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                with contextlib.suppress(*_PARSE_ERRORS):
                    take(line + "\n")
    return out


_PARSE_ERRORS = (ValueError, TypeError, IndexError, KeyError)


def _take_sample(out: dict[str, float | str], name: str, labels: Mapping[str, str], value: Any) -> None:
    if not name.startswith(METRICS_PREFIX) or name.endswith("_created"):
        return
    if name == TrainerMetric.EFFECTIVE:
        out.update(
            {f"effective:{k}": str(v)[:64] for k, v in labels.items() if k in ResolvedHyperparameters.model_fields}
        )
        return
    try:
        number = float(value)
    except (TypeError, ValueError):
        return
    if not math.isfinite(number):
        return
    short = name[len(METRICS_PREFIX) :]
    if name == TrainerMetric.OBJECTIVE:
        if labels.get(OBJECTIVE_LABEL):
            out[f"objective:{labels[OBJECTIVE_LABEL]}"] = number
    elif not labels:
        out[short] = number


# ------------------------------------------------------------------------------- helpers


def _rfc3339(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _clean(model: type[BaseModel], data: Mapping[str, Any]) -> dict[str, Any] | None:
    """`data` validated by `model` as a wire dict; fields the model refuses are dropped."""
    data = {k: v for k, v in data.items() if v is not None}
    for _ in range(len(data) + 1):
        try:
            return model.model_validate(data).model_dump(by_alias=True, exclude_none=True, mode="json")
        except ValidationError as err:
            bad = {e["loc"][0] for e in err.errors() if e["loc"]}
            if not bad & data.keys():
                return None
            data = {k: v for k, v in data.items() if k not in bad}
    return None


def _clean_status(status: Any) -> dict[str, Any]:
    """The old status as a valid wire dict; what does not validate is left out."""
    if not isinstance(status, Mapping):
        return {}
    out = dict(status)
    parts: tuple[tuple[str, type[BaseModel]], ...] = (
        ("progress", Progress),
        ("metrics", Metrics),
        ("adapter", AdapterRef),
        ("cost", Cost),
        ("effective", Effective),
        ("error", ErrorInfo),
    )
    for key, model in parts:
        if key in out:
            out[key] = _clean(model, out[key]) if isinstance(out[key], Mapping) else None
    for key, model in (("conditions", Condition), ("checkpoints", CheckpointRef)):
        out[key] = [c for c in (_clean(model, i) for i in _list(out.get(key)) if isinstance(i, Mapping)) if c]
    return _clean(FineTuneJobStatus, out) or {}


def _true_conditions(obj: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    conds = _list(_get(obj, "status", "conditions"))
    return {str(c.get("type")): c for c in conds if isinstance(c, dict) and c.get("status") == "True"}


def _active(pod: Mapping[str, Any]) -> bool:
    return _get(pod, "status", "phase") in ("Pending", "Running") and not _get(pod, "metadata", "deletionTimestamp")


def _disrupted(pod: Mapping[str, Any]) -> bool:
    return "DisruptionTarget" in _true_conditions(pod)


def _ignores_disruptions(job: Mapping[str, Any]) -> bool:
    rules = [r for r in _list(_get(job, "spec", "podFailurePolicy", "rules")) if isinstance(r, dict)]
    return any(
        r.get("action") == "Ignore"
        and any(_get(c, "type") == "DisruptionTarget" for c in _list(r.get("onPodConditions")))
        for r in rules
    )


def _retries(job: Mapping[str, Any], pods: list[dict]) -> int:
    """Failed pods that were retriable: not a disruption (unless the Job's podFailurePolicy
    already left those out of `status.failed`) and not the trainer's permanent exit code. After a
    permanent exit only the failures before it count: a replacement the Job controller started
    before the Job was ended (no podFailurePolicy) is not a retry of the user's budget."""
    failed_pods = [p for p in pods if _get(p, "status", "phase") == "Failed"]
    permanent_at = [
        str((_terminated(p) or {}).get("finishedAt") or "")
        for p in failed_pods
        if (_terminated(p) or {}).get("exitCode") == PERMANENT_EXIT_CODE and not _disrupted(p)
    ]
    if permanent_at:
        first = min(permanent_at)
        return sum(
            1
            for p in failed_pods
            if not _disrupted(p)
            and (_terminated(p) or {}).get("exitCode") != PERMANENT_EXIT_CODE
            and str((_terminated(p) or {}).get("finishedAt") or "9") < first
        )
    failed = int(_number(_get(job, "status", "failed")) or 0)
    if not _ignores_disruptions(job):
        failed -= sum(1 for p in failed_pods if _disrupted(p))
    failed -= sum(
        1 for p in failed_pods if (_terminated(p) or {}).get("exitCode") == PERMANENT_EXIT_CODE and not _disrupted(p)
    )
    return max(0, failed)


def _permanent_exit(pods: list[dict]) -> bool:
    """A trainer container ended with the permanent exit code (not in a disruption)."""
    return any((_terminated(p) or {}).get("exitCode") == PERMANENT_EXIT_CODE and not _disrupted(p) for p in pods)


def must_end_job(job: Mapping[str, Any], pods: list[dict]) -> bool:
    """Whether the operator must end `job` itself because a pod exited with the permanent code.

    The Job's podFailurePolicy fails it on that code at once (Kubernetes >= 1.26). An API server
    that does not know the field (older clusters, or the JobPodFailurePolicy gate off) prunes it
    from the stored Job, and the Job controller would retry a bad spec or dataset up to
    backoffLimit times on GPUs. Then the operator enforces the same rule (see
    :func:`end_job_patch`), once, while the Job is still unfinished."""
    if _get(job, "spec", "podFailurePolicy") or not _permanent_exit(pods):
        return False
    conds = _true_conditions(job)
    finished = any(c in conds for c in ("Complete", "Failed", "FailureTarget", "SuccessCriteriaMet"))
    return not finished and _get(job, "spec", "activeDeadlineSeconds") != END_JOB_DEADLINE_SECONDS


END_JOB_DEADLINE_SECONDS = 1


def end_job_patch() -> dict[str, Any]:
    """A merge patch that ends a running Job with the Job API's own means: a deadline already
    past makes the Job controller stop its pods and mark it Failed (DeadlineExceeded) without
    another retry; its failed pods, their logs and termination messages are kept."""
    return {"spec": {"activeDeadlineSeconds": END_JOB_DEADLINE_SECONDS}}


def _summaries(pods: list[dict]) -> list[dict[str, Any]]:
    found = [s for s in (parse_termination(p) for p in pods) if s is not None]
    return sorted(found, key=lambda s: str(s.get("finishedAt") or ""))


def _pick_summary(summaries: list[dict[str, Any]], prefer: Any) -> dict[str, Any] | None:
    preferred = [s for s in summaries if prefer(s)]
    return (preferred or summaries)[-1] if summaries else None


def _gpus_per_pod(ftj: Mapping[str, Any], pod: Mapping[str, Any]) -> float:
    resource = _get(ftj, "spec", "resources", "gpuResource") or "nvidia.com/gpu"
    total, seen = 0.0, False
    for c in _list(_get(pod, "spec", "containers")):
        value = _get(c, "resources", "limits", resource)
        value = _get(c, "resources", "requests", resource) if value is None else value
        if value is not None:
            try:
                total, seen = total + float(value), True
            except (TypeError, ValueError):
                pass
    if seen:
        return total
    gpus = _number(_get(ftj, "spec", "resources", "gpus"))
    return 1.0 if gpus is None else gpus


def _gpu_hours(ftj: Mapping[str, Any], pods: list[dict], now: datetime) -> float:
    hours = 0.0
    for pod in pods:
        cs = _container_status(pod)
        running = _get(cs, "state", "running")
        span = running or _get(cs, "state", "terminated") or _get(cs, "lastState", "terminated")
        start = _parse_time(_get(span, "startedAt"))
        end = _parse_time(_get(span, "finishedAt")) or (now if isinstance(running, Mapping) else None)
        if start is not None and end is not None and end > start:
            hours += _gpus_per_pod(ftj, pod) * (end - start).total_seconds() / 3600
    return hours


def _prices(settings_like: Any) -> tuple[float, float]:
    if hasattr(settings_like, "gpu_price_per_hour_usd"):
        return float(settings_like.gpu_price_per_hour_usd), float(settings_like.grid_carbon_kg_per_kwh)
    price, carbon = settings_like
    return float(price), float(carbon)


def _checkpoint_uri(ftj: Mapping[str, Any], step: int) -> str | None:
    output = _get(ftj, "spec", "output", "uri")
    return f"{output.rstrip('/')}/checkpoints/step-{step}" if isinstance(output, str) and output else None


# ---------------------------------------------------------------------------- phase


class _State(NamedTuple):
    phase: Phase
    condition: ConditionType | None
    reason: Reason | None
    message: str


def _classify(
    ftj: Mapping[str, Any],
    job: Mapping[str, Any],
    pods: list[dict],
    old_phase: Any,
    secrets: Iterable[str],
    job_events: Iterable[Any] = (),
) -> tuple[_State, dict[str, Any] | None]:
    """The phase the Job shows, and the trainer summary that explains a finished Job."""
    name = _get(job, "metadata", "name") or "the trainer Job"
    conds = _true_conditions(job)
    summaries = _summaries(pods)
    if "Complete" in conds or "SuccessCriteriaMet" in conds:
        # a torchrun worker's summary also says succeeded; the one that wrote the adapter explains the job
        summary = _pick_summary(
            summaries, lambda s: s.get("status") == "succeeded" and isinstance(s.get("adapter"), Mapping)
        )
        summary = (
            summary
            if summary is not None and summary.get("status") == "succeeded"
            else _pick_summary(summaries, lambda s: s.get("status") == "succeeded")
        )
        uri = _get(summary, "adapter", "uri")
        where = f": adapter written to {uri}" if isinstance(uri, str) else ""
        message = _message(f"Job {name} completed{where}", secrets)
        return _State(Phase.SUCCEEDED, ConditionType.SUCCEEDED, Reason.TRAINING_SUCCEEDED, message), summary
    failed = conds.get("Failed") or conds.get("FailureTarget")
    # A permanent exit fails the FineTuneJob even where the API server pruned the Job's
    # podFailurePolicy (the operator then ends the Job itself: `must_end_job`).
    permanent_exit = _permanent_exit(pods)
    if failed is not None or permanent_exit:
        job_reason = str((failed or {}).get("reason") or "")
        permanent = job_reason == "PodFailurePolicy" or permanent_exit
        summary = _pick_summary(summaries, lambda s: not permanent or s.get("exitCode") == PERMANENT_EXIT_CODE)
        trainer_reason = str((summary or {}).get("reason") or "")
        if permanent:
            reason = Reason(trainer_reason) if trainer_reason in TRAINER_PERMANENT_REASONS else Reason.PERMANENT_ERROR
        elif job_reason in JOB_FAILURE_REASONS:
            reason = JOB_FAILURE_REASONS[job_reason]
        elif trainer_reason in TRAINER_PERMANENT_REASONS:
            reason = Reason(trainer_reason)
        else:
            reason = Reason.PERMANENT_ERROR
        if permanent_exit and job_reason in ("", "DeadlineExceeded"):  # ended (or to be ended) by the operator
            head = (
                f"Job {name}: the trainer exited with the permanent exit code {PERMANENT_EXIT_CODE}; "
                "the Job is ended without retries"
            )
        else:
            head = str((failed or {}).get("message") or f"Job {name} failed ({job_reason or 'no reason given'})")
        parts = [head]
        trainer_message = (summary or {}).get("message")
        if isinstance(trainer_message, str) and trainer_message.strip():
            parts.append(f"trainer: {trainer_message}")
        return _State(Phase.FAILED, ConditionType.FAILED, reason, _message("; ".join(parts), secrets)), summary
    active_pods = [p for p in pods if _active(p)]
    active = len(active_pods) if pods else int(_number(_get(job, "status", "active")) or 0)
    if _get(job, "spec", "suspend") is True and active == 0:
        queue = _get(ftj, "spec", "scheduling", "queueName") or _get(job, "metadata", "labels", KUEUE_QUEUE_LABEL)
        if queue and _get(ftj, "spec", "suspend") is not True:
            message = f"Job {name} is waiting for admission by Kueue queue {queue}"
            return _State(Phase.QUEUED, ConditionType.QUEUED, Reason.WAITING_FOR_ADMISSION, message), None
        return _State(
            Phase.SUSPENDED, ConditionType.SUSPENDED, Reason.SUSPENDED_BY_USER, f"Job {name} is suspended"
        ), None
    started = [p for p in active_pods if trainer_started(p)]
    if started:
        pod_name = _get(started[0], "metadata", "name")
        return _State(
            Phase.RUNNING,
            ConditionType.RUNNING,
            Reason.TRAINING_STARTED,
            f"Job {name}: the trainer runs in pod {pod_name}",
        ), None
    for pod in active_pods:
        stuck = pending_reason(pod)
        if stuck is not None:
            reason, detail = stuck
            return _State(
                Phase.PENDING,
                ConditionType.PENDING,
                reason,
                _message(f"Job {name}: pod {_get(pod, 'metadata', 'name')}: {detail}", secrets),
            ), None
    if not active_pods:
        refused = pod_creation_failure(job_events)
        if refused is not None:
            reason, detail = refused
            return _State(
                Phase.PENDING,
                ConditionType.PENDING,
                reason,
                _message(f"Job {name} cannot create its pod: {detail}", secrets),
            ), None
    if old_phase == Phase.RUNNING.value:  # a retry's pod is starting: training has started before
        return _State(
            Phase.RUNNING,
            ConditionType.RUNNING,
            Reason.TRAINING_STARTED,
            f"Job {name}: a new pod is starting after a retriable failure",
        ), None
    if active_pods:
        detail = _waiting_detail(active_pods[0])
        return _State(
            Phase.PENDING,
            ConditionType.PENDING,
            Reason.POD_STARTING,
            f"Job {name}: pod {_get(active_pods[0], 'metadata', 'name')} is starting{detail}",
        ), None
    if old_phase == Phase.VALIDATING.value:
        return _State(Phase.VALIDATING, None, None, ""), None
    return _State(Phase.PENDING, ConditionType.PENDING, Reason.JOB_PENDING, job_pending_message(name)), None


def job_pending_message(job_name: str) -> str:
    """The Pending message from the Job's creation until its pod exists (handler and timer agree)."""
    return f"Job {job_name} is created; waiting for its pod"


# Container waiting reasons (kubelet) that mean the trainer cannot start without the user.
_IMAGE_PULL_REASONS = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "RegistryUnavailable"}
)
_CONFIG_REASONS = frozenset({"CreateContainerConfigError", "CreateContainerError", "RunContainerError"})


def trainer_started(pod: Mapping[str, Any]) -> bool:
    """The trainer container is running (the kubelet started it): training has started."""
    return isinstance(_get(_container_status(pod), "state", "running"), Mapping)


def trainer_started_at(pods: list[dict]) -> datetime | None:
    """When the first trainer container that ran started (running or since terminated)."""
    times = []
    for pod in pods:
        cs = _container_status(pod)
        for span in (
            _get(cs, "state", "running"),
            _get(cs, "state", "terminated"),
            _get(cs, "lastState", "terminated"),
        ):
            moment = _parse_time(_get(span, "startedAt"))
            if moment is not None:
                times.append(moment)
    return min(times) if times else None


def pending_reason(pod: Mapping[str, Any]) -> tuple[Reason, str] | None:
    """Why a pod that should run the trainer does not: the scheduler's or the kubelet's words."""
    for cond in _list(_get(pod, "status", "conditions")):
        if (
            isinstance(cond, Mapping)
            and cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            return Reason.UNSCHEDULABLE, f"unschedulable: {cond.get('message') or 'no node fits its requests'}"
    waiting = _get(_container_status(pod), "state", "waiting")
    if not isinstance(waiting, Mapping):
        return None
    why, text = str(waiting.get("reason") or ""), str(waiting.get("message") or "")
    if why in _IMAGE_PULL_REASONS:
        image = _get(_container_status(pod), "image") or "the trainer image"
        return (
            Reason.IMAGE_PULL_FAILED,
            f"{why}: cannot pull {image}: {text or 'check spec.image and imagePullSecrets'}",
        )
    if why in _CONFIG_REASONS:
        if "secret" in text.lower() and "not found" in text.lower():
            return (
                Reason.SECRET_MISSING,
                f"{why}: {text}: create the Secret in this namespace (spec.output.credentialsSecret)",
            )
        return Reason.CONTAINER_CONFIG_ERROR, f"{why}: {text}"
    if why == "CrashLoopBackOff":
        return Reason.CRASH_LOOP_BACK_OFF, f"{why}: {text}"
    return None


def _waiting_detail(pod: Mapping[str, Any]) -> str:
    waiting = _get(_container_status(pod), "state", "waiting")
    if isinstance(waiting, Mapping) and waiting.get("reason"):
        return f" ({waiting['reason']})"
    phase = _get(pod, "status", "phase")
    return f" ({phase})" if phase else ""


def pod_creation_failure(events: Iterable[Any]) -> tuple[Reason, str] | None:
    """The Job controller's newest `FailedCreate` event: its pod was refused (a missing
    ServiceAccount, PriorityClass or quota; the admission message names it)."""
    failed = [e for e in events or () if isinstance(e, Mapping) and e.get("reason") == "FailedCreate"]
    if not failed:
        return None
    newest = max(failed, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
    text = str(newest.get("message") or "the Job controller could not create a pod")
    lowered = text.lower()
    if "serviceaccount" in lowered or "service account" in lowered:
        return Reason.SERVICE_ACCOUNT_MISSING, (
            f"{text}. Install the trainer ServiceAccount in this namespace "
            "(the chart's trainer.namespaces value) or name one in the operator's KUBETUNE_TRAINER_SERVICE_ACCOUNT"
        )
    return Reason.POD_CREATION_FAILED, text


def set_condition(
    conditions: Iterable[Mapping[str, Any]],
    ctype: ConditionType,
    status: str,
    reason: Reason,
    message: str,
    now: str,
    gen: int | None,
) -> list[dict[str, Any]]:
    """`conditions` with `ctype` set, every other type kept as it was (the one place conditions are
    written). Kubernetes convention: one per type; lastTransitionTime moves only when status does."""
    conds = {str(c.get("type")): dict(c) for c in conditions if isinstance(c, Mapping)}
    old = conds.get(ctype.value)
    ltt = old["lastTransitionTime"] if old and old.get("status") == status and old.get("lastTransitionTime") else now
    new = {"type": ctype.value, "status": status, "reason": reason.value, "message": message, "lastTransitionTime": ltt}
    if gen is not None:
        new["observedGeneration"] = gen
    conds[ctype.value] = new
    return list(conds.values())


FINAL_PHASES = (Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED)


def set_phase(
    status: dict[str, Any],
    phase: Phase,
    ctype: ConditionType | None,
    reason: Reason | None,
    message: str,
    now: str,
    gen: int | None,
) -> None:
    """Move `status` (a wire dict, changed in place) to `phase`: its phase condition True with
    `reason` and `message`, the other phase conditions False, `status.reason`/`message` the same.
    A final phase already written keeps its words: pods garbage-collected later (and with them the
    summary that explained it) must not rewrite the message."""
    conds: Sequence[Mapping[str, Any]] = [c for c in status.get("conditions") or [] if isinstance(c, Mapping)]
    current = next((c for c in conds if ctype is not None and c.get("type") == ctype.value), None)
    final = phase in FINAL_PHASES and status.get("phase") == phase.value and _get(current, "status") == "True"
    status["phase"] = phase.value
    if final or reason is None:
        return
    status["reason"], status["message"] = reason.value, message
    if ctype is None:
        return
    conds = set_condition(conds, ctype, "True", reason, message, now, gen)
    for other in PHASE_CONDITIONS:
        if other != ctype and any(c.get("type") == other.value and c.get("status") == "True" for c in conds):
            conds = set_condition(conds, other, "False", reason, f"the FineTuneJob is {phase.value} now", now, gen)
    status["conditions"] = conds


def current_spec(ftj: Mapping[str, Any]) -> dict[str, Any]:
    """The FineTuneJob's spec in wire form (defaults as the models fill them), {} when unreadable."""
    spec, _problems = parse_spec(ftj.get("spec"))
    current = spec.wire() if spec is not None else ftj.get("spec")
    return dict(current) if isinstance(current, Mapping) else {}


def job_digest(job: Mapping[str, Any]) -> str | None:
    """The digest of the spec a trainer Job was built from (`names.SPEC_DIGEST_ANNOTATION`)."""
    digest = _get(job, "spec", "template", "metadata", "annotations", SPEC_DIGEST_ANNOTATION)
    return digest if isinstance(digest, str) and digest else None


@functools.lru_cache(maxsize=4096)
def _digest_of(raw_spec: str) -> str:
    return spec_digest(current_spec({"spec": json.loads(raw_spec)}))


def current_digest(ftj: Mapping[str, Any]) -> str:
    """`spec_digest` of the FineTuneJob's spec; parsed once per distinct spec, not on every tick
    of every running job (the timer and `observe` both ask)."""
    return _digest_of(json.dumps(ftj.get("spec"), sort_keys=True, default=str))


def spec_changed(ftj: Mapping[str, Any], job: Mapping[str, Any]) -> bool:
    """The frozen part of the spec differs from the one `job` was built from."""
    digest = job_digest(job)
    return digest is not None and digest != current_digest(ftj)


def spec_drift(ftj: Mapping[str, Any], job: Mapping[str, Any], started: Mapping[str, Any] | None) -> list[str] | None:
    """The spec fields (`spec.x`) changed since `job` was built from the spec `started` (read
    back from its ConfigMap), other than those mutable after start (RELIABILITY O8: the CRD
    refuses such a change once training started; before, the operator rebuilds the Job). None
    when the Job carries no digest; `["spec"]` when it changed but the started spec is gone."""
    if job_digest(job) is None:
        return None
    if not spec_changed(ftj, job):
        return []
    current = current_spec(ftj)
    if not isinstance(started, Mapping):
        return ["spec"]
    fields = sorted((started.keys() | current.keys()) - set(MUTABLE_AFTER_START))
    canon = lambda v: json.dumps(v, sort_keys=True)
    return [f"spec.{f}" for f in fields if canon(started.get(f)) != canon(current.get(f))] or ["spec"]


# ---------------------------------------------------------------------------- observe


def observe(
    ftj: dict,
    job: dict | None,
    pods: list[dict],
    scraped: Mapping[str, float | str] | None,
    settings_like: Any,
    now: datetime,
    *,
    secrets: Iterable[str] = (),
    job_events: Iterable[Any] = (),
    started_spec: Mapping[str, Any] | None = None,
) -> dict:
    """The FineTuneJob's new `.status` (wire camelCase, valid `FineTuneJobStatus`) from its old
    status, its trainer Job (None before it exists), the Job's pods (only those the Job controls:
    `owned_pods`), the metrics scraped from the running trainer (`parse_metrics`), prices (`Prices`
    or `OperatorSettings`), the time, the Job's `FailedCreate` events when it has no pod, and the
    spec the Job was built from (its ConfigMap's, read when the digests differ)."""
    secrets = tuple(secrets)
    old = _clean_status(ftj.get("status") if isinstance(ftj, Mapping) else None)
    gen = _get(ftj, "metadata", "generation")
    gen = gen if isinstance(gen, int) and gen >= 0 else None
    status = dict(old)
    if gen is not None:
        status["observedGeneration"] = gen
    if not isinstance(job, Mapping):
        return _clean(FineTuneJobStatus, status) or old
    pods = [p for p in pods or [] if isinstance(p, Mapping)]
    stamp = _rfc3339(now)
    state, summary = _classify(ftj, job, pods, old.get("phase"), secrets, job_events)
    set_phase(status, state.phase, state.condition, state.reason, state.message, stamp, gen)

    # conditions other than the phase's
    conds = status.get("conditions", [])
    corrupt = (summary or {}).get("checkpointCorrupt")
    if isinstance(corrupt, list) and corrupt:
        text = "skipped corrupt checkpoints: " + "; ".join(str(c) for c in corrupt[:5])
        conds = set_condition(
            conds,
            ConditionType.CHECKPOINT_CORRUPT,
            "True",
            Reason.CHECKPOINT_CORRUPT,
            _message(text, secrets),
            stamp,
            gen,
        )
    drift = spec_drift(ftj, job, started_spec)
    immutable = next((c for c in conds if c.get("type") == ConditionType.SPEC_IMMUTABLE.value), None)
    if drift:
        text = (
            f"{', '.join(drift[:8])} changed after the trainer Job started; the Job keeps running the spec it "
            "started with. Revert the change, or create a new FineTuneJob for the new spec"
        )
        conds = set_condition(
            conds, ConditionType.SPEC_IMMUTABLE, "True", Reason.SPEC_IMMUTABLE, _message(text, secrets), stamp, gen
        )
    elif immutable is not None and immutable.get("status") == "True":
        conds = set_condition(
            conds,
            ConditionType.SPEC_IMMUTABLE,
            "False",
            Reason.SPEC_VALID,
            "the spec matches the trainer Job again",
            stamp,
            gen,
        )
    status["conditions"] = conds

    # times and retries: training starts when a trainer container first runs (or reports metrics)
    if not old.get("startTime") and (
        state.phase in (Phase.RUNNING, Phase.SUCCEEDED) or scraped or trainer_started_at(pods)
    ):
        start = trainer_started_at(pods) or (now if state.phase == Phase.RUNNING or scraped else None)
        if start is not None:
            status["startTime"] = _rfc3339(start)
    if state.phase in (Phase.SUCCEEDED, Phase.FAILED):
        if not (old.get("completionTime") and old.get("phase") == state.phase.value):
            terminal = _true_conditions(job).get("Complete" if state.phase == Phase.SUCCEEDED else "Failed")
            end = _get(job, "status", "completionTime") or _get(terminal, "lastTransitionTime")
            status["completionTime"] = _rfc3339(_parse_time(end) or now)
    else:
        status.pop("completionTime", None)
    status["retries"] = max(int(old.get("retries") or 0), _retries(job, pods))

    # progress, metrics, checkpoints, effective: scraped while running, then the final summary
    progress = dict(old.get("progress") or {})
    metrics = dict(old.get("metrics") or {})
    checkpoints = {c["step"]: c for c in old.get("checkpoints", [])}
    effective = dict(old.get("effective") or {})
    energy_kwh = _number(_get(old, "cost", "energyKWh"))
    if scraped:
        _apply_scraped(ftj, scraped, progress, metrics, checkpoints, effective)
        joules = _number(scraped.get(TrainerMetric.GPU_ENERGY.key))
        if joules:  # a retried pod's counter starts again at 0: never go below what was recorded
            energy_kwh = max(joules / 3.6e6, energy_kwh or 0.0)
    if summary is not None:
        energy_kwh = (
            _apply_summary(summary, state.phase, progress, metrics, checkpoints, effective, secrets) or energy_kwh
        )
        adapter = summary.get("adapter")
        if state.phase == Phase.SUCCEEDED and isinstance(adapter, Mapping):
            adapter = {k: redact(v, secrets) if isinstance(v, str) else v for k, v in adapter.items()}
            cleaned = _clean(AdapterRef, adapter)
            if cleaned:
                status["adapter"] = cleaned
        if isinstance(summary.get("dataReport"), Mapping):
            status["dataReport"] = data_report_status(summary["dataReport"]) or old.get("dataReport")
    if isinstance(progress.get("etaSeconds"), int):
        progress["eta"] = human_duration(progress["etaSeconds"])
    for field in LOSS_FIELDS:  # 4 decimals: what `kubectl get ftj` shows, and all a loss means
        if (value := _number(metrics.get(field))) is not None:
            metrics[field] = round(value, 4)
    for key, model, section in (("progress", Progress, progress), ("metrics", Metrics, metrics)):
        cleaned = _clean(model, section) if section else None
        if cleaned:
            status[key] = cleaned
    kept = [_clean(CheckpointRef, c) for _, c in sorted(checkpoints.items())]
    status["checkpoints"] = [c for c in kept if c][-checkpoints_kept(ftj) :]
    if effective:
        status["effective"] = _clean(Effective, effective) or old.get("effective")

    # error: the Failed condition as one object (as OpenAI's fine-tuning job has it), else unset
    failed = next(
        (
            c
            for c in status.get("conditions") or []
            if c.get("type") == ConditionType.FAILED.value and c.get("status") == "True"
        ),
        None,
    )
    if state.phase == Phase.FAILED and failed is not None:
        param = (summary or {}).get("param")
        if param is None and _get(old, "error", "code") == failed.get("reason"):
            param = _get(old, "error", "param")  # the pod with the summary may be gone by now
        status["error"] = error_info(
            failed.get("reason") or Reason.PERMANENT_ERROR, failed.get("message") or "", param, secrets=secrets
        )
    else:
        status.pop("error", None)

    # cost: never decreases (pods may be gone once the Job is finished or recreated)
    price, carbon = _prices(settings_like)
    recorded = _number(_get(old, "cost", "gpuHours")) or 0.0
    gpu_hours = max(_gpu_hours(ftj, pods, now), recorded)
    if (
        state.phase == Phase.RUNNING
        and recorded
        and gpu_hours - recorded < max(COST_STEP_RATIO * recorded, COST_STEP_GPU_HOURS)
    ):
        gpu_hours = recorded  # while running, cost moves in steps: an idle tick writes nothing
    if gpu_hours > 0 or energy_kwh:
        cost: dict[str, Any] = {"gpuHours": round(gpu_hours, 6), "estimatedUSD": round(gpu_hours * price, 4)}
        if energy_kwh:
            cost |= {"energyKWh": round(energy_kwh, 6), "co2Kg": round(energy_kwh * carbon, 6)}
        status["cost"] = _clean(Cost, cost) or old.get("cost")
    validated = _clean(FineTuneJobStatus, status)
    return validated if validated is not None else old


def data_report_status(report: Any) -> dict[str, Any] | None:
    """status.dataReport from a summary's `dataReport` (the validation Job's, then the trainer's)."""
    return _clean(DataReportSummary, report) if isinstance(report, Mapping) else None


def checkpoints_kept(ftj: Mapping[str, Any]) -> int:
    """How many checkpoints the trainer keeps (spec.checkpointing.keep, or its default), within
    what status.checkpoints holds: the status lists no checkpoint the trainer has pruned."""
    keep = _get(ftj, "spec", "checkpointing", "keep")
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        keep = Checkpointing.model_fields["keep"].default
    return min(int(keep), CHECKPOINTS_MAX)


def error_info(
    reason: Reason | str, message: str, param: str | None = None, *, secrets: Iterable[str] = ()
) -> dict[str, Any]:
    """`status.error` for a Failed phase: the Failed condition's reason as `code`, its message
    (redacted and bounded like condition messages), and the spec field or file:line, if known."""
    out: dict[str, Any] = {"code": str(reason), "message": _message(message, secrets)}
    if isinstance(param, str) and param.strip():
        out["param"] = _bounded(redact(param.strip(), secrets))
    return out


LOSS_FIELDS = ("trainLoss", "evalLoss", "baseEvalLoss")
COST_STEP_GPU_HOURS = 0.05
COST_STEP_RATIO = 0.02
"""While a job runs, status.cost is rewritten once it grew by 3 GPU-minutes and 2 %: a cost that
moved on every tick cost one status PATCH per running job per tick (300 idle jobs: 10 requests/s).
The final figure is exact: a finished job's cost is always written."""


def human_duration(seconds: int) -> str:
    """3900 → `1h05m`, 42 → `42s`, 200000 → `2d07h`: short enough for a kubectl column."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _apply_scraped(
    ftj: Mapping[str, Any],
    scraped: Mapping[str, float | str],
    progress: dict,
    metrics: dict,
    checkpoints: dict[int, dict],
    effective: dict[str, Any],
) -> None:
    def num(metric: TrainerMetric, *, positive: bool = False) -> float | None:
        value = _number(scraped.get(metric.key))
        # An unset prometheus gauge reads 0: a loss or a plan of exactly 0 means "not yet".
        return None if value is None or (positive and value <= 0) or value < 0 else value

    if (step := num(TrainerMetric.STEP)) is not None:
        progress["step"] = int(step)
    if (total := num(TrainerMetric.TOTAL_STEPS, positive=True)) is not None:
        progress["totalSteps"] = int(total)
    if (epoch := num(TrainerMetric.EPOCH)) is not None:
        progress["epoch"] = round(epoch, 4)
    if (ratio := num(TrainerMetric.PROGRESS)) is not None:
        progress["percent"] = round(min(ratio, 1.0) * 100, 2)
    if (eta := num(TrainerMetric.ETA)) is not None:
        progress["etaSeconds"] = round(eta)
    for metric, field in (
        (TrainerMetric.TRAIN_LOSS, "trainLoss"),
        (TrainerMetric.EVAL_LOSS, "evalLoss"),
        (TrainerMetric.BASE_EVAL_LOSS, "baseEvalLoss"),
        (TrainerMetric.TOKEN_ACCURACY, "tokenAccuracy"),
        (TrainerMetric.TOKENS_PER_SECOND, "tokensPerSecond"),
    ):
        if (value := num(metric, positive=True)) is not None:
            metrics[field] = value
    if "evalLoss" in metrics and (ev := _number(metrics["evalLoss"])) is not None:
        metrics["perplexity"] = math.exp(min(ev, 50.0))
    objectives = {
        k.split(":", 1)[1]: v for k, v in scraped.items() if k.startswith("objective:") and _number(v) is not None
    }
    if objectives:
        metrics["objectives"] = {**(metrics.get("objectives") or {}), **objectives}
    step = num(TrainerMetric.LAST_CHECKPOINT_STEP, positive=True)
    uri = _checkpoint_uri(ftj, int(step)) if step is not None else None
    if step is not None and uri is not None:
        entry = {"step": int(step), "uri": uri}
        ts = num(TrainerMetric.LAST_CHECKPOINT_TIME, positive=True)
        if ts is not None:
            entry["time"] = _rfc3339(datetime.fromtimestamp(ts, UTC))
        checkpoints[int(step)] = {**entry, **checkpoints.get(int(step), {})}  # known details win
    labels = {k.split(":", 1)[1]: v for k, v in scraped.items() if k.startswith("effective:") and isinstance(v, str)}
    resolved = _clean(ResolvedHyperparameters, labels) if labels else None
    effective.update(resolved or {})


def _apply_summary(
    summary: Mapping[str, Any],
    phase: Phase,
    progress: dict,
    metrics: dict,
    checkpoints: dict[int, dict],
    effective: dict[str, Any],
    secrets: Iterable[str],
) -> float | None:
    """Fold the trainer's final summary (`parse_termination`) in: metrics, progress, the
    checkpoints the trainer still keeps (the others it pruned are dropped), the hyperparameters
    it resolved. Returns its energy in kWh when reported."""
    parsed = TrainerSummary.lenient(summary)
    if parsed is None:
        return None
    final = parsed.metrics
    if final is not None:
        for field in (
            "train_loss",
            "eval_loss",
            "base_eval_loss",
            "perplexity",
            "token_accuracy",
            "tokens_per_second",
            "preference_accuracy",
            "base_preference_accuracy",
            "mean_reward",
            "base_mean_reward",
        ):
            if (value := _number(getattr(final, field))) is not None:
                metrics[Metrics.model_fields[field].alias or field] = value
        objectives = {k: v for k, v in final.objectives.items() if _number(v) is not None}
        if objectives:
            metrics["objectives"] = {**(metrics.get("objectives") or {}), **objectives}
        if final.generation is not None:  # base vs tuned scores of the samples (spec.evaluation)
            metrics["generation"] = final.generation.wire()
    if phase == Phase.SUCCEEDED:
        if parsed.steps is not None:
            progress["step"] = parsed.steps
            progress.setdefault("totalSteps", parsed.steps)
        progress |= {"percent": 100.0, "etaSeconds": 0}
    if parsed.checkpoints is not None:
        listed = {c.step for c in parsed.checkpoints}
        for step in [s for s in checkpoints if s not in listed]:
            del checkpoints[step]
        for ref in parsed.checkpoints:
            entry = ref.model_dump(by_alias=True, exclude_none=True) | {"uri": redact(ref.uri, secrets)}
            checkpoints[ref.step] = {**checkpoints.get(ref.step, {}), **entry}
    if parsed.effective is not None:
        effective.update(parsed.effective.wire())
    energy = _number(final.energy_kwh) if final is not None else None
    return energy if energy is not None and energy > 0 else None


# ------------------------------------------------------------------------- diff and events


def diff(old: dict, new: dict) -> dict | None:
    """The JSON merge patch (RFC 7386) that turns status `old` into `new`; None when equal (O9).
    Lists are replaced whole; a key that disappears is patched to None."""
    old = old or {}
    # A field the status never had, now at its empty default (no conditions, 0 retries), is not a
    # change: writing it would cost a request and an event for every FineTuneJob on every tick.
    new = {k: v for k, v in (new or {}).items() if k in old or not (v == [] or v == {} or (v == 0 and type(v) is int))}
    patch = _merge_patch(old, new)
    return patch or None


def _merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    patch: dict[str, Any] = {key: None for key in old.keys() - new.keys()}
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif isinstance(value, Mapping) and isinstance(old[key], Mapping):
            inner = _merge_patch(old[key], value)
            if inner:
                patch[key] = inner
        elif not _same(old[key], value):
            patch[key] = value
    return patch


def _same(a: Any, b: Any) -> bool:
    """Equality as the API server round-trips JSON (1.0 comes back as 1, but True is not 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def transitions(old: dict, new: dict) -> list[tuple[str, str, str]]:
    """Events for a status change: (type Normal|Warning, reason, message) for a phase change and
    for each condition that became True (the one matching the new phase is folded into the
    phase event)."""
    old, new = old or {}, new or {}
    before = {c.get("type"): c for c in old.get("conditions") or [] if isinstance(c, Mapping)}
    events: list[tuple[str, str, str]] = []
    phase_from, phase_to = old.get("phase"), new.get("phase")
    folded = None
    if phase_to and phase_to != phase_from:
        cond = next(
            (
                c
                for c in new.get("conditions") or []
                if isinstance(c, Mapping) and c.get("type") == phase_to and c.get("status") == "True"
            ),
            None,
        )
        folded = phase_to if cond else None
        reason = str(cond["reason"]) if cond else str(phase_to)
        detail = f": {cond['message']}" if cond and cond.get("message") else ""
        kind = "Warning" if phase_to == Phase.FAILED.value or reason in _WARNING_REASONS else "Normal"
        events.append((kind, reason, _message(f"{phase_from or 'New'} → {phase_to}{detail}", ())))
    for cond in new.get("conditions") or []:
        if not isinstance(cond, Mapping) or cond.get("status") != "True" or cond.get("type") == folded:
            continue
        was = before.get(cond.get("type"), {})
        if was.get("status") == "True" and (was.get("reason") == cond.get("reason") or cond.get("type") != phase_to):
            continue  # still True; only a new reason for the phase (Pending: Unschedulable…) is news
        reason = str(cond.get("reason") or cond.get("type"))
        kind = "Warning" if reason in _WARNING_REASONS or cond.get("type") == ConditionType.FAILED.value else "Normal"
        events.append((kind, reason, _message(cond.get("message") or f"{cond.get('type')} is True", ())))
    return events
