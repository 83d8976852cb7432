"""DPO/ORPO/KTO/GRPO on the tiny model: the DPO loss against its closed form, the reference and
the base untouched by training, the effect on held-out preference accuracy and grader reward, and
resume after kill -9 (T1) giving the same adapter."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.api import parse_manifest
from kubetune.trainer import methods, preference, storage
from kubetune.trainer.run import _SCHEDULERS, Options, run

from tests.fixtures.models import load_tiny
from tests.trainer.test_run import _final_adapter, env, trainer_cmd

ROOT = Path(__file__).resolve().parents[2]
DPO_DATA = ROOT / "examples" / "data" / "support-dpo.jsonl"
DPO_EVAL = ROOT / "examples" / "data" / "support-dpo-eval.jsonl"
pytestmark = pytest.mark.slow

PAIRS = [
    {
        "prompt": [{"role": "user", "content": "Return window?"}],
        "chosen": [{"role": "assistant", "content": "30 days, full refund."}],
        "rejected": [{"role": "assistant", "content": "No returns."}],
    },
    {
        "prompt": [{"role": "user", "content": "Free shipping?"}],
        "chosen": [{"role": "assistant", "content": "Over $50."}],
        "rejected": [{"role": "assistant", "content": "Never, pay up."}],
    },
]


def job_body(tmp: Path, method: dict[str, Any], **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": {"source": "builtin://tiny-llama"},
        "dataset": {"train": str(DPO_DATA), "validation": str(DPO_EVAL), "maxSeqLength": 256},
        "method": {
            "adaptation": "lora",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["all-linear"]},
            **method,
        },
        "hyperparameters": {"learningRate": 3e-3, "batchSize": 4, "maxSteps": 6, "seed": 7, "warmupRatio": 0},
        "output": {"uri": (tmp / "out").as_uri()},
        "checkpointing": {"everySteps": 100, "keep": 1},
        "resources": {"gpus": 0},
    }
    for key, value in spec.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "pref"}, "spec": body}


def parse(body: dict[str, Any]) -> Any:
    job, problems = parse_manifest(body)
    assert job is not None, problems
    return job


EFFECTIVE = {"batchSize": 2, "epochs": 1, "learningRate": 1e-2, "gradientAccumulation": 1, "precision": "fp32"}


def dpo_trainer(
    tiny_model_dir: Path, tmp: Path, method: dict[str, Any], adaptation: str = "lora", max_steps: int = 3
) -> tuple[Any, Any]:
    import torch
    from transformers import AutoTokenizer

    body = job_body(tmp, method, hyperparameters={"maxSteps": max_steps})
    if adaptation == "full":
        body["spec"]["method"].pop("lora")
        body["spec"]["method"]["adaptation"] = "full"
    spec = parse(body).spec
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = load_tiny(tiny_model_dir)
    torch.manual_seed(spec.hyperparameters.seed)  # the adapter's random init: not whatever the session's RNG holds
    adapt = methods.build(spec.method.adaptation, spec.method.config())
    model = adapt.apply(model, tok)
    args = preference.training_args(spec, EFFECTIVE, tmp / "run", True, _SCHEDULERS)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=EFFECTIVE["learningRate"])
    trainer = preference.build_trainer(spec, model, tok, PAIRS * 4, args, [], opt, [])
    return trainer, model


def _sum_logps(model: Any, batch: dict[str, Any]) -> Any:
    import torch

    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    logits = model(**inputs).logits[:, :-1].float()
    token = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token * batch["completion_mask"][:, 1:]).sum(1).chunk(2)


def test_dpo_loss_equals_the_closed_form(tiny_model_dir: Path, tmp_path: Path) -> None:
    """L = −log σ(β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))]), by hand;
    log 2 while the adapter is still zero (π = π_ref)."""
    import torch

    beta = 0.3
    trainer, model = dpo_trainer(tiny_model_dir, tmp_path, {"type": "dpo", "dpo": {"beta": beta}})
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    model.eval()
    with torch.no_grad():
        assert float(trainer.compute_loss(model, batch)) == pytest.approx(math.log(2), abs=1e-6)
        gen = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
        loss = trainer.compute_loss(model, batch)
        chosen, rejected = _sum_logps(model, batch)
        with model.disable_adapter():
            ref_chosen, ref_rejected = _sum_logps(model, batch)
    by_hand = -torch.nn.functional.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
    assert abs(float(by_hand) - math.log(2)) > 0.01  # the perturbed adapter moved the policy
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-5, abs=1e-6)


def test_reference_free_dpo_uses_a_uniform_reference(tiny_model_dir: Path, tmp_path: Path) -> None:
    """referenceFree: log π_ref = 0, so L = −log σ(β·(log π(y_w) − log π(y_l)))."""
    import torch

    beta = 0.2
    trainer, model = dpo_trainer(
        tiny_model_dir, tmp_path, {"type": "dpo", "dpo": {"beta": beta, "referenceFree": True}}
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        chosen, rejected = _sum_logps(model, batch)
    by_hand = -torch.nn.functional.logsigmoid(beta * (chosen - rejected)).mean()
    assert abs(float(by_hand) - math.log(2)) > 0.01
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-5, abs=1e-6)


def test_training_leaves_base_and_reference_untouched(tiny_model_dir: Path, tmp_path: Path) -> None:
    """LoRA: the reference is the base with the adapter disabled (no `ref` copy), the base weights
    stay bit-identical and so do the reference logits; the adapter moved. Full: TRL's frozen copy."""
    import torch

    trainer, model = dpo_trainer(tiny_model_dir, tmp_path / "lora", {"type": "dpo", "dpo": {"beta": 0.1}})
    assert list(model.peft_config) == ["default"]
    probe = torch.tensor([[5, 60, 70, 80, 90, 100]])
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    with torch.no_grad(), model.disable_adapter():
        ref_before = model(input_ids=probe).logits.clone()
    trainer.train()
    assert trainer.state.global_step == 3
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base.items())
    assert any(float(p.abs().sum()) > 0 for n, p in after.items() if "lora_B" in n)
    model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            assert torch.equal(model(input_ids=probe).logits, ref_before)
        assert not torch.allclose(model(input_ids=probe).logits, ref_before)

    trainer, model = dpo_trainer(
        tiny_model_dir, tmp_path / "full", {"type": "dpo", "dpo": {"beta": 0.1}}, adaptation="full"
    )
    ref = trainer.ref_model
    assert ref is not None and ref is not model
    frozen = {n: p.detach().clone() for n, p in ref.named_parameters()}
    policy = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert all(torch.equal(p, frozen[n]) for n, p in ref.named_parameters())
    assert any(not torch.equal(p, policy[n]) for n, p in model.named_parameters())


