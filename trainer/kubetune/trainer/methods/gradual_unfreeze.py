"""Gradual unfreezing (ULMFiT, Howard & Ruder 2018), with optional discriminative learning rates.

Groups top-down: G0 = head + final norm, G1 = the last block, …, G_L = the first block,
G_{L+1} = the embeddings. Stage k trains G0..Gk, for `stepsPerStage` optimizer steps or one
epoch each. The Trainer builds its optimizer once, so every group is registered up front with
its own learning rate (η_{g+1} = η_g / factor); a group not yet unfrozen has requires_grad off,
gets no gradient and so no update (and no weight decay) from AdamW.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.enums import Adaptation
from kubetune.trainer.methods import _groups
from kubetune.trainer.methods._base import Method
from transformers import TrainerCallback


def groups(model: Any) -> list[list[Any]]:
    """Parameter lists G0..G_{L+1} as described above."""
    n = _groups.num_blocks(model)
    out: list[list[Any]] = [[] for _ in range(n + 2)]
    for name, p in model.named_parameters():
        k = _groups.kind(name, model)
        idx = _groups.block_index(name)
        if idx is not None:
            out[n - idx].append(p)
        elif k in ("head", "final_norm", "embeddings+head"):
            out[0].append(p)
        elif k == "embeddings":
            out[n + 1].append(p)
        else:
            out[0].append(p)
    return [g for g in out if g]


class GradualUnfreeze(Method):
    adaptation = Adaptation.GRADUAL_UNFREEZE

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.groups: list[list[Any]] = []
        self.stage = -1

    def apply(self, model: Any, tokenizer: Any) -> Any:
        self.groups = groups(model)
        self.set_stage(0)
        return model

    def set_stage(self, stage: int) -> None:
        stage = min(stage, len(self.groups) - 1)
        if stage == self.stage:
            return
        self.stage = stage
        for k, group in enumerate(self.groups):
            for p in group:
                p.requires_grad_(k <= stage)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        factor = self.config.discriminative_factor or 1.0
        return [
            {"params": group, "lr": lr / factor**k, "weight_decay": weight_decay} for k, group in enumerate(self.groups)
        ]

    def callbacks(self) -> list[Any]:
        return [_StageCallback(self)]


class _StageCallback(TrainerCallback):
    def __init__(self, method: GradualUnfreeze) -> None:
        self.method = method

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        per = self.method.config.steps_per_stage
        if per:
            self.method.set_stage(state.global_step // per)
        else:
            self.method.set_stage(int(state.epoch or 0))
