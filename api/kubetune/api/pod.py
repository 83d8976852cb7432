"""`spec.podOverrides`: what a FineTuneJob may add to the pods kubetune builds.

Platforms need things on every pod that kubetune cannot know: a pull secret for a private
registry, a ServiceAccount tied to a cloud identity, a RuntimeClass, the team's labels and
annotations, a CA bundle or a dataset on a volume, NCCL settings. Kubeflow Trainer lets a TrainJob
patch whole pod templates (`podTemplateOverrides`); kubetune takes one typed object instead,
because its pods carry promises a free-form patch could break: the restricted Pod Security
profile (no hostPath, hence a typed subset of volume kinds), no API token, the trainer's own
environment and paths, the labels its Service, NetworkPolicy and status lookups select by.
Whatever would collide with what kubetune sets is refused, with the reason, rather than silently
dropped or allowed to win.

Every rule is written twice, as in the rest of the API: a CEL rule the API server enforces and a
Python check for `kubetune validate`, the operator and the trainer. The names and paths kubetune
itself uses are listed here (the API cannot import the operator); a builder test asserts each one
the builders emit is refused, so the lists cannot fall behind.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, Optional

from kubetune.api._base import CEL_KEY, Rule, WireModel, rules
from kubetune.api.types import (
    ABSOLUTE_PATH,
    DNS_LABEL,
    DNS_SUBDOMAIN,
    ENV_NAME,
    LABEL_MAP_RULE,
    QUALIFIED_NAME,
    QUALIFIED_NAME_HELP,
    LabelValue,
    Quantity,
    RelativePath,
    cel_string,
    path_type,
)
from pydantic import AfterValidator, Field, WithJsonSchema, field_validator

# ------------------------------------------------------------------ what kubetune keeps for itself

RESERVED_KEYS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/managed-by",
    "job-name",
    "controller-uid",
    "scheduling.k8s.io/group-name",
)
"""Pod label and annotation keys set by kubetune, the Job controller or for Volcano."""
RESERVED_KEY_PREFIX = "^(([^/]*[.])?kubetune[.]io|batch[.]kubernetes[.]io|kueue[.]x-k8s[.]io|prometheus[.]io)/"
"""Key prefixes of kubetune (kubetune.io/spec, /role, ...), the Job controller, Kueue (queueing is
spec.scheduling's job: a queue label on the pods would make Kueue manage them a second time) and
the Prometheus scrape annotations kubetune sets on trainer pods."""

CREDENTIAL_KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON",
    "HF_TOKEN",
)
"""Keys a credentials Secret (spec.output.credentialsSecret) may hold; each becomes a variable."""

RESERVED_ENV = (
    "HOME",
    "TMPDIR",
    "HF_HOME",
    "NNODES",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
)
"""Variables the trainer's paths and torchrun's rendezvous depend on, and the GPU selection (with
the NVIDIA runtime, NVIDIA_VISIBLE_DEVICES=all would expose every GPU of the node to the pod)."""
RESERVED_ENV_PREFIXES = ("KUBETUNE_", "PYTHON", "LD_")
"""kubetune's own settings (KUBETUNE_ALLOWED_OUTPUT_PREFIX is a platform policy), and variables
that make the interpreter or the loader run other code (PYTHONPATH, LD_PRELOAD): a mounted
ConfigMap plus one of them would run code that the image and trustRemoteCode never allowed."""

RESERVED_VOLUMES = ("spec", "tmp", "scratch", "hf-cache", "kubetune-cache", "dshm")
RESERVED_VOLUME_PATTERN = "^(pvc-[0-9]+|kubetune-.*)$"
"""Volume names kubetune uses: the ones above, pvc-N for pvc:// URIs, and kubetune-* for later."""

RESERVED_PATHS = (
    "/etc/kubetune",
    "/tmp",
    "/scratch",
    "/cache/huggingface",
    "/cache/kubetune",
    "/dev/shm",
    "/dev/termination-log",
    "/mnt/pvc",
)
"""Container paths kubetune mounts or writes; a mount may be neither one of them, nor inside, nor above one."""


def _cel_list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(cel_string(i) for i in items) + "]"


def is_reserved_key(key: str) -> bool:
    return key in RESERVED_KEYS or bool(re.match(RESERVED_KEY_PREFIX, key))


def is_reserved_env(name: str) -> bool:
    return name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIXES)


