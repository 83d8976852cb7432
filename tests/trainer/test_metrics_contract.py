"""The series the operator scrapes are the ones the trainer exports: both name them through
`kubetune.api.contract.TrainerMetric`, and this checks the trainer's registry against the enum."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from kubetune.api.contract import OPERATOR_READS, TrainerMetric
from kubetune.operator.reconcile import observe, parse_metrics
from kubetune.trainer.metrics import TrainerMetrics
from prometheus_client import generate_latest

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "info": ("_info",)}


def exported() -> set[str]:
    """The sample names the trainer's registry exposes (`_created` aside), labelled or not yet set."""
    registry = TrainerMetrics().registry
    return {family.name + suffix for family in registry.collect() for suffix in SUFFIXES[family.type]}


def test_every_trainer_series_is_in_the_contract_and_back() -> None:
    assert exported() == {m.value for m in TrainerMetric}
    assert exported() >= OPERATOR_READS


def test_the_metrics_module_imports_without_torch(tmp_path: Path) -> None:
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('kubetune.trainer.metrics must not import torch')\n")
    env = {"PYTHONPATH": f"{fake}:{ROOT / 'api'}:{ROOT / 'trainer'}", "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, "-c", "import kubetune.trainer.metrics as m; m.TrainerMetrics()"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr


def test_what_the_trainer_exports_is_what_the_operator_reads() -> None:
    m = TrainerMetrics()
    m.step.set(40)
    m.total_steps.set(100)
    m.train_loss.set(1.5)
    m.objective.labels(name="kdLoss").set(0.25)
    m.last_checkpoint_step.set(40)
    m.gpu_energy.inc(3.6e6)
    m.set_effective(
        {
            "epochs": 3,
            "learningRate": 2e-4,
            "batchSize": 8,
            "gradientAccumulation": 2,
            "precision": "bf16",
            "maxSeqLength": 1024,
            "validationSplit": 0.1,
            "parameters": 494_000_000,
            "checkpointEverySteps": 20,
        }
    )
    scraped = parse_metrics(generate_latest(m.registry).decode())
    assert scraped[TrainerMetric.STEP.key] == 40 and scraped[TrainerMetric.GPU_ENERGY.key] == 3.6e6
    assert scraped["objective:kdLoss"] == 0.25 and scraped["effective:precision"] == "bf16"

    ftj = {
        "metadata": {"name": "demo", "generation": 1},
        "spec": {"output": {"uri": "s3://b/out"}, "checkpointing": {"keep": 2}},
        "status": {"phase": "Pending", "effective": {"image": "trainer:1", "gpus": 1, "batchSize": 1}},
    }
    job = {"metadata": {"name": "demo-train"}, "status": {"active": 1, "startTime": "2025-03-01T10:00:00Z"}}
    status = observe(ftj, job, [], scraped, (2.0, 0.4), datetime(2025, 3, 1, 11, tzinfo=UTC))
    assert status["progress"]["step"] == 40 and status["metrics"]["objectives"] == {"kdLoss": 0.25}
    assert status["checkpoints"] == [{"step": 40, "uri": "s3://b/out/checkpoints/step-40"}]
    assert status["effective"] == {
        "image": "trainer:1",
        "gpus": 1,
        "epochs": 3,
        "learningRate": 2e-4,
        "batchSize": 8,
        "gradientAccumulation": 2,
        "precision": "bf16",
        "maxSeqLength": 1024,
        "validationSplit": 0.1,
        "parameters": 494_000_000,
        "checkpointEverySteps": 20,
    }
    assert status["cost"]["energyKWh"] == 1.0
