"""The interface every adaptation implements, with what they share unless they say otherwise.

A subclass names its `adaptation`; its facts (spec block, default learning rate, whether it wraps
target layers, …) come from `kubetune.api.methods.ADAPTATIONS`, not from constants of its own.
`apply` is the one method each must write; every other hook has a default that does nothing, so
run.py calls them all without asking which exist: no extra loading arguments, no check of the
loaded model, no targets, the optimizer's default parameter groups, no callbacks, and saving the
(full) model's weights as safetensors. PEFT methods save the adapter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kubetune.api.enums import Adaptation
from kubetune.api.methods import ADAPTATIONS, AdaptationFacts

if TYPE_CHECKING:
    from kubetune.trainer.methods.targets import Targets


class Method(ABC):
    """One `spec.method.adaptation`: built from its config block (None for full)."""

    adaptation: ClassVar[Adaptation]
    facts: ClassVar[AdaptationFacts]
    default_learning_rate: ClassVar[float]
    """The peak learning rate when hyperparameters.learningRate is left out (from the facts)."""
    block: ClassVar[str | None]
    """The spec.method block of its settings (from the facts)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "adaptation" in cls.__dict__:
            cls.facts = ADAPTATIONS[cls.adaptation]
            cls.default_learning_rate = cls.facts.default_learning_rate
            cls.block = cls.facts.block

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def load_kwargs(self, device: str) -> dict[str, Any]:
        """Extra keyword arguments for `AutoModelForCausalLM.from_pretrained` (quantisation)."""
        return {}

    def after_load(self, model: Any) -> None:
        """Check the loaded base model before anything else uses it; raises `targets.TargetError`."""
        return None  # nothing to do unless the subclass says so

    def resolve_targets(self, model: Any, quiet: bool = False) -> Targets | None:
        """The layers this method wraps on `model` (the meta-device skeleton before the weights load,
        then the loaded model), for methods whose facts say they have targets; None for the others.
        Raises `targets.TargetError`."""
        return self.target_layers(model, quiet) if self.facts.targets else None

    def target_layers(self, model: Any, quiet: bool = False) -> Targets:
        """The targets of a method that has them (lora, qlora, dora, ia3: their `apply` wraps these)."""
        from kubetune.trainer.methods import targets

        if self.block is None or not self.facts.targets:
            raise TypeError(f"adaptation {self.adaptation} wraps no target layers")
        return targets.resolve(self.block, self.config, model, quiet)

    @abstractmethod
    def apply(self, model: Any, tokenizer: Any) -> Any:
        """The model to train: frozen/wrapped as the method says."""

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]] | None:
        """The optimizer's parameter groups (per-group learning rates); None: the default groups."""
        return None

    def callbacks(self) -> list[Any]:
        """`TrainerCallback`s for methods that act during training."""
        return []

    def save(self, model: Any, directory: Path, merged: bool, base_dir: Path) -> None:
        """Write the result (full weights, safetensors) into `directory`."""
        model.save_pretrained(directory, safe_serialization=True)


class PeftMethod(Method):
    """A peft-wrapped model: the adapter alone, or merged into the base with `format: merged`."""

    def save(self, model: Any, directory: Path, merged: bool, base_dir: Path) -> None:
        """The adapter, or with `merged` the base with the adapter folded in (`merge_and_unload`)."""
        if merged:
            model.merge_and_unload().save_pretrained(directory, safe_serialization=True)
        else:
            model.save_pretrained(directory, safe_serialization=True)
