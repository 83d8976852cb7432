"""`kubetune chat` and the loader behind it (kubetune.trainer.inference) on tiny trained outputs.

Outputs are trained in seconds on the tiny demo model with a one-answer dataset, so that a tuned
model visibly says what it was taught and the base (random weights) does not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

pytestmark = pytest.mark.slow
QUESTION = "Can you help me?"


def train_output(
    tmp: Path,
    name: str,
    answer: str,
    *,
    adaptation: str = "lora",
    fmt: str = "adapter",
    steps: int = 12,
    seed: int = 7,
    **extra: Any,
) -> Path:
    """Train `builtin://tiny-llama` to answer `answer` to anything; returns the output directory."""
    from kubetune.api.manifest import load_job
    from kubetune.trainer.run import Options, run

    data = tmp / f"{name}.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"{QUESTION} #{i}"}, {"role": "assistant", "content": answer}]}
        for i in range(24)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    block = {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["all-linear"]}
    spec = {
        "model": {"source": "builtin://tiny-llama"},
        "dataset": {"train": str(data), "validationSplit": 0.1, "maxSeqLength": 64, "minExamples": 10},
        "method": {"adaptation": adaptation, adaptation: block},
        "hyperparameters": {"epochs": 10, "learningRate": 2e-2, "batchSize": 8, "maxSteps": steps, "seed": seed},
        "output": {"uri": (tmp / name).as_uri(), "format": fmt},
        "checkpointing": {"everySteps": 1000, "keep": 1},
        **extra,
    }
    manifest = tmp / f"{name}.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}
        )
    )
    run(load_job(str(manifest)), Options(output=(tmp / name).as_uri(), scratch=tmp / f"{name}-scratch"))
    return tmp / name


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory, builtin_cache: Path) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("chat")
    return {
        "lora": train_output(tmp, "yes", "yes yes yes"),
        # spec.serving makes the trainer also commit <output>/merged/ (engines refuse DoRA adapters).
        "dora": train_output(
            tmp, "dora", "yes yes yes", adaptation="dora", serving={"engine": "vllm", "vllm": {"gpus": 1}}
        ),
        "dora-export": train_output(tmp, "dora-export", "yes yes yes", adaptation="dora", fmt="merged"),
    }


def _cli(*args: str) -> Any:
    from kubetune.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_one_shot_chat_answers_with_what_the_job_taught(outputs: dict[str, Path]) -> None:
    result = _cli("chat", str(outputs["lora"]), "--prompt", QUESTION, "--temperature", "0", "--max-tokens", "12")
    assert result.exit_code == 0, result.output
    assert "yes yes yes" in result.stdout
    assert "[tuned" not in result.stdout  # labels only with --compare


def test_compare_prints_tuned_and_base_answers_labelled(outputs: dict[str, Path]) -> None:
    result = _cli(
        "chat",
        str(outputs["lora"]),
        "--prompt",
        QUESTION,
        "--compare",
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--system",
        "Be brief.",
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "[tuned: ft:tiny-llama:yes]" in out and "[base: tiny-llama]" in out
    tuned, base = out.split("[base: tiny-llama]")
    assert "yes yes yes" in tuned
    assert "yes yes yes" not in base  # the random-weight base was never taught the answer


def test_compare_on_a_merged_output_loads_the_base_from_the_manifest(outputs: dict[str, Path]) -> None:
    result = _cli(
        "chat", str(outputs["dora-export"]), "-p", QUESTION, "--compare", "--temperature", "0", "--max-tokens", "12"
    )
    assert result.exit_code == 0, result.output
    assert "[tuned: ft:tiny-llama:dora-export]" in result.stdout and "[base: tiny-llama]" in result.stdout
    assert "yes yes yes" in result.stdout.split("[base:")[0]


def test_interactive_chat_streams_resets_and_exits(outputs: dict[str, Path]) -> None:
    from kubetune.cli import main

    result = CliRunner().invoke(
        main,
        ["chat", str(outputs["lora"]), "--temperature", "0", "--max-tokens", "12"],
        input=f"{QUESTION}\n/reset\n{QUESTION}\n/exit\nnever read\n",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.count("yes yes yes") == 2
    assert "conversation forgotten" in result.stderr


def test_sampling_is_repeatable_with_a_seed(outputs: dict[str, Path]) -> None:
    args = ["chat", str(outputs["lora"]), "-p", "Hi", "--temperature", "1.5", "--seed", "3", "--max-tokens", "16"]
    first, second = _cli(*args), _cli(*args)
    assert first.exit_code == 0 and first.stdout == second.stdout


@pytest.mark.parametrize(
    "make, expected",
    [
        ("missing", "no such directory"),
        ("empty", "has no manifest.json"),
        ("corrupt", "does not verify against its manifest.json"),
    ],
)
def test_a_missing_or_corrupt_output_is_a_clear_error(
    outputs: dict[str, Path], tmp_path: Path, make: str, expected: str
) -> None:
    import shutil

    target = tmp_path / "out"
    if make == "empty":
        target.mkdir()
    elif make == "corrupt":
        shutil.copytree(outputs["lora"], target)
        weights = target / "adapter" / "adapter_model.safetensors"
        raw = bytearray(weights.read_bytes())
        raw[-1] ^= 0xFF  # one flipped bit: same size, different sha256
        weights.write_bytes(bytes(raw))
    from kubetune.cli import main

    result = CliRunner().invoke(main, ["chat", str(target), "-p", "hi"])
    assert result.exit_code == 1
    assert expected in result.stderr and str(target) in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output


def test_the_adapter_directory_itself_is_accepted(outputs: dict[str, Path]) -> None:
    from kubetune.trainer.inference import open_output

    out = open_output(str(outputs["lora"] / "adapter"))
    assert out.name == "yes" and out.kind == "adapter" and out.base == "builtin://tiny-llama"


def test_dora_merged_export_gives_the_same_logits_as_the_adapter(outputs: dict[str, Path]) -> None:
    """Acceptance: the merged export of a DoRA job serves the logits of the adapter applied."""
    import torch
    from kubetune.trainer.inference import ModelPool, open_output

    adapter = open_output(str(outputs["dora"]))
    served_copy = open_output(str(outputs["dora"] / "merged"))  # spec.serving's merged copy, same job
    exported = open_output(str(outputs["dora-export"]))  # output.format: merged, same seed and data
    assert adapter.kind == "adapter" and adapter.peft_type == "LORA"
    assert json.loads((outputs["dora"] / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    assert served_copy.kind == exported.kind == "model" and served_copy.name == "dora-merged"
    pool = ModelPool([adapter, served_copy, exported], device="cpu")
    tuned = pool.get("ft:tiny-llama:dora")
    ids = pool.chat_ids(tuned, [{"role": "user", "content": QUESTION}])
    a = pool.logits(tuned, ids)
    base = pool.logits(pool.get("tiny-llama"), ids)
    assert not torch.allclose(a, base, atol=1e-2)  # the adapter changed something
    torch.testing.assert_close(pool.logits(pool.get("ft:tiny-llama:dora-merged"), ids), a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pool.logits(pool.get("ft:tiny-llama:dora-export"), ids), a, atol=1e-4, rtol=1e-4)


def test_remote_outputs_are_downloaded_verified(
    outputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any fsspec URL: memory:// stands in for object storage."""
    import fsspec
    from kubetune.trainer.inference import open_output

    fs = fsspec.filesystem("memory")
    for path in outputs["lora"].rglob("*"):
        if path.is_file() and "checkpoints" not in path.parts:
            fs.pipe(f"/kt/yes/{path.relative_to(outputs['lora']).as_posix()}", path.read_bytes())
    out = open_output("memory://kt/yes", cache_dir=tmp_path / "cache")
    assert out.path.is_relative_to(tmp_path / "cache") and (out.path / "adapter_model.safetensors").exists()
    assert out.uri == "memory://kt/yes" and os.path.exists(out.path / "chat_template.jinja")


def test_two_outputs_with_one_id_are_refused(outputs: dict[str, Path]) -> None:
    from kubetune.trainer.inference import ModelPool, OutputError, open_output

    with pytest.raises(OutputError, match="are both 'ft:tiny-llama:yes'.*different names or spec.suffix"):
        ModelPool([open_output(str(outputs["lora"])), open_output(str(outputs["lora"] / "adapter"))], device="cpu")
