"""OpenAI's fine-tuning objects as pydantic models: what `kubetune api` sends and accepts.

Shapes follow the official `openai` client (shared/OPENAI_API.md): it parses every response into
its own types, so a field renamed here breaks users' code. Responses may carry more than the
client reads, never less. The job-create request refuses unknown fields (OpenAI's "Unrecognized
request argument") and carries OpenAI's limits, so a request OpenAI would refuse is refused here
too, with `param` naming the field.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, Optional, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
"""The client's enum; it has no `paused` (a paused job is reported as described in translate.py)."""

Auto = Literal["auto"]
SUFFIX_PATTERN = r"^[A-Za-z0-9_.-]+$"
"""The suffix becomes a segment of `ft:<base>:<org>:<suffix>:<id>`: no colons, no spaces."""
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------------ errors


class ErrorBody(_Out):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorEnvelope(_Out):
    error: ErrorBody


# ------------------------------------------------------------------------------------ files


class FileObject(_Out):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: Optional[str] = None
    expires_at: Optional[int] = None


class FileDeleted(_Out):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


FILE_PURPOSES = ("fine-tune", "batch", "assistants", "vision", "user_data", "evals")
"""What files.create accepts as `purpose`; only `fine-tune` files can train."""


# ------------------------------------------------------------------------------------ jobs


class Hyperparameters(_In):
    """Each `"auto"` or a number, as OpenAI takes them."""

    batch_size: Union[Auto, int] = Field(default="auto", description='Examples per step, or "auto".')
    learning_rate_multiplier: Union[Auto, float] = Field(
        default="auto", description='Scales kubetune\'s default learning rate for the method, or "auto" (1).'
    )
    n_epochs: Union[Auto, int] = Field(default="auto", description='Passes over the training data, or "auto" (3).')

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v: Any) -> Any:
        if v != "auto" and not 1 <= v <= 256:
            raise ValueError('must be between 1 and 256, or "auto"')
        return v

    @field_validator("n_epochs")
    @classmethod
    def _epochs(cls, v: Any) -> Any:
        if v != "auto" and not 1 <= v <= 50:
            raise ValueError('must be between 1 and 50, or "auto"')
        return v

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _lr(cls, v: Any) -> Any:
        if v != "auto" and not 0 < v <= 10:
            raise ValueError('must be greater than 0 and at most 10, or "auto"')
        return v


class DpoHyperparameters(Hyperparameters):
    beta: Union[Auto, float] = Field(
        default="auto", description='Weight of the penalty against the reference model, or "auto" (0.1).'
    )

    @field_validator("beta")
    @classmethod
    def _beta(cls, v: Any) -> Any:
        if v != "auto" and not 0 < v <= 2:
            raise ValueError('must be greater than 0 and at most 2, or "auto"')
        return v


class SupervisedMethod(_In):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class DpoMethod(_In):
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class Method(_In):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: Optional[SupervisedMethod] = None
    dpo: Optional[DpoMethod] = None
    reinforcement: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _block_matches_type(self) -> Method:
        for name in ("supervised", "dpo", "reinforcement"):
            if getattr(self, name) is not None and name != self.type:
                raise ValueError(f"the {name} block belongs to type {name!r}, not {self.type!r}")
        return self


