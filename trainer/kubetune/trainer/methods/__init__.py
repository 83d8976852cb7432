"""The registry of adaptations: one module per API enum value, one line each below.

Each module defines a subclass of `Method` (methods/_base.py): what to pass to `from_pretrained`
(quantisation), how to turn the loaded base model into the trainable one, and how to save the
result; every hook but `apply` has a default that does nothing. The facts (spec block, default
learning rate, …) come from `kubetune.api.methods`. A test asserts that the registry keys equal
`kubetune.api.Adaptation`, so a method cannot be offered by the API without existing here.
"""

from __future__ import annotations

from typing import Any

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
from kubetune.trainer.methods._base import Method

REGISTRY: dict[AdaptationName, type[Method]] = {
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


def build(name: AdaptationName, config: Any) -> Method:
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
