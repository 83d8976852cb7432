"""Knowledge distillation (Hinton et al. 2015): pull the student's next-token distribution toward a teacher's.

L = (1−α)·loss + α·T²·KL, the KL taken at label positions only, with temperature T on both models;
`direction: forward` is KL(p_T‖p_S) (Hinton), `reverse` is KL(p_S‖p_T) (mode-seeking, MiniLLM).
The KL compares distributions id by id, so the teacher must share the student's tokenizer: that is
checked once in `prepare`, before any step runs, and a mismatch is a user error
(`IncompatibleError`). Logits are sliced to `len(tokenizer)` because models pad their vocabulary
rows differently.

Memory: with a 150k vocabulary, one fp32 copy of the logits of a batch is gigabytes. When the
training forward projected no logits (`objectives.ChunkedOutputs`, the default), the student's
and the teacher's last hidden states are gathered at label positions and projected by their LM
heads a chunk at a time (`kl_from_hidden`), each chunk under activation checkpointing: neither
model's full logits ever exist. With full student logits (another term needs them) the KL is
still computed over label positions in chunks (`kl_at_labels`), so only one chunk's fp32
softmax tensors exist at a time, in the forward and in the backward.

KL is written as Σ p·(log p − log q) with both log-probabilities from the same `log_softmax`, so
identical teacher and student logits give a difference of exactly zero at every entry: a student
distilled from itself has a KD loss of exactly 0, not 1e-9.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from kubetune.trainer import chunked
from kubetune.trainer.data import IGNORE_INDEX
from kubetune.trainer.objectives import IncompatibleError
from kubetune.trainer.objectives._base import Objective
from torch.utils.checkpoint import checkpoint

CHUNK = 1024  # label positions per KL chunk: 1024 × 150k vocab × 4 bytes ≈ 0.6 GB of fp32 at a time
_MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")  # what the teacher sees: never labels


class Distillation(Objective):
    """The `distillation` objective term."""

    def __init__(self, config: Any, ctx: Any) -> None:
        super().__init__(config, ctx)
        self.temperature = float(config.temperature)
        self.alpha = float(config.alpha)
        self.reverse = str(config.direction) == "reverse"
        self.teacher: Any = None
        self.vocab = len(ctx.tokenizer)
        self.chunk = CHUNK

    # ---------------------------------------------------------------------------- prepare

    def prepare(self, model: Any) -> None:
        if self.ctx.load_model is None:
            raise RuntimeError("Distillation needs Context.load_model to load its teacher")
        teacher, teacher_tokenizer = self.ctx.load_model(self.config.teacher)
        check_tokenizers(self.ctx.tokenizer, teacher_tokenizer, self._field(), self.config.teacher.source)
        device = next(model.parameters()).device
        teacher = teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        for name, m in (("student", model), ("teacher", teacher)):
            rows = _vocab_rows(m)
            if rows is not None and rows < self.vocab:
                raise IncompatibleError(
                    reason="IncompatibleTeacher",
                    message=f"{self._field()}: the {name} model has {rows} output rows but the tokenizer has "
                    f"{self.vocab} tokens; resize the model's embeddings to the tokenizer",
                )
        self.teacher = teacher

    def _field(self) -> str:
        index = "*"
        spec: Any = getattr(self.ctx, "spec", None)
        try:
            index = str(next(i for i, t in enumerate(spec.method.objectives) if str(t.type) == "distillation"))
        except (AttributeError, StopIteration, TypeError):
            pass
        return f"spec.method.objectives[{index}].distillation.teacher"

    # ---------------------------------------------------------------------------- the loss

    def combine(self, loss: Any, model: Any, inputs: dict[str, Any], outputs: Any) -> tuple[Any, dict[str, float]]:
        if self.teacher is None:
            raise RuntimeError("Distillation.prepare(model) was not called")
        labels = inputs["labels"]
        length = labels.shape[1]
        teacher_inputs = {k: inputs[k] for k in _MODEL_KEYS if inputs.get(k) is not None}
        hidden = getattr(outputs, "hidden", None)
        if outputs.logits is None and hidden is not None and chunked.supports_hidden(self.teacher):
            with torch.no_grad():
                teacher_hidden = chunked.forward_hidden(self.teacher, teacher_inputs, length)
            kl, teacher_ce = kl_from_hidden(hidden, teacher_hidden, labels, self.temperature, self.reverse, self.vocab)
            total = (1.0 - self.alpha) * loss + self.alpha * self.temperature**2 * kl
            return total, {"kdLoss": float(kl.detach()), "kdTeacherCe": teacher_ce}
        if outputs.logits is None:
            raise RuntimeError("Distillation needs the student's logits or hidden states")
        # Prompt-tuned students carry virtual positions in front of the real ones.
        student = outputs.logits[:, -length:, : self.vocab]
        with torch.no_grad():
            teacher = self.teacher(**teacher_inputs).logits
        teacher = teacher[:, -length:, : self.vocab]
        kl, teacher_ce = kl_at_labels(student, teacher, labels, self.temperature, self.reverse, self.chunk)
        total = (1.0 - self.alpha) * loss + self.alpha * self.temperature**2 * kl
        return total, {"kdLoss": float(kl.detach()), "kdTeacherCe": teacher_ce}


def check_tokenizers(student: Any, teacher: Any, field: str, source: str) -> None:
    """Refuse a teacher whose token→id mapping or special tokens differ from the student's."""
    sv, tv = student.get_vocab(), teacher.get_vocab()
    differ = sorted(
        (tok for tok in sv.keys() | tv.keys() if sv.get(tok) != tv.get(tok)),
        key=lambda tok: min(sv.get(tok, 1 << 62), tv.get(tok, 1 << 62)),
    )
    problems = []
    if differ:
        shown = ", ".join(
            f"{tok!r}: student {sv.get(tok, 'absent')} vs teacher {tv.get(tok, 'absent')}" for tok in differ[:3]
        )
        problems.append(f"{len(differ)} tokens map to different ids (first: {shown})")
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        a, b = getattr(student, name, None), getattr(teacher, name, None)
        if a != b:
            problems.append(f"{name.removesuffix('_id')} id student {a} vs teacher {b}")
    if problems:
        raise IncompatibleError(
            reason="IncompatibleTeacher",
            message=f"{field} ({source}): the teacher's tokenizer does not match the student's — "
            + "; ".join(problems)
            + ". Distillation compares next-token distributions id by id: use a teacher with the same "
            "tokenizer (usually the same model family).",
        )


