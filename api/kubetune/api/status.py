"""The FineTuneJob status: what the operator observed, written through the status subresource.

Only the operator writes it. Every field here is in the CRD's status schema; a field missing
there would be pruned silently by the API server, which the real-apiserver tier test catches.
"""

from __future__ import annotations

from typing import Any, Optional

from kubetune.api._base import WireModel
from kubetune.api.conditions import ConditionType, Reason
from kubetune.api.enums import Phase
from pydantic import Field, field_validator

CHECKPOINTS_MAX = 20
"""status.checkpoints holds at most this many (the newest)."""


class Condition(WireModel):
    """A Kubernetes-style condition."""

    type: ConditionType = Field(description="Condition type, e.g. DataValidated, Running, Succeeded, Failed.")
    status: str = Field(pattern="^(True|False|Unknown)$", description="True, False or Unknown.")
    reason: Reason = Field(description="Machine-readable CamelCase reason.")
    message: str = Field(default="", max_length=32768, description="Human-readable details.")
    last_transition_time: str = Field(
        description="When status last changed (RFC 3339).", json_schema_extra={"format": "date-time"}
    )
    observed_generation: Optional[int] = Field(
        default=None, ge=0, description="metadata.generation this condition was computed from."
    )


class Progress(WireModel):
    """Training progress, scraped from the trainer's metrics."""

    step: int = Field(default=0, ge=0, description="Optimizer steps done.")
    total_steps: Optional[int] = Field(default=None, ge=0, description="Optimizer steps planned.")
    epoch: Optional[float] = Field(default=None, ge=0, description="Fractional epoch reached.")
    percent: Optional[float] = Field(default=None, ge=0, le=100, description="Share of steps done, 0–100.")
    eta_seconds: Optional[int] = Field(default=None, ge=0, description="Estimated seconds to completion.")
    eta: Optional[str] = Field(
        default=None,
        max_length=16,
        description="etaSeconds for people, e.g. 1h05m or 42s (the ETA column of kubectl get ftj).",
    )


class JudgeScore(WireModel):
    """The LLM judge's pairwise verdicts on the samples, each judged twice with positions swapped."""

    tuned_wins: int = Field(
        default=0, ge=0, description="Samples where the tuned answer won both orders (or won one and tied the other)."
    )
    base_wins: int = Field(default=0, ge=0, description="Samples where the base answer won.")
    ties: int = Field(
        default=0,
        ge=0,
        description="Samples judged even, including a judge that preferred the same position in both orders.",
    )
    failed: int = Field(default=0, ge=0, description="Samples whose verdict could not be obtained or read.")
    win_rate: Optional[float] = Field(default=None, ge=0, le=1, description="(tunedWins + ties/2) / judged samples.")
    model: Optional[str] = Field(default=None, max_length=253, description="The judge model.")


class GenerationMetrics(WireModel):
    """spec.evaluation.samples answered by the base and the tuned model and scored against the references."""

    samples: int = Field(default=0, ge=0, description="Samples generated (rows of eval/samples.jsonl).")
    base: dict[str, float] = Field(
        default_factory=dict,
        description="Mean score of the base model's answers per metric (exactMatch, rougeL, bleu, chrf, jsonValid, regex), 0..1.",
    )
    tuned: dict[str, float] = Field(
        default_factory=dict, description="Mean score of the tuned model's answers per metric, 0..1."
    )
    judge: Optional[JudgeScore] = Field(default=None, description="The LLM judge's verdicts (spec.evaluation.judge).")


