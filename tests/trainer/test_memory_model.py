"""The memory model (kubetune.api.memory) against measured peaks on CPU, and the `auto` batch size that uses it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kubetune.api.memory import GIB, Workload, breakdown, largest_batch

PROBE = Path(__file__).resolve().parents[2] / "benchmarks" / "memory_probe.py"
_spec = importlib.util.spec_from_file_location("memory_probe", PROBE)
assert _spec is not None and _spec.loader is not None
memory_probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memory_probe)
workload = memory_probe.workload  # the probe's configs as the memory model sees them (shared with the benchmark)
TOLERANCE = 0.25

# A subset of the grid (vocab 32k/128k × seq 512/2048 × batch 1/4 × LoRA/full, measured
# whole by benchmarks/memory_grid.py into RESULTS.md) that two CPU cores measure in about a minute: both
# vocabularies, both batch sizes, LoRA and full fine-tuning (the head trains), chunked and
# unchunked logits, gradient checkpointing on and off on a model whose activations matter.
SMALL = {"hidden": 64, "intermediate": 172, "layers": 2, "heads": 4}
WIDER = {"hidden": 256, "intermediate": 688, "layers": 4, "heads": 4}
GRID = [
    {**SMALL, "vocab": 32000, "seq": 512, "batch": 4, "adaptation": "lora", "chunked": True},
    {**SMALL, "vocab": 128000, "seq": 512, "batch": 1, "adaptation": "full", "chunked": True},
    {**SMALL, "vocab": 128000, "seq": 512, "batch": 4, "adaptation": "lora", "chunked": True},
    {**SMALL, "vocab": 128000, "seq": 256, "batch": 1, "adaptation": "lora", "chunked": False},
    {**WIDER, "vocab": 32000, "seq": 512, "batch": 4, "adaptation": "lora", "chunked": True, "checkpointing": True},
    {**WIDER, "vocab": 32000, "seq": 512, "batch": 4, "adaptation": "lora", "chunked": True},
    {**WIDER, "vocab": 32000, "seq": 1024, "batch": 1, "adaptation": "full", "chunked": True},
]


def probe(configs: list[dict]) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(PROBE), json.dumps(configs)], capture_output=True, text=True, timeout=900, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line[len("PROBE ") :]) for line in proc.stdout.splitlines() if line.startswith("PROBE ")]


def test_predicted_peak_within_25_percent_of_the_measured_cpu_peak():
    results = probe(GRID)
    assert len(results) == len(GRID)
    report = []
    for c in results:
        measured = c["peak"] - c["base"]
        predicted = breakdown(workload(c)).total
        report.append(
            (
                c["vocab"],
                c["seq"],
                c["batch"],
                c["adaptation"],
                c["chunked"],
                measured >> 20,
                int(predicted) >> 20,
                round(predicted / measured, 2),
            )
        )
    bad = [r for r in report if not (1 - TOLERANCE <= r[-1] <= 1 + TOLERANCE)]
    assert not bad, f"(vocab, seq, batch, adaptation, chunked, measured MiB, predicted MiB, ratio): {report}"
    # Chunking is what the model says it is: at 128k the unchunked row costs more than the
    # chunked one with twice the tokens.
    by = {(c["vocab"], c["seq"], c["batch"], c["adaptation"], c["chunked"]): c["peak"] - c["base"] for c in results}
    assert by[(128000, 256, 1, "lora", False)] > 0.8 * by[(128000, 512, 4, "lora", True)]


def test_the_logits_term_follows_chunking_vocab_and_batch():
    base = Workload(
        parameters=8_000_000_000,
        trainable=80_000_000,
        hidden=4096,
        layers=32,
        vocab=128_256,
        seq_length=2048,
        intermediate=14336,
    )
    unchunked = breakdown(Workload(**{**base.__dict__, "chunked_logits": False})).logits
    assert unchunked == 2048 * 128_256 * 12  # three fp32 copies: logits, log-softmax, gradient
    chunked_one = breakdown(base).logits
    assert chunked_one < unchunked / 10
    # Chunked logits do not grow with the batch; unchunked ones do, linearly.
    assert breakdown(Workload(**{**base.__dict__, "batch_size": 8})).logits == chunked_one
    full8 = breakdown(Workload(**{**base.__dict__, "batch_size": 8, "chunked_logits": False})).logits
    assert full8 == 8 * unchunked
    # An 8B LoRA at seq 2048 fits more rows on an 80 GiB card with chunked logits.
    chunked_batch = largest_batch(base, 80 * GIB * 0.9)
    unchunked_batch = largest_batch(Workload(**{**base.__dict__, "chunked_logits": False}), 80 * GIB * 0.9)
    assert chunked_batch > unchunked_batch >= 1


def test_optimizer_quantisation_and_reference_change_the_states_and_weights():
    w = Workload(parameters=1_000_000_000, trainable=1_000_000_000, hidden=2048, layers=16, vocab=32000, seq_length=512)
    adam, eight_bit = breakdown(w), breakdown(Workload(**{**w.__dict__, "optimizer": "adamw8bit"}))
    assert adam.states - eight_bit.states == pytest.approx(1e9 * 6)
    lora = Workload(**{**w.__dict__, "trainable": 10_000_000})
    nf4 = Workload(**{**lora.__dict__, "weight_dtype": "nf4"})
    assert breakdown(lora).weights / breakdown(nf4).weights > 3
    assert breakdown(Workload(**{**w.__dict__, "reference_copy": True})).reference == 2e9  # a bf16 copy


def test_auto_batch_size_reads_the_vocabulary(monkeypatch):
    """The trainer's `auto` asks the same model with the loaded model's shapes: a 128k
    vocabulary must not get a larger batch than a 32k one, and the answer fits the card."""
    import torch
    from kubetune.api import parse_manifest
    from kubetune.trainer import hparams

    doc = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "m"},
        "spec": {
            "model": {"source": "hf://meta-llama/Llama-3.1-8B"},
            "dataset": {"train": "s3://b/t.jsonl", "maxSeqLength": 4096},
            "method": {"adaptation": "lora"},
            "hyperparameters": {"batchSize": "auto", "gradientCheckpointing": False},
            "output": {"uri": "s3://b/out"},
            "resources": {"gpus": 1},
        },
    }
    job, problems = parse_manifest(doc)
    assert job is not None, problems

    class Props:
        total_memory = 80 * GIB

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _i: Props())
    small = hparams.batch_size(job.spec, 8_000_000_000, 4096, 32, vocab=32000, intermediate=14336)
    big = hparams.batch_size(job.spec, 8_000_000_000, 4096, 32, vocab=128_256, intermediate=14336)
    assert 1 <= big <= small
    from dataclasses import replace

    from kubetune.api.estimate import gpu_workload

    w = gpu_workload(8_000_000_000, "lora", 4096, 1, False, 4096, 32, 128_256, intermediate_size=14336)
    assert breakdown(replace(w, batch_size=big)).total <= 80 * GIB * 0.9
    assert big == 64 or breakdown(replace(w, batch_size=big * 2)).total > 80 * GIB * 0.9
