"""The names of every method, objective term and optimizer kubetune offers.

These enums are the contract between the API and the trainer: the trainer keeps one registry per
enum and a test asserts that the registry keys equal the enum values, so a name cannot be
accepted by the API without being implemented (peft does the same for `PeftType`).
The meaning of each name is fixed by shared/METHODS.md.
"""

from __future__ import annotations

from enum import Enum


class StrEnum(str, Enum):
    """A str-valued enum whose `str()` is its value (Python 3.10 has no enum.StrEnum)."""

    def __str__(self) -> str:
        return str(self.value)


class Adaptation(StrEnum):
    """Which parameters train."""

    FULL = "full"
    LAYERS = "layers"
    TRANSFER = "transfer"
    GRADUAL_UNFREEZE = "gradualUnfreeze"
    LORA = "lora"
    QLORA = "qlora"
    DORA = "dora"
    IA3 = "ia3"
    PREFIX_TUNING = "prefixTuning"
    PROMPT_TUNING = "promptTuning"


class TrainingType(StrEnum):
    """What the training optimises: supervised cross-entropy, a preference loss, or GRPO rewards."""

    SUPERVISED = "supervised"
    DPO = "dpo"
    ORPO = "orpo"
    KTO = "kto"
    GRPO = "grpo"


class DPOLoss(StrEnum):
    """TRL's DPO loss variants offered (DPOConfig.loss_type)."""

    SIGMOID = "sigmoid"
    HINGE = "hinge"
    IPO = "ipo"
    ROBUST = "robust"


class GraderType(StrEnum):
    """GRPO graders, as OpenAI's reinforcement fine-tuning API names them."""

    STRING_CHECK = "stringCheck"
    TEXT_SIMILARITY = "textSimilarity"
    REGEX = "regex"
    JSON_SCHEMA = "jsonSchema"
    PYTHON = "python"
    MULTI = "multi"


class StringCheckOperation(StrEnum):
    EQ = "eq"
    NE = "ne"
    LIKE = "like"
    ILIKE = "ilike"


class SimilarityMetric(StrEnum):
    """Names as in trainer/kubetune/trainer/textmetrics.SIMILARITY (and OpenAI's evaluation_metric)."""

    EXACT_MATCH = "exact_match"
    BLEU = "bleu"
    ROUGE_L = "rouge_l"
    CHRF = "chrf"
    FUZZY_MATCH = "fuzzy_match"


class Objective(StrEnum):
    """Terms added to the causal-LM cross-entropy."""

    DISTILLATION = "distillation"
    REWEIGHTING = "reweighting"
    ADVERSARIAL = "adversarial"
    ATTENTION_GUIDANCE = "attentionGuidance"


class Optimizer(StrEnum):
    ADAMW = "adamw"
    ADAMW_8BIT = "adamw8bit"
    PAGED_ADAMW = "pagedAdamw"
    LAMB = "lamb"
    LARS = "lars"


class DatasetFormat(StrEnum):
    CHAT = "chat"
    PROMPT_COMPLETION = "promptCompletion"
    INSTRUCTION = "instruction"
    TEXT = "text"


class OverlengthPolicy(StrEnum):
    TRUNCATE = "truncate"
    DROP = "drop"
    ERROR = "error"


class PiiPolicy(StrEnum):
    """What to do with personal data and secrets found in the dataset (spec.dataset.pii)."""

    ALLOW = "allow"
    WARN = "warn"
    REDACT = "redact"
    REFUSE = "refuse"


class EvalMetric(StrEnum):
    """A score of generated answers against the held-out references (spec.evaluation.metrics)."""

    EXACT_MATCH = "exactMatch"
    ROUGE_L = "rougeL"
    BLEU = "bleu"
    CHRF = "chrf"
    JSON_VALID = "jsonValid"
    REGEX = "regex"


class Scheduler(StrEnum):
    LINEAR = "linear"
    COSINE = "cosine"
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constantWithWarmup"
    SLANTED_TRIANGULAR = "slantedTriangular"


class Precision(StrEnum):
    AUTO = "auto"
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"
    PURE_BF16 = "pureBf16"  # bf16 weights, gradients and optimizer state: no fp32 master copy


class OutputFormat(StrEnum):
    ADAPTER = "adapter"
    MERGED = "merged"


class ServingEngine(StrEnum):
    KSERVE = "kserve"
    VLLM = "vllm"
    VLLM_ENDPOINT = "vllmEndpoint"


class LayerModule(StrEnum):
    ATTENTION = "attention"
    MLP = "mlp"
    NORM = "norm"
    EMBEDDINGS = "embeddings"
    HEAD = "head"


class PromptInit(StrEnum):
    SAMPLE_VOCAB = "sampleVocab"
    TEXT = "text"
    RANDOM = "random"


class KLDirection(StrEnum):
    FORWARD = "forward"
    REVERSE = "reverse"


class GuideSource(StrEnum):
    TEACHER = "teacher"
    DIAGONAL = "diagonal"
    SPANS = "spans"


class GradientEstimator(StrEnum):
    AUTO = "auto"
    VMAP = "vmap"
    JVP = "jvp"
    FINITE_DIFFERENCE = "finiteDifference"


class QuantType(StrEnum):
    NF4 = "nf4"
    FP4 = "fp4"


class ComputeDtype(StrEnum):
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT32 = "float32"


class Phase(StrEnum):
    PENDING = "Pending"
    VALIDATING = "Validating"
    QUEUED = "Queued"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    CANCELLED = "Cancelled"
