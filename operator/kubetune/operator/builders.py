"""The children of a FineTuneJob (Jobs, headless Service, Volcano PodGroup) as pure functions.

Each builder takes the parsed `FineTuneJob`, the owner's uid and the `OperatorSettings` and
returns a plain dict ready to POST; nothing here calls the API, reads the environment or the
clock, so the same input always renders the same object and golden YAML tests pin every field.

Decisions that shape the objects (RELIABILITY.md, "Pods and RBAC the chart ships"):

* The spec reaches the trainer as compact JSON in an immutable ConfigMap `<name>-spec-<digest>`
  (`spec_configmap`), mounted at `/etc/kubetune/spec.json` (a pod has no stdin, and the trainer
  CLI reads a file). It is named after the digest of the spec's frozen part (`kubetune.api.crd.
  spec_digest`), which the pod template carries as `kubetune.io/spec-sha256`: the file can never
  drift, a Job recreated later reads the very spec the job started with, and a spec larger than
  the 256 KiB annotations allow still runs.
* Credentials enter only as `env[].valueFrom.secretKeyRef` (optional keys, never `envFrom`):
  the operator never reads Secrets and no value is ever written into an object it creates.
* Child names are deterministic (`kubetune.operator.names.child_name`) so a restarted operator
  finds, not duplicates, what it created.
* Queueing: `scheduling.queueName` is a Kueue LocalQueue (label + Job created suspended). With
  `schedulerName: volcano` as well, Kueue wins and the PodGroup uses Volcano's default queue;
  only with `settings.kueue` off does queueName become the PodGroup's Volcano queue.
"""

from __future__ import annotations

import copy
import json
from typing import Any
from urllib.parse import urlsplit

from kubetune.api import crd
from kubetune.api.contract import (
    CREDENTIALS_SECRET_ENV,
    DEFAULT_TERMINATION_PATH,
    JUDGE_API_KEY_ENV,
    METRICS_PORT_ENV,
    PERMANENT_EXIT_CODE,
    TERMINATION_PATH_ENV,
)
from kubetune.api.estimate import estimate_job
from kubetune.api.pod import CREDENTIAL_KEYS, PodOverrides
from kubetune.api.resource import API_VERSION, KIND, FineTuneJob
from kubetune.operator.names import (
    COMPLETION_INDEX,
    CONTAINER,
    GPU_PRODUCT_LABEL,
    HASH_LEN,
    JOB_NAME_LABEL,
    KUEUE_PRIORITY_LABEL,
    KUEUE_QUEUE_LABEL,
    SPEC_DIGEST_ANNOTATION,
    SPEC_KEY,
    TRAIN,
    VALIDATE,
    VOLCANO_GROUP_ANNOTATION,
    child_labels,
    child_name,
    trainer_job_name,
    validation_job_name,
)
from kubetune.operator.settings import OperatorSettings

VALIDATION_TTL_SECONDS = 3600
SPEC_DIR = "/etc/kubetune"
SPEC_FILE = f"{SPEC_DIR}/{SPEC_KEY}"
RENDEZVOUS_PORT = 29500
UID = 1000
PVC_ROOT = "/mnt/pvc"

# CREDENTIAL_KEYS (kubetune.api.pod): keys a credentials Secret may hold; each becomes an optional
# secretKeyRef, so any subset works. The API keeps the list: podOverrides.env may not set them twice.

# ------------------------------------------------------------------------------------ names
# Names, labels and annotations live in kubetune.operator.names, shared with reconcile.


def labels(ftj: FineTuneJob, role: str) -> dict[str, str]:
    """Standard labels of every child; `role` is train, validate, spec or serving."""
    return child_labels(ftj.metadata.name, role)


