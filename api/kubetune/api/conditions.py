"""Condition types and reasons written to `.status.conditions`.

Reasons are CamelCase constants (Kubernetes convention) so that dashboards, Argo CD health
checks and alerts can match on them; free text goes into the message only.
"""

from __future__ import annotations

from kubetune.api.enums import StrEnum


class ConditionType(StrEnum):
    VALIDATED = "Validated"
    DATA_VALIDATED = "DataValidated"
    QUEUED = "Queued"
    SUSPENDED = "Suspended"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CHECKPOINT_CORRUPT = "CheckpointCorrupt"
    SPEC_IMMUTABLE = "SpecImmutable"


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
    # warnings
    CHECKPOINT_CORRUPT = "CheckpointCorrupt"
    SPEC_IMMUTABLE = "SpecImmutable"