def test_dpo_raises_heldout_preference_accuracy(tmp_path: Path, builtin_cache: Path) -> None:
    job = parse(job_body(tmp_path, {"type": "dpo", "dpo": {"beta": 0.1}}, hyperparameters={"maxSteps": 16}))
    summary = run(job, Options(scratch=tmp_path / "scratch"))
    m = summary["metrics"]
    assert m["preferenceAccuracy"] >= m["basePreferenceAccuracy"] + 0.4, m
    assert m["preferenceAccuracy"] >= 0.9, m
    assert m["objectives"]["rewardsAccuracies"] > 0.5 and m["objectives"]["rewardsMargins"] > 0, m
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["method"]["type"] == "dpo" and "adapter/adapter_model.safetensors" in manifest["files"]


def test_grpo_string_check_raises_mean_reward(tmp_path: Path, builtin_cache: Path) -> None:
    """A toy verifiable task: say the record's letter (stringCheck like {{item.answer}}). The random
    demo model's greedy answer never contains it (base reward 0); sampled 16-token answers sometimes
    do, and GRPO makes the letter the greedy choice."""
    rows = [{"prompt": [{"role": "user", "content": "Say a."}], "answer": "a"} for _ in range(40)]
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(x) + "\n" for x in rows))
    val.write_text("".join(json.dumps(x) + "\n" for x in rows[:4]))
    grader = {"name": "letter", "type": "stringCheck", "reference": "{{item.answer}}", "operation": "like"}
    body = job_body(
        tmp_path,
        {"type": "grpo", "grpo": {"numGenerations": 8, "maxCompletionLength": 16, "beta": 0.0, "graders": [grader]}},
        dataset={"train": str(train), "validation": str(val), "minExamples": 1},
        hyperparameters={"maxSteps": 16, "batchSize": 16, "learningRate": 1e-1},
    )
    summary = run(parse(body), Options(scratch=tmp_path / "scratch"))
    m = summary["metrics"]
    assert m["meanReward"] >= m["baseMeanReward"] + 0.5, m
    assert "reward/letter/mean" in m["objectives"] and m["objectives"]["base/reward/letter"] == m["baseMeanReward"], m


def test_dpo_resume_after_kill_is_identical(tmp_path: Path) -> None:
    """T1 for DPO: 8 steps straight vs kill -9 after the step-4 checkpoint and resume → the same adapter."""
    import torch

    def spec_file(d: Path) -> Path:
        d.mkdir()
        body = job_body(
            d,
            {"type": "dpo", "dpo": {"beta": 0.1}},
            hyperparameters={"maxSteps": 8},
            checkpointing={"everySteps": 4, "keep": 5},
            evaluation={"compareBase": False},
        )
        path = d / "job.yaml"
        path.write_text(yaml.safe_dump(body))
        return path

    straight = tmp_path / "straight"
    spec = spec_file(straight)
    done = subprocess.run(trainer_cmd(spec, straight), capture_output=True, text=True, env=env(straight), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    killed = tmp_path / "killed"
    spec = spec_file(killed)
    proc = subprocess.Popen(
        trainer_cmd(spec, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(killed)
    )
    store = storage.Store((killed / "out").as_uri())
    deadline = time.time() + 300
    while time.time() < deadline and 4 not in storage.list_checkpoints(store):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = storage.list_checkpoints(store)
    assert committed and max(committed) < 8, committed
    resumed = subprocess.run(trainer_cmd(spec, killed), capture_output=True, text=True, env=env(killed), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from checkpoint" in resumed.stderr + resumed.stdout
    a, b = _final_adapter(straight / "out"), _final_adapter(killed / "out")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
