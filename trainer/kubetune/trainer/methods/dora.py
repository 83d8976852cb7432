"""DoRA (Liu et al. 2024): LoRA on the weight's direction plus a trained magnitude per output unit.

peft's `use_dora=True`; everything else is LoRA, including saving and merging.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.enums import Adaptation
from kubetune.trainer.methods._base import PeftMethod
from kubetune.trainer.methods.lora import lora_config


class Dora(PeftMethod):
    adaptation = Adaptation.DORA

    def apply(self, model: Any, tokenizer: Any) -> Any:
        from peft import get_peft_model

        return get_peft_model(model, lora_config(self.config, self.target_layers(model), use_dora=True))
