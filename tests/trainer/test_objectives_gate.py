"""attentionGuidance (GATE) on the tiny Llama (2 layers, 4 heads, 2 kv heads), CPU.

The METHODS.md rows: captured attention is a causal, padding-aware distribution; exactly the
guided layers are captured (sdpa's silent nothing cannot reach the loss); a previous-token guide on
one head drives that head to the previous token while an unguided head of the layer stays put;
λ = 0 is plain SFT; the diagonal and spans guides are distributions over allowed keys; a teacher
with the student's own weights gives L_att = the attention entropy.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from kubetune.api.enums import Objective
from kubetune.api.spec import AttentionGuidanceConfig
from kubetune.trainer import data
from kubetune.trainer.builtin import byte_tokenizer
from kubetune.trainer.objectives import ObjectiveTrainer
from kubetune.trainer.objectives import attention_guidance as ag

from tests.fixtures.models import load_tiny, tiny_model_dir  # noqa: F401


def padded_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 200, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.masked_fill(mask == 0, 3), "attention_mask": mask, "labels": labels}


def ctx(**kw: Any) -> Any:
    return SimpleNamespace(**{"spec": None, "tokenizer": byte_tokenizer(), "load_model": None, **kw})


def prev_mass(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean attention on the previous token per head, over real queries q ≥ 1: [H]."""
    prev = torch.diagonal(probs, offset=-1, dim1=-2, dim2=-1)  # [B, H, Q-1]: A[q, q-1]
    w = (mask[:, 1:] * mask[:, :-1]).to(prev.dtype)[:, None]
    return (prev * w).sum((0, 2)) / w.sum((0, 2))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_rows_are_causal_distributions_without_padding(tiny_model_dir: Path, impl: str) -> None:
    model = load_tiny(tiny_model_dir, attn_implementation=impl)
    batch = padded_batch()
    with torch.no_grad():
        probs = ag.attention_probs(model, batch)
    assert model.config._attn_implementation == impl  # the temporary capture is removed again
    assert sorted(probs) == [0, 1]
    mask = batch["attention_mask"].bool()
    for a in probs.values():
        assert a.shape == (3, 4, 12, 12)
        rows = a.sum(-1)[mask[:, None, :].expand(-1, 4, -1)]
        assert torch.allclose(rows, torch.ones_like(rows), atol=1e-6)
        assert torch.equal(torch.triu(a, diagonal=1), torch.zeros_like(a))  # nothing above the diagonal
        assert torch.equal(a * (~mask)[:, None, None, :], torch.zeros_like(a))  # nothing on padding keys


def test_eager_capture_equals_the_models_own_attention_weights(tiny_model_dir: Path) -> None:
    model = load_tiny(tiny_model_dir, attn_implementation="eager")
    batch = padded_batch()
    with torch.no_grad():
        ours = ag.attention_probs(model, batch)
        theirs = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True
        ).attentions
    mask = batch["attention_mask"].bool()[:, None, :, None]
    for layer, a in ours.items():
        assert torch.allclose(a * mask, theirs[layer] * mask, atol=1e-6)


def test_only_guided_layers_are_captured_and_never_silently_empty(tiny_model_dir: Path) -> None:
    model = load_tiny(tiny_model_dir)
    assert model.config._attn_implementation == "sdpa"
    batch = padded_batch()
    with torch.no_grad():  # the pitfall: sdpa + output_attentions gives no attention at all
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
    assert not plain.attentions
    term = ag.AttentionGuidance(AttentionGuidanceConfig(guide="diagonal", layers=[-1], heads=[1, 2]), ctx())
    term.prepare(model)
    assert model.config._attn_implementation == "kubetune_guided_sdpa"
    term.forward_kwargs()
    out = model(**batch, output_attentions=True)
    store = dict(term.capture.store)
    assert sorted(store) == [1] and store[1][0].shape == (3, 2, 12, 12)  # guided layer × guided heads
    loss, metrics = term.combine(out.loss, model, batch, out)
    assert metrics["attentionLoss"] > 0 and math.isfinite(float(loss.detach()))
    # Something switching the model back to plain sdpa after prepare is an error, not an empty loss.
    model.config._attn_implementation = "sdpa"
    term.forward_kwargs()
    out = model(**batch)
    with pytest.raises(RuntimeError, match="captured attention for layers \\[\\]"):
        term.combine(out.loss, model, batch, out)


def test_capture_leaves_the_forward_bit_identical(tiny_model_dir: Path) -> None:
    model = load_tiny(tiny_model_dir)
    batch = padded_batch()
    before = model(**batch).logits
    term = ag.AttentionGuidance(AttentionGuidanceConfig(guide="diagonal", layers=[0, -1]), ctx())
    term.prepare(model)
    term.forward_kwargs()
    after = model(**batch)
    assert torch.equal(before, after.logits)
    assert sorted(term.capture.take()) == [0, 1]


