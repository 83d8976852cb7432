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


def fix_generation(model: Any) -> Any:
    """Make a prefix-tuned model's `generate` use its prefix (idempotent; other models untouched).

    peft 0.21's PeftModelForCausalLM.prepare_inputs_for_generation injects the trained prefix as
    `past_key_values` when that key holds no cache yet. transformers 5.24's generate names the cache
    `cache` instead, so peft finds none, adds the prefix under the old name, and the base forward
    — seeing both — uses the empty `cache` and drops the prefix: every answer was the base model's
    (tests/trainer/test_methods.py::test_prefix_tuned_generation_uses_the_prefix). Handing peft
    the cache under the name it reads restores the prefix; generate then keeps the filled cache.
    """
    if getattr(getattr(model, "active_peft_config", None), "peft_type", None) != "PREFIX_TUNING":
        return model
    prepare = model.base_model_prepare_inputs_for_generation
    if getattr(prepare, "_kubetune_cache_as_past", False):
        return model

    def prepare_with_past(*args: Any, **kwargs: Any) -> Any:
        inputs = prepare(*args, **kwargs)
        if "cache" in inputs and model.active_peft_config.peft_type == "PREFIX_TUNING":  # several adapters: the active one
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    prepare_with_past._kubetune_cache_as_past = True  # type: ignore[attr-defined]
    model.base_model_prepare_inputs_for_generation = prepare_with_past
    return model
