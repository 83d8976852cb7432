"""The Kubernetes backend of `kubetune api`: OpenAI files in object storage, jobs as FineTuneJobs.

- **Files** go to `<storage>/<namespace>/files/<file-id>.jsonl` (any fsspec URL: `s3://bucket/prefix`,
  `gs://…`, `file:///…`), beside `<file-id>.json` with the file object and the content's sha256
  (written last: a file exists once its record does). The namespace in the path is the tenant's,
  so tenants never share a prefix, and ids are checked against their pattern before they reach a
  path, so no id can climb out of it.
- **Jobs** become FineTuneJobs in the tenant's namespace, named by the job id (`kubectl get ftj
  ftjob-…` works), built by `translate.to_manifest` and checked by kubetune.api's models. The label
  `openai.kubetune.io/job-id` marks them; annotations keep what a FineTuneJob has no field for: the
  OpenAI request (`openai.kubetune.io/request`), the organization and the uploaded file names. The
  trainer writes to `<storage>/<namespace>/jobs/<job-id>/`, with `spec.output.credentialsSecret`
  (a Secret each tenant namespace holds) when one is configured.
- **Status** maps through `translate.openai_job`; cancel sets `spec.cancel` (the operator deletes
  the trainer Job, keeps checkpoints, phase Cancelled), pause/resume set `spec.suspend`.
- **Events** are the FineTuneJob's Kubernetes Events (Warning → `warn`, failures → `error`), the
  creation, the latest `status.progress`/`status.metrics` as a `metrics` event, and the end.
  **Checkpoints** come from `status.checkpoints`, **models** from succeeded jobs.
- **Webhooks**: with webhook configs, a background task polls the namespaces that have one every
  `webhook_poll_seconds` and hands terminal jobs to a `webhooks.Dispatcher` whose ledger is an
  annotation per event on the FineTuneJob (`openai.kubetune.io/webhook-succeeded: pending →
  delivered`), claimed with a resourceVersion precondition so two gateway replicas cannot both
  claim it. The operator ignores annotations (its diff base leaves them out).

The kubernetes client is synchronous; every call runs in a worker thread. Errors of the API server
become the gateway's typed errors: 403 names the RBAC the gateway lacks, 5xx and unreachable are
503 with Retry-After (the client retries those).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from kubetune.gateway import translate
from kubetune.gateway.backend import (
    Conflict,
    Forbidden,
    GatewayError,
    Invalid,
    NotFound,
    Tenant,
    Unavailable,
    paginate,
)
from kubetune.gateway.objects import Event, FileDeleted, FileObject, FineTuningJob, JobCreate, ListPage, Model
from kubetune.gateway.webhooks import (
    EVENTS,
    Dispatcher,
    LedgerState,
    WebhookConfig,
    WebhookError,
    WebhookSender,
    endpoint_for,
)

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
PREFIX = translate.LABEL_PREFIX  # openai.kubetune.io/
JOB_ID_LABEL = translate.JOB_ID_LABEL
REQUEST_ANNOTATION = PREFIX + "request"
ORGANIZATION_ANNOTATION = PREFIX + "organization"
FILES_ANNOTATION = PREFIX + "files"
WEBHOOK_ANNOTATION = PREFIX + "webhook-"  # + succeeded | failed | cancelled
FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
JOB_ID = re.compile(r"^ftjob-[0-9a-f]{24}$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
FAILURE_REASONS = ("Failed", "InvalidData", "InvalidSpec", "BackoffLimitExceeded", "DeadlineExceeded", "StorageError")


@dataclass
class KubeSettings:
    """What the chart configures (`gateway.*` values → `KUBETUNE_API_*` variables)."""

    storage: str
    """fsspec URL prefix for uploads and job outputs, e.g. s3://models/kubetune-api."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    credentials_secret: Optional[str] = None
    """spec.output.credentialsSecret of every job: a Secret of that name in each tenant namespace
    with the object store's credentials (the trainer reads the upload and writes the output)."""
    gpus: int = 1
    """spec.resources.gpus of every job (OpenAI's request has no hardware field)."""
    image: Optional[str] = None
    checkpoint_every_steps: Optional[int] = None
    webhook_poll_seconds: float = 10.0

    def __post_init__(self) -> None:
        self.storage = self.storage.rstrip("/")
        if "://" not in self.storage:
            raise ValueError(
                f"storage {self.storage!r} must be a URL with a scheme (s3://bucket/prefix, gs://…, file:///path)"
            )


