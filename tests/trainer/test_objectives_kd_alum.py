"""Distillation (KD) and adversarial training (ALUM) do what METHODS.md says (tiny model, CPU).

KD: a student distilled from itself has a KD loss of exactly 0; the teacher stays bit-identical
with no grads; α = 0 logs the same losses as the plain transformers Trainer; a teacher with a
different vocabulary is refused before training; forward and reverse KL differ; the chunked KL
equals the one-shot KL. ALUM: α = 0 leaves the CE gradients bit-identical; ‖δ‖∞ ≤ ε; the
adversarial δ raises the KL more than a random ±ε one; LoRA's frozen base stays bit-identical.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from kubetune.api.spec import AdversarialConfig, DistillationConfig, ModelSource
from kubetune.trainer import builtin
from kubetune.trainer.objectives import Context, IncompatibleError, ObjectiveTrainer
from kubetune.trainer.objectives.adversarial import Adversarial
from kubetune.trainer.objectives.distillation import Distillation, kl_at_labels

from tests.fixtures.models import load_tiny, tiny_model_dir  # noqa: F401

# ------------------------------------------------------------------------------ helpers


def load_frozen(source: ModelSource) -> tuple[Any, Any]:
    """What run.py's loader hands a term: a model frozen, in eval mode, and its tokenizer."""
    from transformers import AutoTokenizer

    model = load_tiny(Path(source.source)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(source.source)


def tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def context(directory: Path, load: Any = load_frozen) -> Context:
    return Context(spec=None, tokenizer=tokenizer(directory), model_dir=directory, load_model=load)


def kd(student_dir: Path, teacher_dir: Path, **config: Any) -> Distillation:
    return Distillation(
        DistillationConfig(teacher=ModelSource(source=str(teacher_dir)), **config), context(student_dir)
    )


def alum(directory: Path, **config: Any) -> Adversarial:
    return Adversarial(AdversarialConfig(**config), context(directory))


def batch(seed: int = 0, rows: int = 3, length: int = 16) -> dict[str, torch.Tensor]:
    """Random tokens; a prompt of 4 tokens without labels; the last row right-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, length - 5 :] = 0
    ids[-1, length - 5 :] = 3  # <|pad|>
    labels = ids.clone()
    labels[:, :4] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def dataset(n: int = 8, length: int = 16) -> list[dict[str, list[int]]]:
    b = batch(seed=1, rows=n, length=length)
    b["attention_mask"][:] = 1
    b["labels"] = b["input_ids"].clone()
    b["labels"][:, :4] = -100
    return [{k: v[i].tolist() for k, v in b.items()} for i in range(n)]


def args(out: Path, steps: int = 4) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=2,
        max_steps=steps,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        seed=7,
        disable_tqdm=True,
        remove_unused_columns=False,
    )


def objective_trainer(model: Any, out: Path, terms: list, steps: int = 4) -> ObjectiveTrainer:
    from transformers import default_data_collator

    return ObjectiveTrainer(
        model=model, args=args(out, steps), train_dataset=dataset(), data_collator=default_data_collator, terms=terms
    )


def snapshot(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture and tokenizer as the tiny model, different weights: a real teacher."""
    return builtin.build("tiny-llama", tmp_path_factory.mktemp("tiny-llama-seed1"), seed=1)


@pytest.fixture(scope="module")
def swapped_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a tokenizer whose ids of 'a' and 'b' are swapped."""
    target = tmp_path_factory.mktemp("tiny-llama-swapped") / "model"
    shutil.copytree(tiny_model_dir, target)
    spec = json.loads((target / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (target / "tokenizer.json").write_text(json.dumps(spec))
    return target


# ------------------------------------------------------------------------------ distillation


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_self_distillation_is_exactly_zero(tiny_model_dir: Path, direction: str) -> None:
    term = kd(tiny_model_dir, tiny_model_dir, alpha=0.5, direction=direction)
    student = load_tiny(tiny_model_dir).train()
    term.prepare(student)
    inputs = batch()
    out = student(**inputs)
    loss, metrics = term.combine(out.loss, student, inputs, out)
    assert metrics["kdLoss"] == 0.0
    assert loss.item() == (0.5 * out.loss).item()
    assert metrics["kdTeacherCe"] == pytest.approx(out.loss.item(), rel=1e-5)


def test_teacher_bit_identical_without_grads_after_training(
    tiny_model_dir: Path, other_dir: Path, tmp_path: Path
) -> None:
    term = kd(tiny_model_dir, other_dir, alpha=0.5)
    student = load_tiny(tiny_model_dir)
    term.prepare(student)
    teacher_before, student_before = snapshot(term.teacher), snapshot(student)
    trainer = objective_trainer(student, tmp_path, [("distillation", term)])
    trainer.train()
    assert trainer.last_metrics["kdLoss"] > 0
    assert all(torch.equal(v, teacher_before[k]) for k, v in term.teacher.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in term.teacher.parameters())
    assert not term.teacher.training
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())


def test_alpha_zero_equals_plain_sft(tiny_model_dir: Path, other_dir: Path, tmp_path: Path) -> None:
    from kubetune.trainer.objectives import ChunkedTrainer
    from transformers import Trainer, default_data_collator

    # Plain SFT is what run.py trains with no objective: ChunkedTrainer (the model's loss from
    # chunked logits); it equals transformers' own loss up to float rounding.
    reference = load_tiny(tiny_model_dir)
    plain = ChunkedTrainer(
        model=reference, args=args(tmp_path / "plain"), train_dataset=dataset(), data_collator=default_data_collator
    )
    plain.train()
    hf = Trainer(
        model=load_tiny(tiny_model_dir),
        args=args(tmp_path / "hf"),
        train_dataset=dataset(),
        data_collator=default_data_collator,
    )
    hf.train()
    term = kd(tiny_model_dir, other_dir, alpha=0.0)
    student = load_tiny(tiny_model_dir)
    term.prepare(student)
    ours = objective_trainer(student, tmp_path / "kd", [("distillation", term)])
    ours.train()

    def losses(t: Any) -> list[float]:
        return [e["loss"] for e in t.state.log_history if "loss" in e]

    assert len(losses(plain)) == 4
    assert losses(ours) == losses(plain)
    assert losses(plain) == pytest.approx(losses(hf), rel=1e-5)
    assert ours.last_metrics["kdLoss"] > 0  # the term ran; it just weighs nothing
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), reference.parameters()))


def test_mismatched_vocabulary_rejected_before_training(tiny_model_dir: Path, swapped_dir: Path) -> None:
    student = load_tiny(tiny_model_dir)
    term = kd(tiny_model_dir, swapped_dir)
    with pytest.raises(IncompatibleError) as err:
        term.prepare(student)
    message = str(err.value)
    assert "spec.method.objectives[" in message and "].distillation.teacher" in message
    assert "'a'" in message and "'b'" in message and "2 tokens" in message
    assert term.teacher is None


def test_different_special_tokens_rejected(tiny_model_dir: Path) -> None:
    def load(source: ModelSource) -> tuple[Any, Any]:
        model, tok = load_frozen(source)
        tok.eos_token = "<|endoftext|>"
        return model, tok

    term = Distillation(
        DistillationConfig(teacher=ModelSource(source=str(tiny_model_dir))), context(tiny_model_dir, load)
    )
    with pytest.raises(IncompatibleError, match=r"distillation\.teacher.*eos_token id student 2 vs teacher 0"):
        term.prepare(load_tiny(tiny_model_dir))


def test_forward_and_reverse_differ(tiny_model_dir: Path, other_dir: Path) -> None:
    student = load_tiny(tiny_model_dir)
    inputs = batch()
    out = student(**inputs)
    values = {}
    for direction in ("forward", "reverse"):
        term = kd(tiny_model_dir, other_dir, direction=direction)
        term.prepare(student)
        values[direction] = term.combine(out.loss, student, inputs, out)[1]["kdLoss"]
    assert values["forward"] > 0 and values["reverse"] > 0
    assert abs(values["forward"] - values["reverse"]) > 1e-4 * values["forward"]


@pytest.mark.parametrize("reverse", [False, True])
def test_chunked_kl_equals_unchunked(reverse: bool) -> None:
    g = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(3, 40, 260, generator=g)).requires_grad_(True)
    teacher = 3 * torch.randn(3, 40, 260, generator=g)
    labels = torch.randint(0, 260, (3, 40), generator=g)
    labels[torch.rand(3, 40, generator=g) < 0.3] = -100
    whole, ce_whole = kl_at_labels(student, teacher, labels, 2.0, reverse, chunk=10**9)
    (grad_whole,) = torch.autograd.grad(whole, student)
    for chunk in (1, 7, 64):
        part, ce_part = kl_at_labels(student, teacher, labels, 2.0, reverse, chunk=chunk)
        (grad_part,) = torch.autograd.grad(part, student)
        assert abs(part.item() - whole.item()) <= 1e-6 * max(1.0, whole.item())
        assert ce_part == pytest.approx(ce_whole, rel=1e-6)
        torch.testing.assert_close(grad_part, grad_whole, rtol=0, atol=1e-6)
    # And against a direct, unmasked-then-selected reference.
    t, s = teacher[:, :-1] / 2.0, student.detach()[:, :-1] / 2.0
    keep = labels[:, 1:] != -100
    ls, lt = s.log_softmax(-1)[keep], t.log_softmax(-1)[keep]
    ref = (ls.exp() * (ls - lt)).sum(-1).mean() if reverse else (lt.exp() * (lt - ls)).sum(-1).mean()
    assert abs(whole.item() - ref.item()) <= 1e-6 * max(1.0, ref.item())


# ------------------------------------------------------------------------------ adversarial


def test_alum_alpha_zero_gradients_equal_ce(tiny_model_dir: Path, tmp_path: Path) -> None:
    inputs = batch()
    reference = load_tiny(tiny_model_dir).train()
    reference(**inputs).loss.backward()

    model = load_tiny(tiny_model_dir).train()
    term = alum(tiny_model_dir, alpha=0.0)
    term.prepare(model)
    trainer = objective_trainer(model, tmp_path, [("adversarial", term)])
    trainer.compute_loss(model, inputs).backward()
    assert trainer.last_metrics == {"adversarialKl": 0.0, "adversarialDeltaInf": 0.0}
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name

    # Control: with α > 0 the term does change the gradients.
    model.zero_grad(set_to_none=True)
    active = objective_trainer(
        model, tmp_path, [("adversarial", alum(tiny_model_dir, alpha=1.0, epsilon=1e-2, sigma=1e-3, step_size=1e-1))]
    )
    active.compute_loss(model, inputs).backward()
    assert active.last_metrics["adversarialKl"] > 0
    assert any(not torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), reference.parameters()))


@pytest.mark.parametrize("config", [{}, {"epsilon": 1e-3, "sigma": 1e-2, "step_size": 1e-1, "steps": 3}])
def test_delta_within_epsilon(tiny_model_dir: Path, config: dict[str, Any]) -> None:
    model = load_tiny(tiny_model_dir).train()
    term = alum(tiny_model_dir, **config)
    inputs = batch()
    out = model(**inputs)
    delta = term.perturb(model, inputs, out.logits)
    assert delta.shape == (*inputs["input_ids"].shape, model.config.hidden_size)
    assert delta.abs().max().item() <= term.config.epsilon
    assert delta.abs().max().item() > 0.5 * term.config.epsilon  # the ascent reached the boundary


def test_adversarial_delta_beats_random_sign_delta(tiny_model_dir: Path) -> None:
    model = load_tiny(tiny_model_dir).train()
    eps = 1e-3
    term = alum(tiny_model_dir, epsilon=eps, sigma=1e-4, step_size=1e-2)
    adversarial, random = [], []
    for seed in range(4):
        torch.manual_seed(seed)
        inputs = batch(seed=seed)
        with torch.no_grad():
            clean = model(**inputs).logits
        delta = term.perturb(model, inputs, clean)
        sign = eps * torch.randn(delta.shape, generator=torch.Generator().manual_seed(100 + seed)).sign()
        with torch.no_grad():
            adversarial.append(term.kl(model, inputs, clean, delta).item())
            random.append(term.kl(model, inputs, clean, sign).item())
    assert sum(adversarial) / 4 > 2 * sum(random) / 4, (adversarial, random)


def test_lora_base_unchanged_under_alum(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        load_tiny(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    term = alum(tiny_model_dir, epsilon=1e-3, sigma=1e-4, step_size=1e-2)
    term.prepare(model)
    before = snapshot(model)
    trainer = objective_trainer(model, tmp_path, [("adversarial", term)], steps=3)
    trainer.train()
    assert trainer.last_metrics["adversarialKl"] > 0
    assert 0 < trainer.last_metrics["adversarialDeltaInf"] <= 1e-3
    after = model.state_dict()
    frozen = [k for k in before if "lora_" not in k]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)
    assert any(not torch.equal(after[k], before[k]) for k in before if "lora_B" in k)


def test_prompt_tuning_virtual_positions_are_sliced(tiny_model_dir: Path, other_dir: Path) -> None:
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(load_tiny(tiny_model_dir), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    inputs = batch()
    out = model(**inputs)
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] + 5
    distill = kd(tiny_model_dir, other_dir)
    distill.prepare(model)
    loss, m = distill.combine(out.loss, model, inputs, out)
    adv = alum(tiny_model_dir, epsilon=1e-3, sigma=1e-4, step_size=1e-2)
    loss, m2 = adv.combine(loss, model, inputs, out)
    loss.backward()
    assert m["kdLoss"] > 0 and m2["adversarialKl"] > 0
    encoder: Any = model.prompt_encoder["default"]
    prompt = encoder.embedding.weight
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
