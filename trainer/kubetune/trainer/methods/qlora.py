"""QLoRA (Dettmers et al. 2023): LoRA on a frozen NF4 4-bit base with double quantisation.

The base is quantised while it loads (`BitsAndBytesConfig`), then peft's
`prepare_model_for_kbit_training` readies it (fp32 norms, input grads) and LoRA wraps every
linear layer by default. bitsandbytes ≥ 0.50 runs 4-bit layers on CPU too, so this is tested
without a GPU; the compute dtype falls back to float32 on CPU.

On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer for a fast inference kernel the first
time it runs in eval mode without grad (any evaluation). That kernel has no backward: a LoRA
trained afterwards gets no gradient through the frozen layers (measured: 50-100 % wrong), and the
repacking rounds the block scales through bfloat16. `apply` undoes it and switches it off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.api.enums import Adaptation
from kubetune.trainer.methods._base import PeftMethod
from kubetune.trainer.methods.lora import lora_config


class QLora(PeftMethod):
    adaptation = Adaptation.QLORA

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

    def after_load(self, model: Any) -> None:
        import bitsandbytes as bnb
        import torch
        from kubetune.trainer.methods.targets import TargetError

        if not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()):
            # Falcon's FalconLinear (an nn.Linear subclass) is skipped by transformers' 4-bit
            # conversion: the "QLoRA" would be LoRA on a full-precision base, at full memory.
            kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)})
            raise TargetError(
                f"spec.method.adaptation: qlora: transformers converted none of this {model.config.model_type} model's "
                f"layers ({', '.join(kinds)}) to 4-bit, so it would train as plain LoRA at full memory; use adaptation lora",
                "spec.method.adaptation",
            )
        # On CPUs with avx512_bf16, bitsandbytes repacks a Linear4bit's weight for a bf16
        # inference kernel on the first no-grad eval forward (our base-model evaluation), and
        # LoRA gradients through the repacked weight come out wrong. Keep the training layout.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        fused = [p for p in model.parameters() if p.dim() == 3]
        if fused:  # transformers 5 keeps MoE experts as 3-D parameters, which bitsandbytes does not quantise
            import logging

            logging.getLogger("kubetune.trainer").warning(
                "qlora: the %d fused mixture-of-experts tensors (%.2f B parameters) stay in %s, not 4-bit: "
                "bitsandbytes quantises linear layers only",
                len(fused),
                sum(p.numel() for p in fused) / 1e9,
                fused[0].dtype,
            )

    def apply(self, model: Any, tokenizer: Any) -> Any:
        from peft import get_peft_model, prepare_model_for_kbit_training

        _keep_training_layout(model)
        resolved = self.target_layers(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return get_peft_model(model, lora_config(self.config, resolved))

    def save(self, model: Any, directory: Path, merged: bool, base_dir: Path) -> None:
        if not merged:
            model.save_pretrained(directory, safe_serialization=True)
            return
        # Merging into 4-bit weights would re-quantise the sum and lose the update's precision:
        # reload the base unquantised, apply the trained adapter, merge that.
        import tempfile

        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            base = AutoModelForCausalLM.from_pretrained(base_dir, use_safetensors=True)
            PeftModel.from_pretrained(base, tmp).merge_and_unload().save_pretrained(directory, safe_serialization=True)


def _keep_training_layout(model: Any) -> None:
    import bitsandbytes as bnb
    from bitsandbytes import functional as bnbf

    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False  # never repack again (later evaluations)
        weight: Any = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            # Already repacked (an evaluation of the base ran first): the packed bytes come back
            # exactly, the block scales as re-quantised from their bfloat16 copy.
            weight.data, weight.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state
            )
            module.quant_state = weight.quant_state
