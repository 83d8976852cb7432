"""Helpers for the tests of issue 15b (precision, no silent no-op, a self-contained output): a
FineTuneJob on a local tiny model run in-process, and tiny model directories built from config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data" / "support-chat.jsonl"


def job(tmp: Path, source: str, name: str = "t", **spec: Any) -> Any:
    """A small FineTuneJob (full fine-tune, 10 steps, no generation samples) on `source`."""
    from kubetune.api.manifest import load_job

    train = tmp / "train.jsonl"
    if not train.exists():  # 48 examples: enough for 10 steps of 4, quick to check and report
        train.write_text("".join(DATA.read_text().splitlines(keepends=True)[:48]))
    body: dict[str, Any] = {
        "model": {"source": source},
        "dataset": {
            "train": str(train),
            "validationSplit": 0.1,
            "maxSeqLength": 256,
            "overlength": "truncate",
            "minExamples": 8,
        },
        "method": {"adaptation": "full"},
        "hyperparameters": {"epochs": 1, "batchSize": 4, "maxSteps": 10, "seed": 7},
        "evaluation": {"samples": 0, "compareBase": False},
        "output": {"uri": (tmp / f"out-{name}").as_uri()},
        "checkpointing": {"everySteps": 1000, "keep": 1},
    }
    for key, value in spec.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": body}
        )
    )
    return load_job(str(path))


def run_job(tmp: Path, source: str, name: str = "t", **spec: Any) -> tuple[dict[str, Any], Path]:
    """Run the job in-process; (summary, the output directory)."""
    from kubetune.trainer.run import Options, run

    j = job(tmp, source, name, **spec)
    return run(j, Options(output=j.spec.output.uri, scratch=tmp / f"scratch-{name}")), tmp / f"out-{name}"


def resave(src: Path, dest: Path, dtype: Any = None, tokenizer: Any = None, **config: Any) -> Path:
    """`src`'s model (optionally cast to `dtype`, with config overrides) saved to `dest` with
    `tokenizer` (default: src's)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if config:
        cfg = AutoConfig.from_pretrained(src)
        for k, v in config.items():
            setattr(cfg, k, v)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            model = AutoModelForCausalLM.from_config(cfg)
    else:
        model = AutoModelForCausalLM.from_pretrained(src, use_safetensors=True, dtype=torch.float32)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(dest, safe_serialization=True)
    (tokenizer or AutoTokenizer.from_pretrained(src)).save_pretrained(dest)
    return dest
