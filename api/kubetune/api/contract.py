"""The wire contract between the trainer pod and the operator, shared by both sides.

The trainer never talks to the Kubernetes API. It reports through three channels that the
operator reads: its exit code (permanent vs retriable failure), a JSON summary at the
termination-message path, and Prometheus metrics on a port. Both sides import these constants
from here, so the operator's podFailurePolicy and the trainer's exit code cannot disagree.
"""

from __future__ import annotations

PERMANENT_EXIT_CODE = 3
"""Exit code for errors that retrying cannot fix: bad spec, bad data, incompatible teacher,
refused model files, a lost commit race. The Job's podFailurePolicy maps it to FailJob."""

PREEMPTED_EXIT_CODE = 143
"""Exit code after a SIGTERM was handled (checkpoint written): retriable, 128 + SIGTERM."""

DEFAULT_METRICS_PORT = 9090
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
TERMINATION_PATH_ENV = "KUBETUNE_TERMINATION_PATH"
METRICS_PORT_ENV = "KUBETUNE_METRICS_PORT"
SUMMARY_MAX_BYTES = 4096
"""Kubernetes keeps at most 4 KiB of a termination message."""
