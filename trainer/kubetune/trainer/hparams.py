"""Resolving `auto` hyper-parameters and precision into the numbers a run actually uses.

The result is reported in the summary and in `status.effective`, so a user can always see what
`auto` meant for their job.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.enums import Precision
from kubetune.api.estimate import _teachers, gpu_workload, parameters_from_name
from kubetune.api.memory import largest_batch
from kubetune.api.methods import ADAPTATIONS
from kubetune.api.spec import FineTuneJobSpec
from kubetune.api.status import ResolvedHyperparameters

DEFAULT_EPOCHS = 3  # OpenAI's n_epochs default, and the design note's 2–4 range
CPU_BATCH_SIZE = 8


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def precision(spec: FineTuneJobSpec) -> str:
    import torch

    wanted = spec.hyperparameters.precision
    if wanted != Precision.AUTO:
        return str(wanted)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


AUTOCAST = {"bf16": "bfloat16", "fp16": "float16", "pureBf16": "bfloat16"}
"""Resolved precision → the dtype the Trainer autocasts to (fp32: none)."""


def load_dtype(spec: FineTuneJobSpec, device: str) -> Any:
    """The dtype the base model loads in, whatever dtype its checkpoint was saved in.

    Trained parameters need fp32 master weights: AdamW's step at a learning rate of 2e-5 is below
    bfloat16's resolution for most weights, so a bf16 copy trained in place mostly never changes.
    So the methods that train much of the base (full, layers, gradualUnfreeze) load in fp32 and
    bf16/fp16 only autocast the compute. A frozen base (`AdaptationFacts.frozen_base`: the peft
    methods, and transfer) loads in the compute dtype on a GPU: it is never updated; peft keeps its
    adapters in fp32 and `master_weights` lifts transfer's head to fp32. pureBf16 loads bf16 and
    trains it in place, as asked.
    """
    import torch

    wanted = precision(spec)
    if wanted == str(Precision.PURE_BF16):
        return torch.bfloat16
    if device == "cuda" and wanted in ("bf16", "fp16") and ADAPTATIONS[spec.method.adaptation].frozen_base:
        return getattr(torch, AUTOCAST[wanted])
    return torch.float32


def master_weights(model: Any, resolved_precision: str) -> dict[str, str]:
    """Keep every trained parameter in fp32 (unless pureBf16) and say what really runs: the wire
    keys weightsDtype (the trained parameters' dtype) and computeDtype, for status.effective and
    the manifest. Call on the model as the adaptation returns it."""
    import torch

    trained = [p for p in model.parameters() if p.requires_grad]
    if resolved_precision != str(Precision.PURE_BF16):
        for p in trained:
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
    names = sorted({str(p.dtype).removeprefix("torch.") for p in trained}) or ["none"]
    return {"weightsDtype": "+".join(names), "computeDtype": AUTOCAST.get(resolved_precision, names[0])}


def batch_size(
    spec: FineTuneJobSpec,
    parameters: int,
    hidden: int,
    layers: int,
    vocab: int | None = None,
    intermediate: int | None = None,
) -> int:
    """`auto`: the largest power of two whose predicted peak (kubetune.api.memory, the model the
    operator's estimate uses, here with the loaded model's shapes: vocabulary, intermediate size)
    fits 90 % of the GPU; 8 on CPU."""
    import torch

    if spec.hyperparameters.batch_size != "auto":
        return int(spec.hyperparameters.batch_size)
    if not torch.cuda.is_available():
        return CPU_BATCH_SIZE
    capacity = torch.cuda.get_device_properties(0).total_memory * 0.9
    teacher = sum(parameters_from_name(t) or parameters for t in _teachers(spec))
    workload = gpu_workload(
        parameters,
        spec.method.adaptation,
        seq_length=spec.dataset.max_seq_length,
        gradient_checkpointing=spec.hyperparameters.gradient_checkpointing,
        hidden_size=hidden,
        layers=layers,
        vocab_size=vocab,
        teacher_parameters=teacher,
        intermediate_size=intermediate,
        optimizer=str(spec.method.optimizer),
    )
    return largest_batch(workload, capacity)


def resolve(
    spec: FineTuneJobSpec,
    default_lr: float,
    parameters: int,
    hidden: int,
    layers: int,
    vocab: int | None = None,
    intermediate: int | None = None,
) -> dict[str, Any]:
    """The resolved numbers as wire (camelCase) keys, checked by the contract's model: they go
    to the summary, the effective-info metric and the adapter manifest."""
    hp = spec.hyperparameters
    return ResolvedHyperparameters(
        epochs=DEFAULT_EPOCHS if hp.epochs == "auto" else int(hp.epochs),
        learning_rate=default_lr if hp.learning_rate is None else float(hp.learning_rate),
        batch_size=batch_size(spec, parameters, hidden, layers, vocab, intermediate),
        gradient_accumulation=hp.gradient_accumulation,
        precision=precision(spec),
        max_seq_length=spec.dataset.max_seq_length,
        validation_split=0.0 if spec.dataset.validation else (spec.dataset.validation_split or 0.1),
        parameters=parameters,
        checkpoint_every_steps=spec.checkpointing.every_steps,
    ).wire()
