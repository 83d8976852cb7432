"""Prefix tuning (Li & Liang 2021; P-tuning v2): trained key/value prefixes in every layer.

The base model is frozen; only the prefix (and, with `projection`, its reparametrising MLP)
trains. There is nothing to merge: `format: merged` saves the adapter with a note in the manifest.
"""

from __future__ import annotations

from typing import Any

from kubetune.trainer.methods._base import PeftMethod


class PrefixTuning(PeftMethod):
    default_learning_rate = 3e-2

    def apply(self, model: Any, tokenizer: Any) -> Any:
        from peft import PrefixTuningConfig, TaskType, get_peft_model

        cfg = PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=self.config.num_virtual_tokens,
            prefix_projection=self.config.projection,
        )
        return get_peft_model(model, cfg)
