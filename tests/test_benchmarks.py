"""Benchmark scripts cannot rot: each runs in its tiny --smoke mode and prints its RESULT line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_objectives_cost_smoke() -> None:
    run = subprocess.run(
        [sys.executable, "benchmarks/objectives_cost.py", "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = [line for line in run.stdout.splitlines() if line.startswith("RESULT objectives_cost ")]
    assert len(result) == 1
    fields = dict(kv.split("=", 1) for kv in result[0].split()[2:])
    assert float(fields["lora"]) == 1.0 and float(fields["adversarial"]) > 0
