"""What a platform team configures about the operator, in one frozen object.

The Helm chart sets these as `KUBETUNE_*` environment variables on the operator Deployment;
`OperatorSettings.from_env()` reads them once at start-up and every builder takes the object as
an argument. Keeping configuration in one immutable value (instead of module globals or reads of
`os.environ` deep inside builders) is what lets the builders stay pure functions that golden
tests render with a fixed settings object.

Every field maps to the variable `KUBETUNE_<FIELD NAME IN UPPER CASE>`, e.g. `trainer_image` ←
`KUBETUNE_TRAINER_IMAGE`. Booleans accept true/false/1/0/yes/no/on/off; tuples are
comma-separated; an empty value of an optional field means unset.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune.api.contract import DEFAULT_METRICS_PORT

ENV_PREFIX = "KUBETUNE_"


@dataclass(frozen=True)
class OperatorSettings:
    """Operator configuration; defaults suit a small cluster with NVIDIA GPUs."""

    trainer_image: str = "ghcr.io/kubetune/trainer:0.1.0"
    """Trainer image used when a FineTuneJob sets no `spec.image` (pin by digest in production)."""

    image_pull_policy: str = "IfNotPresent"
    """imagePullPolicy of the trainer containers: Always, IfNotPresent or Never."""

    trainer_service_account: str = "kubetune-trainer"
    """ServiceAccount of trainer pods, in the job's namespace; it has no RBAC and no token mounted."""

    termination_grace_period_seconds: int = 120
    """Time a preempted trainer gets after SIGTERM to write and upload its checkpoint."""

    gpu_price_per_hour_usd: float = 2.5
    """Price of one GPU hour, for status.cost.estimatedUSD."""

    grid_carbon_kg_per_kwh: float = 0.4
    """Carbon intensity of the grid in kg CO2 per kWh, for status.cost.co2Kg."""

    metrics_scrape_interval_seconds: float = 30.0
    """How often the operator scrapes a running trainer's /metrics for status.progress."""

    metrics_port: int = DEFAULT_METRICS_PORT
    """Port the trainer serves Prometheus metrics on (named `metrics` in the pod)."""

    validation_cpu: str = "1"
    """CPU request of the CPU-only data validation Job."""

    validation_memory: str = "4Gi"
    """Memory request and limit of the data validation Job (it loads a tokenizer, not a model)."""

    validation_deadline_seconds: int = 1800
    """activeDeadlineSeconds of the data validation Job."""

    tmp_size_limit: str = "2Gi"
    """sizeLimit of the /tmp emptyDir (the root filesystem is read-only)."""

    scratch_size_limit: str = "200Gi"
    """sizeLimit of the /scratch emptyDir (TMPDIR: checkpoints before upload, the final adapter)."""

    hf_cache_size_limit: str = "50Gi"
    """sizeLimit of the Hugging Face cache emptyDir (HF_HOME: tokenizers, hub metadata)."""

    cache_size_limit: str = "200Gi"
    """sizeLimit of the kubetune cache emptyDir (KUBETUNE_CACHE: downloaded model weights)."""

    shared_memory_default: str = "8Gi"
    """Size of /dev/shm for pods with GPUs when spec.resources.sharedMemory is unset."""

    host_network: bool = False
    """Run trainer pods in their node's network namespace (hostNetwork, dnsPolicy
    ClusterFirstWithHostNet). Only for single-node clusters without a pod network, such as
    kubetune's own cluster test tier: pods then share the node's ports and interfaces."""

    log_format: str = "full"
    """Log lines of the operator process: full (time, logger, level, message), plain (the
    message) or json (one object per line, for log collectors)."""

    health_port: int = 8080
    """Port of the operator's liveness endpoint (kopf's /healthz); 0 turns it off."""

    bind_address: str | None = None
    """Address the liveness and /metrics endpoints listen on. Unset: the pod's IP (the chart
    passes it as POD_IP from the downward API), else 0.0.0.0 outside a pod. Listening on the pod
    IP only keeps both endpoints off other interfaces, such as a host network or a sidecar's
    loopback; `kubectl port-forward` then needs KUBETUNE_BIND_ADDRESS=0.0.0.0."""

    def listen_address(self, env: Mapping[str, str] | None = None) -> str:
        """`bind_address`, else POD_IP, else 0.0.0.0; an IPv6 address as it goes in a URL host."""
        env = os.environ if env is None else env
        address = self.bind_address or env.get("POD_IP", "").strip() or "0.0.0.0"
        return address

    allowed_output_prefix: str | None = None
    """Comma-separated URI prefixes outputs must lie under; passed to the trainer. Unset: any."""

    kueue: bool = True
    """spec.scheduling.queueName names a Kueue LocalQueue. Set false on clusters without Kueue:
    queueName then names the Volcano queue of jobs with schedulerName volcano."""

    namespaces: tuple[str, ...] = ()
    """Namespaces the operator watches; empty watches the whole cluster."""

    peering: bool = False
    """kopf peering, for a standby replica that takes over when the leader dies."""

    peering_priority: int = 0
    """This replica's kopf peering priority: the highest acts, the others stand by. Give every
    replica a distinct value (replicas with equal priorities all pause)."""

    max_job_recreations: int = 3
    """How many times a trainer Job deleted by someone else is recreated (each resumes from the
    newest committed checkpoint) before the FineTuneJob fails with TooManyRecreations."""

    operator_metrics_port: int = 8000
    """Port of the operator's own Prometheus /metrics endpoint; 0 turns it off."""

    worker_limit: int = 0
    """Most FineTuneJobs handled concurrently (kopf's `batching.worker_limit`); 0: no limit.
    A limit bounds the operator's memory and API load during a burst of new jobs."""

    serving_vllm_image: str = "vllm/vllm-openai:v0.11.0"
    """vLLM image of the Deployments spec.serving engine vllm creates when the FineTuneJob sets no
    spec.serving.vllm.image (pin by digest in production)."""

    serving_recheck_seconds: float = 300.0
    """How often the operator re-reads a Ready serving object (spec.serving) to notice it stopped
    being Ready; one that is not Ready yet is read on every metrics_scrape_interval_seconds tick."""

    api_url: str | None = None
    """URL of the Kubernetes API server the operator's own client (children, status, Leases)
    talks to. Unset, as in a pod: the in-cluster ServiceAccount, else kubeconfig. For running the
    operator outside a cluster against a server kopf also logs in to; the chart never sets it."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        """Settings from `KUBETUNE_*` variables (default: the process environment)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = env_name(f.name)
            if name in env:
                values[f.name] = _parse(name, env[name], f.default)
        return cls(**values)


def env_name(field: str) -> str:
    """The variable a settings field is read from: `KUBETUNE_<FIELD>` (`trainer_image` ←
    `KUBETUNE_TRAINER_IMAGE`). The chart's schema quotes these names through this function."""
    if field not in {f.name for f in dataclasses.fields(OperatorSettings)}:
        raise KeyError(f"{field!r} is no field of OperatorSettings")
    return ENV_PREFIX + field.upper()


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _parse(name: str, raw: str, default: Any) -> Any:
    """Convert one variable to the type of the field's default; errors name the variable."""
    text = raw.strip()
    try:
        if isinstance(default, bool):
            if text.lower() not in _TRUE | _FALSE:
                raise ValueError("expected true or false")
            return text.lower() in _TRUE
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple):
            return tuple(part.strip() for part in text.split(",") if part.strip())
        if default is None:
            return text or None
        if not text:
            raise ValueError("must not be empty")
        return text
    except ValueError as err:
        raise ValueError(f"{name}={raw!r}: {err}") from None
