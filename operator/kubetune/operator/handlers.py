"""The kopf handlers of FineTuneJobs: parse the body, call a pure function, patch (DESIGN style 1).

`register(registry, settings)` puts every handler on one `kopf.OperatorRegistry`, so tests build
an isolated operator against an emulated API; importing this module also registers them once on
kopf's default registry, for `kopf run -m kubetune.operator.handlers` and `python -m
kubetune.operator`.

Children are created through the official synchronous `kubernetes` client in a worker thread:
kopf's own API client is not public. Where the client connects is decided once, lazily: an
explicit `api_url` (tests), `KUBETUNE_API_URL`, the in-cluster service account, or kubeconfig.

Serving (spec.serving, issue 20): once a job is Succeeded, the observe timer creates or adopts its
serving object (kubetune.operator.serving builds it) and keeps status.serving and the Serving
condition true to the object's own status; those requests carry the User-Agent SERVING_AGENT, and
the chart grants them only with serving.enabled.

Idempotency (RELIABILITY O1, O2): child names are deterministic; a 409 on create reads the
existing object, adopts it when its ownerReferences carry our uid, and otherwise fails the
FineTuneJob with `ChildNameConflict` without touching the foreign object. Deletion relies on
ownerReferences only: no handler here needs a finalizer, so deleting a FineTuneJob while the
operator is down never hangs (O7).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import email.utils
import importlib.metadata
import json
import logging
import math
import os
import threading
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import kopf
from kubetune.api.conditions import ConditionType, Reason
from kubetune.api.crd import MUTABLE_AFTER_START
from kubetune.api.enums import Phase
from kubetune.api.estimate import estimate_job, memory_warning
from kubetune.api.resource import GROUP, PLURAL, VERSION, FineTuneJob, parse_manifest
from kubetune.operator import builders, presence, reconcile, redaction, serving
from kubetune.operator.metrics import METRICS
from kubetune.operator.scrape import scrape
from kubetune.operator.settings import OperatorSettings

API_URL_ENV = "KUBETUNE_API_URL"
VERBS = {"POST": "create", "GET": "get", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}
EXPECTED_STATUSES = (404, 409)  # answers the handlers act on (absent, exists): not errors
DEFAULT_NAMESPACE = "default"  # FineTuneJobs are namespaced: only for the type checker
POD_JOB_LABEL = "job-name"
PROBLEMS_SHOWN = 10
RETRY_AFTER_BOUNDS = (1.0, 60.0)  # seconds: a hostile or broken Retry-After neither spins nor parks a handler
_TERMINAL = (Phase.SUCCEEDED.value, Phase.FAILED.value, Phase.CANCELLED.value)


# ------------------------------------------------------------------------------ API access


def _version() -> str:
    try:
        return importlib.metadata.version("kubetune")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


USER_AGENT = f"kubetune-operator/{_version()}"
SERVING_AGENT = f"{USER_AGENT} serving"
"""The User-Agent of spec.serving's requests: audit logs (and tests/api_usage.py, which derives the
chart's `serving.enabled` RBAC from them) tell them from the trainer-side requests."""


def _resource_of(path: str) -> str:
    """`/apis/batch/v1/namespaces/ns/jobs/x` → `jobs`: the resource label of API error metrics."""
    parts = [p for p in path.split("?")[0].split("/") if p]
    if "namespaces" in parts and len(parts) > parts.index("namespaces") + 2:
        return parts[parts.index("namespaces") + 2]
    return parts[-1] if parts else ""


