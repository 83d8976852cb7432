"""Optimizer registry and the layer-wise trust ratio of LAMB and LARS (tiny model, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kubetune.api import Objective, Optimizer
from kubetune.trainer import objectives, optimizers

from tests.fixtures.models import load_tiny, tiny_model_dir  # noqa: F401


def test_optimizer_registry_equals_the_api_enum() -> None:
    assert set(optimizers.REGISTRY) == set(Optimizer)


def test_objective_registry_equals_the_api_enum() -> None:
    assert set(objectives._registry()) == set(Objective)
    assert set(objectives.ORDER) == set(Objective)


def one_step(model_dir: Path, name: str, lr: float = 1e-2) -> dict[str, float]:
    model = load_tiny(model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = [{"params": [p for p in model.parameters()]}]
    opt = optimizers.build(name, groups, lr, 0.0)
    ids = torch.randint(4, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    out = {}
    for n, p in model.named_parameters():
        if p.grad is not None and float(p.grad.norm()) > 0:
            out[n] = float((p.detach() - before[n]).norm() / (lr * before[n].norm()))
    return out


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_trust_ratio_equal_across_tensors(tiny_model_dir: Path, name: str) -> None:
    ratios = one_step(tiny_model_dir, name)
    assert len(ratios) > 10
    values = list(ratios.values())
    assert max(values) - min(values) < 1e-3 * max(values), ratios


def test_adamw_is_not_layer_wise(tiny_model_dir: Path) -> None:
    """The contrast that makes the trust-ratio test meaningful: AdamW's ratios differ widely."""
    values = list(one_step(tiny_model_dir, "adamw").values())
    assert max(values) > 2 * min(values)


def test_adamw8bit_steps_on_cpu(tiny_model_dir: Path) -> None:
    assert one_step(tiny_model_dir, "adamw8bit")


def test_paged_adamw_matches_adamw_update_on_cpu(tiny_model_dir: Path) -> None:
    """Paging only changes where the state lives; the first step's update equals AdamW's."""
    paged, plain = one_step(tiny_model_dir, "pagedAdamw"), one_step(tiny_model_dir, "adamw")
    assert paged.keys() == plain.keys()
    for name in paged:
        assert paged[name] == pytest.approx(plain[name], rel=1e-3), name


def test_default_groups_skip_frozen_and_decay_matrices_only(tiny_model_dir: Path) -> None:
    model = load_tiny(tiny_model_dir)
    model.model.embed_tokens.weight.requires_grad_(False)
    groups = optimizers.default_groups(model, 0.1)
    params = [p for g in groups for p in g["params"]]
    assert all(p.requires_grad for p in params)
    assert all(p is not model.model.embed_tokens.weight for p in params)
    decay = next(g for g in groups if g["weight_decay"] == 0.1)
    assert all(p.ndim >= 2 for p in decay["params"])


def test_adamw_uses_the_fused_kernel_and_updates_like_the_loop(tiny_model_dir: Path) -> None:
    """CPU fp32 parameters take torch's fused AdamW (as HF's default `adamw_torch_fused`); its
    first step equals the per-tensor implementation's, and integer tensors fall back."""
    model = load_tiny(tiny_model_dir)
    opt = optimizers.build("adamw", [{"params": list(model.parameters())}], 1e-2, 0.0)
    assert opt.defaults["fused"] is True
    fused = one_step(tiny_model_dir, "adamw")
    model = load_tiny(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loop = torch.optim.AdamW(list(model.parameters()), lr=1e-2, weight_decay=0.0, foreach=False)
    ids = torch.randint(4, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    loop.step()
    for n, p in model.named_parameters():
        if n in fused:
            assert fused[n] == pytest.approx(
                float((p.detach() - before[n]).norm() / (1e-2 * before[n].norm())), rel=1e-4
            ), n
    assert optimizers._fusable([{"params": [torch.zeros(2, dtype=torch.long)]}]) is None
    assert optimizers._fusable([{"params": []}]) is None
