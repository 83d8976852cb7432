"""The Helm chart's values, in one place: defaults, comments and JSON schema (`make chart-schema`).

`charts/kubetune/values.yaml` and `charts/kubetune/values.schema.json` are both generated from the
pydantic models below, so a key cannot be documented in one file, typed in the other and missing
from a third: the field's description becomes the comment above the key (every key has one), its
default becomes the value, and its type, enum and pattern become the schema. Every object of ours
refuses unknown keys (`additionalProperties: false`), so `--set image.tga=x` is an error instead of
a silently ignored typo. Pass-through Kubernetes objects (resources, affinity, tolerations, network
policy peers) are typed as plain objects: the API server validates those.

    .venv/bin/python hack/chart_schema.py           # rewrite both files
    .venv/bin/python hack/chart_schema.py --check   # exit 1 when either is stale (CI, tests)

The defaults and variable names of the operator settings are read from
`kubetune.operator.settings.OperatorSettings`, their one home; tests render the chart and check
that its Deployment sets exactly the settings' variables and that `OperatorSettings.from_env`
reads the chart's defaults back as the settings' own.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Literal

import yaml
from kubetune.operator.settings import OperatorSettings, env_name
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "kubetune"
VALUES = CHART / "values.yaml"
SCHEMA = CHART / "values.schema.json"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
DURATION = r"^([0-9]+(ms|s|m|h|d|w|y))+$"
REPOSITORY = r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)*$"
TAG = r"^([A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$"
DIGEST = r"^(sha256:[a-f0-9]{64})?$"
CIDR = r"^([0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}|[0-9a-fA-F:]+/[0-9]{1,3})$"
URI_PREFIX = r"^[a-z][a-z0-9+.-]*://[^,\s]+$"


def optional(pattern: str) -> str:
    """`pattern` (anchored with ^...$) or the empty string."""
    return f"^({pattern[1:-1]})?$"


OPERATOR = OperatorSettings()
"""The operator's settings are defined once, in `kubetune.operator.settings`: the defaults of the
values that become `KUBETUNE_*` variables come from there, and so do the variable names the
descriptions quote (`env`), so a renamed or removed setting cannot leave a stale value here."""


def env(field: str) -> str:
    """The variable of `OperatorSettings.<field>` (KeyError when there is no such setting)."""
    return env_name(field)


Port = int
PullPolicy = Literal["Always", "IfNotPresent", "Never"]


def port(description: str, default: int) -> Any:
    return Field(default, ge=1, le=65535, description=description)


class Values(BaseModel):
    """Base of every values object: camelCase keys, unknown keys refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


# ------------------------------------------------------------------------------- sections


class Image(Values):
    repository: str = Field(description="Image repository.", pattern=REPOSITORY)
    tag: str = Field(
        "", description="Image tag; empty uses the chart's appVersion. Ignored when `digest` is set.", pattern=TAG
    )
    digest: str = Field(
        "", description="Pin the image by digest (`sha256:` + 64 hex digits); wins over `tag`.", pattern=DIGEST
    )
    pull_policy: PullPolicy = Field("IfNotPresent", description="imagePullPolicy: Always, IfNotPresent or Never.")


class ImagePullSecret(Values):
    name: str = Field(description="Name of a docker-registry Secret in the release namespace.", pattern=DNS_SUBDOMAIN)


class Watch(Values):
    model_config = ConfigDict(
        json_schema_extra={
            # Namespaced RBAC needs concrete namespaces; cluster-wide RBAC and a namespace list
            # together would grant far more than what is watched.
            "if": {"properties": {"scope": {"const": "Namespaced"}}},
            "then": {"properties": {"namespaces": {"minItems": 1}}},
            "else": {"properties": {"namespaces": {"maxItems": 0}}},
        }
    )
    scope: Literal["Cluster", "Namespaced"] = Field(
        "Cluster",
        description="Cluster: the operator watches every namespace through a ClusterRole. "
        "Namespaced: it watches `namespaces` only, with a Role and RoleBinding in each.",
    )
    namespaces: list[str] = Field(
        default_factory=list,
        description="Namespaces to watch when `scope` is Namespaced (at least one); must be empty for Cluster.",
        json_schema_extra={"items": {"type": "string", "pattern": DNS_LABEL, "maxLength": 63}, "uniqueItems": True},
    )


