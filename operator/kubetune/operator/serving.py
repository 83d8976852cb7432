"""Serving the result of a FineTuneJob (spec.serving, issue 20): the objects and how to read them.

Once a job has Succeeded and its adapter is known, the operator hands it to a serving engine:

* `kserve`: a KServe `LLMInferenceService` (serving.kserve.io/v1alpha1; the adapter as a LoRA
  adapter on the base model, fetched by KServe's storage initializer) when that CRD is installed,
  else an `InferenceService` (v1beta1, HuggingFace runtime: base and adapter through
  `predictor.storageUris`, the vLLM LoRA flags as the model container's args). API discovery says
  which (`kserve_kind`); neither → the Serving condition says to install KServe.
* `vllm`: a Deployment running `vllm serve` and a Service on port 8000. An init container from
  the trainer image (`python -m kubetune.trainer fetch`) copies the adapter (or merged model) from
  object storage into an emptyDir, verified against its manifest, with the job's output
  credentials: vLLM loads adapters from local paths only (../SERVING.md). A base model vLLM cannot
  pull itself (s3://, gs://, pvc://: anything but hf://) is fetched by a second init container.
* `vllmEndpoint`: no object; the adapter is registered with a running vLLM server through
  POST /v1/load_lora_adapter (`register_adapter`).

Adaptations engines cannot load as LoRA adapters (DoRA, IA3, full and partial fine-tunes) are
served as a merged full model from `status.adapter.mergedUri` (`spec.serves_full_model`: DoRA, IA3, full weights, or output.format merged).

Everything here but `register_adapter` is pure: builders take the parsed FineTuneJob, its status
and the settings and return plain dicts, and readiness is parsed from an object's own status, so
golden YAML tests pin every field and validate it against KServe's and Kubernetes' schemas.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kubetune.api.enums import ServingEngine
from kubetune.api.pod import CREDENTIAL_KEYS
from kubetune.api.resource import FineTuneJob
from kubetune.api.spec import serves_full_model
from kubetune.operator import builders, names
from kubetune.operator.settings import OperatorSettings

GROUP = "serving.kserve.io"
LLMISVC = ("v1alpha1", "llminferenceservices", "LLMInferenceService")
ISVC = ("v1beta1", "inferenceservices", "InferenceService")
KSERVE_KINDS = (LLMISVC, ISVC)
"""In the order the operator prefers them: the LLM-specific kind first."""
ENDPOINT_KIND = "VLLMEndpoint"
"""status.serving.kind of a registration with a running server (there is no object)."""
ROLE = "serve"
VLLM_PORT = 8000
MODEL_ROOT = "/models"
ISVC_ROOT = "/mnt/models"  # KServe's storage initializer default; paths must share a parent
ISVC_OPENAI_PATH = "/openai/v1"  # KServe's HuggingFace runtime serves OpenAI's API under /openai
VLLM_CACHE_LIMIT = "1Gi"
FETCH_CONTAINER = "fetch"
FETCH_BASE_CONTAINER = "fetch-base"
VLLM_CONTAINER = "vllm"
LLMISVC_CONTAINER = "main"  # the container name LLMInferenceService's template merges into
CRD_MISSING = (
    "spec.serving.engine is kserve, but neither KServe CRD is installed (llminferenceservices or "
    "inferenceservices in serving.kserve.io): install KServe, or use engine: vllm"
)


class ServingError(ValueError):
    """The FineTuneJob cannot be served as its spec asks: the message names the field and what to do."""


# ------------------------------------------------------------------------------------ what to serve


def model_name(ftj: FineTuneJob) -> str:
    """The name clients put in requests: spec.serving.modelName, else the adapter's name."""
    serving = ftj.spec.serving
    if serving is not None and serving.model_name:
        return serving.model_name
    suffix = ftj.spec.suffix
    return f"{ftj.metadata.name}-{suffix}" if suffix else ftj.metadata.name


def object_name(ftj: FineTuneJob) -> str:
    """The serving object's (and Service's) name: deterministic, a DNS-1035 label (O1)."""
    return names.child_name(ftj.metadata.name, ROLE)


def merged(ftj: FineTuneJob) -> bool:
    return serves_full_model(ftj.spec)


