"""The FineTuneJob spec: what a user asks for, as pydantic models that generate the CRD.

This module is the single source of truth for the `spec` of a FineTuneJob. The CRD in `crds/`
is generated from it (`kubetune crd`), `kubectl explain` shows the `description` of every field
written here, and `kubetune validate`, the operator and the trainer all parse manifests with
these classes. Defaults live here in code and are reported in `status.effective`; the generator
strips them from the CRD so GitOps tools see no drift.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Optional

from kubetune.api._base import CEL_KEY, Rule, WireModel, cel, rules
from kubetune.api.enums import (
    Adaptation,
    ComputeDtype,
    DatasetFormat,
    DPOLoss,
    EvalMetric,
    GraderType,
    GradientEstimator,
    GuideSource,
    KLDirection,
    LayerModule,
    Objective,
    Optimizer,
    OutputFormat,
    OverlengthPolicy,
    PiiPolicy,
    Precision,
    PromptInit,
    QuantType,
    Scheduler,
    ServingEngine,
    SimilarityMetric,
    StringCheckOperation,
    TrainingType,
)
from kubetune.api.methods import ADAPTATIONS, OBJECTIVES, TRAINING_TYPES, Served, adaptations, learning_rate_defaults
from kubetune.api.pod import CREDENTIAL_KEYS, PodOverrides
from kubetune.api.types import (
    DNS_LABEL,
    DNS_SUBDOMAIN,
    LABEL_MAP_RULE,
    LABEL_VALUE,
    AutoInt,
    DataUri,
    LabelValue,
    ModelUri,
    OutputUri,
    PositiveNumber,
    QualifiedName,
    Quantity,
    ShortString,
    TaintKey,
    check_label_keys,
)
from pydantic import Field, field_validator, model_validator

# --------------------------------------------------------------------------------------- model


class ModelSource(WireModel):
    """Where a model (the base model, or a teacher) comes from."""

    source: ModelUri = Field(
        description=(
            "URI of the model: hf://org/name[@revision] (Hugging Face Hub), s3://bucket/path, "
            "gs://bucket/path, file:///abs/path or a plain path, pvc://claim/path (a mounted "
            "PersistentVolumeClaim), or builtin://tiny-llama (the tiny demo model, generated "
            "locally). Only safetensors weights are loaded."
        )
    )
    trust_remote_code: bool = Field(
        default=False,
        description=(
            "Run Python code shipped with the model (auto_map / *.py files). Off by default: "
            "model repositories are untrusted input."
        ),
    )


# ------------------------------------------------------------------------------------- dataset


class Dataset(WireModel):
    """The training data and how it is read."""

    model_config = WireModel.model_config | {
        "json_schema_extra": rules(
            Rule(
                "!(has(self.validation) && has(self.validationSplit))",
                "set either validation (a separate file) or validationSplit (a share of train), not both",
                lambda d: d.validation is None or d.validation_split is None,
                passes={"train": "s3://data/train.jsonl", "validation": "s3://data/val.jsonl"},
                fails={"train": "s3://data/train.jsonl", "validation": "s3://data/val.jsonl", "validationSplit": 0.1},
            )
        )
    }

    train: DataUri = Field(
        description="Location of the training file (JSON Lines): s3://, gs://, file://, pvc:// or https://."
    )
    validation: Optional[DataUri] = Field(
        default=None,
        description="Location of a separate validation file, in the same format as train.",
    )
    validation_split: Optional[float] = Field(
        default=None,
        gt=0,
        le=0.5,
        description=(
            "Share of train held out for evaluation when no validation file is given, in (0, 0.5]. "
            "Default 0.1, split with the job's seed."
        ),
    )
    format: DatasetFormat = Field(
        default=DatasetFormat.CHAT,
        description=(
            "Record format: chat (OpenAI `messages` with system/user/assistant roles), "
            "promptCompletion (`prompt` + `completion`), instruction (`instruction`, optional "
            "`input`, `output`), or text (`text`, loss on every token)."
        ),
    )
    max_seq_length: int = Field(
        default=2048,
        ge=16,
        le=1048576,
        description="Longest tokenised example, in tokens. Longer ones follow overlength.",
    )
    overlength: OverlengthPolicy = Field(
        default=OverlengthPolicy.TRUNCATE,
        description=(
            "What to do with examples longer than maxSeqLength: truncate them, drop them, or fail validation (error)."
        ),
    )
    packing: bool = Field(
        default=False,
        description=(
            "Pack several examples into one sequence of maxSeqLength tokens without attention "
            "across examples (position ids restart per example). Less padding, same loss."
        ),
    )
    min_examples: int = Field(
        default=50,
        ge=1,
        description=(
            "Fewer training examples than this is an error (fine-tuning on a handful of examples "
            "mostly memorises them). Below 500 a warning is printed."
        ),
    )
    prevalidate: bool = Field(
        default=True,
        description=(
            "Validate the data in a small CPU-only Job before any GPU is requested (phase "
            "Validating). Turn off only when the data was validated elsewhere."
        ),
    )
    pii: PiiPolicy = Field(
        default=PiiPolicy.WARN,
        exclude_if=lambda v: (
            v == PiiPolicy.WARN
        ),  # added after v0.1: at its default, out of the digest (see Evaluation)
        description=(
            "Personal data and secrets found in the examples (e-mail, phone, credit card, IBAN, IP address, API "
            "keys and tokens): allow (report only in data-report.json), warn (default: also a warning per finding), "
            "redact (replace each finding by a placeholder such as <EMAIL> before training; the redacted text is what "
            "trains) or refuse (fail validation naming FILE:LINE of each finding). Recorded in the output manifest."
        ),
    )


# ------------------------------------------------------------------------------- adaptations


class LayersConfig(WireModel):
    """Train only chosen layers and module kinds; everything else stays frozen."""

    indices: list[int] = Field(
        default_factory=lambda: [-1],
        max_length=1024,
        description=(
            "Transformer block indices to train; negative counts from the end (-1 is the last block). Default [-1]."
        ),
    )
    modules: list[LayerModule] = Field(
        default_factory=lambda: [LayerModule.ATTENTION, LayerModule.MLP, LayerModule.NORM],
        min_length=1,
        max_length=5,
        description=(
            "Module kinds to train: attention, mlp and norm inside the chosen blocks; "
            "embeddings and head are global (with tied embeddings, head is the embedding matrix). "
            "Default [attention, mlp, norm]."
        ),
    )


class TransferConfig(WireModel):
    """Linear probe: a frozen backbone in eval mode plus a trained head."""

    top_layers: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="Also train the top k transformer blocks (0 trains the head only).",
    )


class GradualUnfreezeConfig(WireModel):
    """ULMFiT gradual unfreezing: groups unfreeze top-down, one group per stage."""

    steps_per_stage: Optional[int] = Field(
        default=None,
        ge=1,
        description=(
            "Optimizer steps per stage. Unset: one epoch per stage (ULMFiT). Stage k trains the "
            "head + final norm, then the last k blocks; the embeddings unfreeze last."
        ),
    )
    discriminative_factor: Optional[float] = Field(
        default=None,
        ge=1,
        description=(
            "Discriminative learning rates: each lower group gets the rate of the group above "
            "divided by this factor (ULMFiT uses 2.6). Unset: one learning rate for all groups."
        ),
    )


class LoraConfig(WireModel):
    """LoRA (Hu et al. 2021): h = W0·x + (alpha/r)·B·A·x with B = 0 at start."""

    r: int = Field(default=16, ge=1, le=4096, description="Rank of the update matrices (8–64 typical). Default 16.")
    alpha: float = Field(
        default=32, gt=0, description="Scaling numerator: the update is scaled by alpha/r. Default 32."
    )
    dropout: float = Field(
        default=0.05,
        ge=0,
        lt=1,
        description="Dropout on the LoRA input. Default 0.05 (0 where fused mixture-of-experts weights are adapted: peft has no dropout there).",
    )
    target_modules: Optional[list[ShortString]] = Field(
        default=None,
        min_length=1,
        max_length=64,
        description=(
            "Module names to adapt: a layer's name or its dotted suffix (q_proj, v_proj in Llama; c_attn in GPT-2; "
            "query_key_value in GPT-NeoX and Falcon; qkv_proj in Phi-3), or [all-linear] for every linear layer but "
            "the output head (with Mixtral's fused experts and router, trained without dropout). A name that matches "
            "no layer is refused before the model loads, listing the model's names. Unset: the family's default "
            "from peft (q_proj, v_proj for Llama, Qwen, Mistral, Gemma; c_attn for GPT-2; query_key_value for "
            "GPT-NeoX, Falcon), all-linear for families peft has none for (Phi-3); status.effective.targetModules "
            "shows what was used."
        ),
    )


class DoraConfig(LoraConfig):
    """DoRA (Liu et al. 2024): LoRA on the direction plus a trained magnitude per output unit."""


class QLoraConfig(WireModel):
    """QLoRA (Dettmers et al. 2023): LoRA on a frozen 4-bit base model."""

    r: int = Field(default=64, ge=1, le=4096, description="Rank of the update matrices. Default 64.")
    alpha: float = Field(default=16, gt=0, description="Scaling numerator (alpha/r). Default 16.")
    dropout: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="Dropout on the LoRA input. Default 0.1 (0 where fused mixture-of-experts weights are adapted: peft has no dropout there).",
    )
    # The default stays a value (not None as in lora): all-linear fits every family, and the wire
    # form, hence the spec digest, of existing qlora jobs stays as it was.
    target_modules: list[ShortString] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        max_length=64,
        description=(
            "Module names to adapt (a layer's name or dotted suffix, as for lora), or [all-linear] for every linear "
            "layer but the output head (the QLoRA paper's choice). A name that matches no layer is refused before the "
            "model loads. Default [all-linear]."
        ),
    )
    quant_type: QuantType = Field(
        default=QuantType.NF4, description="4-bit data type: nf4 (NormalFloat) or fp4. Default nf4."
    )
    double_quant: bool = Field(
        default=True, description="Quantise the quantisation constants too (saves ≈0.4 bit/parameter). Default true."
    )
    compute_dtype: ComputeDtype = Field(
        default=ComputeDtype.BFLOAT16,
        description="Data type of the matmuls on dequantised weights. Default bfloat16 (float32 on CPU).",
    )


class IA3Config(WireModel):
    """IA3 (Liu et al. 2022): learned scaling vectors on keys, values and the feed-forward input."""

    target_modules: Optional[list[ShortString]] = Field(
        default=None,
        min_length=1,
        max_length=64,
        description=(
            "Modules whose activations are rescaled (a layer's name or dotted suffix), or [all-linear]. Unset: the "
            "family's default from peft (k_proj, v_proj, down_proj for Llama and Mistral; c_attn, mlp.c_proj for GPT-2; "
            "query_key_value, dense_4h_to_h for GPT-NeoX and Falcon), all-linear where peft has none (Phi-3). A name "
            "that matches no layer is refused before the model loads, listing the model's names."
        ),
    )
    feedforward_modules: Optional[list[ShortString]] = Field(
        default=None,
        max_length=64,
        description=(
            "The subset of targetModules that are feed-forward layers (scaled on their input). Unset: the family's "
            "feed-forward layers among the targets (down_proj for Llama; peft's table)."
        ),
    )


class PrefixTuningConfig(WireModel):
    """Prefix tuning (Li & Liang 2021, P-tuning v2): trained key/value prefixes in every layer."""

    num_virtual_tokens: int = Field(
        default=20, ge=1, le=1024, description="Prefix length in virtual tokens. Default 20."
    )
    projection: bool = Field(
        default=False,
        description="Reparametrise the prefixes through a small MLP during training (Li & Liang). Default false.",
    )


class PromptTuningConfig(WireModel):
    """Prompt tuning (Lester et al. 2021): a soft prompt prepended to the input embeddings only."""

    model_config = WireModel.model_config | {
        "json_schema_extra": rules(
            Rule(
                "self.init != 'text' || (has(self.initText) && size(self.initText) > 0)",
                "init: text needs initText, the words the soft prompt starts from",
                lambda p: p.init != PromptInit.TEXT or bool(p.init_text),
                passes={"init": "text", "initText": "Classify the ticket:"},
                fails={"init": "text"},
                field_path=".initText",
            )
        )
    }

    num_virtual_tokens: int = Field(
        default=20, ge=1, le=1024, description="Soft prompt length k (20–100 typical). Default 20."
    )
    init: PromptInit = Field(
        default=PromptInit.SAMPLE_VOCAB,
        description=(
            "How the prompt starts: sampleVocab (rows copied from random vocabulary embeddings), "
            "text (the embeddings of initText), or random. Default sampleVocab."
        ),
    )
    init_text: Optional[str] = Field(
        default=None,
        max_length=4096,
        description="Text whose token embeddings initialise the prompt when init is text.",
    )


# ------------------------------------------------------------------------------ objectives


class DistillationConfig(WireModel):
    """Knowledge distillation (Hinton et al. 2015) from a frozen teacher."""

    teacher: ModelSource = Field(
        description="The teacher model; it must share the student's tokenizer vocabulary and special tokens."
    )
    temperature: float = Field(
        default=2.0, gt=0, le=100, description="Softmax temperature T for both models. Default 2."
    )
    alpha: float = Field(default=0.5, ge=0, le=1, description="Weight of the KD term: α·T²·KL + (1−α)·CE. Default 0.5.")
    direction: KLDirection = Field(
        default=KLDirection.FORWARD,
        description="forward: KL(teacher‖student); reverse: KL(student‖teacher), mode-seeking as in MiniLLM. Default forward.",
    )


class ReweightingConfig(WireModel):
    """Instance reweighting by validation-gradient alignment (Ren et al. 2018, "IGBI")."""

    validation_batch_size: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="Clean validation examples per step for the reference gradient (8–32). Default 16.",
    )
    momentum: float = Field(
        default=0.9, ge=0, lt=1, description="Per-example moving average: w̄ ← m·w̄ + (1−m)·w. Default 0.9."
    )
    warmup_ratio: float = Field(
        default=0.05,
        ge=0,
        le=0.5,
        description="Share of steps trained with uniform weights before reweighting starts. Default 0.05.",
    )
    estimator: GradientEstimator = Field(
        default=GradientEstimator.AUTO,
        description=(
            "How per-example gradient alignment is computed: vmap (per-example gradients), jvp "
            "(forward-mode along the validation gradient), finiteDifference (works on 4-bit "
            "layers), or auto."
        ),
    )


class AdversarialConfig(WireModel):
    """ALUM (Liu et al. 2020): adversarial perturbations of the input embeddings."""

    sigma: float = Field(default=1e-5, gt=0, description="Std of the initial random perturbation. Default 1e-5.")
    step_size: float = Field(default=1e-3, gt=0, description="Ascent step η on the perturbation. Default 1e-3.")
    epsilon: float = Field(default=1e-5, gt=0, description="Per-token L∞ bound on the perturbation. Default 1e-5.")
    steps: int = Field(default=1, ge=1, le=10, description="Ascent steps K per training step. Default 1.")
    alpha: float = Field(default=1.0, ge=0, description="Weight of the symmetric KL term added to CE. Default 1.")


class AttentionGuidanceConfig(WireModel):
    """Guided attention (attention supervision, "GATE"): a guide distribution for chosen heads."""

    model_config = WireModel.model_config | {
        "json_schema_extra": rules(
            Rule(
                "self.guide != 'teacher' || has(self.teacher)",
                "guide: teacher needs a teacher model",
                lambda a: a.guide != GuideSource.TEACHER or a.teacher is not None,
                passes={"guide": "teacher", "teacher": {"source": "hf://org/teacher"}},
                fails={"guide": "teacher"},
                field_path=".teacher",
            )
        )
    }

    guide: GuideSource = Field(
        description=(
            "Where the target attention comes from: teacher (a teacher model's attention, "
            "MiniLM-style), diagonal (Tachibana et al. guided attention), or spans (per-example "
            "evidence spans in the dataset)."
        )
    )
    teacher: Optional[ModelSource] = Field(default=None, description="The teacher model when guide is teacher.")
    layers: list[int] = Field(
        default_factory=lambda: [-1],
        min_length=1,
        max_length=1024,
        description="Guided layer indices (negative from the end). Default [-1].",
    )
    heads: Optional[list[int]] = Field(
        default=None, max_length=1024, description="Guided head indices in each guided layer. Unset: all heads."
    )
    weight: float = Field(
        default=0.5, ge=0, le=100, description="λ in loss = CE + λ·L_att (0.1–1 typical). Default 0.5."
    )
    width: float = Field(default=0.2, gt=0, le=1, description="Width g of the diagonal guide. Default 0.2.")
    spans_field: str = Field(
        default="spans",
        max_length=253,
        description="Record field holding [start, end) character spans when guide is spans. Default spans.",
    )


_OBJECTIVE_MODELS: dict[Objective, type[WireModel]] = {
    Objective.DISTILLATION: DistillationConfig,
    Objective.REWEIGHTING: ReweightingConfig,
    Objective.ADVERSARIAL: AdversarialConfig,
    Objective.ATTENTION_GUIDANCE: AttentionGuidanceConfig,
}
"""The pydantic model of each objective term's block (its name: kubetune.api.methods.OBJECTIVES)."""
_OBJECTIVE_BLOCKS = {kind: facts.block for kind, facts in OBJECTIVES.items()}