class ServiceAccount(Values):
    create: bool = Field(True, description="Create the operator's ServiceAccount.")
    name: str = Field(
        "", description="Its name; empty uses the release's full name.", pattern=optional(DNS_SUBDOMAIN), max_length=253
    )
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations, e.g. for workload identity.")


class Rbac(Values):
    create: bool = Field(True, description="Create the operator's Role(s) or ClusterRole and their bindings.")
    aggregate_to_default_roles: bool = Field(
        True,
        description="Add FineTuneJob permissions to the built-in `admin`, `edit` (read-write) and `view` (read-only) "
        "ClusterRoles through aggregation labels.",
    )


class Crds(Values):
    install: bool = Field(
        True,
        description="Install the FineTuneJob CRD as a template (upgraded with the chart). It carries "
        "`helm.sh/resource-policy: keep`: uninstalling the chart leaves the CRD and every FineTuneJob in place.",
    )


class OperatorResources(Values):
    requests: dict[str, str] = Field(description="Requests.")
    limits: dict[str, str] = Field(description="Limits.")


class Operator(Values):
    metrics_port: Port = port(
        f"Port of the operator's own /metrics endpoint ({env('operator_metrics_port')}).",
        OPERATOR.operator_metrics_port,
    )
    health_port: Port = port(
        f"Port of the operator's liveness endpoint, kopf's /healthz ({env('health_port')}).", OPERATOR.health_port
    )
    bind_address: str = Field(
        OPERATOR.bind_address or "",
        max_length=64,
        description=f"Address the liveness and /metrics endpoints listen on ({env('bind_address')}). Empty: the pod's IP, "
        "so neither listens on other interfaces; set 0.0.0.0 to reach them through kubectl port-forward.",
    )
    log_format: Literal["full", "plain", "json"] = Field(
        OPERATOR.log_format,
        description=f"Operator log lines: full (time, logger, level, message), plain or json ({env('log_format')}).",
    )
    scrape_interval_seconds: float = Field(
        OPERATOR.metrics_scrape_interval_seconds,
        gt=0,
        description="How often the operator scrapes a running trainer's /metrics into .status.progress "
        f"({env('metrics_scrape_interval_seconds')}).",
    )
    max_job_recreations: int = Field(
        OPERATOR.max_job_recreations,
        ge=0,
        description="How often a trainer Job deleted by someone else is recreated (resuming from the newest "
        f"checkpoint) before the FineTuneJob fails with TooManyRecreations ({env('max_job_recreations')}).",
    )
    worker_limit: int = Field(
        OPERATOR.worker_limit,
        ge=0,
        description="Most FineTuneJobs handled at the same time (kopf's batching.worker_limit, "
        f"{env('worker_limit')}); 0 means no limit. A limit bounds memory and API load during a burst of new jobs.",
    )
    resources: OperatorResources = Field(
        default_factory=lambda: OperatorResources(
            requests={"cpu": "100m", "memory": "256Mi"}, limits={"memory": "512Mi"}
        ),
        description="Resources of the operator container (no CPU limit: throttling delays watch handling).",
    )
    tmp_size_limit: str = Field(
        "64Mi", description="sizeLimit of the /tmp emptyDir (the root filesystem is read-only).", pattern=QUANTITY
    )
    pod_annotations: dict[str, str] = Field(default_factory=dict, description="Extra annotations of the operator pod.")
    pod_labels: dict[str, str] = Field(default_factory=dict, description="Extra labels of the operator pod.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="nodeSelector of the operator pod.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Tolerations of the operator pod.")
    affinity: dict[str, Any] = Field(default_factory=dict, description="Affinity of the operator pod.")
    priority_class_name: str = Field("", description="priorityClassName of the operator pod.", max_length=253)


class Peering(Values):
    enabled: bool = Field(
        OPERATOR.peering,
        description=f"kopf peering ({env('peering')}): the operator coordinates through a KopfPeering object, so a "
        "standby operator with another priority takes over when this one dies. The Deployment keeps one replica.",
    )
    priority: int = Field(
        OPERATOR.peering_priority,
        ge=0,
        le=1_000_000,
        description=f"This release's peering priority ({env('peering_priority')}): the highest live operator acts, the others "
        "stand by. A standby release must use a different value than the active one.",
    )
    install_crds: bool = Field(
        True, description="With peering on, install kopf's KopfPeering and ClusterKopfPeering CRDs (kept on uninstall)."
    )


class Kueue(Values):
    enabled: bool = Field(
        OPERATOR.kueue,
        description=f"spec.scheduling.queueName names a Kueue LocalQueue ({env('kueue')}). Set false on clusters "
        "without Kueue: queueName then names the Volcano queue of jobs with schedulerName volcano.",
    )


class Serving(Values):
    enabled: bool = Field(
        False,
        description="Let the operator serve results (FineTuneJob spec.serving): grants it create, get and patch on KServe "
        "LLMInferenceServices and InferenceServices, Deployments and Services, and get on Secrets (the API key of "
        "spec.serving.vllmEndpoint.apiKeySecret), in the watched namespaces or cluster-wide as watch.scope says "
        "(the `serving` rules of files/operator-rbac.yaml). Off: a job with spec.serving still trains and succeeds, "
        "and its Serving condition says ServingFailed, naming this value.",
    )
    vllm_image: str = Field(
        OPERATOR.serving_vllm_image,
        description="vLLM image of the Deployments engine: vllm creates, for jobs without spec.serving.vllm.image "
        f"({env('serving_vllm_image')}). Pin it by digest in production.",
        min_length=1,
        max_length=1024,
    )
    endpoint_ports: list[int] = Field(
        default_factory=lambda: [8000],
        description="With networkPolicy.enabled: ports of vLLM servers (spec.serving.vllmEndpoint.url) the operator may "
        "reach to register adapters, on any address.",
        json_schema_extra={"items": {"type": "integer", "minimum": 1, "maximum": 65535}, "uniqueItems": True},
    )
    recheck_seconds: float = Field(
        OPERATOR.serving_recheck_seconds,
        gt=0,
        le=86400,
        description="How often a Ready serving object is read again to notice it stopped being Ready "
        f"({env('serving_recheck_seconds')}); one not Ready yet is read every operator.scrapeIntervalSeconds.",
    )


class TrainerServiceAccount(Values):
    create: bool = Field(True, description="Create the trainer ServiceAccount (no RBAC, no token mounted).")
    name: str = Field(
        OPERATOR.trainer_service_account,
        description=f"Name of the ServiceAccount trainer pods run as, in each job's namespace ({env('trainer_service_account')}).",
        pattern=DNS_SUBDOMAIN,
        max_length=253,
    )
    namespaces: list[str] = Field(
        default_factory=list,
        description="Namespaces to create it in; empty: the watched namespaces (Namespaced) or the release "
        "namespace (Cluster). With a cluster-wide operator, list every namespace where people run FineTuneJobs.",
        json_schema_extra={"items": {"type": "string", "pattern": DNS_LABEL, "maxLength": 63}, "uniqueItems": True},
    )


class TrainerVolumes(Values):
    tmp_size_limit: str = Field(
        OPERATOR.tmp_size_limit, description=f"sizeLimit of /tmp ({env('tmp_size_limit')}).", pattern=QUANTITY
    )
    scratch_size_limit: str = Field(
        OPERATOR.scratch_size_limit,
        description=f"sizeLimit of /scratch: checkpoints before upload, the final adapter ({env('scratch_size_limit')}).",
        pattern=QUANTITY,
    )
    hf_cache_size_limit: str = Field(
        OPERATOR.hf_cache_size_limit,
        description=f"sizeLimit of the Hugging Face cache, HF_HOME ({env('hf_cache_size_limit')}).",
        pattern=QUANTITY,
    )
    cache_size_limit: str = Field(
        OPERATOR.cache_size_limit,
        description=f"sizeLimit of the model download cache, KUBETUNE_CACHE ({env('cache_size_limit')}).",
        pattern=QUANTITY,
    )
    shared_memory_default: str = Field(
        OPERATOR.shared_memory_default,
        description=f"Size of /dev/shm of GPU pods whose job sets no resources.sharedMemory ({env('shared_memory_default')}).",
        pattern=QUANTITY,
    )


class Validation(Values):
    cpu: str = Field(
        OPERATOR.validation_cpu,
        description=f"CPU request of the data validation Job ({env('validation_cpu')}).",
        pattern=QUANTITY,
    )
    memory: str = Field(
        OPERATOR.validation_memory,
        description=f"Memory request and limit of the data validation Job ({env('validation_memory')}).",
        pattern=QUANTITY,
    )
    deadline_seconds: int = Field(
        OPERATOR.validation_deadline_seconds,
        ge=1,
        description=f"activeDeadlineSeconds of the data validation Job ({env('validation_deadline_seconds')}).",
    )


class Trainer(Values):
    image: Image = Field(
        default_factory=lambda: Image(repository=OPERATOR.trainer_image.rsplit(":", 1)[0]),
        description=f"Default trainer image, for jobs without spec.image ({env('trainer_image')}; "
        f"{env('image_pull_policy')}). Pin it by digest in production.",
    )
    service_account: TrainerServiceAccount = Field(
        default_factory=TrainerServiceAccount, description="The trainer pods' ServiceAccount."
    )
    metrics_port: Port = port(
        f"Port trainer pods serve Prometheus metrics on, named `metrics` ({env('metrics_port')}).",
        OPERATOR.metrics_port,
    )
    termination_grace_period_seconds: int = Field(
        OPERATOR.termination_grace_period_seconds,
        ge=0,
        description="Time a preempted trainer gets after SIGTERM to save and upload its checkpoint "
        f"({env('termination_grace_period_seconds')}).",
    )
    allowed_output_prefixes: list[str] = Field(
        default_factory=list,
        description="URI prefixes every spec.output.uri must start with, e.g. [s3://models/]; empty allows any "
        f"({env('allowed_output_prefix')}, comma-joined).",
        json_schema_extra={"items": {"type": "string", "pattern": URI_PREFIX}},
    )
    host_network: bool = Field(
        OPERATOR.host_network,
        description=f"Run trainer pods in the node's network namespace ({env('host_network')}). Only for single-node "
        "clusters without a pod network (kubetune's own test cluster); never on a shared cluster.",
    )
    volumes: TrainerVolumes = Field(
        default_factory=TrainerVolumes, description="Size limits of the trainer pods' emptyDir volumes."
    )
    validation: Validation = Field(
        default_factory=Validation, description="The CPU-only Job that checks a dataset before any GPU is requested."
    )


class Cost(Values):
    gpu_price_per_hour_usd: float = Field(
        OPERATOR.gpu_price_per_hour_usd,
        ge=0,
        alias="gpuPricePerHourUSD",
        description=f"Price of one GPU-hour, for status.cost.estimatedUSD ({env('gpu_price_per_hour_usd')}).",
    )
    grid_carbon_kg_per_kwh: float = Field(
        OPERATOR.grid_carbon_kg_per_kwh,
        ge=0,
        alias="gridCarbonKgPerKWh",
        description=f"Grid carbon intensity in kg CO2 per kWh, for status.cost.co2Kg ({env('grid_carbon_kg_per_kwh')}).",
    )


class Monitor(Values):
    enabled: bool = Field(False, description="Create it (needs the Prometheus Operator's CRDs).")
    interval: str = Field("30s", description="Scrape interval.", pattern=DURATION)
    scrape_timeout: str = Field("10s", description="Scrape timeout (at most the interval).", pattern=DURATION)
    labels: dict[str, str] = Field(
        default_factory=dict, description="Extra labels, e.g. the `release` label your Prometheus selects on."
    )


class Metrics(Values):
    service_monitor: Monitor = Field(
        default_factory=Monitor,
        description="A Service and ServiceMonitor for the operator's own metrics (port `metrics`).",
    )
    pod_monitor: Monitor = Field(
        default_factory=Monitor,
        description="A PodMonitor for the trainer pods (port `metrics`) in the watched namespaces; the series get a `finetunejob` label.",
    )


class Dns(Values):
    namespace_labels: dict[str, str] = Field(
        default_factory=lambda: {"kubernetes.io/metadata.name": "kube-system"},
        description="Labels of the namespace the DNS pods run in.",
    )
    pod_labels: dict[str, str] = Field(
        default_factory=lambda: {"k8s-app": "kube-dns"}, description="Labels of the DNS pods."
    )


class ApiServer(Values):
    cidrs: list[str] = Field(
        default_factory=list,
        description="CIDRs of the Kubernetes API server endpoints (`kubectl get endpoints kubernetes`); empty allows "
        "any destination on `ports`.",
        json_schema_extra={"items": {"type": "string", "pattern": CIDR}},
    )
    ports: list[Port] = Field(
        default_factory=lambda: [443, 6443],
        description="Ports of the API server.",
        json_schema_extra={"items": {"type": "integer", "minimum": 1, "maximum": 65535}, "minItems": 1},
    )


class TrainerNetwork(Values):
    enabled: bool = Field(
        True, description="Also restrict trainer pods, in every namespace that gets the trainer ServiceAccount."
    )
    egress_cidrs: list[str] = Field(
        default_factory=lambda: ["0.0.0.0/0"],
        description="CIDRs trainers may reach: your object store (S3, GCS, MinIO) and, for hf:// models, the "
        "Hugging Face Hub. Narrow this to their ranges.",
        json_schema_extra={"items": {"type": "string", "pattern": CIDR}, "minItems": 1},
    )
    egress_ports: list[Port] = Field(
        default_factory=lambda: [443],
        description="Ports trainers may reach on `egressCidrs`.",
        json_schema_extra={"items": {"type": "integer", "minimum": 1, "maximum": 65535}, "minItems": 1},
    )


class NetworkPolicy(Values):
    enabled: bool = Field(
        False,
        description="Default-deny NetworkPolicies: the operator may reach DNS, the API server and the trainers' "
        "metrics port; trainers may reach DNS, each other (multi-node rendezvous) and `trainer.egressCidrs`.",
    )
    metrics_from: list[dict[str, Any]] = Field(
        default_factory=list,
        description="NetworkPolicyPeers allowed to scrape the metrics ports (your Prometheus); empty allows any source.",
    )
    dns: Dns = Field(default_factory=Dns, description="Where cluster DNS runs.")
    api_server: ApiServer = Field(default_factory=ApiServer, description="Egress from the operator to the API server.")
    trainer: TrainerNetwork = Field(default_factory=TrainerNetwork, description="The trainer pods' policy.")


class Dashboards(Values):
    enabled: bool = Field(
        False, description="Ship the Grafana dashboard as a ConfigMap, for Grafana's dashboard sidecar."
    )
    namespace: str = Field(
        "",
        description="Namespace of the ConfigMap; empty: the release namespace.",
        pattern=optional(DNS_LABEL),
        max_length=63,
    )
    labels: dict[str, str] = Field(
        default_factory=lambda: {"grafana_dashboard": "1"}, description="Labels the sidecar selects on."
    )
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Annotations, e.g. the sidecar's target folder."
    )


