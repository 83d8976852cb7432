"""Reweighting (IGBI = Ren et al. 2018 gradient alignment) on the tiny model, CPU.

METHODS.md's tests: the three estimators of sᵢ = ⟨∇lᵢ, g_v⟩ agree (≤ 1e-6); the weights are
≥ 0 and sum to 1; with clean + random-token examples and a clean validation set, the clean ones
get ≥ 0.8 of the weight over training. Plus the QLoRA case (`auto` → finite difference through
4-bit layers, checked against vmap on the same weights dequantised) and the per-step cost,
printed (run with -s), not asserted.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from kubetune.api import Adaptation, Objective
from kubetune.api.enums import GradientEstimator, PromptInit
from kubetune.api.spec import LoraConfig, PromptTuningConfig, ReweightingConfig
from kubetune.trainer import data, methods
from kubetune.trainer.objectives import Context, IncompatibleError, ObjectiveTrainer
from kubetune.trainer.objectives import reweighting as rw
from kubetune.trainer.objectives.reweighting import Reweighting

from tests.fixtures.models import load_tiny, tiny_model_dir  # noqa: F401

PAD = 3  # the byte tokenizer's <|pad|>


def examples(n: int, length: int, seed: int) -> list[data.Example]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(4, 260, (n, length), generator=g).tolist()
    return [data.Example(r, list(r)) for r in rows]


def context(validation: list[data.Example], max_steps: int = 10) -> Context:
    return Context(
        spec=None,
        tokenizer=None,
        model_dir=Path("."),
        validation=validation,
        collate=data.Collator(PAD),
        max_steps=lambda: max_steps,
    )


def term(validation: list[data.Example], estimator: str = "auto", max_steps: int = 10, **kw: Any) -> Reweighting:
    cfg = ReweightingConfig(
        estimator=GradientEstimator(estimator), validation_batch_size=kw.pop("validation_batch_size", 4), **kw
    )
    return Reweighting(cfg, context(validation, max_steps))


def padded_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Four rows, right-padded, with a prompt that carries no loss."""
    rows = examples(4, 14, seed)
    rows[1] = data.Example(rows[1].input_ids[:9], rows[1].labels[:9])
    rows[2] = data.Example(rows[2].input_ids, [data.IGNORE_INDEX] * 5 + rows[2].labels[5:])
    return data.Collator(PAD)(rows)


# -------------------------------------------------------------------------- estimators agree