def _block_belongs(block: str, selector: str, value: str) -> Callable[[Any], bool]:
    """The settings block `block` (wire name) is set only when the field `selector` is `value`."""
    return lambda m: getattr(m, _snake(block)) is None or getattr(m, selector) == value


_OBJECTIVE_EXAMPLES: dict[str, dict[str, Any]] = {
    "distillation": {"teacher": {"source": "hf://org/teacher"}},
    "attentionGuidance": {"guide": "diagonal"},
}
"""The smallest valid block of the objectives that need settings (the rules' examples)."""


class ObjectiveTerm(WireModel):
    """One term added to the causal-LM loss, configured by the block named like its type."""

    model_config = WireModel.model_config | {
        "json_schema_extra": rules(
            *[
                Rule(
                    f"!has(self.{block}) || self.type == '{block}'",
                    f"the {block} block belongs to type: {block}",
                    _block_belongs(block, "type", kind),
                    passes={"type": block, block: _OBJECTIVE_EXAMPLES.get(block, {})},
                    fails={
                        "type": "reweighting" if block == "adversarial" else "adversarial",
                        block: _OBJECTIVE_EXAMPLES.get(block, {}),
                    },
                )
                for kind, block in _OBJECTIVE_BLOCKS.items()
            ],
            Rule(
                "self.type != 'distillation' || has(self.distillation)",
                "type: distillation needs a distillation block with a teacher",
                lambda o: o.type != Objective.DISTILLATION or o.distillation is not None,
                passes={"type": "distillation", "distillation": _OBJECTIVE_EXAMPLES["distillation"]},
                fails={"type": "distillation"},
            ),
            Rule(
                "self.type != 'attentionGuidance' || has(self.attentionGuidance)",
                "type: attentionGuidance needs an attentionGuidance block with a guide",
                lambda o: o.type != Objective.ATTENTION_GUIDANCE or o.attention_guidance is not None,
                passes={"type": "attentionGuidance", "attentionGuidance": _OBJECTIVE_EXAMPLES["attentionGuidance"]},
                fails={"type": "attentionGuidance"},
            ),
        )
    }

    type: Objective = Field(description="The term: distillation, reweighting, adversarial or attentionGuidance.")
    distillation: Optional[DistillationConfig] = Field(
        default=None, description="Settings when type is distillation (a teacher is required)."
    )
    reweighting: Optional[ReweightingConfig] = Field(default=None, description="Settings when type is reweighting.")
    adversarial: Optional[AdversarialConfig] = Field(default=None, description="Settings when type is adversarial.")
    attention_guidance: Optional[AttentionGuidanceConfig] = Field(
        default=None, description="Settings when type is attentionGuidance."
    )

    def config(self) -> WireModel:
        """The block of this term, with code defaults where the user gave none."""
        block = getattr(self, _snake(_OBJECTIVE_BLOCKS[self.type]))
        if block is not None:
            return block
        return _OBJECTIVE_MODELS[self.type]()