def is_reserved_volume(name: str) -> bool:
    return name in RESERVED_VOLUMES or bool(re.match(RESERVED_VOLUME_PATTERN, name))


def is_reserved_path(path: str) -> bool:
    return any(path == r or path.startswith(r + "/") or r.startswith(path + "/") for r in RESERVED_PATHS)


_RESERVED_KEYS_TEXT = (
    "kubetune.io/* (and *.kubetune.io/*), batch.kubernetes.io/*, kueue.x-k8s.io/*, prometheus.io/*, "
    "app.kubernetes.io/name, /instance and /managed-by, job-name, controller-uid and "
    "scheduling.k8s.io/group-name"
)
_KEYS_HELP = f"is set by kubetune, the Job controller or Kueue; these keys cannot be set here: {_RESERVED_KEYS_TEXT}"
RESERVED_KEYS_RULE = Rule(
    f"self.all(k, !(k in {_cel_list(RESERVED_KEYS)}) && !k.matches({cel_string(RESERVED_KEY_PREFIX)}))",
    f"a key {_KEYS_HELP}",
    lambda keys: not any(is_reserved_key(k) for k in keys),
    passes={"team": "search", "example.com/cost-center": "42"},
    fails={"team": "search", "kueue.x-k8s.io/queue-name": "other"},
    explain=lambda keys: f"{next(k for k in keys if is_reserved_key(k))!r} {_KEYS_HELP}",
)


def _check_keys(value: dict[str, str]) -> dict[str, str]:
    for key in value:  # key by key: the first bad key is named, whichever rule it breaks
        if not LABEL_MAP_RULE.check([key]):
            raise ValueError(f"{key!r} is not a valid key: every key must be {QUALIFIED_NAME_HELP}")
        RESERVED_KEYS_RULE.enforce([key])
    return value


def _repeated(items: list[dict[str, Any]], field: str) -> list[Any]:
    seen: set[Any] = set()
    out = []
    for item in items:
        if item[field] in seen:
            out.append(item[field])
        seen.add(item[field])
    return out


def _unique(field: str, one: dict[str, Any], other: dict[str, Any]) -> Rule:
    """A list rule: no two items share `field` (wire name); `one` and `other` are two distinct items."""
    return Rule(
        f"self.all(a, self.exists_one(b, b.{field} == a.{field}))",
        f"two items have the same {field}",
        lambda items: not _repeated(items, field),
        passes=[one, other],
        fails=[one, other, one],
        explain=lambda items: f"two items have the same {field} ({_repeated(items, field)[0]!r})",
    )


def _check_unique(items: list[Any], rule: Rule) -> list[Any]:
    rule.enforce([item.wire() for item in items])
    return items


# ----------------------------------------------------------------------------------- env


_ENV_RESERVED_HELP = (
    "is set by kubetune or could change what code runs; these variables cannot be set here: "
    + ", ".join(RESERVED_ENV)
    + ", and names starting with "
    + ", ".join(RESERVED_ENV_PREFIXES)
)
_env_name = re.compile(ENV_NAME)


ENV_NAME_RULE = Rule(
    f"!(self in {_cel_list(RESERVED_ENV)}) && "
    + " && ".join(f"!self.startsWith({cel_string(p)})" for p in RESERVED_ENV_PREFIXES),
    f"the name {_ENV_RESERVED_HELP}",
    lambda name: not is_reserved_env(name),
    passes="NCCL_DEBUG",
    fails="LD_PRELOAD",
    explain=lambda name: f"{name!r} {_ENV_RESERVED_HELP}",
)


def _check_env_name(value: str) -> str:
    if len(value) > 253 or not _env_name.match(value):
        raise ValueError(
            f"{value!r} is not a variable name: use at most 253 letters, digits, '-', '_' or '.', "
            "not starting with a digit"
        )
    ENV_NAME_RULE.enforce(value)
    return value


EnvName = Annotated[
    str,
    AfterValidator(_check_env_name),
    WithJsonSchema(
        {
            "type": "string",
            "maxLength": 253,
            "pattern": ENV_NAME,
            CEL_KEY: [ENV_NAME_RULE.wire()],
        }
    ),
]

KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
FIELD_PATH = (
    r"^(metadata[.](name|namespace|uid)|metadata[.](labels|annotations)\['" + QUALIFIED_NAME[1:-1] + r"'\]"
    r"|spec[.](nodeName|serviceAccountName)|status[.](hostIP|hostIPs|podIP|podIPs))$"
)
_FIELD_PATHS = (
    "metadata.name, metadata.namespace, metadata.uid, metadata.labels['<key>'], metadata.annotations['<key>'], "
    "spec.nodeName, spec.serviceAccountName, status.hostIP, status.hostIPs, status.podIP or status.podIPs"
)
_field_path = re.compile(FIELD_PATH)