def artifact_uri(ftj: FineTuneJob, status: Mapping[str, Any]) -> str:
    """What is served on top of (or instead of) the base: the adapter, or the merged model."""
    adapter = status.get("adapter") or {}
    key = "mergedUri" if merged(ftj) else "uri"
    uri = adapter.get(key)
    if not isinstance(uri, str) or not uri:
        what = (
            "status.adapter.mergedUri (the merged model the trainer writes for serving)"
            if merged(ftj)
            else "status.adapter.uri"
        )
        raise ServingError(
            f"the job succeeded without {what}; nothing to serve. Check the trainer's logs, or drop spec.serving"
        )
    return uri


def kserve_uri(uri: str, field: str) -> str:
    """A model location as KServe's storage initializer reads it: hf://org/name@rev → hf://org/name:rev."""
    parts = urlsplit(uri)
    if parts.scheme == "hf":
        repo, _, rev = uri[len("hf://") :].partition("@")
        return f"hf://{repo}:{rev}" if rev else f"hf://{repo}"
    if parts.scheme == "gcs":
        return "gs://" + uri[len("gcs://") :]
    if parts.scheme in ("s3", "gs", "pvc", "http", "https"):
        return uri
    fix = (
        "set spec.output.uri to object storage (s3://, gs://) or a PVC (pvc://)"
        if field.startswith("status.adapter")
        else "set spec.serving.kserve.baseModelUri to where the serving pods can read the base model"
    )
    raise ServingError(
        f"{field} is {uri!r}, which KServe cannot fetch (it reads hf://, s3://, gs:// and pvc://): {fix}"
    )


def base_uri(ftj: FineTuneJob) -> str:
    block = ftj.spec.serving.kserve if ftj.spec.serving is not None else None
    if block is not None and block.base_model_uri:
        return kserve_uri(block.base_model_uri, "spec.serving.kserve.baseModelUri")
    return kserve_uri(ftj.spec.model.source, "spec.model.source")


def _metadata(ftj: FineTuneJob, uid: str, name: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ftj.metadata.namespace, "labels": builders.labels(ftj, ROLE)}
    if ftj.spec.serving is None or not ftj.spec.serving.retain:
        meta["ownerReferences"] = [builders.owner_reference(ftj, uid)]
    return {k: v for k, v in meta.items() if v is not None}


def _gpus(gpus: int, ftj: FineTuneJob) -> dict[str, Any]:
    resource = ftj.spec.resources.gpu_resource
    return {"requests": {resource: str(gpus)}, "limits": {resource: str(gpus)}} if gpus else {}


# ------------------------------------------------------------------------------------ KServe


