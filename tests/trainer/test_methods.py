"""Each adaptation trains exactly what it should (tiny model, CPU).

Mechanism: which tensors change, which stay bit-identical, the trainable count formula.
Effect: the loss falls on a memorisable toy batch.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune.api import Adaptation
from kubetune.api.spec import LoraConfig, QLoraConfig
from kubetune.trainer import methods
from tests.fixtures.models import load_tiny, tiny_model_dir  # noqa: F401


def toy_batch(vocab: int = 200, seed: int = 0) -> dict[str, torch.Tensor]:
    # Four sequences, each a random 6-token motif repeated: memorisable, and learnable by copying.
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (4, 6), generator=g).repeat(1, 4)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def train(model: Any, steps: int = 30, lr: float = 1e-2) -> list[float]:
    batch = toy_batch()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def snapshot(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_registry_keys_equal_the_api_enum() -> None:
    assert set(methods.REGISTRY) == set(Adaptation)


def test_full_changes_every_tensor(tiny_model_dir: Path) -> None:
    model = load_tiny(tiny_model_dir)
    before = snapshot(model)
    model = methods.build(Adaptation.FULL, None).apply(model, None)
    trainable, total = methods.count_parameters(model)
    assert trainable == total
    losses = train(model, steps=30, lr=3e-3)
    assert losses[-1] < 0.5 * losses[0]
    after = snapshot(model)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == []


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["all-linear"]])
def test_lora(tiny_model_dir: Path, targets: list[str]) -> None:
    base = load_tiny(tiny_model_dir)
    before = snapshot(base)
    cfg = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=targets)
    batch = toy_batch()
    base.eval()
    with torch.no_grad():
        base_logits = base(**batch).logits
    model = methods.build(Adaptation.LORA, cfg).apply(base, None)
    # B = 0 at init: the adapted model computes exactly the base function.
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base_logits)
    # trainable == Σ r·(in + out) over the adapted linear layers
    names = {"q_proj", "v_proj"} if targets != ["all-linear"] else {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    expected = sum(
        cfg.r * (m.in_features + m.out_features)
        for n, m in load_tiny(tiny_model_dir).named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in names
    )
    trainable, _ = methods.count_parameters(model)
    assert trainable == expected
    losses = train(model, steps=60, lr=1e-2)
    # The tiny base is random with a frozen head, so LoRA alone plateaus; demand half a nat.
    assert losses[-1] < losses[0] - 0.5
    # base weights bit-identical after training
    after = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in snapshot(model).items() if "lora_" not in k}
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    # merge_and_unload computes what the adapter computes
    model.eval()
    with torch.no_grad():
        adapted = model(**batch).logits
        merged = copy.deepcopy(model).merge_and_unload()(**batch).logits
    assert torch.allclose(adapted, merged, atol=1e-5)
    assert not torch.equal(adapted, base_logits)


def test_qlora_on_cpu(tiny_model_dir: Path) -> None:
    import bitsandbytes as bnb

    cfg = QLoraConfig(r=4, alpha=8, dropout=0.0)
    adaptation = methods.build(Adaptation.QLORA, cfg)
    model = load_tiny(tiny_model_dir, **adaptation.load_kwargs("cpu"))
    packed = {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert packed and all(w.dtype == torch.uint8 for w in packed.values())
    model = adaptation.apply(model, None)
    trainable, total = methods.count_parameters(model)
    assert 0 < trainable < total
    losses = train(model, steps=30, lr=1e-2)
    assert losses[-1] < 0.9 * losses[0]
    after = {n.replace("base_model.model.", "").replace(".base_layer", ""): m.weight.data for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    for name, w in packed.items():
        assert torch.equal(w, after[name]), name
