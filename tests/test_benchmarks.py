"""Benchmark scripts cannot rot: each runs in its tiny --smoke mode and prints its RESULT line,
whose values are checked (correctness flags, counts, positive rates), and none of them may touch
the committed benchmarks/RESULTS.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def smoke_results(script: str, *names: str, timeout: float = 600) -> dict[str, dict[str, str]]:
    """Run `benchmarks/<script> --smoke`; name → the fields of its one `RESULT <name>` line."""
    before = RESULTS.read_bytes()
    run = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert RESULTS.read_bytes() == before, f"{script} --smoke changed benchmarks/RESULTS.md"
    fields = {}
    for name in names:
        result = [line for line in run.stdout.splitlines() if line.startswith(f"RESULT {name} ")]
        assert len(result) == 1, run.stdout[-3000:]
        fields[name] = dict(kv.split("=", 1) for kv in result[0].split()[2:])
    return fields


def smoke(script: str, name: str, timeout: float = 600) -> dict[str, str]:
    """Run `benchmarks/<script> --smoke`; the fields of its one `RESULT <name>` line."""
    return smoke_results(script, name, timeout=timeout)[name]


@pytest.mark.slow
def test_objectives_cost_smoke() -> None:
    fields = smoke("objectives_cost.py", "objectives_cost")
    assert float(fields["lora"]) == 1.0 and float(fields["adversarial"]) > 0


@pytest.mark.slow
def test_trainer_vs_hf_smoke() -> None:
    fields = smoke("trainer_vs_hf.py", "trainer_vs_hf")
    # Identical tokens, identical unpacked losses, packed logits equal to unpacked ones.
    assert fields["tokenization_match"] == "true"
    assert fields["loss_match"] == "true" and float(fields["loss_delta"]) <= 1e-4
    assert fields["logits_match"] == "true" and float(fields["logits_delta"]) <= 1e-5
    assert float(fields["useful_tokens_ratio"]) > 0 and float(fields["steps_ratio"]) > 0
    assert float(fields["rss_mb_ours"]) > 0 and float(fields["rss_mb_hf"]) > 0
    assert fields["overhead_ms"] not in ("nan", "inf")


@pytest.mark.slow
def test_trainer_memory_smoke() -> None:
    fields = smoke("trainer_memory.py", "trainer_memory")
    # Identical batches on both sides: the chunked loss equals the model's own.
    assert float(fields["loss_delta"]) <= 1e-4
    assert float(fields["peak_ratio"]) > 0 and float(fields["tokens_ratio"]) > 0
    assert float(fields["peak_hf"]) > 0 and float(fields["peak_ours"]) > 0
    assert fields["vocab"] == "8192" and fields["seq"] == "256"


@pytest.mark.slow
def test_preference_memory_smoke() -> None:
    fields = smoke("preference_memory.py", "preference_memory")
    # The same ORPO batch on both sides: the chunked forward's loss equals TRL's full-logits one.
    assert float(fields["loss_delta"]) <= 1e-4
    assert float(fields["added_ratio"]) > 0 and float(fields["peak_trl"]) > 0 and float(fields["peak_ours"]) > 0
    assert fields["vocab"] == "4096"


@pytest.mark.slow
def test_memory_grid_smoke() -> None:
    fields = smoke("memory_grid.py", "memory_grid")
    # Two measured points, each compared with the memory model (tiny points sit far from it:
    # fixed costs dominate; the recorded grid is what the ±25 % claim rests on).
    assert fields["points"] == "2" and 0 <= int(fields["within_25pct"]) <= 2
    assert 0 < float(fields["min_ratio"]) <= float(fields["max_ratio"])


@pytest.mark.slow
def test_gpu_smoke_runs_on_cpu_and_claims_no_gpu_result() -> None:
    before = RESULTS.read_bytes()
    run = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert RESULTS.read_bytes() == before
    assert "RESULT gpu_lora_8b" not in run.stdout  # only a real GPU run may print it
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT gpu_smoke ")]
    assert len(lines) == 1
    fields = dict(kv.split("=", 1) for kv in lines[0].split()[2:])
    assert fields["shape"] == "smoke" and int(fields["runs"]) == 2
    assert float(fields["tokens_per_s"]) > 0 and float(fields["baseline_ratio"]) > 0 and float(fields["mfu"]) > 0
    assert "| smoke | kubetune lora |" in run.stdout and "| smoke | hf+peft lora |" in run.stdout
    assert "Memory, smoke LoRA, packing off" in run.stdout and "RESULT gpu_memory_8b" not in run.stdout


@pytest.mark.slow
def test_operator_scale_smoke() -> None:
    results = smoke_results("operator_scale.py", "operator_scale", "operator_idle")
    fields = results["operator_scale"]
    assert fields["tier"] == "kmock" and int(fields["n"]) == 5 and int(fields["jobs"]) == 5
    assert 0 < float(fields["p50_ms"]) <= float(fields["p99_ms"])
    assert float(fields["crs_per_s"]) > 0 and float(fields["rss_mb"]) > 0
    # create Job, patch the FineTuneJob (kopf's annotations), patch its status, post an event
    assert float(fields["requests_per_cr"]) >= 3
    # --idle in smoke: 5 running jobs whose pods the operator found and scraped
    idle = results["operator_idle"]
    assert idle["tier"] == "kmock" and int(idle["n"]) == 5 and int(idle["running"]) == 5
    assert float(idle["requests_per_s"]) >= 0 and float(idle["scrapes_per_s"]) > 0
    assert float(idle["rss_rest_mb"]) > 0 and float(idle["rss_peak_mb"]) > 0
    assert float(idle["peak_ratio"]) > 0 and int(idle["page_mib"]) == 200


@pytest.mark.slow
def test_validate_data_smoke() -> None:
    fields = smoke("validate_data.py", "validate_data")
    assert int(fields["lines"]) == 2000
    for key in ("read_s", "cli_s", "validate_only_s", "cli_rss_mib"):
        assert float(fields[key]) > 0, (key, fields)
