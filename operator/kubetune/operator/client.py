"""The operator's Kubernetes API client and the requests that create, adopt and read its children.

Children are created through the official synchronous `kubernetes` client in a worker thread:
kopf's own API client is not public. Where the client connects is decided once, lazily: an
explicit `api_url` (the `api_url` setting, KUBETUNE_API_URL, or a test's emulator), else the
in-cluster service account, else kubeconfig.

Idempotency (RELIABILITY O1, O2): child names are deterministic (`kubetune.operator.names`); a
409 on create reads the existing object and adopts it when its ownerReferences carry our uid;
a foreign object holding the name is never touched (`ensure_child` answers False). Answers the
server will not change its mind about become `ChildRefused` with a message naming the field;
the rest (no answer, 429, 5xx) are `ApiError`s worth retrying (`retriable`, `backoff_seconds`).

Serving (spec.serving): its requests go through a second client whose User-Agent is
SERVING_AGENT, so audit logs (and tests/api_usage.py, which derives the chart's
`serving.enabled` RBAC from them) tell them from the training requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import importlib.metadata
import json
import math
import threading
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import kopf
from kubetune.api.conditions import Reason
from kubetune.api.resource import GROUP, PLURAL, VERSION
from kubetune.operator import names, reconcile, serving
from kubetune.operator.metrics import METRICS

VERBS = {"POST": "create", "GET": "get", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}
EXPECTED_STATUSES = (404, 409)  # answers the handlers act on (absent, exists): not errors
DEFAULT_NAMESPACE = "default"  # FineTuneJobs are namespaced: only for the type checker
RETRY_AFTER_BOUNDS = (1.0, 60.0)  # seconds: a hostile or broken Retry-After neither spins nor parks a handler


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
                import kubernetes

                url = self._api_url
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
        from kubernetes.client.exceptions import ApiException

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


def collection(obj: dict[str, Any], namespace: str | None) -> str:
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


def job_path(namespace: str | None, name: str) -> str:
    return f"/apis/batch/v1/namespaces/{quote(namespace or DEFAULT_NAMESPACE)}/jobs/{quote(name)}"


def ftj_path(namespace: str | None, name: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{quote(namespace or DEFAULT_NAMESPACE)}/{PLURAL}/{quote(name)}"


def owned_by(obj: dict[str, Any] | None, uid: str) -> bool:
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


def serving_path(kind: str, namespace: str | None, name: str) -> str:
    obj = {
        "Deployment": {"apiVersion": "apps/v1"},
        serving.LLMISVC[2]: {"apiVersion": f"{serving.GROUP}/{serving.LLMISVC[0]}"},
        serving.ISVC[2]: {"apiVersion": f"{serving.GROUP}/{serving.ISVC[0]}"},
    }[kind]
    return f"{collection({**obj, 'kind': kind}, namespace)}/{quote(name)}"


def serving_refusal(err: ApiError, what: str) -> str:
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
        await kube.request("POST", collection(obj, namespace), obj)
        return True
    except ApiError as err:
        refused = refusal(err, obj)
        if refused is not None:
            raise ChildRefused(*refused) from None
        if err.status != 409:
            raise
    existing = await kube.get(f"{collection(obj, namespace)}/{quote(obj['metadata']['name'])}")
    if existing is None:  # deleted in between: try again soon
        raise kopf.TemporaryError(f"{obj['kind']} {obj['metadata']['name']} vanished after 409", delay=1)
    return owned_by(existing, uid)


async def job_pods(kube: Kube, namespace: str | None, job_name: str) -> list[dict[str, Any]]:
    """The pods the Job controller labelled as `job_name`'s (owners are checked by the caller)."""
    listing = await kube.request(
        "GET",
        f"/api/v1/namespaces/{quote(namespace or DEFAULT_NAMESPACE)}/pods",
        query=[("labelSelector", f"{names.POD_JOB_LABEL}={job_name}")],
    )
    return [p for p in listing.get("items") or [] if isinstance(p, dict)]


async def job_events(kube: Kube, namespace: str | None, job: dict[str, Any]) -> list[dict[str, Any]]:
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


async def read_started_spec(
    kube: Kube, namespace: str | None, uid: str, status: dict[str, Any]
) -> dict[str, Any] | None:
    """The wire spec in the job's spec ConfigMap (`status.specConfigMap`); None when it is
    not recorded, gone, not ours or unreadable."""
    name = status.get("specConfigMap")
    if not isinstance(name, str) or not name:
        return None
    cm = await kube.get(f"/api/v1/namespaces/{quote(namespace or DEFAULT_NAMESPACE)}/configmaps/{quote(name)}")
    if cm is None or not owned_by(cm, uid):
        return None
    with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
        spec = json.loads((cm.get("data") or {})[names.SPEC_KEY])["spec"]
        return spec if isinstance(spec, dict) else None
    return None