GATEWAY_AGENT = "kubetune-gateway/"
"""The User-Agent prefix of the gateway's API requests (tests measure its RBAC needs by it)."""


def client_for(configuration: Any) -> Any:
    """A kubernetes ApiClient for `configuration`, identified as the gateway."""
    from kubernetes import client

    api = client.ApiClient(configuration)
    api.user_agent = GATEWAY_AGENT + "1"
    return api


def api_client(kubeconfig: Optional[str] = None) -> Any:
    """The gateway's ApiClient: in-cluster (the pod's ServiceAccount) when no kubeconfig is named
    and the pod has one, else the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    if kubeconfig is None:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
    else:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return client_for(configuration)


def _rfc3339_unix(value: Any) -> int:
    return translate.unix(value) or 0


class KubeBackend:
    """`Backend` on a Kubernetes cluster (see the module docstring)."""

    def __init__(
        self,
        client: Any,
        settings: KubeSettings,
        *,
        webhooks: Optional[Callable[[], list[WebhookConfig]]] = None,
        sender: Optional[WebhookSender] = None,
    ) -> None:
        import fsspec.core

        self.client = client
        self.settings = settings
        self.fs, self.root = fsspec.core.url_to_fs(settings.storage, **settings.storage_options)
        self.root = self.root.rstrip("/")
        self.webhooks = webhooks
        self.dispatcher = Dispatcher(AnnotationLedger(self), sender) if webhooks is not None else None
        self._poller: Optional[asyncio.Task[None]] = None

    client_for = staticmethod(client_for)

    # ------------------------------------------------------------------------ plumbing

    def _custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.client)

    def _core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.client)

    async def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one API call in a thread; its JSON body, or a GatewayError (404 → None)."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        def run() -> Any:
            resp = fn(*args, _preload_content=False, **kwargs)
            data = resp.data
            return json.loads(data) if data else {}

        try:
            return await asyncio.to_thread(run)
        except ApiException as err:
            if err.status == 404:
                return None
            raise self._error(what, err) from None
        except (HTTPError, OSError) as err:
            raise Unavailable(
                f"the Kubernetes API server cannot be reached ({what}): {type(err).__name__}", retry_after=2
            ) from None

    @staticmethod
    def _error(what: str, err: Any) -> GatewayError:
        message = ""
        with contextlib.suppress(ValueError, TypeError):
            message = json.loads(err.body or "{}").get("message", "")
        if err.status == 403:
            return Forbidden(
                f"kubetune api may not {what}: {message or 'forbidden'}. The gateway's ServiceAccount needs "
                "the chart's gateway Role in this namespace (watch.namespaces, or watch.scope Cluster)"
            )
        if err.status == 409:
            return Conflict(f"{what}: {message or 'conflict'}")
        if err.status in (400, 422):
            return Invalid(f"{what}: the API server refused it: {message}")
        if err.status == 429:
            return Unavailable(f"{what}: the API server is busy", retry_after=1)
        return Unavailable(f"{what}: the API server answered HTTP {err.status}", retry_after=2)

    # ------------------------------------------------------------------------ files

    def _files_dir(self, namespace: str) -> str:
        return f"{self.root}/{namespace}/files"

    def file_uri(self, namespace: str, file_id: str) -> str:
        """The URL the trainer reads a file from (the storage URL, not the filesystem's path)."""
        return f"{self.settings.storage}/{namespace}/files/{file_id}.jsonl"

    async def create_file(
        self, tenant: Tenant, filename: str, purpose: str, chunks: AsyncIterator[bytes]
    ) -> FileObject:
        file_id = translate.new_id("file")
        data_path = f"{self._files_dir(tenant.namespace)}/{file_id}.jsonl"
        digest, size = hashlib.sha256(), 0
        try:
            handle = await asyncio.to_thread(self._open_for_write, data_path)
            try:
                async for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    await asyncio.to_thread(handle.write, chunk)
            finally:
                await asyncio.to_thread(handle.close)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.fs.rm, data_path)
            raise
        obj = FileObject(id=file_id, bytes=size, created_at=int(time.time()), filename=filename, purpose=purpose)
        record = {**obj.model_dump(), "sha256": digest.hexdigest(), "uri": self.file_uri(tenant.namespace, file_id)}
        try:
            await asyncio.to_thread(
                self.fs.pipe_file, f"{self._files_dir(tenant.namespace)}/{file_id}.json", json.dumps(record).encode()
            )
        except OSError as err:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.fs.rm, data_path)
            raise Unavailable(f"object storage refused the file's record: {err}", retry_after=2) from None
        return obj

    def _open_for_write(self, path: str) -> Any:
        try:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            return self.fs.open(path, "wb")
        except OSError as err:
            raise Unavailable(
                f"object storage cannot be written ({self.settings.storage}): {err}", retry_after=2
            ) from None

    async def _record(self, tenant: Tenant, file_id: str) -> dict[str, Any]:
        if not FILE_ID.match(file_id):
            raise NotFound(f"No such File object: {file_id[:100]}", param="file_id")
        path = f"{self._files_dir(tenant.namespace)}/{file_id}.json"
        try:
            return json.loads(await asyncio.to_thread(self.fs.cat_file, path))
        except FileNotFoundError:
            raise NotFound(f"No such File object: {file_id}", param="file_id") from None
        except OSError as err:
            raise Unavailable(f"object storage cannot be read: {err}", retry_after=2) from None

    @staticmethod
    def _file_object(record: Mapping[str, Any]) -> FileObject:
        return FileObject.model_validate({k: v for k, v in record.items() if k in FileObject.model_fields})

    async def list_files(
        self, tenant: Tenant, *, purpose: Optional[str], after: Optional[str], limit: int, order: str = "desc"
    ) -> ListPage:
        directory = self._files_dir(tenant.namespace)

        def read_all() -> list[dict[str, Any]]:
            self.fs.invalidate_cache(directory)  # another replica may have written since
            try:
                paths = [p for p in self.fs.ls(directory, detail=False) if p.endswith(".json")]
            except FileNotFoundError:
                return []
            if not paths:
                return []
            return [json.loads(v) for v in self.fs.cat(paths, on_error="omit").values()]

        try:
            records = await asyncio.to_thread(read_all)
        except OSError as err:
            raise Unavailable(f"object storage cannot be listed: {err}", retry_after=2) from None
        files = [self._file_object(r) for r in records if purpose is None or r.get("purpose") == purpose]
        files.sort(key=lambda f: (f.created_at, f.id), reverse=order != "asc")
        return paginate(files, after, limit)

    async def get_file(self, tenant: Tenant, file_id: str) -> FileObject:
        return self._file_object(await self._record(tenant, file_id))

    async def file_content(self, tenant: Tenant, file_id: str) -> AsyncIterator[bytes]:
        await self._record(tenant, file_id)  # NotFound before the first chunk
        path = f"{self._files_dir(tenant.namespace)}/{file_id}.jsonl"
        handle = await asyncio.to_thread(self.fs.open, path, "rb")

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while chunk := await asyncio.to_thread(handle.read, 1 << 20):
                    yield chunk
            finally:
                await asyncio.to_thread(handle.close)

        return chunks()

    async def delete_file(self, tenant: Tenant, file_id: str) -> FileDeleted:
        await self._record(tenant, file_id)
        directory = self._files_dir(tenant.namespace)
        try:
            await asyncio.to_thread(self.fs.rm, f"{directory}/{file_id}.json")  # the record first: gone at once
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(self.fs.rm, f"{directory}/{file_id}.jsonl")
        except OSError as err:
            raise Unavailable(f"object storage refused the deletion: {err}", retry_after=2) from None
        return FileDeleted(id=file_id)

    # ------------------------------------------------------------------------ jobs

    def _webhook_config(self, namespace: str) -> Optional[WebhookConfig]:
        if self.webhooks is None:
            return None
        return next((w for w in self.webhooks() if w.namespace == namespace), None)

    async def create_job(self, tenant: Tenant, request: JobCreate) -> FineTuningJob:
        translate.check_request(request)
        try:
            endpoint_for(self._webhook_config(tenant.namespace), request.metadata)
        except WebhookError as err:
            raise Invalid(str(err), param=err.param) from None
        files: dict[str, str] = {}
        names: dict[str, str] = {}
        uris: dict[str, Optional[str]] = {"training_file": None, "validation_file": None}
        for param in ("training_file", "validation_file"):
            file_id = getattr(request, param)
            if file_id is None:
                continue
            try:
                record = await self._record(tenant, file_id)
            except NotFound:
                raise Invalid(
                    f'{param} {file_id!r}: no such file; upload it with files.create(purpose="fine-tune")',
                    param=param,
                    code="invalid_file",
                ) from None
            uri = self.file_uri(tenant.namespace, file_id)
            uris[param], files[uri], names[uri] = uri, param, f"{file_id} ({record.get('filename')})"
        job_id = translate.new_id("ftjob")
        annotations = {
            REQUEST_ANNOTATION: request.model_dump_json(exclude_unset=True),
            ORGANIZATION_ANNOTATION: tenant.organization_id,
            FILES_ANNOTATION: json.dumps({"files": files, "names": names}),
        }
        manifest = translate.to_manifest(
            request,
            name=job_id,
            job_id=job_id,
            train_uri=uris["training_file"] or "",
            validation_uri=uris["validation_file"],
            output_uri=f"{self.settings.storage}/{tenant.namespace}/jobs/{job_id}",
            namespace=tenant.namespace,
            gpus=self.settings.gpus,
            checkpoint_every_steps=self.settings.checkpoint_every_steps,
            annotations=annotations,
        )
        if self.settings.credentials_secret:
            manifest["spec"]["output"]["credentialsSecret"] = self.settings.credentials_secret
        if self.settings.image:
            manifest["spec"]["image"] = self.settings.image
        translate.validate_manifest(manifest)
        created = await self._call(
            f"create finetunejobs in namespace {tenant.namespace}",
            self._custom().create_namespaced_custom_object,
            GROUP,
            VERSION,
            tenant.namespace,
            PLURAL,
            manifest,
        )
        if created is None:
            raise Invalid(
                f"namespace {tenant.namespace!r} does not exist on this cluster; ask your kubetune administrator "
                "to create it (and the credentials Secret of its jobs)"
            )
        return self._job(created)

    async def _get(self, tenant: Tenant, job_id: str) -> dict[str, Any]:
        if not JOB_ID.match(job_id):
            raise NotFound(f"No such fine-tuning job: {job_id[:100]}", param="fine_tuning_job_id")
        obj = await self._call(
            f"get finetunejobs in namespace {tenant.namespace}",
            self._custom().get_namespaced_custom_object,
            GROUP,
            VERSION,
            tenant.namespace,
            PLURAL,
            job_id,
        )
        labels = ((obj or {}).get("metadata") or {}).get("labels") or {}
        if obj is None or labels.get(JOB_ID_LABEL) != job_id or not self._ours(obj):
            raise NotFound(f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
        return obj

    @staticmethod
    def _ours(obj: Mapping[str, Any]) -> bool:
        """A FineTuneJob the gateway made: its id label and a readable request annotation (one
        labelled by hand, or whose annotation was edited, is not an OpenAI job)."""
        meta = obj.get("metadata") or {}
        if not JOB_ID.match(str((meta.get("labels") or {}).get(JOB_ID_LABEL, ""))):
            return False
        try:
            JobCreate.model_validate_json((meta.get("annotations") or {}).get(REQUEST_ANNOTATION) or "")
        except ValueError:
            log.warning(
                "FineTuneJob %s/%s has the %s label but no valid %s annotation: not listed",
                meta.get("namespace"),
                meta.get("name"),
                JOB_ID_LABEL,
                REQUEST_ANNOTATION,
            )
            return False
        return True

    async def _list(self, namespace: str) -> list[dict[str, Any]]:
        listing = await self._call(
            f"list finetunejobs in namespace {namespace}",
            self._custom().list_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            label_selector=JOB_ID_LABEL,
        )
        items = [o for o in (listing or {}).get("items") or [] if self._ours(o)]
        items.sort(key=lambda o: (o["metadata"].get("creationTimestamp") or "", o["metadata"]["name"]), reverse=True)
        return items

    @staticmethod
    def _request(obj: Mapping[str, Any]) -> JobCreate:
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        return JobCreate.model_validate_json(annotations.get(REQUEST_ANNOTATION) or "{}")

    @staticmethod
    def _files(obj: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            data = json.loads(annotations.get(FILES_ANNOTATION) or "{}")
            return dict(data.get("files") or {}), dict(data.get("names") or {})
        return {}, {}

    def _job(self, obj: Mapping[str, Any]) -> FineTuningJob:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        files, names = self._files(obj)
        return translate.openai_job(
            job_id=meta["labels"][JOB_ID_LABEL],
            created_at=_rfc3339_unix(meta.get("creationTimestamp")),
            request=self._request(obj),
            organization_id=(meta.get("annotations") or {}).get(ORGANIZATION_ANNOTATION, ""),
            status=obj.get("status") or {},
            suspend=bool(spec.get("suspend")),
            cancel=bool(spec.get("cancel")),
            files=files,
            names=names,
        )

    async def list_jobs(
        self, tenant: Tenant, *, after: Optional[str], limit: int, metadata: dict[str, str]
    ) -> ListPage:
        jobs = [self._job(o) for o in await self._list(tenant.namespace)]
        if metadata:
            jobs = [j for j in jobs if all((j.metadata or {}).get(k) == v for k, v in metadata.items())]
        return paginate(jobs, after, limit)

    async def get_job(self, tenant: Tenant, job_id: str) -> FineTuningJob:
        return self._job(await self._get(tenant, job_id))

    async def _patch_spec(self, tenant: Tenant, job_id: str, spec: dict[str, Any], what: str) -> FineTuningJob:
        patched = await self._call(
            f"patch finetunejobs in namespace {tenant.namespace} ({what})",
            self._custom().patch_namespaced_custom_object,
            GROUP,
            VERSION,
            tenant.namespace,
            PLURAL,
            job_id,
            {"spec": spec},
        )
        if patched is None:
            raise NotFound(f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
        return self._job(patched)

    async def cancel_job(self, tenant: Tenant, job_id: str) -> FineTuningJob:
        job = self._job(await self._get(tenant, job_id))
        if job.status in ("succeeded", "failed"):
            raise Conflict(f"job {job_id} already {job.status}; only a job that has not finished can be cancelled")
        if job.status == "cancelled":
            return job
        return await self._patch_spec(tenant, job_id, {"cancel": True}, "cancel")

    async def pause_job(self, tenant: Tenant, job_id: str) -> FineTuningJob:
        obj = await self._get(tenant, job_id)
        job = self._job(obj)
        if job.status in translate.TERMINAL:
            raise Conflict(f"job {job_id} already {job.status}; only a job that has not finished can be paused")
        if (obj.get("spec") or {}).get("suspend"):
            return job
        return await self._patch_spec(tenant, job_id, {"suspend": True}, "pause")

    async def resume_job(self, tenant: Tenant, job_id: str) -> FineTuningJob:
        obj = await self._get(tenant, job_id)
        job = self._job(obj)
        if not (obj.get("spec") or {}).get("suspend") or job.status in translate.TERMINAL:
            raise Conflict(f"job {job_id} is {job.status}, not paused; only a paused job can be resumed")
        return await self._patch_spec(tenant, job_id, {"suspend": False}, "resume")

    # ------------------------------------------------------------------------ events, checkpoints, models

    async def list_events(self, tenant: Tenant, job_id: str, *, after: Optional[str], limit: int) -> ListPage:
        obj = await self._get(tenant, job_id)
        uid = obj["metadata"].get("uid")
        listing = await self._call(
            f"list events in namespace {tenant.namespace}",
            self._core().list_namespaced_event,
            tenant.namespace,
            field_selector=f"involvedObject.uid={uid}",
        )
        job = self._job(obj)
        events: list[Event] = [
            Event(
                id=translate.stable_id("ftevent", job_id, "created"),
                created_at=job.created_at,
                message=f"Created fine-tuning job: {job_id}",
            )
        ]
        for ev in (listing or {}).get("items") or []:
            involved = ev.get("involvedObject") or {}
            if involved.get("uid") != uid:
                continue  # field selectors are a server feature: filter here too
            reason = str(ev.get("reason") or "")
            level = "warn" if ev.get("type") == "Warning" else "info"
            if level == "warn" and reason in FAILURE_REASONS:
                level = "error"
            when = (
                ev.get("eventTime")
                or ev.get("lastTimestamp")
                or ev.get("firstTimestamp")
                or (ev.get("metadata") or {}).get("creationTimestamp")
            )
            events.append(
                Event(
                    id=translate.stable_id(
                        "ftevent", job_id, (ev.get("metadata") or {}).get("uid") or ev["metadata"]["name"]
                    ),
                    created_at=_rfc3339_unix(when),
                    level=level,
                    message=str(ev.get("message") or reason),
                    data={"reason": reason, "count": ev.get("count") or 1},
                )
            )
        status = obj.get("status") or {}
        progress, metrics = status.get("progress") or {}, status.get("metrics") or {}
        if progress.get("step"):
            data = {
                "step": progress["step"],
                "total_steps": progress.get("totalSteps"),
                "train_loss": metrics.get("trainLoss"),
                "valid_loss": metrics.get("evalLoss"),
                "valid_mean_token_accuracy": metrics.get("tokenAccuracy"),
                "epoch": progress.get("epoch"),
            }
            data = {k: v for k, v in data.items() if v is not None}
            loss = f", training loss={metrics['trainLoss']:.4f}" if metrics.get("trainLoss") is not None else ""
            events.append(
                Event(
                    id=translate.stable_id("ftevent", job_id, "metrics", progress["step"]),
                    created_at=job.finished_at or int(time.time()),
                    type="metrics",
                    data=data,
                    message=f"Step {progress['step']}/{progress.get('totalSteps') or '?'}{loss}",
                )
            )
        # The end comes last, also after the operator's own event about it (posted a moment later).
        ended = max([job.finished_at or job.created_at] + [e.created_at for e in events if e.type != "metrics"])
        if job.status == "succeeded":
            events.append(
                Event(
                    id=translate.stable_id("ftevent", job_id, "succeeded"),
                    created_at=ended,
                    message="The job has successfully completed",
                )
            )
        elif job.status == "failed" and job.error is not None:
            events.append(
                Event(
                    id=translate.stable_id("ftevent", job_id, "failed"),
                    created_at=ended,
                    level="error",
                    message=f"Job failed: {job.error.message}",
                )
            )
        elif job.status == "cancelled":
            events.append(
                Event(id=translate.stable_id("ftevent", job_id, "cancelled"), created_at=ended, message="Job cancelled")
            )
        # Newest first; within one second the creation is the oldest and the end the newest.
        first = translate.stable_id("ftevent", job_id, "created")
        last = {translate.stable_id("ftevent", job_id, s) for s in ("succeeded", "failed", "cancelled")}
        rank = lambda e: 0 if e.id == first else 3 if e.id in last else 2 if e.type == "metrics" else 1
        events.sort(key=lambda e: (e.created_at, rank(e)), reverse=True)
        return paginate(events, after, limit)

    async def list_checkpoints(self, tenant: Tenant, job_id: str, *, after: Optional[str], limit: int) -> ListPage:
        obj = await self._get(tenant, job_id)
        request = self._request(obj)
        org = (obj["metadata"].get("annotations") or {}).get(ORGANIZATION_ANNOTATION, "")
        status = obj.get("status") or {}
        tuned = translate.fine_tuned_model(request.model, org, request.suffix, job_id)
        checkpoints = translate.openai_checkpoints(
            job_id, tuned, status.get("checkpoints") or [], status.get("metrics")
        )
        return paginate(checkpoints, after, limit)

    async def list_models(self, tenant: Tenant) -> list[Model]:
        models = []
        for obj in await self._list(tenant.namespace):
            job = self._job(obj)
            if job.status == "succeeded" and job.fine_tuned_model:
                models.append(
                    Model(
                        id=job.fine_tuned_model, created=job.finished_at or job.created_at, owned_by=job.organization_id
                    )
                )
        return models

    async def get_model(self, tenant: Tenant, model_id: str) -> Model:
        found = next((m for m in await self.list_models(tenant) if m.id == model_id), None)
        if found is None:
            raise NotFound(
                f"The model {model_id[:200]!r} does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        return found

    # ------------------------------------------------------------------------ webhooks

    async def start(self) -> None:
        if self.dispatcher is not None and self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="kubetune api webhooks")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        if self.dispatcher is not None:
            await self.dispatcher.aclose()

    async def _poll(self) -> None:
        while True:
            try:
                await self.poll_webhooks()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("webhook poll failed, trying again in %.0f s: %s", self.settings.webhook_poll_seconds, err)
            await asyncio.sleep(self.settings.webhook_poll_seconds)

    async def poll_webhooks(self) -> int:
        """One pass over the namespaces with a webhook: hand every finished job to the dispatcher.
        Returns how many deliveries started."""
        assert self.dispatcher is not None and self.webhooks is not None
        started = 0
        for config in self.webhooks():
            for obj in await self._list(config.namespace):
                # The operator's word, not the gateway's: a requested cancel reads `cancelled` at
                # once, but the job may still end Succeeded before the operator acts on it.
                if (obj.get("status") or {}).get("phase") not in ("Succeeded", "Failed", "Cancelled"):
                    continue
                job = self._job(obj)
                if job.status not in translate.TERMINAL:
                    continue
                try:
                    endpoint = endpoint_for(config, job.metadata)
                except WebhookError as err:
                    log.warning("job %s/%s: %s", config.namespace, job.id, err)
                    continue
                key = f"{config.namespace}/{obj['metadata']['name']}"
                if await self.dispatcher.observe(key, job.id, job.status, endpoint, job.finished_at) is not None:
                    started += 1
        return started


class AnnotationLedger:
    """The webhook ledger kept on the FineTuneJob: `openai.kubetune.io/webhook-<status>`."""

    def __init__(self, backend: KubeBackend) -> None:
        self.backend = backend

    @staticmethod
    def _annotation(event_type: str) -> str:
        status = next(s for s, t in EVENTS.items() if t == event_type)
        return WEBHOOK_ANNOTATION + status

    async def _object(self, key: str) -> Optional[dict[str, Any]]:
        namespace, name = key.split("/", 1)
        b = self.backend
        return await b._call(
            f"get finetunejobs in namespace {namespace}",
            b._custom().get_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
        )

    async def _write(self, key: str, event_type: str, state: str, resource_version: Optional[str]) -> None:
        namespace, name = key.split("/", 1)
        meta: dict[str, Any] = {"annotations": {self._annotation(event_type): state}}
        if resource_version:
            meta["resourceVersion"] = resource_version  # a precondition: 409 when someone wrote first
        b = self.backend
        await b._call(
            f"patch finetunejobs in namespace {namespace} (webhook ledger)",
            b._custom().patch_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"metadata": meta},
        )

    async def claim(self, key: str, event_type: str) -> bool:
        obj = await self._object(key)
        if obj is None:
            return False
        if self._annotation(event_type) in ((obj["metadata"].get("annotations")) or {}):
            return False
        try:
            await self._write(key, event_type, "pending", obj["metadata"].get("resourceVersion"))
        except Conflict:
            return False  # another replica wrote first; it sends (or the next poll looks again)
        return True

    async def record(self, key: str, event_type: str, state: LedgerState) -> None:
        await self._write(key, event_type, state, None)

    async def state(self, key: str, event_type: str) -> Optional[LedgerState]:
        obj = await self._object(key)
        return ((obj or {}).get("metadata", {}).get("annotations") or {}).get(self._annotation(event_type))