# ------------------------------------------------------------------ preference and RL training


class DPOConfig(WireModel):
    """DPO (Rafailov et al. 2023): −log σ(β·[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])."""

    model_config = WireModel.model_config | {
        "json_schema_extra": rules(
            Rule(
                "!has(self.labelSmoothing) || self.labelSmoothing == 0.0 || !has(self.lossType) || "
                "self.lossType in ['sigmoid', 'robust']",
                "labelSmoothing applies to lossType sigmoid or robust (conservative DPO); set it to 0 or change lossType",
                lambda d: not d.label_smoothing or d.loss_type in (DPOLoss.SIGMOID, DPOLoss.ROBUST),
                passes={"lossType": "robust", "labelSmoothing": 0.1},
                fails={"lossType": "hinge", "labelSmoothing": 0.1},
                field_path=".labelSmoothing",
            )
        )
    }

    beta: float = Field(
        default=0.1,
        gt=0,
        le=100,
        description="β: how far the policy may move from the reference (0.1–0.5 typical). Default 0.1.",
    )
    loss_type: DPOLoss = Field(
        default=DPOLoss.SIGMOID,
        description="sigmoid (the DPO paper), hinge (SLiC), ipo (Azar et al. 2023) or robust (Chowdhury et al. 2024). Default sigmoid.",
    )
    reference_free: bool = Field(
        default=False,
        description="Use a uniform reference (log π_ref = 0) instead of the frozen start model: no reference forward pass. Default false.",
    )
    label_smoothing: float = Field(
        default=0.0,
        ge=0,
        lt=0.5,
        description="Assumed share of flipped preference labels, in [0, 0.5) (conservative DPO; sigmoid and robust only). Default 0.",
    )


class ORPOConfig(WireModel):
    """ORPO (Hong et al. 2024): NLL(y_w) + λ·(−log σ(log odds(y_w) − log odds(y_l))); no reference model."""

    beta: float = Field(default=0.1, gt=0, le=100, description="λ, the weight of the odds-ratio term. Default 0.1.")


class KTOConfig(WireModel):
    """KTO (Ethayarajh et al. 2024): unpaired desirable/undesirable completions, prospect-theory loss."""

    beta: float = Field(
        default=0.1, gt=0, le=100, description="β: how far the policy may move from the reference. Default 0.1."
    )
    desirable_weight: float = Field(
        default=1.0, gt=0, le=100, description="λ_D, the weight of desirable examples' losses. Default 1."
    )
    undesirable_weight: float = Field(
        default=1.0, gt=0, le=100, description="λ_U, the weight of undesirable examples' losses. Default 1."
    )


TEMPLATE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
TEMPLATE_VARIABLE = re.compile(r"^(sample\.output_text|item(\.[A-Za-z0-9_\-]+)+)$")
"""What a grader template may reference: the sampled completion's text, or a field of the dataset
record (dotted for nested objects), as OpenAI's `{{sample.output_text}}` / `{{item.answer}}`."""

_GRADER_NEEDS: dict[str, tuple[tuple[str, str], ...]] = {
    "stringCheck": (("reference", "reference"), ("operation", "operation")),
    "textSimilarity": (("reference", "reference"), ("evaluationMetric", "evaluation_metric")),
    "regex": (("pattern", "pattern"),),
    "jsonSchema": (("jsonSchema", "json_schema"),),
}
_GRADER_ONLY = {
    "operation": ("stringCheck",),
    "reference": ("stringCheck", "textSimilarity"),
    "evaluationMetric": ("textSimilarity",),
    "pattern": ("regex",),
    "jsonSchema": ("jsonSchema",),
    "source": ("python",),
    "file": ("python",),
    "timeoutSeconds": ("python",),
}


def template_variables(template: str) -> list[str]:
    """The `{{…}}` references in a grader template."""
    return [m.group(1) for m in TEMPLATE.finditer(template)]


_GRADER_EXAMPLES: dict[str, dict[str, Any]] = {
    "stringCheck": {"name": "g", "type": "stringCheck", "reference": "{{item.answer}}", "operation": "eq"},
    "textSimilarity": {
        "name": "g",
        "type": "textSimilarity",
        "reference": "{{item.answer}}",
        "evaluationMetric": "bleu",
    },
    "regex": {"name": "g", "type": "regex", "pattern": "^[0-9]+$"},
    "jsonSchema": {"name": "g", "type": "jsonSchema", "jsonSchema": {"type": "object"}},
    "python": {"name": "g", "type": "python", "source": "def grade(sample, item):\n    return 1.0\n"},
}
"""A valid grader of each type, and a value of each type-specific field: the rules' examples."""
_GRADER_VALUES: dict[str, Any] = {
    **{wire: value for g in _GRADER_EXAMPLES.values() for wire, value in g.items()},
    "file": "/etc/graders/grade.py",
    "timeoutSeconds": 10,
}


def _owner_example(wire: str, owner: str) -> dict[str, Any]:
    out = {**_GRADER_EXAMPLES[owner], wire: _GRADER_VALUES[wire]}
    if wire == "file":
        del out["source"]
    return out


def _field_set(g: SubGrader, wire: str) -> bool:
    # timeoutSeconds has a default: what counts is whether the manifest sets it
    return "timeout_seconds" in g.model_fields_set if wire == "timeoutSeconds" else getattr(g, _snake(wire)) is not None


def _needs(kind: str, attr: str) -> Callable[[Any], bool]:
    """A grader of type `kind` sets `attr`."""
    return lambda g: g.type != kind or getattr(g, attr) is not None


def _only_for(wire: str, owners: tuple[str, ...]) -> Callable[[Any], bool]:
    """Only a grader of a type in `owners` sets `wire`."""
    return lambda g: not _field_set(g, wire) or str(g.type) in owners


def _grader_rules(*extra: Rule) -> Any:
    out = [
        Rule(
            f"self.type != '{t}' || has(self.{wire})",
            f"type: {t} needs {wire}",
            _needs(t, attr),
            passes=_GRADER_EXAMPLES[t],
            fails={k: v for k, v in _GRADER_EXAMPLES[t].items() if k != wire},
            field_path=f".{wire}",
        )
        for t, needs in _GRADER_NEEDS.items()
        for wire, attr in needs
    ]
    out += [
        Rule(
            f"!has(self.{wire}) || self.type in [{', '.join(repr(t) for t in owners)}]",
            f"{wire} belongs to type {' or '.join(owners)}; remove it or change type",
            _only_for(wire, owners),
            passes=_owner_example(wire, owners[0]),
            fails={**_GRADER_EXAMPLES["stringCheck" if "regex" in owners else "regex"], wire: _GRADER_VALUES[wire]},
            field_path=f".{wire}",
        )
        for wire, owners in _GRADER_ONLY.items()
    ]
    out.append(
        Rule(
            "self.type != 'python' || has(self.source) != has(self.file)",
            "type: python needs exactly one of source (the code) or file (a path in the pod, e.g. a mounted ConfigMap)",
            lambda g: g.type != GraderType.PYTHON or (g.source is None) != (g.file is None),
            passes=_owner_example("file", "python"),
            fails={**_GRADER_EXAMPLES["python"], "file": _GRADER_VALUES["file"]},
        )
    )
    return rules(*out, *extra)


