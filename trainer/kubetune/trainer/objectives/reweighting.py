"""Instance reweighting by validation-gradient alignment ("IGBI"; Ren et al. 2018).

Noisy or off-distribution training examples pull the parameters away from what a small clean
validation set wants. No paper calls this "IGBI": the method is Ren et al. 2018, "Learning to
Reweight Examples for Robust Deep Learning" (equivalently gradient alignment, as in LESS / DoGE).
Per training step, with φ the trainable parameters and lᵢ the token-mean loss of example i:

    g_v = ∇φ L_val                       (a batch of clean validation examples, cycled in order)
    sᵢ  = ⟨∇φ lᵢ, g_v⟩                   (how much a step on example i also lowers L_val)
    wᵢ  = max(sᵢ, 0) / Σ max(s, 0)       (all zero → uniform)
    w̄ₖ ← m·w̄ₖ + (1−m)·wₖ                (per example, keyed by a hash of its token ids)
    loss = Σ wᵢ·lᵢ                       (the batch's w̄ renormalised to sum 1; weights detached)

with uniform weights for the first `warmupRatio` of the optimizer steps, when the model is too
random for its gradients to mean much. The moving average stores n·wᵢ (mean 1 per batch), so a
short last batch does not look more important than a full one.

Three estimators of sᵢ that agree to rounding (a test holds them to 1e-6 in float64):
- `vmap`: per-example gradients, `torch.func.vmap(grad(·))` over `functional_call` with only the
  trainable tensors as arguments (frozen weights and buffers are constants). Under vmap the
  attention mask would need data-dependent control flow inside transformers' mask builder, so it
  is dropped for right-padded rows, which is exact: with causal attention no real token ever sees
  a later pad token, and pad positions carry no label. Other layouts (left padding, packed rows
  with restarting `position_ids`) take the same gradients one example at a time.
- `jvp`: one forward-mode pass, `torch.func.jvp` of the per-example loss vector along g_v.
  PyTorch's sdpa kernels have no forward-mode AD, so choosing jvp switches the model to
  `attn_implementation="eager"` in `prepare` (same function, more memory for long sequences).
- `finiteDifference`: sᵢ ≈ (lᵢ(φ+h·ĝ) − lᵢ(φ−h·ĝ)) / 2h · ‖g_v‖ with ĝ = g_v/‖g_v‖ and
  h = ε^(1/3) of the logits' dtype (the step that balances truncation and rounding error of a
  central difference). Only the trainable tensors move, so it works through bitsandbytes 4-bit
  layers, whose custom autograd functions torch.func cannot transform.
`auto` is vmap, or finiteDifference when the model has bitsandbytes quantised layers.

Estimates run with dropout off (every module in eval mode, restored after). The extra cost per
step is one forward+backward on the validation batch plus one estimator pass: measured on the
tiny CPU model with LoRA and a validation batch as large as the training batch, a reweighted step
costs ≈ 3–3.5× a plain one with finiteDifference, ≈ 4× with vmap, ≈ 5× with jvp (a smaller
validation batch lowers it). Warmup steps cost nothing extra. Evaluation (model not training)
keeps the plain cross-entropy.

`history` keeps, per training micro-batch, the example keys, weights and scores (tests and
diagnostics read it). The warmup follows the Trainer's optimizer step when the context provides it (so a
resumed run does not warm up again); the moving averages start afresh after a resume.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from kubetune.trainer.data import IGNORE_INDEX
from kubetune.trainer.objectives import IncompatibleError
from kubetune.trainer.objectives._base import Objective
from torch.func import functional_call, grad, jvp, vmap

HISTORY = 100_000  # steps kept in `history` (tests and diagnostics read it; bounded for long runs)
_MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")


class Step(NamedTuple):
    """One training micro-batch as the term saw it."""

    keys: list[str]  # example ids (hash of the token ids)
    weights: list[float]  # the weights the loss used (≥ 0, sum 1)
    scores: list[float] | None  # sᵢ = ⟨∇lᵢ, g_v⟩; None during warmup
    warmup: bool


class Reweighting(Objective):
    """The `reweighting` objective term."""

    needs_logits = True  # per-example losses of the training forward's logits (and functional re-forwards)

    def __init__(self, config: Any, ctx: Any) -> None:
        super().__init__(config, ctx)
        self.estimator: str | None = None  # resolved in `prepare`
        self.average: dict[str, float] = {}  # example key → moving average of n·wᵢ
        self.history: deque[Step] = deque(maxlen=HISTORY)
        self._cursor = 0
        self._micro_steps = 0
        self._model: Any = None

    # ---------------------------------------------------------------------- Term interface

    def prepare(self, model: Any) -> None:
        if not self.ctx.validation:
            raise IncompatibleError(
                "reweighting needs a clean validation set; set spec.dataset.validation or spec.dataset.validationSplit"
            )
        self._model = model
        self.estimator = resolve_estimator(str(self.config.estimator), model)
        if self.estimator == "jvp":
            use_eager_attention(model)

    def combine(self, loss: Any, model: Any, inputs: dict[str, Any], outputs: Any) -> tuple[Any, dict[str, float]]:
        if not model.training or inputs.get("labels") is None:
            return loss, {}
        net = self._model if self._model is not None else unwrap(model)
        if self.estimator is None:
            self.prepare(net)
        labels = inputs["labels"]
        losses = per_example_losses(outputs.logits, labels)
        keys = example_keys(inputs, getattr(self.ctx.tokenizer, "pad_token_id", None))
        n = len(keys)
        warmup = self._optimizer_step() < self.warmup_steps()
        self._micro_steps += 1
        if warmup:
            weights, scores = torch.full((n,), 1.0 / n, dtype=torch.float64), None
        else:
            scores = self.scores(net, inputs, outputs.logits.dtype).detach().to("cpu", torch.float64)
            weights = self._smooth(keys, alignment_weights(scores))
        new_loss = (weights.to(losses.device, losses.dtype) * losses).sum()
        self.history.append(Step(keys, weights.tolist(), None if scores is None else scores.tolist(), warmup))
        positive = weights[weights > 0]
        return new_loss, {
            "igbiWeightEntropy": float(-(positive * positive.log()).sum()),
            "igbiWeightMax": float(weights.max()),
            "igbiZeroShare": float((weights == 0).double().mean()),
        }

    # ---------------------------------------------------------------------- the estimate

    def scores(self, model: Any, inputs: dict[str, Any], logits_dtype: torch.dtype | None = None) -> torch.Tensor:
        """sᵢ = ⟨∇φ lᵢ, g_v⟩ for every example of `inputs`, with dropout off.

        `logits_dtype` (the training forward's, autocast included) sets the finite-difference step.
        """
        if self.estimator is None:
            self.prepare(model)
        batch = {k: inputs[k] for k in (*_MODEL_KEYS, "labels") if inputs.get(k) is not None}
        with eval_mode(model):
            params = trainable(model)
            g_v = self.validation_gradient(model, params, batch["input_ids"].device)
            detached = {n: p.detach() for n, p in params.items()}
            if self.estimator == "finiteDifference":
                h = None if logits_dtype is None else finite_difference_step(logits_dtype)
                return finite_difference_scores(model, detached, g_v, batch, h=h)
            return ESTIMATORS[str(self.estimator)](model, detached, g_v, batch)

    def validation_gradient(self, model: Any, params: dict[str, torch.Tensor], device: Any) -> dict[str, torch.Tensor]:
        """∇φ of the mean per-example loss on the next `validationBatchSize` validation examples."""
        val = self.ctx.validation
        size = int(self.config.validation_batch_size)
        chosen = [val[(self._cursor + i) % len(val)] for i in range(min(size, len(val)))]
        self._cursor = (self._cursor + len(chosen)) % len(val)
        collate = self.ctx.collate
        if collate is None:
            from kubetune.trainer.data import Collator

            collate = Collator(self.ctx.tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in collate(chosen).items() if isinstance(v, torch.Tensor)}
        with torch.enable_grad():
            out = model(**{k: batch[k] for k in _MODEL_KEYS if k in batch}, use_cache=False)
            loss = per_example_losses(out.logits, batch["labels"]).mean()
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        return {n: torch.zeros_like(p) if g is None else g.detach() for (n, p), g in zip(params.items(), grads)}

    # ---------------------------------------------------------------------- schedule and smoothing

    def warmup_steps(self) -> int:
        return int(float(self.config.warmup_ratio) * int(self.ctx.max_steps() or 0))

    def _optimizer_step(self) -> int:
        if self.ctx.global_step is not None:
            return int(self.ctx.global_step())
        hp = getattr(self.ctx.spec, "hyperparameters", None)
        accumulation = int(getattr(hp, "gradient_accumulation", 1) or 1)
        return self._micro_steps // accumulation

    def _smooth(self, keys: list[str], weights: torch.Tensor) -> torch.Tensor:
        m = float(self.config.momentum)
        relative = weights * len(keys)
        for key, r in zip(keys, relative.tolist()):
            self.average[key] = m * self.average[key] + (1 - m) * r if key in self.average else r
        smoothed = torch.tensor([self.average[k] for k in keys], dtype=torch.float64)
        total = smoothed.sum()
        return smoothed / total if total > 0 else torch.full_like(smoothed, 1.0 / len(keys))


# -------------------------------------------------------------------------- pieces (tested directly)


def alignment_weights(scores: torch.Tensor) -> torch.Tensor:
    """wᵢ = max(sᵢ, 0) / Σ max(s, 0); uniform when no example helps the validation loss."""
    positive = scores.clamp(min=0).double()
    total = positive.sum()
    if not torch.isfinite(total) or total <= 0:
        return torch.full_like(positive, 1.0 / len(positive))
    return positive / total


def per_example_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean next-token cross-entropy per row, in at least float32.

    Prompt tuning prepends virtual positions to the logits; they are sliced off so position t of
    the logits predicts label t+1 as for the plain model. Rows with no label give 0.
    """
    logits = logits[:, -labels.shape[1] :, :][:, :-1]
    target = labels[:, 1:]
    dtype = torch.promote_types(logits.dtype, torch.float32)
    mask = target != IGNORE_INDEX
    token = F.cross_entropy(logits.to(dtype).transpose(1, 2), target.clamp(min=0), reduction="none")
    return (token * mask).sum(1) / mask.sum(1).clamp(min=1)


def example_keys(inputs: dict[str, Any], pad_token_id: int | None = None) -> list[str]:
    """A stable id per row: a hash of its token ids without padding (the batch carries no ids).

    Padding goes by the attention mask, or for packed rows (no mask) by trailing pad tokens.
    """
    ids = inputs["input_ids"].detach().cpu()
    mask = inputs.get("attention_mask")
    keys = []
    for b in range(ids.shape[0]):
        row = ids[b] if mask is None else ids[b][mask[b].detach().cpu().bool()]
        if mask is None and pad_token_id is not None:
            keep = (row != pad_token_id).nonzero()
            row = row[: int(keep[-1]) + 1] if len(keep) else row[:0]
        keys.append(hashlib.blake2b(row.to(torch.int64).numpy().tobytes(), digest_size=8).hexdigest())
    return keys


def trainable(model: Any) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def unwrap(model: Any) -> Any:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def is_quantized(model: Any) -> bool:
    """True when the model has bitsandbytes layers (their autograd functions defeat torch.func)."""
    names = {"Linear4bit", "Linear8bitLt", "Params4bit", "Int8Params"}
    return any(type(m).__name__ in names for m in model.modules()) or any(
        type(p).__name__ in names for p in model.parameters()
    )


def resolve_estimator(name: str, model: Any) -> str:
    quantized = is_quantized(model)
    if name == "auto":
        return "finiteDifference" if quantized else "vmap"
    if quantized and name in ("vmap", "jvp"):
        raise IncompatibleError(
            f"reweighting estimator {name!r} cannot differentiate through bitsandbytes "
            "quantised layers; set spec.method.objectives[].reweighting.estimator to "
            "finiteDifference or auto"
        )
    if name not in ESTIMATORS:
        raise IncompatibleError(f"unknown reweighting estimator {name!r}; use one of auto, {', '.join(ESTIMATORS)}")
    return name


def use_eager_attention(model: Any) -> None:
    """Forward-mode AD needs eager attention: PyTorch's sdpa kernels have no jvp rule."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", "eager") != "eager":
        base.set_attn_implementation("eager")


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Dropout off for the estimate; every module's own mode restored after.

    bitsandbytes' CPU `Linear4bit`, on its first eval-mode forward without input grads, repacks
    its weight for a bf16 inference kernel and keeps it so: the estimate would then see bf16
    rounding (fatal to a finite difference) and later training steps a different layer. So the
    repacking is switched off while the estimate runs.
    """
    modes = [(m, m.training) for m in model.modules()]
    packing = [(m, m.support_avx512bf16_for_cpu) for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    model.eval()
    for m, _ in packing:
        m.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for m, flag in packing:
            m.support_avx512bf16_for_cpu = flag


# -------------------------------------------------------------------------- estimators
# Each: (model, φ detached, g_v, batch with labels) -> sᵢ for every row, shape (n,).


def _losses_fn(model: Any, batch: dict[str, torch.Tensor]) -> Any:
    kwargs = {k: batch[k] for k in _MODEL_KEYS if k in batch}

    def losses(params: dict[str, torch.Tensor]) -> torch.Tensor:
        out = functional_call(model, params, (), {**kwargs, "use_cache": False}, strict=False)
        return per_example_losses(out.logits, batch["labels"])

    return losses


def _dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum((a[n] * b[n]).sum() for n in a)  # type: ignore[return-value]


def _right_padded(mask: torch.Tensor) -> bool:
    # every row is 1…1 0…0: its ones are a prefix
    return bool((mask.cumprod(dim=1) == mask).all())


def vmap_scores(
    model: Any, params: dict[str, torch.Tensor], g_v: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    mask = batch.get("attention_mask")
    if "position_ids" in batch or (mask is not None and not _right_padded(mask)):
        return loop_scores(model, params, g_v, batch)
    rows = {"input_ids": batch["input_ids"], "labels": batch["labels"]}  # mask dropped: exact, see above

    def score(row: dict[str, torch.Tensor]) -> torch.Tensor:
        one = {k: v.unsqueeze(0) for k, v in row.items()}
        g = grad(lambda p: _losses_fn(model, one)(p)[0])(params)
        return _dot(g, g_v)

    return vmap(score)(rows)


def loop_scores(
    model: Any, params: dict[str, torch.Tensor], g_v: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    """The vmap estimate one row at a time, for layouts vmap cannot trace (packing, left padding)."""
    out = []
    with torch.enable_grad():
        for b in range(batch["input_ids"].shape[0]):
            p = {n: t.detach().requires_grad_() for n, t in params.items()}
            loss = _losses_fn(model, {k: v[b : b + 1] for k, v in batch.items()})(p)[0]
            g = torch.autograd.grad(loss, list(p.values()), allow_unused=True)
            out.append(sum((gi * g_v[n]).sum() for n, gi in zip(p, g) if gi is not None))
    return torch.stack([torch.as_tensor(s) for s in out])


def jvp_scores(
    model: Any, params: dict[str, torch.Tensor], g_v: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    use_eager_attention(model)
    return jvp(_losses_fn(model, batch), (params,), (g_v,))[1]  # (losses, their derivative along g_v)


def finite_difference_step(dtype: torch.dtype) -> float:
    """ε^(1/3): balances O(h²) truncation and O(ε/h) rounding of a central difference."""
    return float(torch.finfo(dtype).eps) ** (1 / 3)


def finite_difference_scores(
    model: Any,
    params: dict[str, torch.Tensor],
    g_v: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    h: float | None = None,
) -> torch.Tensor:
    losses = _losses_fn(model, batch)
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in g_v.values()))
    if norm == 0:
        return torch.zeros(batch["input_ids"].shape[0], device=batch["input_ids"].device)
    with torch.no_grad():
        if h is None:
            probe = functional_call(
                model,
                params,
                (),
                {k: batch[k][:1] for k in _MODEL_KEYS if k in batch} | {"use_cache": False},
                strict=False,
            )
            h = finite_difference_step(probe.logits.dtype)
        plus = losses({n: p + (h / norm) * g_v[n] for n, p in params.items()})
        minus = losses({n: p - (h / norm) * g_v[n] for n, p in params.items()})
    return (plus - minus) / (2 * h) * norm


ESTIMATORS = {
    "vmap": vmap_scores,
    "jvp": jvp_scores,
    "finiteDifference": finite_difference_scores,
}