class Metrics(WireModel):
    """Training and evaluation numbers."""

    train_loss: Optional[float] = Field(default=None, description="Latest training loss.")
    eval_loss: Optional[float] = Field(default=None, description="Held-out loss of the tuned model.")
    base_eval_loss: Optional[float] = Field(
        default=None, description="Held-out loss of the base model before training (A/B baseline)."
    )
    perplexity: Optional[float] = Field(default=None, description="exp(evalLoss).")
    token_accuracy: Optional[float] = Field(
        default=None, ge=0, le=1, description="Share of held-out label tokens predicted exactly."
    )
    tokens_per_second: Optional[float] = Field(
        default=None, ge=0, description="Training throughput in non-padding tokens per second."
    )
    preference_accuracy: Optional[float] = Field(
        default=None,
        ge=0,
        le=1,
        description="dpo, orpo, kto: share of held-out preference pairs whose preferred answer the tuned model gives the higher mean token log-probability.",
    )
    base_preference_accuracy: Optional[float] = Field(
        default=None, ge=0, le=1, description="The same for the base model (A/B baseline)."
    )
    mean_reward: Optional[float] = Field(
        default=None,
        description="grpo: mean weighted grader reward of the tuned model's greedy answers to the held-out prompts.",
    )
    base_mean_reward: Optional[float] = Field(default=None, description="The same for the base model (A/B baseline).")
    objectives: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "Per-objective numbers, e.g. kdLoss, adversarialKl, attentionLoss, weightEntropy; with method.type dpo, orpo, kto "
            "or grpo the trainer's numbers: rewardsChosen, rewardsRejected, rewardsMargins, rewardsAccuracies, reward, "
            "rewardStd, kl, completionsMeanLength, reward/<grader>/mean and /std."
        ),
    )
    generation: Optional[GenerationMetrics] = Field(
        default=None,
        description="Base vs tuned scores of generated answers to held-out prompts (spec.evaluation.samples and metrics).",
    )


class DataReportSummary(WireModel):
    """The dataset report's headline numbers; the whole report is data-report.json in the output."""

    examples: Optional[int] = Field(default=None, ge=0, description="Training examples after the validation split.")
    validation_examples: Optional[int] = Field(default=None, ge=0, description="Held-out examples.")
    tokens: Optional[int] = Field(
        default=None,
        ge=0,
        description="Tokens in the training examples (estimated at 4 characters each without the tokenizer).",
    )
    over_max_seq_length: Optional[int] = Field(
        default=None, ge=0, description="Training examples longer than maxSeqLength."
    )
    duplicates: Optional[int] = Field(
        default=None, ge=0, description="Training examples that repeat an earlier one exactly."
    )
    near_duplicates: Optional[int] = Field(
        default=None, ge=0, description="Training examples nearly identical to an earlier one (MinHash, Jaccard ≥ 0.8)."
    )
    overlap: Optional[int] = Field(
        default=None, ge=0, description="Validation examples found verbatim in the training set (leakage)."
    )
    near_overlap: Optional[int] = Field(
        default=None, ge=0, description="Validation examples nearly identical to a training example."
    )
    pii_findings: Optional[int] = Field(
        default=None,
        ge=0,
        alias="piiFindings",
        description="Possible PII and secrets found (e-mail, phone, credit card, IBAN, IP, keys).",
    )
    pii_policy: Optional[str] = Field(
        default=None,
        max_length=16,
        alias="piiPolicy",
        description="spec.dataset.pii as applied: allow, warn, redact or refuse.",
    )
    estimated_training_tokens: Optional[int] = Field(
        default=None, ge=0, description="Tokens trained on over the chosen epochs."
    )
    estimated_gpu_hours: Optional[float] = Field(
        default=None,
        ge=0,
        alias="estimatedGPUHours",
        description="A rough GPU-hour estimate from the model's size and the training tokens.",
    )
    estimated_usd: Optional[float] = Field(
        default=None, ge=0, alias="estimatedUSD", description="estimatedGPUHours × the price per GPU-hour."
    )


class CheckpointRef(WireModel):
    """A committed checkpoint (its manifest verified)."""

    step: int = Field(ge=0, description="Optimizer step of the checkpoint.")
    uri: str = Field(max_length=2048, description="Location of the checkpoint directory.")
    loss: Optional[float] = Field(default=None, description="Training loss at that step.")
    time: Optional[str] = Field(
        default=None, description="When it was committed (RFC 3339).", json_schema_extra={"format": "date-time"}
    )


class AdapterRef(WireModel):
    """The final result in object storage."""

    uri: str = Field(max_length=2048, description="Location of the adapter (or merged model) directory.")
    manifest_uri: Optional[str] = Field(
        default=None, max_length=2048, description="Location of manifest.json, written last."
    )
    sha256: Optional[str] = Field(default=None, pattern="^[0-9a-f]{64}$", description="sha256 of manifest.json.")
    bytes: Optional[int] = Field(default=None, ge=0, description="Total size of the adapter files.")
    merged_uri: Optional[str] = Field(
        default=None,
        max_length=2048,
        description="A merged full model written beside the adapter for serving (spec.serving with an adaptation engines cannot load as a LoRA adapter).",
    )


