"""Names, labels and annotations the operator's children carry, in one place.

The builders write them (`kubetune.operator.builders`, `kubetune.operator.serving`), the
reconciliation and the handlers read them back (`kubetune.operator.reconcile`, the watch caches'
label selectors, adoption after a 409): both sides import them from here, so a renamed label
cannot leave one side looking for what the other no longer writes.

Child names are deterministic (`child_name`): a restarted operator finds, not duplicates, what it
created (RELIABILITY O1).
"""

from __future__ import annotations

import hashlib
import re

# ------------------------------------------------------------------------------- labels

MANAGED_BY_LABEL, MANAGED_BY = "app.kubernetes.io/managed-by", "kubetune-operator"
"""On every child and pod template: the operator's watch caches select its Jobs and pods by it."""
APP_LABEL, APP = "app.kubernetes.io/name", "kubetune"
INSTANCE_LABEL = "app.kubernetes.io/instance"
FINETUNEJOB_LABEL = "kubetune.io/finetunejob"
"""The owning FineTuneJob's name (as a label value): serving objects kept after their owner is
gone (`spec.serving.retain`) are recognised as ours by it."""
ROLE_LABEL = "kubetune.io/role"
"""What a child is for: `train`, `validate`, `spec` (the spec ConfigMap) or `serving`."""

JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
"""The Job controller's label on the pods of a Job (Kubernetes ≥ 1.27)."""
POD_JOB_LABEL = "job-name"
"""The Job controller's older label on the pods of a Job, still set; the operator lists pods by it."""
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
VOLCANO_GROUP_ANNOTATION = "scheduling.k8s.io/group-name"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"

SPEC_DIGEST_ANNOTATION = "kubetune.io/spec-sha256"
"""On the trainer pod template and the spec ConfigMap: the digest of the spec the Job was built
from (`kubetune.api.crd.spec_digest`); reconciliation compares it with the current spec."""
SPEC_KEY = "spec.json"
"""The key of the spec ConfigMap that holds the FineTuneJob as the trainer reads it."""

CONTAINER = "trainer"
"""The trainer container of every trainer and validation pod; its termination message is read."""

# ---------------------------------------------------------------------------- child names

TRAIN, VALIDATE = "train", "validate"
"""Roles of the two Jobs, and the suffixes of their names."""

NAME_MAX = 63
# Pods of an Indexed Job get the hostname `<job>-<index>`, which must also be a 63-character
# label: keep room for "-511" (spec.resources.nodes ≤ 512).
CHILD_NAME_MAX = NAME_MAX - len("-511")
HASH_LEN = 8
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_LEN]


def child_name(owner_name: str, suffix: str) -> str:
    """`<owner>-<suffix>`, or a truncated owner + a hash of the full name when that won't do.

    The plain form is used when the owner is already a DNS-1035 label (Service names need a
    leading letter) and the result fits; otherwise dots and other characters become '-', the
    stem is cut, and 8 hex digits of sha256(owner) keep names that share a prefix distinct.
    """
    if not _DNS1035.match(suffix):
        raise ValueError(f"suffix {suffix!r} must be a DNS-1035 label")
    plain = f"{owner_name}-{suffix}"
    if len(plain) <= CHILD_NAME_MAX and _DNS1035.match(owner_name):
        return plain
    room = CHILD_NAME_MAX - len(suffix) - HASH_LEN - 2
    stem = re.sub(r"[^a-z0-9]+", "-", owner_name.lower()).strip("-")
    if not stem[:1].isalpha():
        stem = "ftj-" + stem
    stem = stem[:room].rstrip("-")
    return f"{stem}-{_short_hash(owner_name)}-{suffix}"


def trainer_job_name(owner_name: str) -> str:
    """The trainer Job (and its headless Service and PodGroup) of FineTuneJob `owner_name`."""
    return child_name(owner_name, TRAIN)


def validation_job_name(owner_name: str) -> str:
    """The data validation Job of FineTuneJob `owner_name`."""
    return child_name(owner_name, VALIDATE)


def label_value(name: str) -> str:
    """An object name as a label value (≤ 63 characters), hashed like `child_name` when long."""
    if len(name) <= NAME_MAX:
        return name
    return f"{name[: NAME_MAX - HASH_LEN - 1].rstrip('-.')}-{_short_hash(name)}"


def child_labels(owner_name: str, role: str) -> dict[str, str]:
    """Standard labels of every child of FineTuneJob `owner_name`; `role` as ROLE_LABEL says."""
    name = label_value(owner_name)
    return {
        APP_LABEL: APP,
        MANAGED_BY_LABEL: MANAGED_BY,
        INSTANCE_LABEL: name,
        FINETUNEJOB_LABEL: name,
        ROLE_LABEL: role,
    }


def role_selector(owner_name: str, role: str) -> dict[str, str]:
    """The labels that select FineTuneJob `owner_name`'s children of `role` (pods of a Deployment)."""
    return {FINETUNEJOB_LABEL: label_value(owner_name), ROLE_LABEL: role}
