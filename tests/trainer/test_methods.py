"""Each adaptation trains exactly what it should (tiny models, CPU).

One matrix row per adaptation (METHODS.md, "Adaptations") checks the shared contract:
mechanism — the tensors that change after training are exactly the trainable ones, every base
tensor outside the method's set is `torch.equal` to before, the trainable count equals the
method's formula; effect — the loss falls on a memorisable toy batch. The tests after the matrix
prove what is particular to one method (index parsing, eval-mode backbone, unfreezing schedule
through the HF Trainer, soft-prompt shapes and initialisation).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from kubetune.api import Adaptation
from kubetune.api.enums import LayerModule, PromptInit
from kubetune.api.spec import (
    DoraConfig,
    GradualUnfreezeConfig,
    IA3Config,
    LayersConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    QLoraConfig,
    TransferConfig,
)
from kubetune.trainer import methods

from tests.fixtures.models import load_tiny, tiny_model_dir  # noqa: F401

ALL_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
ADAPTER_MARKERS = ("lora_", "ia3_")
MIN_LOSS_DROP = 0.3  # nats: the PEFT rows train a few vectors on a random base with a frozen head


# ----------------------------------------------------------------------------------- helpers


def toy_batch(vocab: int = 200, seed: int = 0) -> dict[str, torch.Tensor]:
    # Four sequences, each a random 6-token motif repeated: memorisable, and learnable by copying.
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (4, 6), generator=g).repeat(1, 4)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def train(model: Any, steps: int = 30, lr: float = 1e-2) -> list[float]:
    # The optimizer holds *every* parameter with weight decay on, as a careless caller would:
    # frozen tensors must still not move, which holds only while their grads stay None
    # (requires_grad off, zero_grad(set_to_none=True)); zeroed grads would let decay move them.
    batch = toy_batch()
    opt = torch.optim.AdamW(list(model.parameters()), lr=lr, weight_decay=0.1)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def snapshot(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def params(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def base_view(model: Any) -> dict[str, torch.Tensor]:
    """The base model's state dict under its original names, whatever peft wrapped around it."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {
        k.replace(".base_layer", ""): v.detach().clone()
        for k, v in inner.state_dict().items()
        if not any(m in k for m in ADAPTER_MARKERS)
    }


def linears(model: Any, leaf_names: set[str]) -> list[Any]:
    return [
        m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in leaf_names
    ]


def numel_under(model: Any, *prefixes: str) -> int:
    # Parameters only, each counted once (tied keys name one tensor).
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))


def write_model(directory: Path, tokenizer_dir: Path, arch: str = "llama", **overrides: Any) -> Path:
    """A variant of the tiny Llama (same tokenizer), saved so every row loads the same way."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM, OlmoConfig, OlmoForCausalLM

    cfg = AutoConfig.from_pretrained(tokenizer_dir)
    cls: type[Any]
    if arch == "olmo":
        keep = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "pad_token_id",
        )
        cfg, cls = (
            OlmoConfig(**{k: getattr(cfg, k) for k in keep}, eos_token_id=None, bos_token_id=None),
            OlmoForCausalLM,
        )
    else:
        cls = LlamaForCausalLM
    for k, v in overrides.items():
        setattr(cfg, k, v)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = cls(cfg)
    model.save_pretrained(directory, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tiny: the 2-block builtin; tied: the same with tied embeddings; deep: 12 blocks, so that
    `layers.1` could be confused with `layers.10`/`layers.11`; scaled: weights drawn at 5× the
    usual scale. At the usual 0.02 a random model's attention is uniform and its logits ≈ 0, and a
    soft prompt, which acts only through attention, cannot move the loss by more than ≈ 0.15
    nats (measured) however long it trains; at 0.1 it can, as on a pretrained model."""
    root = tmp_path_factory.mktemp("method-models")
    return {
        "tiny": tiny_model_dir,
        "tied": write_model(root / "tied", tiny_model_dir, tie_word_embeddings=True),
        "deep": write_model(root / "deep", tiny_model_dir, num_hidden_layers=12),
        "scaled": write_model(root / "scaled", tiny_model_dir, initializer_range=0.1),
        "olmo": write_model(root / "olmo", tiny_model_dir, arch="olmo"),
    }


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny matmuls: one thread is as fast, and immune to oversubscription on a busy 2-core box.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# ------------------------------------------------------------------------------------ matrix


