"""Guided attention ("GATE"): pull chosen heads' attention toward a guide distribution.

No published method carries the name; this is attention supervision (Tachibana et al. 2017 guided
attention, LISA, MiniLM attention transfer). For guided layers/heads H and counted query rows Q,

    L_att = mean_{h∈H, q∈Q} −Σ_k G_qk · log max(A_qk, 1e-12),    loss = loss + λ·L_att

with the `spans` guide in the mass form −log max(Σ_{k∈S} A_qk, 1e-12) instead.

Why an attention function and not `output_attentions`: the default `sdpa` attention returns no
probabilities, and `output_attentions=True` with it silently yields nothing (METHODS.md). Eager
attention for the whole model would cost memory in every layer and change the numerics of plain
SFT. So `prepare` registers a `transformers.AttentionInterface` function (`kubetune_guided_sdpa`
or `kubetune_guided_eager`, after what the model used) and points the model's config at it. For
every layer it calls the original implementation — the output, and so with λ = 0 the loss and
every gradient, is bit-identical to plain SFT — and *only for guided layers* it also computes
A = softmax(QKᵀ·scaling + mask) in fp32 from the query/key it receives (RoPE already applied; GQA
kv heads picked per query head, as `repeat_kv` would; the causal/padding mask the model built for
that layer), for the guided heads only. The mask function registered under the same name is the
original's, so the output path sees exactly the mask it would have seen. Other implementations
(flash, flex) are replaced by sdpa, with a warning: their masks are not dense matrices.

The capture is armed by `forward_kwargs` (just before the training forward) and the first forward
after that fills a per-forward buffer; extra forwards other terms run before `combine` (ALUM's
perturbed pass) leave it alone. A guided layer that did not report is an error, never an empty
loss. While grads are enabled A is computed even when not armed, so activation checkpointing
(transformers' default, non-reentrant) recomputes exactly the ops of the first pass.

Guides, each built from the allowed-key mask the layer really used (causal ∧ non-pad ∧ same packed
segment, the prefix of prompt-learning models included), rows normalised over allowed keys:
- `diagonal`: Tachibana et al.'s W_nt = 1 − exp(−(n/N − t/T)²/2g²) aligns two sequences; in a
  causal LM the query and key index the same sequence of length L, so the guide is the Gaussian
  band behind the query: G_qk ∝ exp(−((q − k)/(g·L))²/2) over allowed k ≤ q, where L is the length
  (non-pad tokens) of the query's own example or packed segment. Row 0 is G_00 = 1.
- `spans`: G uniform over the evidence tokens S of the example (key positions in `guide_mask`),
  loss in the mass form. Counted rows: those that predict a trained token (labels[q+1] ≠ −100;
  all real rows when there are no labels) and see at least one evidence token.
- `teacher`: the teacher's attention on the same inputs, captured the same way, no grad
  (MiniLM-style attention transfer). The teacher must share the tokenizer and have as many heads
  per guided layer; layer indices are resolved against each model's own depth.
Counted rows always exclude padding queries. Prefix keys (prefix tuning) get guide weight 0.

Memory: one fp32 [B, guided heads, Q, K] tensor per guided layer (and its softmax graph) lives
until the loss is taken; for long sequences guide few layers and heads.

Metrics: attentionLoss (L_att) and guidedMass — the mean attention mass on the keys the guide
emphasises, {k : G_qk ≥ ½·max_k' G_qk'} (for spans exactly S, for a one-hot guide its key).

Data for `spans` is the data layer's (kubetune.trainer.data.encode): each record's character spans
become a 0/1 evidence mask per token of its one encoding, which the collator pads into
`batch[GUIDE_MASK_KEY]` [B, L]; this module only reads it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from kubetune.trainer.data import GUIDE_MASK_KEY, IGNORE_INDEX
from kubetune.trainer.objectives import IncompatibleError
from kubetune.trainer.objectives._base import Objective

log = logging.getLogger(__name__)

PREFIX = "kubetune_guided"
DELEGATES = ("sdpa", "eager")
LOG_FLOOR = 1e-12
CAPTURE_ATTR = "_kubetune_capture"
_MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")  # what a teacher sees

Guide = tuple[torch.Tensor, torch.Tensor]  # G [B, 1|H, Q, K] (rows sum to 1 or are 0), rows [B, Q] bool


# ------------------------------------------------------------------------------ capture


@dataclass
class Capture:
    """Which layers/heads of one model are captured, and the per-forward buffer."""

    layers: tuple[int, ...]  # resolved, non-negative
    heads: list[int] | None  # None = all
    original: str | None  # the model's implementation before install
    name: str  # the registered implementation now in the config
    store: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (A, allowed)
    armed: bool = False

    def arm(self) -> None:
        self.store.clear()
        self.armed = True

    def take(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        out, self.store, self.armed = self.store, {}, False
        return out


def _delegate(module: Any, delegate: str) -> Callable:
    if delegate == "eager":
        # The model's own eager function: the exact ops plain eager training runs.
        return getattr(sys.modules[type(module).__module__], "eager_attention_forward", _eager)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[delegate]


def _make_interface(delegate: str) -> Callable:
    def guided_attention(
        module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, **kwargs: Any
    ) -> Any:
        out = _delegate(module, delegate)(module, query, key, value, attention_mask, **kwargs)
        cap = getattr(module, CAPTURE_ATTR, None)
        if cap is not None and (cap.armed or torch.is_grad_enabled()):
            probs, allowed = _probs(query, key, attention_mask, cap.heads, kwargs.get("scaling"), kwargs.get("softcap"))
            if cap.armed and module.layer_idx not in cap.store:  # the first forward after arm() wins
                cap.store[module.layer_idx] = (probs, allowed)
        return out

    guided_attention.__name__ = f"{PREFIX}_{delegate}"
    return guided_attention


def _probs(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: Any,
    heads: list[int] | None,
    scaling: float | None,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A [B, H, Q, K] (fp32) for the chosen heads, and the allowed-key mask [B, Q, K]."""
    b, hq, q_len, d = query.shape
    hk, k_len = key.shape[1], key.shape[2]
    groups = hq // hk
    idx = list(range(hq)) if heads is None else heads
    q = query[:, idx].float()
    k = key[:, [h // groups for h in idx]].float()  # = repeat_kv(key, groups)[:, idx]
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scaling if scaling is not None else d**-0.5)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    allowed, bias = _allowed(mask, b, q_len, k_len, query.device)
    if bias is not None:
        scores = scores + bias[:, None]
    scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1) * allowed[:, None]  # a row with no allowed key is 0, not uniform
    return probs, allowed


