"""Pod requests and status.effective come from kubetune.api.estimate (issue 14, "honest sizing"):
the tiny quickstart fits a small node, a teacher's weights are counted, explicit resources win."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from kubetune.api import FineTuneJob, parse_manifest
from kubetune.api.estimate import GIB, estimate_job
from kubetune.api.manifest import load_documents
from kubetune.operator.actions import effective
from kubetune.operator.builders import pod_resources, trainer_job
from kubetune.operator.settings import OperatorSettings

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SETTINGS = OperatorSettings(trainer_image="ghcr.io/kubetune/trainer:0.1.0")


def job(example: str, **changes: Any) -> FineTuneJob:
    (doc,) = load_documents(EXAMPLES / example)
    data = copy.deepcopy(doc.data)
    data["metadata"].setdefault("namespace", "default")
    for key, value in changes.items():
        if key != "method" and isinstance(value, dict) and isinstance(data["spec"].get(key), dict):
            data["spec"][key] = {**data["spec"][key], **value}
        else:
            data["spec"][key] = value
    ftj, problems = parse_manifest(data)
    assert ftj is not None, problems
    return ftj


def gib(quantity: str) -> int:
    assert quantity.endswith("Gi"), quantity
    return int(quantity[:-2])


def test_quickstart_asks_for_one_cpu_and_at_most_two_gib() -> None:
    resources = pod_resources(job("quickstart.yaml"))
    assert resources["requests"]["cpu"] == "1"
    assert (
        gib(resources["requests"]["memory"]) <= 2 and resources["limits"]["memory"] == resources["requests"]["memory"]
    )
    assert "nvidia.com/gpu" not in resources["requests"]


def test_gpu_pods_ask_for_four_cpus_per_gpu_and_memory_to_load_the_weights() -> None:
    small = pod_resources(job("lora.yaml", model={"source": "hf://Qwen/Qwen2.5-0.5B"}))
    assert small["requests"]["cpu"] == "4" and small["requests"]["nvidia.com/gpu"] == "1"
    assert 8 < gib(small["requests"]["memory"]) <= 12
    two = pod_resources(job("multi-gpu.yaml"))  # 7B LoRA, 2 GPUs: one loading process each
    assert two["requests"]["cpu"] == "8" and gib(two["requests"]["memory"]) >= 2 * 7e9 * 2 / GIB


def test_a_teacher_raises_the_request_by_its_weights() -> None:
    alone = job("distillation.yaml", method={"adaptation": "full"})
    taught = job(
        "distillation.yaml",
        method={
            "adaptation": "full",
            "objectives": [
                {
                    "type": "distillation",
                    "distillation": {"teacher": {"source": "hf://meta-llama/Llama-3.1-70B-Instruct"}},
                }
            ],
        },
    )
    extra = gib(pod_resources(taught)["requests"]["memory"]) - gib(pod_resources(alone)["requests"]["memory"])
    assert extra >= 2 * 70e9 * 2 / GIB  # a bf16 copy per process, 2 GPUs


def test_explicit_cpu_and_memory_win() -> None:
    ftj = job("quickstart.yaml", resources={"gpus": 0, "cpu": "3", "memory": "7Gi"})
    assert pod_resources(ftj)["requests"] == {"cpu": "3", "memory": "7Gi"}
    container = trainer_job(ftj, "uid", SETTINGS)["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"memory": "7Gi"}
    big = job(
        "full.yaml", model={"source": "hf://meta-llama/Llama-3.1-70B"}, resources={"memory": "900Gi", "cpu": "32"}
    )
    assert pod_resources(big)["requests"]["memory"] == "900Gi" and pod_resources(big)["requests"]["cpu"] == "32"


def test_effective_reports_the_same_estimate() -> None:
    ftj = job("distillation.yaml")
    out = effective(ftj, SETTINGS)
    sizing = estimate_job(ftj.spec)
    assert out["parameters"] == 1_000_000_000
    assert out["estimatedGPUMemoryGiB"] == sizing.gpu_memory_gib
    assert sizing.gpu_memory_gib is not None and sizing.gpu_memory_gib > 8e9 * 2 / GIB  # the 8B teacher counts
    unknown = effective(job("lora.yaml", model={"source": "s3://models/custom"}), SETTINGS)
    assert "parameters" not in unknown and "estimatedGPUMemoryGiB" not in unknown