def under(*prefixes: str) -> Callable[[list[str]], set[str]]:
    return lambda keys: {k for k in keys if k.startswith(prefixes)}


def nothing(keys: list[str]) -> set[str]:
    return set()


def everything(keys: list[str]) -> set[str]:
    return set(keys)


def lora_count(model: Any, r: int, names: set[str]) -> int:
    """Σ r·(in + out) over the adapted linear layers (A is r×in, B is out×r)."""
    return sum(r * (m.in_features + m.out_features) for m in linears(model, names))


def dora_count(model: Any, r: int, names: set[str]) -> int:
    """LoRA + one magnitude per output unit of each adapted layer."""
    return lora_count(model, r, names) + sum(m.out_features for m in linears(model, names))


def ia3_count(model: Any, targets: set[str], feedforward: set[str]) -> int:
    """One scale per output unit of k/v, one per input unit of the feed-forward targets."""
    return sum(
        m.in_features if n.rsplit(".", 1)[-1] in feedforward else m.out_features
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets
    )


def prefix_count(model: Any, k: int) -> int:
    """k virtual tokens × L layers × (key, value) × the KV width: with GQA peft sizes the prefix
    by num_key_value_heads·head_dim, not hidden_size (that is what the cache holds)."""
    c = model.config
    return k * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim


def prefix_projection_count(model: Any, k: int) -> int:
    """Li & Liang's reparametrisation: k×t embeddings, then t→h→2·L·t through a tanh MLP, where t
    is the KV width and h (peft's encoder_hidden_size) defaults to t."""
    c = model.config
    t = h = c.num_key_value_heads * c.head_dim
    out = c.num_hidden_layers * 2 * t
    return k * t + (t * h + h) + (h * out + out)


@dataclass(frozen=True)
class Case:
    id: str
    adaptation: Adaptation
    config: Any
    trains: Callable[[list[str]], set[str]]  # base state-dict keys that must change; all others equal
    count: Callable[[Any], int]  # the trainable count formula, evaluated on a fresh base model
    model: str = "tiny"
    steps: int = 30
    lr: float = 1e-2
    at_init: str | None = None  # "equal" / "close": the adapted model computes the base function
    mergeable: bool = False  # merge_and_unload computes what the adapter computes