def _check_field_path(value: str) -> str:
    if len(value) > 340 or not _field_path.match(value):
        raise ValueError(f"{value!r} is not a field a pod can read: use {_FIELD_PATHS}")
    return value


FieldPath = Annotated[
    str, AfterValidator(_check_field_path), WithJsonSchema({"type": "string", "maxLength": 340, "pattern": FIELD_PATH})
]


class KeySelector(WireModel):
    """One key of a Secret or ConfigMap in the job's namespace."""

    name: str = Field(
        max_length=253, pattern=DNS_SUBDOMAIN, description="Name of the Secret or ConfigMap, in the job's namespace."
    )
    key: str = Field(
        max_length=253, pattern=KEY_PATTERN, description="The key whose value becomes the variable's value."
    )
    optional: Optional[bool] = Field(
        default=None,
        description="Start the pod even when the object or the key is missing (the variable is then unset). Default false.",
    )


class FieldSelector(WireModel):
    """A field of the pod itself (the downward API)."""

    field_path: FieldPath = Field(description=f"The field: {_FIELD_PATHS}.")


_ONE_SOURCE = "set exactly one of secretKeyRef, configMapKeyRef and fieldRef"


class EnvVarSource(WireModel):
    """Where a variable's value comes from: exactly one of secretKeyRef, configMapKeyRef, fieldRef."""

    model_config = WireModel.model_config | {
        "json_schema_extra": rules(
            Rule(
                "(has(self.secretKeyRef) ? 1 : 0) + (has(self.configMapKeyRef) ? 1 : 0) + (has(self.fieldRef) ? 1 : 0) == 1",
                _ONE_SOURCE,
                lambda s: sum(x is not None for x in (s.secret_key_ref, s.config_map_key_ref, s.field_ref)) == 1,
                passes={"fieldRef": {"fieldPath": "metadata.name"}},
                fails={"fieldRef": {"fieldPath": "metadata.name"}, "secretKeyRef": {"name": "tokens", "key": "hf"}},
            )
        )
    }

    secret_key_ref: Optional[KeySelector] = Field(
        default=None,
        description="A key of a Secret: the value stays in the Secret (neither the operator nor the FineTuneJob sees it).",
    )
    config_map_key_ref: Optional[KeySelector] = Field(default=None, description="A key of a ConfigMap.")
    field_ref: Optional[FieldSelector] = Field(
        default=None, description="A field of the pod, such as metadata.name or spec.nodeName."
    )


