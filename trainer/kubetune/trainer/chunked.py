"""Losses from the final hidden states, a chunk of label rows at a time: the logits never exist whole.

With a 128k vocabulary (Llama 3, Qwen, Gemma) at 2 048 tokens, one fp32 copy of the logits is
1 GiB per sequence, and plain cross-entropy keeps three (the logits, their log-softmax for the
backward, the gradient). Here the model runs with `logits_to_keep` = no position (its LM head
projects nothing), a forward hook on the decoder keeps the last hidden state, and every loss
projects only the rows that have a label, `CHUNK_BYTES` of fp32 logits at a time:

- `cross_entropy_sum` (SFT, evaluation): a fused linear cross-entropy in plain torch — each
  chunk's logits, loss and gradient (softmax − one-hot, × the head's weight for the hidden
  states, × the hidden states for the weight when it trains) are computed in the forward and
  the chunk's logits dropped; the backward only scales the stored gradients. The head's matmuls
  are done once, as unchunked autograd does, so chunking costs no extra compute. Used when the
  LM head is a plain `nn.Linear`; any other head (a LoRA-wrapped or quantised `lm_head`) takes
  the generic path below.
- `rows_apply` (distillation KL with the teacher's hidden states chunked alike, per-token
  completion log-probs — `rows_logprobs`, used by ORPO (preference._chunked_orpo) and the
  held-out preference accuracy — and the generic CE): each chunk under
  `torch.utils.checkpoint`, so its logits are recomputed in the backward instead of kept.
  TRL 1.16's DPOTrainer and KTOTrainer already score through their own fused LM head
  (`trl.trainer.utils.add_fused_lm_head`) and are left to it.

Why not a library: Liger's fused linear cross-entropy is Triton (GPU only); TRL's chunked NLL
is tied to its SFTTrainer's forward; transformers has none. Both paths are plain torch, so they
run on CPU and GPU alike and the CPU tests check them against the unchunked loss.

Label rows follow our data layer: position t predicts labels[t+1], −100 means "no loss" (prompt
tokens, messages with weight 0, packing boundaries, padding). Per-message weights are 0/1 and
therefore already in the labels. Terms that need the full logits (reweighting's per-example
functional gradients, adversarial's KL on perturbed inputs) keep the full-logits forward; see
`objectives.ObjectiveTrainer`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from kubetune.api.memory import chunk_rows  # one home: the memory model counts these chunks
from kubetune.trainer.data import IGNORE_INDEX
from torch.utils.checkpoint import checkpoint

# ------------------------------------------------------------------------------ hidden states


@dataclass
class Hidden:
    """The last hidden states of a forward that projected no logits, aligned with `labels`."""

    states: torch.Tensor  # [B, L, H] (virtual prompt-tuning positions sliced off)
    head: Any  # the LM head module (its `weight`, possibly wrapped)
    transform: Callable[[torch.Tensor], torch.Tensor] | None  # logit soft-capping / scaling
    outputs: Any  # the model's output object (attentions, …); its logits are empty


def _unwrap(model: Any) -> Any:
    """The transformers model under DDP / PEFT wrappers."""
    model = getattr(model, "module", model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def supports_hidden(model: Any) -> bool:
    """True when the model can run without projecting logits: its causal-LM forward takes
    `logits_to_keep` and it exposes its decoder and output embeddings."""
    base = _unwrap(model)
    try:
        decoder = base.get_decoder()
        head = base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    if decoder is None or head is None:
        return False
    return "logits_to_keep" in inspect.signature(type(base).forward).parameters


def _transform(config: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the causal-LM forward applies after the head (Cohere's scale, Gemma 2/3's soft cap)."""
    scale = getattr(config, "logit_scale", None)
    cap = getattr(config, "final_logit_softcapping", None)
    if not scale and not cap:
        return None

    def apply(logits: torch.Tensor) -> torch.Tensor:
        if scale:
            logits = logits * scale
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return apply


