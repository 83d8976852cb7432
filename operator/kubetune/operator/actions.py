"""What the FineTuneJob handlers do: parse the body, call a pure function, patch (DESIGN style 1).

`kubetune.operator.handlers` is the kopf wiring: each handler takes its `Context` from kopf's
`memo` and calls one function here. These functions decide (with `reconcile`, `builders` and
`serving`, which are pure) and act through `kubetune.operator.client`, which holds every request
the operator makes. Status changes of a change handler go through kopf's `patch` (`_patch_phase`,
the one way phases and conditions are written, and `_fail`); the observe timer patches the status
itself (see `observe_training`).

Serving (spec.serving, issue 20): once a job is Succeeded, the observe timer creates or adopts its
serving object (kubetune.operator.serving builds it) and keeps status.serving and the Serving
condition true to the object's own status; those requests go through `Context.serving_kube`.

Deletion relies on ownerReferences only: no handler needs a finalizer, so deleting a FineTuneJob
while the operator is down never hangs (O7).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import time
from datetime import UTC, datetime
from typing import Any

import kopf
from kubetune.api.conditions import ConditionType, Reason
from kubetune.api.crd import MUTABLE_AFTER_START
from kubetune.api.enums import Phase
from kubetune.api.estimate import estimate_job, memory_warning
from kubetune.api.resource import FineTuneJob, parse_manifest
from kubetune.operator import builders, client, names, presence, reconcile, serving
from kubetune.operator.client import (
    BACKOFF_SECONDS,
    ApiError,
    ChildRefused,
    Kube,
    backoff_seconds,
    ensure_child,
    retriable,
)
from kubetune.operator.metrics import METRICS
from kubetune.operator.scrape import scrape
from kubetune.operator.settings import OperatorSettings

PROBLEMS_SHOWN = 10
_TERMINAL = (Phase.SUCCEEDED.value, Phase.FAILED.value, Phase.CANCELLED.value)


@dataclasses.dataclass
class Context:
    """What every handler needs, handed to it through kopf's `memo` (`memo.kubetune`): the
    settings, the API clients and the operator-wide state the handlers share."""

    settings: OperatorSettings
    kube: Kube
    """The operator's client: children, status, Leases."""
    serving_kube: Kube
    """The same API server under the User-Agent SERVING_AGENT: spec.serving's requests."""
    metrics_port: int | None = None
    """Where the operator serves its own /metrics while it runs; None: not served."""
    presence_namespace: str | None = None
    """Where a standalone operator holds the `kubetune-operator` Lease (`presence`); None: no Lease."""
    phases: dict[str, str] = dataclasses.field(default_factory=dict)
    """uid → phase of every FineTuneJob the watch shows (kubetune_operator_finetunejobs{phase})."""
    serving_due: dict[str, tuple[float, int]] = dataclasses.field(default_factory=dict)
    """uid → (monotonic time of the next serving check, failed attempts)."""
    servers: list[Any] = dataclasses.field(default_factory=list)
    """The running /metrics servers (stopped at cleanup)."""
    lease_tasks: list[tuple[asyncio.Task[None], asyncio.Event]] = dataclasses.field(default_factory=list)
    """The task holding the Lease and its stop flag (`presence.start`, `presence.stop`)."""
    presence_renew_seconds: float = presence.RENEW_SECONDS

    @classmethod
    def create(
        cls,
        settings: OperatorSettings,
        *,
        api_url: str | None = None,
        metrics_port: int | None = None,
        presence_namespace: str | None = None,
        presence_renew_seconds: float = presence.RENEW_SECONDS,
    ) -> Context:
        """Clients for `api_url` (else the `api_url` setting, else in-cluster or kubeconfig)."""
        url = api_url or settings.api_url
        return cls(
            settings,
            Kube(url),
            Kube(url, client.SERVING_AGENT),
            metrics_port=metrics_port,
            presence_namespace=presence_namespace,
            presence_renew_seconds=presence_renew_seconds,
        )


# --------------------------------------------------------------------------- pure helpers


def plain(body: Any) -> dict[str, Any]:
    """The kopf body as a plain JSON dict."""
    return json.loads(json.dumps(dict(body), default=lambda o: dict(o) if hasattr(o, "keys") else str(o)))


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _problem_field(problems: list[Any]) -> str | None:
    """The field the first problem is about (`spec.x.y`), for status.error.param."""
    first = str(problems[0]) if problems else ""
    head = first.split(":", 1)[0].strip()
    return head if head.startswith(("spec", "metadata")) and " " not in head else None


def invalid_spec_message(problems: list[Any]) -> str:
    """The problems of a manifest as one bounded message."""
    shown = "; ".join(str(p) for p in problems[:PROBLEMS_SHOWN])
    more = len(problems) - PROBLEMS_SHOWN
    text = f"invalid spec: {shown}" + (f" (and {more} more)" if more > 0 else "")
    return reconcile._bounded(reconcile.redact(text))


