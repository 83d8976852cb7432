"""Full fine-tuning: every parameter trains on the cross-entropy of the label tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Full:
    default_learning_rate = 2e-5

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def load_kwargs(self, device: str) -> dict[str, Any]:
        return {}

    def apply(self, model: Any, tokenizer: Any) -> Any:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def save(self, model: Any, directory: Path, merged: bool, base_dir: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)