def owner_reference(ftj: FineTuneJob, uid: str) -> dict[str, Any]:
    """Controller reference to the FineTuneJob: deleting it deletes the child (O7)."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": ftj.metadata.name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(ftj: FineTuneJob, uid: str, name: str, role: str) -> dict[str, Any]:
    meta = {
        "name": name,
        "namespace": ftj.metadata.namespace,
        "labels": labels(ftj, role),
        "ownerReferences": [owner_reference(ftj, uid)],
    }
    return {k: v for k, v in meta.items() if v is not None}


# ----------------------------------------------------------------------------- pod pieces


def spec_json(ftj: FineTuneJob, uid: str) -> str:
    """The FineTuneJob the trainer reads: identity plus the full spec, compact JSON."""
    meta = {"name": ftj.metadata.name, "namespace": ftj.metadata.namespace, "uid": uid}
    doc = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {k: v for k, v in meta.items() if v is not None},
        "spec": ftj.spec.wire(),
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


def spec_digest(ftj: FineTuneJob) -> str:
    return crd.spec_digest(ftj.spec.wire())


def spec_configmap_name(ftj: FineTuneJob) -> str:
    """`<name>-spec-<8 hex of the digest>`: one ConfigMap per frozen spec."""
    return child_name(ftj.metadata.name, f"spec-{spec_digest(ftj)[:HASH_LEN]}")


def spec_configmap(ftj: FineTuneJob, uid: str) -> dict[str, Any]:
    """The immutable ConfigMap the trainer and validation pods read their FineTuneJob from."""
    meta = _metadata(ftj, uid, spec_configmap_name(ftj), "spec")
    meta["annotations"] = {SPEC_DIGEST_ANNOTATION: spec_digest(ftj)}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "immutable": True,
        "data": {SPEC_KEY: spec_json(ftj, uid)},
    }


def _default_memory_gib(ftj: FineTuneJob) -> int:
    # From the model's and teachers' sizes, the method, batch and sequence length
    # (kubetune.api.estimate.estimate_job: a bf16 copy per process while loading on GPU nodes,
    # the whole fp32 run on CPU-only ones, never under 2 GiB).
    return estimate_job(ftj.spec).host_memory_gib


def pod_resources(ftj: FineTuneJob) -> dict[str, Any]:
    """Requests/limits of a trainer pod; unset cpu/memory are chosen here (status.effective).
    CPU: 4 per GPU (data loading, tokenisation, NCCL), 1 for a CPU-only job, which then fits a
    small node; set spec.resources.cpu to give it more."""
    res = ftj.spec.resources
    cpu = str(res.cpu) if res.cpu is not None else str(4 * res.gpus if res.gpus else 1)
    memory = str(res.memory) if res.memory is not None else f"{_default_memory_gib(ftj)}Gi"
    # No CPU limit: CFS throttling stalls data loaders and NCCL; memory limit = request (no OOM
    # surprises from overcommit on shared GPU nodes).
    out: dict[str, Any] = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}}
    if res.gpus:
        out["requests"][res.gpu_resource] = str(res.gpus)
        out["limits"][res.gpu_resource] = str(res.gpus)
    return out


def shared_memory(ftj: FineTuneJob, settings: OperatorSettings) -> str | None:
    res = ftj.spec.resources
    if res.shared_memory is not None:
        return str(res.shared_memory)
    return settings.shared_memory_default if res.gpus > 0 else None


def _pvc_claims(value: Any) -> list[str]:
    """Claims named by pvc:// URIs anywhere in the spec (model, teacher, data, output)."""
    if isinstance(value, dict):
        return [c for v in value.values() for c in _pvc_claims(v)]
    if isinstance(value, list):
        return [c for v in value for c in _pvc_claims(v)]
    if isinstance(value, str) and value.startswith("pvc://"):
        return [urlsplit(value).netloc]
    return []