class EnvVar(WireModel):
    """An extra environment variable of the trainer container."""

    model_config = WireModel.model_config | {
        "json_schema_extra": rules(
            Rule(
                "!(has(self.value) && has(self.valueFrom))",
                "set value or valueFrom, not both",
                lambda e: e.value is None or e.value_from is None,
                passes={"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                fails={"name": "NODE", "value": "n1", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            )
        )
    }

    name: EnvName = Field(
        description=(
            "Variable name: letters, digits, '-', '_' and '.', not starting with a digit. Names kubetune sets or that "
            "change what code runs are refused: HOME, TMPDIR, HF_HOME, torchrun's rendezvous and rank variables, "
            "CUDA_VISIBLE_DEVICES, NVIDIA_VISIBLE_DEVICES, and KUBETUNE_*, PYTHON*, LD_*."
        )
    )
    value: Optional[str] = Field(
        default=None,
        max_length=1024,
        description=(
            "The value, at most 1024 characters; $(NAME) refers to a variable defined before it, as in any pod. It is "
            "stored in the FineTuneJob and its Job in clear text: put secrets in a Secret and use valueFrom.secretKeyRef."
        ),
    )
    value_from: Optional[EnvVarSource] = Field(
        default=None, description="Take the value from a Secret, a ConfigMap or the pod itself."
    )


# ------------------------------------------------------------------------------- volumes


class KeyToPath(WireModel):
    """One key of a ConfigMap or Secret projected to a file."""

    key: str = Field(max_length=253, pattern=KEY_PATTERN, description="The key to project.")
    path: RelativePath = Field(
        description="File path relative to the mount point, e.g. certs/ca.crt; no '..' segments."
    )
    mode: Optional[int] = Field(
        default=None,
        ge=0,
        le=0o777,
        description="File mode bits, 0 to 511 (0777 in octal). Default: the volume's defaultMode.",
    )


def _projected_fields(what: str) -> dict[str, Any]:
    return {
        "items": Field(
            default_factory=list,
            max_length=64,
            description=f"Keys to project, each to its own path. Empty: every key of the {what}, as a file named like the key.",
        ),
        "optional": Field(
            default=None, description=f"Start the pod even when the {what} (or a listed key) is missing. Default false."
        ),
        "default_mode": Field(
            default=None, ge=0, le=0o777, description="Mode bits of the files, 0 to 511 (0777 in octal). Default 0644."
        ),
    }


_CM, _SECRET = _projected_fields("ConfigMap"), _projected_fields("Secret")


class PersistentVolumeClaimSource(WireModel):
    """A PersistentVolumeClaim in the job's namespace."""

    claim_name: str = Field(max_length=253, pattern=DNS_SUBDOMAIN, description="Name of the PersistentVolumeClaim.")
    read_only: Optional[bool] = Field(default=None, description="Mount the claim read-only. Default false.")


class ConfigMapSource(WireModel):
    """A ConfigMap in the job's namespace, as files."""

    name: str = Field(max_length=253, pattern=DNS_SUBDOMAIN, description="Name of the ConfigMap.")
    items: list[KeyToPath] = _CM["items"]
    optional: Optional[bool] = _CM["optional"]
    default_mode: Optional[int] = _CM["default_mode"]


class SecretSource(WireModel):
    """A Secret in the job's namespace, as files (e.g. a service-account key or a client certificate)."""

    secret_name: str = Field(max_length=253, pattern=DNS_SUBDOMAIN, description="Name of the Secret.")
    items: list[KeyToPath] = _SECRET["items"]
    optional: Optional[bool] = _SECRET["optional"]
    default_mode: Optional[int] = _SECRET["default_mode"]


class EmptyDirSource(WireModel):
    """A scratch directory that lives as long as the pod."""

    medium: Optional[str] = Field(
        default=None,
        max_length=6,
        pattern="^(Memory)?$",
        description="\"\" (the node's disk, the default) or Memory (tmpfs, counted against the pod's memory limit).",
    )
    size_limit: Optional[Quantity] = Field(
        default=None, description="Most the directory may hold, e.g. 10Gi; beyond it the pod is evicted."
    )


_VOLUME_SOURCES = ("persistentVolumeClaim", "configMap", "secret", "emptyDir")
_ONE_VOLUME_SOURCE = "set exactly one of persistentVolumeClaim, configMap, secret and emptyDir"
_VOLUME_NAME_HELP = (
    "is a volume of kubetune's own (spec, tmp, scratch, hf-cache, kubetune-cache, dshm, pvc-<N>, "
    "kubetune-*): choose another name"
)


VOLUME_NAME_RULE = Rule(
    f"!(self in {_cel_list(RESERVED_VOLUMES)}) && !self.matches({cel_string(RESERVED_VOLUME_PATTERN)})",
    f"the name {_VOLUME_NAME_HELP}",
    lambda name: not is_reserved_volume(name),
    passes="datasets",
    fails="kubetune-cache-2",
    explain=lambda name: f"{name!r} {_VOLUME_NAME_HELP}",
)


def _check_volume_name(value: str) -> str:
    VOLUME_NAME_RULE.enforce(value)
    return value


VolumeName = Annotated[
    str,
    Field(max_length=63, pattern=DNS_LABEL),
    AfterValidator(_check_volume_name),
    WithJsonSchema(
        {
            "type": "string",
            "maxLength": 63,
            "pattern": DNS_LABEL,
            CEL_KEY: [VOLUME_NAME_RULE.wire()],
        }
    ),
]


class Volume(WireModel):
    """A volume of the pods: a PersistentVolumeClaim, ConfigMap, Secret or emptyDir (no hostPath: restricted Pod Security)."""

    model_config = WireModel.model_config | {
        "json_schema_extra": rules(
            Rule(
                " + ".join(f"(has(self.{s}) ? 1 : 0)" for s in _VOLUME_SOURCES) + " == 1",
                _ONE_VOLUME_SOURCE,
                lambda v: (
                    sum(x is not None for x in (v.persistent_volume_claim, v.config_map, v.secret, v.empty_dir)) == 1
                ),
                passes={"name": "data", "persistentVolumeClaim": {"claimName": "datasets"}},
                fails={"name": "data", "persistentVolumeClaim": {"claimName": "datasets"}, "emptyDir": {}},
            )
        )
    }

    name: VolumeName = Field(
        description="Volume name (a DNS label), referred to by volumeMounts[].name; kubetune's own names are refused."
    )
    persistent_volume_claim: Optional[PersistentVolumeClaimSource] = Field(
        default=None, description="Mount a PersistentVolumeClaim."
    )
    config_map: Optional[ConfigMapSource] = Field(default=None, description="Mount the keys of a ConfigMap as files.")
    secret: Optional[SecretSource] = Field(default=None, description="Mount the keys of a Secret as files.")
    empty_dir: Optional[EmptyDirSource] = Field(default=None, description="An empty directory for the pod's lifetime.")


_PATH_HELP = (
    "is a path of kubetune's own (/etc/kubetune, /tmp, /scratch, /cache/huggingface, /cache/kubetune, "
    "/dev/shm, /dev/termination-log, /mnt/pvc): mount neither at, inside nor above one"
)


MOUNT_PATH_RULE = Rule(
    f"{_cel_list(RESERVED_PATHS)}.all(r, self != r && !self.startsWith(r + '/') && !r.startsWith(self + '/'))",
    f"the path {_PATH_HELP}",
    lambda path: not is_reserved_path(path),
    passes="/data",
    fails="/cache/huggingface/hub",
    explain=lambda path: f"{path!r} {_PATH_HELP}",
)

if TYPE_CHECKING:
    MountPath = str  # what the validated field holds; path_type builds its Annotated type at run time
else:
    MountPath = path_type(ABSOLUTE_PATH, "an absolute path", (MOUNT_PATH_RULE,))


class VolumeMount(WireModel):
    """Where a volume of podOverrides.volumes appears in the trainer container."""

    name: str = Field(max_length=63, pattern=DNS_LABEL, description="Name of a volume in podOverrides.volumes.")
    mount_path: MountPath = Field(
        description=(
            "Absolute path in the container, e.g. /data or /etc/ssl/custom; not one of kubetune's own paths "
            "(/etc/kubetune, /tmp, /scratch, /cache/huggingface, /cache/kubetune, /dev/shm, /dev/termination-log, /mnt/pvc), "
            "nor inside or above one. A pvc:// URI needs no mount: kubetune mounts its claim under /mnt/pvc."
        )
    )
    read_only: Optional[bool] = Field(
        default=None, description="Mount read-only. Default false (Secrets and ConfigMaps are read-only anyway)."
    )
    sub_path: Optional[RelativePath] = Field(
        default=None, description="Mount this directory or file of the volume instead of its root."
    )


# ------------------------------------------------------------------------------- overrides


class LocalObjectReference(WireModel):
    """An object in the job's namespace, by name."""

    name: str = Field(
        max_length=253, pattern=DNS_SUBDOMAIN, description="Name of a Secret of type kubernetes.io/dockerconfigjson."
    )


_UNDECLARED = "a volumeMount names a volume that podOverrides.volumes does not declare"

_EXAMPLE_VOLUME = {"name": "data", "persistentVolumeClaim": {"claimName": "datasets"}}

UNIQUE_ENV_NAMES = _unique(
    "name", {"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "NCCL_SOCKET_IFNAME", "value": "eth0"}
)
UNIQUE_VOLUME_NAMES = _unique("name", _EXAMPLE_VOLUME, {"name": "scratch-2", "emptyDir": {}})
UNIQUE_MOUNT_PATHS = _unique("mountPath", {"name": "data", "mountPath": "/data"}, {"name": "data", "mountPath": "/ref"})


def _undeclared_mounts(overrides: PodOverrides) -> list[str]:
    """The volume names of volumeMounts that no volume declares."""
    declared = {v.name for v in overrides.volumes}
    return [m.name for m in overrides.volume_mounts if m.name not in declared]


class PodOverrides(WireModel):
    """Additions to the pods kubetune builds (trainer and data validation)."""

    model_config = WireModel.model_config | {
        "json_schema_extra": rules(
            Rule(
                "!has(self.volumeMounts) || self.volumeMounts.all(m, has(self.volumes) && self.volumes.exists(v, v.name == m.name))",
                _UNDECLARED,
                lambda o: not _undeclared_mounts(o),
                passes={"volumes": [_EXAMPLE_VOLUME], "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
                fails={"volumes": [_EXAMPLE_VOLUME], "volumeMounts": [{"name": "datasets", "mountPath": "/data"}]},
                field_path=".volumeMounts",
                at_field=True,
                explain=lambda o: (
                    f"{_UNDECLARED}: {_undeclared_mounts(o)[0]!r} is not one of {sorted(v.name for v in o.volumes)}"
                ),
            )
        )
    }

    labels: dict[str, LabelValue] = Field(
        default_factory=dict,
        max_length=64,
        json_schema_extra={"maxProperties": 64, CEL_KEY: [LABEL_MAP_RULE.wire(), RESERVED_KEYS_RULE.wire()]},
        description=(
            "Labels added to the pods (at most 64; keys are qualified names, values label values), e.g. for cost "
            "allocation or a policy engine. Keys kubetune, the Job controller or Kueue set are refused, not overridden: "
            f"{_RESERVED_KEYS_TEXT}."
        ),
    )
    annotations: dict[str, Annotated[str, Field(max_length=2048)]] = Field(
        default_factory=dict,
        max_length=32,
        json_schema_extra={"maxProperties": 32, CEL_KEY: [LABEL_MAP_RULE.wire(), RESERVED_KEYS_RULE.wire()]},
        description=(
            "Annotations added to the pods (at most 32, each value at most 2048 characters: 64 KiB in all, well within "
            "the 256 KiB Kubernetes allows a pod's annotations), e.g. sidecar.istio.io/inject or "
            "k8s.v1.cni.cncf.io/networks. Keys are qualified names; the keys refused for labels are refused here too."
        ),
    )
    service_account_name: Optional[str] = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description=(
            "ServiceAccount of the pods, in the job's namespace, instead of the operator's trainer account (usually "
            "kubetune-trainer); e.g. one bound to a cloud identity (GKE Workload Identity, EKS Pod Identity or IRSA) "
            "so that the trainer reaches object storage without a credentialsSecret. No API token is mounted either way "
            "(automountServiceAccountToken stays false): the trainer never calls the Kubernetes API."
        ),
    )
    runtime_class_name: Optional[str] = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="RuntimeClass of the pods, e.g. nvidia where the NVIDIA container runtime is not the node's default, or a sandbox such as gvisor or kata.",
    )
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list,
        max_length=8,
        description="Secrets (in the job's namespace) with credentials for pulling the trainer image from a private registry.",
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={CEL_KEY: [UNIQUE_ENV_NAMES.wire()]},
        description=(
            "Extra environment variables of the trainer container (at most 64, distinct names), after kubetune's own, "
            "e.g. NCCL_DEBUG or NCCL_SOCKET_IFNAME. Variables kubetune sets or that change what code runs are refused; "
            f"with output.credentialsSecret set, so are the variables it provides ({', '.join(CREDENTIAL_KEYS)})."
        ),
    )
    volumes: list[Volume] = Field(
        default_factory=list,
        max_length=16,
        json_schema_extra={CEL_KEY: [UNIQUE_VOLUME_NAMES.wire()]},
        description="Extra volumes of the pods (at most 16, distinct names): persistentVolumeClaim, configMap, secret or emptyDir.",
    )
    volume_mounts: list[VolumeMount] = Field(
        default_factory=list,
        max_length=32,
        json_schema_extra={CEL_KEY: [UNIQUE_MOUNT_PATHS.wire()]},
        description="Where the trainer container mounts those volumes (at most 32, distinct mountPaths).",
    )

    @field_validator("labels", "annotations")
    @classmethod
    def _keys(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_keys(value)

    @field_validator("env")
    @classmethod
    def _distinct_env(cls, value: list[EnvVar]) -> list[EnvVar]:
        return _check_unique(value, UNIQUE_ENV_NAMES)

    @field_validator("volumes")
    @classmethod
    def _distinct_volumes(cls, value: list[Volume]) -> list[Volume]:
        return _check_unique(value, UNIQUE_VOLUME_NAMES)

    @field_validator("volume_mounts")
    @classmethod
    def _distinct_mounts(cls, value: list[VolumeMount]) -> list[VolumeMount]:
        return _check_unique(value, UNIQUE_MOUNT_PATHS)

    def credential_env(self) -> list[str]:
        """The names of env that a credentials Secret would also set."""
        return [e.name for e in self.env if e.name in CREDENTIAL_KEYS]
