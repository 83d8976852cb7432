"""What every adaptation shares unless it says otherwise: the config block, no extra loading
arguments, and saving the (full) model's weights as safetensors. PEFT methods save the adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Method:
    default_learning_rate = 2e-5

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def load_kwargs(self, device: str) -> dict[str, Any]:
        return {}

    def save(self, model: Any, directory: Path, merged: bool, base_dir: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)


class PeftMethod(Method):
    """A peft-wrapped model: the adapter alone, or merged into the base with `format: merged`."""

    def save(self, model: Any, directory: Path, merged: bool, base_dir: Path) -> None:
        if merged:
            model.merge_and_unload().save_pretrained(directory, safe_serialization=True)
        else:
            model.save_pretrained(directory, safe_serialization=True)