def _allowed(
    mask: Any, b: int, q_len: int, k_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Allowed keys [B, Q, K] from the mask the layer received, plus any additive float bias."""
    if mask is None:  # sdpa's plain-causal shortcut; bottom-right aligned as with a cache
        qi = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
        return (torch.arange(k_len, device=device)[None, :] <= qi).expand(b, q_len, k_len), None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"attentionGuidance cannot read an attention mask of type {type(mask).__name__}; "
            "use attn_implementation sdpa or eager"
        )
    if mask.ndim == 2:  # [B, K] padding mask (flash-style)
        causal, _ = _allowed(None, b, q_len, k_len, device)
        return causal & mask[:, None, -k_len:].bool(), None
    m = mask[:, 0, :, :k_len].expand(b, q_len, k_len)
    if m.dtype == torch.bool:
        return m, None
    allowed = m > torch.finfo(m.dtype).min / 2
    return allowed, torch.where(allowed, m.float(), 0.0)


def _eager(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generic eager attention, for a model module that defines none."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    w = torch.matmul(query, key.transpose(2, 3)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if attention_mask is not None:
        w = w + attention_mask[:, :, :, : key.shape[-2]]
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = torch.nn.functional.dropout(w, p=dropout, training=module.training)
    return torch.matmul(w, value).transpose(1, 2).contiguous(), w


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attention_modules(model: Any) -> dict[int, Any]:
    """layer index -> the self-attention module of that decoder layer."""
    found: dict[int, Any] = {}
    for m in model.modules():
        idx = getattr(m, "layer_idx", None)
        if isinstance(idx, int) and type(m).__name__.endswith("Attention") and hasattr(m, "config"):
            if idx in found and found[idx] is not m:
                raise IncompatibleError(
                    f"attentionGuidance: two attention modules claim layer {idx} "
                    f"({type(found[idx]).__name__}, {type(m).__name__}); this architecture is not supported"
                )
            found[idx] = m
    return found


def num_layers(model: Any) -> int:
    config = _base(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "num_hidden_layers", 0) or len(attention_modules(model)))


def resolve_layers(layers: Sequence[int], depth: int, where: str = "layers") -> tuple[int, ...]:
    out = []
    for i, layer in enumerate(layers):
        if not -depth <= layer < depth:
            raise IncompatibleError(
                f"{where}[{i}] = {layer}: the model has {depth} layers; use an index "
                f"in [{-depth}, {depth - 1}] (negative counts from the end)"
            )
        out.append(layer % depth)
    return tuple(sorted(set(out)))


def install(
    model: Any, layers: Sequence[int], heads: Sequence[int] | None = None, where: str = "attentionGuidance"
) -> Capture:
    """Route `model`'s attention through the capturing function; capture `layers` × `heads`."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    config = _base(model).config
    modules = attention_modules(model)
    if not modules:
        raise IncompatibleError(
            f"{where}: no attention modules with a layer index found in "
            f"{type(_base(model)).__name__}; this architecture is not supported"
        )
    current = getattr(config, "_attn_implementation", None) or "eager"
    if current.startswith(PREFIX):
        uninstall(model)
        current = config._attn_implementation or "eager"
    delegate = current if current in DELEGATES else "sdpa"
    if delegate != current:
        log.warning(
            "attentionGuidance: attention implementation %r replaced by sdpa (probabilities need a dense mask)", current
        )
    name = f"{PREFIX}_{delegate}"
    AttentionInterface.register(name, _make_interface(delegate))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[delegate])
    resolved = resolve_layers(layers, num_layers(model), f"{where}.layers")
    n_heads = {i: _heads_of(m) for i, m in modules.items()}
    for i, h in enumerate(heads or []):
        for layer in resolved:
            if not 0 <= h < n_heads[layer]:
                raise IncompatibleError(
                    f"{where}.heads[{i}] = {h}: layer {layer} has {n_heads[layer]} heads; "
                    f"use indices 0..{n_heads[layer] - 1}"
                )
    missing = [layer for layer in resolved if layer not in modules]
    if missing:
        raise IncompatibleError(f"{where}.layers: no attention module found for layer(s) {missing}")
    cap = Capture(resolved, sorted(set(heads)) if heads else None, current, name)
    config._attn_implementation = name
    for layer, m in modules.items():
        if m.config._attn_implementation != name:  # a sub-config the setter did not reach
            m.config._attn_implementation = name
        setattr(m, CAPTURE_ATTR, cap if layer in resolved else None)
    return cap


