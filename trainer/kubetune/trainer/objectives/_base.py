"""The interface every objective term implements, with defaults that do nothing.

A term is built from its config block and the run's `Context`; `ObjectiveTrainer` calls every
hook of every term without asking which exist: `prepare` once the adaptation is applied,
`forward_kwargs` before each training forward, `combine` after it. `combine` is the one each
term must write; the facts of a term (its block, whether the block is required) are in
`kubetune.api.methods.OBJECTIVES`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar


class Objective(ABC):
    """One `spec.method.objectives[]` term."""

    needs_logits: ClassVar[bool] = False
    """The term reads the training forward's whole [batch, length, vocab] logits (reweighting's
    per-example functional gradients, adversarial's KL against a perturbed forward); with none
    that does, the cross-entropy comes from chunked logits (kubetune.trainer.chunked)."""

    def __init__(self, config: Any, ctx: Any) -> None:
        self.config = config
        self.ctx = ctx  # objectives.Context

    def prepare(self, model: Any) -> None:
        """Called once the adaptation is applied (load a teacher, set up attention capture);
        raises `objectives.IncompatibleError` for a user error."""
        return None  # nothing to do unless the subclass says so

    def forward_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for the training forward (e.g. output_attentions)."""
        return {}

    @abstractmethod
    def combine(self, loss: Any, model: Any, inputs: dict[str, Any], outputs: Any) -> tuple[Any, dict[str, float]]:
        """The loss after this term, and the numbers to report."""