class SubGrader(WireModel):
    """One grader: a function of a sampled completion (`sample`) and its dataset record (`item`)
    returning a reward in [0, 1] (python graders may return any finite number)."""

    model_config = WireModel.model_config | {
        "json_schema_extra": _grader_rules(
            Rule(
                "self.type != 'multi'",
                "a multi grader cannot contain another multi grader",
                lambda g: g.type != GraderType.MULTI,
                passes=_GRADER_EXAMPLES["regex"],
                fails={"name": "g", "type": "multi"},
                field_path=".type",
            )
        )
    }

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[A-Za-z0-9_\-]+$",
        description="Unique name; the reward metrics are reported under it (reward/<name>).",
    )
    type: GraderType = Field(
        description="stringCheck, textSimilarity, regex, jsonSchema or python (multi only at the top level)."
    )
    weight: float = Field(
        default=1.0, ge=0, le=1000, description="Weight of this grader's reward in the sum. Default 1."
    )
    input: str = Field(
        default="{{sample.output_text}}",
        max_length=4096,
        description="Template of the text graded: {{sample.output_text}} (the completion) and {{item.<field>}} (the record). Default {{sample.output_text}}.",
    )
    reference: Optional[str] = Field(
        default=None,
        max_length=4096,
        description="stringCheck and textSimilarity: template of the reference text, e.g. {{item.answer}}.",
    )
    operation: Optional[StringCheckOperation] = Field(
        default=None,
        description="stringCheck: eq (equal), ne (not equal), like (input contains reference) or ilike (case-insensitive like); 1 when it holds, else 0.",
    )
    evaluation_metric: Optional[SimilarityMetric] = Field(
        default=None, description="textSimilarity: exact_match, bleu, rouge_l, chrf or fuzzy_match (all in [0, 1])."
    )
    pattern: Optional[str] = Field(
        default=None,
        max_length=4096,
        description="regex: a Python regular expression; 1 when it matches the input (re.search), else 0.",
    )
    json_schema: Optional[dict[str, Any]] = Field(
        default=None,
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True, "type": "object"},
        description="jsonSchema: a JSON Schema (draft 2020-12); 1 when the input parses as JSON and validates, else 0.",
    )
    source: Optional[str] = Field(
        default=None,
        max_length=65536,
        description="python: code defining grade(sample, item) -> float; sample has output_text, item is the record. Runs in a subprocess of the trainer.",
    )
    file: Optional[str] = Field(
        default=None,
        max_length=1024,
        pattern=r"^/",
        description="python: absolute path in the trainer pod of a file defining grade(sample, item), e.g. a ConfigMap mounted through podOverrides.",
    )
    timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="python: time limit per call; a call that runs longer scores 0. Default 5.",
    )

    @field_validator("input", "reference")
    @classmethod
    def _templates(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return value
        for var in template_variables(value):
            if not TEMPLATE_VARIABLE.match(var):
                raise ValueError(
                    f"unknown template variable {{{{{var}}}}}: use {{{{sample.output_text}}}} or {{{{item.<field>}}}}"
                )
        return value

    @field_validator("pattern")
    @classmethod
    def _regex(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"not a valid regular expression: {err}") from None
        return value

    @field_validator("json_schema")
    @classmethod
    def _schema(cls, value: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        if value is not None:
            try:
                import jsonschema
            except ImportError:  # the base install has no jsonschema; the trainer checks again before loading a model
                return value
            try:
                jsonschema.validators.validator_for(value).check_schema(value)
            except jsonschema.SchemaError as err:
                raise ValueError(f"not a valid JSON Schema: {err.message}") from None
        return value

    @field_validator("source")
    @classmethod
    def _python(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            try:
                compile(value, "<grader>", "exec")
            except SyntaxError as err:
                raise ValueError(f"the python source does not compile: line {err.lineno}: {err.msg}") from None
            if "def grade" not in value:
                raise ValueError("the python source must define grade(sample, item) -> float")
        return value

    def item_fields(self) -> set[str]:
        """The top-level record fields its templates read (checked in every record before training)."""
        out = set()
        for template in (self.input, self.reference or ""):
            for var in template_variables(template):
                if var.startswith("item."):
                    out.add(var.split(".")[1])
        return out


def _unique_names(graders: list[Any]) -> bool:
    names = [g.name for g in graders]
    return len(set(names)) == len(names)


_MULTI_EXAMPLE: dict[str, Any] = {
    "name": "m",
    "type": "multi",
    "graders": [_GRADER_EXAMPLES["regex"], {**_GRADER_EXAMPLES["stringCheck"], "name": "h"}],
}


class Grader(SubGrader):
    """A GRPO grader; type multi sums the weighted rewards of its graders into one reward."""

    model_config = WireModel.model_config | {
        "json_schema_extra": _grader_rules(
            Rule(
                "self.type != 'multi' || has(self.graders)",
                "type: multi needs graders",
                lambda g: g.type != GraderType.MULTI or bool(g.graders),
                passes=_MULTI_EXAMPLE,
                fails={"name": "m", "type": "multi"},
                field_path=".graders",
            ),
            Rule(
                "!has(self.graders) || self.type == 'multi'",
                "graders belongs to type multi; remove it or change type",
                lambda g: g.graders is None or g.type == GraderType.MULTI,
                passes=_MULTI_EXAMPLE,
                fails={**_GRADER_EXAMPLES["regex"], "graders": _MULTI_EXAMPLE["graders"]},
                field_path=".graders",
            ),
            Rule(
                "!has(self.graders) || self.graders.all(g, self.graders.exists_one(h, h.name == g.name))",
                "grader names must be unique",
                lambda g: _unique_names(g.graders or []),
                passes=_MULTI_EXAMPLE,
                fails={"name": "m", "type": "multi", "graders": [_GRADER_EXAMPLES["regex"]] * 2},
                field_path=".graders",
            ),
        )
    }

    type: GraderType = Field(
        description="stringCheck, textSimilarity, regex, jsonSchema, python, or multi (a weighted sum of graders)."
    )
    graders: Optional[list[SubGrader]] = Field(
        default=None,
        min_length=1,
        max_length=16,
        description="multi: the graders whose weighted rewards are summed (divided by the sum of their weights).",
    )

    def item_fields(self) -> set[str]:
        out = super().item_fields()
        for g in self.graders or []:
            out |= g.item_fields()
        return out


class GRPOConfig(WireModel):
    """GRPO (Shao et al. 2024): G sampled completions per prompt, rewards from graders, group-normalised
    advantages, a clipped policy ratio and a KL penalty to the reference; no value model."""

    model_config = WireModel.model_config | {
        "json_schema_extra": rules(
            Rule(
                "self.graders.all(g, self.graders.exists_one(h, h.name == g.name))",
                "grader names must be unique",
                lambda c: _unique_names(c.graders),
                passes={"graders": _MULTI_EXAMPLE["graders"]},
                fails={"graders": [_GRADER_EXAMPLES["regex"]] * 2},
                field_path=".graders",
                at_field=True,
            ),
        )
    }

    num_generations: int = Field(
        default=4, ge=2, le=64, description="G, completions sampled per prompt (the group). Default 4."
    )
    max_completion_length: int = Field(
        default=256, ge=1, le=32768, description="Longest sampled completion, in tokens. Default 256."
    )
    temperature: float = Field(default=1.0, gt=0, le=10, description="Sampling temperature. Default 1.")
    beta: float = Field(
        default=0.04,
        ge=0,
        le=10,
        description="Weight of the KL penalty to the reference model (0: no reference model is kept). Default 0.04.",
    )
    epsilon: float = Field(default=0.2, gt=0, lt=1, description="Clipping range of the policy ratio. Default 0.2.")
    graders: list[Grader] = Field(
        min_length=1,
        max_length=16,
        description="The graders; the reward of a completion is their weighted sum. Each reward is reported as reward/<name>.",
    )

    def item_fields(self) -> set[str]:
        out: set[str] = set()
        for g in self.graders:
            out |= g.item_fields()
        return out


_TYPE_MODELS: dict[TrainingType, type[WireModel]] = {
    TrainingType.DPO: DPOConfig,
    TrainingType.ORPO: ORPOConfig,
    TrainingType.KTO: KTOConfig,
    TrainingType.GRPO: GRPOConfig,
}
"""The pydantic model of each training type's block (its name: kubetune.api.methods.TRAINING_TYPES)."""
_TYPE_BLOCKS: dict[TrainingType, tuple[str, type[WireModel]]] = {
    kind: (facts.block, _TYPE_MODELS[kind]) for kind, facts in TRAINING_TYPES.items() if facts.block is not None
}

PREFERENCE_ADAPTATIONS = adaptations(preference=True)
"""The adaptations dpo, orpo, kto and grpo compose with (`AdaptationFacts.preference`)."""

_WRONG_ADAPTATION = (
    "method.type {type} composes with adaptation full, lora, qlora or dora only: the reference model is the base with "
    "the adapter disabled (or a frozen copy for full), which the other adaptations do not give; use lora"
)
_NO_OBJECTIVES = (
    "objectives add terms to the supervised cross-entropy and do not apply to method.type {type}; remove "
    "spec.method.objectives or use type: supervised"
)


_ADAPTATION_MODELS: dict[Adaptation, type[WireModel]] = {
    Adaptation.LAYERS: LayersConfig,
    Adaptation.TRANSFER: TransferConfig,
    Adaptation.GRADUAL_UNFREEZE: GradualUnfreezeConfig,
    Adaptation.LORA: LoraConfig,
    Adaptation.QLORA: QLoraConfig,
    Adaptation.DORA: DoraConfig,
    Adaptation.IA3: IA3Config,
    Adaptation.PREFIX_TUNING: PrefixTuningConfig,
    Adaptation.PROMPT_TUNING: PromptTuningConfig,
}
"""The pydantic model of each adaptation's block (its name: kubetune.api.methods.ADAPTATIONS)."""
_ADAPTATION_BLOCKS: dict[Adaptation, tuple[str, type[WireModel]] | None] = {
    kind: None if facts.block is None else (facts.block, _ADAPTATION_MODELS[kind])
    for kind, facts in ADAPTATIONS.items()
}


def _snake(camel: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in camel)


_TYPE_EXAMPLES: dict[str, dict[str, Any]] = {"grpo": {"graders": [_GRADER_EXAMPLES["regex"]]}}
"""The smallest valid block of the training types that need settings (the rules' examples)."""


def _reweighting_fits(method: Method) -> bool:
    """Reweighting on qlora uses an estimator that works on 4-bit layers."""
    term = method.objective(Objective.REWEIGHTING)
    return (
        term is None
        or method.adaptation != Adaptation.QLORA
        or term.reweighting is None
        or term.reweighting.estimator in (GradientEstimator.AUTO, GradientEstimator.FINITE_DIFFERENCE)
    )


class Method(WireModel):
    """How the model is adapted: which parameters train, extra loss terms, the optimizer."""

    model_config = WireModel.model_config | {
        "json_schema_extra": rules(
            *[
                Rule(
                    f"!has(self.{b[0]}) || self.adaptation == '{b[0]}'",
                    f"the {b[0]} block belongs to adaptation: {b[0]}; remove it or change adaptation",
                    _block_belongs(b[0], "adaptation", kind),
                    passes={"adaptation": b[0], b[0]: {}},
                    fails={"adaptation": "full", b[0]: {}},
                )
                for kind, b in _ADAPTATION_BLOCKS.items()
                if b is not None
            ],
            Rule(
                "!has(self.objectives) || self.objectives.all(o, self.objectives.exists_one(p, p.type == o.type))",
                "each objective type may appear once",
                lambda m: len({t.type for t in m.objectives}) == len(m.objectives),
                passes={"adaptation": "lora", "objectives": [{"type": "adversarial"}, {"type": "reweighting"}]},
                fails={"adaptation": "lora", "objectives": [{"type": "adversarial"}, {"type": "adversarial"}]},
                field_path=".objectives",
            ),
            *[
                Rule(
                    f"!has(self.{block}) || (has(self.type) && self.type == '{block}')",
                    f"the {block} block belongs to type: {block}; remove it or change type",
                    _block_belongs(block, "type", kind),
                    passes={"adaptation": "lora", "type": block, block: _TYPE_EXAMPLES.get(block, {})},
                    fails={"adaptation": "lora", block: _TYPE_EXAMPLES.get(block, {})},
                    field_path=f".{block}",
                )
                for kind, (block, _) in _TYPE_BLOCKS.items()
            ],
            Rule(
                "!has(self.type) || self.type != 'grpo' || has(self.grpo)",
                "type: grpo needs a grpo block with graders",
                lambda m: m.type != TrainingType.GRPO or m.grpo is not None,
                passes={"adaptation": "lora", "type": "grpo", "grpo": _TYPE_EXAMPLES["grpo"]},
                fails={"adaptation": "lora", "type": "grpo"},
                field_path=".type",
            ),
            Rule(
                "!has(self.type) || self.type == 'supervised' || self.adaptation in ['full', 'lora', 'qlora', 'dora']",
                _WRONG_ADAPTATION.format(type="dpo, orpo, kto or grpo"),
                lambda m: m.training_type == TrainingType.SUPERVISED or m.adaptation in PREFERENCE_ADAPTATIONS,
                passes={"adaptation": "dora", "type": "kto"},
                fails={"adaptation": "ia3", "type": "kto"},
                field_path=".adaptation",
                explain=lambda m: _WRONG_ADAPTATION.format(type=m.training_type.value),
            ),
            Rule(
                "!has(self.type) || self.type == 'supervised' || !has(self.objectives) || size(self.objectives) == 0",
                _NO_OBJECTIVES.format(type="dpo, orpo, kto or grpo"),
                lambda m: m.training_type == TrainingType.SUPERVISED or not m.objectives,
                passes={"adaptation": "lora", "type": "supervised", "objectives": [{"type": "adversarial"}]},
                fails={"adaptation": "lora", "type": "dpo", "objectives": [{"type": "adversarial"}]},
                field_path=".objectives",
                explain=lambda m: _NO_OBJECTIVES.format(type=m.training_type.value),
            ),
            # Checked last: a manifest that also breaks a rule above is told about that one first.
            Rule(
                "self.adaptation != 'qlora' || !has(self.objectives) || "
                "self.objectives.all(o, o.type != 'reweighting' || !has(o.reweighting) || "
                "!has(o.reweighting.estimator) || o.reweighting.estimator in ['auto', 'finiteDifference'])",
                "reweighting on qlora needs estimator finiteDifference (or auto): 4-bit layers have "
                "no per-example or forward-mode gradients",
                lambda m: _reweighting_fits(m),
                passes={
                    "adaptation": "qlora",
                    "objectives": [{"type": "reweighting", "reweighting": {"estimator": "finiteDifference"}}],
                },
                fails={
                    "adaptation": "qlora",
                    "objectives": [{"type": "reweighting", "reweighting": {"estimator": "vmap"}}],
                },
                field_path=".objectives",
            ),
        )
    }

    type: Optional[TrainingType] = Field(
        default=None,
        description=(
            "What training optimises: supervised (cross-entropy on the completions; also when unset), dpo (Direct Preference "
            "Optimization on chosen/rejected pairs), orpo (odds-ratio preference optimisation, no reference model), kto "
            "(unpaired desirable/undesirable completions) or grpo (reinforcement learning with graders). Settings go in "
            "the block of the same name. Composes with adaptation full, lora, qlora and dora."
        ),
    )
    dpo: Optional[DPOConfig] = Field(default=None, description="Settings when type is dpo.")
    orpo: Optional[ORPOConfig] = Field(default=None, description="Settings when type is orpo.")
    kto: Optional[KTOConfig] = Field(default=None, description="Settings when type is kto.")
    grpo: Optional[GRPOConfig] = Field(default=None, description="Settings when type is grpo (graders are required).")

    adaptation: Adaptation = Field(
        description=(
            "Which parameters train: full, layers, transfer, gradualUnfreeze, lora, qlora, dora, "
            "ia3, prefixTuning or promptTuning. Settings go in the block of the same name."
        )
    )
    layers: Optional[LayersConfig] = Field(default=None, description="Settings when adaptation is layers.")
    transfer: Optional[TransferConfig] = Field(default=None, description="Settings when adaptation is transfer.")
    gradual_unfreeze: Optional[GradualUnfreezeConfig] = Field(
        default=None, description="Settings when adaptation is gradualUnfreeze."
    )
    lora: Optional[LoraConfig] = Field(default=None, description="Settings when adaptation is lora.")
    qlora: Optional[QLoraConfig] = Field(default=None, description="Settings when adaptation is qlora.")
    dora: Optional[DoraConfig] = Field(default=None, description="Settings when adaptation is dora.")
    ia3: Optional[IA3Config] = Field(default=None, description="Settings when adaptation is ia3.")
    prefix_tuning: Optional[PrefixTuningConfig] = Field(
        default=None, description="Settings when adaptation is prefixTuning."
    )
    prompt_tuning: Optional[PromptTuningConfig] = Field(
        default=None, description="Settings when adaptation is promptTuning."
    )
    objectives: list[ObjectiveTerm] = Field(
        default_factory=list,
        max_length=4,
        description=(
            "Terms added to the causal-LM cross-entropy, each type at most once: distillation "
            "(KD), reweighting (IGBI), adversarial (ALUM), attentionGuidance (GATE)."
        ),
    )
    optimizer: Optimizer = Field(
        default=Optimizer.ADAMW,
        description=(
            "adamw (default), adamw8bit (bitsandbytes 8-bit states), pagedAdamw (GPU only), "
            "lamb or lars (layer-wise trust ratio, for large batches)."
        ),
    )

    def config(self) -> WireModel | None:
        """The block of the chosen adaptation, with code defaults where the user gave none."""
        entry = _ADAPTATION_BLOCKS[self.adaptation]
        if entry is None:
            return None
        return getattr(self, _snake(entry[0])) or entry[1]()

    def objective(self, kind: Objective) -> ObjectiveTerm | None:
        return next((t for t in self.objectives if t.type == kind), None)

    @property
    def training_type(self) -> TrainingType:
        """`type`, supervised when unset (left out of the wire form then, so the specs of jobs from
        before `type` existed keep their digest)."""
        return self.type or TrainingType.SUPERVISED

    def training(self) -> WireModel | None:
        """The block of the training type (dpo, orpo, kto, grpo) with code defaults; None for supervised."""
        if self.type is None or self.type == TrainingType.SUPERVISED:
            return None
        block, model = _TYPE_BLOCKS[self.type]
        return getattr(self, block) or model()

    def needs_reference(self) -> bool:
        """The type compares the policy with a frozen reference model (dpo unless referenceFree, kto,
        grpo with beta > 0); for full fine-tuning that is a second copy of the weights."""
        if not TRAINING_TYPES[self.training_type].reference_model:
            return False
        config = self.training()
        if isinstance(config, DPOConfig):
            return not config.reference_free
        if isinstance(config, GRPOConfig):
            return config.beta > 0
        return True  # kto


# ------------------------------------------------------------------------- hyper-parameters


class Hyperparameters(WireModel):
    """Training hyper-parameters; `auto` values are resolved by kubetune and shown in status.effective."""

    epochs: AutoInt = Field(
        default="auto", description='Passes over the training data, or "auto" (3, as OpenAI\'s n_epochs). Default auto.'
    )
    learning_rate: Optional[PositiveNumber] = Field(
        default=None,
        description=(
            "Peak learning rate, a number > 0 such as 2e-4. Leave it out for the adaptation's default: "
            + learning_rate_defaults()
            + "."
        ),
    )
    batch_size: AutoInt = Field(
        default="auto",
        description='Examples per device per step, or "auto" (chosen from GPU memory, sequence length and method). Default auto.',
    )
    gradient_accumulation: int = Field(
        default=1, ge=1, le=4096, description="Steps whose gradients are summed before an optimizer step. Default 1."
    )
    warmup_ratio: float = Field(
        default=0.03, ge=0, le=0.5, description="Share of steps with a linearly rising learning rate. Default 0.03."
    )
    scheduler: Scheduler = Field(
        default=Scheduler.COSINE, description="Learning-rate schedule after warm-up. Default cosine."
    )
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="Decoupled weight decay (AdamW). Default 0.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm (QLoRA uses 0.3). Default 1.")
    max_steps: Optional[int] = Field(
        default=None, ge=1, description="Stop after this many optimizer steps, overriding epochs."
    )
    seed: int = Field(
        default=42, ge=0, le=2**31 - 1, description="Seed for data order, splits and initialisation. Default 42."
    )
    precision: Precision = Field(
        default=Precision.AUTO,
        description=(
            "auto (bf16 on GPUs that support it, else fp32), bf16, fp16, fp32 or pureBf16. Under bf16 and fp16 the trained "
            "parameters stay fp32 master weights and the forward and backward run under autocast, whatever dtype the "
            "checkpoint was saved in. pureBf16 keeps the trained weights, their gradients and the optimizer state in "
            "bfloat16: half the memory of a full fine-tune, but an update smaller than bf16's resolution is lost (at a "
            "learning rate of 2e-5 most weights never change). status.effective shows weightsDtype and computeDtype. "
            "Default auto."
        ),
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute activations in the backward pass: less memory, ≈30% more compute. Default false.",
    )


# ------------------------------------------------------------------------------- resources


class Resources(WireModel):
    """What the trainer pods request."""

    gpus: int = Field(
        default=1, ge=0, le=64, description="GPUs per node (one pod per node). 0 trains on CPU. Default 1."
    )
    gpu_type: Optional[str] = Field(
        default=None,
        min_length=1,
        max_length=63,
        pattern=LABEL_VALUE,
        description="GPU product to schedule on, matched against the node label nvidia.com/gpu.product (e.g. NVIDIA-H100-80GB-HBM3).",
    )
    gpu_resource: QualifiedName = Field(
        default="nvidia.com/gpu", description="Extended resource name of the GPU. Default nvidia.com/gpu."
    )
    nodes: int = Field(
        default=1,
        ge=1,
        le=512,
        description="Nodes for distributed training (an Indexed Job with torchrun rendezvous). Default 1.",
    )
    cpu: Optional[Quantity] = Field(
        default=None, description="CPU request per pod, e.g. 8 or 7500m. Unset: chosen from the GPU count."
    )
    memory: Optional[Quantity] = Field(
        default=None, description="Memory request and limit per pod, e.g. 64Gi. Unset: chosen from the model size."
    )
    shared_memory: Optional[Quantity] = Field(
        default=None,
        description="Size of /dev/shm (a memory-backed emptyDir) for data loader workers and NCCL. Default 8Gi with GPUs.",
    )


# ---------------------------------------------------------------------------------- output


class Output(WireModel):
    """Where checkpoints, the adapter and its manifest are written."""

    uri: OutputUri = Field(
        description=(
            "Output prefix: s3://bucket/prefix, gs://bucket/prefix, file:///path or pvc://claim/path. "
            "Checkpoints go to <uri>/checkpoints/step-N/, the result to <uri>/adapter/ with <uri>/manifest.json written last."
        )
    )
    credentials_secret: Optional[str] = Field(
        default=None,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description=(
            "Name of a Secret in the job's namespace with object-store credentials (keys such as "
            "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS_JSON). "
            "Passed to the trainer through secretKeyRef only."
        ),
    )
    format: OutputFormat = Field(
        default=OutputFormat.ADAPTER,
        description="adapter (PEFT weights only) or merged (full weights with the adapter folded in). Default adapter.",
    )
    overwrite: bool = Field(
        default=False,
        exclude_if=lambda v: v is False,  # added after v0.1: at its default, out of the digest (see Evaluation)
        description=(
            "What a run does when <uri>/manifest.json is already committed. false (default): a result of the same "
            "training spec is reported as finished (exit 0, nothing retrained) and one of a different spec is refused "
            "before the model loads. true: the committed result and its checkpoints are deleted and training starts over."
        ),
    )


class Checkpointing(WireModel):
    """Periodic checkpoints for resuming after preemption or failure."""

    every_steps: int = Field(
        default=200, ge=1, description="Write a checkpoint every N optimizer steps (and on SIGTERM). Default 200."
    )
    keep: int = Field(default=3, ge=1, le=100, description="Newest checkpoints kept in storage. Default 3.")


ENDPOINT_URL = r"^https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~/\-]*)?$"
"""An http(s) base URL without credentials or query (judge and serving endpoints)."""


DEFAULT_EVAL_METRICS = [EvalMetric.EXACT_MATCH, EvalMetric.ROUGE_L, EvalMetric.BLEU, EvalMetric.CHRF]


class Judge(WireModel):
    """An LLM that compares the base and the tuned answer to each sample prompt, pairwise."""

    url: str = Field(
        max_length=2048,
        pattern=ENDPOINT_URL,
        description="Base URL of an OpenAI-compatible API, e.g. https://api.openai.com/v1 (POST {url}/chat/completions).",
    )
    model: str = Field(
        min_length=1, max_length=253, description="The judge model name put in requests, e.g. gpt-4o-mini."
    )
    api_key_secret: Optional[str] = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="Secret in the job's namespace whose key api-key holds the API key (sent as a Bearer token); unset for an endpoint without one.",
    )
    criteria: Optional[str] = Field(
        default=None,
        max_length=4096,
        description="What a better answer is, for the judge's prompt. Unset: helpful, correct and faithful to the reference answer.",
    )


class Evaluation(WireModel):
    """Held-out evaluation."""

    model_config = WireModel.model_config | {
        "json_schema_extra": rules(
            Rule(
                "!has(self.metrics) || !self.metrics.exists(m, m == 'regex') || has(self.regex)",
                "the regex metric needs evaluation.regex, the pattern answers must match",
                lambda e: EvalMetric.REGEX not in e.metrics or bool(e.regex),
                passes={"metrics": ["exactMatch", "regex"], "regex": "^[A-D]$"},
                fails={"metrics": ["exactMatch", "regex"]},
            ),
        )
    }

    compare_base: bool = Field(
        default=True,
        description="Measure the base model's held-out loss before training and report it beside the tuned one. Default true.",
    )
    every_steps: Optional[int] = Field(
        default=None, ge=1, description="Also evaluate every N steps. Unset: at the end of each epoch."
    )
    # Fields added after jobs already ran stay out of the wire form at their default (`exclude_if`), so
    # the spec digest of a job written before them is unchanged and an operator upgrade does not see
    # every running job as edited (reconcile.spec_changed).
    samples: int = Field(
        default=4,
        ge=0,
        le=1000,
        exclude_if=lambda v: v == 4,
        description=(
            "Held-out prompts answered by the base and by the tuned model (greedy, same settings) and written to "
            "eval/samples.jsonl in the output (prompt, reference, base, tuned) for people to read. 0 turns it off. Default 4."
        ),
    )
    max_new_tokens: int = Field(
        default=128,
        ge=1,
        le=8192,
        exclude_if=lambda v: v == 128,
        description="Longest generated answer per sample, in tokens. Default 128.",
    )
    metrics: list[EvalMetric] = Field(
        default_factory=lambda: list(DEFAULT_EVAL_METRICS),
        exclude_if=lambda v: list(v) == DEFAULT_EVAL_METRICS,
        max_length=8,
        description=(
            "Scores of the samples' answers against their references, for base and tuned: exactMatch, rougeL, bleu, "
            "chrf (0..1 each), jsonValid (share of answers that parse as JSON) and regex (share matching "
            "evaluation.regex). Default exactMatch, rougeL, bleu, chrf."
        ),
    )
    regex: Optional[str] = Field(
        default=None,
        max_length=4096,
        description="The pattern (Python syntax) a whole answer must match, for the regex metric.",
    )
    judge: Optional[Judge] = Field(
        default=None,
        description=(
            "An LLM judge: each sample's base and tuned answers are compared twice with their positions swapped "
            "(a judge that prefers a position scores a tie), giving the tuned model's win rate."
        ),
    )

    @model_validator(mode="after")
    def _regex_compiles(self) -> Evaluation:
        if self.regex:
            import re

            try:
                re.compile(self.regex)
            except re.error as err:
                raise ValueError(f"regex is not a valid pattern: {err}") from None
        return self


# ------------------------------------------------------------------------------ scheduling


class Toleration(WireModel):
    """A Kubernetes toleration, copied to the trainer pods; checked as the API server checks a pod's."""

    model_config = WireModel.model_config | {
        "json_schema_extra": rules(
            Rule(
                "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
                "operator must be Exists when key is empty (it then tolerates every taint)",
                lambda t: bool(t.key) or t.operator == "Exists",
                passes={"operator": "Exists"},
                fails={"operator": "Equal", "value": "gpu"},
            ),
            Rule(
                "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
                "value must be empty when operator is Exists",
                lambda t: t.operator != "Exists" or not t.value,
                passes={"key": "nvidia.com/gpu", "operator": "Exists", "value": ""},
                fails={"key": "nvidia.com/gpu", "operator": "Exists", "value": "present"},
                field_path=".value",
            ),
            Rule(
                "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
                "tolerationSeconds needs effect: NoExecute",
                lambda t: t.toleration_seconds is None or t.effect == "NoExecute",
                passes={"key": "node.kubernetes.io/unreachable", "effect": "NoExecute", "tolerationSeconds": 300},
                fails={"key": "node.kubernetes.io/unreachable", "effect": "NoSchedule", "tolerationSeconds": 300},
                field_path=".tolerationSeconds",
            ),
        )
    }

    key: Optional[TaintKey] = Field(
        default=None, description="Taint key (a qualified name); empty with operator Exists matches every taint."
    )
    operator: Optional[str] = Field(
        default=None, pattern="^(Exists|Equal)$", description="Exists or Equal (default Equal)."
    )
    value: Optional[LabelValue] = Field(default=None, description="Taint value for operator Equal (a label value).")
    effect: Optional[str] = Field(
        default=None,
        pattern="^(NoSchedule|PreferNoSchedule|NoExecute)$",
        description="NoSchedule, PreferNoSchedule or NoExecute; empty matches all.",
    )
    toleration_seconds: Optional[int] = Field(
        default=None, description="For NoExecute: how long the pod stays bound after the taint appears."
    )


class Scheduling(WireModel):
    """Queueing and placement: Kueue, Volcano, priority and node constraints."""

    model_config = WireModel.model_config | {
        "json_schema_extra": rules(
            Rule(
                "!has(self.workloadPriorityClassName) || has(self.queueName)",
                "workloadPriorityClassName is a Kueue priority: set queueName too",
                lambda s: s.workload_priority_class_name is None or s.queue_name is not None,
                passes={"queueName": "team-a", "workloadPriorityClassName": "batch-low"},
                fails={"workloadPriorityClassName": "batch-low"},
            )
        )
    }

    queue_name: Optional[str] = Field(
        default=None,
        max_length=63,
        pattern=DNS_LABEL,
        description="Kueue LocalQueue name: the Job is created suspended with the kueue.x-k8s.io/queue-name label and Kueue admits it.",
    )
    priority_class_name: Optional[str] = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="PriorityClass of the trainer pods. Kueue also takes the workload's priority from it unless workloadPriorityClassName is set.",
    )
    workload_priority_class_name: Optional[str] = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description=(
            "Kueue WorkloadPriorityClass of the Job (the kueue.x-k8s.io/priority-class label): the priority Kueue queues and "
            "preempts by, independent of the pods' PriorityClass. Only with queueName."
        ),
    )
    scheduler_name: Optional[str] = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="Pod scheduler. volcano creates a Volcano PodGroup so all pods of a multi-node job are gang-scheduled.",
    )
    node_selector: dict[str, LabelValue] = Field(
        default_factory=dict,
        max_length=64,
        json_schema_extra={"maxProperties": 64, CEL_KEY: [LABEL_MAP_RULE.wire()]},
        description="Node labels the trainer pods require (label keys and values, as on a pod).",
    )

    @field_validator("node_selector")
    @classmethod
    def _label_keys(cls, value: dict[str, str]) -> dict[str, str]:
        return check_label_keys(value)

    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=64, description="Tolerations of the trainer pods (e.g. for tainted GPU nodes)."
    )
    affinity: Optional[dict[str, Any]] = Field(
        default=None,
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True, "type": "object"},
        description="A Kubernetes Affinity object copied verbatim to the trainer pods.",
    )


