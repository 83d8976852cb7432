"""Condition types and reasons written to `.status.conditions`.

Reasons are CamelCase constants (Kubernetes convention) so that dashboards, Argo CD health
checks and alerts can match on them; free text goes into the message only.
"""

from __future__ import annotations

from kubetune.api.enums import StrEnum


class ConditionType(StrEnum):
    """`Pending`, `Validating`… `Cancelled`: exactly one of these phase conditions is True, the one
    named like `status.phase` (its reason is `status.reason`); the others are kept per type."""

    PENDING = "Pending"
    DATA_VALIDATED = "DataValidated"
    QUEUED = "Queued"
    SUSPENDED = "Suspended"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"
    DEGRADED = "Degraded"
    """True while the operator retries an API request the server could not serve (5xx, 429, timeouts)."""
    SERVING = "Serving"
    """True once the serving object of spec.serving reports Ready (status.serving)."""
    CHECKPOINT_CORRUPT = "CheckpointCorrupt"
    SPEC_IMMUTABLE = "SpecImmutable"
    INSUFFICIENT_GPU_MEMORY = "InsufficientGPUMemory"


class Reason(StrEnum):
    # validation
    SPEC_VALID = "SpecValid"
    INVALID_SPEC = "InvalidSpec"
    DATA_VALID = "DataValid"
    INVALID_DATA = "InvalidData"
    VALIDATING_DATA = "ValidatingData"
    # children
    JOB_CREATED = "JobCreated"
    CHILD_NAME_CONFLICT = "ChildNameConflict"
    JOB_RECREATED = "JobRecreated"
    CHILD_REJECTED = "ChildRejected"
    """The API server refused a child object (4xx): the message names the field."""
    CRD_MISSING = "CRDMissing"
    SERVICE_ACCOUNT_MISSING = "ServiceAccountMissing"
    SECRET_MISSING = "SecretMissing"
    POD_CREATION_FAILED = "PodCreationFailed"
    API_RETRYING = "APIRetrying"
    API_HEALTHY = "APIHealthy"
    # pending: the pod exists but the trainer has not started
    JOB_PENDING = "JobPending"
    UNSCHEDULABLE = "Unschedulable"
    IMAGE_PULL_FAILED = "ImagePullFailed"
    CONTAINER_CONFIG_ERROR = "ContainerConfigError"
    CRASH_LOOP_BACK_OFF = "CrashLoopBackOff"
    POD_STARTING = "PodStarting"
    # queueing and suspension
    WAITING_FOR_ADMISSION = "WaitingForAdmission"
    SUSPENDED_BY_USER = "SuspendedByUser"
    # running and finished
    TRAINING_STARTED = "TrainingStarted"
    TRAINING_SUCCEEDED = "TrainingSucceeded"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    PERMANENT_ERROR = "PermanentError"
    INCOMPATIBLE_TEACHER = "IncompatibleTeacher"
    STORAGE_ERROR = "StorageError"
    TOO_MANY_RECREATIONS = "TooManyRecreations"
    SPEC_LOST = "SpecLost"
    """The trainer Job is gone, and so is the ConfigMap with the spec it started from, and the spec changed since."""
    SPEC_CHANGED = "SpecChanged"
    """The spec was edited before training started: the Job was rebuilt from the new spec."""
    CANCELLED_BY_USER = "CancelledByUser"
    # Serving (spec.serving), the Serving condition's reasons
    SERVING_CREATED = "ServingCreated"
    SERVING_READY = "ServingReady"
    SERVING_NOT_READY = "ServingNotReady"
    SERVING_FAILED = "ServingFailed"
    SERVING_CRD_MISSING = "ServingCRDMissing"
    ADAPTER_REGISTERED = "AdapterRegistered"
    # warnings
    CHECKPOINT_CORRUPT = "CheckpointCorrupt"
    SPEC_IMMUTABLE = "SpecImmutable"
    INSUFFICIENT_GPU_MEMORY = "InsufficientGPUMemory"