QV = {"q_proj", "v_proj"}
CASES = [
    Case("full", Adaptation.FULL, None, everything, lambda m: sum(p.numel() for p in m.parameters()), lr=3e-3),
    Case(
        "layers-last-block",
        Adaptation.LAYERS,
        LayersConfig(),
        under("model.layers.1."),
        lambda m: numel_under(m, "model.layers.1."),
        lr=3e-3,
    ),
    # layers.1 must not match layers.10 / layers.11
    Case(
        "layers-index-1-of-12",
        Adaptation.LAYERS,
        LayersConfig(indices=[1]),
        under("model.layers.1."),
        lambda m: numel_under(m, "model.layers.1."),
        model="deep",
        lr=3e-3,
    ),
    # negative index: -2 of 2 blocks is block 0; kinds: attention only
    Case(
        "layers-negative-attention",
        Adaptation.LAYERS,
        LayersConfig(indices=[-2], modules=[LayerModule.ATTENTION]),
        under("model.layers.0.self_attn."),
        lambda m: numel_under(m, "model.layers.0.self_attn."),
        lr=3e-3,
    ),
    Case(
        "layers-norm-embeddings-head",
        Adaptation.LAYERS,
        LayersConfig(indices=[0], modules=[LayerModule.NORM, LayerModule.EMBEDDINGS, LayerModule.HEAD]),
        under(
            "model.layers.0.input_layernorm.",
            "model.layers.0.post_attention_layernorm.",
            "model.embed_tokens.",
            "lm_head.",
        ),
        lambda m: numel_under(
            m,
            "model.layers.0.input_layernorm.",
            "model.layers.0.post_attention_layernorm.",
            "model.embed_tokens.",
            "lm_head.",
        ),
        lr=3e-3,
    ),
    # tied embeddings: "head" is embed_tokens (one tensor, two state-dict keys)
    Case(
        "layers-tied-head",
        Adaptation.LAYERS,
        LayersConfig(modules=[LayerModule.HEAD]),
        under("model.embed_tokens.", "lm_head."),
        lambda m: m.get_input_embeddings().weight.numel(),
        model="tied",
        lr=3e-3,
    ),
    Case(
        "transfer-head",
        Adaptation.TRANSFER,
        TransferConfig(),
        under("lm_head.", "model.norm."),
        lambda m: m.lm_head.weight.numel() + m.model.norm.weight.numel(),
        lr=3e-3,
    ),
    Case(
        "transfer-top-1",
        Adaptation.TRANSFER,
        TransferConfig(top_layers=1),
        under("lm_head.", "model.norm.", "model.layers.1."),
        lambda m: (
            m.lm_head.weight.numel()
            + m.model.norm.weight.numel()
            + sum(p.numel() for p in m.model.layers[1].parameters())
        ),
        lr=3e-3,
    ),
    # tied embeddings: the probe's head is untied from the (frozen) input embeddings
    Case(
        "transfer-tied",
        Adaptation.TRANSFER,
        TransferConfig(),
        under("lm_head.", "model.norm."),
        lambda m: m.lm_head.weight.numel() + m.model.norm.weight.numel(),
        model="tied",
        lr=3e-3,
    ),
    # stage 0 of the schedule (no Trainer callbacks here): head + final norm
    Case(
        "gradual-unfreeze-stage-0",
        Adaptation.GRADUAL_UNFREEZE,
        GradualUnfreezeConfig(steps_per_stage=2, discriminative_factor=2.6),
        under("lm_head.", "model.norm."),
        lambda m: m.lm_head.weight.numel() + m.model.norm.weight.numel(),
        lr=3e-3,
    ),
    Case(
        "lora-qv",
        Adaptation.LORA,
        LoraConfig(r=4, alpha=8, dropout=0.0),
        nothing,
        lambda m: lora_count(m, 4, QV),
        steps=60,
        at_init="equal",
        mergeable=True,
    ),
    Case(
        "lora-all-linear",
        Adaptation.LORA,
        LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["all-linear"]),
        nothing,
        lambda m: lora_count(m, 4, ALL_LINEAR),
        at_init="equal",
        mergeable=True,
    ),
    Case(
        "qlora",
        Adaptation.QLORA,
        QLoraConfig(r=4, alpha=8, dropout=0.0),
        nothing,
        lambda m: lora_count(m, 4, ALL_LINEAR),
        lr=3e-2,
    ),
    Case(
        "dora",
        Adaptation.DORA,
        DoraConfig(r=4, alpha=8, dropout=0.0),
        nothing,
        lambda m: dora_count(m, 4, QV),
        steps=60,
        at_init="close",
        mergeable=True,
    ),
    Case(
        "ia3",
        Adaptation.IA3,
        IA3Config(),
        nothing,
        lambda m: ia3_count(m, {"k_proj", "v_proj", "down_proj"}, {"down_proj"}),
        steps=60,
        lr=0.3,
        at_init="equal",
        mergeable=True,
    ),
    Case(
        "prefix-tuning",
        Adaptation.PREFIX_TUNING,
        PrefixTuningConfig(num_virtual_tokens=8),
        nothing,
        lambda m: prefix_count(m, 8),
        steps=40,
        lr=0.3,
    ),
    Case(
        "prefix-tuning-projection",
        Adaptation.PREFIX_TUNING,
        PrefixTuningConfig(num_virtual_tokens=8, projection=True),
        nothing,
        lambda m: prefix_projection_count(m, 8),
        steps=40,
        lr=3e-2,
    ),
    Case(
        "prompt-tuning",
        Adaptation.PROMPT_TUNING,
        PromptTuningConfig(num_virtual_tokens=8),
        nothing,
        lambda m: 8 * m.config.hidden_size,
        model="scaled",
        steps=40,
        lr=3e-2,
    ),
]


def test_registry_keys_equal_the_api_enum() -> None:
    assert set(methods.REGISTRY) == set(Adaptation)