# ------------------------------------------------------------------------------------ serving

"""An http(s) base URL without credentials, query or fragment (credentials go in a Secret)."""

SERVABLE_AS_LORA = adaptations(served=Served.ADAPTER)
"""Adapters vLLM, SGLang and KServe's LoRA path load as they are; every other weight-changing
adaptation is served as a merged full model (docs/local.md: DoRA, IA3 are refused by vLLM)."""

UNSERVABLE = adaptations(served=Served.NONE)
"""Virtual tokens are not weights: nothing to merge into the base, and no engine serves them."""

VIRTUAL_TOKENS = adaptations(virtual_tokens=True)
"""prefixTuning and promptTuning: nothing to merge (output.format: merged) and no packing."""

_SERVING_BLOCKS = {
    ServingEngine.KSERVE: "kserve",
    ServingEngine.VLLM: "vllm",
    ServingEngine.VLLM_ENDPOINT: "vllmEndpoint",
}


class KServeServing(WireModel):
    """A KServe object serving the result. The operator uses whichever of KServe's CRDs the cluster
    has: `LLMInferenceService` (serving.kserve.io/v1alpha1; the adapter as a LoRA adapter on the
    base model) when installed, else `InferenceService` (v1beta1, the HuggingFace runtime with the
    LoRA flags). status.serving.kind says which."""

    base_model_uri: Optional[ModelUri] = Field(
        default=None,
        description=(
            "Where KServe's storage initializer fetches the base model (hf://, s3://, gs:// or pvc://). "
            "Unset: spec.model.source."
        ),
    )
    gpus: int = Field(default=1, ge=0, le=64, description="GPUs of the serving pod. Default 1.")
    replicas: int = Field(default=1, ge=0, le=100, description="Serving replicas. Default 1.")