def test_previous_token_guide_trains_only_the_guided_head(tiny_model_dir: Path) -> None:
    torch.manual_seed(0)
    model = load_tiny(tiny_model_dir)
    batch = padded_batch(seed=1)
    config = AttentionGuidanceConfig(guide="diagonal", layers=[-1], heads=[0], weight=1.0)
    term = ag.AttentionGuidance(config, ctx(), guide=lambda allowed, inputs: ag.previous_token_guide(allowed))
    term.prepare(model)
    mask = batch["attention_mask"]
    with torch.no_grad():
        start = prev_mass(ag.attention_probs(model, batch, layers=[1])[1], mask)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    for _ in range(30):  # CE + λ·L_att: the head is guided while the model also learns the batch
        opt.zero_grad(set_to_none=True)
        term.forward_kwargs()
        out = model(**batch)
        loss, metrics = term.combine(out.loss, model, batch, out)
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = prev_mass(ag.attention_probs(model, batch, layers=[1])[1], mask)
    print(
        f"previous-token mass, layer 1: start {start.tolist()}, end {end.tolist()}; guidedMass {metrics['guidedMass']:.3f}"
    )
    assert end[0] >= 0.9 and metrics["guidedMass"] >= 0.9  # the guided head
    assert start[0] < 0.5
    # An unguided head of the same layer in the other kv group stays put. (Head 1 shares head 0's
    # keys under GQA, so it is not independent of the guide and is not asserted on.)
    assert abs(end[3] - start[3]) < 0.1 and end[3] < 0.5


