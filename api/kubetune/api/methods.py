"""Per-method facts: one typed record per adaptation, training type and objective term.

Everything kubetune knows about a method that is not its algorithm lives here, once: the spec block
that holds its settings, its default learning rate, whether the base stays frozen, what the result
is (a peft adapter or full weights) and how an engine serves it, and the one-line summary and
reference the docs show. The spec's blocks, validators and field descriptions, the memory estimate,
the trainer's hyper-parameters and methods and the serving decisions read these tables;
tests/api/test_method_facts.py checks that the trainer's registries, the CEL rules that spell the
lists out, the CRD and the methods tables of README.md and docs/methods.md agree with them.

No pydantic here (and no torch): `kubetune.api.spec` imports this module, so the block's pydantic
model is not named here but in `spec` (`_ADAPTATION_MODELS`, `_TYPE_MODELS`, `_OBJECTIVE_MODELS`,
keyed by the same enums); a test checks that it is the type of the field named like the block.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from kubetune.api.enums import Adaptation, Objective, TrainingType


class Output(StrEnum):
    """What the trainer writes as the result (before `output.format: merged`)."""

    ADAPTER = "adapter"
    """A peft adapter beside the untouched base (adapter_config.json, adapter_model.safetensors)."""
    FULL = "full"
    """The full model's weights: the method trains base weights."""


class Served(StrEnum):
    """How `spec.serving` serves the result."""

    ADAPTER = "adapter"
    """As a LoRA adapter on the base: vLLM (--enable-lora), SGLang and KServe's LoRA path load it."""
    MERGED = "merged"
    """As a full model: full weights as written, an adapter merged into the base (`merged/`);
    vLLM refuses DoRA and IA3 adapters."""
    NONE = "none"
    """Not at all: virtual tokens are not weights, no engine serves them and nothing can merge them."""


@dataclass(frozen=True)
class AdaptationFacts:
    """What is true of one `spec.method.adaptation`."""

    name: Adaptation
    block: str | None
    """The `spec.method` block holding its settings (wire name); None when it has none (full)."""
    default_learning_rate: float
    """The peak learning rate when `hyperparameters.learningRate` is left out."""
    frozen_base: bool
    """All but a small part of the base stays frozen (the peft methods; transfer's head and top
    blocks): the memory estimate counts ≈ 1 % of the parameters as trained and on a GPU the base
    loads in the compute dtype (kubetune.trainer.hparams.load_dtype)."""
    output: Output
    served: Served
    summary: str
    """What trains, in a few words (the README methods table's "what trains" column)."""
    reference: str = "—"
    """The published method (as docs/methods.md cites it), or its common name."""
    virtual_tokens: bool = False
    """Trains virtual tokens in front of the input (prefix/prompt tuning): nothing to merge, no
    packing (the per-example attention mask is defeated), no serving."""
    targets: bool = False
    """Wraps chosen layers (`<block>.targetModules`), resolved per model family before the weights
    load (kubetune.trainer.methods.targets)."""
    lora: bool = False
    """A LoRA variant (a low-rank update with dropout; embeddings and fused experts adaptable)."""
    quantized: bool = False
    """The frozen base loads quantised to 4 bits (NF4 by default; bitsandbytes)."""
    preference: bool = False
    """Composes with dpo, orpo, kto and grpo: the reference model is the base with the adapter
    disabled (PEFT), or a frozen copy (full). Partial updates would need a full copy as reference;
    ia3, prefix and prompt tuning are not supported by TRL's reference handling and generation."""

    @property
    def trains_base_weights(self) -> bool:
        """The result is the model's own weights, changed (not an adapter beside them)."""
        return self.output == Output.FULL


@dataclass(frozen=True)
class TrainingTypeFacts:
    """What is true of one `spec.method.type`."""

    name: TrainingType
    block: str | None
    """The `spec.method` block holding its settings; None for supervised."""
    block_required: bool
    """The block must be given (grpo: its graders); else code defaults stand in."""
    reference_model: bool
    """May compare the policy with a frozen reference model (dpo unless referenceFree, kto, grpo
    with beta > 0; `spec.Method.needs_reference` decides for a spec)."""
    summary: str
    """The loss, in a line (the README methods table's "loss" column)."""
    reference: str = "—"


