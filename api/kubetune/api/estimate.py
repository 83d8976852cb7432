"""GPU memory estimate for a FineTuneJob, shown before anything is scheduled.

A rule of thumb, not a profiler: weights at the method's precision, gradients and optimizer
states for what trains, activations for the batch, and a framework overhead. Calibrated against
the design note's QLoRA table (7B ≈ 6 GB, 13B ≈ 10 GB, 70B ≈ 40 GB at short sequences, batch 1,
gradient checkpointing) and the usual full/LoRA figures. Used by the operator for
`status.effective.estimatedGPUMemoryGiB` and by the trainer to pick a batch size for `auto`.
"""

from __future__ import annotations

import re

from kubetune.api.enums import Adaptation

GIB = 1024**3
FROZEN_BASE = {
    Adaptation.LORA,
    Adaptation.QLORA,
    Adaptation.DORA,
    Adaptation.IA3,
    Adaptation.PREFIX_TUNING,
    Adaptation.PROMPT_TUNING,
    Adaptation.TRANSFER,
}

# Parameter counts of common model families, read from the model name when no config is at hand.
_SIZE = re.compile(r"(?<![0-9.])([0-9]+(?:\.[0-9]+)?)\s*([bBmM])(?![a-zA-Z])")


BUILTIN_PARAMETERS = {"builtin://tiny-llama": 107_328, "builtin://small-llama": 3_035_392}
"""Parameter counts of the built-in demo models (kubetune.trainer.builtin; a trainer test checks them)."""


def parameters_from_name(source: str) -> int | None:
    """`hf://meta-llama/Llama-3.1-8B` → 8e9; a built-in demo model's own count; None when the
    name carries no size."""
    if source in BUILTIN_PARAMETERS:
        return BUILTIN_PARAMETERS[source]
    match = None
    for match in _SIZE.finditer(source.split("@")[0]):
        pass
    if match is None:
        return None
    scale = 1e9 if match.group(2).lower() == "b" else 1e6
    return int(float(match.group(1)) * scale)


def estimate_gpu_memory_gib(
    parameters: int,
    adaptation: Adaptation | str,
    seq_length: int = 2048,
    batch_size: int = 1,
    gradient_checkpointing: bool = True,
    hidden_size: int | None = None,
    layers: int | None = None,
    gpus: int = 1,
) -> float:
    """Estimated peak GPU memory per GPU in GiB (bf16 compute, AdamW)."""
    adaptation = Adaptation(adaptation)
    if adaptation == Adaptation.QLORA:
        weights = parameters * 0.5  # NF4 (4 bits) + double-quantised constants
    else:
        weights = parameters * 2.0  # bf16
    if adaptation in FROZEN_BASE:
        trainable = parameters * 0.01
        states = trainable * (4 + 4 + 4 + 2)  # fp32 master + two Adam moments + bf16 grad
    else:
        trainable = parameters
        states = trainable * (4 + 4 + 4 + 2) / max(gpus, 1) if gpus > 1 else trainable * (2 + 4 + 4 + 4)
    # Activations per token: ~ hidden × layers × (2 bytes) × factor, from the size when unknown.
    if hidden_size is None or layers is None:
        hidden_size = int((parameters / 12 / 32) ** 0.5) if parameters > 0 else 4096
        layers = 32
    per_token = hidden_size * layers * 2 * (2 if gradient_checkpointing else 16)
    activations = per_token * seq_length * batch_size
    overhead = 0.75 * GIB
    return round((weights + states + activations + overhead) / GIB, 1)