async def get_job(kube: Kube, namespace: str | None, name: str) -> dict[str, Any] | None:
    """The Job `name`; None when there is none."""
    return await kube.get(job_path(namespace, name))


async def patch_job(kube: Kube, namespace: str | None, name: str, change: dict[str, Any]) -> None:
    """Merge-patch the Job `name` (spec.suspend, or ending it: `reconcile.end_job_patch`)."""
    await kube.request("PATCH", job_path(namespace, name), change)


async def get_finetunejob(kube: Kube, namespace: str | None, name: str) -> dict[str, Any] | None:
    """The FineTuneJob as the API server has it now (a timer's body may be stale)."""
    return await kube.get(ftj_path(namespace, name))


async def create_replacement(kube: Kube, obj: dict[str, Any], namespace: str | None) -> None:
    """POST `obj` without adopting on 409 (that is the old object, still being deleted, not ours
    to adopt): `ChildRefused` when the server refuses it for good, `ApiError` otherwise."""
    try:
        await kube.request("POST", collection(obj, namespace), obj)
    except ApiError as err:
        refused = refusal(err, obj)
        if refused is not None:
            raise ChildRefused(*refused) from None
        raise


async def get_serving_object(kube: Kube, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
    """The serving object `kind`/`name` of spec.serving; None when there is none."""
    return await kube.get(serving_path(kind, namespace, name))


async def delete_job(kube: Kube, namespace: str | None, name: str, uid: str | None = None) -> None:
    """DELETE a Job, its pods in the background; with `uid`, only that incarnation of the name."""
    body: dict[str, Any] = {"propagationPolicy": "Background"}
    if uid is not None:
        body["preconditions"] = {"uid": uid}
    await kube.request("DELETE", job_path(namespace, name), body)


async def patch_status(kube: Kube, namespace: str | None, name: str, change: dict[str, Any]) -> None:
    """Merge-patch the FineTuneJob's status subresource."""
    await kube.request("PATCH", f"{ftj_path(namespace, name)}/status", {"status": change})


async def read_secret_key(kube: Kube, namespace: str | None, name: str, key: str) -> tuple[bool, str | None]:
    """(the Secret exists, the base64 value of `key` or None)."""
    secret = await kube.get(f"/api/v1/namespaces/{quote(namespace or DEFAULT_NAMESPACE)}/secrets/{quote(name)}")
    return secret is not None, ((secret or {}).get("data") or {}).get(key) or None


async def discover_kserve(kube: Kube) -> tuple[str, str, str] | None:
    """The KServe kind this cluster serves (`serving.kserve_kind`), None without KServe."""
    found: dict[str, Any] = {}
    for version, _plural, _kind in serving.KSERVE_KINDS:
        found[version] = await kube.get(f"/apis/{serving.GROUP}/{version}")
        if serving.kserve_kind(found) is not None:
            break
    return serving.kserve_kind(found)


async def create_or_adopt(kube: Kube, obj: dict[str, Any], namespace: str | None, uid: str) -> bool:
    """POST a serving object; on 409 the existing object is ours (owner uid, or our labels when
    retained) and is patched to what was built, else False (a foreign object holds the name)."""
    path = collection(obj, namespace)
    try:
        await kube.request("POST", path, obj)
        return True
    except ApiError as err:
        if err.status != 409:
            raise
    existing = await kube.get(f"{path}/{quote(obj['metadata']['name'])}")
    if existing is None:
        raise ApiError(0, f"{obj['kind']} {obj['metadata']['name']} vanished after 409")  # retried
    labels = (existing.get("metadata") or {}).get("labels") or {}
    ours = obj["metadata"]["labels"]
    retained = "ownerReferences" not in obj["metadata"] and all(
        labels.get(k) == ours[k] for k in (names.FINETUNEJOB_LABEL, names.MANAGED_BY_LABEL)
    )
    if not (owned_by(existing, uid) or retained):
        return False
    await kube.request(
        "PATCH",
        f"{path}/{quote(obj['metadata']['name'])}",
        {
            "metadata": {k: v for k, v in obj["metadata"].items() if k in ("labels", "ownerReferences")},
            "spec": obj["spec"],
        },
    )
    return True