def test_every_adaptation_has_a_matrix_row() -> None:
    assert {c.adaptation for c in CASES} == set(Adaptation)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_adaptation(case: Case, model_dirs: dict[str, Path], tokenizer: Any) -> None:
    torch.manual_seed(0)  # sampleVocab draws its rows from the global generator
    adaptation = methods.build(case.adaptation, case.config)
    load_kwargs = adaptation.load_kwargs("cpu")
    base = load_tiny(model_dirs[case.model], **load_kwargs)
    before = snapshot(base)
    batch = toy_batch()
    if case.at_init or case.mergeable:
        base.eval()
        with torch.no_grad():
            base_logits = base(**batch).logits

    model = adaptation.apply(base, tokenizer)

    # The trainable count equals the method's formula (a fresh base: apply may wrap in place).
    trainable, total = methods.count_parameters(model)
    assert trainable == case.count(load_tiny(model_dirs[case.model], **load_kwargs))
    assert trainable == total if case.adaptation == Adaptation.FULL else 0 < trainable < total

    if case.at_init:
        model.eval()
        with torch.no_grad():
            logits = model(**batch).logits
        if case.at_init == "equal":
            assert torch.equal(logits, base_logits)
        else:
            torch.testing.assert_close(logits, base_logits, rtol=0, atol=1e-5)

    start = params(model)
    losses = train(model, steps=case.steps, lr=case.lr)
    assert losses[-1] <= losses[0] - MIN_LOSS_DROP, losses

    # Mechanism 1: what changed is exactly what is trainable.
    end = params(model)
    changed = {n for n in end if not torch.equal(start[n], end[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}

    # Mechanism 2: in the base model's own names, exactly the method's set changed.
    after = base_view(model)
    assert set(after) == set(before)
    changed_base = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed_base == case.trains(list(before))

    if case.mergeable:
        model.eval()
        with torch.no_grad():
            adapted = model(**batch).logits
            merged = copy.deepcopy(model).merge_and_unload()(**batch).logits
        torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)
        assert not torch.equal(adapted, base_logits)


def test_qlora_evaluation_keeps_the_training_path(tiny_model_dir: Path) -> None:
    # bitsandbytes repacks 4-bit layers for an inference-only CPU kernel on their first eval-mode,
    # no-grad forward (AVX512-BF16 hosts); LoRA gradients through the frozen layers must not
    # depend on whether an evaluation ran before (compareBase) or during training.
    batch = toy_batch()

    def evaluate(model: Any) -> None:
        model.eval()
        with torch.no_grad():
            model(**batch)

    def lora_grads(eval_before: bool, eval_after: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)  # the same LoRA init in every variant
        adaptation = methods.build(Adaptation.QLORA, QLoraConfig(r=4, alpha=8, dropout=0.0))
        model = load_tiny(tiny_model_dir, **adaptation.load_kwargs("cpu"))
        if eval_before:
            evaluate(model)
        model = adaptation.apply(model, None)
        if eval_after:
            evaluate(model)
        for n, p in model.named_parameters():
            if "lora_B" in n:  # B = 0 would leave the earlier layers' adapters without a gradient
                torch.nn.init.normal_(p, std=0.1)
        model.train()
        model(**batch).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    reference = lora_grads(False, False)
    assert reference
    during = lora_grads(False, True)
    assert all(torch.equal(reference[n], during[n]) for n in reference)
    # An evaluation before `apply` already rounded the block scales through bf16: close, not equal.
    before = lora_grads(True, False)
    for n, g in reference.items():
        assert float((before[n] - g).norm()) <= 1e-2 * float(g.norm()), n


# -------------------------------------------------------------------------------- layers


def test_layers_errors_name_the_field(model_dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"spec\.method\.layers.*out of range"):
        methods.build(Adaptation.LAYERS, LayersConfig(indices=[2])).apply(load_tiny(model_dirs["tiny"]), None)
    # OLMo's layer norms have no parameters: asking for norms alone selects nothing.
    with pytest.raises(ValueError, match=r"spec\.method\.layers"):
        methods.build(Adaptation.LAYERS, LayersConfig(indices=[0], modules=[LayerModule.NORM])).apply(
            load_tiny(model_dirs["olmo"]), None
        )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.3.self_attn.q_proj.weight", "attention"),  # Llama, Mistral, Qwen
        ("model.layers.3.self_attn.q_norm.weight", "attention"),  # a norm inside attention (Qwen3)
        ("model.layers.3.post_attention_layernorm.weight", "norm"),
        ("model.layers.3.block_sparse_moe.experts.0.w1.weight", "mlp"),  # Mixtral
        ("transformer.h.3.attn.c_attn.weight", "attention"),  # GPT-2
        ("transformer.h.3.mlp.c_fc.weight", "mlp"),
        ("transformer.h.3.ln_2.weight", "norm"),
        ("gpt_neox.layers.3.attention.query_key_value.weight", "attention"),
        ("transformer.h.3.self_attention.query_key_value.weight", "attention"),  # Falcon, BLOOM
        ("model.decoder.layers.3.self_attn_layer_norm.weight", "norm"),  # OPT
        ("model.decoder.layers.3.fc1.weight", "mlp"),
    ],
)
def test_block_parts_are_named_across_families(name: str, expected: str) -> None:
    from kubetune.trainer.methods import _groups

    assert _groups.block_index(name) == 3
    assert _groups.kind(name, None) == expected