class GatewayStorage(Values):
    uri: str = Field(
        "",
        description="Object-store prefix for uploaded files and job outputs (KUBETUNE_API_STORAGE), e.g. "
        "s3://models/kubetune-api: files go to <uri>/<namespace>/files/, each job writes to <uri>/<namespace>/jobs/<id>/. "
        "Required with gateway.enabled. The gateway pod reaches it with ambient credentials (workload identity through "
        "gateway.serviceAccount.annotations) or `env`.",
        pattern=optional(URI_PREFIX),
        max_length=1024,
    )
    credentials_secret: str = Field(
        "",
        description="spec.output.credentialsSecret of every job the gateway creates (KUBETUNE_API_CREDENTIALS_SECRET): a "
        "Secret of this name in each tenant namespace with the object store's credentials, which the trainer reads the "
        "upload and writes the adapter with. Empty: trainers use ambient credentials.",
        pattern=optional(DNS_SUBDOMAIN),
        max_length=253,
    )


class GatewayAuth(Values):
    secret_name: str = Field(
        "",
        description="Secret whose key `access.yaml` is the access file, mounted read-only (KUBETUNE_API_ACCESS_FILE) and "
        "reloaded when it changes. Format: `keys:` a list of {name, sha256 (hex digest of the key) or key, namespace, "
        "organization}, each key acting in its one namespace; optional `webhooks:` a list of {namespace, url, secret "
        "(whsec_<base64>), events}. Create it with `kubectl create secret generic NAME --from-file=access.yaml`.",
        pattern=optional(DNS_SUBDOMAIN),
        max_length=253,
    )
    kubernetes_tokens: bool = Field(
        False,
        description="Also accept Kubernetes bearer tokens (KUBETUNE_API_KUBERNETES_TOKENS): checked by TokenReview, "
        "then a SubjectAccessReview for list (reads) or create (writes) on finetunejobs in the namespace named by the "
        "OpenAI-Project header or the ServiceAccount's own. Binds the gateway to system:auth-delegator.",
    )