def kserve_kind(discovered: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """The KServe kind to create from discovery: {"v1alpha1": APIResourceList or None, "v1beta1": …}."""
    for version, plural, _kind in KSERVE_KINDS:
        listing = discovered.get(version) or {}
        if any(isinstance(r, Mapping) and r.get("name") == plural for r in listing.get("resources") or []):
            return next(k for k in KSERVE_KINDS if k[0] == version)
    return None


def llm_inference_service(ftj: FineTuneJob, uid: str, status: Mapping[str, Any]) -> dict[str, Any]:
    """An LLMInferenceService: the base model with the adapter as a LoRA adapter, or the merged model."""
    block = ftj.spec.serving.kserve if ftj.spec.serving is not None and ftj.spec.serving.kserve else None
    gpus, replicas = (block.gpus, block.replicas) if block else (1, 1)
    name = model_name(ftj)
    uri = artifact_uri(ftj, status)
    if merged(ftj):
        model: dict[str, Any] = {"uri": kserve_uri(uri, "status.adapter.mergedUri"), "name": name}
    else:
        model = {
            "uri": base_uri(ftj),
            "name": _base_name(ftj),
            "lora": {"adapters": [{"name": name, "uri": kserve_uri(uri, "status.adapter.uri")}]},
        }
        rank = adapter_rank(ftj)
        if rank and rank > 16:  # vLLM's default --max-lora-rank is 16
            model["lora"]["maxRank"] = rank
    spec: dict[str, Any] = {"model": model, "replicas": replicas}
    resources = _gpus(gpus, ftj)
    if resources:
        spec["template"] = {"containers": [{"name": LLMISVC_CONTAINER, "resources": resources}]}
    return {
        "apiVersion": f"{GROUP}/{LLMISVC[0]}",
        "kind": LLMISVC[2],
        "metadata": _metadata(ftj, uid, object_name(ftj)),
        "spec": spec,
    }


def _base_name(ftj: FineTuneJob) -> str:
    """The base model's served name: its repository id (org/name), else the last path segment."""
    source = ftj.spec.model.source
    if source.startswith("hf://"):
        return source[len("hf://") :].partition("@")[0]
    return source.rstrip("/").rsplit("/", 1)[-1] or "base"


def inference_service(ftj: FineTuneJob, uid: str, status: Mapping[str, Any]) -> dict[str, Any]:
    """An InferenceService on KServe's HuggingFace runtime (vLLM backend). Base and adapter come
    through `predictor.storageUris` under one parent (KServe requires a common parent), and the
    LoRA flags go in the model container's args, which the runtime passes on to vLLM."""
    block = ftj.spec.serving.kserve if ftj.spec.serving is not None and ftj.spec.serving.kserve else None
    gpus, replicas = (block.gpus, block.replicas) if block else (1, 1)
    name = model_name(ftj)
    uri = artifact_uri(ftj, status)
    model: dict[str, Any] = {"modelFormat": {"name": "huggingface"}}
    predictor: dict[str, Any] = {"minReplicas": replicas, "maxReplicas": max(replicas, 1), "model": model}
    if merged(ftj):
        model["storageUri"] = kserve_uri(uri, "status.adapter.mergedUri")
        model["args"] = [f"--model_name={name}"]
    else:
        base_dir, lora_dir = f"{ISVC_ROOT}/base", f"{ISVC_ROOT}/lora/{name}"
        predictor["storageUris"] = [
            {"uri": base_uri(ftj), "mountPath": base_dir},
            {"uri": kserve_uri(uri, "status.adapter.uri"), "mountPath": lora_dir},
        ]
        model["args"] = [
            f"--model_name={_base_name(ftj)}",
            f"--model_dir={base_dir}",
            "--enable-lora",
            "--lora-modules",
            f"{name}={lora_dir}",
        ]
        rank = adapter_rank(ftj)
        if rank:
            model["args"] += ["--max-lora-rank", str(rank)]
    resources = _gpus(gpus, ftj)
    if resources:
        model["resources"] = resources
    return {
        "apiVersion": f"{GROUP}/{ISVC[0]}",
        "kind": ISVC[2],
        "metadata": _metadata(ftj, uid, object_name(ftj)),
        "spec": {"predictor": predictor},
    }


# ------------------------------------------------------------------------------------ vLLM

FETCH_COMMAND = ["python", "-m", "kubetune.trainer", "fetch"]
"""The init containers' command (trainer image): a committed result, verified against its manifest
(sha256 and size of every file), or a base model, copied into the emptyDir (kubetune.trainer.fetch)."""
BASE_DIR = f"{MODEL_ROOT}/base"
"""Where a base model that vLLM cannot pull itself (not hf://) is fetched to."""


def _fetch_env(ftj: FineTuneJob) -> list[dict[str, Any]]:
    """The job's output credentials, as the trainer pods get them: optional secretKeyRefs only."""
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "KUBETUNE_PVC_ROOT", "value": builders.PVC_ROOT},
    ]
    secret = ftj.spec.output.credentials_secret
    if secret:
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
            for key in CREDENTIAL_KEYS
        ]
    return env


def vllm_command(ftj: FineTuneJob) -> list[str]:
    """`vllm serve` with the LoRA module (or the merged model under the served name)."""
    block = ftj.spec.serving.vllm if ftj.spec.serving is not None else None
    name = model_name(ftj)
    local = f"{MODEL_ROOT}/{name}"
    if merged(ftj):
        args = ["vllm", "serve", local, "--served-model-name", name]
    else:
        source = ftj.spec.model.source
        if source.startswith("hf://"):  # vLLM pulls it from the hub itself (HF_TOKEN from the Secret)
            repo, _, rev = source[len("hf://") :].partition("@")
            args = ["vllm", "serve", repo, *(["--revision", rev] if rev else [])]
        else:  # fetched into the emptyDir by an init container (base_fetch_source)
            base_fetch_source(ftj)
            args = ["vllm", "serve", BASE_DIR, "--served-model-name", _base_name(ftj)]
        args += ["--enable-lora", "--lora-modules", f"{name}={local}"]
        rank = block.max_lora_rank if block is not None and block.max_lora_rank else adapter_rank(ftj)
        if rank:
            args += ["--max-lora-rank", str(rank)]
    args += ["--host", "0.0.0.0", "--port", str(VLLM_PORT)]
    return args + (list(block.args) if block is not None else [])


def _fetch_source(uri: str) -> tuple[str, str | None]:
    """(what the init container fetches, the PVC to mount read-only for it, if any)."""
    parts = urlsplit(uri)
    if parts.scheme == "pvc":
        return uri, parts.netloc
    if parts.scheme in ("", "file", "local"):
        raise ServingError(
            f"the result is at {uri!r}, on the trainer's local disk, which a serving pod cannot read: "
            "set spec.output.uri to object storage (s3://, gs://) or a PVC (pvc://)"
        )
    return uri, None