class VllmServing(WireModel):
    """A Deployment and Service running `vllm serve <base> --enable-lora --lora-modules <name>=<path>`;
    an init container fetches the adapter from object storage into the pod first."""

    image: Optional[str] = Field(
        default=None,
        max_length=1024,
        description="vLLM image. Unset: the operator's default (the chart's serving.vllmImage).",
    )
    gpus: int = Field(default=1, ge=0, le=64, description="GPUs of each vLLM pod. Default 1.")
    replicas: int = Field(default=1, ge=0, le=100, description="vLLM replicas. Default 1.")
    max_lora_rank: Optional[int] = Field(
        default=None, ge=1, le=4096, description="--max-lora-rank. Unset: the adapter's rank."
    )
    args: list[ShortString] = Field(
        default_factory=list, max_length=64, description="Extra arguments to `vllm serve`, e.g. --max-model-len=8192."
    )


class VllmEndpointServing(WireModel):
    """An existing vLLM server that allows runtime LoRA updates (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True):
    the operator registers the adapter through POST /v1/load_lora_adapter. The adapter path must be
    readable by that server (a path on its volume, or a URI its resolver plugin fetches)."""

    url: str = Field(
        max_length=2048,
        pattern=ENDPOINT_URL,
        description="Base URL of the vLLM server, e.g. http://vllm.serving.svc:8000 (no credentials in the URL).",
    )
    api_key_secret: Optional[str] = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="Secret in the job's namespace whose key api-key holds the server's --api-key, if it has one.",
    )
    adapter_path: Optional[str] = Field(
        default=None,
        max_length=2048,
        description="The lora_path the server loads. Unset: the adapter's URI (status.adapter.uri).",
    )


