"""Selected layers: only chosen blocks and module kinds train; every other tensor stays frozen.

`indices` pick transformer blocks (negative from the end), `modules` pick attention / mlp / norm
inside them, plus the global embeddings and head (with tied embeddings the head *is* the
embedding matrix, so asking for either trains it). The result is the full model's weights.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.enums import Adaptation
from kubetune.trainer.methods import _groups
from kubetune.trainer.methods._base import Method


def selected(model: Any, indices: list[int], modules: list[str]) -> list[str]:
    blocks = _groups.normalise(indices, _groups.num_blocks(model))
    wanted = {str(m) for m in modules}
    names = []
    for name, _ in model.named_parameters():
        k = _groups.kind(name, model)
        idx = _groups.block_index(name)
        if (
            (idx is not None and idx in blocks and k in wanted)
            or (k == "embeddings" and "embeddings" in wanted)
            or (k == "head" and "head" in wanted)
            or (k == "embeddings+head" and wanted & {"embeddings", "head"})
        ):
            names.append(name)
    return names


class Layers(Method):
    adaptation = Adaptation.LAYERS

    def apply(self, model: Any, tokenizer: Any) -> Any:
        try:
            names = set(selected(model, list(self.config.indices), list(self.config.modules)))
        except ValueError as err:
            raise ValueError(f"spec.method.layers.indices: {err}") from None
        if not names:
            modules = ", ".join(str(m) for m in self.config.modules)
            raise ValueError(
                f"spec.method.layers selects no parameter: blocks {list(self.config.indices)} of this model "
                f"have no trainable {modules} (e.g. its norms have no weights); choose other indices or modules"
            )
        for name, p in model.named_parameters():
            p.requires_grad_(name in names)
        return model