class GatewayService(Values):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field("ClusterIP", description="Service type.")
    port: Port = port("Service port (the container listens on gateway.port).", 80)
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Service annotations, e.g. for a load balancer."
    )


class GatewayServiceAccount(Values):
    name: str = Field(
        "", description="Its name; empty: <fullname>-gateway.", pattern=optional(DNS_SUBDOMAIN), max_length=253
    )
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Annotations, e.g. for workload identity to the object store."
    )


class GatewayNetwork(Values):
    ingress_from: list[dict[str, Any]] = Field(
        default_factory=list,
        description="NetworkPolicyPeers that may call the API and scrape its /metrics; empty allows any source.",
    )
    egress_cidrs: list[str] = Field(
        default_factory=lambda: ["0.0.0.0/0"],
        description="CIDRs the gateway may reach besides DNS and the API server: the object store of gateway.storage.uri "
        "and the webhook endpoints of the access file. Narrow this to their ranges.",
        json_schema_extra={"items": {"type": "string", "pattern": CIDR}, "minItems": 1},
    )
    egress_ports: list[Port] = Field(
        default_factory=lambda: [443],
        description="Ports the gateway may reach on `egressCidrs` (add 80 for http:// webhook endpoints).",
        json_schema_extra={"items": {"type": "integer", "minimum": 1, "maximum": 65535}, "minItems": 1},
    )