def forward_hidden(model: Any, inputs: dict[str, Any], length: int | None = None, **extra: Any) -> Hidden:
    """Run `model` (PEFT-wrapped, prompt-tuned, DDP-wrapped alike) on `inputs` without logits."""
    base = _unwrap(model)
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    captured: list[torch.Tensor] = []

    def keep(_module: Any, _args: Any, out: Any) -> None:
        captured.append(out[0] if isinstance(out, tuple) else out.last_hidden_state)

    device = inputs["input_ids"].device if inputs.get("input_ids") is not None else next(base.parameters()).device
    handle = decoder.register_forward_hook(keep)
    try:
        outputs = model(**inputs, **extra, logits_to_keep=torch.zeros(0, dtype=torch.long, device=device))
    finally:
        handle.remove()
    states = captured[-1]
    if length is not None:
        states = states[:, -length:]  # prompt tuning prepends virtual positions
    return Hidden(states, head, _transform(base.config), outputs)


def label_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch index, position, next label) of every position whose next token has a label."""
    target = labels[:, 1:]
    bi, ti = (target != IGNORE_INDEX).nonzero(as_tuple=True)
    return bi, ti, target[bi, ti]


# ------------------------------------------------------------------------------ fused linear CE


def _plain_linear(head: Any) -> bool:
    return type(head) is torch.nn.Linear


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ CE(rows @ Wᵀ + b, target), gradients computed chunk by chunk in the forward."""

    @staticmethod
    def forward(
        ctx: Any, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        need_rows, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        grad_rows = torch.empty_like(rows) if need_rows else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        for start in range(0, rows.shape[0], chunk):
            h = rows[start : start + chunk]
            t = target[start : start + chunk]
            logits = F.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, -1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_rows or need_weight or need_bias:
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                g = grad.to(h.dtype) if h.dtype != torch.float32 else grad
                if grad_rows is not None:
                    grad_rows[start : start + chunk] = g @ weight.to(g.dtype)
                if grad_weight is not None:
                    grad_weight += grad.t() @ h.float()
                if grad_bias is not None:
                    grad_bias += grad.sum(0)
                del grad, g
            del logits, lse  # before the next chunk's logits exist: one chunk at a time, not two
        ctx.save_for_backward(*(x for x in (grad_rows, grad_weight, grad_bias) if x is not None))
        ctx.has = (grad_rows is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (rows.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        saved = iter(ctx.saved_tensors)
        out: list[torch.Tensor | None] = []
        for has, dtype in zip(ctx.has, ctx.dtypes):
            out.append((next(saved) * grad_out).to(dtype) if has else None)
        return out[0], out[1], out[2], None, None


def _ce_rows(head: Any, transform: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def ce(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        if transform is not None:
            logits = transform(logits)
        return F.cross_entropy(logits.float(), t, reduction="sum")

    return ce


def rows_apply(fn: Callable[..., torch.Tensor], *rows: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    """fn over row chunks of `rows` (equal first dimension), each checkpointed when it needs a
    gradient so its intermediate logits are recomputed in the backward instead of kept."""
    parts = []
    for pieces in zip(*(r.split(chunk) for r in rows)):
        if torch.is_grad_enabled() and any(p.requires_grad for p in pieces):
            parts.append(checkpoint(fn, *pieces, use_reentrant=False))
        else:
            parts.append(fn(*pieces))
    return parts


def cross_entropy_sum(hidden: Hidden, labels: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, int]:
    """(Σ token cross-entropy over label positions, their count), never holding more than one
    chunk of logits."""
    bi, ti, target = label_rows(labels)
    head = hidden.head
    vocab = head.weight.shape[0]
    chunk = chunk or chunk_rows(vocab)
    n = int(target.numel())
    if n == 0:
        return hidden.states.sum() * 0.0, 0
    rows = hidden.states[:, :-1][bi, ti]
    if _plain_linear(head) and hidden.transform is None:
        return _LinearCrossEntropy.apply(rows, head.weight, head.bias, target, chunk), n
    parts = rows_apply(_ce_rows(head, hidden.transform), rows, target, chunk=chunk)
    return torch.stack(parts).sum(), n


def token_stats(hidden: Hidden, labels: torch.Tensor, chunk: int | None = None) -> tuple[float, int, int]:
    """(Σ cross-entropy, label tokens, exactly predicted tokens) without a gradient: evaluation."""
    bi, ti, target = label_rows(labels)
    rows = hidden.states[:, :-1][bi, ti]
    chunk = chunk or chunk_rows(hidden.head.weight.shape[0])
    total, correct = 0.0, 0
    with torch.no_grad():
        for h, t in zip(rows.split(chunk), target.split(chunk)):
            logits = hidden.head(h)
            if hidden.transform is not None:
                logits = hidden.transform(logits)
            logits = logits.float()
            total += float(F.cross_entropy(logits, t, reduction="sum"))
            correct += int((logits.argmax(-1) == t).sum())
            del logits
    return total, int(target.numel()), correct


def sequence_logprobs(
    model: Any, inputs: dict[str, Any], labels: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """Per-sequence Σ log p(label token) over the labelled (completion) tokens, shape [B]: the
    quantity DPO-family losses compare between chosen and rejected completions. Chunked and
    checkpointed like the losses; differentiable when grads are enabled."""
    hidden = forward_hidden(model, inputs, labels.shape[1])
    return hidden_logprobs(hidden, labels, chunk)


def hidden_logprobs(hidden: Hidden, labels: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """`sequence_logprobs` from hidden states already computed."""
    bi, ti, target = label_rows(labels)
    out = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device)
    if target.numel() == 0:
        return out + hidden.states.sum() * 0.0
    return out.index_add(0, bi, rows_logprobs(hidden, bi, ti, target, chunk))


def rows_logprobs(
    hidden: Hidden, bi: torch.Tensor, ti: torch.Tensor, target: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """log p(target[i]) at position ti[i] of sequence bi[i] (`label_rows` order), fp32, shape [N]:
    per-token completion log-probs, one chunk of logits at a time, checkpointed."""
    rows = hidden.states[:, :-1][bi, ti]
    chunk = chunk or chunk_rows(hidden.head.weight.shape[0])
    head, transform = hidden.head, hidden.transform

    def logp(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        if transform is not None:
            logits = transform(logits)
        return -F.cross_entropy(logits.float(), t, reduction="none")

    if target.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=target.device)
    return torch.cat(rows_apply(logp, rows, target, chunk=chunk))


def mean_logits(hidden: Hidden, chunk: int | None = None) -> torch.Tensor:
    """Each position's logits averaged over the vocabulary, [B, L-1] (the positions that predict
    a next token), fp32, without a gradient: the `logits/chosen|rejected` metrics of the DPO
    family. A plain linear head without a transform needs one mat-vec (mean_v (h·w_v + b_v) =
    h·mean_v w_v + mean_v b_v); any other head is projected a chunk of rows at a time."""
    states = hidden.states[:, :-1]
    head = hidden.head
    with torch.no_grad():
        if _plain_linear(head) and hidden.transform is None:
            out = states.float() @ head.weight.float().mean(0)
            return out + head.bias.float().mean() if head.bias is not None else out
        flat = states.reshape(-1, states.shape[-1])
        chunk = chunk or chunk_rows(head.weight.shape[0])
        parts = []
        for h in flat.split(chunk):
            logits = head(h)
            if hidden.transform is not None:
                logits = hidden.transform(logits)
            parts.append(logits.float().mean(-1))
            del logits
        return torch.cat(parts).view(states.shape[:2])


def sft_loss(
    model: Any, inputs: dict[str, Any], num_items: Any = None, **extra: Any
) -> tuple[torch.Tensor, Hidden, int]:
    """Token-mean cross-entropy of a batch (`inputs` with labels) from chunked logits: divided by
    `num_items` when given (the Trainer's label count over the accumulated batches, as the
    model's own loss does), else by this batch's label count."""
    labels = inputs["labels"]
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = forward_hidden(model, model_inputs, labels.shape[1], **extra)
    total, n = cross_entropy_sum(hidden, labels)
    denominator = num_items if num_items is not None else max(n, 1)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(total.device)
    return total / denominator, hidden, n
