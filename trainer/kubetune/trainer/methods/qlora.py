"""QLoRA (Dettmers et al. 2023): LoRA on a frozen NF4 4-bit base with double quantisation.

The base is quantised while it loads (`BitsAndBytesConfig`), then peft's
`prepare_model_for_kbit_training` readies it (fp32 norms, input grads) and LoRA wraps every
linear layer by default. bitsandbytes ≥ 0.50 runs 4-bit layers on CPU too, so this is tested
without a GPU; the compute dtype falls back to float32 on CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.trainer.methods.lora import lora_config, save_peft


class QLora:
    default_learning_rate = 2e-4

    def __init__(self, config: Any) -> None:
        self.config = config

    def load_kwargs(self, device: str) -> dict[str, Any]:
        import torch
        from transformers import BitsAndBytesConfig

        dtype = getattr(torch, str(self.config.compute_dtype))
        if device == "cpu":
            dtype = torch.float32
        return {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=str(self.config.quant_type),
                bnb_4bit_use_double_quant=self.config.double_quant,
                bnb_4bit_compute_dtype=dtype,
                bnb_4bit_quant_storage=torch.uint8,
            ),
            "dtype": dtype,
        }

    def apply(self, model: Any, tokenizer: Any) -> Any:
        from peft import get_peft_model, prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return get_peft_model(model, lora_config(self.config))

    def save(self, model: Any, directory: Path, merged: bool, base_dir: Path) -> None:
        if not merged:
            save_peft(model, directory, merged=False)
            return
        # Merging into 4-bit weights would re-quantise the sum and lose the update's precision:
        # reload the base unquantised, apply the trained adapter, merge that.
        import tempfile

        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory() as tmp:
            save_peft(model, Path(tmp), merged=False)
            base = AutoModelForCausalLM.from_pretrained(base_dir, use_safetensors=True)
            PeftModel.from_pretrained(base, tmp).merge_and_unload().save_pretrained(
                directory, safe_serialization=True
            )
