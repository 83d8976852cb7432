"""LoRA (Hu et al. 2021): h = W0·x + (alpha/r)·B·A·x with B = 0 at start; W0 frozen.

peft implements it; this module maps the API block onto `peft.LoraConfig` and saves either the
adapter alone or the base with the update merged in (`merge_and_unload`).
"""

from __future__ import annotations

from typing import Any

from kubetune.trainer.methods._base import PeftMethod


def lora_config(config: Any, use_dora: bool = False) -> Any:
    from peft import LoraConfig, TaskType

    targets = list(config.target_modules)
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        use_dora=use_dora,
    )


class Lora(PeftMethod):
    default_learning_rate = 2e-4

    def apply(self, model: Any, tokenizer: Any) -> Any:
        from peft import get_peft_model

        return get_peft_model(model, lora_config(self.config))
