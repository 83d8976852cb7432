"""ALUM (Liu et al. 2020, "Adversarial training for large neural LangUage Models").

The model should predict the same next-token distribution when its input embeddings are nudged
by a small worst-case δ. Per training step, with x the input embeddings and f the logits:

    δ ~ N(0, σ²);  K times:  g = ∇δ KL(f(x).detach() ‖ f(x+δ)),
                             δ ← clip_[−ε, ε](δ + η·g / ‖g‖∞)        (‖g‖∞ per token)
    loss ← loss + α·[KL(f(x)‖f(x+δ)) + KL(f(x+δ)‖f(x))]             (label positions, fp32)

f(x) is the main forward's logits, so the final term backpropagates through both sides as in the
paper; the ascent uses them detached. δ perturbs `inputs_embeds`; for peft models the embeddings
are the wrapped model's, and prompt-tuning's virtual positions are sliced off the logits.
The term costs K + 1 extra forward passes and is skipped outright when α = 0, and in evaluation
(the held-out loss stays plain cross-entropy).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from kubetune.trainer.objectives._base import Objective
from kubetune.trainer.objectives.distillation import _kl_sum, _upcast, at_labels

_FORWARD_KEYS = ("attention_mask", "position_ids")  # passed with inputs_embeds; never labels


class Adversarial(Objective):
    """The `adversarial` objective term."""

    needs_logits = True  # its symmetric KL compares the clean forward's full logits with perturbed ones

    def __init__(self, config: Any, ctx: Any) -> None:
        super().__init__(config, ctx)
        self.alpha = float(config.alpha)

    def prepare(self, model: Any) -> None:
        embeddings(model)  # fail now, not at step 1, when the model has no input embeddings

    def combine(self, loss: Any, model: Any, inputs: dict[str, Any], outputs: Any) -> tuple[Any, dict[str, float]]:
        if self.alpha == 0 or not model.training:
            return loss, {"adversarialKl": 0.0, "adversarialDeltaInf": 0.0}
        labels = inputs["labels"]
        clean = outputs.logits[:, -labels.shape[1] :]
        delta = self.perturb(model, inputs, clean)
        adv = self.logits(model, inputs, embeddings(model)(inputs["input_ids"]) + delta)
        sym = at_labels(_symmetric_kl_sum, clean, adv, labels)
        return loss + self.alpha * sym, {
            "adversarialKl": float(sym.detach()),
            "adversarialDeltaInf": float(delta.abs().max()),
        }

    def perturb(self, model: Any, inputs: dict[str, Any], clean_logits: torch.Tensor) -> torch.Tensor:
        """The adversarial δ (same shape as the input embeddings), by K projected ascent steps."""
        cfg = self.config
        labels = inputs["labels"]
        clean = clean_logits[:, -labels.shape[1] :].detach()
        x = embeddings(model)(inputs["input_ids"]).detach()
        delta = torch.randn_like(x) * cfg.sigma
        bound = _at_most(cfg.epsilon, x)
        with torch.enable_grad():
            for _ in range(cfg.steps):
                delta.requires_grad_(True)
                adv = self.logits(model, inputs, x + delta)
                kl = at_labels(lambda a, c: _kl_sum(a, c, 1.0, False), adv, clean, labels)
                (g,) = torch.autograd.grad(kl, delta)
                scale = g.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
                delta = (delta.detach() + cfg.step_size * g / scale).clamp(-bound, bound)
        return delta.detach()

    def logits(self, model: Any, inputs: dict[str, Any], embeds: torch.Tensor) -> torch.Tensor:
        """f(embeds): the model's logits on the real (not virtual) positions."""
        kwargs = {k: inputs[k] for k in _FORWARD_KEYS if inputs.get(k) is not None}
        return model(inputs_embeds=embeds, **kwargs).logits[:, -embeds.shape[1] :]

    def kl(self, model: Any, inputs: dict[str, Any], clean_logits: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """KL(f(x)‖f(x+δ)) at label positions: what the ascent maximises (for tests and diagnostics)."""
        labels = inputs["labels"]
        x = embeddings(model)(inputs["input_ids"])
        adv = self.logits(model, inputs, x + delta)
        clean = clean_logits[:, -labels.shape[1] :]
        return at_labels(lambda a, c: _kl_sum(a, c, 1.0, False), adv, clean, labels)


def embeddings(model: Any) -> Any:
    """The token embedding module, through DDP and peft wrappers."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner.get_input_embeddings()


def _at_most(value: float, like: torch.Tensor) -> torch.Tensor:
    """`value` in `like`'s dtype, rounded down: ‖δ‖∞ ≤ ε must hold for the ε the user wrote."""
    bound = torch.tensor(value, dtype=like.dtype, device=like.device)
    return torch.nextafter(bound, torch.zeros_like(bound)) if bound.item() > value else bound


def _symmetric_kl_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # KL(p‖q) + KL(q‖p) = Σ (p − q)·(log p − log q): one pass, no 0·log 0 cases.
    la, lb = F.log_softmax(_upcast(a), dim=-1), F.log_softmax(_upcast(b), dim=-1)
    return ((la.exp() - lb.exp()) * (la - lb)).sum()
