"""The DPO family's completion log-probs never need the [batch, seq, vocab] logits: ORPO through
kubetune.trainer.chunked (preference._chunked_orpo) equals TRL's own full-logits forward in loss,
gradients and logged metrics; DPO and KTO score through TRL 1.16's fused LM head, which these
tests pin (the LM head module is never called) and check against the closed form from full
logits, gradients included."""

from __future__ import annotations

import math
import types
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.test_preference import _sum_logps, dpo_trainer

CHUNK = 5  # label rows per chunk of logits in these tests: several chunks per batch


def _perturb(model: Any, seed: int = 0, scale: float = 1.0) -> None:
    """Nonzero LoRA B matrices (the policy differs from the reference and every adapter weight gets
    a gradient), and A matrices from the same generator: independent of the global RNG, so of test order."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _grads(model: Any) -> dict[str, Any]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _assert_grads_close(a: dict[str, Any], b: dict[str, Any]) -> None:
    import torch

    assert a.keys() == b.keys() and a
    assert any(float(g.abs().sum()) > 0 for g in a.values())
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), (name, float((a[name] - b[name]).abs().max()))


class _LargestTensor:
    """The largest tensor any op produced while active (a TorchDispatchMode), to show that no
    [batch, seq, vocab] logits exist."""

    def __enter__(self) -> _LargestTensor:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self
        self.numel = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor):
                        outer.numel = max(outer.numel, t.numel())
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.mode.__exit__(*exc)


def _head_calls(model: Any) -> tuple[list[tuple[int, ...]], Any]:
    """Shapes of every input of the LM head module, and the hook's handle."""
    shapes: list[tuple[int, ...]] = []
    head = model.get_output_embeddings()
    return shapes, head.register_forward_hook(lambda _m, args, _out: shapes.append(tuple(args[0].shape)))


@pytest.mark.parametrize("labels", ["tokens", "shifted", "head adapter"])
def test_orpo_chunked_forward_equals_trl_full_logits(
    tiny_model_dir: Path, tmp_path: Path, labels: str, monkeypatch: Any
) -> None:
    """Loss, adapter gradients and every logged number (log-probs, rewards, NLL, log-odds, mean
    logits) of the chunked ORPO forward equal TRL's concatenated_forward from the full logits; the
    head only ever sees CHUNK rows and no tensor the size of the logits exists. "shifted": answer
    labels that differ from the input ids (the two-pass branch); "head adapter": a LoRA on lm_head
    (the generic, non-nn.Linear head path, mean logits included)."""
    import torch
    from trl.experimental.orpo import ORPOTrainer

    method: dict[str, Any] = {"type": "orpo", "orpo": {"beta": 0.3}}
    if labels == "head adapter":
        method["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["q_proj", "v_proj", "lm_head"]}
    trainer, model = dpo_trainer(tiny_model_dir, tmp_path, method)
    assert type(trainer).__name__ == "ChunkedORPOTrainer"
    if labels == "head adapter":
        assert type(model.get_output_embeddings()) is not torch.nn.Linear
    trainer.logits_chunk_rows = CHUNK
    _perturb(model, scale=0.5)
    model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    vocab = model.get_output_embeddings().weight.shape[0]
    if labels == "shifted":
        answer = batch["chosen_labels"] != -100
        batch["chosen_labels"] = torch.where(answer, (batch["chosen_labels"] + 1) % vocab, batch["chosen_labels"])
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    logits_numel = 4 * (width - 1) * vocab  # 2 pairs → 4 rows

    from kubetune.trainer import chunked

    passes: list[int] = []
    rows_logprobs = chunked.rows_logprobs
    monkeypatch.setattr(chunked, "rows_logprobs", lambda *a, **k: passes.append(1) or rows_logprobs(*a, **k))
    shapes, handle = _head_calls(model)
    try:
        with _LargestTensor() as largest:
            loss, metrics = trainer.get_batch_loss_metrics(model, batch)
            loss.backward()
    finally:
        handle.remove()
    chunked_grads = _grads(model)
    assert len(passes) == (2 if labels == "shifted" else 1)  # one pass serves the answer log-probs and the NLL
    projected = [s for s in shapes if 0 not in s]  # the model's own head call projects no position
    assert projected and all(len(s) == 2 and s[0] <= CHUNK for s in projected), shapes
    mlp_numel = 4 * width * model.config.intermediate_size  # the largest activation of the tiny model
    assert largest.numel <= mlp_numel < logits_numel, (largest.numel, mlp_numel, logits_numel)

    trainer.concatenated_forward = types.MethodType(ORPOTrainer.concatenated_forward, trainer)
    with _LargestTensor() as largest:
        ref_loss, ref_metrics = trainer.get_batch_loss_metrics(model, batch)
        ref_loss.backward()
    assert largest.numel >= logits_numel  # TRL's own path holds them whole
    full_grads = _grads(model)

    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5, abs=1e-6)
    assert metrics.keys() == ref_metrics.keys()
    for key, value in ref_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert abs(metrics["nll_loss"]) > 0.1 and metrics["logits/chosen"] != 0.0
    _assert_grads_close(chunked_grads, full_grads)


