"""Merged export and `kubetune validate --data`."""

from __future__ import annotations

import json
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
    from kubetune.api.manifest import Loader, load_job
    from kubetune.trainer import storage
    from kubetune.trainer.run import Options, run
    from transformers import AutoModelForCausalLM

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


def test_validate_data_checks_without_a_model_and_tokens_on_request(builtin_cache: Path) -> None:
    plain = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "validate", "--data", "examples/quickstart.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert "examples/quickstart.yaml: ok" in plain.stdout
    assert "data: 300 training examples, 40 validation examples" in plain.stdout
    assert "tokens per example" not in plain.stdout  # one streaming pass, no tokenizer
    tokens = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "validate", "--data", "--tokens", "examples/quickstart.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert tokens.returncode == 0, tokens.stdout + tokens.stderr
    assert "tokens per example: min" in tokens.stdout and "trained tokens" in tokens.stdout


def test_validate_data_with_bad_data_and_an_unreachable_tokenizer(tmp_path: Path) -> None:
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"messages": [{"role": "robot", "content": "hi"}]}\n')
    doc = load_manifest_yaml((ROOT / "examples" / "lora.yaml").read_text())
    doc["spec"]["dataset"] = {"train": str(bad), "minExamples": 1}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "validate", "--data", "--tokens", str(tmp_path / "job.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 1
    assert f"{bad}:1: " in run.stdout and "robot" in run.stdout
    assert "Traceback" not in run.stdout + run.stderr
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    run = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "validate", "--data", "--tokens", str(tmp_path / "job.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert (
        "(no token statistics: spec.model.source hf://mistralai/Mistral-7B-v0.1: the Hugging Face Hub is unreachable"
        in run.stdout
    )


def test_validate_data_refuses_a_model_directory_that_is_not_there(tmp_path: Path) -> None:
    """A plain-path model source that is no directory here fails `validate --data` (exit 1, the
    field named, pvc:// suggested for a pod-only volume) instead of reading "ok"; pvc:// is not
    checked here (only the trainer pod mounts it)."""
    doc = load_manifest_yaml((ROOT / "examples" / "quickstart.yaml").read_text())
    for key in ("train", "validation"):
        doc["spec"]["dataset"][key] = str(ROOT / doc["spec"]["dataset"][key])
    for source, code in (
        (str(tmp_path / "no-such-model"), 1),
        (f"file://{tmp_path}/no-such-model", 1),
        ("pvc://models/no-such-model", 0),
    ):
        doc["spec"]["model"]["source"] = source
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
        run = subprocess.run(
            [sys.executable, "-m", "kubetune.cli", "validate", "--data", str(tmp_path / "job.yaml")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == code, (source, run.stdout + run.stderr)
        assert ("spec.model.source: " in run.stdout and "no such directory here" in run.stdout) == (code == 1), (
            run.stdout
        )
        assert "Traceback" not in run.stdout + run.stderr


def test_validation_never_runs_code_shipped_with_the_model(tmp_path: Path, builtin_cache: Path) -> None:
    """I3: trustRemoteCode: true lets the *pod* run a model's code; `validate --data` never does."""
    import shutil

    from kubetune.trainer import builtin

    model = tmp_path / "model"
    shutil.copytree(builtin.ensure("tiny-llama"), model)
    sentinel = tmp_path / "remote-code-ran"
    (model / "tokenization_evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    data_file = tmp_path / "train.jsonl"
    data_file.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    )
    doc = load_manifest_yaml((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["spec"]["model"] = {"source": str(model), "trustRemoteCode": True}
    doc["spec"]["dataset"] = {"train": str(data_file), "minExamples": 1}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    run = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "validate", "--data", "--tokens", str(tmp_path / "job.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert not sentinel.exists()
    assert (
        "needs code shipped with the model (tokenization_evil.py, tokenizer_config.json: auto_map); validation never runs it"
        in run.stdout
    )


def test_validation_job_imports_no_ml_stack(tmp_path: Path) -> None:
    """The pod's --validate-only runs the same streaming check as the CLI, without torch: a torch
    that cannot be imported changes nothing."""
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('torch must not be imported by --validate-only')\n")
    env = {**__import__("os").environ, "PYTHONPATH": f"{fake}:{ROOT / 'api'}:{ROOT / 'trainer'}:{ROOT / 'operator'}"}
    term = tmp_path / "term"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubetune.trainer",
            "--spec",
            "examples/quickstart.yaml",
            "--validate-only",
            "--metrics-port",
            "-1",
            "--termination-path",
            str(term),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads(term.read_text())
    report = summary.pop("dataReport")  # the dataset report's counts, for .status.dataReport
    assert summary == {
        "status": "validated",
        "examples": 300,
        "validationExamples": 40,
        "warnings": [
            "only 300 training examples; 500 or more usually train better (few examples are easily memorised)"
        ],
    }
    assert {
        k: report[k]
        for k in ("examples", "validationExamples", "duplicates", "overMaxSeqLength", "piiFindings", "piiPolicy")
    } == {
        "examples": 300,
        "validationExamples": 40,
        "duplicates": 0,
        "overMaxSeqLength": 0,
        "piiFindings": 0,
        "piiPolicy": "warn",
    }
    assert report["tokens"] > 300 and report["estimatedTrainingTokens"] > report["tokens"]
