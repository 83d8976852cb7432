"""Chunked losses (kubetune.trainer.chunked) equal the unchunked ones, and no full logits exist."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from kubetune.trainer import chunked

VOCAB = 301


def tiny(seed: int = 0, vocab: int = VOCAB, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        use_cache=False,
    )
    return LlamaForCausalLM(config).float()


def batch(seed: int = 1, b: int = 3, length: int = 23) -> dict[str, torch.Tensor]:
    """Right-padded rows with prompt tokens and a weight-0 assistant turn masked out (−100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, length), generator=g)
    labels = ids.clone()
    attention = torch.ones_like(ids)
    labels[:, :5] = -100  # the prompt
    labels[1, 9:14] = -100  # a message with weight 0
    labels[2, 17:] = -100  # padding
    attention[2, 17:] = 0
    labels[0, :] = torch.where(torch.arange(length) % 4 == 0, -100, labels[0])  # scattered holes
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def reference_sum(model, inputs) -> tuple[torch.Tensor, int]:
    """Σ CE over label positions from the model's full logits (what transformers' loss does)."""
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()
    target = inputs["labels"][:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss, int((target != -100).sum())


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), (name, (a[name] - b[name]).abs().max())


@pytest.mark.parametrize("tie", [False, True])
def test_sft_loss_and_gradients_equal_unchunked_full_finetune(tie):
    model = tiny(tie=tie)
    inputs = batch()
    ref, n = reference_sum(model, inputs)
    (ref / n).backward()
    expected = grads(model)
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    model.zero_grad(set_to_none=True)
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    loss, _, count = chunked.sft_loss(model, inputs)
    handle.remove()
    assert seen == [torch.Size([3, 0, VOCAB])]  # the model's own head projected nothing
    assert count == n
    assert torch.allclose(loss, ref / n, rtol=1e-6), (loss, ref / n)
    # 7 rows per chunk: the label rows span many chunks, each with its own gradient.
    model.zero_grad(set_to_none=True)
    hidden = chunked.forward_hidden(model, {k: v for k, v in inputs.items() if k != "labels"})
    total, _ = chunked.cross_entropy_sum(hidden, inputs["labels"], chunk=7)
    (total / n).backward()
    assert_grads_close(grads(model), expected)
    assert "lm_head.weight" in expected or tie


def test_num_items_normalises_like_the_models_loss():
    model = tiny()
    inputs = batch()
    theirs = model(**inputs, num_items_in_batch=torch.tensor(100)).loss
    ours, _, _ = chunked.sft_loss(model, inputs, torch.tensor(100))
    assert torch.allclose(ours, theirs, rtol=1e-6), (ours, theirs)


def test_lora_with_a_wrapped_head_takes_the_checkpointed_path_and_matches():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], lora_dropout=0.0)
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # non-zero B: the head's adapter changes the logits
    head = chunked._unwrap(model).get_output_embeddings()
    assert not chunked._plain_linear(head)  # a LoRA layer: the generic checkpointed path
    inputs = batch()
    ref, n = reference_sum(model, inputs)
    (ref / n).backward()
    expected = grads(model)
    assert any("lm_head" in k for k in expected)
    model.zero_grad(set_to_none=True)
    hidden = chunked.forward_hidden(model, {k: v for k, v in inputs.items() if k != "labels"})
    total, count = chunked.cross_entropy_sum(hidden, inputs["labels"], chunk=5)
    assert count == n and torch.allclose(total, ref, rtol=1e-5)
    (total / n).backward()
    assert_grads_close(grads(model), expected)


