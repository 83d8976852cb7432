"""The optimizers a FineTuneJob may name, one registry line each, checked against the API enum.

adamw is torch's; adamw8bit, pagedAdamw and lamb are bitsandbytes' (LAMB keeps a layer-wise
trust ratio ‖W‖/‖update‖; bitsandbytes' LAMB8bit does not and is not offered as LAMB). lars is
written here: bitsandbytes' LARS only *caps* the update at max_unorm·‖W‖, so tensors with small
gradients get no trust-ratio scaling, which is not LARS (You et al. 2017).
The trainer always builds the optimizer itself, so methods with per-group learning rates
(gradual unfreezing) work with every optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from kubetune.api.enums import Optimizer


def _adamw(groups: list[dict[str, Any]], lr: float, weight_decay: float) -> Any:
    # The fused kernel, as HF Trainer's default `adamw_torch_fused`: one pass over all tensors
    # instead of several ops per tensor. benchmarks/trainer_vs_hf.py measured the unfused step at
    # 1.6 ms vs 0.3 ms fused for LoRA r8 on builtin://small-llama (56 tensors, CPU).
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=_fusable(groups))


def _fusable(groups: list[dict[str, Any]]) -> bool | None:
    """True when torch's fused AdamW takes these tensors (one CPU or CUDA device, floating
    point); None keeps torch's own choice (e.g. a model split across devices)."""
    params = [p for g in groups for p in g["params"]]
    devices = {p.device for p in params}
    ok = (
        len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda") and all(p.is_floating_point() for p in params)
    )
    return True if ok else None


def _bnb(name: str, **defaults: Any) -> Callable[..., Any]:
    def make(groups: list[dict[str, Any]], lr: float, weight_decay: float) -> Any:
        import bitsandbytes as bnb

        cls = {"adamw8bit": bnb.optim.AdamW8bit, "pagedAdamw": bnb.optim.PagedAdamW, "lamb": bnb.optim.LAMB}[name]
        return cls(groups, lr=lr, weight_decay=weight_decay, **defaults)

    return make


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017): SGD with momentum whose step per tensor is scaled by the trust
    ratio η·‖W‖ / (‖∇W‖ + wd·‖W‖), so every layer moves by the same relative amount."""

    def __init__(
        self,
        params: Any,
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
    ) -> None:
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "trust_coefficient": trust_coefficient,
            "eps": eps,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                trust = 1.0
                if w_norm > 0 and g_norm > 0:
                    trust = float(
                        group["trust_coefficient"] * w_norm / (g_norm + group["weight_decay"] * w_norm + group["eps"])
                    )
                update = g.mul(group["lr"] * trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = update.clone()
                else:
                    buf.mul_(group["momentum"]).add_(update)
                p.sub_(buf)
        return loss


REGISTRY: dict[Optimizer, Callable[[list[dict[str, Any]], float, float], Any]] = {
    Optimizer.ADAMW: _adamw,
    Optimizer.ADAMW_8BIT: _bnb("adamw8bit"),
    # On a GPU its state lives in paged (unified) memory that spills to the host under pressure;
    # without one bitsandbytes keeps it in ordinary memory: the same update rule.
    Optimizer.PAGED_ADAMW: _bnb("pagedAdamw"),
    Optimizer.LAMB: _bnb("lamb"),
    Optimizer.LARS: lambda groups, lr, wd: LARS(groups, lr, wd),
}


def build(name: Optimizer | str, groups: list[dict[str, Any]], lr: float, weight_decay: float) -> Any:
    """The optimizer over `groups` (dicts with params and optional per-group lr)."""
    return REGISTRY[Optimizer(name)](groups, lr, weight_decay)


def default_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: with decay, and without (biases and norms), as HF does."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