def test_learned_positions_count_as_embeddings() -> None:
    from kubetune.trainer.methods import _groups
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    kinds = {n: _groups.kind(n, model) for n, _ in model.named_parameters() if _groups.block_index(n) is None}
    assert kinds == {
        "transformer.wte.weight": "embeddings+head",
        "transformer.wpe.weight": "embeddings",
        "transformer.ln_f.weight": "final_norm",
        "transformer.ln_f.bias": "final_norm",
    }


# ------------------------------------------------------------------------------ transfer


@pytest.mark.parametrize(("model_kind", "top"), [("tiny", 0), ("tiny", 1), ("tied", 0)])
def test_transfer_backbone_is_frozen_in_eval_mode(
    model_dirs: dict[str, Path], model_kind: str, top: int, tmp_path: Path
) -> None:
    # Attention dropout on, so a backbone that ran in train mode would not reproduce its features.
    model = load_tiny(model_dirs[model_kind], attention_dropout=0.5)
    n = model.config.num_hidden_layers
    backbone_out = model.model.layers[n - top - 1]  # the last frozen block
    captured: list[torch.Tensor] = []
    backbone_out.register_forward_hook(
        lambda mod, args, out: captured.append((out[0] if isinstance(out, tuple) else out).detach().clone())
    )
    batch = toy_batch()

    model.eval()
    with torch.no_grad():
        model(**batch)
    method = methods.build(Adaptation.TRANSFER, TransferConfig(top_layers=top))
    model = method.apply(model, None)
    model.train()
    frozen = [m for m in model.modules() if list(m.parameters()) and not any(p.requires_grad for p in m.parameters())]
    assert frozen and not any(m.training for m in frozen)
    assert all(not layer.training for layer in model.model.layers[: n - top])
    assert all(layer.training for layer in model.model.layers[n - top :])
    train(model, steps=5, lr=1e-2)
    model.train()
    with torch.no_grad():
        model(**batch)
    assert torch.equal(captured[0], captured[-1])
    # Saved and reloaded, the trained head and the frozen embeddings stay two tensors.
    method.save(model, tmp_path, merged=False, base_dir=model_dirs[model_kind])
    reloaded = load_tiny(tmp_path)
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert not torch.equal(reloaded.lm_head.weight, reloaded.model.embed_tokens.weight)


# ---------------------------------------------------------------------- gradual unfreezing


def run_trainer(model: Any, method: Any, tmp: Path, lr: float, recorder: Any, **args: Any) -> Any:
    from transformers import Trainer, TrainingArguments

    batch = toy_batch()
    dataset = [{k: v[i].tolist() for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]
    targs = TrainingArguments(
        output_dir=str(tmp),
        per_device_train_batch_size=2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        **args,
    )
    opt = torch.optim.AdamW(method.param_groups(lr, 0.0), lr=lr)
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=dataset,
        optimizers=(opt, None),
        callbacks=[*method.callbacks(), recorder],
    )
    trainer.train()
    return trainer


