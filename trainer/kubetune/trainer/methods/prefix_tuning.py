"""Prefix tuning (Li & Liang 2021; P-tuning v2): trained key/value prefixes in every layer.

The base model is frozen; only the prefix (and, with `projection`, its reparametrising MLP)
trains. There is nothing to merge: `format: merged` saves the adapter with a note in the manifest.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.enums import Adaptation
from kubetune.trainer.methods._base import PeftMethod


class PrefixTuning(PeftMethod):
    adaptation = Adaptation.PREFIX_TUNING

    def apply(self, model: Any, tokenizer: Any) -> Any:
        from peft import PrefixTuningConfig, TaskType, get_peft_model

        cfg = PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=self.config.num_virtual_tokens,
            prefix_projection=self.config.projection,
        )
        return get_peft_model(model, cfg)


def fix_generation(model: Any) -> Any:
    """Make a prefix- or prompt-tuned model's `generate` right (idempotent; other models untouched).

    peft 0.21's PeftModelForCausalLM.prepare_inputs_for_generation looks for the KV cache under
    `past_key_values`; transformers 5.24's generate names it `cache`, so peft never sees one:
    - prefix tuning injects the trained prefix as `past_key_values`, and the base forward — seeing
      both — uses the empty `cache` and drops the prefix: every answer was the base model's;
    - prompt tuning prepends the virtual tokens again at every decoding step (5 embeddings onto a
      cache of 8 for one new token), so every token after the first was wrong.
    Handing peft the cache under the name it reads fixes both (tests/trainer/test_methods.py::
    test_prompt_learning_generation_matches_the_forward).
    """
    if not getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        return model
    prepare = model.base_model_prepare_inputs_for_generation
    if getattr(prepare, "_kubetune_cache_as_past", False):
        return model

    def prepare_with_past(*args: Any, **kwargs: Any) -> Any:
        inputs = prepare(*args, **kwargs)
        if "cache" in inputs and model.active_peft_config.is_prompt_learning:  # several adapters: the active one
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    prepare_with_past._kubetune_cache_as_past = True  # type: ignore[attr-defined]
    model.base_model_prepare_inputs_for_generation = prepare_with_past
    return model
