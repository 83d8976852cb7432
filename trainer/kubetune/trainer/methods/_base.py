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
    """A peft-wrapped model: the adapter alone, or merged into the base with `format: merged`.

    Methods that wrap chosen layers (lora, dora, qlora, ia3) name their spec block in `block` and
    resolve their targets on the model (`targets.resolve`): on the meta-device skeleton before the
    weights load, then on the loaded model when they apply."""

    block: str | None = None

    def resolve_targets(self, model: Any, quiet: bool = False) -> Any:
        """The `targets.Targets` of this block on `model`; raises `targets.TargetError`."""
        from kubetune.trainer.methods import targets

        return targets.resolve(self.block, self.config, model, quiet)

    def save(self, model: Any, directory: Path, merged: bool, base_dir: Path) -> None:
        if merged:
            model.merge_and_unload().save_pretrained(directory, safe_serialization=True)
        else:
            model.save_pretrained(directory, safe_serialization=True)