def test_prompt_tuning_hidden_states_drop_the_virtual_positions():
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(tiny(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    inputs = batch()
    theirs = model(**inputs).loss
    ours, hidden, _ = chunked.sft_loss(model, inputs)
    assert hidden.states.shape[1] == inputs["input_ids"].shape[1]
    assert torch.allclose(ours, theirs, rtol=1e-5), (ours, theirs)
    ours.backward()
    prompt = [p for n, p in model.named_parameters() if p.requires_grad]
    assert prompt and prompt[0].grad is not None and prompt[0].grad.abs().sum() > 0


def test_sequence_logprobs_equal_the_full_log_softmax_with_gradients():
    model = tiny()
    inputs = batch()
    labels = inputs["labels"]
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    target = labels[:, 1:]
    picked = logp.gather(2, target.clamp(min=0)[..., None]).squeeze(2) * (target != -100)
    expected = picked.sum(1)
    (expected * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    expected_grads = grads(model)
    model.zero_grad(set_to_none=True)
    ours = chunked.sequence_logprobs(
        model, {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}, labels, chunk=6
    )
    assert ours.shape == (3,)
    assert torch.allclose(ours, expected.detach(), rtol=1e-5), (ours, expected)
    (ours * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    assert_grads_close(grads(model), expected_grads)


@pytest.mark.parametrize("reverse", [False, True])
def test_distillation_kl_from_hidden_equals_the_logits_path(reverse):
    from kubetune.trainer.objectives.distillation import kl_at_labels, kl_from_hidden

    student, teacher = tiny(0), tiny(7)
    for p in teacher.parameters():
        p.requires_grad_(False)
    inputs = batch()
    model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    vocab = VOCAB - 3  # the tokenizer's length may be below the model's rows
    s_logits = student(**model_inputs).logits[..., :vocab]
    t_logits = teacher(**model_inputs).logits[..., :vocab]
    expected, expected_ce = kl_at_labels(s_logits, t_logits, inputs["labels"], 2.0, reverse)
    expected.backward()
    expected_grads = grads(student)
    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        t_hidden = chunked.forward_hidden(teacher, model_inputs)
    kl, ce = kl_from_hidden(
        chunked.forward_hidden(student, model_inputs), t_hidden, inputs["labels"], 2.0, reverse, vocab, chunk=4
    )
    assert float(expected.detach()) > 1e-3  # the two models really differ
    assert torch.allclose(kl, expected, rtol=1e-5), (kl, expected)
    assert ce == pytest.approx(expected_ce, rel=1e-5)
    kl.backward()
    assert_grads_close(grads(student), expected_grads)


def test_evaluate_equals_the_full_logits_evaluation(monkeypatch):
    from kubetune.trainer import data, run

    model = tiny()
    examples = [
        data.Example(input_ids=list(range(3 + i, 20 + 2 * i)), labels=[-100] * 4 + list(range(7 + i, 20 + 2 * i)))
        for i in range(5)
    ]
    collate = data.Collator(0)
    ours = run.evaluate(model, examples, collate, 2)
    monkeypatch.setattr(chunked, "supports_hidden", lambda m: False)
    full = run.evaluate(model, examples, collate, 2)
    assert ours["loss"] == pytest.approx(full["loss"], rel=1e-6)
    assert ours["tokenAccuracy"] == full["tokenAccuracy"]
    assert 4.0 < ours["loss"] < 8.0  # a random model over ~300 tokens: about log(301) ≈ 5.7


def test_trainer_step_matches_the_plain_trainer(tmp_path):
    """One optimizer step of ChunkedTrainer = transformers.Trainer on the model's own loss."""
    from kubetune.trainer.objectives import ChunkedTrainer
    from transformers import Trainer, TrainingArguments

    rows = [{k: v[i] for k, v in batch(b=4).items()} for i in range(4)]

    def collate(features):
        return {k: torch.stack([f[k] for f in features]) for k in features[0]}

    results = []
    for cls in (Trainer, ChunkedTrainer):
        model = tiny()
        args = TrainingArguments(
            output_dir=str(tmp_path / cls.__name__),
            max_steps=2,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            learning_rate=1e-2,
            report_to=[],
            use_cpu=True,
            logging_steps=1,
            save_strategy="no",
            disable_tqdm=True,
            seed=3,
            data_seed=3,
        )
        trainer = cls(model=model, args=args, train_dataset=rows, data_collator=collate)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        results.append((losses, copy.deepcopy(model.lm_head.weight.detach())))
    (plain_losses, plain_head), (our_losses, our_head) = results
    assert len(our_losses) == 2
    assert our_losses == pytest.approx(plain_losses, rel=1e-5)
    assert torch.allclose(our_head, plain_head, atol=1e-6)
