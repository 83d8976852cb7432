"""Naming the parts of a decoder-only transformer, for methods that train some of them.

Parameter names differ between families (`model.layers.3.self_attn.q_proj.weight` in Llama,
`transformer.h.3.attn.c_attn.weight` in GPT-2); this maps them onto block indices and module
kinds by parsing the integer index, so `layers.1` never matches `layers.10`.
"""

from __future__ import annotations

import re
from typing import Any

import torch

_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|decoder\.layers)\.(\d+)\.")
# Prefixes of the first name segment inside a block. Norms are tested first: OPT's
# `self_attn_layer_norm` is a norm, not attention.
_NORM = ("norm", "ln_")
_ATTN = ("self_attn", "self_attention", "attn", "attention")  # Llama/GPT-2/NeoX, Falcon/BLOOM
_MLP = ("mlp", "feed_forward", "ffn", "fc1", "fc2", "block_sparse_moe")  # OPT's fc1/fc2, Mixtral's MoE


def block_index(name: str) -> int | None:
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def kind(name: str, model: Any) -> str:
    """attention | mlp | norm (inside a block), embeddings, head, final_norm, or other."""
    if block_index(name) is not None:
        rest = name[_BLOCK.search(name).end() :]  # type: ignore[union-attr]
        first = rest.split(".")[0]
        if any(n in first for n in _NORM):
            return "norm"
        if any(first.startswith(a) for a in _ATTN):
            return "attention"
        if any(first.startswith(m) for m in _MLP):
            return "mlp"
        return "other"
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    param = dict(model.named_parameters()).get(name)
    if param is not None and emb is not None and param is emb.weight:
        tied = head is not None and head.weight is emb.weight
        return "embeddings+head" if tied else "embeddings"
    if param is not None and head is not None and param is head.weight:
        return "head"
    owner = name.rsplit(".", 1)[0] if "." in name else ""
    if param is not None and isinstance(model.get_submodule(owner), torch.nn.Embedding):
        return "embeddings"  # learned positions (GPT-2's wpe, OPT's embed_positions) go with the tokens'
    if any(n in owner.rsplit(".", 1)[-1] for n in _NORM):
        return "final_norm"
    return "other"


def num_blocks(model: Any) -> int:
    return int(model.config.num_hidden_layers)


def normalise(indices: list[int], n: int) -> set[int]:
    out = set()
    for i in indices:
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise ValueError(f"layer index {i} is out of range: the model has {n} blocks (0..{n - 1}, or -1..-{n})")
        out.add(j)
    return out