def _volumes(ftj: FineTuneJob, settings: OperatorSettings, role: str) -> tuple[list[dict], list[dict]]:
    """(volumes, volumeMounts): spec file, size-limited emptyDirs, /dev/shm and PVCs."""
    spec_source = {"name": spec_configmap_name(ftj), "items": [{"key": SPEC_KEY, "path": SPEC_KEY}]}
    volumes: list[dict] = [{"name": "spec", "configMap": spec_source}]
    mounts: list[dict] = [{"name": "spec", "mountPath": SPEC_DIR, "readOnly": True}]
    for name, path, limit in (
        ("tmp", "/tmp", settings.tmp_size_limit),
        ("scratch", "/scratch", settings.scratch_size_limit),
        ("hf-cache", "/cache/huggingface", settings.hf_cache_size_limit),
        ("kubetune-cache", "/cache/kubetune", settings.cache_size_limit),
    ):
        volumes.append({"name": name, "emptyDir": {"sizeLimit": limit}})
        mounts.append({"name": name, "mountPath": path})
    shm = shared_memory(ftj, settings) if role == TRAIN else None
    if shm:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    output_claim = _pvc_claims(ftj.spec.output.uri)
    # podOverrides is left out: a label or variable that reads "pvc://..." is not a data source.
    uris = {k: v for k, v in ftj.spec.wire().items() if k != "podOverrides"}
    for i, claim in enumerate(dict.fromkeys(_pvc_claims(uris))):
        read_only = role != TRAIN or claim not in output_claim
        volumes.append({"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}})
        mounts.append({"name": f"pvc-{i}", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": read_only})
    # The user's volumes come after kubetune's: names and paths cannot collide (the API refuses ours).
    extra = _overrides(ftj)
    volumes += [_k8s(v) for v in extra.volumes]
    mounts += [_k8s(m) for m in extra.volume_mounts]
    return volumes, mounts


def _overrides(ftj: FineTuneJob) -> PodOverrides:
    return ftj.spec.pod_overrides or PodOverrides()


def _k8s(model: Any) -> dict[str, Any]:
    """A podOverrides item as Kubernetes spells it, without the empty lists the models default to."""
    return model.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True, mode="json")


def _env(ftj: FineTuneJob, settings: OperatorSettings) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": TERMINATION_PATH_ENV, "value": DEFAULT_TERMINATION_PATH},
        {"name": METRICS_PORT_ENV, "value": str(settings.metrics_port)},
        {"name": "HOME", "value": "/tmp"},
        {"name": "TMPDIR", "value": "/scratch"},
        {"name": "HF_HOME", "value": "/cache/huggingface"},
        {"name": "KUBETUNE_CACHE", "value": "/cache/kubetune"},
        {"name": "KUBETUNE_PVC_ROOT", "value": PVC_ROOT},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if settings.allowed_output_prefix:
        env.append({"name": "KUBETUNE_ALLOWED_OUTPUT_PREFIX", "value": settings.allowed_output_prefix})
    secret = ftj.spec.output.credentials_secret
    if secret:
        env.append({"name": CREDENTIALS_SECRET_ENV, "value": secret})
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
            for key in CREDENTIAL_KEYS
        ]
    return env


def pod_security() -> dict[str, Any]:
    """The restricted Pod Security profile at pod level (a fresh dict: callers may mutate it)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "fsGroup": UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }


def _pod_template(
    ftj: FineTuneJob, uid: str, settings: OperatorSettings, role: str, container: dict[str, Any]
) -> dict[str, Any]:
    """A restricted-PSS pod running one trainer container, without an API token."""
    volumes, mounts = _volumes(ftj, settings, role)
    container = {
        "name": CONTAINER,
        "image": ftj.spec.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        **container,
        # After kubetune's variables, so a user's value may refer to them as $(NAME).
        "env": [*container.get("env", []), *(_k8s(e) for e in _overrides(ftj).env)],
        "volumeMounts": mounts,
        "securityContext": container_security(),
        "terminationMessagePath": DEFAULT_TERMINATION_PATH,
        "terminationMessagePolicy": "File",
    }
    pod = {
        "restartPolicy": "Never",
        "serviceAccountName": settings.trainer_service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": settings.termination_grace_period_seconds,
        "securityContext": pod_security(),
        "containers": [container],
        "volumes": volumes,
    }
    if settings.host_network:
        pod |= {"hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet"}
    # spec.podOverrides: the user's keys follow ours and never replace one (the API refuses them).
    extra = _overrides(ftj)
    if extra.service_account_name:
        pod["serviceAccountName"] = extra.service_account_name  # still without a token
    if extra.runtime_class_name:
        pod["runtimeClassName"] = extra.runtime_class_name
    if extra.image_pull_secrets:
        pod["imagePullSecrets"] = [_k8s(s) for s in extra.image_pull_secrets]
    ours = labels(ftj, role)
    annotations = {SPEC_DIGEST_ANNOTATION: spec_digest(ftj)}
    metadata = {
        "labels": ours | {k: v for k, v in extra.labels.items() if k not in ours},
        "annotations": annotations | {k: v for k, v in extra.annotations.items() if k not in annotations},
    }
    return {"metadata": metadata, "spec": pod}


def _job(ftj: FineTuneJob, uid: str, name: str, role: str, template: dict, **fields: Any) -> dict:
    """A Job around `template`; `fields` (backoffLimit, suspend, ...) lead its spec."""
    # The permanent exit code fails the Job at once; evictions and preemptions cost no retry.
    permanent = {"containerName": CONTAINER, "operator": "In", "values": [PERMANENT_EXIT_CODE]}
    disruption = [{"type": "DisruptionTarget", "status": "True"}]
    spec: dict[str, Any] = {
        **{k: v for k, v in fields.items() if v is not None},
        "podFailurePolicy": {
            "rules": [
                {"action": "FailJob", "onExitCodes": permanent},
                {"action": "Ignore", "onPodConditions": disruption},
            ]
        },
        "template": template,
    }
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _metadata(ftj, uid, name, role), "spec": spec}


# ---------------------------------------------------------------------------- scheduling


def uses_kueue(ftj: FineTuneJob, settings: OperatorSettings) -> bool:
    """queueName goes to Kueue unless Kueue is off and Volcano schedules the pods."""
    sched = ftj.spec.scheduling
    return bool(sched.queue_name) and (settings.kueue or not uses_volcano(ftj))


def uses_volcano(ftj: FineTuneJob) -> bool:
    return ftj.spec.scheduling.scheduler_name == "volcano"


def _place(pod: dict[str, Any], ftj: FineTuneJob) -> None:
    """Copy the placement fields of spec.scheduling (and gpuType) onto a GPU pod spec."""
    sched, res = ftj.spec.scheduling, ftj.spec.resources
    selector = dict(sched.node_selector)
    if res.gpu_type:
        selector[GPU_PRODUCT_LABEL] = res.gpu_type
    if selector:
        pod["nodeSelector"] = selector
    if sched.tolerations:
        pod["tolerations"] = [t.wire() for t in sched.tolerations]
    if sched.affinity:
        pod["affinity"] = copy.deepcopy(sched.affinity)
    if sched.priority_class_name:
        pod["priorityClassName"] = sched.priority_class_name
    if sched.scheduler_name:
        pod["schedulerName"] = sched.scheduler_name


# ------------------------------------------------------------------------------- builders


def _command(ftj: FineTuneJob) -> list[str]:
    res = ftj.spec.resources
    trainer = ["-m", "kubetune.trainer", "--spec", SPEC_FILE]
    if res.nodes > 1:
        # Elastic (c10d) rendezvous, not a static master/rank: when the Job controller replaces
        # one failed pod, the agents on the surviving pods see their workers fail (NCCL error
        # handling), restart them and rendezvous again with the newcomer, and every rank resumes
        # from the newest committed checkpoint. A static rendezvous would leave the survivors
        # waiting on the dead peer until the Job's deadline. $(VAR) is expanded by the kubelet.
        return [
            "torchrun",
            "--nnodes",
            "$(NNODES)",
            "--nproc-per-node",
            str(max(1, res.gpus)),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            "$(MASTER_ADDR):$(MASTER_PORT)",
            "--rdzv-id",
            "$(KUBETUNE_RDZV_ID)",
            "--max-restarts",
            str(ftj.spec.max_retries),
            *trainer,
        ]
    if res.gpus > 1:
        return ["torchrun", "--standalone", "--nproc-per-node", str(res.gpus), *trainer]
    return ["python", *trainer]


def _rendezvous_env(ftj: FineTuneJob, job_name: str) -> list[dict[str, Any]]:
    index = {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}}
    return [
        {"name": "NNODES", "value": str(ftj.spec.resources.nodes)},
        {"name": "NODE_RANK", "valueFrom": index},
        {"name": "MASTER_ADDR", "value": f"{job_name}-0.{job_name}"},
        {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        {"name": "KUBETUNE_RDZV_ID", "value": job_name},
        # a rank whose peer died fails its collective (and so restarts) instead of hanging
        {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"},
        # workers get a store of their own: the agent's rendezvous store is rebuilt when a peer
        # is replaced, and workers sharing it would wait forever for keys of the old round
        {"name": "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "value": "1"},
    ]


def trainer_job(ftj: FineTuneJob, uid: str, settings: OperatorSettings) -> dict[str, Any]:
    """The batch/v1 Job that trains: one pod, or an Indexed Job of `nodes` pods."""
    name = trainer_job_name(ftj.metadata.name)
    multi_node = ftj.spec.resources.nodes > 1
    ports = [{"name": "metrics", "containerPort": settings.metrics_port, "protocol": "TCP"}]
    env = _env(ftj, settings)
    judge = ftj.spec.evaluation.judge
    if judge is not None and judge.api_key_secret:
        # The LLM judge's API key (spec.evaluation.judge.apiKeySecret, key api-key): only the training pod needs it.
        env.append(
            {"name": JUDGE_API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": judge.api_key_secret, "key": "api-key"}}}
        )
    if multi_node:
        ports.append({"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"})
        env += _rendezvous_env(ftj, name)
    container = {"command": _command(ftj), "env": env, "ports": ports, "resources": pod_resources(ftj)}
    template = _pod_template(ftj, uid, settings, TRAIN, container)
    template["metadata"]["annotations"] |= {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(settings.metrics_port),
        "prometheus.io/path": "/metrics",
    }
    _place(template["spec"], ftj)
    if multi_node:
        template["spec"]["subdomain"] = name
    if uses_volcano(ftj):
        template["metadata"]["annotations"][VOLCANO_GROUP_ANNOTATION] = name
    kueue, nodes = uses_kueue(ftj, settings), ftj.spec.resources.nodes
    indexed = {"completionMode": "Indexed", "completions": nodes, "parallelism": nodes} if multi_node else {}
    job = _job(
        ftj,
        uid,
        name,
        TRAIN,
        template,
        suspend=kueue or ftj.spec.suspend,  # Kueue admits a Job by unsuspending it
        backoffLimit=ftj.spec.max_retries,
        activeDeadlineSeconds=ftj.spec.active_deadline_seconds,
        **indexed,
    )
    if kueue:
        sched = ftj.spec.scheduling
        job["metadata"]["labels"][KUEUE_QUEUE_LABEL] = sched.queue_name
        if sched.workload_priority_class_name:  # a WorkloadPriorityClass, not a PriorityClass
            job["metadata"]["labels"][KUEUE_PRIORITY_LABEL] = sched.workload_priority_class_name
    return job


def headless_service(ftj: FineTuneJob, uid: str, settings: OperatorSettings) -> dict[str, Any]:
    """DNS for the torchrun rendezvous: `<job>-<index>.<service>` resolves before readiness."""
    name = trainer_job_name(ftj.metadata.name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ftj, uid, name, TRAIN),
        "spec": {
            "clusterIP": "None",
            "selector": {JOB_NAME_LABEL: name},
            "ports": [
                {"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT, "protocol": "TCP"}
            ],
            "publishNotReadyAddresses": True,
        },
    }


def podgroup(ftj: FineTuneJob, uid: str, settings: OperatorSettings) -> dict[str, Any]:
    """A Volcano PodGroup that gang-schedules all `nodes` pods of the trainer Job."""
    res, sched = ftj.spec.resources, ftj.spec.scheduling
    spec: dict[str, Any] = {"minMember": res.nodes}
    if res.gpus:
        spec["minResources"] = {res.gpu_resource: str(res.gpus * res.nodes)}
    if sched.queue_name and not uses_kueue(ftj, settings):
        spec["queue"] = sched.queue_name
    if sched.priority_class_name:
        spec["priorityClassName"] = sched.priority_class_name
    return {
        "apiVersion": "scheduling.volcano.sh/v1beta1",
        "kind": "PodGroup",
        "metadata": _metadata(ftj, uid, trainer_job_name(ftj.metadata.name), TRAIN),
        "spec": spec,
    }


def validation_job(ftj: FineTuneJob, uid: str, settings: OperatorSettings) -> dict[str, Any]:
    """A CPU-only Job that checks the data with the trainer before any GPU is requested.

    It ignores spec.scheduling (queue, GPU node placement): those are for the GPU pods.
    """
    name = validation_job_name(ftj.metadata.name)
    cpu, memory = settings.validation_cpu, settings.validation_memory
    container = {
        "command": ["python", "-m", "kubetune.trainer", "--spec", SPEC_FILE, "--validate-only", "--metrics-port", "-1"],
        "env": _env(ftj, settings),
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}},
    }
    template = _pod_template(ftj, uid, settings, VALIDATE, container)
    # Cleaned up an hour after it finished (the FineTuneJob keeps the verdict in DataValidated).
    return _job(
        ftj,
        uid,
        name,
        VALIDATE,
        template,
        backoffLimit=0,
        activeDeadlineSeconds=settings.validation_deadline_seconds,
        ttlSecondsAfterFinished=VALIDATION_TTL_SECONDS,
    )
