"""The registry of adaptations: one module per API enum value, one line each below.

Each module defines a class with the same small interface (`Adaptation` below): what to pass to
`from_pretrained` (quantisation), how to turn the loaded base model into the trainable one, the
default learning rate, and how to save the result. A test asserts that the registry keys equal
`kubetune.api.Adaptation`, so a method cannot be offered by the API without existing here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from kubetune.api.enums import Adaptation as AdaptationName
from kubetune.trainer.methods import (
    dora,
    full,
    gradual_unfreeze,
    ia3,
    layers,
    lora,
    prefix_tuning,
    prompt_tuning,
    qlora,
    transfer,
)


class Adaptation(Protocol):
    default_learning_rate: float

    def load_kwargs(self, device: str) -> dict[str, Any]:
        """Extra keyword arguments for `AutoModelForCausalLM.from_pretrained`."""

    def apply(self, model: Any, tokenizer: Any) -> Any:
        """The model to train: frozen/wrapped as the method says."""

    def save(self, model: Any, directory: Path, merged: bool, base_dir: Path) -> None:
        """Write the result (adapter or full weights, safetensors) into `directory`."""

    # Optional: `param_groups(lr, weight_decay) -> list[dict]` for per-group learning rates,
    # and `callbacks() -> list[TrainerCallback]` for methods that act during training.


REGISTRY: dict[AdaptationName, type] = {
    AdaptationName.FULL: full.Full,
    AdaptationName.LAYERS: layers.Layers,
    AdaptationName.TRANSFER: transfer.Transfer,
    AdaptationName.GRADUAL_UNFREEZE: gradual_unfreeze.GradualUnfreeze,
    AdaptationName.LORA: lora.Lora,
    AdaptationName.QLORA: qlora.QLora,
    AdaptationName.DORA: dora.Dora,
    AdaptationName.IA3: ia3.IA3,
    AdaptationName.PREFIX_TUNING: prefix_tuning.PrefixTuning,
    AdaptationName.PROMPT_TUNING: prompt_tuning.PromptTuning,
}


def build(name: AdaptationName, config: Any) -> Adaptation:
    """The adaptation object for a spec's `method.adaptation` and its config block."""
    return REGISTRY[AdaptationName(name)](config)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count their real elements."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