class Gateway(Values):
    model_config = ConfigDict(
        json_schema_extra={
            # Enabled, it needs somewhere to put uploads and a way to authenticate callers.
            "if": {"properties": {"enabled": {"const": True}}},
            "then": {
                "properties": {"storage": {"properties": {"uri": {"minLength": 1}}}},
                "anyOf": [
                    {"properties": {"auth": {"properties": {"secretName": {"minLength": 1}}}}},
                    {"properties": {"auth": {"properties": {"kubernetesTokens": {"const": True}}}}},
                ],
            },
        }
    )
    enabled: bool = Field(
        False,
        description="Run `kubetune api`, OpenAI's fine-tuning API (files, fine_tuning.jobs, models), as a Deployment and "
        "Service: uploads go to gateway.storage.uri, jobs become FineTuneJobs in each key's namespace. Needs "
        "gateway.storage.uri and gateway.auth.secretName (or kubernetesTokens).",
    )
    image: Image = Field(
        default_factory=lambda: Image(repository="ghcr.io/kubetune/operator"),
        description="The gateway image: the operator image, which has the gateway extra.",
    )
    replicas: int = Field(
        1,
        ge=1,
        le=20,
        description="Replicas. Requests are stateless; webhook deliveries are claimed once per job through an annotation, "
        "but a delivery interrupted by a restart may be repeated with the same webhook-id.",
    )
    port: Port = port("Container port of the API and its /metrics and /healthz (`kubetune api --port`).", 8080)
    storage: GatewayStorage = Field(default_factory=GatewayStorage, description="Where uploads and outputs go.")
    auth: GatewayAuth = Field(default_factory=GatewayAuth, description="Who may call it.")
    gpus: int = Field(
        1, ge=0, le=64, description="GPUs of every job (KUBETUNE_API_GPUS): OpenAI's request has no hardware field."
    )
    checkpoint_every_steps: int = Field(
        0,
        ge=0,
        description="spec.checkpointing.everySteps of every job (KUBETUNE_API_CHECKPOINT_EVERY_STEPS); 0: the CRD's default.",
    )
    webhook_poll_seconds: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="How often namespaces with a webhook are read for finished jobs (KUBETUNE_API_WEBHOOK_POLL_SECONDS).",
    )
    env: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Extra environment variables of the gateway container, e.g. AWS_ENDPOINT_URL or credentials by "
        "secretKeyRef for the object store.",
    )
    service: GatewayService = Field(default_factory=GatewayService, description="The Service in front of it.")
    service_account: GatewayServiceAccount = Field(
        default_factory=GatewayServiceAccount, description="Its own ServiceAccount."
    )
    service_monitor: Monitor = Field(default_factory=Monitor, description="A ServiceMonitor for its /metrics.")
    network_policy: GatewayNetwork = Field(
        default_factory=GatewayNetwork,
        description="With networkPolicy.enabled: the gateway pods' NetworkPolicy (DNS and the API server as "
        "networkPolicy.dns and networkPolicy.apiServer say, plus these).",
    )
    resources: OperatorResources = Field(
        default_factory=lambda: OperatorResources(
            requests={"cpu": "100m", "memory": "256Mi"}, limits={"memory": "1Gi"}
        ),
        description="Resources of the gateway container (uploads stream through it in 1 MiB chunks).",
    )
    tmp_size_limit: str = Field(
        "2Gi",
        pattern=QUANTITY,
        description="sizeLimit of the /tmp emptyDir: the multipart parser spools each upload (at most 512 MB) there before "
        "it streams to the object store, so allow 512Mi per upload in flight.",
    )
    pod_annotations: dict[str, str] = Field(default_factory=dict, description="Extra annotations of the gateway pods.")
    pod_labels: dict[str, str] = Field(default_factory=dict, description="Extra labels of the gateway pods.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="nodeSelector of the gateway pods.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Tolerations of the gateway pods.")
    affinity: dict[str, Any] = Field(default_factory=dict, description="Affinity of the gateway pods.")


# ------------------------------------------------------------------------------- the root


class ChartValues(Values):
    name_override: str = Field(
        "", description="Replaces the chart name in object names.", pattern=optional(DNS_LABEL), max_length=40
    )
    full_name_override: str = Field(
        "",
        alias="fullnameOverride",
        description="Replaces the release's full name.",
        pattern=optional(DNS_LABEL),
        max_length=52,
    )
    watch: Watch = Field(
        default_factory=Watch,
        description=f"What the operator watches; also decides the RBAC mode ({env('namespaces')}).",
    )
    image: Image = Field(
        default_factory=lambda: Image(repository="ghcr.io/kubetune/operator"),
        description="The operator image. Its entrypoint is `python -m kubetune.operator`.",
    )
    image_pull_secrets: list[ImagePullSecret] = Field(
        default_factory=list, description="Pull secrets of the operator pod."
    )
    service_account: ServiceAccount = Field(
        default_factory=ServiceAccount, description="The operator's ServiceAccount."
    )
    rbac: Rbac = Field(
        default_factory=Rbac,
        description="The operator's permissions; no wildcards, and Secrets (get) only with serving.enabled.",
    )
    crds: Crds = Field(default_factory=Crds, description="The FineTuneJob CustomResourceDefinition.")
    operator: Operator = Field(default_factory=Operator, description="The operator Deployment (one replica, Recreate).")
    peering: Peering = Field(default_factory=Peering, description="kopf peering.")
    kueue: Kueue = Field(default_factory=Kueue, description="Kueue integration.")
    serving: Serving = Field(default_factory=Serving, description="Serving the results of FineTuneJobs (spec.serving).")
    trainer: Trainer = Field(default_factory=Trainer, description="Defaults for the trainer Jobs the operator creates.")
    cost: Cost = Field(default_factory=Cost, description="Inputs of status.cost.")
    metrics: Metrics = Field(default_factory=Metrics, description="Prometheus Operator objects.")
    network_policy: NetworkPolicy = Field(default_factory=NetworkPolicy, description="NetworkPolicies.")
    dashboards: Dashboards = Field(default_factory=Dashboards, description="Grafana dashboard.")
    gateway: Gateway = Field(
        default_factory=Gateway, description="`kubetune api`: OpenAI's fine-tuning API on the cluster."
    )


# ----------------------------------------------------------------------------- rendering

HEADER = """\
# Values of the kubetune chart. GENERATED by hack/chart_schema.py (`make chart-schema`) from the
# same models as values.schema.json: edit the models there, not this file.
"""
WIDTH = 100


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(text, WIDTH - len(indent) - 2)]