_SERVING_EXAMPLES: dict[str, dict[str, Any]] = {"vllmEndpoint": {"url": "http://vllm.serving.svc:8000"}}
"""The smallest valid block of the engines that need settings (the rules' examples)."""


class Serving(WireModel):
    """Hand the result to a serving engine once the job succeeded."""

    model_config = WireModel.model_config | {
        "json_schema_extra": rules(
            *[
                Rule(
                    f"!has(self.{block}) || self.engine == '{engine.value}'",
                    f"the {block} block belongs to engine: {engine.value}",
                    _block_belongs(block, "engine", engine),
                    passes={"engine": engine.value, block: _SERVING_EXAMPLES.get(block, {})},
                    fails={
                        "engine": "vllm" if block == "kserve" else "kserve",
                        block: _SERVING_EXAMPLES.get(block, {}),
                    },
                )
                for engine, block in _SERVING_BLOCKS.items()
            ],
            Rule(
                "self.engine != 'vllmEndpoint' || has(self.vllmEndpoint)",
                "engine: vllmEndpoint needs a vllmEndpoint block with the url",
                lambda s: s.engine != ServingEngine.VLLM_ENDPOINT or s.vllm_endpoint is not None,
                passes={"engine": "vllmEndpoint", "vllmEndpoint": _SERVING_EXAMPLES["vllmEndpoint"]},
                fails={"engine": "vllmEndpoint"},
            ),
        )
    }

    engine: ServingEngine = Field(
        description=(
            "kserve (a KServe LLMInferenceService or InferenceService), vllm (a vLLM Deployment and Service the "
            "operator creates) or vllmEndpoint (register the adapter with a running vLLM server)."
        )
    )
    model_name: Optional[str] = Field(
        default=None,
        max_length=63,
        pattern=DNS_LABEL,
        description="The model name clients put in requests. Unset: the adapter's name (metadata.name and the suffix).",
    )
    retain: bool = Field(
        default=False,
        description="Keep the serving objects when the FineTuneJob is deleted. Default false: they are owned by it and go with it.",
    )
    kserve: Optional[KServeServing] = Field(default=None, description="Settings when engine is kserve.")
    vllm: Optional[VllmServing] = Field(default=None, description="Settings when engine is vllm.")
    vllm_endpoint: Optional[VllmEndpointServing] = Field(
        default=None, description="Settings when engine is vllmEndpoint."
    )


def served_merged(adaptation: Adaptation) -> bool:
    """The adaptation's result is served as a merged full model (the trainer writes `merged/` beside
    a DoRA or IA3 adapter; full weights are served as they are)."""
    return ADAPTATIONS[adaptation].served == Served.MERGED