@dataclass(frozen=True)
class ObjectiveFacts:
    """What is true of one objective term (`spec.method.objectives[].type`)."""

    name: Objective
    block: str
    """The term's block (wire name), named like its type."""
    block_required: bool
    """The block must be given (distillation: the teacher; attentionGuidance: the guide)."""
    summary: str
    """The loss, in a line (the README methods table's "loss" column)."""
    reference: str = "—"
    alias: str | None = None
    """The loose name of the design note the project started from (IGBI, ALUM, GATE)."""


_LORA_LR, _FULL_LR = 2e-4, 2e-5

_ADAPTATIONS = (
    AdaptationFacts(
        Adaptation.FULL,
        None,
        _FULL_LR,
        frozen_base=False,
        output=Output.FULL,
        served=Served.MERGED,
        summary="every parameter",
        preference=True,
    ),
    AdaptationFacts(
        Adaptation.LAYERS,
        "layers",
        _FULL_LR,
        frozen_base=False,
        output=Output.FULL,
        served=Served.MERGED,
        summary="chosen blocks × {attention, mlp, norm} (+ embeddings, head)",
    ),
    AdaptationFacts(
        Adaptation.TRANSFER,
        "transfer",
        1e-4,
        frozen_base=True,
        output=Output.FULL,
        served=Served.MERGED,
        summary="head (+ final norm, + top k blocks); backbone frozen in eval mode",
        reference="linear probing",
    ),
    AdaptationFacts(
        Adaptation.GRADUAL_UNFREEZE,
        "gradualUnfreeze",
        5e-5,
        frozen_base=False,
        output=Output.FULL,
        served=Served.MERGED,
        summary="head first, then one more block per stage, embeddings last",
        reference="Howard & Ruder 2018 (ULMFiT)",
    ),
    AdaptationFacts(
        Adaptation.LORA,
        "lora",
        _LORA_LR,
        frozen_base=True,
        output=Output.ADAPTER,
        served=Served.ADAPTER,
        summary="low-rank B·A next to frozen linear layers",
        reference="Hu et al. 2021",
        targets=True,
        lora=True,
        preference=True,
    ),
    AdaptationFacts(
        Adaptation.QLORA,
        "qlora",
        _LORA_LR,
        frozen_base=True,
        output=Output.ADAPTER,
        served=Served.ADAPTER,
        summary="LoRA on a frozen NF4 4-bit base",
        reference="Dettmers et al. 2023",
        targets=True,
        lora=True,
        quantized=True,
        preference=True,
    ),
    AdaptationFacts(
        Adaptation.DORA,
        "dora",
        _LORA_LR,
        frozen_base=True,
        output=Output.ADAPTER,
        served=Served.MERGED,
        summary="LoRA direction + per-output magnitude",
        reference="Liu et al. 2024",
        targets=True,
        lora=True,
        preference=True,
    ),
    AdaptationFacts(
        Adaptation.IA3,
        "ia3",
        3e-3,
        frozen_base=True,
        output=Output.ADAPTER,
        served=Served.MERGED,
        summary="scaling vectors on k, v and the FFN input",
        reference="Liu et al. 2022",
        targets=True,
    ),
    AdaptationFacts(
        Adaptation.PREFIX_TUNING,
        "prefixTuning",
        3e-2,
        frozen_base=True,
        output=Output.ADAPTER,
        served=Served.NONE,
        summary="key/value prefixes in every layer",
        reference="Li & Liang 2021",
        virtual_tokens=True,
    ),
    AdaptationFacts(
        Adaptation.PROMPT_TUNING,
        "promptTuning",
        3e-2,
        frozen_base=True,
        output=Output.ADAPTER,
        served=Served.NONE,
        summary="a k×d soft prompt",
        reference="Lester et al. 2021",
        virtual_tokens=True,
    ),
)