def _scalar(value: Any) -> str:
    """A scalar or an empty collection as YAML: JSON's spelling of them is valid YAML."""
    return json.dumps(value)


def _emit(model: type[Values], data: dict[str, Any], depth: int) -> list[str]:
    indent = "  " * depth
    lines: list[str] = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        value = data[key]
        if lines or depth == 0:
            lines.append("")
        lines += _comment(field.description or "", indent)
        sub = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, Values) else None
        if sub is not None:
            lines.append(f"{indent}{key}:")
            lines += _emit(sub, value, depth + 1)
        elif isinstance(value, (dict, list)) and value:
            lines.append(f"{indent}{key}:")
            body = yaml.safe_dump(value, default_flow_style=False, sort_keys=False).rstrip("\n")
            lines += [f"{indent}  {line}" for line in body.splitlines()]
        else:
            lines.append(f"{indent}{key}: {_scalar(value)}")
    return lines


def values_yaml() -> str:
    data = ChartValues().model_dump(by_alias=True, mode="json")
    body = "\n".join(_emit(ChartValues, data, 0)).lstrip("\n")
    return f"{HEADER}\n{body}\n"


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Resolve `$ref`s (Helm 3 and 4 read draft-07 without them), drop titles and defaults."""
    if isinstance(node, dict):
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[1]]
            extra = {k: v for k, v in node.items() if k != "$ref"}
            return _inline({**target, **extra}, defs)
        return {k: _inline(v, defs) for k, v in node.items() if k not in ("title", "default", "$defs")}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def values_schema() -> str:
    raw = ChartValues.model_json_schema(by_alias=True, mode="validation")
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", **_inline(raw, raw.get("$defs", {}))}
    return json.dumps(schema, indent=2) + "\n"


def main(argv: list[str]) -> int:
    outputs = {VALUES: values_yaml(), SCHEMA: values_schema()}
    if "--check" in argv:
        stale = [str(p.relative_to(ROOT)) for p, text in outputs.items() if not p.exists() or p.read_text() != text]
        if stale:
            print(f"stale: {', '.join(stale)}; run `make chart-schema`", file=sys.stderr)
            return 1
        return 0
    for path, text in outputs.items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