def base_fetch_source(ftj: FineTuneJob) -> tuple[str, str | None] | None:
    """(the base model an init container fetches, its PVC), or None when vLLM reads the base
    itself (hf://) or serves a merged model; ServingError for a base no serving pod can read."""
    if merged(ftj):
        return None
    source = ftj.spec.model.source
    scheme = urlsplit(source).scheme.lower() if "://" in source else ""
    if scheme == "hf":
        return None
    if scheme == "builtin":
        raise ServingError(
            f"spec.model.source is {source!r}, a toy model built into the trainer for tests, which "
            "vLLM does not serve: train on a real base (hf://, s3://, gs:// or pvc://) or drop spec.serving"
        )
    if scheme in ("", "file", "local"):
        raise ServingError(
            f"spec.model.source is {source!r}, a path on the trainer's disk, which a serving pod cannot "
            "read: put the base model in object storage (s3://, gs://) or a PVC (pvc://, or hf://)"
        )
    if f"{MODEL_ROOT}/{model_name(ftj)}" == BASE_DIR:
        raise ServingError(
            f"the served name {model_name(ftj)!r} is the directory the base model is fetched to: set "
            "spec.serving.modelName to another name"
        )
    return source, (urlsplit(source).netloc if scheme == "pvc" else None)


def adapter_rank(ftj: FineTuneJob) -> int | None:
    """The LoRA rank r of the adapter (vLLM refuses adapters above --max-lora-rank, default 16)."""
    method = ftj.spec.method
    block = method.lora or method.qlora
    return getattr(block, "r", None) or (getattr(getattr(block, "lora", None), "r", None))


def vllm_deployment(
    ftj: FineTuneJob, uid: str, status: Mapping[str, Any], settings: OperatorSettings
) -> dict[str, Any]:
    """A Deployment of `vllm serve`: restricted Pod Security like the trainer pods, no API token,
    the adapter (or merged model) fetched into an emptyDir by an init container first."""
    block = ftj.spec.serving.vllm if ftj.spec.serving is not None else None
    gpus, replicas = (block.gpus, block.replicas) if block else (1, 1)
    name = object_name(ftj)
    local = f"{MODEL_ROOT}/{model_name(ftj)}"
    selector = names.role_selector(ftj.metadata.name, ROLE)
    mounts = [
        {"name": "models", "mountPath": MODEL_ROOT},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": "/cache"},
    ]
    source, claim = _fetch_source(artifact_uri(ftj, status))
    claims = {claim: "output"} if claim else {}

    def fetch_container(name: str, args: list[str], claim: str | None) -> dict[str, Any]:
        if claim:
            claims.setdefault(claim, "model")
        pvc = [{"name": claims[claim], "mountPath": f"{builders.PVC_ROOT}/{claim}", "readOnly": True}] if claim else []
        return {
            "name": name,
            "image": ftj.spec.image or settings.trainer_image,
            "imagePullPolicy": settings.image_pull_policy,
            "command": [*FETCH_COMMAND, *args],
            "env": _fetch_env(ftj),
            "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "2Gi"}},
            "volumeMounts": [*copy.deepcopy(mounts), *pvc],
            "securityContext": builders.container_security(),
        }

    init = [fetch_container(FETCH_CONTAINER, ["--uri", source, "--dest", local], claim)]
    if (base := base_fetch_source(ftj)) is not None:
        trust = ["--trust-remote-code"] if ftj.spec.model.trust_remote_code else []
        init.append(fetch_container(FETCH_BASE_CONTAINER, ["--model", base[0], "--dest", BASE_DIR, *trust], base[1]))
    resources: dict[str, Any] = {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "16Gi"}}
    for key, value in _gpus(gpus, ftj).items():
        resources[key] |= value
    server = {
        "name": VLLM_CONTAINER,
        "image": (block.image if block is not None and block.image else None) or settings.serving_vllm_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": vllm_command(ftj),
        "env": [
            {"name": "HOME", "value": "/tmp"},
            {"name": "HF_HOME", "value": "/cache/huggingface"},
            {"name": "VLLM_CACHE_ROOT", "value": "/cache/vllm"},
            *[e for e in _fetch_env(ftj) if e["name"] == "HF_TOKEN"],
        ],
        "ports": [{"name": "http", "containerPort": VLLM_PORT, "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": VLLM_PORT},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "resources": resources,
        "volumeMounts": [*copy.deepcopy(mounts), {"name": "dshm", "mountPath": "/dev/shm"}],
        "securityContext": builders.container_security(),
    }
    pod: dict[str, Any] = {
        "serviceAccountName": settings.trainer_service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": builders.pod_security(),
        "initContainers": init,
        "containers": [server],
        "volumes": [
            {"name": "models", "emptyDir": {"sizeLimit": settings.cache_size_limit}},
            {"name": "tmp", "emptyDir": {"sizeLimit": settings.tmp_size_limit}},
            {"name": "cache", "emptyDir": {"sizeLimit": settings.hf_cache_size_limit}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shared_memory_default}},
        ],
    }
    for claim_name, volume in claims.items():
        pod["volumes"].append({"name": volume, "persistentVolumeClaim": {"claimName": claim_name, "readOnly": True}})
    builders._place(pod, ftj)
    pod.pop("schedulerName", None)  # a gang scheduler's PodGroup is the trainer's, not the server's
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(ftj, uid, name),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": pod_labels(ftj)}, "spec": pod},
        },
    }