def uninstall(model: Any) -> None:
    """Restore the model's original attention implementation (e.g. before saving or generating)."""
    config = _base(model).config
    original = None
    for m in attention_modules(model).values():
        cap = getattr(m, CAPTURE_ATTR, None)
        original = original or (cap.original if cap is not None else None)
        if hasattr(m, CAPTURE_ATTR):
            delattr(m, CAPTURE_ATTR)
    name = config._attn_implementation or ""
    if name.startswith(PREFIX):
        restored = original or name.removeprefix(PREFIX + "_")
        config._attn_implementation = restored
        for m in attention_modules(model).values():
            if (m.config._attn_implementation or "").startswith(PREFIX):
                m.config._attn_implementation = restored


def _heads_of(module: Any) -> int:
    config = module.config
    return int(getattr(module, "num_heads", 0) or config.num_attention_heads)


def _captures(model: Any) -> list[Capture]:
    seen: dict[int, Capture] = {}
    for m in attention_modules(model).values():
        cap = getattr(m, CAPTURE_ATTR, None)
        if cap is not None:
            seen[id(cap)] = cap
    return list(seen.values())


def forward_captured(model: Any, cap: Capture, inputs: dict[str, Any]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """One forward with `cap` armed; every captured layer must report."""
    cap.arm()
    try:
        model(**inputs)
    finally:
        store = cap.take()
    _check_complete(store, cap)
    return store


def _check_complete(store: dict[int, Any], cap: Capture) -> None:
    if set(store) != set(cap.layers):
        raise RuntimeError(
            f"attentionGuidance: captured attention for layers {sorted(store)}, expected {list(cap.layers)}; "
            f"the model's attention implementation is {cap.name!r} at install — something switched it "
            "or bypassed the attention interface (never train on an empty guidance loss)"
        )


def attention_probs(
    model: Any, inputs: dict[str, Any], layers: Sequence[int] | None = None, heads: Sequence[int] | None = None
) -> dict[int, torch.Tensor]:
    """layer -> A [B, H, Q, K] for one forward of `inputs` (grad mode as the caller's).

    A model already prepared by the term uses its capture (its layers and heads); otherwise the
    capture is installed for `layers` (default: all) × `heads` (default: all) and removed after.
    """
    inputs = {k: v for k, v in inputs.items() if k in _MODEL_KEYS}
    caps = _captures(model)
    if caps and layers is None and heads is None:
        return {layer: a for layer, (a, _) in forward_captured(model, caps[0], inputs).items()}
    previous = [(m, getattr(m, CAPTURE_ATTR, None)) for m in attention_modules(model).values()] if caps else None
    original = _base(model).config._attn_implementation
    cap = install(model, range(num_layers(model)) if layers is None else layers, heads)
    try:
        return {layer: a for layer, (a, _) in forward_captured(model, cap, inputs).items()}
    finally:
        if previous is None:
            uninstall(model)
        else:  # put the term's capture back
            _base(model).config._attn_implementation = original
            for m, c in previous:
                setattr(m, CAPTURE_ATTR, c)


# ------------------------------------------------------------------------------ guides


def real_keys(allowed: torch.Tensor) -> torch.Tensor:
    """`allowed` without prefix keys (prefix tuning's virtual keys precede the batch's tokens)."""
    q_len, k_len = allowed.shape[-2], allowed.shape[-1]
    if k_len == q_len:
        return allowed
    return allowed & (torch.arange(k_len, device=allowed.device) >= k_len - q_len)


def counted_rows(allowed: torch.Tensor) -> torch.Tensor:
    """[B, Q]: real (non-pad) queries — a real token may always attend to itself."""
    q_len, k_len = allowed.shape[-2], allowed.shape[-1]
    q = torch.arange(q_len, device=allowed.device)
    return allowed[:, q, q + (k_len - q_len)]


def _normalise(weights: torch.Tensor, rows: torch.Tensor) -> Guide:
    total = weights.sum(-1, keepdim=True)
    rows = rows & (total.squeeze(-1) > 0)
    g = torch.where(rows[..., None], weights / total.clamp_min(torch.finfo(weights.dtype).tiny), 0.0)
    return g[:, None], rows


def sequence_lengths(allowed: torch.Tensor) -> torch.Tensor:
    """[B, Q]: the length of each query's example (or packed segment), from the allowed mask.

    The last real query of a segment sees the whole segment; any query that can see token q
    is in q's segment, so L_q = max over those queries of their allowed-key count.
    """
    q_len, k_len = allowed.shape[-2], allowed.shape[-1]
    real = allowed[..., k_len - q_len :]  # keys that are tokens of this batch (no prefix)
    counts = real.sum(-1).to(torch.float32)  # [B, Q]
    return (real.to(torch.float32) * counts[..., None]).amax(dim=1)  # [B, K=Q]


def diagonal_guide(allowed: torch.Tensor, width: float = 0.2) -> Guide:
    """Causal Tachibana guide: G_qk ∝ exp(−((q−k)/(g·L))²/2) over allowed keys, L = example length."""
    q_len, k_len = allowed.shape[-2], allowed.shape[-1]
    rows = counted_rows(allowed)
    length = sequence_lengths(allowed).clamp_min(1.0)  # [B, Q]
    qi = torch.arange(q_len, device=allowed.device, dtype=torch.float32)[:, None] + (k_len - q_len)
    dist = qi - torch.arange(k_len, device=allowed.device, dtype=torch.float32)[None, :]  # [Q, K]
    w = torch.exp(-0.5 * (dist[None] / (width * length[..., None])) ** 2) * real_keys(allowed)
    return _normalise(w, rows)


def previous_token_guide(allowed: torch.Tensor) -> Guide:
    """G_{q,q−1} = 1 (q = 0 and segment starts: G_qq = 1) — an induction-style test guide."""
    q_len, k_len = allowed.shape[-2], allowed.shape[-1]
    rows = counted_rows(allowed)
    q = torch.arange(q_len, device=allowed.device) + (k_len - q_len)
    k = torch.arange(k_len, device=allowed.device)
    allowed = real_keys(allowed)
    prev = (k[None, :] == (q[:, None] - 1)) & allowed
    own = (k[None, :] == q[:, None]) & allowed & ~prev.any(-1, keepdim=True)
    return _normalise((prev | own).float(), rows)


def span_guide(allowed: torch.Tensor, guide_mask: torch.Tensor, labels: torch.Tensor | None = None) -> Guide:
    """Uniform over the evidence tokens S (guide_mask [B, L] ∈ {0,1}) a counted row may see.

    Counted rows predict a trained token (labels[q+1] ≠ −100; all real rows without labels).
    """
    q_len, k_len = allowed.shape[-2], allowed.shape[-1]
    rows = counted_rows(allowed)
    if labels is not None:  # aligned to the last positions (a soft prompt may precede them)
        predicts = torch.zeros_like(rows)
        n = labels.shape[1]
        predicts[:, q_len - n : q_len - 1] = labels[:, 1:].to(rows.device) != IGNORE_INDEX
        rows = rows & predicts
    support = torch.zeros(allowed.shape[0], k_len, dtype=torch.bool, device=allowed.device)
    support[:, k_len - guide_mask.shape[1] :] = guide_mask.bool()
    return _normalise((allowed & support[:, None, :]).float(), rows)


def teacher_guide(teacher_probs: torch.Tensor, allowed: torch.Tensor) -> Guide:
    """The teacher's A [B, H, Q, K_t] as a guide, left-padded with 0 for any student prefix keys."""
    k_len = allowed.shape[-1]
    g = teacher_probs.float()
    if g.shape[-1] < k_len:
        g = torch.nn.functional.pad(g, (k_len - g.shape[-1], 0))
    g = g * allowed[:, None]
    rows = counted_rows(allowed) & (g.sum(-1) > 0).all(1)
    g = g / g.sum(-1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
    return torch.where(rows[:, None, :, None], g, 0.0), rows


# ------------------------------------------------------------------------------ the loss


def attention_loss(
    probs: torch.Tensor, guide: torch.Tensor, rows: torch.Tensor, mass: bool = False
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(Σ of per-(head,row) losses, Σ of guided masses, count) over counted rows.

    Cross-entropy form −Σ_k G·log A, or with `mass` the form −log Σ_{k: G>0} A.
    """
    guide = guide.expand(probs.shape[0], probs.shape[1], *guide.shape[2:])
    if mass:
        per = -torch.log((probs * (guide > 0)).sum(-1).clamp_min(LOG_FLOOR))
    else:
        per = -(guide * torch.log(probs.clamp_min(LOG_FLOOR))).sum(-1)
    peak = guide.amax(-1, keepdim=True)
    on_support = (probs * ((guide >= 0.5 * peak) & (guide > 0))).sum(-1)
    weight = rows[:, None, :].expand_as(per).to(per.dtype)
    return (per * weight).sum(), (on_support.detach() * weight).sum(), int(weight.sum().item())


class AttentionGuidance(Objective):
    """The `attentionGuidance` objective term."""

    def __init__(
        self, config: Any, ctx: Any, guide: Callable[[torch.Tensor, dict[str, Any]], Guide] | None = None
    ) -> None:
        super().__init__(config, ctx)
        self.weight = float(config.weight)
        self.width = float(config.width)
        self.source = str(getattr(config.guide, "value", config.guide))
        self.guide_fn = guide  # a custom guide builder (allowed, inputs) -> (G, rows); tests use it
        self.capture: Capture | None = None
        self.teacher: Any = None
        self.teacher_capture: Capture | None = None

    def _field(self) -> str:
        index = ""
        try:
            index = str(
                next(i for i, t in enumerate(self.ctx.spec.method.objectives) if str(t.type) == "attentionGuidance")
            )
        except (AttributeError, StopIteration, TypeError):
            pass
        return f"spec.method.objectives[{index}].attentionGuidance"

    # ---------------------------------------------------------------------------- prepare

    def prepare(self, model: Any) -> None:
        layers, heads = list(self.config.layers), self.config.heads
        self.capture = install(model, layers, heads, self._field())
        if self.source != "teacher" or self.guide_fn is not None:
            return
        from kubetune.trainer.objectives.distillation import check_tokenizers

        if getattr(self.ctx, "load_model", None) is None:
            raise IncompatibleError(f"{self._field()}.teacher: no way to load a teacher model in this context")
        teacher, teacher_tokenizer = self.ctx.load_model(self.config.teacher)
        check_tokenizers(self.ctx.tokenizer, teacher_tokenizer, f"{self._field()}.teacher", self.config.teacher.source)
        teacher = teacher.to(next(model.parameters()).device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher_capture = install(teacher, layers, heads, f"{self._field()}.teacher")
        s_heads = {i: _heads_of(m) for i, m in attention_modules(model).items()}
        t_heads = {i: _heads_of(m) for i, m in attention_modules(teacher).items()}
        for s_layer, t_layer in zip(self.capture.layers, self.teacher_capture.layers):
            if heads is None and s_heads[s_layer] != t_heads[t_layer]:
                raise IncompatibleError(
                    f"{self._field()}.teacher: student layer {s_layer} has {s_heads[s_layer]} heads, teacher layer "
                    f"{t_layer} has {t_heads[t_layer]}; attention transfer needs equal counts — set heads"
                )
        self.teacher = teacher

    # ---------------------------------------------------------------------------- the loss

    def forward_kwargs(self) -> dict[str, Any]:
        if self.capture is None:
            raise RuntimeError("AttentionGuidance.prepare(model) was not called")
        self.capture.arm()
        return {}

    def combine(self, loss: Any, model: Any, inputs: dict[str, Any], outputs: Any) -> tuple[Any, dict[str, float]]:
        assert self.capture is not None
        store = self.capture.take()
        _check_complete(store, self.capture)
        teacher_store = None
        if self.teacher is not None:
            assert self.teacher_capture is not None
            with torch.no_grad():
                teacher_store = forward_captured(
                    self.teacher, self.teacher_capture, {k: inputs[k] for k in _MODEL_KEYS if inputs.get(k) is not None}
                )
            teacher_store = dict(zip(self.capture.layers, (teacher_store[t] for t in self.teacher_capture.layers)))
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.weight != 0):
            total, mass_sum, count = None, 0.0, 0
            for layer in self.capture.layers:
                probs, allowed = store[layer]
                g, rows = self._guide(allowed, inputs, teacher_store[layer][0] if teacher_store else None)
                part, mass, n = attention_loss(probs, g, rows, mass=self.source == "spans" and self.guide_fn is None)
                total = part if total is None else total + part
                mass_sum, count = mass_sum + float(mass), count + n
            assert total is not None
            l_att = total / max(count, 1)
        metrics = {"attentionLoss": float(l_att.detach())}
        if count:
            metrics["guidedMass"] = mass_sum / count
        if self.weight == 0:
            return loss, metrics  # exactly plain SFT: no term in the graph at all
        return loss + self.weight * l_att.to(loss.dtype), metrics

    def _guide(self, allowed: torch.Tensor, inputs: dict[str, Any], teacher_probs: torch.Tensor | None) -> Guide:
        if self.guide_fn is not None:
            return self.guide_fn(allowed, inputs)
        if self.source == "diagonal":
            return diagonal_guide(allowed, self.width)
        if self.source == "teacher":
            assert teacher_probs is not None
            return teacher_guide(teacher_probs, allowed)
        mask = inputs.get(GUIDE_MASK_KEY)
        if mask is None:
            raise RuntimeError(
                f"{self._field()}: guide spans needs batch['{GUIDE_MASK_KEY}'] (evidence token "
                "positions), and the batch has none; the collator must add it (data.Collator, from Example.guide_mask)"
            )
        return span_guide(allowed, mask.to(allowed.device), inputs.get("labels"))
