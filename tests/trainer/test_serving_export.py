"""The trainer's export for spec.serving: engines cannot load DoRA or IA3 adapters, so such a result
gets a merged full model at `<output>/merged/` (committed with its own manifest) and its URI in the
summary's adapter.mergedUri; a LoRA adapter is served as it is (no copy), and a full fine-tune's
result already is the full model (mergedUri points at it, no second copy).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _job(tmp_path: Path, adaptation: str, **spec: Any) -> Path:
    """examples/methods/<adaptation>.yaml (tiny model, a few steps) with the given spec fields."""
    from kubetune.api.manifest import Loader

    doc = yaml.load((ROOT / "examples" / "methods" / f"{adaptation}.yaml").read_text(), Loader=Loader)
    doc["spec"]["dataset"]["train"] = str(ROOT / "examples/data/support-chat.jsonl")
    doc["spec"]["dataset"]["validation"] = str(ROOT / "examples/data/support-chat-eval.jsonl")
    doc["spec"]["hyperparameters"]["maxSteps"] = 4
    doc["spec"].update(spec)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _run(path: Path, out: Path) -> tuple[Any, dict[str, Any]]:
    from kubetune.api.manifest import load_job
    from kubetune.trainer.run import Options, run

    job = load_job(str(path))
    return job, run(job, Options(output=out.as_uri(), scratch=out.parent / "scratch"))


@pytest.mark.parametrize("adaptation, engine", [("dora", "vllm"), ("ia3", "kserve")])
def test_adapter_engines_cannot_load_gets_a_verified_merged_model(
    tmp_path: Path, builtin_cache: Path, adaptation: str, engine: str
) -> None:
    import torch
    from click.testing import CliRunner
    from kubetune.cli import main as cli
    from kubetune.trainer import sources, storage
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    job, summary = _run(_job(tmp_path, adaptation, serving={"engine": engine}), out)

    assert summary["adapter"]["mergedUri"] == storage.safe_join(out.as_uri(), "merged")
    store = storage.Store(out.as_uri())
    assert storage.verify(store, "")[0] and storage.verify(store, "merged")[0]
    result = storage.read_manifest(store, "")
    assert "adapter/adapter_config.json" in result["files"]  # the adapter itself is unchanged
    assert not any(k.startswith("merged/") for k in result["files"])
    merged_manifest = storage.read_manifest(store, "merged")
    assert {"model.safetensors", "config.json", "tokenizer_config.json"} <= set(merged_manifest["files"])
    assert "adapter_config.json" not in merged_manifest["files"]
    assert merged_manifest["baseModel"] == "builtin://tiny-llama" and merged_manifest["mergedFrom"] == "adapter"
    assert result["merged"]["sha256"] == hashlib.sha256(store.read_bytes("merged/manifest.json")).hexdigest()
    verified = CliRunner().invoke(cli, ["verify", storage.safe_join(out.as_uri(), "merged")])
    assert verified.exit_code == 0, verified.output
    whole = CliRunner().invoke(cli, ["verify", str(out)])  # the result's verify follows manifest.merged
    assert whole.exit_code == 0 and "of the merged model" in whole.output, whole.output

    # The merged weights, loaded with plain transformers, compute what base + adapter do in plain peft.
    base = AutoModelForCausalLM.from_pretrained(sources.resolve_model(job.spec.model), use_safetensors=True)
    reference = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", use_safetensors=True).eval()
    tok = AutoTokenizer.from_pretrained(out / "merged")
    ids = tok("How do I reset my password?", return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = reference(input_ids=ids).logits, merged(input_ids=ids).logits
    base_logits = AutoModelForCausalLM.from_pretrained(sources.resolve_model(job.spec.model), use_safetensors=True)(
        input_ids=ids
    ).logits
    assert not torch.allclose(want, base_logits, atol=1e-4)  # the adapter did change the model
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

    # A corrupted merged copy fails `kubetune verify <output>`, naming merged/.
    weights = out / "merged" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    broken = CliRunner().invoke(cli, ["verify", str(out)])
    assert broken.exit_code == 1 and "/merged: NOT verified" in broken.output, broken.output


@pytest.mark.parametrize("adaptation", ["lora", "full"])
def test_no_second_copy_for_lora_or_full_weights(tmp_path: Path, builtin_cache: Path, adaptation: str) -> None:
    from kubetune.trainer import storage

    out = tmp_path / "out"
    _, summary = _run(_job(tmp_path, adaptation, serving={"engine": "vllm"}), out)
    store = storage.Store(out.as_uri())
    assert storage.verify(store, "")[0]
    assert not (out / "merged").exists() and "merged" not in storage.read_manifest(store, "")
    if adaptation == "lora":  # served as a LoRA adapter on the base
        assert "mergedUri" not in summary["adapter"]
    else:  # the result is the full model already
        assert summary["adapter"]["mergedUri"] == summary["adapter"]["uri"]


def test_no_merged_copy_is_uploaded_into_an_output_another_job_committed(tmp_path: Path) -> None:
    """The result's manifest is checked before the (large) merged upload, as commit_result checks
    before its own: a second job never writes merged/ into someone else's output."""
    from kubetune.api.manifest import load_job
    from kubetune.trainer import run as run_mod
    from kubetune.trainer import storage

    job = load_job(str(_job(tmp_path, "dora", serving={"engine": "vllm"})))
    store = storage.Store((tmp_path / "out").as_uri())
    store.put_bytes("manifest.json", b'{"files": {}}')
    result = tmp_path / "scratch" / "result"
    result.mkdir(parents=True)
    (result / "adapter_config.json").write_text("{}")

    class Untouchable:
        def save(self, *args: Any) -> None:
            raise AssertionError("merged before the conflict was noticed")

    with pytest.raises(storage.CommitConflict, match="another job committed to this output"):
        run_mod._merged_for_serving(job.spec, Untouchable(), None, None, tmp_path, result, store, {}, run_mod.Options())
    assert not (tmp_path / "out" / "merged").exists()