def group_state(groups: list[list[Any]]) -> list[list[torch.Tensor]]:
    return [[p.detach().clone() for p in g] for g in groups]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def every_tensor_changed(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(not torch.equal(x, y) for x, y in zip(a, b))


class Recorder:
    """At each step's start (after the stage callback ran): requires_grad per group, the weights,
    and the optimizer's per-group learning rates."""

    def __init__(self, method: Any) -> None:
        from transformers import TrainerCallback

        outer = self
        self.method = method
        self.pattern: list[list[bool]] = []
        self.weights: list[list[list[torch.Tensor]]] = []
        self.lrs: list[list[float]] = []
        self.grads: list[list[bool]] = []

        class _CB(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
                outer.pattern.append([all(p.requires_grad for p in g) for g in method.groups])
                outer.weights.append(group_state(method.groups))
                outer.lrs.append([g["lr"] for g in optimizer.param_groups])

            def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                outer.grads.append([all(p.grad is not None for p in g) for g in method.groups])

            def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                outer.weights.append(group_state(method.groups))

        self.callback = _CB()


def test_gradual_unfreeze_through_the_trainer(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    model = load_tiny(model_dirs["tiny"])
    method: Any = methods.build(
        Adaptation.GRADUAL_UNFREEZE, GradualUnfreezeConfig(steps_per_stage=2, discriminative_factor=2.6)
    )
    model = method.apply(model, None)
    n = model.config.num_hidden_layers
    names = {id(p): k for k, p in model.named_parameters()}
    # G0 = head + final norm, G1 = last block, …, G_n = first block, G_{n+1} = embeddings.
    assert [sorted(names[id(p)] for p in g) for g in method.groups] == [
        ["lm_head.weight", "model.norm.weight"],
        *[sorted(k for k in names.values() if k.startswith(f"model.layers.{i}.")) for i in reversed(range(n))],
        ["model.embed_tokens.weight"],
    ]
    stages = len(method.groups)
    lr = 1e-2
    rec = Recorder(method)
    run_trainer(model, method, tmp_path, lr, rec.callback, max_steps=2 * stages)

    assert len(rec.pattern) == 2 * stages
    for step, pattern in enumerate(rec.pattern):
        k = step // 2
        assert pattern == [g <= k for g in range(stages)], step
        assert rec.grads[step] == pattern, step  # frozen groups get no grad (so no decay either)
    initial = rec.weights[0]
    for k in range(stages):
        begin, end = rec.weights[2 * k], rec.weights[2 * k + 2]
        for g in range(k + 1, stages):  # not yet unfrozen: bit-identical to the start
            assert same(end[g], initial[g]), (k, g)
        assert every_tensor_changed(begin[k], end[k]), k  # the newly unfrozen group moves in its stage

    # Discriminative rates lr, lr/2.6, lr/2.6², … survive the scheduler (checked after it decayed).
    assert rec.lrs[0] == pytest.approx([lr / 2.6**g for g in range(stages)])
    late = rec.lrs[5]
    assert late[0] < lr
    assert [x / late[0] for x in late] == pytest.approx([1 / 2.6**g for g in range(stages)])


def test_gradual_unfreeze_one_stage_per_epoch(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    model = load_tiny(model_dirs["tied"])
    method: Any = methods.build(Adaptation.GRADUAL_UNFREEZE, GradualUnfreezeConfig())
    model = method.apply(model, None)
    stages = len(method.groups)
    assert stages == model.config.num_hidden_layers + 1  # tied: the embeddings are in G0 with the head
    rec = Recorder(method)
    # 4 examples, batch 2: two steps per epoch; one more epoch than stages (the last stays at all).
    run_trainer(model, method, tmp_path, 1e-3, rec.callback, num_train_epochs=stages + 1)
    assert len(rec.pattern) == 2 * (stages + 1)
    for step, pattern in enumerate(rec.pattern):
        k = min(step // 2, stages - 1)
        assert pattern == [g <= k for g in range(stages)], step
    for k in range(stages):
        assert every_tensor_changed(rec.weights[2 * k][k], rec.weights[2 * k + 2][k]), k
        for g in range(k + 1, stages):
            assert same(rec.weights[2 * k + 2][g], rec.weights[0][g]), (k, g)


# -------------------------------------------------------------------- prompt-based methods


def test_prefix_tuning_logits_have_the_input_length(model_dirs: dict[str, Path]) -> None:
    model = methods.build(Adaptation.PREFIX_TUNING, PrefixTuningConfig(num_virtual_tokens=8)).apply(
        load_tiny(model_dirs["tiny"]), None
    )
    batch = toy_batch()
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    # The prefix lives in the attention cache, not the sequence.
    assert out.logits.shape[:2] == batch["input_ids"].shape
    generated = model.generate(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=3, do_sample=False
    )
    assert generated.shape == (4, batch["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("adaptation", [Adaptation.PREFIX_TUNING, Adaptation.PROMPT_TUNING])
def test_prompt_learning_generation_matches_the_forward(
    adaptation: Adaptation, model_dirs: dict[str, Path], tokenizer: Any
) -> None:
    """peft 0.21 reads the KV cache as `past_key_values`, transformers 5.24's generate passes it as
    `cache`: prefix tuning then generated from the base model (its prefix dropped) and prompt tuning
    prepended its virtual tokens again at every step (tokens after the first off by 0.03-0.07).
    With methods.prefix_tuning.fix_generation every generated token's logits are the adapted
    forward's on the same sequence, and differ from the base's."""
    from kubetune.trainer.methods import prefix_tuning

    config = (PrefixTuningConfig if adaptation == Adaptation.PREFIX_TUNING else PromptTuningConfig)(
        num_virtual_tokens=4
    )
    model = methods.build(adaptation, config).apply(load_tiny(model_dirs["tiny"]), tokenizer)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.add_(torch.randn_like(p, generator=torch.Generator().manual_seed(0)))
    model.eval()
    ids = toy_batch()["input_ids"][:1]
    with torch.no_grad():
        out = prefix_tuning.fix_generation(model).generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=3,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        forward = model(input_ids=out.sequences[:, :-1]).logits[0, -3:]
        with model.disable_adapter():
            base = model(input_ids=ids).logits[0, -1]
    steps = torch.stack([logits[0] for logits in out.logits])
    assert torch.allclose(steps, forward, atol=1e-4)
    assert (steps[0] - base).abs().max() > 1e-2
    assert prefix_tuning.fix_generation(model) is model  # idempotent


def test_prompt_tuning_sample_vocab(model_dirs: dict[str, Path], tokenizer: Any) -> None:
    from kubetune.trainer.run import evaluate

    k = 8
    base = load_tiny(model_dirs["tiny"])
    vocab = base.get_input_embeddings().weight.detach().clone()
    model = methods.build(Adaptation.PROMPT_TUNING, PromptTuningConfig(num_virtual_tokens=k)).apply(base, tokenizer)
    prompt = model.prompt_encoder["default"].embedding.weight.detach()
    assert prompt.shape == (k, base.config.hidden_size)
    for row in prompt:  # every prompt row is some vocabulary row
        assert (vocab == row).all(dim=1).any()

    batch = toy_batch()
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    length = batch["input_ids"].shape[1]
    assert out.logits.shape[:2] == (4, length + k)  # k virtual positions in front
    # The trainer's evaluate() drops them by slicing the last labels.shape[1] positions. peft's
    # own loss pads the labels with k × -100 instead, and so also scores the first real token
    # (predicted from the last virtual one); masking that token, the two must agree.
    examples = [{"input_ids": batch["input_ids"][i].tolist(), "labels": batch["labels"][i].tolist()} for i in range(4)]

    def collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([r["input_ids"] for r in rows])
        return {
            "input_ids": ids,
            "labels": torch.tensor([r["labels"] for r in rows]),
            "attention_mask": torch.ones_like(ids),
        }

    labels = batch["labels"].clone()
    labels[:, 0] = -100
    with torch.no_grad():
        reference = float(model(**{**batch, "labels": labels}).loss)
    assert evaluate(model, examples, collate, batch_size=4)["loss"] == pytest.approx(reference, rel=1e-5)
    generated = model.generate(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=3, do_sample=False
    )
    assert generated.shape == (4, length + 3)


def test_prompt_tuning_text_init(model_dirs: dict[str, Path], tokenizer: Any) -> None:
    k, text = 7, "hi!"
    base = load_tiny(model_dirs["tiny"])
    vocab = base.get_input_embeddings().weight.detach().clone()
    cfg = PromptTuningConfig(num_virtual_tokens=k, init=PromptInit.TEXT, init_text=text)
    model = methods.build(Adaptation.PROMPT_TUNING, cfg).apply(base, tokenizer)
    ids = tokenizer(text)["input_ids"]
    ids = (ids * math.ceil(k / len(ids)))[:k]  # repeated, then cut, to k tokens
    assert torch.equal(model.prompt_encoder["default"].embedding.weight.detach(), vocab[ids])
