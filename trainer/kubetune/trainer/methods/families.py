"""What kubetune knows per model family (`config.model_type`), in one place.

Default adapter targets come from peft's own tables (`targets.py` reads them); this module holds
the facts peft does not: which families keep packed examples apart, which ones keep their
mixture-of-experts layers as fused parameters, and which attention implementation a packed run
loads each family with. Every fact here is tested on a tiny model of the family
(tests/trainer/test_families.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    model_type: str
    packing: bool = False
    """Packed examples stay apart: with restarting `position_ids` and no attention mask, each
    example's logits equal its logits alone (tested per family). Families whose positions or
    attention bias come from the attention mask (OPT's learned offsets, BLOOM's and MPT's ALiBi)
    let packed examples attend to each other, so packing is refused for them."""
    sdpa: bool = True
    """transformers implements SDPA attention for it (Gemma 2 is eager-only: soft-capped logits)."""
    routers: tuple[str, ...] = ()
    """Mixture-of-experts router weights that are not `nn.Linear` modules (peft `target_parameters`
    names), adapted with the experts by `all-linear` as peft's own v5 conversion does."""


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", packing=True),
        Family("qwen2", packing=True),
        Family("qwen3", packing=True),
        Family("mistral", packing=True),
        Family("gemma", packing=True),
        Family("gemma2", packing=True, sdpa=False),
        Family("gemma3_text", packing=True),
        Family("phi3", packing=True),
        Family("gpt2", packing=True),
        Family("gpt_neox", packing=True),
        Family("falcon", packing=True),
        Family("mixtral", packing=True, routers=("gate.weight",)),
        Family("opt"),  # positions from the attention mask's cumsum: packed logits differ by ~0.3
        Family("bloom", sdpa=False),  # ALiBi from the attention mask
        Family("mpt", sdpa=False),  # ALiBi over the whole packed row
    )
}


def family(config: Any) -> Family:
    """The facts for a model config; an unknown family gets the conservative defaults."""
    model_type = str(getattr(config, "model_type", "") or "")
    return FAMILIES.get(model_type, Family(model_type))


def packing_families() -> list[str]:
    return sorted(t for t, f in FAMILIES.items() if f.packing)


def check_packing(config: Any) -> None:
    """Raise ValueError (the message for spec.dataset.packing) unless the family keeps packed
    examples apart. Refused rather than silently padded: the user asked for packing, and a refusal
    before the model loads costs nothing, while a quiet fallback changes steps and throughput."""
    fam = family(config)
    if fam.packing:
        return
    raise ValueError(
        f"model type {fam.model_type or 'unknown'!r} does not keep packed examples apart (its attention takes "
        f"positions or biases from the attention mask, so packed examples would attend to each other); set "
        f"spec.dataset.packing: false. Packing is supported for {', '.join(packing_families())}"
    )
