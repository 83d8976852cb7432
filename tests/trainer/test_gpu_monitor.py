"""GPU power and energy sampling through NVML, with a fake NVML (no GPU on CI)."""

from __future__ import annotations

import sys
import types

import pytest
from kubetune.trainer import callbacks
from kubetune.trainer.metrics import TrainerMetrics
from prometheus_client import generate_latest


def fake_nvml(total_energy: bool) -> types.ModuleType:
    state = {"mj": 1_000_000.0}
    nvml = types.ModuleType("pynvml")
    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetPowerUsage = lambda h: 250_000  # mW
    if total_energy:

        def energy(h: int) -> float:
            state["mj"] += 500_000.0  # 500 J per call and device
            return state["mj"]

        nvml.nvmlDeviceGetTotalEnergyConsumption = energy
    else:

        def missing(h: int) -> float:
            raise RuntimeError("not supported on this GPU")

        nvml.nvmlDeviceGetTotalEnergyConsumption = missing
    return nvml


@pytest.mark.parametrize("total_energy", [True, False])
def test_power_and_energy(monkeypatch: pytest.MonkeyPatch, total_energy: bool) -> None:
    import torch

    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(total_energy))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 123)
    clock = iter([100.0, 110.0, 120.0])
    monkeypatch.setattr(callbacks, "time", types.SimpleNamespace(time=lambda: next(clock)))
    metrics = TrainerMetrics()
    monitor = callbacks.GpuMonitor(metrics)
    for _ in range(3):
        monitor.sample()
    text = generate_latest(metrics.registry).decode()
    assert "kubetune_trainer_gpu_power_watts 500.0" in text  # 2 × 250 W
    assert "kubetune_trainer_gpu_memory_bytes 123.0" in text
    # two intervals: the fake counter (shared by both devices) grows 1000 J per read, so the
    # summed reading grows 2 × 1000 J per sample; without the counter, 500 W × 10 s per interval
    assert monitor.joules == pytest.approx(4000.0 if total_energy else 10_000.0)
    assert f"kubetune_trainer_gpu_energy_joules_total {monitor.joules}" in text


def test_no_gpu_reports_nothing() -> None:
    metrics = TrainerMetrics()
    monitor = callbacks.GpuMonitor(metrics)
    monitor.sample()
    assert monitor.nvml is None and monitor.joules == 0.0
