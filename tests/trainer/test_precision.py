"""Precision (issue 15, Why: a bf16 checkpoint's full fine-tune trained in pure bf16): trained
parameters are fp32 master weights whatever dtype the checkpoint was saved in; pureBf16 is the
explicit way to ask for bf16 weights; the manifest and status.effective say what ran."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures.models import tiny_model_dir  # noqa: F401
from tests.trainer.issue15b import resave, run_job

pytestmark = pytest.mark.slow


def changed_share(base_dir: Path, out_dir: Path) -> float:
    """Share of the weights (all but the input embedding, whose rows for bytes the data never uses
    get no gradient) that differ from the base after training."""
    base = load_file(str(base_dir / "model.safetensors"))
    tuned = load_file(str(out_dir / "adapter" / "model.safetensors"))
    changed = total = 0
    for name, w in base.items():
        if "embed_tokens" in name:
            continue
        changed += int((tuned[name].float() != w.float()).sum())
        total += w.numel()
    return changed / total


def test_bf16_checkpoint_full_fine_tune_keeps_fp32_master_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    bf16 = resave(tiny_model_dir, tmp_path / "bf16", torch.bfloat16)
    fp32 = resave(bf16, tmp_path / "fp32", torch.float32)  # the same values, saved as fp32
    runs = {}
    for name, source, precision in (("bf16", bf16, "auto"), ("fp32", fp32, "auto"), ("pure", bf16, "pureBf16")):
        summary, out = run_job(tmp_path, str(source), name, hyperparameters={"precision": precision})
        manifest = json.loads((out / "manifest.json").read_text())
        runs[name] = (changed_share(source, out), summary["effective"], manifest["hyperparameters"])
    share, effective, recorded = runs["bf16"]
    # 10 steps at the default 2e-5 (AdamW moves every weight with a gradient by ≈ lr a step)
    assert share >= 0.95, f"only {share:.1%} of the bf16 checkpoint's weights changed"
    assert share == pytest.approx(runs["fp32"][0], abs=0.01)
    assert effective["learningRate"] == 2e-5
    assert (effective["weightsDtype"], effective["computeDtype"]) == (
        "float32",
        "float32",
    )  # CPU: precision auto is fp32
    assert (recorded["weightsDtype"], recorded["computeDtype"]) == ("float32", "float32")
    # asked for explicitly: bf16 weights trained in place, which is what loses the small updates
    pure_share, pure_effective, pure_recorded = runs["pure"]
    assert pure_share < 0.5 * share
    assert (pure_effective["precision"], pure_effective["weightsDtype"], pure_effective["computeDtype"]) == (
        "pureBf16",
        "bfloat16",
        "bfloat16",
    )
    assert pure_recorded["weightsDtype"] == "bfloat16"
