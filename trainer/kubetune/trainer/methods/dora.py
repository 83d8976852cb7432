"""DoRA (Liu et al. 2024): LoRA on the weight's direction plus a trained magnitude per output unit.

peft's `use_dora=True`; everything else is LoRA, including saving and merging.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.trainer.methods.lora import lora_config, save_peft


class Dora:
    default_learning_rate = 2e-4

    def __init__(self, config: Any) -> None:
        self.config = config

    def load_kwargs(self, device: str) -> dict[str, Any]:
        return {}

    def apply(self, model: Any, tokenizer: Any) -> Any:
        from peft import get_peft_model

        return get_peft_model(model, lora_config(self.config, use_dora=True))

    def save(self, model: Any, directory: Path, merged: bool, base_dir: Path) -> None:
        save_peft(model, directory, merged)
