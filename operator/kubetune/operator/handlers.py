"""The kopf handlers of FineTuneJobs: parse the body, call a pure function, patch (DESIGN style 1).

`register(registry, settings)` puts every handler on one `kopf.OperatorRegistry`, so tests build
an isolated operator against an emulated API; importing this module also registers them once on
kopf's default registry, for `kopf run -m kubetune.operator.handlers` and `python -m
kubetune.operator`.

Children are created through the official synchronous `kubernetes` client in a worker thread:
kopf's own API client is not public. Where the client connects is decided once, lazily: an
explicit `api_url` (tests), `KUBETUNE_API_URL`, the in-cluster service account, or kubeconfig.

Idempotency (RELIABILITY O1, O2): child names are deterministic; a 409 on create reads the
existing object, adopts it when its ownerReferences carry our uid, and otherwise fails the
FineTuneJob with `ChildNameConflict` without touching the foreign object. Deletion relies on
ownerReferences only: no handler here needs a finalizer, so deleting a FineTuneJob while the
operator is down never hangs (O7).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import os
import threading
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import aiohttp
import kopf
from kubetune.api.conditions import ConditionType, Reason
from kubetune.api.enums import Phase
from kubetune.api.estimate import estimate_gpu_memory_gib, parameters_from_name
from kubetune.api.resource import GROUP, PLURAL, VERSION, FineTuneJob, parse_manifest
from kubetune.operator import builders, reconcile
from kubetune.operator.metrics import METRICS
from kubetune.operator.settings import OperatorSettings

API_URL_ENV = "KUBETUNE_API_URL"
VERBS = {"POST": "create", "GET": "get", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}
EXPECTED_STATUSES = (404, 409)  # answers the handlers act on (absent, exists): not errors
DEFAULT_NAMESPACE = "default"  # FineTuneJobs are namespaced: only for the type checker
POD_JOB_LABEL = "job-name"
PROBLEMS_SHOWN = 10
SCRAPE_TIMEOUT_SECONDS = 2.0
_TERMINAL = (Phase.SUCCEEDED.value, Phase.FAILED.value, Phase.CANCELLED.value)


# ------------------------------------------------------------------------------ API access


def _version() -> str:
    try:
        return importlib.metadata.version("kubetune")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


USER_AGENT = f"kubetune-operator/{_version()}"


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

    def __init__(self, api_url: str | None = None) -> None:
        self._api_url = api_url
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
                self._client.user_agent = USER_AGENT
            return self._client

    def _call(self, method: str, path: str, body: Any = None, query: list[tuple[str, str]] | None = None) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException  # type: ignore[import-untyped]

        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/merge-patch+json" if method == "PATCH" else "application/json"
        try:
            resp = self._api().call_api(
                path, method, query_params=query or [], header_params=headers, body=body,
                auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True,
                _request_timeout=30,
            )
        except ApiException as err:
            if err.status not in EXPECTED_STATUSES:
                METRICS.api_error(VERBS.get(method, method.lower()), _resource_of(path), int(err.status or 0))
            retry = (err.headers or {}).get("Retry-After")
            try:
                delay = float(retry) if retry is not None else None
            except ValueError:
                delay = None
            raise ApiError(int(err.status or 0), str(err.body or err.reason or ""), delay) from None
        data = resp.data
        return json.loads(data) if data else {}

    async def request(self, method: str, path: str, body: Any = None, query: list[tuple[str, str]] | None = None) -> dict[str, Any]:
        return await asyncio.to_thread(self._call, method, path, body, query)

    async def get(self, path: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", path)
        except ApiError as err:
            if err.status == 404:
                return None
            raise


def _collection(obj: dict[str, Any], namespace: str | None) -> str:
    api_version, kind = obj["apiVersion"], obj["kind"]
    plural = {"Job": "jobs", "Service": "services", "PodGroup": "podgroups", "Pod": "pods"}[kind]
    root = "/api/v1" if "/" not in api_version else f"/apis/{api_version}"
    return f"{root}/namespaces/{quote(namespace or DEFAULT_NAMESPACE)}/{plural}"


def _job_path(namespace: str | None, name: str) -> str:
    return f"/apis/batch/v1/namespaces/{quote(namespace or DEFAULT_NAMESPACE)}/jobs/{quote(name)}"


def _ftj_path(namespace: str | None, name: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{quote(namespace or DEFAULT_NAMESPACE)}/{PLURAL}/{quote(name)}"


def _owned_by(obj: dict[str, Any] | None, uid: str) -> bool:
    refs = ((obj or {}).get("metadata") or {}).get("ownerReferences") or []
    return any(isinstance(r, dict) and r.get("uid") == uid for r in refs)


def _temporary(err: ApiError, what: str) -> kopf.TemporaryError:
    delay = err.retry_after if err.retry_after is not None else 1.0 if err.status in (429,) or err.status >= 500 else 10.0
    return kopf.TemporaryError(f"{what}: HTTP {err.status}", delay=delay)


# --------------------------------------------------------------------------- pure helpers


def _plain(body: Any) -> dict[str, Any]:
    """The kopf body as a plain JSON dict."""
    return json.loads(json.dumps(dict(body), default=lambda o: dict(o) if hasattr(o, "keys") else str(o)))


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(ctype: ConditionType, reason: Reason, message: str, generation: int | None, status: str = "True") -> dict[str, Any]:
    cond: dict[str, Any] = {"type": ctype.value, "status": status, "reason": reason.value, "message": message, "lastTransitionTime": _now()}
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def invalid_spec_message(problems: list[Any]) -> str:
    """The problems of a manifest as one bounded message."""
    shown = "; ".join(str(p) for p in problems[:PROBLEMS_SHOWN])
    more = len(problems) - PROBLEMS_SHOWN
    text = f"invalid spec: {shown}" + (f" (and {more} more)" if more > 0 else "")
    return reconcile._bounded(reconcile.redact(text))


def effective(ftj: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    """status.effective: the image, GPUs, nodes and the GPU memory estimate."""
    spec = ftj.spec
    out: dict[str, Any] = {"image": spec.image or settings.trainer_image, "gpus": spec.resources.gpus,
                           "nodes": spec.resources.nodes}
    params = parameters_from_name(str(spec.model.source))
    if params:
        batch = spec.hyperparameters.batch_size
        out["parameters"] = params
        out["estimatedGPUMemoryGiB"] = estimate_gpu_memory_gib(
            params, spec.method.adaptation, seq_length=spec.dataset.max_seq_length,
            batch_size=batch if isinstance(batch, int) else 1,
            gradient_checkpointing=spec.hyperparameters.gradient_checkpointing,
            gpus=max(1, spec.resources.gpus),
        )
    return out


def conflict_message(child: dict[str, Any]) -> str:
    kind, name = child["kind"], child["metadata"]["name"]
    return (f"a {kind} named {name} already exists and is not owned by this FineTuneJob; "
            f"rename the FineTuneJob or delete that {kind}")


def _data_validated(status: dict[str, Any]) -> bool:
    return any(c.get("type") == ConditionType.DATA_VALIDATED.value and c.get("status") == "True"
               for c in status.get("conditions") or [] if isinstance(c, dict))


def initial_phase(ftj: FineTuneJob, settings: OperatorSettings) -> Phase:
    if ftj.spec.suspend:
        return Phase.SUSPENDED
    return Phase.QUEUED if builders.uses_kueue(ftj, settings) else Phase.PENDING


# ------------------------------------------------------------------------------ handlers


def _fail(patch: kopf.Patch, body: Any, reason: Reason, message: str, generation: int | None) -> kopf.PermanentError:
    patch.status["phase"] = Phase.FAILED.value
    patch.status["conditions"] = [condition(ConditionType.FAILED, reason, message, generation)]
    if generation is not None:
        patch.status["observedGeneration"] = generation
    kopf.warn(body, reason=reason.value, message=message)
    METRICS.transition((body.get("status") or {}).get("phase"), Phase.FAILED.value)
    return kopf.PermanentError(message)


async def ensure_child(kube: Kube, obj: dict[str, Any], namespace: str | None, uid: str) -> bool:
    """Create `obj`; True when it exists and is ours (created now or earlier), False when a
    foreign object holds the name."""
    try:
        await kube.request("POST", _collection(obj, namespace), obj)
        return True
    except ApiError as err:
        if err.status != 409:
            raise _temporary(err, f"creating {obj['kind']} {obj['metadata']['name']}") from None
    existing = await kube.get(f"{_collection(obj, namespace)}/{quote(obj['metadata']['name'])}")
    if existing is None:  # deleted in between: try again soon
        raise kopf.TemporaryError(f"{obj['kind']} {obj['metadata']['name']} vanished after 409", delay=1)
    return _owned_by(existing, uid)


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings, *, api_url: str | None = None,
             metrics_port: int | None = None) -> Kube:
    """Register the FineTuneJob handlers on `registry`; returns the API client they use. With
    `metrics_port`, the operator's own /metrics is served there while the operator runs."""
    kube = Kube(api_url)

    async def start_training(ftj: FineTuneJob, body: Any, namespace: str | None, uid: str, patch: kopf.Patch,
                             status: dict[str, Any], generation: int | None) -> None:
        """Create the trainer Job (and its Service / PodGroup) and record it in the status."""
        children = []
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
        patch.status["effective"] = effective(ftj, settings)
        if generation is not None:
            patch.status["observedGeneration"] = generation
        if status.get("phase") in (None, Phase.VALIDATING.value):
            phase = initial_phase(ftj, settings)
            patch.status["phase"] = phase.value
            METRICS.transition(status.get("phase"), phase.value)
        if status.get("jobName") != job_name:
            kopf.info(body, reason=Reason.JOB_CREATED.value, message=f"Job {job_name} is created")

    async def create_children(body: kopf.Body, name: str, namespace: str | None, uid: str, patch: kopf.Patch, **_: Any) -> None:
        status = dict(body.get("status") or {})
        if status.get("phase") in _TERMINAL:
            return
        generation = body.get("metadata", {}).get("generation")
        manifest = {k: v for k, v in _plain(body).items() if k != "status"}
        with METRICS.reconcile_timer():
            ftj, problems = parse_manifest(manifest)
            if ftj is None:
                raise _fail(patch, body, Reason.INVALID_SPEC, invalid_spec_message(problems), generation)
            if ftj.spec.dataset.prevalidate and not status.get("jobName") and not _data_validated(status):
                check = builders.validation_job(ftj, uid, settings)
                if not await ensure_child(kube, check, namespace, uid):
                    raise _fail(patch, body, Reason.CHILD_NAME_CONFLICT, conflict_message(check), generation)
                patch.status["effective"] = effective(ftj, settings)
                if generation is not None:
                    patch.status["observedGeneration"] = generation
                if status.get("phase") != Phase.VALIDATING.value:
                    patch.status["phase"] = Phase.VALIDATING.value
                    patch.status["conditions"] = [condition(ConditionType.DATA_VALIDATED, Reason.VALIDATING_DATA,
                                                            f"Job {check['metadata']['name']} checks the data", generation, "Unknown")]
                    METRICS.transition(status.get("phase"), Phase.VALIDATING.value)
                    kopf.info(body, reason=Reason.VALIDATING_DATA.value, message=f"Job {check['metadata']['name']} checks the data")
                return
            await start_training(ftj, body, namespace, uid, patch, status, generation)

    async def after_validation(body: kopf.Body, namespace: str | None, uid: str, patch: kopf.Patch, status: dict[str, Any]) -> None:
        """Phase Validating: start training when the validation Job succeeded, fail when it failed."""
        generation = body.get("metadata", {}).get("generation")
        ftj, _problems = parse_manifest({k: v for k, v in _plain(body).items() if k != "status"})
        if ftj is None:
            return  # the spec changed into an invalid one; the create/resume handler reports it
        check_name = builders.child_name(ftj.metadata.name, "validate")
        check = await kube.get(_job_path(namespace, check_name))
        if check is None or not _owned_by(check, uid):
            return
        conds = reconcile._true_conditions(check)
        others = [c for c in status.get("conditions") or [] if c.get("type") != ConditionType.DATA_VALIDATED.value]
        if "Complete" in conds or "SuccessCriteriaMet" in conds:
            patch.status["conditions"] = others + [condition(ConditionType.DATA_VALIDATED, Reason.DATA_VALID,
                                                             f"Job {check_name} found the data valid", generation)]
            with contextlib.suppress(kopf.PermanentError):
                await start_training(ftj, body, namespace, uid, patch, status, generation)
        elif "Failed" in conds or "FailureTarget" in conds:
            listing = await kube.request("GET", f"/api/v1/namespaces/{quote(namespace or DEFAULT_NAMESPACE)}/pods",
                                         query=[("labelSelector", f"{POD_JOB_LABEL}={check_name}")])
            summaries = [reconcile.parse_termination(p) for p in listing.get("items") or [] if isinstance(p, dict)]
            found = [str(x["message"]) for x in summaries if x and isinstance(x.get("message"), str) and x["message"].strip()]
            job_cond = conds.get("Failed") or conds.get("FailureTarget") or {}
            text = found[-1] if found else str(job_cond.get("message") or f"Job {check_name} failed")
            message = reconcile._message(f"data validation failed: {text}", ())
            _fail(patch, body, Reason.INVALID_DATA, message, generation)

    kopf.on.create(GROUP, VERSION, PLURAL, registry=registry, id="children")(create_children)
    kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry, id="children")(create_children)

    @kopf.on.field(GROUP, VERSION, PLURAL, registry=registry, field="spec.suspend", id="suspend")
    async def suspend(body: kopf.Body, name: str, namespace: str | None, uid: str, new: Any, **_: Any) -> None:
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
                raise _temporary(err, f"patching Job {job_name}") from None

    async def recreate_job(body: kopf.Body, namespace: str | None, uid: str, patch: kopf.Patch) -> None:
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
        if current is None or current.get("metadata", {}).get("uid") != uid or current["metadata"].get("deletionTimestamp"):
            return
        done = int(status.get("recreations") or 0)
        job_name = status.get("jobName")
        if done >= settings.max_job_recreations:
            message = (f"Job {job_name} was deleted {done + 1} times; not recreating it again "
                       f"(the operator's limit is {settings.max_job_recreations}). Committed checkpoints are kept: "
                       "apply the FineTuneJob again under a new name to resume from them")
            _fail(patch, body, Reason.TOO_MANY_RECREATIONS, message, generation)
            return
        job = builders.trainer_job(ftj, uid, settings)
        if not await ensure_child(kube, job, namespace, uid):
            _fail(patch, body, Reason.CHILD_NAME_CONFLICT, conflict_message(job), generation)
            return
        patch.status["recreations"] = done + 1
        kopf.warn(body, reason=Reason.JOB_RECREATED.value,
                  message=f"Job {job_name} was deleted; recreated it ({done + 1} of at most "
                          f"{settings.max_job_recreations}), resuming from the newest committed checkpoint")

    async def observe_job(body: kopf.Body, name: str, namespace: str | None, uid: str, patch: kopf.Patch,
                          logger: Any, **_: Any) -> None:
        job_name = (body.get("status") or {}).get("jobName")
        if not job_name:
            if (body.get("status") or {}).get("phase") == Phase.VALIDATING.value:
                await after_validation(body, namespace, uid, patch, dict(body.get("status") or {}))
            return
        with METRICS.reconcile_timer():
            job = await kube.get(_job_path(namespace, job_name))
            if job is None:
                await recreate_job(body, namespace, uid, patch)
                return
            if not _owned_by(job, uid):
                return
            listing = await kube.request("GET", f"/api/v1/namespaces/{quote(namespace or DEFAULT_NAMESPACE)}/pods",
                                         query=[("labelSelector", f"{POD_JOB_LABEL}={job_name}")])
            pods = [p for p in listing.get("items") or [] if isinstance(p, dict)]
            if reconcile.must_end_job(job, pods):
                try:
                    await kube.request("PATCH", _job_path(namespace, job_name), reconcile.end_job_patch())
                except ApiError as err:
                    logger.warning(f"could not end Job {job_name} after a permanent failure, retrying: "
                                   f"{reconcile._bounded(reconcile.redact(str(err)), 500)}")
            scraped = await scrape(pods, settings.metrics_port)
            ftj = _plain(body)
            old = ftj.get("status") or {}
            new = reconcile.observe(ftj, job, pods, scraped, settings, datetime.now(timezone.utc))
            change = reconcile.diff(old, new)
            if change is None:
                return
            # Patched here rather than through kopf's `patch`: kopf applies a timer's patch after
            # the handler, and one refused patch (a 422) ends that object's timer for good. Here a
            # refusal is logged and counted, and the next tick tries again.
            try:
                await kube.request("PATCH", f"{_ftj_path(namespace, name)}/status", {"status": change})
            except ApiError as err:
                logger.warning(f"status patch refused, retrying in {settings.metrics_scrape_interval_seconds:g}s: "
                               f"{reconcile._bounded(reconcile.redact(str(err)), 500)}")
                return
            if new.get("phase") != old.get("phase") and new.get("phase"):
                METRICS.transition(old.get("phase"), new["phase"])
            for kind, reason, message in reconcile.transitions(old, new):
                kopf.event(body, type=kind, reason=reason, message=message)

    worker_limit = settings.worker_limit or None  # kopf: None is unlimited

    @kopf.on.startup(registry=registry, id="configure")
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        """kopf settings of every instance (the tests' too, so they see what production does)."""
        settings.posting.level = logging.INFO  # JobCreated and phase events reach `kubectl describe`
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
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
        else:
            phases[uid] = str((body.get("status") or {}).get("phase") or Phase.PENDING.value)
        METRICS.set_phase_counts(collections.Counter(phases.values()))

    if metrics_port is not None:
        servers: list[Any] = []

        @kopf.on.startup(registry=registry, id="metrics-server")
        def serve_metrics(**_: Any) -> None:
            servers.append(METRICS.serve(metrics_port))

        @kopf.on.cleanup(registry=registry, id="metrics-server")
        def stop_metrics(**_: Any) -> None:
            while servers:
                server = servers.pop()
                server.shutdown()
                server.server_close()

    # Timers normally make kopf add a finalizer; ours need none (the Job goes by ownerReference),
    # and a finalizer would hang deletion while the operator is down (O7).
    scratch = kopf.OperatorRegistry()
    kopf.timer(GROUP, VERSION, PLURAL, registry=scratch, id="observe", interval=settings.metrics_scrape_interval_seconds)(observe_job)
    for handler in scratch._spawning.get_all_handlers():
        registry._spawning.append(dataclasses.replace(handler, requires_finalizer=False))
    return kube


async def scrape(pods: list[dict[str, Any]], port: int) -> dict[str, float] | None:
    """The trainer's series from the first running pod with an IP; None when none answers."""
    for pod in pods:
        ip = (pod.get("status") or {}).get("podIP")
        if not ip or (pod.get("status") or {}).get("phase") != "Running":
            continue
        try:
            timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_SECONDS)
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(f"http://{ip}:{port}/metrics") as resp:
                resp.raise_for_status()
                return reconcile.parse_metrics(await resp.text())
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            METRICS.scrape_failure()
    return None


def _register_default() -> None:
    registry = kopf.get_default_registry()
    if getattr(registry, "_kubetune_registered", False):
        return
    settings = OperatorSettings.from_env()
    register(registry, settings, metrics_port=settings.operator_metrics_port or None)
    registry._kubetune_registered = True  # type: ignore[attr-defined]


_register_default()
