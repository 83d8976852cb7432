"""IA3 (Liu et al. 2022): learned vectors rescale keys, values and the feed-forward input.

The vectors start at 1, so the adapted model computes the base function at init. The targets and
the feed-forward subset are resolved per model family by `targets.resolve`.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.enums import Adaptation
from kubetune.trainer.methods._base import PeftMethod


class IA3(PeftMethod):
    adaptation = Adaptation.IA3

    def apply(self, model: Any, tokenizer: Any) -> Any:
        from peft import IA3Config, TaskType, get_peft_model

        resolved = self.target_layers(model)
        cfg = IA3Config(
            task_type=TaskType.CAUSAL_LM,
            target_modules=list(resolved.modules),
            feedforward_modules=list(resolved.feedforward),
        )
        return get_peft_model(model, cfg)