def test_orpo_falls_back_to_trl_without_hidden_states(tiny_model_dir: Path, tmp_path: Path, monkeypatch: Any) -> None:
    """When chunked.supports_hidden is false the trainer runs TRL's own forward (same loss)."""
    from kubetune.trainer import chunked

    trainer, model = dpo_trainer(tiny_model_dir, tmp_path, {"type": "orpo", "orpo": {"beta": 0.3}})
    _perturb(model, scale=0.5)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    import torch

    with torch.no_grad():
        chunked_loss, _ = trainer.get_batch_loss_metrics(model, batch)
        monkeypatch.setattr(chunked, "supports_hidden", lambda _m: False)
        shapes, handle = _head_calls(model)
        fallback_loss, _ = trainer.get_batch_loss_metrics(model, batch)
        handle.remove()
    assert shapes and len(shapes[0]) == 3  # the full-logits forward
    assert float(chunked_loss) == pytest.approx(float(fallback_loss), rel=1e-5)


def test_dpo_scores_through_trls_fused_head_with_unchunked_gradients(tiny_model_dir: Path, tmp_path: Path) -> None:
    """TRL 1.16's DPOTrainer computes the completion log-probs with its fused LM head (the head
    module is never called, so no logits are built by it); its loss and adapter gradients equal
    the closed form from the full logits."""
    import torch

    beta = 0.3
    trainer, model = dpo_trainer(tiny_model_dir, tmp_path, {"type": "dpo", "dpo": {"beta": beta}})
    _perturb(model)
    model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])

    shapes, handle = _head_calls(model)
    try:
        loss = trainer.compute_loss(model, batch)
        loss.backward()
    finally:
        handle.remove()
    assert shapes == []
    fused = _grads(model)

    chosen, rejected = _sum_logps(model, batch)
    with torch.no_grad(), model.disable_adapter():
        ref_chosen, ref_rejected = _sum_logps(model, batch)
    by_hand = -torch.nn.functional.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
    by_hand.backward()
    assert abs(float(by_hand) - math.log(2)) > 0.01
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-5, abs=1e-6)
    _assert_grads_close(fused, _grads(model))


def test_kto_scores_through_trls_fused_head(tiny_model_dir: Path, tmp_path: Path) -> None:
    """TRL 1.16's KTOTrainer scores completions and its KL pairs with the fused LM head: the head
    module is never called in the loss (policy, reference and KL forwards)."""
    import torch
    from kubetune.trainer import methods, preference
    from kubetune.trainer.run import _SCHEDULERS
    from transformers import AutoTokenizer

    from tests.fixtures.models import load_tiny
    from tests.trainer.test_preference import EFFECTIVE, job_body, parse

    spec = parse(job_body(tmp_path, {"type": "kto", "kto": {"beta": 0.1}}, hyperparameters={"maxSteps": 1})).spec
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = methods.build(spec.method.adaptation, spec.method.config()).apply(load_tiny(tiny_model_dir), tok)
    args = preference.training_args(spec, EFFECTIVE, tmp_path / "run", True, _SCHEDULERS)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    rows = [
        {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}], "label": good}
        for q, a, good in [
            ("Return window?", "30 days.", True),
            ("Return window?", "No.", False),
            ("Free shipping?", "Over $50.", True),
            ("Free shipping?", "Never.", False),
        ]
    ]
    trainer = preference.build_trainer(spec, model, tok, rows, args, [], opt, [])
    _perturb(model)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    shapes, handle = _head_calls(model)
    try:
        loss = trainer.compute_loss(model, batch)
        loss.backward()
    finally:
        handle.remove()
    assert shapes == [] and math.isfinite(float(loss))
    assert any(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters() if p.grad is not None)


def test_heldout_mean_completion_logp_is_chunked_and_equal(tiny_model_dir: Path, monkeypatch: Any) -> None:
    """The held-out preference accuracy's mean completion log-prob comes from chunked logits and
    equals the full-logits computation."""
    from kubetune.trainer import chunked, preference
    from transformers import AutoTokenizer

    from tests.fixtures.models import load_tiny

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = load_tiny(tiny_model_dir)
    shapes, handle = _head_calls(model)
    value = preference._mean_completion_logp(model, tok, "Return window?", " 30 days, full refund.")
    handle.remove()
    assert all(0 in s or len(s) == 2 for s in shapes), shapes
    monkeypatch.setattr(chunked, "supports_hidden", lambda _m: False)
    full = preference._mean_completion_logp(model, tok, "Return window?", " 30 days, full refund.")
    assert value == pytest.approx(full, rel=1e-5) and value < 0


def test_kto_refuses_an_adapter_on_the_lm_head(tiny_model_dir: Path, tmp_path: Path) -> None:
    """TRL's fused head would ignore a LoRA on lm_head for KTO without a word (DPOTrainer raises,
    KTOTrainer does not): build_trainer refuses it; ORPO's chunked forward applies it."""
    import torch
    from kubetune.trainer import methods, preference
    from kubetune.trainer.run import _SCHEDULERS
    from transformers import AutoTokenizer

    from tests.fixtures.models import load_tiny
    from tests.trainer.test_preference import EFFECTIVE, job_body, parse

    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["q_proj", "lm_head"]}
    spec = parse(job_body(tmp_path, {"type": "kto", "kto": {"beta": 0.1}, "lora": lora})).spec
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = methods.build(spec.method.adaptation, spec.method.config()).apply(load_tiny(tiny_model_dir), tok)
    args = preference.training_args(spec, EFFECTIVE, tmp_path / "run", True, _SCHEDULERS)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    rows = [{"prompt": "Q?", "completion": " A.", "label": True}, {"prompt": "Q?", "completion": " B.", "label": False}]
    with pytest.raises(ValueError, match="kto cannot adapt the LM head"):
        preference.build_trainer(spec, model, tok, rows, args, [], opt, [])
