"""Full fine-tuning: every parameter trains on the cross-entropy of the label tokens."""

from __future__ import annotations

from typing import Any

from kubetune.api.enums import Adaptation
from kubetune.trainer.methods._base import Method


class Full(Method):
    adaptation = Adaptation.FULL

    def apply(self, model: Any, tokenizer: Any) -> Any:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
