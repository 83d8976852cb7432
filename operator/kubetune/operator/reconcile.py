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
import json
import math
import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any, NamedTuple

from kubetune.api.conditions import ConditionType, Reason
from kubetune.api.contract import PERMANENT_EXIT_CODE, SUMMARY_MAX_BYTES
from kubetune.api.crd import MUTABLE_AFTER_START
from kubetune.api.enums import Phase
from kubetune.api.resource import parse_spec
from kubetune.api.status import (
    AdapterRef,
    CheckpointRef,
    Condition,
    Cost,
    FineTuneJobStatus,
    Metrics,
    Progress,
)
from pydantic import BaseModel, ValidationError

TRAINER_CONTAINER = "trainer"
"""Name of the trainer container; must equal `builders.CONTAINER` (kept here so this module
stays independent of the builders)."""

SPEC_ANNOTATION = "kubetune.io/spec"
"""Pod-template annotation holding the spec a trainer Job was built from; must equal
`builders.SPEC_ANNOTATION`."""

KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
MESSAGE_MAX_BYTES = 1024
CHECKPOINTS_KEPT = 5
METRICS_PREFIX = "kubetune_trainer_"
_TERMINATION_MAX_BYTES = 4 * SUMMARY_MAX_BYTES  # the kubelet keeps 4 KiB; more is not ours
_METRICS_MAX_BYTES = 1 << 20

# Reasons a trainer summary may carry that name a permanent, user-fixable failure.
TRAINER_PERMANENT_REASONS = frozenset(r.value for r in (Reason.INVALID_DATA, Reason.INVALID_SPEC, Reason.INCOMPATIBLE_TEACHER, Reason.STORAGE_ERROR))
JOB_FAILURE_REASONS = {
    "BackoffLimitExceeded": Reason.BACKOFF_LIMIT_EXCEEDED,
    "MaxFailedIndexesExceeded": Reason.BACKOFF_LIMIT_EXCEEDED,
    "FailedIndexes": Reason.BACKOFF_LIMIT_EXCEEDED,
    "DeadlineExceeded": Reason.DEADLINE_EXCEEDED,
}
PHASE_CONDITIONS = (ConditionType.QUEUED, ConditionType.SUSPENDED, ConditionType.RUNNING, ConditionType.SUCCEEDED, ConditionType.FAILED)
_WARNING_REASONS = frozenset(r.value for r in (Reason.CHECKPOINT_CORRUPT, Reason.SPEC_IMMUTABLE, Reason.CHILD_NAME_CONFLICT, Reason.TOO_MANY_RECREATIONS))


class Prices(NamedTuple):
    """What cost is computed from; `OperatorSettings` has the same attribute names and also fits."""

    gpu_price_per_hour_usd: float
    grid_carbon_kg_per_kwh: float


# ------------------------------------------------------------------------------- redaction

