"""LoRA (Hu et al. 2021): h = W0·x + (alpha/r)·B·A·x with B = 0 at start; W0 frozen.

peft implements it; this module maps the API block onto `peft.LoraConfig` and saves either the
adapter alone or the base with the update merged in (`merge_and_unload`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


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


def save_peft(model: Any, directory: Path, merged: bool) -> None:
    if merged:
        model.merge_and_unload().save_pretrained(directory, safe_serialization=True)
    else:
        model.save_pretrained(directory, safe_serialization=True)


class Lora:
    default_learning_rate = 2e-4

    def __init__(self, config: Any) -> None:
        self.config = config

    def load_kwargs(self, device: str) -> dict[str, Any]:
        return {}

    def apply(self, model: Any, tokenizer: Any) -> Any:
        from peft import get_peft_model

        return get_peft_model(model, lora_config(self.config))

    def save(self, model: Any, directory: Path, merged: bool, base_dir: Path) -> None:
        save_peft(model, directory, merged)