def pod_labels(ftj: FineTuneJob) -> dict[str, str]:
    """The vLLM pods' labels: the children's, less managed-by. Those pods are the Deployment
    controller's, and the managed-by label selects trainer pods: the operator's pod cache and the
    chart's trainer NetworkPolicy (which admits only the metrics port) would take them in."""
    return {k: v for k, v in builders.labels(ftj, ROLE).items() if k != names.MANAGED_BY_LABEL}


def vllm_service(ftj: FineTuneJob, uid: str) -> dict[str, Any]:
    selector = names.role_selector(ftj.metadata.name, ROLE)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ftj, uid, object_name(ftj)),
        "spec": {
            "selector": selector,
            "ports": [{"name": "http", "port": VLLM_PORT, "targetPort": VLLM_PORT, "protocol": "TCP"}],
        },
    }


def service_url(ftj: FineTuneJob) -> str:
    return f"http://{object_name(ftj)}.{ftj.metadata.namespace or 'default'}.svc:{VLLM_PORT}/v1"


# ------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class Plan:
    """The objects to create for a job and how status.serving names them."""

    kind: str
    name: str
    objects: tuple[dict[str, Any], ...]


def plan(
    ftj: FineTuneJob,
    uid: str,
    status: Mapping[str, Any],
    settings: OperatorSettings,
    kserve: tuple[str, str, str] | None = None,
) -> Plan:
    """The serving objects of `ftj` (engine kserve needs the discovered kind; raises ServingError)."""
    serving = ftj.spec.serving
    assert serving is not None
    if serving.engine == ServingEngine.KSERVE:
        if kserve is None:
            raise ServingError(CRD_MISSING)
        obj = llm_inference_service(ftj, uid, status) if kserve == LLMISVC else inference_service(ftj, uid, status)
        return Plan(obj["kind"], obj["metadata"]["name"], (obj,))
    if serving.engine == ServingEngine.VLLM:
        deployment = vllm_deployment(ftj, uid, status, settings)
        return Plan("Deployment", deployment["metadata"]["name"], (deployment, vllm_service(ftj, uid)))
    raise ValueError(f"engine {serving.engine} creates no object")


def initial_status(ftj: FineTuneJob, kind: str | None, name: str | None = None) -> dict[str, Any]:
    """status.serving before the object said anything."""
    serving = ftj.spec.serving
    assert serving is not None
    out: dict[str, Any] = {
        "engine": serving.engine.value,
        "model": model_name(ftj),
        "merged": merged(ftj),
        "ready": False,
    }
    if kind:
        out["kind"] = kind
    if name:
        out["name"] = name
    if serving.engine == ServingEngine.VLLM:
        out["url"] = service_url(ftj)
    elif serving.engine == ServingEngine.VLLM_ENDPOINT and serving.vllm_endpoint is not None:
        out["url"] = serving.vllm_endpoint.url.rstrip("/") + "/v1"
    return out


# ------------------------------------------------------------------------------------ readiness


def _condition(obj: Mapping[str, Any], ctype: str) -> Mapping[str, Any] | None:
    conds = ((obj.get("status") or {}).get("conditions")) or []
    return next((c for c in conds if isinstance(c, Mapping) and c.get("type") == ctype), None)