class JobCreate(_In):
    """`POST /fine_tuning/jobs`."""

    model: str = Field(min_length=1, max_length=512)
    training_file: str = Field(min_length=1, max_length=256)
    validation_file: Optional[str] = Field(default=None, min_length=1, max_length=256)
    hyperparameters: Optional[Hyperparameters] = None
    method: Optional[Method] = None
    seed: Optional[int] = Field(default=None, ge=0, le=2**31 - 1)
    suffix: Optional[str] = Field(default=None, min_length=1, max_length=64, pattern=SUFFIX_PATTERN)
    metadata: Optional[dict[str, str]] = None
    integrations: Optional[list[dict[str, Any]]] = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: Optional[dict[str, str]]) -> Optional[dict[str, str]]:
        if v is None:
            return v
        if len(v) > METADATA_PAIRS:
            raise ValueError(f"at most {METADATA_PAIRS} key-value pairs")
        for key, value in v.items():
            if not 1 <= len(key) <= METADATA_KEY_CHARS:
                raise ValueError(f"key {key[:80]!r}: keys are 1 to {METADATA_KEY_CHARS} characters")
            if len(value) > METADATA_VALUE_CHARS:
                raise ValueError(f"value of {key!r}: values are at most {METADATA_VALUE_CHARS} characters")
        return v

    @field_validator("integrations")
    @classmethod
    def _integrations(cls, v: Optional[list]) -> Optional[list]:
        if v:
            raise ValueError(
                "integrations (Weights & Biases) are not offered by kubetune; leave it out and read "
                "the job's events and checkpoints, or the trainer's Prometheus metrics"
            )
        return v

    @model_validator(mode="after")
    def _one_hyperparameter_home(self) -> JobCreate:
        if self.hyperparameters is not None and self.method is not None and self.method.type != "supervised":
            raise ValueError(
                "hyperparameters (deprecated) apply to supervised jobs only; put them under "
                f"method.{self.method.type}.hyperparameters"
            )
        if (
            self.hyperparameters is not None
            and self.method is not None
            and self.method.supervised is not None
            and "hyperparameters" in self.method.supervised.model_fields_set
        ):
            raise ValueError(
                "hyperparameters given twice: keep method.supervised.hyperparameters and drop the "
                "deprecated top-level hyperparameters"
            )
        return self

    def method_type(self) -> str:
        return self.method.type if self.method else "supervised"

    def effective_hyperparameters(self) -> Hyperparameters:
        """The hyper-parameters wherever they were given (method block, or the deprecated top level)."""
        if self.method is not None and self.method.type == "dpo":
            return self.method.dpo.hyperparameters if self.method.dpo else DpoHyperparameters()
        if self.method is not None and self.method.supervised is not None and self.hyperparameters is None:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()


class JobError(_Out):
    code: str
    message: str
    param: Optional[str] = None


class JobHyperparameters(_Out):
    batch_size: Union[Auto, int, None] = None
    learning_rate_multiplier: Union[Auto, float, None] = None
    n_epochs: Union[Auto, int, None] = None
    beta: Union[Auto, float, None] = None


class JobMethodOut(_Out):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: Optional[dict[str, Any]] = None
    dpo: Optional[dict[str, Any]] = None


class FineTuningJob(_Out):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: Optional[JobError] = None
    fine_tuned_model: Optional[str] = None
    finished_at: Optional[int] = None
    hyperparameters: JobHyperparameters
    model: str
    organization_id: str
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: JobStatus
    trained_tokens: Optional[int] = None
    training_file: str
    validation_file: Optional[str] = None
    integrations: Optional[list[dict[str, Any]]] = None
    estimated_finish: Optional[int] = None
    method: JobMethodOut
    metadata: Optional[dict[str, str]] = None
    user_provided_suffix: Optional[str] = None


class Event(_Out):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"] = "info"
    message: str
    data: Optional[dict[str, Any]] = None
    type: Literal["message", "metrics"] = "message"


class CheckpointMetrics(_Out):
    step: Optional[float] = None
    train_loss: Optional[float] = None
    train_mean_token_accuracy: Optional[float] = None
    valid_loss: Optional[float] = None
    valid_mean_token_accuracy: Optional[float] = None
    full_valid_loss: Optional[float] = None
    full_valid_mean_token_accuracy: Optional[float] = None


class Checkpoint(_Out):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: CheckpointMetrics


# ------------------------------------------------------------------------------------ models


class Model(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


# ------------------------------------------------------------------------------------ lists

T = TypeVar("T")


class ListPage(_Out, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False
    first_id: Optional[str] = None
    last_id: Optional[str] = None