_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
_AWS_SECRET = re.compile(r"(?i)\b(aws_secret_access_key|aws_session_token|secret_access_key)(\s*[=:]\s*[\"']?)[^\s\"',;&]+")
_SIGNED_QUERY = re.compile(r"(?i)([?&](?:x-amz-[a-z-]+|x-goog-[a-z-]+|signature|awsaccesskeyid|sig|token)=)[^&\s'\"]*")
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@:]+:[^/\s@]+@")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}")
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` without the given secret values nor anything that looks like a credential (O10).

    Applied to every message and URI this module writes to status (and so to Events): the
    trainer's summary may quote an exception that echoes a signed URL or a key.
    """
    if not isinstance(text, str):
        text = str(text)
    for secret in sorted({s for s in secrets if isinstance(s, str) and len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, "***")
    text = _AWS_KEY_ID.sub("***", text)
    text = _AWS_SECRET.sub(r"\1\2***", text)
    text = _SIGNED_QUERY.sub(r"\1***", text)
    text = _URL_USERINFO.sub(r"\1***@", text)
    text = _BEARER.sub(r"\1***", text)
    return _HF_TOKEN.sub("***", text)


def _bounded(text: str, limit: int = MESSAGE_MAX_BYTES) -> str:
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode(errors="ignore") + "…"


def _message(text: Any, secrets: Iterable[str]) -> str:
    return _bounded(redact(str(text or ""), secrets).strip())


# ------------------------------------------------------------------------ trainer channels


def _container_status(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    statuses = [s for s in _list(_get(pod, "status", "containerStatuses")) if isinstance(s, dict)]
    named = [s for s in statuses if s.get("name") == TRAINER_CONTAINER]
    return (named or statuses)[0] if statuses else None


def _terminated(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    cs = _container_status(pod)
    for key in ("state", "lastState"):
        term = _get(cs, key, "terminated")
        if isinstance(term, dict):
            return term
    return None


def parse_termination(pod: dict) -> dict | None:
    """The trainer's JSON summary from the pod's termination message, with `exitCode` (and
    `finishedAt`) added; None when the container has not terminated or the message is not a JSON
    object (truncated, garbage, oversized). Never raises."""
    try:
        term = _terminated(pod)
        if term is None:
            return None
        text = term.get("message")
        if not isinstance(text, str) or not text.strip() or len(text) > _TERMINATION_MAX_BYTES:
            return None
        summary = json.loads(text)
        if not isinstance(summary, dict):
            return None
        code = term.get("exitCode")
        if isinstance(code, int) and not isinstance(code, bool):
            summary["exitCode"] = code
        if isinstance(term.get("finishedAt"), str):
            summary["finishedAt"] = term["finishedAt"]
        return summary
    except (ValueError, TypeError, RecursionError):  # garbage, odd types, deeply nested JSON: no summary
        return None


def parse_metrics(text: str) -> dict[str, float]:
    """The trainer's series from Prometheus text: `kubetune_trainer_step` → `step`, a counter's
    `…_total` sample keeps its suffix, `objective_value{name="kdLoss"}` → `objective:kdLoss`.
    Other series, `_created` samples and non-finite values are skipped; on garbage, whatever parsed."""
    from prometheus_client.parser import text_string_to_metric_families

    if not isinstance(text, str):
        return {}
    text = text[:_METRICS_MAX_BYTES]
    out: dict[str, float] = {}

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


def _take_sample(out: dict[str, float], name: str, labels: Mapping[str, str], value: Any) -> None:
    if not name.startswith(METRICS_PREFIX) or name.endswith("_created"):
        return
    try:
        number = float(value)
    except (TypeError, ValueError):
        return
    if not math.isfinite(number):
        return
    short = name[len(METRICS_PREFIX):]
    if short == "objective_value":
        if labels.get("name"):
            out[f"objective:{labels['name']}"] = number
    elif not labels:
        out[short] = number


# ------------------------------------------------------------------------------- helpers


def _rfc3339(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


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
    parts: tuple[tuple[str, type[BaseModel]], ...] = (("progress", Progress), ("metrics", Metrics), ("adapter", AdapterRef), ("cost", Cost))
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
        r.get("action") == "Ignore" and any(_get(c, "type") == "DisruptionTarget" for c in _list(r.get("onPodConditions")))
        for r in rules
    )


def _retries(job: Mapping[str, Any], pods: list[dict]) -> int:
    """Failed pods that were retriable: not a disruption (unless the Job's podFailurePolicy
    already left those out of `status.failed`) and not the trainer's permanent exit code. After a
    permanent exit only the failures before it count: a replacement the Job controller started
    before the Job was ended (no podFailurePolicy) is not a retry of the user's budget."""
    failed_pods = [p for p in pods if _get(p, "status", "phase") == "Failed"]
    permanent_at = [str((_terminated(p) or {}).get("finishedAt") or "") for p in failed_pods
                    if (_terminated(p) or {}).get("exitCode") == PERMANENT_EXIT_CODE and not _disrupted(p)]
    if permanent_at:
        first = min(permanent_at)
        return sum(1 for p in failed_pods if not _disrupted(p)
                   and (_terminated(p) or {}).get("exitCode") != PERMANENT_EXIT_CODE
                   and str((_terminated(p) or {}).get("finishedAt") or "9") < first)
    failed = int(_number(_get(job, "status", "failed")) or 0)
    if not _ignores_disruptions(job):
        failed -= sum(1 for p in failed_pods if _disrupted(p))
    failed -= sum(1 for p in failed_pods if (_terminated(p) or {}).get("exitCode") == PERMANENT_EXIT_CODE and not _disrupted(p))
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
    ftj: Mapping[str, Any], job: Mapping[str, Any], pods: list[dict], old_phase: Any, secrets: Iterable[str]
) -> tuple[_State, dict[str, Any] | None]:
    """The phase the Job shows, and the trainer summary that explains a finished Job."""
    name = _get(job, "metadata", "name") or "the trainer Job"
    conds = _true_conditions(job)
    summaries = _summaries(pods)
    if "Complete" in conds or "SuccessCriteriaMet" in conds:
        summary = _pick_summary(summaries, lambda s: s.get("status") == "succeeded")
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
            head = (f"Job {name}: the trainer exited with the permanent exit code {PERMANENT_EXIT_CODE}; "
                    "the Job is ended without retries")
        else:
            head = str((failed or {}).get("message") or f"Job {name} failed ({job_reason or 'no reason given'})")
        parts = [head]
        trainer_message = (summary or {}).get("message")
        if isinstance(trainer_message, str) and trainer_message.strip():
            parts.append(f"trainer: {trainer_message}")
        return _State(Phase.FAILED, ConditionType.FAILED, reason, _message("; ".join(parts), secrets)), summary
    active = sum(1 for p in pods if _active(p)) if pods else int(_number(_get(job, "status", "active")) or 0)
    if _get(job, "spec", "suspend") is True and active == 0:
        queue = _get(ftj, "spec", "scheduling", "queueName") or _get(job, "metadata", "labels", KUEUE_QUEUE_LABEL)
        if queue and _get(ftj, "spec", "suspend") is not True:
            message = f"Job {name} is waiting for admission by Kueue queue {queue}"
            return _State(Phase.QUEUED, ConditionType.QUEUED, Reason.WAITING_FOR_ADMISSION, message), None
        return _State(Phase.SUSPENDED, ConditionType.SUSPENDED, Reason.SUSPENDED_BY_USER, f"Job {name} is suspended"), None
    if active or _get(job, "status", "startTime"):
        return _State(Phase.RUNNING, ConditionType.RUNNING, Reason.TRAINING_STARTED, f"Job {name} is running"), None
    # Created, not started yet (the Job controller has not acted): keep what the status said.
    keep = old_phase if old_phase in (Phase.PENDING, Phase.VALIDATING, Phase.QUEUED, Phase.SUSPENDED) else Phase.PENDING
    return _State(Phase(keep), None, None, ""), None


def _set_condition(
    conds: dict[str, dict[str, Any]], ctype: ConditionType, status: str, reason: Reason, message: str, now: str, gen: int | None
) -> None:
    """Kubernetes convention: one per type; lastTransitionTime moves only when status does."""
    old = conds.get(ctype.value)
    ltt = old["lastTransitionTime"] if old and old.get("status") == status else now
    new = {"type": ctype.value, "status": status, "reason": reason.value, "message": message, "lastTransitionTime": ltt}
    if gen is not None:
        new["observedGeneration"] = gen
    conds[ctype.value] = new


def spec_drift(ftj: Mapping[str, Any], job: Mapping[str, Any]) -> list[str] | None:
    """The spec fields (`spec.x`) changed since `job` was built, other than those mutable after
    start (RELIABILITY O8: the CRD refuses such a change; this reports one that got through).
    None when the Job carries no readable spec."""
    raw = _get(job, "spec", "template", "metadata", "annotations", SPEC_ANNOTATION)
    try:
        started = json.loads(raw)["spec"] if isinstance(raw, str) else None
    except (ValueError, KeyError, TypeError):
        started = None
    if not isinstance(started, Mapping):
        return None
    spec, _problems = parse_spec(ftj.get("spec"))
    current = spec.wire() if spec is not None else ftj.get("spec")
    current = current if isinstance(current, Mapping) else {}
    fields = sorted((started.keys() | current.keys()) - set(MUTABLE_AFTER_START))
    canon = lambda v: json.dumps(v, sort_keys=True)
    return [f"spec.{f}" for f in fields if canon(started.get(f)) != canon(current.get(f))]


# ---------------------------------------------------------------------------- observe


def observe(
    ftj: dict,
    job: dict | None,
    pods: list[dict],
    scraped: dict[str, float] | None,
    settings_like: Any,
    now: datetime,
    *,
    secrets: Iterable[str] = (),
) -> dict:
    """The FineTuneJob's new `.status` (wire camelCase, valid `FineTuneJobStatus`) from its old
    status, its trainer Job (None before it exists), the Job's pods, the metrics scraped from the
    running trainer (`parse_metrics`), prices (`Prices` or `OperatorSettings`) and the time."""
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
    state, summary = _classify(ftj, job, pods, old.get("phase"), secrets)
    status["phase"] = state.phase.value

    # conditions
    conds = {c["type"]: c for c in old.get("conditions", [])}
    # A finished Job is final: once its condition is written, pods garbage-collected later (and
    # with them the summary that explained it) must not rewrite the message.
    final = state.phase in (Phase.SUCCEEDED, Phase.FAILED) and old.get("phase") == state.phase.value
    if state.condition is not None and state.reason is not None:
        if not (final and _get(conds.get(state.condition.value), "status") == "True"):
            _set_condition(conds, state.condition, "True", state.reason, state.message, stamp, gen)
        for ctype in PHASE_CONDITIONS:
            if ctype != state.condition and conds.get(ctype.value, {}).get("status") == "True":
                _set_condition(conds, ctype, "False", state.reason, f"the FineTuneJob is {state.phase.value} now", stamp, gen)
    corrupt = (summary or {}).get("checkpointCorrupt")
    if isinstance(corrupt, list) and corrupt:
        text = "skipped corrupt checkpoints: " + "; ".join(str(c) for c in corrupt[:5])
        _set_condition(conds, ConditionType.CHECKPOINT_CORRUPT, "True", Reason.CHECKPOINT_CORRUPT, _message(text, secrets), stamp, gen)
    drift = spec_drift(ftj, job)
    immutable = conds.get(ConditionType.SPEC_IMMUTABLE.value)
    if drift:
        text = (f"{', '.join(drift[:8])} changed after the trainer Job started; the Job keeps running the spec it "
                "started with. Revert the change, or create a new FineTuneJob for the new spec")
        _set_condition(conds, ConditionType.SPEC_IMMUTABLE, "True", Reason.SPEC_IMMUTABLE, _message(text, secrets), stamp, gen)
    elif immutable is not None and immutable.get("status") == "True":
        _set_condition(conds, ConditionType.SPEC_IMMUTABLE, "False", Reason.SPEC_VALID, "the spec matches the trainer Job again", stamp, gen)
    status["conditions"] = list(conds.values())

    # times and retries
    if state.phase == Phase.RUNNING and not old.get("startTime"):
        start = _parse_time(_get(job, "status", "startTime")) or now
        status["startTime"] = _rfc3339(start)
    if state.phase in (Phase.SUCCEEDED, Phase.FAILED):
        if not (old.get("completionTime") and old.get("phase") == state.phase.value):
            terminal = _true_conditions(job).get("Complete" if state.phase == Phase.SUCCEEDED else "Failed")
            end = _get(job, "status", "completionTime") or _get(terminal, "lastTransitionTime")
            status["completionTime"] = _rfc3339(_parse_time(end) or now)
    else:
        status.pop("completionTime", None)
    status["retries"] = max(int(old.get("retries") or 0), _retries(job, pods))

    # progress, metrics, checkpoints: scraped while running, then the final summary
    progress = dict(old.get("progress") or {})
    metrics = dict(old.get("metrics") or {})
    checkpoints = {c["step"]: c for c in old.get("checkpoints", [])}
    energy_kwh = _number(_get(old, "cost", "energyKWh"))
    if scraped:
        _apply_scraped(ftj, scraped, progress, metrics, checkpoints)
        joules = _number(scraped.get("gpu_energy_joules_total"))
        if joules:  # a retried pod's counter starts again at 0: never go below what was recorded
            energy_kwh = max(joules / 3.6e6, energy_kwh or 0.0)
    if summary is not None:
        energy_kwh = _apply_summary(summary, state.phase, progress, metrics, checkpoints, secrets) or energy_kwh
        adapter = summary.get("adapter")
        if state.phase == Phase.SUCCEEDED and isinstance(adapter, Mapping):
            adapter = {k: redact(v, secrets) if isinstance(v, str) else v for k, v in adapter.items()}
            cleaned = _clean(AdapterRef, adapter)
            if cleaned:
                status["adapter"] = cleaned
    for key, model, value in (("progress", Progress, progress), ("metrics", Metrics, metrics)):
        cleaned = _clean(model, value) if value else None
        if cleaned:
            status[key] = cleaned
    kept = [_clean(CheckpointRef, c) for _, c in sorted(checkpoints.items())]
    status["checkpoints"] = [c for c in kept if c][-CHECKPOINTS_KEPT:]

    # cost: never decreases (pods may be gone once the Job is finished or recreated)
    price, carbon = _prices(settings_like)
    gpu_hours = max(_gpu_hours(ftj, pods, now), _number(_get(old, "cost", "gpuHours")) or 0.0)
    if gpu_hours > 0 or energy_kwh:
        cost: dict[str, Any] = {"gpuHours": round(gpu_hours, 6), "estimatedUSD": round(gpu_hours * price, 4)}
        if energy_kwh:
            cost |= {"energyKWh": round(energy_kwh, 6), "co2Kg": round(energy_kwh * carbon, 6)}
        status["cost"] = _clean(Cost, cost) or old.get("cost")
    validated = _clean(FineTuneJobStatus, status)
    return validated if validated is not None else old


def _apply_scraped(
    ftj: Mapping[str, Any], scraped: Mapping[str, float], progress: dict, metrics: dict, checkpoints: dict[int, dict]
) -> None:
    def num(key: str, *, positive: bool = False) -> float | None:
        value = _number(scraped.get(key))
        # An unset prometheus gauge reads 0: a loss or a plan of exactly 0 means "not yet".
        return None if value is None or (positive and value <= 0) or value < 0 else value

    if (step := num("step")) is not None:
        progress["step"] = int(step)
    if (total := num("total_steps", positive=True)) is not None:
        progress["totalSteps"] = int(total)
    if (epoch := num("epoch")) is not None:
        progress["epoch"] = round(epoch, 4)
    if (ratio := num("progress_ratio")) is not None:
        progress["percent"] = round(min(ratio, 1.0) * 100, 2)
    if (eta := num("eta_seconds")) is not None:
        progress["etaSeconds"] = round(eta)
    for key, field in (("train_loss", "trainLoss"), ("eval_loss", "evalLoss"), ("base_eval_loss", "baseEvalLoss"),
                       ("eval_token_accuracy_ratio", "tokenAccuracy"), ("tokens_per_second", "tokensPerSecond")):
        if (value := num(key, positive=True)) is not None:
            metrics[field] = value
    if "evalLoss" in metrics and (ev := _number(metrics["evalLoss"])) is not None:
        metrics["perplexity"] = math.exp(min(ev, 50.0))
    objectives = {k.split(":", 1)[1]: v for k, v in scraped.items() if k.startswith("objective:") and _number(v) is not None}
    if objectives:
        metrics["objectives"] = {**(metrics.get("objectives") or {}), **objectives}
    step = num("last_checkpoint_step", positive=True)
    uri = _checkpoint_uri(ftj, int(step)) if step is not None else None
    if step is not None and uri is not None:
        entry = {"step": int(step), "uri": uri}
        ts = num("last_checkpoint_timestamp_seconds", positive=True)
        if ts is not None:
            entry["time"] = _rfc3339(datetime.fromtimestamp(ts, timezone.utc))
        checkpoints[int(step)] = {**entry, **checkpoints.get(int(step), {})}  # known details win


def _apply_summary(
    summary: Mapping[str, Any], phase: Phase, progress: dict, metrics: dict, checkpoints: dict[int, dict], secrets: Iterable[str]
) -> float | None:
    """Fold the trainer's final summary in; returns its energy in kWh when reported."""
    final: Mapping[str, Any] = summary["metrics"] if isinstance(summary.get("metrics"), Mapping) else {}
    for field in ("trainLoss", "evalLoss", "baseEvalLoss", "perplexity", "tokenAccuracy", "tokensPerSecond"):
        if (value := _number(final.get(field))) is not None:
            metrics[field] = value
    if isinstance(final.get("objectives"), Mapping):
        objectives = {str(k): float(v) for k, v in final["objectives"].items() if _number(v) is not None}
        metrics["objectives"] = {**(metrics.get("objectives") or {}), **objectives}
    steps = _number(summary.get("steps"))
    if phase == Phase.SUCCEEDED:
        if steps is not None and steps >= 0:
            progress["step"] = int(steps)
            progress.setdefault("totalSteps", int(steps))
        progress |= {"percent": 100.0, "etaSeconds": 0}
    for item in _list(summary.get("checkpoints")):
        if isinstance(item, Mapping) and type(item.get("step")) is int and isinstance(item.get("uri"), str):
            entry = {k: item[k] for k in ("step", "loss", "time") if item.get(k) is not None}
            entry["uri"] = redact(item["uri"], secrets)
            checkpoints[item["step"]] = {**checkpoints.get(item["step"], {}), **entry}
    energy = _number(final.get("energyKWh"))
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
        cond = next((c for c in new.get("conditions") or [] if isinstance(c, Mapping) and c.get("type") == phase_to and c.get("status") == "True"), None)
        folded = phase_to if cond else None
        reason = str(cond["reason"]) if cond else str(phase_to)
        detail = f": {cond['message']}" if cond and cond.get("message") else ""
        kind = "Warning" if phase_to == Phase.FAILED.value else "Normal"
        events.append((kind, reason, _message(f"{phase_from or 'New'} → {phase_to}{detail}", ())))
    for cond in new.get("conditions") or []:
        if not isinstance(cond, Mapping) or cond.get("status") != "True" or cond.get("type") == folded:
            continue
        if before.get(cond.get("type"), {}).get("status") == "True":
            continue
        reason = str(cond.get("reason") or cond.get("type"))
        kind = "Warning" if reason in _WARNING_REASONS or cond.get("type") == ConditionType.FAILED.value else "Normal"
        events.append((kind, reason, _message(cond.get("message") or f"{cond.get('type')} is True", ())))
    return events
