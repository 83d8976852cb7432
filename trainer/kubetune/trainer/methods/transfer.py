"""Transfer learning (linear probe): a frozen backbone in eval mode, a trained head (+ top k blocks).

The frozen part is pinned in eval mode even when the Trainer calls `model.train()`, so dropout
never perturbs its features: its hidden states are bit-identical before and after training.
With tied embeddings the head *is* the input embedding matrix, so training it would move the
backbone's input; the probe gets its own copy of the matrix instead (saved as an untied head).
"""

from __future__ import annotations

import types
from typing import Any

from kubetune.api.enums import Adaptation
from kubetune.trainer.methods import _groups
from kubetune.trainer.methods._base import Method


def _pin_eval(module: Any) -> None:
    module.eval()
    module.train = types.MethodType(lambda self, mode=True: self, module)


def _untie_head(model: Any) -> None:
    import torch

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is None or head is None or head.weight is not emb.weight:
        return
    head.weight = torch.nn.Parameter(emb.weight.detach().clone())
    # Saved and reloaded as two tensors, and never re-tied by a later `tie_weights()`.
    for config in (model.config, model.config.get_text_config()):
        config.tie_word_embeddings = False


class Transfer(Method):
    adaptation = Adaptation.TRANSFER

    def apply(self, model: Any, tokenizer: Any) -> Any:
        _untie_head(model)
        n = _groups.num_blocks(model)
        top = set(range(n - self.config.top_layers, n))
        for name, p in model.named_parameters():
            k = _groups.kind(name, model)
            idx = _groups.block_index(name)
            p.requires_grad_(k in ("head", "embeddings+head", "final_norm") or (idx is not None and idx in top))
        # Every submodule whose parameters are all frozen is pinned in eval mode (its children
        # too, since a pinned module no longer propagates train()).
        for _, module in model.named_modules():
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                _pin_eval(module)
        return model