class ServingStatus(WireModel):
    """Where the tuned model is served (spec.serving) and whether it is ready."""

    engine: str = Field(max_length=32, description="kserve, vllm or vllmEndpoint.")
    kind: Optional[str] = Field(
        default=None,
        max_length=63,
        description="The serving object: LLMInferenceService, InferenceService, Deployment, or VLLMEndpoint for a registration.",
    )
    name: Optional[str] = Field(
        default=None, max_length=253, description="Name of the serving object in the job's namespace."
    )
    url: Optional[str] = Field(
        default=None, max_length=2048, description="OpenAI-compatible base URL (…/v1) of the endpoint, once known."
    )
    model: Optional[str] = Field(default=None, max_length=253, description="The model name to put in requests.")
    merged: bool = Field(
        default=False,
        description="Served as a merged full model (true for adaptations engines cannot load as a LoRA adapter).",
    )
    ready: bool = Field(default=False, description="The serving object reports Ready (from its own conditions).")
    message: Optional[str] = Field(
        default=None, max_length=32768, description="Why it is not ready, from the serving object."
    )


class Cost(WireModel):
    """What the run cost, from GPU time, the configured price and NVML power samples."""

    gpu_hours: Optional[float] = Field(
        default=None, ge=0, description="GPU-hours consumed (pods × GPUs × hours running)."
    )
    estimated_usd: Optional[float] = Field(
        default=None, ge=0, alias="estimatedUSD", description="gpuHours × the operator's configured price per GPU-hour."
    )
    energy_kwh: Optional[float] = Field(
        default=None, ge=0, alias="energyKWh", description="GPU energy from NVML power samples, when reported."
    )
    co2_kg: Optional[float] = Field(default=None, ge=0, description="energyKWh × the configured grid carbon intensity.")


