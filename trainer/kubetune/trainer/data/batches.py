"""Batches: pack examples into sequences, collate them into torch batches, make a model safe for packing.

torch is imported inside the collator, so importing this module stays torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kubetune.trainer.data.encode import GUIDE_MASK_KEY, IGNORE_INDEX, Example


def _first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Greedy first-fit in input order; a max-tree over bins keeps it O(n log n)."""
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    tree = [capacity] * (2 * size)  # remaining room, max over each subtree
    bins: list[list[int]] = []
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the {capacity} a sequence holds")
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= n else 2 * node + 1
        if node - size == len(bins):
            bins.append([])
        bins[node - size].append(i)
        tree[node] -= n
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


def pack(examples: Sequence[Example], max_seq_length: int) -> list[dict]:
    """Pack examples into sequences of at most max_seq_length tokens, positions restarting per example."""
    out = []
    for group in _first_fit([len(e.input_ids) for e in examples], max_seq_length):
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        guide: list[int] = []
        for i in group:
            e = examples[i]
            ids += e.input_ids
            labels += [IGNORE_INDEX] + e.labels[1:]  # no token predicts across the boundary
            positions += range(len(e.input_ids))
            guide += e.guide_mask if e.guide_mask is not None else [0] * len(e.input_ids)
        row = {"input_ids": ids, "labels": labels, "position_ids": positions}
        if any(examples[i].guide_mask is not None for i in group):
            row[GUIDE_MASK_KEY] = guide
        out.append(row)
    return out


class Collator:
    """Right-pads a list of examples (or packed sequences) into a torch batch.

    Packed batches carry `position_ids` and no `attention_mask`: transformers derives the
    block-diagonal mask from the position restarts. Padding gets its own restarting positions so
    it forms a separate block. Call `prepare_model_for_packing` on the model first.
    """

    def __init__(self, pad_token_id: int, packing: bool = False, pad_to_multiple_of: int | None = None):
        self.pad_token_id, self.packing, self.multiple = pad_token_id, packing, pad_to_multiple_of

    def __call__(self, features: Sequence[Example | dict]) -> dict:
        import torch

        rows: list[dict[str, Any]] = [
            f if isinstance(f, dict) else {"input_ids": f.input_ids, "labels": f.labels, GUIDE_MASK_KEY: f.guide_mask}
            for f in features
        ]
        width = max(len(r["input_ids"]) for r in rows)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        extra = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[b, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
            labels[b, :n] = torch.tensor(r["labels"], dtype=torch.long)
            if self.packing:
                extra[b, :n] = torch.tensor(r.get("position_ids") or range(n), dtype=torch.long)
                extra[b, n:] = torch.arange(width - n)
            else:
                extra[b, :n] = 1
        key = "position_ids" if self.packing else "attention_mask"
        batch = {"input_ids": ids, "labels": labels, key: extra}
        if any(r.get(GUIDE_MASK_KEY) is not None for r in rows):
            guide = torch.zeros((len(rows), width), dtype=torch.long)
            for b, r in enumerate(rows):
                mask = r.get(GUIDE_MASK_KEY) or []
                guide[b, : len(mask)] = torch.tensor(mask, dtype=torch.long)
            batch[GUIDE_MASK_KEY] = guide
        return batch


PACKING_ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")


def packing_attention(device: str, config: Any = None) -> str:
    """The attention implementation a packed run loads the model with, per device.

    - CUDA with `flash_attn` installed: `flash_attention_2`. transformers turns the restarting
      `position_ids` into cumulative sequence lengths and calls the varlen kernel: no mask at
      all, and no attention computed across example boundaries (padding-free).
    - Otherwise `sdpa`: transformers builds a dense block-diagonal causal mask from the position
      restarts (a [batch, 1, L, L] bool tensor, 4 MiB per 2 048-token row) and SDPA applies it.
      Correct, and the mask is small, but every cross-example block is still computed. Families
      without SDPA (Gemma 2, `families.Family.sdpa`) get `eager`, which applies the same mask.
    - Not chosen: `flex_attention` with a document mask. On torch 2.13 CPU it gives the same
      logits, but its first call compiles (torch.compile + a C++ toolchain) for minutes on a
      2-core machine — more than a short CPU fine-tune takes — and on GPU flash varlen is the
      faster, compile-free padding-free path.
    """
    import importlib.util

    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    from kubetune.trainer.methods.families import family

    return "sdpa" if config is None or family(config).sdpa else "eager"  # Gemma 2: eager only, same mask


def prepare_model_for_packing(model) -> None:
    """Make packed batches safe: no KV cache (it disables packed masking), a mask-aware backend."""
    config = model.config
    impl = getattr(config, "_attn_implementation", None)
    if impl not in PACKING_ATTENTION:
        raise ValueError(
            f"packing needs one of the attention implementations {PACKING_ATTENTION}, "
            f"the model uses {impl!r}; set spec.dataset.packing: false"
        )
    peft_config = getattr(model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        raise ValueError(
            "packing cannot be combined with prefix or prompt tuning (virtual tokens "
            "and cached prefixes defeat the per-example mask); set spec.dataset.packing: false"
        )
    config.use_cache = False


def efficiency(examples: Sequence[Example], batch_size: int, max_seq_length: int, packing: bool) -> float:
    """Share of real (non-pad) tokens in the batches the collator builds, in example order."""
    lengths = [min(len(e.input_ids), max_seq_length) for e in examples]
    if packing:
        lengths = [sum(lengths[i] for i in group) for group in _first_fit(lengths, max_seq_length)]
    real = total = 0
    for i in range(0, len(lengths), batch_size):
        batch = lengths[i : i + batch_size]
        real, total = real + sum(batch), total + len(batch) * max(batch)
    return real / total if total else 0.0
