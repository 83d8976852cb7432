"""kubetune.api: the FineTuneJob API as pydantic models, the single source of the CRD.

Everything else (operator, trainer, CLI, chart) speaks these types. This package imports neither
the operator nor the trainer (an import-linter contract in the test suite enforces it).
"""

from kubetune.api.conditions import ConditionType, Reason
from kubetune.api.enums import Adaptation, Objective, Optimizer, Phase
from kubetune.api.resource import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    FineTuneJob,
    Problem,
    parse_manifest,
    parse_spec,
)
from kubetune.api.spec import FineTuneJobSpec
from kubetune.api.status import FineTuneJobStatus

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "Adaptation",
    "ConditionType",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "Objective",
    "Optimizer",
    "Phase",
    "Problem",
    "Reason",
    "parse_manifest",
    "parse_spec",
]
