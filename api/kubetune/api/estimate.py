"""Memory estimates for a FineTuneJob: GPU memory per GPU and the host memory its pods request.

Shown before anything is scheduled, from the shapes the spec reveals (the model's size read from
its name): the memory model of `kubetune.api.memory` — weights at the method's precision,
gradients and optimizer states for what trains, activations and chunked logits for the batch, a
frozen teacher's weights and forward pass, and a runtime overhead — the same implementation the
trainer's `auto` batch size uses with the loaded model's real shapes. It checks out against the
design note's QLoRA table (7B ≈ 6 GB at short sequences, batch 1, gradient checkpointing) and,
on CPU, against measured peak RSS (tests/trainer/test_memory_model.py).

Used by the operator for the pod's memory request, `status.effective.estimatedGPUMemoryGiB` and
the InsufficientGPUMemory warning, and by the trainer to pick a batch size for `auto`.

The trainer runs data parallel (torchrun + DistributedDataParallel, no ZeRO or FSDP): every GPU
holds the whole model, its gradients and optimizer states, so the estimate per GPU does not
shrink with more GPUs.
"""

from __future__ import annotations

import re
from math import ceil
from typing import TYPE_CHECKING, NamedTuple

from kubetune.api import gpus as gpu_table
from kubetune.api.conditions import Reason
from kubetune.api.enums import Adaptation, GuideSource, Objective
from kubetune.api.memory import GIB, Workload, breakdown
from kubetune.api.methods import ADAPTATIONS

if TYPE_CHECKING:
    from kubetune.api.spec import FineTuneJobSpec

# Parameter counts of common model families, read from the model name when no config is at hand.
_SIZE = re.compile(r"(?<![0-9.])([0-9]+(?:\.[0-9]+)?)\s*([bBmM])(?![a-zA-Z])")


BUILTIN_PARAMETERS = {"builtin://tiny-llama": 107_328, "builtin://small-llama": 3_035_392}
"""Parameter counts of the built-in demo models (kubetune.trainer.builtin; a trainer test checks them)."""


class Shape(NamedTuple):
    hidden: int
    layers: int
    heads: int
    vocab: int


BUILTIN_SHAPES = {"builtin://tiny-llama": Shape(64, 2, 4, 260), "builtin://small-llama": Shape(256, 4, 8, 260)}
"""Shapes of the built-in demo models (a trainer test checks them against kubetune.trainer.builtin)."""

DEFAULT_VOCAB = 32_000
"""Vocabulary assumed when the model's is unknown (Llama 2, Mistral); Llama 3 (128k) and Qwen
(152k) logits take 4–5× more, which this rule of thumb then understates."""

_ADAPTER_SHARE = 0.01  # adapters train ≈ 1 % of the parameters (LoRA r 16 on all linear layers)
_HOST_UNKNOWN_MODEL_GIB = 16  # host memory per process for a model of unknown size
_HOST_GPU_BASE_GIB = 8  # data loader, tokeniser, Python and CUDA libraries of a GPU pod
_HOST_CPU_BASE_GIB = 1.0  # Python, torch, transformers and the tokenised data of a CPU pod
_HOST_CPU_UNKNOWN_GIB = 20
_HOST_FLOOR_GIB = 2


def parameters_from_name(source: str) -> int | None:
    """`hf://meta-llama/Llama-3.1-8B` → 8e9; a built-in demo model's own count; None when the
    name carries no size."""
    if source in BUILTIN_PARAMETERS:
        return BUILTIN_PARAMETERS[source]
    matches = list(_SIZE.finditer(source.split("@")[0]))
    match = matches[-1] if matches else None
    if match is None:
        return None
    scale = 1e9 if match.group(2).lower() == "b" else 1e6
    return int(float(match.group(1)) * scale)