@pytest.fixture
def float64_llama(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `model.double()` really float64: Llama's RMSNorm and eager softmax round to float32.

    With those roundings left in, a float64 model still carries float32 noise (≈1e-7 relative),
    which a finite difference divides by h. vmap and jvp differentiate the same rounded function,
    so they agree either way (≈5e-9 with the roundings, ≈1e-16 without).
    """
    from transformers.models.llama import modeling_llama as ml

    def rms_norm(self: Any, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def eager(
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        scaling: float,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k = ml.repeat_kv(key, module.num_key_value_groups)
        v = ml.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        w = torch.softmax(w, dim=-1)
        return torch.matmul(w, v).transpose(1, 2).contiguous(), w

    monkeypatch.setattr(ml.LlamaRMSNorm, "forward", rms_norm)
    monkeypatch.setattr(ml, "eager_attention_forward", eager)


def all_scores(model: Any, batch: dict[str, torch.Tensor], validation: list[data.Example]) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("vmap", "jvp", "finiteDifference"):
        t = term(validation, name)  # each starts at the same validation cursor: the same g_v
        t.prepare(model)
        out[name] = t.scores(model, batch, logits_dtype=next(model.parameters()).dtype)
    return out


@pytest.mark.parametrize("adaptation", ["full", "promptTuning"])
def test_estimators_agree_float64(tiny_model_dir: Path, float64_llama: None, adaptation: str) -> None:
    torch.manual_seed(0)
    model = load_tiny(tiny_model_dir, attn_implementation="eager")
    if adaptation == "promptTuning":  # logits carry 4 extra leading (virtual) positions
        model = methods.build(
            Adaptation.PROMPT_TUNING, PromptTuningConfig(num_virtual_tokens=4, init=PromptInit.RANDOM)
        ).apply(model, None)
    model = model.double()
    model.train()  # the estimate must switch dropout off itself and restore the mode
    validation = examples(8, 12, seed=7)
    batch = padded_batch()
    s = all_scores(model, batch, validation)
    assert model.training
    scale = float(s["vmap"].abs().max())
    vj = float((s["vmap"] - s["jvp"]).abs().max())
    vf = float((s["vmap"] - s["finiteDifference"]).abs().max())
    print(
        f"\nfloat64 {adaptation} |s|max {scale:.3g}: |vmap−jvp| {vj:.2e}, |vmap−fd| {vf:.2e} "
        f"(h = {rw.finite_difference_step(torch.float64):.2e})"
    )
    assert scale > 0 and s["vmap"].dtype == torch.float64
    assert vj <= 1e-6 and vj <= 1e-6 * scale
    assert vf <= 1e-6 and vf <= 1e-6 * scale
    # the per-row loop (left padding, packing) is the same estimate
    loop = rw.loop_scores(
        model,
        {n: p.detach() for n, p in rw.trainable(model).items()},
        term(validation).validation_gradient(model, rw.trainable(model), batch["input_ids"].device),
        batch,
    )
    assert float((loop - s["vmap"]).abs().max()) <= 1e-6 * scale


def test_estimators_agree_float32_with_lora_and_sdpa(tiny_model_dir: Path) -> None:
    # The real setting: float32, LoRA, sdpa for vmap (jvp switches to eager in prepare).
    torch.manual_seed(0)
    model = methods.build(Adaptation.LORA, LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["all-linear"])).apply(
        load_tiny(tiny_model_dir), None
    )
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    validation = examples(8, 12, seed=7)
    batch = padded_batch()
    vmap_term = term(validation, "vmap")
    vmap_term.prepare(model)
    assert model.config._attn_implementation == "sdpa"
    vmap = vmap_term.scores(model, batch, torch.float32)
    jvp_term = term(validation, "jvp")
    jvp_term.prepare(model)
    assert model.get_base_model().config._attn_implementation == "eager"
    jvp = jvp_term.scores(model, batch, torch.float32)
    fd_term = term(validation, "finiteDifference")
    fd_term.prepare(model)
    fd = fd_term.scores(model, batch, torch.float32)
    scale = float(vmap.abs().max())
    print(
        f"\nfloat32 LoRA |s|max {scale:.3g}: |vmap−jvp| {float((vmap - jvp).abs().max()):.2e}, "
        f"|vmap−fd| {float((vmap - fd).abs().max()):.2e} (h = {rw.finite_difference_step(torch.float32):.2e})"
    )
    assert float((vmap - jvp).abs().max()) <= 1e-5 * max(scale, 1)
    assert float((vmap - fd).abs().max()) <= 1e-2 * scale


def test_left_padding_and_packing_use_the_row_loop(tiny_model_dir: Path) -> None:
    model = load_tiny(tiny_model_dir, attn_implementation="eager")
    validation = examples(8, 12, seed=7)
    right = padded_batch()
    # the same rows, left-padded: vmap cannot trace the mask builder, so rows go one at a time
    n = right["attention_mask"].sum(1)
    left = {
        k: torch.full_like(v, PAD if k == "input_ids" else (0 if k == "attention_mask" else -100))
        for k, v in right.items()
    }
    for b in range(4):
        w = right["input_ids"].shape[1]
        for k in left:
            left[k][b, w - n[b] :] = right[k][b, : n[b]]
        left["labels"][b, w - n[b]] = -100  # a row's first token is never a target, as on the right
    s_right = term(validation, "vmap").scores(model, right)
    s_left = term(validation, "vmap").scores(model, left)
    s_jvp = term(validation, "jvp").scores(model, left)
    assert torch.allclose(s_left, s_jvp, atol=1e-5)
    assert torch.allclose(s_left, s_right, atol=1e-4)  # RoPE is shift-invariant: same rows, same scores
    packed = data.Collator(PAD, packing=True)(data.pack(examples(4, 6, seed=3), 12))
    s_packed = term(validation, "vmap").scores(model, packed)
    assert torch.allclose(s_packed, term(validation, "jvp").scores(model, packed), atol=1e-5)


# -------------------------------------------------------------------------- the weights


def test_alignment_weights() -> None:
    w = rw.alignment_weights(torch.tensor([0.3, -1.0, 0.1, 0.0]))
    assert torch.allclose(w, torch.tensor([0.75, 0.0, 0.25, 0.0], dtype=torch.float64))
    assert torch.equal(rw.alignment_weights(torch.tensor([-1.0, -2.0])), torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.equal(rw.alignment_weights(torch.zeros(4)), torch.full((4,), 0.25, dtype=torch.float64))


def test_weights_nonnegative_sum_to_one_and_loss_is_their_sum(tiny_model_dir: Path) -> None:
    model = load_tiny(tiny_model_dir)
    model.train()
    t = term(examples(16, 12, seed=7), "vmap", max_steps=8, warmup_ratio=0.25, momentum=0.5)
    t.prepare(model)
    pool = examples(12, 10, seed=11)
    collate = data.Collator(PAD)
    rng = random.Random(0)
    for step in range(8):
        batch = collate(rng.sample(pool, 4))
        out = model(**batch)
        loss, metrics = t.combine(out.loss, model, batch, out)
        rec = t.history[-1]
        w = torch.tensor(rec.weights, dtype=torch.float64)
        assert (w >= 0).all() and abs(float(w.sum()) - 1) < 1e-12
        assert rec.warmup == (step < 2)
        if rec.warmup:
            assert torch.allclose(w, torch.full((4,), 0.25, dtype=torch.float64))
        losses = rw.per_example_losses(out.logits, batch["labels"])
        assert torch.allclose(loss, (w.float() * losses).sum())
        assert set(metrics) == {"igbiWeightEntropy", "igbiWeightMax", "igbiZeroShare"}
        assert abs(metrics["igbiWeightMax"] - float(w.max())) < 1e-12
        loss.backward()  # the weights are constants; the graph is the training forward's
        assert model.training
    # eval: the plain loss, untouched
    model.eval()
    batch = collate(pool[:4])
    out = model(**batch)
    assert t.combine(out.loss, model, batch, out) == (out.loss, {})


def test_example_keys_ignore_padding() -> None:
    rows = examples(2, 6, seed=5)
    short = data.Collator(PAD)(rows)
    wide = data.Collator(PAD, pad_to_multiple_of=16)(rows)
    assert rw.example_keys(short) == rw.example_keys(wide)
    assert len(set(rw.example_keys(short))) == 2


# -------------------------------------------------------------------------- clean vs noisy

NOUNS = ["cat", "dog", "bird", "fish", "cow", "fox"]
VERBS = ["sees", "likes", "eats", "chases"]


def clean_text(rng: random.Random, length: int) -> str:
    text = ""
    while len(text) < length:
        text += f"the {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)}. "
    return text[:length]


def clean_examples(tokenizer: Any, n: int, length: int, seed: int) -> list[data.Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = tokenizer(clean_text(rng, length), add_special_tokens=False)["input_ids"]
        out.append(data.Example(ids, list(ids)))
    return out


def noisy_examples(n: int, length: int, seed: int) -> list[data.Example]:
    # uniformly random tokens with uniformly random labels: nothing to learn from them
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (n, length), generator=g).tolist()
    labels = torch.randint(4, 260, (n, length), generator=g).tolist()
    return [data.Example(i, l) for i, l in zip(ids, labels)]


@pytest.mark.slow
def test_clean_examples_get_most_weight(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    length, steps = 24, 20
    clean = clean_examples(tokenizer, 16, length, seed=1)
    noisy = noisy_examples(16, length, seed=2)
    validation = clean_examples(tokenizer, 16, length, seed=3)
    clean_keys = {k for e in clean for k in rw.example_keys(data.Collator(PAD)([e]))}
    torch.manual_seed(0)
    model = load_tiny(tiny_model_dir)
    ctx = Context(
        spec=None,
        tokenizer=tokenizer,
        model_dir=tiny_model_dir,
        validation=validation,
        collate=data.Collator(PAD),
        max_steps=lambda: trainer.state.max_steps,
    )
    t = Reweighting(ReweightingConfig(validation_batch_size=8, warmup_ratio=0.1), ctx)
    t.prepare(model)
    assert t.estimator == "vmap"
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        seed=0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = ObjectiveTrainer(
        model=model,
        args=args,
        train_dataset=clean + noisy,
        data_collator=data.Collator(PAD),
        terms=[(Objective.REWEIGHTING, t)],
    )
    trainer.train()
    after = [s for s in t.history if not s.warmup]
    assert len(t.history) == steps and len(after) == steps - int(0.1 * steps)
    shares = [sum(w for k, w in zip(s.keys, s.weights) if k in clean_keys) for s in after]
    raw = [
        sum(w for k, w in zip(s.keys, rw.alignment_weights(torch.tensor(s.scores)).tolist()) if k in clean_keys)
        for s in after
    ]
    mean_share = sum(shares) / len(shares)
    print(
        f"\nclean share of weight after warmup: {mean_share:.3f} (min {min(shares):.3f}); "
        f"per-step (unsmoothed) {sum(raw) / len(raw):.3f}; clean share of examples 0.5"
    )
    assert mean_share >= 0.8


# -------------------------------------------------------------------------- QLoRA


def qlora_pair(model_dir: Path) -> tuple[Any, Any]:
    """A 4-bit QLoRA model and the same weights dequantised to float32, with equal LoRA tensors."""
    from kubetune.trainer.methods.lora import lora_config
    from kubetune.trainer.methods.targets import Targets
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    cfg = lora_config(
        LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["all-linear"]), Targets(modules=("all-linear",))
    )
    load = lambda: AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=quant,
        dtype=torch.float32,
        use_safetensors=True,
    )
    q = get_peft_model(prepare_model_for_kbit_training(load(), use_gradient_checkpointing=False), cfg)
    torch.manual_seed(0)
    for n, p in q.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # B = 0 at init would zero every A gradient
    d = get_peft_model(load().dequantize(), cfg)
    missing = d.load_state_dict({k: v for k, v in q.state_dict().items() if "lora_" in k}, strict=False)
    assert not missing.unexpected_keys
    return q, d


def test_qlora_auto_uses_finite_difference_and_matches_vmap(tiny_model_dir: Path) -> None:
    q, d = qlora_pair(tiny_model_dir)
    validation = examples(8, 12, seed=7)
    batch = padded_batch()
    auto = term(validation, "auto")
    auto.prepare(q)
    assert auto.estimator == "finiteDifference"
    with pytest.raises(IncompatibleError, match="finiteDifference"):
        term(validation, "vmap").prepare(q)
    with rw.eval_mode(q), rw.eval_mode(d), torch.no_grad():
        assert torch.allclose(q(**batch).logits, d(**batch).logits, atol=1e-5)  # truly the same function
    vmap = term(validation, "vmap")
    vmap.prepare(d)
    s_fd = auto.scores(q, batch, torch.float32)
    s_vmap = vmap.scores(d, batch, torch.float32)
    scale = float(s_vmap.abs().max())
    err = float((s_fd - s_vmap).abs().max())
    print(f"\nQLoRA float32 |s|max {scale:.3g}: |fd(4-bit) − vmap(dequantised)| {err:.2e} ({err / scale:.1e} of max)")
    assert err <= 5e-3 * scale
    sure = s_vmap.abs() > 5e-3 * scale
    assert torch.equal(torch.sign(s_fd[sure]), torch.sign(s_vmap[sure]))
    # the estimate leaves the 4-bit layers as training needs them (no bf16 inference repacking)
    qs = [m.weight.quant_state for m in q.modules() if type(m).__name__ == "Linear4bit"]
    assert qs and not any(getattr(s, "packing_format_for_cpu", False) for s in qs)


# -------------------------------------------------------------------------- cost


def test_cost_per_step_is_printed(tiny_model_dir: Path) -> None:
    batch = data.Collator(PAD)(examples(8, 32, seed=4))
    validation = examples(8, 32, seed=5)
    configs = [None, "vmap", "jvp", "finiteDifference"]
    runs: list[tuple[Any, Any, Any, list[float]]] = []
    for estimator in configs:
        torch.manual_seed(0)
        model = methods.build(
            Adaptation.LORA, LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=["all-linear"])
        ).apply(load_tiny(tiny_model_dir), None)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        t = None
        if estimator:
            t = term(validation, estimator, max_steps=100, warmup_ratio=0.0, validation_batch_size=8)
            t.prepare(model)
        model.train()
        runs.append((model, opt, t, []))

    def step(model: Any, opt: Any, t: Any) -> float:
        start = time.perf_counter()
        out = model(**batch)
        loss = out.loss if t is None else t.combine(out.loss, model, batch, out)[0]
        loss.backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - start

    # Interleaved, so a busy machine slows every configuration alike; the first two rounds pay
    # one-off costs (torch.func tracing, the allocator) and are not counted.
    for i in range(7):
        for model, opt, t, times in runs:
            dt = step(model, opt, t)
            if i >= 2:
                times.append(dt)
    median = [sorted(times)[len(times) // 2] for *_, times in runs]
    line = [f"plain {median[0] * 1e3:.1f} ms"] + [f"{e} {m / median[0]:.2f}×" for e, m in zip(configs[1:], median[1:])]
    print("\nper-step cost, tiny LoRA, batch 8×32, validation 8×32: " + ", ".join(line))
