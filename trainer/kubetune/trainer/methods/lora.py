"""LoRA (Hu et al. 2021): h = W0·x + (alpha/r)·B·A·x with B = 0 at start; W0 frozen.

peft implements it; this module maps the API block onto `peft.LoraConfig` and saves either the
adapter alone or the base with the update merged in (`merge_and_unload`). Which layers it wraps
is resolved per model family by `targets.resolve` (also before the weights load, in run.py).
"""

from __future__ import annotations

from typing import Any

from kubetune.api.enums import Adaptation
from kubetune.trainer.methods import targets as _targets
from kubetune.trainer.methods._base import PeftMethod


def lora_config(config: Any, resolved: _targets.Targets, use_dora: bool = False) -> Any:
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout if resolved.dropout is None else resolved.dropout,
        use_dora=use_dora,
        **_targets.peft_kwargs(resolved),
    )


class Lora(PeftMethod):
    adaptation = Adaptation.LORA

    def apply(self, model: Any, tokenizer: Any) -> Any:
        from peft import get_peft_model

        return get_peft_model(model, lora_config(self.config, self.target_layers(model)))