def guess_shape(parameters: int, source: str | None = None) -> Shape:
    """Hidden size, layers, heads and vocabulary: a built-in model's own, else a 32-layer guess
    from the parameter count (12·hidden² parameters per layer, 128-wide heads)."""
    if source in BUILTIN_SHAPES:
        return BUILTIN_SHAPES[source]
    hidden = int((parameters / 12 / 32) ** 0.5) if parameters > 0 else 4096
    return Shape(hidden, 32, max(1, hidden // 128), DEFAULT_VOCAB)


def gpu_workload(
    parameters: int,
    adaptation: Adaptation | str,
    seq_length: int = 2048,
    batch_size: int = 1,
    gradient_checkpointing: bool = True,
    hidden_size: int | None = None,
    layers: int | None = None,
    vocab_size: int | None = None,
    teacher_parameters: int = 0,
    intermediate_size: int | None = None,
    optimizer: str = "adamw",
) -> Workload:
    """The memory model's `Workload` of a GPU run (bf16 compute, chunked logits): adapters train
    ≈ 1 % of the parameters over a bf16 (NF4 for QLoRA) base; other methods train them all in fp32."""
    adaptation = Adaptation(adaptation)
    frozen_base = ADAPTATIONS[adaptation].frozen_base
    if hidden_size is None or layers is None:
        hidden_size, layers = guess_shape(parameters)[:2]
    return Workload(
        parameters=parameters,
        trainable=int(parameters * _ADAPTER_SHARE) if frozen_base else parameters,
        hidden=hidden_size,
        layers=layers,
        vocab=vocab_size or DEFAULT_VOCAB,
        seq_length=seq_length,
        batch_size=batch_size,
        intermediate=intermediate_size,
        weight_dtype="nf4" if ADAPTATIONS[adaptation].quantized else "bf16",
        compute_bytes=2,
        optimizer=str(optimizer),
        gradient_checkpointing=gradient_checkpointing,
        chunked_logits=True,
        head_trains=not frozen_base,
        teacher_parameters=teacher_parameters,
        teacher_hidden=guess_shape(teacher_parameters).hidden if teacher_parameters else 0,
        gpu=True,
    )


def estimate_gpu_memory_gib(
    parameters: int,
    adaptation: Adaptation | str,
    seq_length: int = 2048,
    batch_size: int = 1,
    gradient_checkpointing: bool = True,
    hidden_size: int | None = None,
    layers: int | None = None,
    vocab_size: int | None = None,
    teacher_parameters: int = 0,
) -> float:
    """Estimated peak GPU memory per GPU in GiB (bf16 compute, AdamW, chunked logits), from the
    memory model (`kubetune.api.memory`); a frozen bf16 teacher of `teacher_parameters` adds its
    weights, its forward pass and one chunk of its logits."""
    workload = gpu_workload(
        parameters,
        adaptation,
        seq_length,
        batch_size,
        gradient_checkpointing,
        hidden_size,
        layers,
        vocab_size,
        teacher_parameters,
    )
    return round(breakdown(workload).total / GIB, 1)


def _cpu_host_bytes(
    parameters: int,
    shape: Shape,
    adaptation: Adaptation,
    tokens: int,
    seq_length: int,
    gradient_checkpointing: bool,
    teacher_parameters: int,
) -> float:
    """Peak host memory of a CPU-only run from the memory model: fp32 everywhere (precision auto
    is fp32 on CPU), chunked logits, the same component formulas as on a GPU."""
    frozen_base = ADAPTATIONS[adaptation].frozen_base
    workload = Workload(
        parameters=parameters,
        trainable=int(parameters * _ADAPTER_SHARE) if frozen_base else parameters,
        hidden=shape.hidden,
        layers=shape.layers,
        vocab=shape.vocab,
        seq_length=seq_length,
        batch_size=max(1, tokens // max(seq_length, 1)),
        weight_dtype="fp32",
        compute_bytes=4,
        gradient_checkpointing=gradient_checkpointing,
        chunked_logits=True,
        head_trains=not frozen_base,
        teacher_parameters=teacher_parameters,
        teacher_hidden=guess_shape(teacher_parameters).hidden if teacher_parameters else 0,
        teacher_weight_dtype="fp32",
        gpu=False,
    )
    return breakdown(workload).total


class Sizing(NamedTuple):
    """What a FineTuneJob needs, as far as its spec tells."""

    parameters: int | None
    """The base model's parameter count; None when its name carries no size."""
    teacher_parameters: int
    """The frozen teachers' parameters (distillation, attentionGuidance with guide: teacher); a
    teacher of unknown size counts as large as the student; 0 without one."""
    gpu_memory_gib: float | None
    """Estimated peak memory per GPU; None when the base model's size is unknown."""
    host_memory_gib: int
    """Memory request (and limit) of each trainer pod when spec.resources.memory is unset."""


def _teachers(spec: FineTuneJobSpec) -> list[str]:
    """The frozen second models a job holds: teachers, and for full fine-tuning with dpo, kto or
    grpo (beta > 0) the reference model, a frozen copy of the base (PEFT methods use the base with
    the adapter disabled instead: no second copy)."""
    sources = []
    if not ADAPTATIONS[spec.method.adaptation].frozen_base and spec.method.needs_reference():
        sources.append(str(spec.model.source))
    distillation = spec.method.objective(Objective.DISTILLATION)
    if distillation is not None and distillation.distillation is not None:
        sources.append(str(distillation.distillation.teacher.source))
    guidance = spec.method.objective(Objective.ATTENTION_GUIDANCE)
    if guidance is not None and guidance.attention_guidance is not None:
        block = guidance.attention_guidance
        if block.guide == GuideSource.TEACHER and block.teacher is not None:
            sources.append(str(block.teacher.source))
    return sources


def estimate_job(spec: FineTuneJobSpec) -> Sizing:
    """GPU memory per GPU and host memory per pod of a job, from the model's and teachers' sizes
    (read from their names), the method, batch size (1 for `auto`: the trainer picks the largest
    that fits), sequence length and gradient checkpointing."""
    source = str(spec.model.source)
    params = parameters_from_name(source)
    teacher_sizes = [parameters_from_name(t) for t in _teachers(spec)]
    teacher_params = sum(t if t is not None else (params or 0) for t in teacher_sizes)
    hp, res = spec.hyperparameters, spec.resources
    batch = hp.batch_size if isinstance(hp.batch_size, int) else 1
    seq = spec.dataset.max_seq_length
    adaptation = Adaptation(spec.method.adaptation)
    gpu = None
    if params is not None:
        shape = guess_shape(params, source)
        gpu = estimate_gpu_memory_gib(
            params,
            adaptation,
            seq_length=seq,
            batch_size=batch,
            gradient_checkpointing=hp.gradient_checkpointing,
            hidden_size=shape.hidden,
            layers=shape.layers,
            vocab_size=shape.vocab,
            teacher_parameters=teacher_params,
        )
    if res.gpus == 0:
        cpu_batch = hp.batch_size if isinstance(hp.batch_size, int) else 8  # the trainer's CPU default
        if params is None:
            host = _HOST_CPU_UNKNOWN_GIB + sum(
                ceil(t * 4 * 1.25 / GIB) if t else _HOST_UNKNOWN_MODEL_GIB for t in teacher_sizes
            )
        else:
            need = (
                _cpu_host_bytes(
                    params,
                    guess_shape(params, source),
                    adaptation,
                    seq * cpu_batch,
                    seq,
                    hp.gradient_checkpointing,
                    teacher_params,
                )
                / GIB
            )
            host = max(_HOST_FLOOR_GIB, ceil((need + _HOST_CPU_BASE_GIB) * 1.25))
    else:
        # Each local process holds a bf16 copy of the weights (the teachers' too) on the host
        # while loading (+25 %), plus a base for the data loader, tokeniser and CUDA libraries.
        def loading(n: int | None) -> int:
            return ceil(n * 2 * 1.25 / GIB) if n else _HOST_UNKNOWN_MODEL_GIB

        per_process = loading(params) + sum(loading(t if t is not None else params) for t in teacher_sizes)
        host = per_process * res.gpus + _HOST_GPU_BASE_GIB
    return Sizing(params, teacher_params, gpu, host)


def memory_warning(spec: FineTuneJobSpec) -> tuple[Reason, str] | None:
    """(InsufficientGPUMemory, message) when the estimate per GPU exceeds the memory of
    spec.resources.gpuType, or of the largest known GPU of the resource's vendor without one;
    None when it fits, for CPU-only jobs, or when the model's or the GPU's size is unknown."""
    res = spec.resources
    if res.gpus == 0:
        return None
    estimate = estimate_job(spec).gpu_memory_gib
    largest = gpu_table.largest(res.gpu_resource)
    if res.gpu_type:
        capacity, gpu_name = gpu_table.gpu_memory_gib(res.gpu_type), res.gpu_type
    elif largest is not None:
        capacity, gpu_name = largest.memory_gib, f"the largest known GPU ({largest.label})"
    else:
        return None
    if estimate is None or capacity is None or estimate <= capacity:
        return None
    hp, adaptation = spec.hyperparameters, Adaptation(spec.method.adaptation)
    remedies = []
    if not ADAPTATIONS[adaptation].frozen_base:
        remedies.append("adaptation lora or qlora")
    elif adaptation != Adaptation.QLORA:
        remedies.append("adaptation qlora")
    if not hp.gradient_checkpointing:
        remedies.append("gradientCheckpointing: true")
    if isinstance(hp.batch_size, int) and hp.batch_size > 1:
        remedies.append("a smaller batchSize")
    if spec.dataset.max_seq_length > 512:
        remedies.append("a smaller maxSeqLength")
    if _teachers(spec):
        remedies.append("a smaller teacher")
    if res.gpu_type and largest is not None and largest.memory_gib >= estimate:
        remedies.append(f"a gpuType with more memory ({largest.label})")
    remedies = remedies or ["a smaller model"]
    use = ", ".join(remedies[:-1]) + (" or " if len(remedies) > 1 else "") + remedies[-1]
    message = (
        f"estimated {estimate:g} GiB per GPU exceeds the {capacity:g} GiB of {gpu_name}: use {use} "
        "(each GPU holds a whole replica, so more GPUs do not lower it)"
    )
    return Reason.INSUFFICIENT_GPU_MEMORY, message