def serves_full_model(spec: FineTuneJobSpec) -> bool:
    """spec.serving serves a full model (status.adapter.mergedUri), not a LoRA adapter on the base:
    the adaptation needs merging, or output.format: merged already folded the adapter in."""
    return spec.output.format == OutputFormat.MERGED or served_merged(spec.method.adaptation)


# ------------------------------------------------------------------------------------ spec


_UNSERVABLE = (
    "serving is not possible with prefixTuning or promptTuning: no engine serves virtual tokens and they cannot be "
    "merged into the base; use lora, qlora, dora, ia3 or a full/partial fine-tune, or drop spec.serving"
)

_CREDENTIALS_TWICE = (
    "podOverrides.env sets a variable that output.credentialsSecret already provides (one of "
    + ", ".join(CREDENTIAL_KEYS)
    + "): drop it from env, or drop credentialsSecret and set every credential in env"
)


_FORMAT_BY_TYPE = (
    "dataset.format names a supervised record shape; with method.type dpo, orpo, kto or grpo the type decides it "
    "(dpo/orpo: OpenAI's input/preferred_output/non_preferred_output or prompt/chosen/rejected; kto: "
    "prompt/completion/label; grpo: prompt or messages): leave format unset (chat)"
)
_PACKING_BY_TYPE = (
    "dataset.packing applies to supervised training only: preference and GRPO batches pair or sample completions "
    "per prompt; set packing: false"
)


def _spec_example(**parts: dict[str, Any]) -> dict[str, Any]:
    """A small valid spec with `parts` replacing its top-level fields (the rules' examples)."""
    return {
        "model": {"source": "hf://org/base"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "method": {"adaptation": "lora"},
        "output": {"uri": "s3://models/bot"},
        **parts,
    }


class FineTuneJobSpec(WireModel):
    """The desired fine-tuning run."""

    model_config = WireModel.model_config | {
        "json_schema_extra": rules(
            Rule(
                "!has(self.output.format) || self.output.format != 'merged' || "
                "!(self.method.adaptation in ['prefixTuning', 'promptTuning'])",
                "output.format: merged is not possible with prefixTuning or promptTuning (virtual "
                "tokens are not weights of the base model to merge into); use format: adapter",
                lambda j: j.output.format != OutputFormat.MERGED or j.method.adaptation not in VIRTUAL_TOKENS,
                passes=_spec_example(output={"uri": "s3://models/bot", "format": "merged"}),
                fails=_spec_example(
                    method={"adaptation": "promptTuning"}, output={"uri": "s3://models/bot", "format": "merged"}
                ),
                field_path=".output.format",
            ),
            Rule(
                "!has(self.serving) || !(self.method.adaptation in ['prefixTuning', 'promptTuning'])",
                _UNSERVABLE,
                lambda j: j.serving is None or j.method.adaptation not in UNSERVABLE,
                passes=_spec_example(serving={"engine": "vllm"}),
                fails=_spec_example(method={"adaptation": "prefixTuning"}, serving={"engine": "vllm"}),
                field_path=".serving",
                at_field=True,
            ),
            Rule(
                "!has(self.dataset.packing) || !self.dataset.packing || "
                "!(self.method.adaptation in ['prefixTuning', 'promptTuning'])",
                "dataset.packing cannot be combined with prefixTuning or promptTuning (virtual tokens "
                "and cached prefixes defeat the per-example attention mask); set packing: false",
                lambda j: not j.dataset.packing or j.method.adaptation not in VIRTUAL_TOKENS,
                passes=_spec_example(dataset={"train": "s3://data/train.jsonl", "packing": True}),
                fails=_spec_example(
                    method={"adaptation": "prefixTuning"}, dataset={"train": "s3://data/train.jsonl", "packing": True}
                ),
                field_path=".dataset.packing",
            ),
            Rule(
                "!has(self.method.type) || self.method.type == 'supervised' || !has(self.dataset.format) || "
                "self.dataset.format == 'chat'",
                _FORMAT_BY_TYPE,
                lambda j: j.method.training_type == TrainingType.SUPERVISED or j.dataset.format == DatasetFormat.CHAT,
                passes=_spec_example(
                    method={"adaptation": "lora", "type": "dpo"},
                    dataset={"train": "s3://data/t.jsonl", "format": "chat"},
                ),
                fails=_spec_example(
                    method={"adaptation": "lora", "type": "dpo"},
                    dataset={"train": "s3://data/t.jsonl", "format": "text"},
                ),
                field_path=".dataset.format",
            ),
            Rule(
                "!has(self.method.type) || self.method.type == 'supervised' || !has(self.dataset.packing) || "
                "!self.dataset.packing",
                _PACKING_BY_TYPE,
                lambda j: j.method.training_type == TrainingType.SUPERVISED or not j.dataset.packing,
                passes=_spec_example(
                    method={"adaptation": "lora", "type": "supervised"},
                    dataset={"train": "s3://data/t.jsonl", "packing": True},
                ),
                fails=_spec_example(
                    method={"adaptation": "lora", "type": "kto"},
                    dataset={"train": "s3://data/t.jsonl", "packing": True},
                ),
                field_path=".dataset.packing",
            ),
            Rule(
                "!has(self.output.credentialsSecret) || !has(self.podOverrides) || !has(self.podOverrides.env) || "
                f"self.podOverrides.env.all(e, !(e.name in [{', '.join(repr(k) for k in CREDENTIAL_KEYS)}]))",
                _CREDENTIALS_TWICE,
                lambda j: not (j.pod_overrides and j.output.credentials_secret and j.pod_overrides.credential_env()),
                passes=_spec_example(
                    output={"uri": "s3://models/bot", "credentialsSecret": "s3-creds"},
                    podOverrides={"env": [{"name": "NCCL_DEBUG", "value": "INFO"}]},
                ),
                fails=_spec_example(
                    output={"uri": "s3://models/bot", "credentialsSecret": "s3-creds"},
                    podOverrides={"env": [{"name": "AWS_REGION", "value": "eu-west-1"}]},
                ),
                field_path=".podOverrides",
                at_field=True,
                explain=lambda j: f"{_CREDENTIALS_TWICE} (found: {', '.join(j.pod_overrides.credential_env())})",
            ),
        )
    }

    model: ModelSource = Field(description="The base model to fine-tune.")
    dataset: Dataset = Field(description="The training data.")
    method: Method = Field(description="Which parameters train, extra loss terms and the optimizer.")
    hyperparameters: Hyperparameters = Field(
        default_factory=Hyperparameters, description="Training hyper-parameters; each may be left to kubetune."
    )
    resources: Resources = Field(
        default_factory=Resources, description="GPUs, nodes, CPU and memory of the trainer pods."
    )
    output: Output = Field(description="Where checkpoints and the adapter are written.")
    checkpointing: Checkpointing = Field(
        default_factory=Checkpointing, description="How often to checkpoint and how many checkpoints to keep."
    )
    evaluation: Evaluation = Field(
        default_factory=Evaluation, description="Held-out evaluation and the base-model comparison."
    )
    scheduling: Scheduling = Field(
        default_factory=Scheduling,
        description="Kueue queue, priority class, Volcano and node placement. May change while suspended.",
    )
    pod_overrides: Optional[PodOverrides] = Field(
        default=None,
        description=(
            "Additions to the pods kubetune builds, the trainer pods and the data-validation pod: labels, annotations, "
            "serviceAccountName, runtimeClassName, imagePullSecrets, env, volumes and volumeMounts. It does what Kubeflow "
            "Trainer's podTemplateOverrides does, as one typed object rather than a patch of the pod template: only what "
            "keeps the pods within the restricted Pod Security profile, and anything kubetune sets itself (its labels, "
            "variables, volumes and paths) is refused, not overridden. Placement is spec.scheduling's. Frozen once "
            "training started, like the rest of the spec."
        ),
    )
    serving: Optional[Serving] = Field(
        default=None,
        description=(
            "Serve the result once the job succeeded: KServe, a vLLM Deployment, or a running vLLM server. LoRA and QLoRA "
            "adapters are served as adapters on the base; other adaptations are merged into the base (the trainer writes "
            "merged/ beside the adapter) and served as a full model. status.serving has the endpoint and the model name."
        ),
    )
    suspend: bool = Field(
        default=False,
        description="Suspend the job: running pods are stopped (a checkpoint is written) and it resumes from that checkpoint when set back to false.",
    )
    cancel: bool = Field(
        default=False,
        description=(
            "Cancel the job for good while keeping this record (like OpenAI's jobs.cancel): the trainer Job is deleted, "
            "its pods write a checkpoint on SIGTERM, committed checkpoints are kept and the phase becomes Cancelled. "
            "Cannot be set back to false; delete the FineTuneJob to remove the record too."
        ),
        json_schema_extra=rules(
            cel("self || !oldSelf", "cancel cannot be undone: create a new FineTuneJob to train again")
        ),
    )
    active_deadline_seconds: Optional[int] = Field(
        default=None, ge=1, description="Fail the job when it runs longer than this, in seconds, across retries."
    )
    max_retries: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Retries after a retriable failure; each resumes from the last committed checkpoint. Default 3.",
    )
    image: Optional[str] = Field(
        default=None,
        max_length=1024,
        description="Trainer container image. Unset: the operator's default trainer image.",
    )
    suffix: Optional[str] = Field(
        default=None,
        max_length=40,
        pattern=DNS_LABEL,
        description="A short lowercase name added to the adapter's name in its manifest (like OpenAI's suffix).",
    )