class ResolvedHyperparameters(WireModel):
    """The numbers the trainer resolved from `auto` and the defaults; it reports them in its
    summary and its `kubetune_trainer_effective_info` metric (kubetune.api.contract)."""

    epochs: Optional[int] = Field(default=None, ge=1, description="Resolved epochs.")
    learning_rate: Optional[float] = Field(default=None, gt=0, description="Resolved peak learning rate.")
    batch_size: Optional[int] = Field(default=None, ge=1, description="Resolved per-device batch size.")
    gradient_accumulation: Optional[int] = Field(default=None, ge=1, description="Resolved gradient accumulation.")
    precision: Optional[str] = Field(default=None, max_length=16, description="Resolved precision.")
    weights_dtype: Optional[str] = Field(
        default=None,
        max_length=32,
        description="The dtype the trained parameters were kept in (float32 master weights unless precision is pureBf16).",
    )
    compute_dtype: Optional[str] = Field(
        default=None,
        max_length=32,
        description="The dtype the forward and backward computed in (the autocast dtype, or the weights').",
    )
    max_seq_length: Optional[int] = Field(default=None, ge=1, description="Resolved maximum sequence length.")
    validation_split: Optional[float] = Field(
        default=None, ge=0, le=0.5, description="Resolved validation split (0 with a validation file)."
    )
    parameters: Optional[int] = Field(default=None, ge=0, description="Parameter count of the base model, when known.")
    checkpoint_every_steps: Optional[int] = Field(default=None, ge=1, description="Resolved checkpoint interval.")
    target_modules: Optional[list[str]] = Field(
        default=None,
        max_length=1024,
        description="Modules the adapter wraps (lora, dora, qlora, ia3): the spec's list, the family default, or all-linear written out.",
    )
    target_parameters: Optional[list[str]] = Field(
        default=None,
        max_length=1024,
        description="Fused mixture-of-experts parameters the LoRA adapter wraps (e.g. experts.gate_up_proj).",
    )
    feedforward_modules: Optional[list[str]] = Field(
        default=None,
        max_length=1024,
        description="IA3: the targets scaled on their input.",
    )
    lora_dropout: Optional[float] = Field(
        default=None, ge=0, lt=1, description="Resolved LoRA dropout (0 where fused experts are adapted)."
    )

    @field_validator("target_modules", "target_parameters", "feedforward_modules", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        """The metric labels carry lists as comma-separated strings."""
        return [v for v in value.split(",") if v] if isinstance(value, str) else value


class Effective(ResolvedHyperparameters):
    """The settings kubetune actually used, with every default and `auto` resolved: the operator
    records the image, GPUs and the memory estimate; the trainer reports the rest once it resolved them."""

    image: Optional[str] = Field(default=None, max_length=1024, description="Trainer image.")
    gpus: Optional[int] = Field(default=None, ge=0, description="GPUs per node.")
    nodes: Optional[int] = Field(default=None, ge=1, description="Nodes.")
    estimated_gpu_memory_gib: Optional[float] = Field(
        default=None,
        ge=0,
        alias="estimatedGPUMemoryGiB",
        description="Estimated GPU memory per GPU, from parameters, method and sequence length.",
    )


class ErrorInfo(WireModel):
    """Why the job failed, in the shape of the OpenAI fine-tuning job object's `error`."""

    code: Reason = Field(
        description="The Failed condition's reason, e.g. InvalidData, InvalidSpec, StorageError, BackoffLimitExceeded."
    )
    message: str = Field(
        default="", max_length=32768, description="What went wrong and what to do, credentials redacted."
    )
    param: Optional[str] = Field(
        default=None,
        max_length=1024,
        description="The spec field (e.g. spec.dataset.train) or the data file and line (file:line) the error is about, when known.",
    )


class FineTuneJobStatus(WireModel):
    """Observed state, written by the operator only."""

    phase: Optional[Phase] = Field(
        default=None,
        description="Pending, Validating, Queued, Running, Succeeded, Failed, Suspended or Cancelled.",
    )
    reason: Optional[Reason] = Field(
        default=None,
        description="Why the job is in its phase, e.g. Unschedulable, ImagePullFailed, TrainingStarted, ChildRejected, InvalidData: the reason of the phase's condition.",
    )
    message: Optional[str] = Field(
        default=None, max_length=32768, description="The phase condition's message: what is happening and what to do."
    )
    conditions: list[Condition] = Field(default_factory=list, description="Latest observations, one per type.")
    error: Optional[ErrorInfo] = Field(
        default=None, description="Why the job failed (code, message, param); unset unless the phase is Failed."
    )
    observed_generation: Optional[int] = Field(
        default=None, ge=0, description="metadata.generation the status reflects."
    )
    progress: Optional[Progress] = Field(default=None, description="Training progress.")
    metrics: Optional[Metrics] = Field(default=None, description="Training and evaluation metrics.")
    checkpoints: list[CheckpointRef] = Field(
        default_factory=list, max_length=CHECKPOINTS_MAX, description="The newest committed checkpoints, oldest first."
    )
    adapter: Optional[AdapterRef] = Field(default=None, description="The result, once written with its manifest.")
    serving: Optional[ServingStatus] = Field(
        default=None, description="Where the result is served (spec.serving), once the job succeeded."
    )
    cost: Optional[Cost] = Field(default=None, description="GPU-hours, estimated price, energy and CO2.")
    data_report: Optional[DataReportSummary] = Field(
        default=None,
        description="The dataset report's summary from the validation Job (then the trainer): duplicates, leakage, PII, estimates.",
    )
    job_name: Optional[str] = Field(default=None, max_length=63, description="Name of the trainer Job.")
    spec_config_map: Optional[str] = Field(
        default=None,
        max_length=253,
        description="The immutable ConfigMap holding the spec the trainer Job was built from; a Job recreated after a loss is built from it, never from an edited spec.",
    )
    start_time: Optional[str] = Field(
        default=None, description="When training started (RFC 3339).", json_schema_extra={"format": "date-time"}
    )
    completion_time: Optional[str] = Field(
        default=None, description="When the job finished (RFC 3339).", json_schema_extra={"format": "date-time"}
    )
    retries: int = Field(default=0, ge=0, description="Retriable failures so far.")
    recreations: int = Field(
        default=0,
        ge=0,
        description="Times the trainer Job was recreated after someone else deleted it; each run resumes from the newest committed checkpoint.",
    )
    effective: Optional[Effective] = Field(
        default=None, description="The settings actually used, defaults and auto resolved."
    )
    kopf: Optional[dict[str, Any]] = Field(
        default=None,
        description=(
            "The operator's own bookkeeping, not for users: kopf's handler progress and the spec it last handled. Kept in "
            "status rather than in annotations, so a FineTuneJob whose annotations are near Kubernetes' 256 KiB limit "
            "still gets a status."
        ),
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
