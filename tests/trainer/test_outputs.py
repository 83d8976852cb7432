"""Merged export and `kubetune validate --data`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kubetune.api.manifest import load_yaml as load_manifest_yaml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("adaptation", ["lora", "qlora"])
def test_merged_export_loads_as_a_plain_model(tmp_path: Path, builtin_cache: Path, adaptation: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune.api.manifest import Loader, load_job
    from kubetune.trainer import storage
    from kubetune.trainer.run import Options, run

    doc = yaml.load((ROOT / "examples" / "methods" / f"{adaptation}.yaml").read_text(), Loader=Loader)
    doc["spec"]["output"]["format"] = "merged"
    doc["spec"]["dataset"]["train"] = str(ROOT / "examples/data/support-chat.jsonl")
    doc["spec"]["dataset"]["validation"] = str(ROOT / "examples/data/support-chat-eval.jsonl")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    run(load_job(str(tmp_path / "job.yaml")), Options(output=out.as_uri()))
    assert storage.verify(storage.Store(out.as_uri()), "")[0]
    adapter = out / "adapter"
    assert (adapter / "model.safetensors").exists() and not (adapter / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(adapter, use_safetensors=True)
    assert all(p.dtype == torch.float32 for p in merged.parameters())  # no 4-bit leftovers


def test_validate_data_prints_token_stats(builtin_cache: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "validate", "--data", "examples/quickstart.yaml"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "examples/quickstart.yaml: ok" in run.stdout
    assert "tokens" in run.stdout and "no token statistics" not in run.stdout


def test_validate_data_without_tokenizer_and_with_bad_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"messages": [{"role": "robot", "content": "hi"}]}\n')
    doc = load_manifest_yaml((ROOT / "examples" / "lora.yaml").read_text())
    doc["spec"]["dataset"] = {"train": str(bad), "minExamples": 1}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "validate", "--data", str(tmp_path / "job.yaml")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert run.returncode == 1
    assert "no token statistics: the tokenizer of hf://mistralai/Mistral-7B-v0.1 could not be loaded" in run.stdout
    assert f"{bad}:1: " in run.stdout and "robot" in run.stdout
    assert "Traceback" not in run.stdout + run.stderr