def effective(ftj: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    """status.effective: the image, GPUs, nodes and the GPU memory estimate."""
    spec = ftj.spec
    out: dict[str, Any] = {
        "image": spec.image or settings.trainer_image,
        "gpus": spec.resources.gpus,
        "nodes": spec.resources.nodes,
    }
    sizing = estimate_job(spec)
    if sizing.parameters:
        out["parameters"] = sizing.parameters
    if sizing.gpu_memory_gib is not None:
        out["estimatedGPUMemoryGiB"] = sizing.gpu_memory_gib
    return out


def _unfinished(job: dict[str, Any]) -> bool:
    conds = reconcile._true_conditions(job)
    return not any(c in conds for c in ("Complete", "Failed", "FailureTarget", "SuccessCriteriaMet"))


def _data_validated(status: dict[str, Any]) -> bool:
    return any(
        c.get("type") == ConditionType.DATA_VALIDATED.value and c.get("status") == "True"
        for c in status.get("conditions") or []
        if isinstance(c, dict)
    )


def initial_phase(ftj: FineTuneJob, settings: OperatorSettings) -> Phase:
    if ftj.spec.suspend:
        return Phase.SUSPENDED
    return Phase.QUEUED if builders.uses_kueue(ftj, settings) else Phase.PENDING


# ------------------------------------------------------------------ status patches


def _current_status(body: Any, patch: kopf.Patch) -> dict[str, Any]:
    """The status as it will be once `patch` is applied (its top-level keys win)."""
    status = dict(plain(body).get("status") or {})
    status.update(json.loads(json.dumps(dict(patch.get("status") or {}), default=dict)))
    return {k: v for k, v in status.items() if v is not None}


def _patch_phase(
    patch: kopf.Patch,
    body: Any,
    phase: Phase,
    ctype: ConditionType | None,
    reason: Reason,
    message: str,
    generation: int | None,
) -> None:
    """Move to `phase` through `reconcile.set_phase` (the one place conditions are written)."""
    status = _current_status(body, patch)
    reconcile.set_phase(status, phase, ctype, reason, message, _now(), generation)
    for key in ("phase", "reason", "message", "conditions"):
        if key in status:
            patch.status[key] = status[key]
    if phase != Phase.FAILED and status.get("error") is not None:
        patch.status["error"] = None  # status.error belongs to a Failed phase only
    if generation is not None:
        patch.status["observedGeneration"] = generation


def _patch_condition(
    patch: kopf.Patch, body: Any, ctype: ConditionType, state: str, reason: Reason, message: str, generation: int | None
) -> None:
    status = _current_status(body, patch)
    patch.status["conditions"] = reconcile.set_condition(
        status.get("conditions") or [], ctype, state, reason, message, _now(), generation
    )


def _fail(
    patch: kopf.Patch, body: Any, reason: Reason, message: str, generation: int | None, param: str | None = None
) -> kopf.PermanentError:
    """End the FineTuneJob Failed (other conditions kept), with `status.error` and a Warning event."""
    old_phase = (body.get("status") or {}).get("phase")
    _patch_phase(patch, body, Phase.FAILED, ConditionType.FAILED, reason, message, generation)
    patch.status["error"] = reconcile.error_info(reason, message, param)
    kopf.warn(body, reason=reason.value, message=message)
    METRICS.transition(old_phase, Phase.FAILED.value)
    return kopf.PermanentError(message)


def _retrying(
    patch: kopf.Patch, body: Any, err: ApiError, what: str, retry: int, started: datetime | None, generation: int | None
) -> kopf.TemporaryError:
    """Condition Degraded (APIRetrying) saying what is retried and since when; the error kopf
    retries the handler after (bounded exponential backoff, or the server's Retry-After)."""
    delay = backoff_seconds(err, retry)
    answer = "no answer" if err.status == 0 else f"HTTP {err.status}"
    since = reconcile._rfc3339(started) if isinstance(started, datetime) else _now()
    message = reconcile._bounded(
        reconcile.redact(
            f"{what}: {answer} from the API server since {since} ({retry + 1} attempts); retrying in {delay:g}s"
        )
    )
    _patch_condition(patch, body, ConditionType.DEGRADED, "True", Reason.API_RETRYING, message, generation)
    return kopf.TemporaryError(message, delay=delay)


def _recovered(patch: kopf.Patch, body: Any, generation: int | None) -> None:
    """Degraded back to False once a request the operator retried went through."""
    status = _current_status(body, patch)
    if any(
        c.get("type") == ConditionType.DEGRADED.value and c.get("status") == "True"
        for c in status.get("conditions") or []
    ):
        _patch_condition(
            patch,
            body,
            ConditionType.DEGRADED,
            "False",
            Reason.API_HEALTHY,
            "the API server answers the operator again",
            generation,
        )


# ------------------------------------------------------------------ what the handlers do


async def start_training(
    ctx: Context,
    ftj: FineTuneJob,
    body: Any,
    namespace: str | None,
    uid: str,
    patch: kopf.Patch,
    status: dict[str, Any],
    generation: int | None,
) -> None:
    """Create the trainer Job (and its Service / PodGroup) and record it in the status."""
    children = [builders.spec_configmap(ftj, uid)]  # first: the pods mount it
    if builders.uses_volcano(ftj):
        children.append(builders.podgroup(ftj, uid, ctx.settings))
    if ftj.spec.resources.nodes > 1:
        children.append(builders.headless_service(ftj, uid, ctx.settings))
    job = builders.trainer_job(ftj, uid, ctx.settings)
    children.append(job)
    for child in children:
        if not await ensure_child(ctx.kube, child, namespace, uid):
            raise _fail(patch, body, Reason.CHILD_NAME_CONFLICT, client.conflict_message(child), generation)
    job_name = job["metadata"]["name"]
    patch.status["jobName"] = job_name
    patch.status["specConfigMap"] = children[0]["metadata"]["name"]
    patch.status["effective"] = effective(ftj, ctx.settings)
    warning = memory_warning(ftj.spec)
    if warning is not None:
        _patch_condition(patch, body, ConditionType.INSUFFICIENT_GPU_MEMORY, "True", warning[0], warning[1], generation)
        kopf.warn(body, reason=warning[0].value, message=warning[1])
    if generation is not None:
        patch.status["observedGeneration"] = generation
    if status.get("phase") in (None, Phase.VALIDATING.value):
        phase = initial_phase(ftj, ctx.settings)
        if phase == Phase.PENDING:
            _patch_phase(
                patch,
                body,
                phase,
                ConditionType.PENDING,
                Reason.JOB_PENDING,
                reconcile.job_pending_message(job_name),
                generation,
            )
        else:
            patch.status["phase"] = phase.value
        METRICS.transition(status.get("phase"), phase.value)
    if status.get("jobName") != job_name:
        kopf.info(body, reason=Reason.JOB_CREATED.value, message=f"Job {job_name} is created")


async def create_children(
    ctx: Context,
    body: kopf.Body,
    name: str,
    namespace: str | None,
    uid: str,
    patch: kopf.Patch,
    retry: int = 0,
    started: datetime | None = None,
) -> None:
    """Create the FineTuneJob's children (the validation Job first when spec.dataset.prevalidate
    asks for it): on create, and on resume after an operator restart (children are adopted)."""
    status = dict(body.get("status") or {})
    if status.get("phase") in _TERMINAL:
        return
    generation = body.get("metadata", {}).get("generation")
    manifest = {k: v for k, v in plain(body).items() if k != "status"}
    with METRICS.reconcile_timer():
        ftj, problems = parse_manifest(manifest)
        if ftj is None:
            raise _fail(
                patch,
                body,
                Reason.INVALID_SPEC,
                invalid_spec_message(problems),
                generation,
                param=_problem_field(problems),
            )
        if ftj.spec.cancel:
            _patch_phase(
                patch,
                body,
                Phase.CANCELLED,
                ConditionType.CANCELLED,
                Reason.CANCELLED_BY_USER,
                "cancelled (spec.cancel) before the trainer Job was created",
                generation,
            )
            return
        try:
            if ftj.spec.dataset.prevalidate and not status.get("jobName") and not _data_validated(status):
                await start_validation(ctx, ftj, body, namespace, uid, patch, status, generation)
            else:
                await start_training(ctx, ftj, body, namespace, uid, patch, status, generation)
        except ChildRefused as err:
            raise _fail(patch, body, err.reason, err.message, generation, param=err.param) from None
        except ApiError as err:
            raise _retrying(
                patch, body, err, "creating the FineTuneJob's children", retry, started, generation
            ) from None
        _recovered(patch, body, generation)


async def start_validation(
    ctx: Context,
    ftj: FineTuneJob,
    body: Any,
    namespace: str | None,
    uid: str,
    patch: kopf.Patch,
    status: dict[str, Any],
    generation: int | None,
) -> None:
    """Create the validation Job that checks the data before any GPU is requested."""
    check = builders.validation_job(ftj, uid, ctx.settings)
    for child in (builders.spec_configmap(ftj, uid), check):
        if not await ensure_child(ctx.kube, child, namespace, uid):
            raise _fail(patch, body, Reason.CHILD_NAME_CONFLICT, client.conflict_message(child), generation)
    patch.status["effective"] = effective(ftj, ctx.settings)
    if generation is not None:
        patch.status["observedGeneration"] = generation
    if status.get("phase") != Phase.VALIDATING.value:
        message = f"Job {check['metadata']['name']} checks the data"
        _patch_phase(patch, body, Phase.VALIDATING, None, Reason.VALIDATING_DATA, message, generation)
        _patch_condition(
            patch, body, ConditionType.DATA_VALIDATED, "Unknown", Reason.VALIDATING_DATA, message, generation
        )
        METRICS.transition(status.get("phase"), Phase.VALIDATING.value)
        kopf.info(body, reason=Reason.VALIDATING_DATA.value, message=message)


async def after_validation(
    ctx: Context, body: kopf.Body, namespace: str | None, uid: str, patch: kopf.Patch, status: dict[str, Any]
) -> None:
    """Phase Validating: start training when the validation Job succeeded, fail when it failed;
    a validation pod that cannot start (no ServiceAccount, image, …) is reported as Pending would be."""
    generation = body.get("metadata", {}).get("generation")
    ftj, _problems = parse_manifest({k: v for k, v in plain(body).items() if k != "status"})
    if ftj is None:
        return  # the spec changed into an invalid one; the create/resume handler reports it
    check_name = names.validation_job_name(ftj.metadata.name)
    check = await client.get_job(ctx.kube, namespace, check_name)
    if check is None:  # removed (its TTL, or by hand) before its verdict was read: check again
        with contextlib.suppress(ChildRefused, ApiError, kopf.PermanentError):
            await start_validation(ctx, ftj, body, namespace, uid, patch, status, generation)
        return
    if not client.owned_by(check, uid):
        return
    conds = reconcile._true_conditions(check)
    if "Complete" in conds or "SuccessCriteriaMet" in conds:
        _patch_condition(
            patch,
            body,
            ConditionType.DATA_VALIDATED,
            "True",
            Reason.DATA_VALID,
            f"Job {check_name} found the data valid",
            generation,
        )
        # The dataset report's summary (duplicates, leakage, PII, estimates) from the validation pod.
        for pod in reconcile.owned_pods(await client.job_pods(ctx.kube, namespace, check_name), check):
            summary = reconcile.parse_termination(pod)
            if summary and (data_report := reconcile.data_report_status(summary.get("dataReport"))):
                patch.status["dataReport"] = data_report
        try:
            await start_training(ctx, ftj, body, namespace, uid, patch, status, generation)
        except ChildRefused as err:
            _fail(patch, body, err.reason, err.message, generation, param=err.param)
        except kopf.PermanentError:
            pass
        return
    pods = reconcile.owned_pods(await client.job_pods(ctx.kube, namespace, check_name), check)
    if "Failed" in conds or "FailureTarget" in conds:
        summaries = [reconcile.parse_termination(p) for p in pods]
        found = [x for x in summaries if x and isinstance(x.get("message"), str) and x["message"].strip()]
        job_cond = conds.get("Failed") or conds.get("FailureTarget") or {}
        text = str(found[-1]["message"]) if found else str(job_cond.get("message") or f"Job {check_name} failed")
        param = found[-1].get("param") if found and isinstance(found[-1].get("param"), str) else None
        message = reconcile._message(f"data validation failed: {text}", ())
        _fail(patch, body, Reason.INVALID_DATA, message, generation, param=param)
        return
    stuck = next((r for r in map(reconcile.pending_reason, pods) if r is not None), None)
    if stuck is None and not pods:
        stuck = reconcile.pod_creation_failure(await client.job_events(ctx.kube, namespace, check))
    if stuck is not None:
        message = reconcile._message(f"Job {check_name} cannot check the data: {stuck[1]}", ())
        if (status.get("reason"), status.get("message")) != (stuck[0].value, message):
            _patch_phase(patch, body, Phase.VALIDATING, None, stuck[0], message, generation)
            kopf.warn(body, reason=stuck[0].value, message=message)


async def suspend(
    ctx: Context, body: kopf.Body, name: str, namespace: str | None, uid: str, new: Any, retry: int = 0
) -> None:
    """spec.suspend onto the trainer Job (Kueue's own unsuspending of a queued Job is left alone)."""
    job_name = names.trainer_job_name(name)
    job = await client.get_job(ctx.kube, namespace, job_name)
    if job is None or not client.owned_by(job, uid):
        return  # not created yet (it gets spec.suspend at creation) or not ours
    queued = bool((body.get("spec") or {}).get("scheduling", {}).get("queueName")) and ctx.settings.kueue
    if new is not True and queued:
        return  # Kueue admits a queued Job by unsuspending it
    want = new is True
    if (job.get("spec") or {}).get("suspend") is not want:
        try:
            await client.patch_job(ctx.kube, namespace, job_name, {"spec": {"suspend": want}})
        except ApiError as err:
            raise kopf.TemporaryError(
                f"patching Job {job_name}: HTTP {err.status}", delay=backoff_seconds(err, retry)
            ) from None


async def recreate_job(
    ctx: Context, body: kopf.Body, namespace: str | None, uid: str, patch: kopf.Patch, logger: Any
) -> None:
    """The trainer Job was deleted by someone (O6): create it again under the same name, at
    most `max_job_recreations` times; the trainer resumes from the newest committed checkpoint."""
    status = dict(body.get("status") or {})
    if status.get("phase") in _TERMINAL:
        return  # finished: a deleted Job is cleanup, not a fault
    generation = body.get("metadata", {}).get("generation")
    ftj, problems = parse_manifest({k: v for k, v in plain(body).items() if k != "status"})
    if ftj is None:
        _fail(patch, body, Reason.INVALID_SPEC, invalid_spec_message(problems), generation)
        return
    # The timer may hold a stale body: a FineTuneJob deleted a moment ago took its Job with
    # it (garbage collection) and must not get a new one (O7).
    current = await client.get_finetunejob(ctx.kube, namespace, ftj.metadata.name)
    if current is None or current.get("metadata", {}).get("uid") != uid or current["metadata"].get("deletionTimestamp"):
        return
    if (current.get("status") or {}).get("phase") in _TERMINAL or (current.get("spec") or {}).get("cancel") is True:
        return  # finished or cancelled since the timer's body was read: the Job went on purpose
    done = int(status.get("recreations") or 0)
    job_name = status.get("jobName")
    if done >= ctx.settings.max_job_recreations:
        message = (
            f"Job {job_name} was deleted {done + 1} times; not recreating it again "
            f"(the operator's limit is {ctx.settings.max_job_recreations}). Committed checkpoints are kept: "
            "apply the FineTuneJob again under a new name to resume from them"
        )
        _fail(patch, body, Reason.TOO_MANY_RECREATIONS, message, generation)
        return
    # The spec the job started with, never an edited one (the edit is reported as SpecImmutable).
    try:
        started_spec = await client.read_started_spec(ctx.kube, namespace, uid, status)
    except ApiError as err:
        logger.warning(f"reading the started spec of Job {job_name}: HTTP {err.status}; retrying on the next tick")
        return
    if started_spec is not None:
        wire = {
            **started_spec,
            **{k: v for k, v in reconcile.current_spec(current).items() if k in MUTABLE_AFTER_START},
        }
        started, _problems = parse_manifest({**{k: v for k, v in plain(body).items() if k != "status"}, "spec": wire})
        ftj = started or ftj
    elif status.get("specConfigMap") not in (None, builders.spec_configmap_name(ftj)):
        message = (
            f"Job {job_name} is gone, and so is ConfigMap {status['specConfigMap']} with the spec it started "
            "from; the spec has changed since, so the job cannot resume as it began. Committed checkpoints "
            "are kept: apply the FineTuneJob under a new name"
        )
        _fail(patch, body, Reason.SPEC_LOST, message, generation)
        return
    children = [builders.spec_configmap(ftj, uid), builders.trainer_job(ftj, uid, ctx.settings)]
    try:
        for child in children:
            if not await ensure_child(ctx.kube, child, namespace, uid):
                _fail(patch, body, Reason.CHILD_NAME_CONFLICT, client.conflict_message(child), generation)
                return
    except ChildRefused as err:
        _fail(patch, body, err.reason, err.message, generation, param=err.param)
        return
    except ApiError as err:
        logger.warning(f"recreating Job {job_name}: HTTP {err.status}; retrying on the next tick")
        return
    patch.status["specConfigMap"] = children[0]["metadata"]["name"]
    patch.status["recreations"] = done + 1
    kopf.warn(
        body,
        reason=Reason.JOB_RECREATED.value,
        message=f"Job {job_name} was deleted; recreated it ({done + 1} of at most "
        f"{ctx.settings.max_job_recreations}), resuming from the newest committed checkpoint",
    )


async def rebuild_job(
    ctx: Context, body: kopf.Body, namespace: str | None, uid: str, patch: kopf.Patch, job: dict[str, Any], logger: Any
) -> None:
    """The spec was edited before training started (a pod stuck Unschedulable, say): the Job
    is replaced by one built from the new spec. Nothing ran, so nothing is lost."""
    generation = body.get("metadata", {}).get("generation")
    ftj, _problems = parse_manifest({k: v for k, v in plain(body).items() if k != "status"})
    if ftj is None:
        return  # the API server validates edits; an invalid one is reported on the operator's restart
    job_name = job["metadata"]["name"]
    try:
        if not await ensure_child(ctx.kube, builders.spec_configmap(ftj, uid), namespace, uid):
            _fail(
                patch,
                body,
                Reason.CHILD_NAME_CONFLICT,
                client.conflict_message(builders.spec_configmap(ftj, uid)),
                generation,
            )
            return
        patch.status["specConfigMap"] = builders.spec_configmap_name(ftj)
        await client.delete_job(ctx.kube, namespace, job_name, uid=job["metadata"]["uid"])
        new_job = builders.trainer_job(ftj, uid, ctx.settings)
        # not ensure_child: a 409 here is the old Job, still being deleted, not ours to adopt
        await client.create_replacement(ctx.kube, new_job, namespace)
    except ChildRefused as err:
        _fail(patch, body, err.reason, err.message, generation, param=err.param)
        return
    except ApiError as err:
        logger.warning(f"rebuilding Job {job_name} for the edited spec: HTTP {err.status}; retrying on the next tick")
        return
    patch.status["effective"] = effective(ftj, ctx.settings)
    message = f"the spec was edited before training started: Job {job_name} is rebuilt from the new spec"
    phase = initial_phase(ftj, ctx.settings)
    if phase == Phase.PENDING:
        _patch_phase(patch, body, phase, ConditionType.PENDING, Reason.SPEC_CHANGED, message, generation)
    kopf.info(body, reason=Reason.SPEC_CHANGED.value, message=message)


async def cached_job(ctx: Context, jobs: Any, namespace: str | None, job_name: str) -> dict[str, Any] | None:
    """The Job from the watch cache; a GET when the cache has not seen it (yet): a Job
    created a moment ago must not look deleted."""
    found = list(jobs.get((namespace, job_name), ())) if jobs is not None else []
    if found:
        return found[-1]
    return await client.get_job(ctx.kube, namespace, job_name)


async def observe_job(
    ctx: Context,
    body: kopf.Body,
    name: str,
    namespace: str | None,
    uid: str,
    patch: kopf.Patch,
    logger: Any,
    kubetune_jobs: Any = None,
    kubetune_pods: Any = None,
) -> None:
    """The timer: the trainer Job's state into the status, then (once Succeeded) spec.serving."""
    current = await observe_training(ctx, body, name, namespace, uid, patch, logger, kubetune_jobs, kubetune_pods)
    if current is None:
        current = dict(body.get("status") or {})
    if current.get("phase") == Phase.SUCCEEDED.value and (body.get("spec") or {}).get("serving"):
        await serve_result(ctx, body, name, namespace, uid, current, logger)


async def observe_training(
    ctx: Context,
    body: kopf.Body,
    name: str,
    namespace: str | None,
    uid: str,
    patch: kopf.Patch,
    logger: Any,
    kubetune_jobs: Any = None,
    kubetune_pods: Any = None,
) -> dict[str, Any] | None:
    """The status as patched (None when this tick wrote nothing of its own)."""
    job_name = (body.get("status") or {}).get("jobName")
    if (body.get("status") or {}).get("phase") == Phase.CANCELLED.value:
        return None  # final: the Job is being deleted
    if not job_name:
        if (body.get("status") or {}).get("phase") == Phase.VALIDATING.value:
            await after_validation(ctx, body, namespace, uid, patch, dict(body.get("status") or {}))
        return None
    with METRICS.reconcile_timer():
        job = await cached_job(ctx, kubetune_jobs, namespace, job_name)
        if job is None:
            await recreate_job(ctx, body, namespace, uid, patch, logger)
            return None
        if not client.owned_by(job, uid):
            return None
        # Only pods the Job controls: the job-name label can be forged by anyone who may
        # create pods in the namespace (a forged pod must not write status.adapter).
        listed = (
            list(kubetune_pods.get((namespace, job_name), ()))
            if kubetune_pods is not None
            else await client.job_pods(ctx.kube, namespace, job_name)
        )
        pods = reconcile.owned_pods(listed, job)
        waiting = not pods and _unfinished(job) and (job.get("spec") or {}).get("suspend") is not True
        events = await client.job_events(ctx.kube, namespace, job) if waiting else []
        if reconcile.must_end_job(job, pods):
            try:
                await client.patch_job(ctx.kube, namespace, job_name, reconcile.end_job_patch())
            except ApiError as err:
                logger.warning(
                    f"could not end Job {job_name} after a permanent failure, retrying: "
                    f"{reconcile._bounded(reconcile.redact(str(err)), 500)}"
                )
        ftj = plain(body)
        old = ftj.get("status") or {}
        started_spec = None
        if reconcile.spec_changed(ftj, job):
            if not old.get("startTime") and not any(map(reconcile.trainer_started, pods)):
                await rebuild_job(ctx, body, namespace, uid, patch, job, logger)  # not started: the edit applies
                return None
            started_spec = await client.read_started_spec(ctx.kube, namespace, uid, old)
        scraped = await scrape(pods, ctx.settings.metrics_port, owner_uid=(job.get("metadata") or {}).get("uid"))
        new = reconcile.observe(
            ftj,
            job,
            pods,
            scraped,
            ctx.settings,
            datetime.now(UTC),
            job_events=events,
            started_spec=started_spec,
        )
        change = reconcile.diff(old, new)
        if change is None:
            return None
        # Patched here rather than through kopf's `patch`: kopf applies a timer's patch after
        # the handler, and one refused patch (a 422) ends that object's timer for good. Here a
        # refusal is logged and counted, and the next tick tries again.
        try:
            await client.patch_status(ctx.kube, namespace, name, change)
        except ApiError as err:
            logger.warning(
                f"status patch refused, retrying in {ctx.settings.metrics_scrape_interval_seconds:g}s: "
                f"{reconcile._bounded(reconcile.redact(str(err)), 500)}"
            )
            return None
        if new.get("phase") != old.get("phase") and new.get("phase"):
            METRICS.transition(old.get("phase"), new["phase"])
        for kind, reason, message in reconcile.transitions(old, new):
            kopf.event(body, type=kind, reason=reason, message=message)
        return new
    return None


async def serve_result(
    ctx: Context, body: kopf.Body, name: str, namespace: str | None, uid: str, status: dict[str, Any], logger: Any
) -> None:
    """Create (or adopt) the serving object(s) of a Succeeded job and keep status.serving and
    the Serving condition true to what the object reports."""
    if not status.get("adapter"):
        return  # nothing to serve yet (the summary that names the adapter may come a tick later)
    due, attempts = ctx.serving_due.get(uid, (0.0, 0))
    if time.monotonic() < due:
        return
    ftj, _problems = parse_manifest({k: v for k, v in plain(body).items() if k != "status"})
    if ftj is None or ftj.spec.serving is None:
        return
    generation = body.get("metadata", {}).get("generation")
    current = dict(status.get("serving") or {})
    try:
        new, state, reason, message = await _serving_state(ctx, ftj, uid, namespace, status, current)
    except (ApiError, serving.EndpointUnreachable) as err:
        delay = (
            backoff_seconds(err, attempts)
            if isinstance(err, ApiError)
            else min(BACKOFF_SECONDS[1], BACKOFF_SECONDS[0] * 2 ** min(attempts, 20))
        )
        ctx.serving_due[uid] = (time.monotonic() + delay, attempts + 1)
        text = reconcile._bounded(reconcile.redact(str(err)), 500)
        logger.warning(f"serving {ftj.metadata.name}: {text}; retrying in {delay:g}s")
        new, state, reason = dict(current), "False", Reason.SERVING_NOT_READY
        message = reconcile._bounded(reconcile.redact(f"retrying in {delay:g}s ({attempts + 1} attempts): {text}"))
        new = new or serving.initial_status(ftj, None)
        new["ready"], new["message"] = False, message
    else:
        ready = new.get("ready") is True
        wait = (
            ctx.settings.serving_recheck_seconds
            if ready or reason in (Reason.SERVING_FAILED, Reason.SERVING_CRD_MISSING)
            else 0.0
        )
        ctx.serving_due[uid] = (time.monotonic() + wait, 0)
    conds = reconcile.set_condition(
        status.get("conditions") or [],
        ConditionType.SERVING,
        state,
        reason,
        reconcile._bounded(reconcile.redact(message)),
        _now(),
        generation,
    )
    change: dict[str, Any] = {}
    if reconcile._merge_patch(current, new) or current.keys() != new.keys():
        change["serving"] = {**{k: None for k in current.keys() - new.keys()}, **new}
    before = next((c for c in status.get("conditions") or [] if c.get("type") == ConditionType.SERVING.value), None)
    after = next(c for c in conds if c["type"] == ConditionType.SERVING.value)
    if before != after:
        change["conditions"] = conds
    if not change:
        return
    try:
        await client.patch_status(ctx.kube, namespace, name, change)
    except ApiError as err:
        ctx.serving_due.pop(uid, None)
        logger.warning(
            f"status patch refused, retrying on the next tick: {reconcile._bounded(reconcile.redact(str(err)), 500)}"
        )
        return
    if before is None or (before.get("reason"), before.get("status")) != (after["reason"], after["status"]):
        if reason in (Reason.SERVING_FAILED, Reason.SERVING_CRD_MISSING):
            kopf.warn(body, reason=reason.value, message=after["message"])
        elif reason in (Reason.SERVING_READY, Reason.ADAPTER_REGISTERED, Reason.SERVING_CREATED):
            kopf.info(body, reason=reason.value, message=after["message"])


async def _serving_state(
    ctx: Context, ftj: FineTuneJob, uid: str, namespace: str | None, status: dict[str, Any], current: dict[str, Any]
) -> tuple[dict[str, Any], str, Reason, str]:
    """(status.serving, condition status, reason, message); raises what is worth retrying."""
    spec = ftj.spec.serving
    assert spec is not None
    try:
        if spec.engine.value == "vllmEndpoint":
            return await _register(ctx, ftj, namespace, status, current)
        kind = current.get("kind")
        if kind and current.get("name") and current.get("engine") == spec.engine.value:
            obj = await client.get_serving_object(ctx.serving_kube, kind, namespace, current["name"])
            if obj is not None:
                return _observed(ctx, ftj, current, obj)
        kserve = await client.discover_kserve(ctx.serving_kube) if spec.engine.value == "kserve" else None
        made = serving.plan(ftj, uid, status, ctx.settings, kserve)
    except serving.ServingError as err:
        reason = Reason.SERVING_CRD_MISSING if str(err) == serving.CRD_MISSING else Reason.SERVING_FAILED
        return {**serving.initial_status(ftj, None), "message": str(err)}, "False", reason, str(err)
    except ApiError as err:
        if retriable(err.status):
            raise
        message = client.serving_refusal(err, "reading the serving object")
        return {**serving.initial_status(ftj, None), "message": message}, "False", Reason.SERVING_FAILED, message
    new = serving.initial_status(ftj, made.kind, made.name)
    for obj in made.objects:
        try:
            mine = await client.create_or_adopt(ctx.serving_kube, obj, namespace, uid)
        except ApiError as err:
            if retriable(err.status):
                raise
            if err.status == 404 and obj["apiVersion"].startswith(serving.GROUP):
                message = serving.CRD_MISSING
                return {**new, "message": message}, "False", Reason.SERVING_CRD_MISSING, message
            message = client.serving_refusal(err, f"creating {obj['kind']} {obj['metadata']['name']}")
            return {**new, "message": message}, "False", Reason.SERVING_FAILED, message
        if not mine:
            message = client.conflict_message(obj) + " (or set spec.serving.retain: false)"
            return {**new, "message": message}, "False", Reason.SERVING_FAILED, message
    message = f"{made.kind} {made.name} serves model {new['model']}; waiting for it to report Ready"
    return {**new, "message": message}, "False", Reason.SERVING_CREATED, message


def _observed(
    ctx: Context, ftj: FineTuneJob, current: dict[str, Any], obj: dict[str, Any]
) -> tuple[dict[str, Any], str, Reason, str]:
    new = {**serving.initial_status(ftj, current.get("kind"), current.get("name"))}
    ready, why = serving.readiness(obj)
    url = serving.url_of(obj) if obj.get("kind") != "Deployment" else serving.service_url(ftj)
    if url:
        new["url"] = url
    new["ready"] = ready
    if ready:
        return (
            new,
            "True",
            Reason.SERVING_READY,
            f"{new['kind']} {new['name']} is Ready: model {new['model']} at {new.get('url')}",
        )
    new["message"] = reconcile._bounded(reconcile.redact(why or "not Ready"))
    return new, "False", Reason.SERVING_NOT_READY, f"{new['kind']} {new['name']} is not Ready: {new['message']}"


async def _register(
    ctx: Context, ftj: FineTuneJob, namespace: str | None, status: dict[str, Any], current: dict[str, Any]
) -> tuple[dict[str, Any], str, Reason, str]:
    """engine vllmEndpoint: POST load_lora_adapter once (vLLM forgets it on restart: re-applied
    at every serving_recheck_seconds, which an already loaded adapter answers cheaply)."""
    block = ftj.spec.serving.vllm_endpoint if ftj.spec.serving is not None else None
    assert block is not None
    new = serving.initial_status(ftj, serving.ENDPOINT_KIND)
    api_key = None
    if block.api_key_secret:
        exists, raw = await client.read_secret_key(ctx.serving_kube, namespace, block.api_key_secret, "api-key")
        if not raw:
            message = (
                f"Secret {block.api_key_secret} (spec.serving.vllmEndpoint.apiKeySecret) "
                f"{'has no key api-key' if exists else 'does not exist in namespace ' + str(namespace)}: "
                "create it with the server's --api-key under the key api-key"
            )
            return {**new, "message": message}, "False", Reason.SERVING_FAILED, message
        api_key = base64.b64decode(raw).decode("utf-8", "replace").strip()
    url, payload = serving.load_request(ftj, status)
    ok, why = await serving.register_adapter(url, payload, api_key)
    if ok:
        new["ready"] = True
        return (
            new,
            "True",
            Reason.ADAPTER_REGISTERED,
            (f"adapter {payload['lora_name']} registered with {block.url} (lora_path {payload['lora_path']})"),
        )
    message = reconcile._bounded(reconcile.redact(why or "refused"))
    return {**new, "message": message}, "False", Reason.SERVING_FAILED, message


async def cancel(
    ctx: Context,
    body: kopf.Body,
    name: str,
    namespace: str | None,
    uid: str,
    new: Any,
    patch: kopf.Patch,
    retry: int = 0,
) -> None:
    """spec.cancel: true ends the job for good and keeps the record: the Job goes (its pods get
    SIGTERM and write a checkpoint), committed checkpoints stay, the phase is Cancelled."""
    status = dict(body.get("status") or {})
    if new is not True or status.get("phase") in _TERMINAL:
        return
    generation = body.get("metadata", {}).get("generation")
    deleted = []
    for job_name in (names.trainer_job_name(name), names.validation_job_name(name)):
        job = await client.get_job(ctx.kube, namespace, job_name)
        if job is None or not client.owned_by(job, uid):
            continue
        try:
            await client.delete_job(ctx.kube, namespace, job_name)
        except ApiError as err:
            if err.status != 404:
                raise kopf.TemporaryError(
                    f"deleting Job {job_name}: HTTP {err.status}", delay=backoff_seconds(err, retry)
                ) from None
        deleted.append(job_name)
    output = ((body.get("spec") or {}).get("output") or {}).get("uri")
    kept = f"; committed checkpoints are kept under {str(output).rstrip('/')}/checkpoints" if output else ""
    gone = f": Job {', '.join(deleted)} deleted, its pods write a checkpoint as they stop" if deleted else ""
    message = reconcile._message(f"cancelled (spec.cancel){gone}{kept}", ())
    _patch_phase(patch, body, Phase.CANCELLED, ConditionType.CANCELLED, Reason.CANCELLED_BY_USER, message, generation)
    patch.status["completionTime"] = _now()
    METRICS.transition(status.get("phase"), Phase.CANCELLED.value)
    kopf.info(body, reason=Reason.CANCELLED_BY_USER.value, message=message)
