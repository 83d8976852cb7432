"""Never a silent no-op (issue 15, Why: zero trained tokens reported success; maxSeqLength not
checked against the model's context): examples that truncation leaves without a trained token are
dropped and listed FILE:LINE, none left is a permanent error, and a maxSeqLength longer than the
model's context is refused at validation, before any weight is read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from kubetune.api.spec import Dataset
from kubetune.trainer import data, sources

from tests.fixtures.models import tiny_model_dir  # noqa: F401
from tests.trainer.issue15b import job

pytestmark = pytest.mark.slow


def chat(user: str, answer: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})


def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)


def test_examples_truncated_to_no_trained_token_are_dropped_and_none_left_is_an_error(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune.trainer.run import Options, UserError, run
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    long_prompt = "Tell me about the gloves. " * 4  # ≈ 100 byte tokens: fills maxSeqLength 64
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        "\n".join([chat("Hi", "Hello there")] * 6 + [chat(long_prompt, "Yes.")] * 2 + [chat("Hey", "Hi!")] * 2) + "\n"
    )
    held_out = tmp_path / "held-out.jsonl"
    held_out.write_text(chat("Hi", "Hello there") + "\n")
    ds = Dataset(train=str(mixed), validation=str(held_out), min_examples=1, max_seq_length=64, overlength="truncate")
    report = data.validate(ds, tokenizer=tok, seed=0)
    kept = report.encoded_train + report.encoded_validation
    assert (len(report.encoded_train), len(report.encoded_validation), report.unsupervised) == (8, 1, 2)
    assert all(data.supervised_tokens(e) > 0 for e in kept)
    [warning] = [w for w in report.warnings if "no trained token" in w]
    assert warning.startswith("2 examples have no trained token left after truncation to maxSeqLength 64")
    assert f"{mixed}:7, {mixed}:8" in warning
    assert any("dropped with no trained token left: 2" in line for line in report.summary_lines())

    # every example loses its answer: validation refuses the set, and so does the trainer, before the model loads
    none = tmp_path / "none.jsonl"
    none.write_text("\n".join([chat(long_prompt, "Yes.")] * 10) + "\n")
    ds = Dataset(train=str(none), min_examples=1, max_seq_length=64, overlength="truncate")
    with pytest.raises(data.DataError) as err:
        data.validate(ds, tokenizer=tok)
    assert (
        f"{none}:0: spec.dataset.maxSeqLength: no training example has a trained token left after truncation to 64"
        in str(err.value)
    )
    no_model_load(monkeypatch)
    with pytest.raises(UserError) as refused:
        run(
            job(tmp_path, str(tiny_model_dir), dataset={"train": str(none), "maxSeqLength": 64, "minExamples": 1}),
            Options(),
        )
    assert (refused.value.reason, refused.value.param) == ("InvalidData", "spec.dataset.maxSeqLength")
    assert "no training example has a trained token left" in str(refused.value) and f"{none}:1" in str(refused.value)
    assert not (tmp_path / "out-t").exists()


def test_max_seq_length_longer_than_the_context_is_refused_at_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from kubetune.cli import main
    from kubetune.trainer.__main__ import SpecError, validate_only
    from kubetune.trainer.run import Options, UserError, run
    from safetensors.torch import save_file
    from transformers import GPT2Config

    gpt2 = tmp_path / "gpt2"
    cfg = GPT2Config(vocab_size=300, n_positions=128, n_embd=32, n_layer=1, n_head=2)
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(cfg.to_json_string())
    j = job(tmp_path, str(gpt2), dataset={"maxSeqLength": 256})
    manifest = tmp_path / "t.yaml"
    expected = (
        "spec.dataset.maxSeqLength 256 is longer than the model's context of 128 tokens (config.json "
        "n_positions); set spec.dataset.maxSeqLength to 128 or less"
    )
    # kubetune validate --data: only config.json is read (this directory has no weights at all)
    result = CliRunner().invoke(main, ["validate", "--data", str(manifest)])
    assert result.exit_code == 1 and expected in result.output, result.output
    # the cluster's validation Job
    with pytest.raises(SpecError) as err:
        validate_only(j)
    assert str(err.value) == expected and err.value.param == "spec.dataset.maxSeqLength"
    # the trainer, before the tokenizer or the model loads (a weights file so the source is accepted)
    save_file({"wte.weight": torch.zeros(300, 32)}, str(gpt2 / "model.safetensors"))
    no_model_load(monkeypatch)
    with pytest.raises(UserError) as refused:
        run(j, Options())
    assert (str(refused.value), refused.value.param, refused.value.reason) == (
        expected,
        "spec.dataset.maxSeqLength",
        "InvalidSpec",
    )
    # at the limit it validates
    manifest.write_text(manifest.read_text().replace("maxSeqLength: 256", "maxSeqLength: 128"))
    result = CliRunner().invoke(main, ["validate", "--data", str(manifest)])
    assert result.exit_code == 0, result.output
    # RoPE scaling: Qwen's yarn extends the original context; Llama 3.1's config already gives the extended one
    yarn = {
        "max_position_embeddings": 32768,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    }
    llama31 = {
        "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
    }
    assert sources.context_length(yarn) == (131072, "max_position_embeddings × rope_scaling.factor")
    assert sources.context_length(llama31) == (131072, "max_position_embeddings")
    assert sources.context_problem({"text_config": {"max_position_embeddings": 8192}}, 8193) is not None
