"""Objective terms added to the causal-LM loss, and the Trainer that composes them.

One module per `kubetune.api.Objective` value, one registry line each; a test asserts the
registry keys equal the enum. Terms compose in a fixed order inside `ObjectiveTrainer`:

1. the forward pass (with labels), giving the plain token-mean cross-entropy CE;
2. reweighting (IGBI) replaces CE by Σ wᵢ·lᵢ over per-example losses, with weights it computes;
3. distillation (KD) turns the loss into (1−α)·loss + α·T²·KL(teacher‖student);
4. adversarial (ALUM) adds α·symmetric-KL under an adversarial embedding perturbation;
5. attentionGuidance (GATE) adds λ·L_att on the guided heads.

Every term is an `_base.Objective`: `prepare`, `forward_kwargs` and `combine` hooks, the first two
doing nothing unless the term says otherwise. Each term also reports numbers (`metrics`) that go to
Prometheus and the final summary. With no term configured `ChunkedTrainer` runs: objective terms
cost nothing when unused.

Logits: the forward projects none; the cross-entropy (and distillation's KL) are computed from
the last hidden states in chunks (`kubetune.trainer.chunked`). A term that needs the whole
logits tensor says so with `needs_logits = True` (reweighting's per-example functional
gradients, adversarial's KL against a perturbed forward); with one configured, the forward
projects full logits as the model's own forward does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.enums import Objective as ObjectiveName
from kubetune.trainer import chunked
from kubetune.trainer.objectives._base import Objective
from transformers import Trainer


class IncompatibleError(ValueError):
    """A term cannot work with this model/teacher (e.g. different vocabularies): a user error."""

    def __init__(self, message: str, reason: str = "InvalidSpec") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Context:
    """What a term may need besides its own config block."""

    spec: Any  # FineTuneJobSpec
    tokenizer: Any
    model_dir: Path
    validation: list[Any] = field(default_factory=list)  # data.Example, clean held-out set
    collate: Callable[[list[Any]], dict[str, Any]] | None = None
    load_model: Callable[[Any], tuple[Any, Any]] | None = None  # ModelSource -> (model, tokenizer)
    max_steps: Callable[[], int] = lambda: 0
    global_step: Callable[[], int] | None = None  # the Trainer's optimizer step (survives resume)


def _registry() -> dict[ObjectiveName, type[Objective]]:
    from kubetune.trainer.objectives import adversarial, attention_guidance, distillation, reweighting

    return {
        ObjectiveName.DISTILLATION: distillation.Distillation,
        ObjectiveName.REWEIGHTING: reweighting.Reweighting,
        ObjectiveName.ADVERSARIAL: adversarial.Adversarial,
        ObjectiveName.ATTENTION_GUIDANCE: attention_guidance.AttentionGuidance,
    }


SIDE_INPUTS = ("guide_mask",)

ORDER = [
    ObjectiveName.REWEIGHTING,
    ObjectiveName.DISTILLATION,
    ObjectiveName.ADVERSARIAL,
    ObjectiveName.ATTENTION_GUIDANCE,
]


def build(spec: Any, ctx: Context) -> list[tuple[ObjectiveName, Objective]]:
    """The configured terms, in composition order."""
    registry = _registry()
    terms = {ObjectiveName(t.type): registry[ObjectiveName(t.type)](t.config(), ctx) for t in spec.method.objectives}
    return [(name, terms[name]) for name in ORDER if name in terms]


class ChunkedTrainer(Trainer):
    """transformers' Trainer whose causal-LM loss comes from chunked logits (never the whole
    [batch, length, vocab] tensor); the same numbers as the model's own loss, normalised the
    same way (by the label tokens of the accumulated batches). Models whose forward cannot skip
    the logits (no `logits_to_keep`, no decoder to hook) get the Trainer's own loss."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.chunked = chunked.supports_hidden(self.model)
        if self.chunked:
            self.model_accepts_loss_kwargs = True  # our loss is Σ / num_items_in_batch, as the model's

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if not self.chunked:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, hidden, _ = chunked.sft_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // max(1, getattr(self, "get_tp_size", lambda: 1)()))
        return (loss, hidden.outputs) if return_outputs else loss


@dataclass
class ChunkedOutputs:
    """A training forward's outputs without logits: the loss, the last hidden states for terms
    that project their own chunks (distillation), the attentions when asked for."""

    loss: Any
    hidden: chunked.Hidden
    logits: Any = None

    @property
    def attentions(self) -> Any:
        return getattr(self.hidden.outputs, "attentions", None)


class ObjectiveTrainer(Trainer):
    """transformers' Trainer with kubetune's objective terms composed into the loss."""

    def __init__(
        self,
        *args: Any,
        terms: list[tuple[ObjectiveName, Objective]],
        on_metrics: Callable[[dict[str, float]], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.chunked = chunked.supports_hidden(self.model) and not any(t.needs_logits for _, t in terms)
        self.terms = terms
        self.on_metrics = on_metrics
        self.last_metrics: dict[str, float] = {}
        # Our loss is a batch mean; let the Trainer scale it for gradient accumulation.
        self.model_accepts_loss_kwargs = False

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        extra: dict[str, Any] = {}
        for _, term in self.terms:
            extra.update(term.forward_kwargs())
        # Per-example side channels (e.g. the spans guide's evidence mask) are not model inputs.
        model_inputs = {k: v for k, v in inputs.items() if k not in SIDE_INPUTS}
        if self.chunked:
            loss, hidden, _ = chunked.sft_loss(model, model_inputs, None, **extra)  # the batch's token mean
            outputs: Any = ChunkedOutputs(loss, hidden)
        else:
            outputs = model(**model_inputs, **extra)
            loss = outputs.loss
        metrics: dict[str, float] = {}
        for _, term in self.terms:
            loss, m = term.combine(loss, model, inputs, outputs)
            metrics.update(m)
        self.last_metrics = metrics
        if self.on_metrics is not None and model.training:
            self.on_metrics(metrics)
        return (loss, outputs) if return_outputs else loss