class ApiError(Exception):
    """A Kubernetes API request answered with an error status."""

    def __init__(self, status: int, body: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status, self.body, self.retry_after = status, body, retry_after


class Kube:
    """A minimal path-based Kubernetes client (create, get, list, merge-patch) returning dicts."""

    def __init__(self, api_url: str | None = None, user_agent: str = USER_AGENT) -> None:
        self._api_url = api_url
        self._user_agent = user_agent
        self._client: Any = None
        self._lock = threading.Lock()

    def _api(self) -> Any:
        with self._lock:
            if self._client is None:
                import kubernetes  # type: ignore[import-untyped]

                url = self._api_url or os.environ.get(API_URL_ENV)
                if url:
                    config = kubernetes.client.Configuration()
                    config.host = url.rstrip("/")
                    config.verify_ssl = False
                else:
                    config = kubernetes.client.Configuration()
                    try:
                        kubernetes.config.load_incluster_config(client_configuration=config)
                    except kubernetes.config.ConfigException:
                        kubernetes.config.load_kube_config(client_configuration=config)
                self._client = kubernetes.client.ApiClient(config)
                self._client.user_agent = self._user_agent
            return self._client

    def _call(
        self, method: str, path: str, body: Any = None, query: list[tuple[str, str]] | None = None
    ) -> dict[str, Any]:
        import urllib3
        from kubernetes.client.exceptions import ApiException  # type: ignore[import-untyped]

        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/merge-patch+json" if method == "PATCH" else "application/json"
        try:
            resp = self._api().call_api(
                path,
                method,
                query_params=query or [],
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _return_http_data_only=True,
                _request_timeout=30,
            )
        except ApiException as err:
            if err.status not in EXPECTED_STATUSES:
                METRICS.api_error(VERBS.get(method, method.lower()), _resource_of(path), int(err.status or 0))
            delay = retry_after_seconds((err.headers or {}).get("Retry-After"))
            raise ApiError(int(err.status or 0), str(err.body or err.reason or ""), delay) from None
        except (urllib3.exceptions.HTTPError, OSError) as err:  # refused, reset, timed out: no answer at all
            METRICS.api_error(VERBS.get(method, method.lower()), _resource_of(path), 0)
            raise ApiError(0, f"no answer from the API server: {type(err).__name__}: {err}") from None
        data = resp.data
        return json.loads(data) if data else {}

    async def request(
        self, method: str, path: str, body: Any = None, query: list[tuple[str, str]] | None = None
    ) -> dict[str, Any]:
        return await asyncio.to_thread(self._call, method, path, body, query)

    async def get(self, path: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", path)
        except ApiError as err:
            if err.status == 404:
                return None
            raise


def retry_after_seconds(value: Any, now: datetime | None = None) -> float | None:
    """A Retry-After value (seconds, or an HTTP date) as a delay within RETRY_AFTER_BOUNDS;
    None when absent or unreadable (garbage, NaN). Negative or past values give the minimum."""
    if value is None:
        return None
    text = str(value).strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if math.isnan(seconds):
        return None
    low, high = RETRY_AFTER_BOUNDS
    return min(max(seconds, low), high)


def _collection(obj: dict[str, Any], namespace: str | None) -> str:
    api_version, kind = obj["apiVersion"], obj["kind"]
    plural = {
        "Job": "jobs",
        "Service": "services",
        "PodGroup": "podgroups",
        "Pod": "pods",
        "ConfigMap": "configmaps",
        "Deployment": "deployments",
        "LLMInferenceService": "llminferenceservices",
        "InferenceService": "inferenceservices",
    }[kind]
    root = "/api/v1" if "/" not in api_version else f"/apis/{api_version}"
    return f"{root}/namespaces/{quote(namespace or DEFAULT_NAMESPACE)}/{plural}"


def _job_path(namespace: str | None, name: str) -> str:
    return f"/apis/batch/v1/namespaces/{quote(namespace or DEFAULT_NAMESPACE)}/jobs/{quote(name)}"


def _ftj_path(namespace: str | None, name: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{quote(namespace or DEFAULT_NAMESPACE)}/{PLURAL}/{quote(name)}"


def _owned_by(obj: dict[str, Any] | None, uid: str) -> bool:
    refs = ((obj or {}).get("metadata") or {}).get("ownerReferences") or []
    return any(isinstance(r, dict) and r.get("uid") == uid for r in refs)


def retriable(status: int) -> bool:
    """An answer worth retrying: none at all (0), a timeout, throttling or a server error. Every
    other 4xx is the API server refusing what was sent: retrying sends the same thing again."""
    return status in (0, 408, 429) or status >= 500


BACKOFF_SECONDS = (1.0, 300.0)
"""Bounds of the exponential backoff between retries of a request the server could not serve."""


def backoff_seconds(err: ApiError, retry: int) -> float:
    """Retry-After when the server said (bounded), else 1, 2, 4 … seconds up to 5 minutes."""
    said = retry_after_seconds(err.retry_after)
    if said is not None:
        return said
    low, high = BACKOFF_SECONDS
    return min(high, low * 2 ** min(max(retry, 0), 20))


def server_message(err: ApiError) -> str:
    """The message of a Kubernetes `Status` answer (it names the field), else the raw body."""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        body = json.loads(err.body)
        if isinstance(body, dict) and isinstance(body.get("message"), str) and body["message"].strip():
            return body["message"]
    return err.body.strip() or f"HTTP {err.status}"


# Where a field of a child object comes from in the FineTuneJob, for the refusal message.
CHILD_FIELD_SOURCES = (
    ("priorityClassName", "spec.scheduling.priorityClassName"),
    ("nodeSelector", "spec.scheduling.nodeSelector"),
    ("tolerations", "spec.scheduling.tolerations"),
    ("affinity", "spec.scheduling.affinity"),
    ("schedulerName", "spec.scheduling.schedulerName"),
    ("resources", "spec.resources"),
    ("image", "spec.image"),
    ("imagePullSecrets", "spec.podOverrides.imagePullSecrets"),
    ("runtimeClassName", "spec.podOverrides.runtimeClassName"),
    ("serviceAccountName", "spec.podOverrides.serviceAccountName"),
    ("volumes", "spec.podOverrides.volumes"),
    ("env", "spec.podOverrides.env"),
)


def refusal(err: ApiError, child: dict[str, Any]) -> tuple[Reason, str, str | None] | None:
    """(reason, message, param) when the API server refused `child` for good; None when the
    answer is worth retrying. The message quotes the server (redacted), which names the field."""
    if retriable(err.status) or err.status == 409:
        return None
    kind, name = child["kind"], child["metadata"]["name"]
    text = server_message(err)
    if err.status == 404 and kind == "PodGroup":
        return (
            Reason.CRD_MISSING,
            f"the PodGroup CRD (podgroups.scheduling.volcano.sh) is not installed, so the "
            f"gang-scheduled PodGroup {name} cannot be created: install Volcano, or remove "
            "spec.scheduling.schedulerName: volcano",
            "spec.scheduling.schedulerName",
        )
    param = next((source for field, source in CHILD_FIELD_SOURCES if field in text), None)
    where = f" (set by {param})" if param else ""
    message = (
        f"the API server refused {kind} {name} (HTTP {err.status}): {text}{where}. "
        "Fix the FineTuneJob and apply it again"
    )
    return Reason.CHILD_REJECTED, reconcile._bounded(reconcile.redact(message)), param


SERVING_RBAC_HINT = (
    "the operator may not manage serving objects: install the chart with serving.enabled=true "
    "(it grants the operator the serving permissions), or drop spec.serving"
)


def _serving_path(kind: str, namespace: str | None, name: str) -> str:
    obj = {
        "Deployment": {"apiVersion": "apps/v1"},
        serving.LLMISVC[2]: {"apiVersion": f"{serving.GROUP}/{serving.LLMISVC[0]}"},
        serving.ISVC[2]: {"apiVersion": f"{serving.GROUP}/{serving.ISVC[0]}"},
    }[kind]
    return f"{_collection({**obj, 'kind': kind}, namespace)}/{quote(name)}"


def _serving_refusal(err: ApiError, what: str) -> str:
    """ServingFailed's message: 403 names the chart value that grants the permissions."""
    text = server_message(err)
    if err.status == 403:
        return reconcile._bounded(reconcile.redact(f"{what}: HTTP 403 ({text}); {SERVING_RBAC_HINT}"))
    return reconcile._bounded(
        reconcile.redact(
            f"{what}: the API server refused it (HTTP {err.status}): {text}. "
            "Fix spec.serving and apply the FineTuneJob again"
        )
    )


# --------------------------------------------------------------------------- pure helpers


def _plain(body: Any) -> dict[str, Any]:
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


def conflict_message(child: dict[str, Any]) -> str:
    kind, name = child["kind"], child["metadata"]["name"]
    return (
        f"a {kind} named {name} already exists and is not owned by this FineTuneJob; "
        f"rename the FineTuneJob or delete that {kind}"
    )


def slim_job(job: dict[str, Any]) -> dict[str, Any]:
    """What the operator reads of a Job, for its watch cache: without managedFields and the pod
    template's spec (the bulk of it), so a cache of thousands of Jobs stays small."""
    job.get("metadata", {}).pop("managedFields", None)
    template = (job.get("spec") or {}).get("template")
    if isinstance(template, dict):
        template.pop("spec", None)
    return job


def slim_pod(pod: dict[str, Any]) -> dict[str, Any]:
    """What the operator reads of a pod: identity, owners, status, and each container's resources."""
    meta = pod.get("metadata") or {}
    meta.pop("managedFields", None)
    meta.pop("annotations", None)
    spec = pod.get("spec") or {}
    pod["spec"] = {
        "nodeName": spec.get("nodeName"),
        "containers": [
            {"name": c.get("name"), "resources": c.get("resources") or {}}
            for c in spec.get("containers") or []
            if isinstance(c, dict)
        ],
    }
    return pod


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


# ------------------------------------------------------------------------------ handlers


def _current_status(body: Any, patch: kopf.Patch) -> dict[str, Any]:
    """The status as it will be once `patch` is applied (its top-level keys win)."""
    status = dict(_plain(body).get("status") or {})
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


class ChildRefused(Exception):
    """The API server refused a child for good (see `refusal`)."""

    def __init__(self, reason: Reason, message: str, param: str | None) -> None:
        super().__init__(message)
        self.reason, self.message, self.param = reason, message, param


async def ensure_child(kube: Kube, obj: dict[str, Any], namespace: str | None, uid: str) -> bool:
    """Create `obj`; True when it exists and is ours (created now or earlier), False when a
    foreign object holds the name. Raises `ChildRefused` when the server refuses it for good,
    `ApiError` when the answer is worth retrying."""
    try:
        await kube.request("POST", _collection(obj, namespace), obj)
        return True
    except ApiError as err:
        refused = refusal(err, obj)
        if refused is not None:
            raise ChildRefused(*refused) from None
        if err.status != 409:
            raise
    existing = await kube.get(f"{_collection(obj, namespace)}/{quote(obj['metadata']['name'])}")
    if existing is None:  # deleted in between: try again soon
        raise kopf.TemporaryError(f"{obj['kind']} {obj['metadata']['name']} vanished after 409", delay=1)
    return _owned_by(existing, uid)


def register(
    registry: kopf.OperatorRegistry,
    settings: OperatorSettings,
    *,
    api_url: str | None = None,
    metrics_port: int | None = None,
    presence_namespace: str | None = None,
) -> Kube:
    """Register the FineTuneJob handlers on `registry`; returns the API client they use. With
    `metrics_port`, the operator's own /metrics is served there while the operator runs; with
    `presence_namespace`, a standalone operator holds the `kubetune-operator` Lease there and
    warns when another operator holds it (`presence`)."""
    kube = Kube(api_url)
    serving_kube = Kube(api_url, SERVING_AGENT)
    if presence_namespace is not None:
        presence.register(registry, kube, presence_namespace)

    async def start_training(
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
            children.append(builders.podgroup(ftj, uid, settings))
        if ftj.spec.resources.nodes > 1:
            children.append(builders.headless_service(ftj, uid, settings))
        job = builders.trainer_job(ftj, uid, settings)
        children.append(job)
        for child in children:
            if not await ensure_child(kube, child, namespace, uid):
                raise _fail(patch, body, Reason.CHILD_NAME_CONFLICT, conflict_message(child), generation)
        job_name = job["metadata"]["name"]
        patch.status["jobName"] = job_name
        patch.status["specConfigMap"] = children[0]["metadata"]["name"]
        patch.status["effective"] = effective(ftj, settings)
        warning = memory_warning(ftj.spec)
        if warning is not None:
            _patch_condition(
                patch, body, ConditionType.INSUFFICIENT_GPU_MEMORY, "True", warning[0], warning[1], generation
            )
            kopf.warn(body, reason=warning[0].value, message=warning[1])
        if generation is not None:
            patch.status["observedGeneration"] = generation
        if status.get("phase") in (None, Phase.VALIDATING.value):
            phase = initial_phase(ftj, settings)
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
        body: kopf.Body,
        name: str,
        namespace: str | None,
        uid: str,
        patch: kopf.Patch,
        retry: int = 0,
        started: datetime | None = None,
        **_: Any,
    ) -> None:
        status = dict(body.get("status") or {})
        if status.get("phase") in _TERMINAL:
            return
        generation = body.get("metadata", {}).get("generation")
        manifest = {k: v for k, v in _plain(body).items() if k != "status"}
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
                    await start_validation(ftj, body, namespace, uid, patch, status, generation)
                else:
                    await start_training(ftj, body, namespace, uid, patch, status, generation)
            except ChildRefused as err:
                raise _fail(patch, body, err.reason, err.message, generation, param=err.param) from None
            except ApiError as err:
                raise _retrying(
                    patch, body, err, "creating the FineTuneJob's children", retry, started, generation
                ) from None
            _recovered(patch, body, generation)

    async def start_validation(
        ftj: FineTuneJob,
        body: Any,
        namespace: str | None,
        uid: str,
        patch: kopf.Patch,
        status: dict[str, Any],
        generation: int | None,
    ) -> None:
        """Create the validation Job that checks the data before any GPU is requested."""
        check = builders.validation_job(ftj, uid, settings)
        for child in (builders.spec_configmap(ftj, uid), check):
            if not await ensure_child(kube, child, namespace, uid):
                raise _fail(patch, body, Reason.CHILD_NAME_CONFLICT, conflict_message(child), generation)
        patch.status["effective"] = effective(ftj, settings)
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
        body: kopf.Body, namespace: str | None, uid: str, patch: kopf.Patch, status: dict[str, Any]
    ) -> None:
        """Phase Validating: start training when the validation Job succeeded, fail when it failed;
        a validation pod that cannot start (no ServiceAccount, image, …) is reported as Pending would be."""
        generation = body.get("metadata", {}).get("generation")
        ftj, _problems = parse_manifest({k: v for k, v in _plain(body).items() if k != "status"})
        if ftj is None:
            return  # the spec changed into an invalid one; the create/resume handler reports it
        check_name = builders.child_name(ftj.metadata.name, "validate")
        check = await kube.get(_job_path(namespace, check_name))
        if check is None:  # removed (its TTL, or by hand) before its verdict was read: check again
            with contextlib.suppress(ChildRefused, ApiError, kopf.PermanentError):
                await start_validation(ftj, body, namespace, uid, patch, status, generation)
            return
        if not _owned_by(check, uid):
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
            for pod in reconcile.owned_pods(await _job_pods(namespace, check_name), check):
                found = reconcile.parse_termination(pod)
                if found and (data_report := reconcile.data_report_status(found.get("dataReport"))):
                    patch.status["dataReport"] = data_report
            try:
                await start_training(ftj, body, namespace, uid, patch, status, generation)
            except ChildRefused as err:
                _fail(patch, body, err.reason, err.message, generation, param=err.param)
            except kopf.PermanentError:
                pass
            return
        pods = reconcile.owned_pods(await _job_pods(namespace, check_name), check)
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
            stuck = reconcile.pod_creation_failure(await _job_events(namespace, check))
        if stuck is not None:
            message = reconcile._message(f"Job {check_name} cannot check the data: {stuck[1]}", ())
            if (status.get("reason"), status.get("message")) != (stuck[0].value, message):
                _patch_phase(patch, body, Phase.VALIDATING, None, stuck[0], message, generation)
                kopf.warn(body, reason=stuck[0].value, message=message)

    async def _job_pods(namespace: str | None, job_name: str) -> list[dict[str, Any]]:
        listing = await kube.request(
            "GET",
            f"/api/v1/namespaces/{quote(namespace or DEFAULT_NAMESPACE)}/pods",
            query=[("labelSelector", f"{POD_JOB_LABEL}={job_name}")],
        )
        return [p for p in listing.get("items") or [] if isinstance(p, dict)]

    async def _job_events(namespace: str | None, job: dict[str, Any]) -> list[dict[str, Any]]:
        """The Job controller's FailedCreate events of `job` (why it has no pod)."""
        uid = (job.get("metadata") or {}).get("uid")
        if not uid:
            return []
        listing = await kube.request(
            "GET",
            f"/api/v1/namespaces/{quote(namespace or DEFAULT_NAMESPACE)}/events",
            query=[("fieldSelector", f"involvedObject.uid={uid},reason=FailedCreate")],
        )
        return [
            e
            for e in listing.get("items") or []
            if isinstance(e, dict)
            and e.get("reason") == "FailedCreate"
            and (e.get("involvedObject") or {}).get("uid") == uid
        ]

    kopf.on.create(GROUP, VERSION, PLURAL, registry=registry, id="children")(create_children)
    kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry, id="children")(create_children)

    @kopf.on.field(GROUP, VERSION, PLURAL, registry=registry, field="spec.suspend", id="suspend")
    async def suspend(
        body: kopf.Body, name: str, namespace: str | None, uid: str, new: Any, retry: int = 0, **_: Any
    ) -> None:
        job_name = builders.child_name(name, "train")
        job = await kube.get(_job_path(namespace, job_name))
        if job is None or not _owned_by(job, uid):
            return  # not created yet (it gets spec.suspend at creation) or not ours
        queued = bool((body.get("spec") or {}).get("scheduling", {}).get("queueName")) and settings.kueue
        if new is not True and queued:
            return  # Kueue admits a queued Job by unsuspending it
        want = new is True
        if (job.get("spec") or {}).get("suspend") is not want:
            try:
                await kube.request("PATCH", _job_path(namespace, job_name), {"spec": {"suspend": want}})
            except ApiError as err:
                raise kopf.TemporaryError(
                    f"patching Job {job_name}: HTTP {err.status}", delay=backoff_seconds(err, retry)
                ) from None

    async def read_started_spec(namespace: str | None, uid: str, status: dict[str, Any]) -> dict[str, Any] | None:
        """The wire spec in the job's spec ConfigMap (`status.specConfigMap`); None when it is
        not recorded, gone, not ours or unreadable."""
        name = status.get("specConfigMap")
        if not isinstance(name, str) or not name:
            return None
        cm = await kube.get(f"/api/v1/namespaces/{quote(namespace or DEFAULT_NAMESPACE)}/configmaps/{quote(name)}")
        if cm is None or not _owned_by(cm, uid):
            return None
        with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
            spec = json.loads((cm.get("data") or {})[builders.SPEC_KEY])["spec"]
            return spec if isinstance(spec, dict) else None
        return None

    async def recreate_job(body: kopf.Body, namespace: str | None, uid: str, patch: kopf.Patch, logger: Any) -> None:
        """The trainer Job was deleted by someone (O6): create it again under the same name, at
        most `max_job_recreations` times; the trainer resumes from the newest committed checkpoint."""
        status = dict(body.get("status") or {})
        if status.get("phase") in _TERMINAL:
            return  # finished: a deleted Job is cleanup, not a fault
        generation = body.get("metadata", {}).get("generation")
        ftj, problems = parse_manifest({k: v for k, v in _plain(body).items() if k != "status"})
        if ftj is None:
            _fail(patch, body, Reason.INVALID_SPEC, invalid_spec_message(problems), generation)
            return
        # The timer may hold a stale body: a FineTuneJob deleted a moment ago took its Job with
        # it (garbage collection) and must not get a new one (O7).
        current = await kube.get(f"{_ftj_path(namespace, ftj.metadata.name)}")
        if (
            current is None
            or current.get("metadata", {}).get("uid") != uid
            or current["metadata"].get("deletionTimestamp")
        ):
            return
        if (current.get("status") or {}).get("phase") in _TERMINAL or (current.get("spec") or {}).get("cancel") is True:
            return  # finished or cancelled since the timer's body was read: the Job went on purpose
        done = int(status.get("recreations") or 0)
        job_name = status.get("jobName")
        if done >= settings.max_job_recreations:
            message = (
                f"Job {job_name} was deleted {done + 1} times; not recreating it again "
                f"(the operator's limit is {settings.max_job_recreations}). Committed checkpoints are kept: "
                "apply the FineTuneJob again under a new name to resume from them"
            )
            _fail(patch, body, Reason.TOO_MANY_RECREATIONS, message, generation)
            return
        # The spec the job started with, never an edited one (the edit is reported as SpecImmutable).
        try:
            started_spec = await read_started_spec(namespace, uid, status)
        except ApiError as err:
            logger.warning(f"reading the started spec of Job {job_name}: HTTP {err.status}; retrying on the next tick")
            return
        if started_spec is not None:
            wire = {
                **started_spec,
                **{k: v for k, v in reconcile.current_spec(current).items() if k in MUTABLE_AFTER_START},
            }
            started, _problems = parse_manifest(
                {**{k: v for k, v in _plain(body).items() if k != "status"}, "spec": wire}
            )
            ftj = started or ftj
        elif status.get("specConfigMap") not in (None, builders.spec_configmap_name(ftj)):
            message = (
                f"Job {job_name} is gone, and so is ConfigMap {status['specConfigMap']} with the spec it started "
                "from; the spec has changed since, so the job cannot resume as it began. Committed checkpoints "
                "are kept: apply the FineTuneJob under a new name"
            )
            _fail(patch, body, Reason.SPEC_LOST, message, generation)
            return
        children = [builders.spec_configmap(ftj, uid), builders.trainer_job(ftj, uid, settings)]
        try:
            for child in children:
                if not await ensure_child(kube, child, namespace, uid):
                    _fail(patch, body, Reason.CHILD_NAME_CONFLICT, conflict_message(child), generation)
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
            f"{settings.max_job_recreations}), resuming from the newest committed checkpoint",
        )

    async def rebuild_job(
        body: kopf.Body, namespace: str | None, uid: str, patch: kopf.Patch, job: dict[str, Any], logger: Any
    ) -> None:
        """The spec was edited before training started (a pod stuck Unschedulable, say): the Job
        is replaced by one built from the new spec. Nothing ran, so nothing is lost."""
        generation = body.get("metadata", {}).get("generation")
        ftj, _problems = parse_manifest({k: v for k, v in _plain(body).items() if k != "status"})
        if ftj is None:
            return  # the API server validates edits; an invalid one is reported on the operator's restart
        job_name = job["metadata"]["name"]
        try:
            if not await ensure_child(kube, builders.spec_configmap(ftj, uid), namespace, uid):
                _fail(
                    patch,
                    body,
                    Reason.CHILD_NAME_CONFLICT,
                    conflict_message(builders.spec_configmap(ftj, uid)),
                    generation,
                )
                return
            patch.status["specConfigMap"] = builders.spec_configmap_name(ftj)
            await kube.request(
                "DELETE",
                _job_path(namespace, job_name),
                {"propagationPolicy": "Background", "preconditions": {"uid": job["metadata"]["uid"]}},
            )
            new_job = builders.trainer_job(ftj, uid, settings)
            try:  # not ensure_child: a 409 here is the old Job, still being deleted, not ours to adopt
                await kube.request("POST", _collection(new_job, namespace), new_job)
            except ApiError as err:
                refused = refusal(err, new_job)
                if refused is not None:
                    raise ChildRefused(*refused) from None
                raise
        except ChildRefused as err:
            _fail(patch, body, err.reason, err.message, generation, param=err.param)
            return
        except ApiError as err:
            logger.warning(
                f"rebuilding Job {job_name} for the edited spec: HTTP {err.status}; retrying on the next tick"
            )
            return
        patch.status["effective"] = effective(ftj, settings)
        message = f"the spec was edited before training started: Job {job_name} is rebuilt from the new spec"
        phase = initial_phase(ftj, settings)
        if phase == Phase.PENDING:
            _patch_phase(patch, body, phase, ConditionType.PENDING, Reason.SPEC_CHANGED, message, generation)
        kopf.info(body, reason=Reason.SPEC_CHANGED.value, message=message)

    # Watch-fed caches of the operator's Jobs and their pods (kopf indexes): an idle running job
    # then costs no API request per tick, only the scrape of its pod (issue 14: 300 idle jobs
    # cost 20 requests/s when every tick read its Job and listed its pods).
    @kopf.index(
        "batch",
        "v1",
        "jobs",
        registry=registry,
        labels={builders.MANAGED_BY_LABEL: builders.MANAGED_BY},
        id="kubetune_jobs",
    )
    def index_jobs(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
        return {(namespace, name): slim_job(_plain(body))}

    @kopf.index(
        "", "v1", "pods", registry=registry, labels={builders.MANAGED_BY_LABEL: builders.MANAGED_BY}, id="kubetune_pods"
    )
    def index_pods(namespace: str | None, labels: Any, body: kopf.Body, **_: Any) -> dict[Any, Any] | None:
        job = labels.get(POD_JOB_LABEL) or labels.get(builders.JOB_NAME_LABEL)
        return {(namespace, job): slim_pod(_plain(body))} if job else None

    async def cached_job(jobs: Any, namespace: str | None, job_name: str) -> dict[str, Any] | None:
        """The Job from the watch cache; a GET when the cache has not seen it (yet): a Job
        created a moment ago must not look deleted."""
        found = list(jobs.get((namespace, job_name), ())) if jobs is not None else []
        if found:
            return found[-1]
        return await kube.get(_job_path(namespace, job_name))

    async def observe_job(
        body: kopf.Body,
        name: str,
        namespace: str | None,
        uid: str,
        patch: kopf.Patch,
        logger: Any,
        kubetune_jobs: Any = None,
        kubetune_pods: Any = None,
        **_: Any,
    ) -> None:
        """The timer: the trainer Job's state into the status, then (once Succeeded) spec.serving."""
        current = await observe_training(body, name, namespace, uid, patch, logger, kubetune_jobs, kubetune_pods)
        if current is None:
            current = dict(body.get("status") or {})
        if current.get("phase") == Phase.SUCCEEDED.value and (body.get("spec") or {}).get("serving"):
            await serve_result(body, name, namespace, uid, current, logger)

    async def observe_training(
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
            return  # final: the Job is being deleted
        if not job_name:
            if (body.get("status") or {}).get("phase") == Phase.VALIDATING.value:
                await after_validation(body, namespace, uid, patch, dict(body.get("status") or {}))
            return
        with METRICS.reconcile_timer():
            job = await cached_job(kubetune_jobs, namespace, job_name)
            if job is None:
                await recreate_job(body, namespace, uid, patch, logger)
                return
            if not _owned_by(job, uid):
                return
            # Only pods the Job controls: the job-name label can be forged by anyone who may
            # create pods in the namespace (a forged pod must not write status.adapter).
            listed = (
                list(kubetune_pods.get((namespace, job_name), ()))
                if kubetune_pods is not None
                else await _job_pods(namespace, job_name)
            )
            pods = reconcile.owned_pods(listed, job)
            waiting = not pods and _unfinished(job) and (job.get("spec") or {}).get("suspend") is not True
            events = await _job_events(namespace, job) if waiting else []
            if reconcile.must_end_job(job, pods):
                try:
                    await kube.request("PATCH", _job_path(namespace, job_name), reconcile.end_job_patch())
                except ApiError as err:
                    logger.warning(
                        f"could not end Job {job_name} after a permanent failure, retrying: "
                        f"{reconcile._bounded(reconcile.redact(str(err)), 500)}"
                    )
            ftj = _plain(body)
            old = ftj.get("status") or {}
            started_spec = None
            if reconcile.spec_changed(ftj, job):
                if not old.get("startTime") and not any(map(reconcile.trainer_started, pods)):
                    await rebuild_job(body, namespace, uid, patch, job, logger)  # not started: the edit applies
                    return
                started_spec = await read_started_spec(namespace, uid, old)
            scraped = await scrape(pods, settings.metrics_port, owner_uid=(job.get("metadata") or {}).get("uid"))
            new = reconcile.observe(
                ftj,
                job,
                pods,
                scraped,
                settings,
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
                await kube.request("PATCH", f"{_ftj_path(namespace, name)}/status", {"status": change})
            except ApiError as err:
                logger.warning(
                    f"status patch refused, retrying in {settings.metrics_scrape_interval_seconds:g}s: "
                    f"{reconcile._bounded(reconcile.redact(str(err)), 500)}"
                )
                return None
            if new.get("phase") != old.get("phase") and new.get("phase"):
                METRICS.transition(old.get("phase"), new["phase"])
            for kind, reason, message in reconcile.transitions(old, new):
                kopf.event(body, type=kind, reason=reason, message=message)
            return new
        return None

    # ------------------------------------------------------------------ serving (spec.serving)
    # Read on the observe timer rather than watched: a Succeeded job costs one GET of its serving
    # object per tick until it is Ready, then one per serving_recheck_seconds. A watch on the
    # KServe kinds would need list/watch on them cluster-wide and fails while the CRDs are absent.
    serving_due: dict[str, tuple[float, int]] = {}  # uid → (monotonic time of the next check, failed attempts)

    async def serve_result(
        body: kopf.Body, name: str, namespace: str | None, uid: str, status: dict[str, Any], logger: Any
    ) -> None:
        """Create (or adopt) the serving object(s) of a Succeeded job and keep status.serving and
        the Serving condition true to what the object reports."""
        if not status.get("adapter"):
            return  # nothing to serve yet (the summary that names the adapter may come a tick later)
        due, attempts = serving_due.get(uid, (0.0, 0))
        if time.monotonic() < due:
            return
        ftj, _problems = parse_manifest({k: v for k, v in _plain(body).items() if k != "status"})
        if ftj is None or ftj.spec.serving is None:
            return
        generation = body.get("metadata", {}).get("generation")
        current = dict(status.get("serving") or {})
        try:
            new, state, reason, message = await _serving_state(ftj, uid, namespace, status, current)
        except (ApiError, serving.EndpointUnreachable) as err:
            delay = (
                backoff_seconds(err, attempts)
                if isinstance(err, ApiError)
                else min(BACKOFF_SECONDS[1], BACKOFF_SECONDS[0] * 2 ** min(attempts, 20))
            )
            serving_due[uid] = (time.monotonic() + delay, attempts + 1)
            text = reconcile._bounded(reconcile.redact(str(err)), 500)
            logger.warning(f"serving {ftj.metadata.name}: {text}; retrying in {delay:g}s")
            new, state, reason = dict(current), "False", Reason.SERVING_NOT_READY
            message = reconcile._bounded(reconcile.redact(f"retrying in {delay:g}s ({attempts + 1} attempts): {text}"))
            new = new or serving.initial_status(ftj, None)
            new["ready"], new["message"] = False, message
        else:
            ready = new.get("ready") is True
            wait = (
                settings.serving_recheck_seconds
                if ready or reason in (Reason.SERVING_FAILED, Reason.SERVING_CRD_MISSING)
                else 0.0
            )
            serving_due[uid] = (time.monotonic() + wait, 0)
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
            await kube.request("PATCH", f"{_ftj_path(namespace, name)}/status", {"status": change})
        except ApiError as err:
            serving_due.pop(uid, None)
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
        ftj: FineTuneJob, uid: str, namespace: str | None, status: dict[str, Any], current: dict[str, Any]
    ) -> tuple[dict[str, Any], str, Reason, str]:
        """(status.serving, condition status, reason, message); raises what is worth retrying."""
        spec = ftj.spec.serving
        assert spec is not None
        try:
            if spec.engine.value == "vllmEndpoint":
                return await _register(ftj, namespace, status, current)
            kind = current.get("kind")
            if kind and current.get("name") and current.get("engine") == spec.engine.value:
                obj = await serving_kube.get(_serving_path(kind, namespace, current["name"]))
                if obj is not None:
                    return _observed(ftj, current, obj)
            kserve = await _discover_kserve() if spec.engine.value == "kserve" else None
            made = serving.plan(ftj, uid, status, settings, kserve)
        except serving.ServingError as err:
            reason = Reason.SERVING_CRD_MISSING if str(err) == serving.CRD_MISSING else Reason.SERVING_FAILED
            return {**serving.initial_status(ftj, None), "message": str(err)}, "False", reason, str(err)
        except ApiError as err:
            if retriable(err.status):
                raise
            message = _serving_refusal(err, "reading the serving object")
            return {**serving.initial_status(ftj, None), "message": message}, "False", Reason.SERVING_FAILED, message
        new = serving.initial_status(ftj, made.kind, made.name)
        for obj in made.objects:
            try:
                mine = await _create_or_adopt(obj, namespace, uid)
            except ApiError as err:
                if retriable(err.status):
                    raise
                if err.status == 404 and obj["apiVersion"].startswith(serving.GROUP):
                    message = serving.CRD_MISSING
                    return {**new, "message": message}, "False", Reason.SERVING_CRD_MISSING, message
                message = _serving_refusal(err, f"creating {obj['kind']} {obj['metadata']['name']}")
                return {**new, "message": message}, "False", Reason.SERVING_FAILED, message
            if not mine:
                message = conflict_message(obj) + " (or set spec.serving.retain: false)"
                return {**new, "message": message}, "False", Reason.SERVING_FAILED, message
        message = f"{made.kind} {made.name} serves model {new['model']}; waiting for it to report Ready"
        return {**new, "message": message}, "False", Reason.SERVING_CREATED, message

    def _observed(
        ftj: FineTuneJob, current: dict[str, Any], obj: dict[str, Any]
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
        ftj: FineTuneJob, namespace: str | None, status: dict[str, Any], current: dict[str, Any]
    ) -> tuple[dict[str, Any], str, Reason, str]:
        """engine vllmEndpoint: POST load_lora_adapter once (vLLM forgets it on restart: re-applied
        at every serving_recheck_seconds, which an already loaded adapter answers cheaply)."""
        block = ftj.spec.serving.vllm_endpoint if ftj.spec.serving is not None else None
        assert block is not None
        new = serving.initial_status(ftj, serving.ENDPOINT_KIND)
        api_key = None
        if block.api_key_secret:
            secret = await serving_kube.get(
                f"/api/v1/namespaces/{quote(namespace or DEFAULT_NAMESPACE)}/secrets/{quote(block.api_key_secret)}"
            )
            raw = ((secret or {}).get("data") or {}).get("api-key")
            if not raw:
                message = (
                    f"Secret {block.api_key_secret} (spec.serving.vllmEndpoint.apiKeySecret) "
                    f"{'has no key api-key' if secret else 'does not exist in namespace ' + str(namespace)}: "
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

    async def _discover_kserve() -> tuple[str, str, str] | None:
        found: dict[str, Any] = {}
        for version, _plural, _kind in serving.KSERVE_KINDS:
            found[version] = await serving_kube.get(f"/apis/{serving.GROUP}/{version}")
            if serving.kserve_kind(found) is not None:
                break
        return serving.kserve_kind(found)

    async def _create_or_adopt(obj: dict[str, Any], namespace: str | None, uid: str) -> bool:
        """POST; on 409 the existing object is ours (owner uid, or our labels when retained) and is
        patched to what was built, else False (a foreign object holds the name)."""
        path = _collection(obj, namespace)
        try:
            await serving_kube.request("POST", path, obj)
            return True
        except ApiError as err:
            if err.status != 409:
                raise
        existing = await serving_kube.get(f"{path}/{quote(obj['metadata']['name'])}")
        if existing is None:
            raise ApiError(0, f"{obj['kind']} {obj['metadata']['name']} vanished after 409")  # retried
        labels = (existing.get("metadata") or {}).get("labels") or {}
        ours = obj["metadata"]["labels"]
        retained = "ownerReferences" not in obj["metadata"] and all(
            labels.get(k) == ours[k] for k in ("kubetune.io/finetunejob", builders.MANAGED_BY_LABEL)
        )
        if not (_owned_by(existing, uid) or retained):
            return False
        await serving_kube.request(
            "PATCH",
            f"{path}/{quote(obj['metadata']['name'])}",
            {
                "metadata": {k: v for k, v in obj["metadata"].items() if k in ("labels", "ownerReferences")},
                "spec": obj["spec"],
            },
        )
        return True

    @kopf.on.field(GROUP, VERSION, PLURAL, registry=registry, field="spec.cancel", id="cancel")
    async def cancel(
        body: kopf.Body,
        name: str,
        namespace: str | None,
        uid: str,
        new: Any,
        patch: kopf.Patch,
        retry: int = 0,
        **_: Any,
    ) -> None:
        """spec.cancel: true ends the job for good and keeps the record: the Job goes (its pods get
        SIGTERM and write a checkpoint), committed checkpoints stay, the phase is Cancelled."""
        status = dict(body.get("status") or {})
        if new is not True or status.get("phase") in _TERMINAL:
            return
        generation = body.get("metadata", {}).get("generation")
        deleted = []
        for suffix in ("train", "validate"):
            job_name = builders.child_name(name, suffix)
            job = await kube.get(_job_path(namespace, job_name))
            if job is None or not _owned_by(job, uid):
                continue
            try:
                await kube.request("DELETE", _job_path(namespace, job_name), {"propagationPolicy": "Background"})
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
        _patch_phase(
            patch, body, Phase.CANCELLED, ConditionType.CANCELLED, Reason.CANCELLED_BY_USER, message, generation
        )
        patch.status["completionTime"] = _now()
        METRICS.transition(status.get("phase"), Phase.CANCELLED.value)
        kopf.info(body, reason=Reason.CANCELLED_BY_USER.value, message=message)

    worker_limit = settings.worker_limit or None  # kopf: None is unlimited

    @kopf.on.startup(registry=registry, id="configure")
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        """kopf settings of every instance (the tests' too, so they see what production does)."""
        settings.posting.level = logging.INFO  # JobCreated and phase events reach `kubectl describe`
        # Handler errors reach Events too: kopf logs them on its object logger, and with
        # `posting.loggers` those records are posted. Only warnings and errors: kopf's INFO
        # chatter ("Handler succeeded") would bury the job's own events.
        settings.posting.loggers = True
        for handler in logging.getLogger(redaction.OBJECT_LOGGER).handlers:
            if type(handler).__name__ == "K8sPoster" and not any(isinstance(f, _WarningsOnly) for f in handler.filters):
                handler.addFilter(_WarningsOnly())
        redaction.install()  # before any record reaches a handler or an Event: credentials redacted
        # kopf's bookkeeping lives in status.kopf, not in annotations: a FineTuneJob whose own
        # annotations are near the 256 KiB limit would otherwise never get a status (every patch
        # adding kopf's annotations refused). An object handled by an older operator (annotations)
        # is handled once more: every handler here is idempotent (children are adopted).
        settings.persistence.progress_storage = kopf.StatusProgressStorage(name="kopf")
        # No handler here reacts to annotations: leaving them out of the handled copy keeps a
        # user's 250 KB of notes from being copied into status as well.
        settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(
            name="kopf", ignored_fields=["metadata.annotations"]
        )
        # No CRD watching: the FineTuneJob CRD is installed before the operator (Helm does), and
        # a namespaced operator then needs no cluster-wide permission at all (O11).
        settings.scanning.disabled = True
        settings.batching.worker_limit = worker_limit

    phases: dict[str, str] = {}

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry, id="phase-gauge")
    def count_phases(event: dict[str, Any], body: kopf.Body, uid: str, **_: Any) -> None:
        """Keep `kubetune_operator_finetunejobs{phase}` equal to what the watch shows (no finalizer)."""
        if event.get("type") == "DELETED":
            phases.pop(uid, None)
            serving_due.pop(uid, None)
        else:
            phases[uid] = str((body.get("status") or {}).get("phase") or Phase.PENDING.value)
        METRICS.set_phase_counts(collections.Counter(phases.values()))

    if metrics_port is not None:
        servers: list[Any] = []

        @kopf.on.startup(registry=registry, id="metrics-server")
        def serve_metrics(**_: Any) -> None:
            servers.append(METRICS.serve(metrics_port, settings.listen_address()))

        @kopf.on.cleanup(registry=registry, id="metrics-server")
        def stop_metrics(**_: Any) -> None:
            while servers:
                server = servers.pop()
                server.shutdown()
                server.server_close()

    # Timers normally make kopf add a finalizer; ours need none (the Job goes by ownerReference),
    # and a finalizer would hang deletion while the operator is down (O7).
    scratch = kopf.OperatorRegistry()
    kopf.timer(
        GROUP, VERSION, PLURAL, registry=scratch, id="observe", interval=settings.metrics_scrape_interval_seconds
    )(observe_job)
    for handler in scratch._spawning.get_all_handlers():
        registry._spawning.append(dataclasses.replace(handler, requires_finalizer=False))
    return kube


class _WarningsOnly(logging.Filter):
    """On kopf's Event poster: a log record becomes an Event only from WARNING up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def _register_default() -> None:
    registry = kopf.get_default_registry()
    if getattr(registry, "_kubetune_registered", False):
        return
    settings = OperatorSettings.from_env()
    register(
        registry,
        settings,
        metrics_port=settings.operator_metrics_port or None,
        presence_namespace=presence.lease_namespace(settings.namespaces),
    )
    registry._kubetune_registered = True  # type: ignore[attr-defined]


_register_default()