def kl_at_labels(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    reverse: bool = False,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, float]:
    """Mean KL over label positions (causal shift applied), and the teacher's CE there.

    `student`/`teacher` are [B, L, V] logits aligned with `labels` [B, L]; position t predicts
    labels[t+1]. Forward: KL(p_T‖p_S); reverse: KL(p_S‖p_T); both at temperature T.
    """
    kl = at_labels(lambda s, t: _kl_sum(s, t, temperature, reverse), student, teacher, labels, chunk)
    with torch.no_grad():
        # Row t predicts labels[t+1]: line the next label up with row t for `at_labels`.
        following = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)[..., None]
        ce = at_labels(_ce_sum, teacher, following, labels, chunk)
    return kl, float(ce)


def kl_from_hidden(
    student: chunked.Hidden,
    teacher: chunked.Hidden,
    labels: torch.Tensor,
    temperature: float = 1.0,
    reverse: bool = False,
    vocab: int | None = None,
    chunk: int | None = None,
) -> tuple[torch.Tensor, float]:
    """`kl_at_labels` from last hidden states: both heads project one chunk of label rows at a
    time (recomputed in the backward), the first `vocab` columns compared."""
    bi, ti, target = chunked.label_rows(labels)
    n = int(target.numel())
    if n == 0:
        return student.states.sum() * 0.0, 0.0
    vocab = vocab or int(student.head.weight.shape[0])
    chunk = chunk or chunked.chunk_rows(vocab)

    def project(h: chunked.Hidden, rows: torch.Tensor) -> torch.Tensor:
        logits = h.head(rows)
        return (h.transform(logits) if h.transform is not None else logits)[:, :vocab]

    def kl(s_rows: torch.Tensor, t_rows: torch.Tensor) -> torch.Tensor:
        return _kl_sum(project(student, s_rows), project(teacher, t_rows), temperature, reverse)

    s_rows = student.states[:, :-1][bi, ti]
    t_rows = teacher.states[:, :-1][bi, ti]
    total = torch.stack(chunked.rows_apply(kl, s_rows, t_rows, chunk=chunk)).sum() / n
    with torch.no_grad():
        ce = sum(
            float(_ce_sum(project(teacher, r), t[:, None])) for r, t in zip(t_rows.split(chunk), target.split(chunk))
        )
    return total, ce / n


def at_labels(fn: Any, a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Σ fn(a_rows, b_rows) over label positions, chunked and checkpointed, divided by their count.

    `a`, `b` are [B, L, ·] aligned with `labels` [B, L]; the causal shift is applied here (row t
    predicts labels[t+1]). `fn(a_rows, b_rows)` returns the sum over a chunk of rows.
    """
    target = labels[:, 1:]
    bi, ti = (target != IGNORE_INDEX).nonzero(as_tuple=True)
    n = bi.numel()
    if n == 0:
        return a.sum() * 0.0
    # One gather of the label rows; `split` backpropagates as a single concatenation.
    a_rows, b_rows = a[:, :-1][bi, ti], b[:, :-1][bi, ti]
    total: torch.Tensor | None = None
    for ac, bc in zip(a_rows.split(chunk), b_rows.split(chunk)):
        if torch.is_grad_enabled() and (ac.requires_grad or bc.requires_grad):
            part = checkpoint(fn, ac, bc, use_reentrant=False)
        else:
            part = fn(ac, bc)
        total = part if total is None else total + part
    assert total is not None
    return total / n


def _ce_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = _upcast(logits)
    return (torch.logsumexp(logits, -1) - logits.gather(1, target).squeeze(1)).sum()


def _kl_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float, reverse: bool) -> torch.Tensor:
    ls = F.log_softmax(_upcast(student) / temperature, dim=-1)
    lt = F.log_softmax(_upcast(teacher) / temperature, dim=-1)
    lp, lq = (ls, lt) if reverse else (lt, ls)
    p = lp.exp()
    # 0·log 0 = 0; masking the difference (not the product) keeps -inf − -inf NaNs out of the grads.
    diff = torch.where(p > 0, lp - lq, torch.zeros((), dtype=lp.dtype, device=lp.device))
    return (p * diff).sum()


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp32 at least (bf16/fp16 logits are upcast; fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _vocab_rows(model: Any) -> int | None:
    try:
        head = model.get_output_embeddings()
        return int(head.weight.shape[0]) if head is not None else None
    except (AttributeError, NotImplementedError):
        return getattr(getattr(model, "config", None), "vocab_size", None)
