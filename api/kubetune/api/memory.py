"""The memory model of a training step: one implementation for the operator's estimate and the trainer's `auto`.

Peak bytes of one process = weights + trainable states + activations + logits + teacher +
reference + runtime overhead, each from the shapes and the run's settings:

- weights: frozen parameters at their storage dtype (bf16 2 B, fp32 4 B, NF4 ≈ 0.55 B with its
  block scales), trained ones at fp32 (master weights under mixed precision);
- trainable states: an fp32 gradient per trained parameter plus the optimizer's states (AdamW
  and LAMB two fp32 moments, 8-bit Adam two 1-byte moments, LARS one momentum);
- activations saved for the backward: per token and layer ≈ (6·hidden + 4·intermediate) values
  (Llama: norm outputs, q/k/v, attention output, gate/up/act/product of the SwiGLU MLP;
  Korthikanti et al. 2022 with memory-efficient attention), at the compute dtype; with gradient
  checkpointing only each layer's input plus one layer's worth;
- logits: unchunked, the model's loss holds the logits, their fp32 log-softmax and gradient
  (≈ 3 fp32 copies of tokens × vocab, plus the low-precision logits and gradient under bf16);
  chunked (kubetune.trainer.chunked, the default), one chunk of `CHUNK_BYTES` of fp32 logits
  and its softmax, plus an fp32 gradient of the head when the head trains;
- a frozen teacher: its weights, one layer's activations and one chunk of its logits;
- a reference model (DPO family): a frozen copy of the weights when the policy trains all its
  parameters; none for adapters (the reference is the base with the adapter switched off);
- runtime: the CUDA context and allocator slack on a GPU; on CPU the allocator's and kernels'
  scratch (measured: see tests/trainer/test_memory_model.py).

Calibrated on CPU against measured peak RSS over a grid of shapes (tests/trainer/
test_memory_model.py, ±25 %) and on a GPU by benchmarks/gpu.py when one is lent. Pure Python,
no torch: the operator imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

GIB = 1024**3
CHUNK_BYTES = 128 * 2**20
"""fp32 logits per chunk of label rows (kubetune.trainer.chunked reads it from here)."""


def chunk_rows(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Label rows per chunk so one chunk's fp32 logits take about `chunk_bytes`."""
    return max(16, chunk_bytes // (4 * max(vocab, 1)))


OPTIMIZER_STATE_BYTES = {"adamw": 8, "pagedAdamw": 8, "adamw8bit": 2, "lamb": 8, "lars": 4}
"""Optimizer state bytes per trained parameter (kubetune.api.enums.Optimizer values)."""

WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "nf4": 0.55}
_GPU_RUNTIME = 0.75 * GIB  # CUDA context, allocator fragmentation, kernels' workspaces
_CPU_RUNTIME = 32 * 2**20  # allocator slack and autograd bookkeeping once the kernels are loaded (measured)


@dataclass(frozen=True)
class Workload:
    """What one training process holds. Sizes are counts; dtypes are names of WEIGHT_BYTES."""

    parameters: int
    trainable: int
    hidden: int
    layers: int
    vocab: int
    seq_length: int
    batch_size: int = 1
    intermediate: int | None = None  # default 8/3·hidden (Llama's SwiGLU ratio)
    weight_dtype: str = "bf16"  # storage of the frozen weights (nf4 for QLoRA)
    compute_bytes: int = 2  # activations: 2 under bf16/fp16, 4 in fp32
    optimizer: str = "adamw"
    gradient_checkpointing: bool = True
    chunked_logits: bool = True
    head_trains: bool = False  # the LM head's weight is trained (full fine-tuning)
    label_share: float = 1.0  # share of tokens with a label (the chunked loss projects only those)
    teacher_parameters: int = 0
    teacher_hidden: int = 0
    teacher_weight_dtype: str = "bf16"
    reference_copy: bool = False  # a frozen reference copy of the weights (DPO with full fine-tuning)
    gpu: bool = True


class Breakdown(NamedTuple):
    """Peak bytes by component; `total` is their sum."""

    weights: float
    states: float
    activations: float
    logits: float
    teacher: float
    reference: float
    runtime: float

    @property
    def total(self) -> float:
        return float(sum(self))


def breakdown(w: Workload) -> Breakdown:
    """The model's peak bytes of one training step of `w`, by component."""
    frozen = max(w.parameters - w.trainable, 0)
    weights = frozen * WEIGHT_BYTES[w.weight_dtype] + w.trainable * 4.0
    states = w.trainable * (4.0 + OPTIMIZER_STATE_BYTES.get(w.optimizer, 8))
    tokens = w.seq_length * w.batch_size
    inter = w.intermediate or (8 * w.hidden) // 3
    per_layer = tokens * (6 * w.hidden + 4 * inter) * w.compute_bytes
    if w.gradient_checkpointing:
        activations = tokens * w.hidden * w.compute_bytes * w.layers + per_layer
    else:
        activations = per_layer * w.layers
    activations += tokens * w.hidden * 4 * 2  # the final norm's output and its gradient
    if not w.gpu and w.trainable < w.parameters / 2:
        # Adapters on every linear layer, measured on CPU (tests/trainer/test_memory_model.py):
        # ≈ 28·hidden extra fp32 values per token and layer stay alive through the backward,
        # with or without checkpointing (peft's low-rank path outputs and sums around the 7
        # wrapped projections). Not applied on GPU until benchmarks/gpu.py has measured it there.
        activations += tokens * w.layers * 28 * w.hidden * w.compute_bytes
    logits = _logits(w, tokens)
    teacher = 0.0
    if w.teacher_parameters:
        th = w.teacher_hidden or w.hidden
        rows = min(int(tokens * w.label_share) or 1, chunk_rows(w.vocab)) if w.chunked_logits else tokens
        teacher = (
            w.teacher_parameters * WEIGHT_BYTES[w.teacher_weight_dtype]
            + tokens * th * 12 * w.compute_bytes
            + rows * w.vocab * 8
        )
    reference = frozen_copy = 0.0
    if w.reference_copy:
        frozen_copy = w.parameters * WEIGHT_BYTES["bf16" if w.gpu else "fp32"]
        reference = frozen_copy
    runtime = _GPU_RUNTIME if w.gpu else _CPU_RUNTIME
    return Breakdown(weights, states, activations, logits, teacher, reference, runtime)


def _logits(w: Workload, tokens: int) -> float:
    if not w.chunked_logits:
        # fp32 logits (or their upcast), log-softmax and gradient: 3 × 4 B per entry at the peak
        return tokens * w.vocab * 12.0
    rows = min(max(int(tokens * w.label_share), 1), chunk_rows(w.vocab))
    head_grad = w.vocab * w.hidden * 4 * 2 if w.head_trains else 0.0  # the fp32 accumulator and the gradient
    return rows * w.vocab * 4 * 2 + head_grad  # a chunk's fp32 logits and their softmax/gradient


def peak_gib(w: Workload) -> float:
    return breakdown(w).total / GIB


def largest_batch(w: Workload, capacity_bytes: float, choices: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)) -> int:
    """The largest batch size in `choices` whose predicted peak fits `capacity_bytes` (1 when none does)."""
    best = 1
    for b in choices:
        if breakdown(replace(w, batch_size=b)).total <= capacity_bytes:
            best = b
    return best
