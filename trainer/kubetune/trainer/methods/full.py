"""Full fine-tuning: every parameter trains on the cross-entropy of the label tokens."""

from __future__ import annotations

from typing import Any

from kubetune.trainer.methods._base import Method


class Full(Method):
    default_learning_rate = 2e-5

    def apply(self, model: Any, tokenizer: Any) -> Any:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