def _sft_run(model_dir: Path, out: Path, with_term: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    from kubetune.trainer.objectives import ChunkedTrainer
    from transformers import TrainingArguments

    model = load_tiny(model_dir)
    rows = [padded_batch(seed=s) for s in range(2)]
    train = [
        {
            "input_ids": r["input_ids"][i][r["attention_mask"][i].bool()].tolist(),
            "labels": r["labels"][i][r["attention_mask"][i].bool()].tolist(),
        }
        for r in rows
        for i in range(3)
    ]
    args = TrainingArguments(
        output_dir=str(out),
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        seed=7,
        max_steps=4,
        per_device_train_batch_size=3,
        learning_rate=1e-3,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    common = dict(model=model, args=args, train_dataset=train, data_collator=data.Collator(pad_token_id=3))
    if with_term:
        term = ag.AttentionGuidance(AttentionGuidanceConfig(guide="diagonal", layers=[-1], weight=0.0), ctx())
        term.prepare(model)
        trainer: Any = ObjectiveTrainer(**common, terms=[(Objective.ATTENTION_GUIDANCE, term)])
    else:
        # Plain SFT as run.py trains it without objectives: the loss from chunked logits.
        trainer = ChunkedTrainer(**common)
    trainer.train()
    if with_term:
        assert trainer.last_metrics["attentionLoss"] > 0  # the term ran, weighted by 0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lambda_zero_is_plain_sft(tiny_model_dir: Path, tmp_path: Path) -> None:
    plain, plain_weights = _sft_run(tiny_model_dir, tmp_path / "plain", with_term=False)
    guided, guided_weights = _sft_run(tiny_model_dir, tmp_path / "gate", with_term=True)
    assert len(plain) == 4 and guided == plain
    assert all(torch.equal(plain_weights[k], guided_weights[k]) for k in plain_weights)


def test_diagonal_guide_is_a_distribution_over_allowed_keys(tiny_model_dir: Path) -> None:
    model = load_tiny(tiny_model_dir)
    batch = padded_batch()
    cap = ag.install(model, [-1])
    with torch.no_grad():
        allowed = ag.forward_captured(model, cap, batch)[1][1]
    g, rows = ag.diagonal_guide(allowed, width=0.2)
    assert torch.equal(rows, batch["attention_mask"].bool())
    assert torch.allclose(g.sum(-1)[:, 0][rows], torch.ones(int(rows.sum())), atol=1e-6)
    assert torch.equal(g[:, 0][~rows], torch.zeros_like(g[:, 0][~rows]))
    assert torch.equal(g[:, 0] * ~allowed, torch.zeros_like(g[:, 0]))
    # The band: for the 12-token row the guide peaks on the query and halves near g·L·√(2 ln 2) back.
    row = g[0, 0, 11]
    assert row.argmax() == 11 and row[11] > row[10] > row[9] > row[8]
    assert math.isclose(float(row[10] / row[11]), math.exp(-0.5 * (1 / (0.2 * 12)) ** 2), rel_tol=1e-5)
    assert g[2, 0, 4, 4] > g[2, 0, 4, 3]  # a 5-token example has its own (narrower) L


def test_spans_map_characters_to_tokens_and_guide_is_a_distribution(tiny_model_dir: Path) -> None:
    tok = byte_tokenizer()
    rec = data.Record("f.jsonl", 3, {"prompt": "ctx: the key is 42. q?", "completion": " 42", "spans": [[5, 19]]})
    ex = data.encode_full(rec, "promptCompletion", tok)
    mask = data.encode_record(rec, "promptCompletion", tok).guide_mask()
    assert len(mask) == len(ex.input_ids)
    assert tok.decode([t for t, m in zip(ex.input_ids, mask) if m]) == "the key is 42."
    chat = data.Record(
        "f.jsonl",
        4,
        {
            "messages": [{"role": "user", "content": "see: blue sky"}, {"role": "assistant", "content": "blue"}],
            "spans": [[5, 9]],
        },
    )
    chat_ex = data.encode_full(chat, "chat", tok)
    chat_mask = data.encode_record(chat, "chat", tok).guide_mask()
    assert tok.decode([t for t, m in zip(chat_ex.input_ids, chat_mask) if m]) == "blue"
    with pytest.raises(data.DataError, match=r"f.jsonl:3: spans: \[0\]: \[5, 99\) is outside 'prompt'"):
        data.encode_record(
            data.Record("f.jsonl", 3, {**rec.data, "spans": [[5, 99]]}), "promptCompletion", tok
        ).guide_mask()

    collate = data.Collator(pad_token_id=tok.pad_token_id)
    ex.guide_mask, chat_ex.guide_mask = mask, chat_mask
    batch = collate([ex, chat_ex])
    assert batch["guide_mask"].shape == batch["input_ids"].shape
    assert batch["guide_mask"][0, : len(mask)].tolist() == mask and batch["guide_mask"][0, len(mask) :].sum() == 0
    model = load_tiny(tiny_model_dir)
    term = ag.AttentionGuidance(AttentionGuidanceConfig(guide="spans", layers=[-1], weight=1.0), ctx())
    term.prepare(model)
    term.forward_kwargs()
    out = model(**{k: v for k, v in batch.items() if k != "guide_mask"})
    allowed = term.capture.store[1][1]
    loss, metrics = term.combine(out.loss, model, batch, out)
    assert math.isfinite(float(loss.detach())) and 0 < metrics["guidedMass"] < 1
    g, rows = ag.span_guide(allowed, batch["guide_mask"], batch["labels"])
    predicts = torch.zeros_like(rows)
    predicts[:, :-1] = batch["labels"][:, 1:] != -100
    assert torch.equal(rows, predicts)  # rows that predict a trained token (all see the evidence)
    assert torch.allclose(g.sum(-1)[:, 0][rows], torch.ones(int(rows.sum())), atol=1e-6)
    assert torch.equal((g[:, 0] > 0), allowed & batch["guide_mask"].bool()[:, None, :] & rows[..., None])


def test_teacher_guide_with_own_weights_is_the_attention_entropy(tiny_model_dir: Path) -> None:
    tok = byte_tokenizer()
    model = load_tiny(tiny_model_dir)
    config = AttentionGuidanceConfig(
        guide="teacher", teacher={"source": "builtin://tiny-llama"}, layers=[-1], weight=1.0
    )
    term = ag.AttentionGuidance(config, ctx(load_model=lambda source: (load_tiny(tiny_model_dir), tok)))
    term.prepare(model)
    batch = padded_batch()
    with torch.no_grad():
        a = ag.attention_probs(model, batch)[1]
    entropy = -(a * torch.log(a.clamp_min(ag.LOG_FLOOR))).sum(-1)  # [B, H, Q]
    rows = batch["attention_mask"].bool()[:, None, :].expand_as(entropy)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    totals = []
    for step in range(8):
        opt.zero_grad(set_to_none=True)
        term.forward_kwargs()
        out = model(**batch)
        loss, metrics = term.combine(out.loss, model, batch, out)
        if step == 0:
            assert math.isclose(metrics["attentionLoss"], float(entropy[rows].mean()), rel_tol=1e-5)
        assert math.isfinite(metrics["attentionLoss"])
        loss.backward()
        opt.step()
        totals.append(float(loss.detach()))
    assert totals[-1] < totals[0]
    assert all(p.grad is None for p in term.teacher.parameters())


def test_lora_and_gradient_checkpointing(tiny_model_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_tiny(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.gradient_checkpointing_enable()  # transformers' default: non-reentrant
    model.enable_input_require_grads()
    term = ag.AttentionGuidance(AttentionGuidanceConfig(guide="diagonal", layers=[-1], weight=1.0), ctx())
    term.prepare(model)
    assert model.get_base_model().config._attn_implementation == "kubetune_guided_sdpa"
    model.train()
    batch = padded_batch()
    term.forward_kwargs()
    out = model(**batch)
    loss, _ = term.combine(out.loss, model, batch, out)
    loss.backward()  # recomputation runs the same capture ops: no checkpoint metadata mismatch
    grads = [p.grad for n, p in model.named_parameters() if "layers.1.self_attn.q_proj.lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    ag.uninstall(model)
    assert model.get_base_model().config._attn_implementation == "sdpa"