_TRAINING_TYPES = (
    TrainingTypeFacts(
        TrainingType.SUPERVISED,
        None,
        block_required=False,
        reference_model=False,
        summary="CE on label tokens",
    ),
    TrainingTypeFacts(
        TrainingType.DPO,
        "dpo",
        block_required=False,
        reference_model=True,
        summary="−log σ(β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))]); `lossType` sigmoid, "
        "hinge, ipo, robust",
        reference="Rafailov et al. 2023",
    ),
    TrainingTypeFacts(
        TrainingType.ORPO,
        "orpo",
        block_required=False,
        reference_model=False,
        summary="NLL(y_w) + β·(−log σ(log odds(y_w) − log odds(y_l))), no reference",
        reference="Hong et al. 2024",
    ),
    TrainingTypeFacts(
        TrainingType.KTO,
        "kto",
        block_required=False,
        reference_model=True,
        summary="prospect-theory value of β·log(π/π_ref) around a KL reference point, weights λ_D, λ_U",
        reference="Ethayarajh et al. 2024",
    ),
    TrainingTypeFacts(
        TrainingType.GRPO,
        "grpo",
        block_required=True,
        reference_model=True,
        summary="clipped policy-ratio objective on group-normalised advantages + β·KL to the reference",
        reference="Shao et al. 2024 (DeepSeekMath)",
    ),
)

_OBJECTIVES = (
    ObjectiveFacts(
        Objective.DISTILLATION,
        "distillation",
        block_required=True,
        summary="(1−α)·CE + α·T²·KL(teacher‖student), forward or reverse",
        reference="Hinton et al. 2015; MiniLLM",
    ),
    ObjectiveFacts(
        Objective.REWEIGHTING,
        "reweighting",
        block_required=False,
        summary="Σ wᵢ·lᵢ, wᵢ ∝ max(⟨∇lᵢ, ∇L_val⟩, 0), moving average",
        reference="Ren et al. 2018",
        alias="IGBI",
    ),
    ObjectiveFacts(
        Objective.ADVERSARIAL,
        "adversarial",
        block_required=False,
        summary="CE + α·symmetric KL under an ε-bounded embedding perturbation",
        reference="Liu et al. 2020",
        alias="ALUM",
    ),
    ObjectiveFacts(
        Objective.ATTENTION_GUIDANCE,
        "attentionGuidance",
        block_required=True,
        summary="CE + λ·(−Σ G·log A) on guided heads (teacher, diagonal or spans guide)",
        reference="Tachibana et al. 2017; Strubell et al. 2018; MiniLM",
        alias="GATE",
    ),
)


def _by_name(enum: Any, rows: tuple[Any, ...]) -> dict[Any, Any]:
    """Rows keyed by their enum value; one row per value, in the enum's order, or the import fails."""
    table = {row.name: row for row in rows}
    if list(table) != list(enum) or len(table) != len(rows):
        raise AssertionError(f"the facts of {enum.__name__} need one row per value, in order: {list(enum)}")
    return table


ADAPTATIONS: dict[Adaptation, AdaptationFacts] = _by_name(Adaptation, _ADAPTATIONS)
TRAINING_TYPES: dict[TrainingType, TrainingTypeFacts] = _by_name(TrainingType, _TRAINING_TYPES)
OBJECTIVES: dict[Objective, ObjectiveFacts] = _by_name(Objective, _OBJECTIVES)


def adaptations(**facts: object) -> tuple[Adaptation, ...]:
    """The adaptations whose facts have the given values, in enum order:
    `adaptations(frozen_base=True)`, `adaptations(served=Served.NONE)`."""
    return tuple(a for a, f in ADAPTATIONS.items() if all(getattr(f, k) == v for k, v in facts.items()))


def number(value: float) -> str:
    """A learning rate as the docs write it: 2e-4, 3e-2, 2.5e-5."""
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _names(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def learning_rate_defaults() -> str:
    """The default learning rate of every adaptation, grouped by value in enum order: "2e-5 for
    full and layers; 1e-4 for transfer; …" (the `hyperparameters.learningRate` description)."""
    groups: dict[float, list[str]] = {}
    for name, facts in ADAPTATIONS.items():
        groups.setdefault(facts.default_learning_rate, []).append(str(name))
    return "; ".join(f"{number(lr)} for {_names(names)}" for lr, names in groups.items())
