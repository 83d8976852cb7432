"""Prompt tuning (Lester et al. 2021): a soft prompt of k vectors prepended to the embeddings.

Only the k×d prompt trains. `sampleVocab` copies random rows of the vocabulary embedding,
`text` the embeddings of `initText` (repeated/cut to k tokens), `random` draws fresh vectors.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.enums import Adaptation
from kubetune.trainer.methods._base import PeftMethod


class PromptTuning(PeftMethod):
    adaptation = Adaptation.PROMPT_TUNING

    def apply(self, model: Any, tokenizer: Any) -> Any:
        from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

        init = {
            "sampleVocab": PromptTuningInit.SAMPLE_VOCAB,
            "text": PromptTuningInit.TEXT,
            "random": PromptTuningInit.RANDOM,
        }[str(self.config.init)]
        kwargs: dict[str, Any] = {}
        if init == PromptTuningInit.TEXT:
            kwargs = {
                "prompt_tuning_init_text": self.config.init_text,
                "tokenizer_name_or_path": tokenizer.name_or_path,
            }
        cfg = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=self.config.num_virtual_tokens,
            prompt_tuning_init=init,
            **kwargs,
        )
        return get_peft_model(model, cfg)