def readiness(obj: Mapping[str, Any] | None) -> tuple[bool, str | None]:
    """(ready, why not) from a serving object's own status: a KServe object's Ready condition, a
    Deployment's available replicas and Available condition."""
    if not obj:
        return False, "the serving object is gone; it is created again"
    kind = obj.get("kind")
    status = obj.get("status") or {}
    if kind == "Deployment":
        replicas = (obj.get("spec") or {}).get("replicas")
        want = int(replicas) if replicas is not None else 1
        have = int(status.get("availableReplicas") or 0)
        available = _condition(obj, "Available")
        if want == 0:
            return False, "spec.serving.vllm.replicas is 0: no server runs"
        if have >= want and (available is None or available.get("status") == "True"):
            return True, None
        progressing = _condition(obj, "Progressing")
        detail = next(
            (
                str(c.get("message"))
                for c in (available, progressing)
                if c is not None and c.get("status") != "True" and c.get("message")
            ),
            "",
        )
        return False, f"{have} of {want} vLLM replicas available" + (f": {detail}" if detail else "")
    ready = _condition(obj, "Ready")
    if ready is not None and ready.get("status") == "True":
        return True, None
    if ready is not None and (ready.get("message") or ready.get("reason")):
        return False, str(ready.get("message") or ready.get("reason"))
    failing = next(
        (
            c
            for c in (status.get("conditions") or [])
            if isinstance(c, Mapping) and c.get("status") == "False" and c.get("message")
        ),
        None,
    )
    if failing is not None:
        return False, f"{failing.get('type')}: {failing.get('message')}"
    return False, f"{kind} {(obj.get('metadata') or {}).get('name')} is not Ready yet"


def url_of(obj: Mapping[str, Any] | None) -> str | None:
    """The OpenAI-compatible base URL a KServe object reports (None until it has one)."""
    url = ((obj or {}).get("status") or {}).get("url")
    if not isinstance(url, str) or not url:
        return None
    suffix = ISVC_OPENAI_PATH if (obj or {}).get("kind") == ISVC[2] else "/v1"
    return url.rstrip("/") + suffix


# ------------------------------------------------------------------------------------ vllmEndpoint


class EndpointUnreachable(Exception):
    """No answer, or a 5xx, from the vLLM server: worth retrying."""


def load_request(ftj: FineTuneJob, status: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    """(URL, JSON body) of the load_lora_adapter request."""
    block = ftj.spec.serving.vllm_endpoint if ftj.spec.serving is not None else None
    assert block is not None
    path = block.adapter_path or artifact_uri(ftj, status)
    return block.url.rstrip("/") + "/v1/load_lora_adapter", {"lora_name": model_name(ftj), "lora_path": path}


def load_outcome(status_code: int, text: str) -> tuple[bool, str | None]:
    """(registered, why not) from vLLM's answer: 200, or a 400 saying it is already loaded, is success."""
    message = text.strip()
    try:
        body = json.loads(text)
        if isinstance(body, Mapping):
            error = body.get("error")
            inner = error if isinstance(error, Mapping) else body
            message = str(inner.get("message") or inner.get("detail") or message)
    except ValueError:
        pass
    if status_code == 200 or "already been loaded" in message or "already loaded" in message:
        return True, None
    if status_code in (401, 403):
        return False, (
            f"the vLLM server refused the adapter registration (HTTP {status_code}: {message[:300]}): set "
            "spec.serving.vllmEndpoint.apiKeySecret to a Secret whose key api-key holds the server's --api-key"
        )
    if status_code == 404:
        return False, (
            "the vLLM server has no /v1/load_lora_adapter (HTTP 404): start it with --enable-lora and "
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or check spec.serving.vllmEndpoint.url"
        )
    return False, (
        f"the vLLM server refused the adapter (HTTP {status_code}): {message[:1000]}. Check "
        "spec.serving.vllmEndpoint.adapterPath (a path or URI the server can read)"
    )


async def register_adapter(
    url: str, body: Mapping[str, str], api_key: str | None, timeout: float = 30.0
) -> tuple[bool, str | None]:
    """POST load_lora_adapter; raises EndpointUnreachable for no answer or a 5xx (retried)."""
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.post(url, json=dict(body), headers=headers) as resp:
                text = await resp.text()
                if resp.status >= 500:
                    raise EndpointUnreachable(f"HTTP {resp.status} from {url}: {text[:300]}")
                return load_outcome(resp.status, text)
    except (aiohttp.ClientError, OSError, TimeoutError) as err:
        raise EndpointUnreachable(f"no answer from {url}: {type(err).__name__}: {err}") from None
