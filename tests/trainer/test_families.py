"""Every adaptation on twelve model families (issue 15): it trains, or it is refused before the model loads.

The families are tiny random models built from their transformers config and saved as safetensors
with the byte tokenizer (tests/trainer/families.py). The matrix calls the trainer in-process
(`run.run`, what the pod entry point calls) for two optimizer steps per cell, and asserts the
outcome in `EXPECTED`: trained (two steps, a finite loss, the committed output, the adapter
targets in status.effective and in the saved adapter) or refused with the message. README.md
("Model families") shows the same table.

The tests after the matrix pin what the matrix alone would not explain: default targets per
family against peft's own tables, refusals before any weight loads (no match, partial match,
all-linear with other names), Mixtral's fused experts, and the packing allow-list (packed logits
equal each example's logits alone on every allowed family; not on OPT, BLOOM, MPT).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from kubetune.api.spec import DoraConfig, IA3Config, LoraConfig, QLoraConfig
from kubetune.trainer.methods import families as fam_facts
from kubetune.trainer.methods import targets

from tests.trainer import families

pytestmark = pytest.mark.slow

METHODS = [
    "full",
    "layers",
    "transfer",
    "gradualUnfreeze",
    "lora",
    "dora",
    "ia3",
    "prefixTuning",
    "promptTuning",
    "qlora",
]
PEFT_METHODS = {"lora", "dora", "ia3", "qlora"}

# Per family: what the default targets resolve to (lora/dora, ia3, qlora = all-linear written out).
# From peft's tables where it has the family, all-linear where it has none (Phi-3).
LLAMA_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
DEFAULT_TARGETS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "qwen2": (["q_proj", "v_proj"], ["q_proj", "v_proj", "down_proj"], LLAMA_LINEAR),
    "qwen3": (["q_proj", "v_proj"], ["q_proj", "v_proj", "down_proj"], LLAMA_LINEAR),
    "mistral": (["q_proj", "v_proj"], ["k_proj", "v_proj", "down_proj"], LLAMA_LINEAR),
    "gemma": (["q_proj", "v_proj"], ["q_proj", "v_proj", "down_proj"], LLAMA_LINEAR),
    "gemma2": (["q_proj", "v_proj"], ["q_proj", "v_proj", "down_proj"], LLAMA_LINEAR),
    "gemma3": (["q_proj", "v_proj"], ["q_proj", "v_proj", "down_proj"], LLAMA_LINEAR),
    "phi3": (["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],) * 3,
    "gpt2": (["c_attn"], ["c_attn", "mlp.c_proj"], ["c_attn", "c_fc", "c_proj"]),
    "gpt_neox": (
        ["query_key_value"],
        ["query_key_value", "dense_4h_to_h"],
        ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"],
    ),
    "falcon": (
        ["query_key_value"],
        ["query_key_value", "dense_4h_to_h"],
        ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"],
    ),
    "opt": (
        ["q_proj", "v_proj"],
        ["q_proj", "k_proj", "fc2"],
        ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"],
    ),
    # peft's Mixtral IA3 entry names w2, the v4 expert layer: transformers 5 fuses the experts, so k/v only
    "mixtral": (["q_proj", "v_proj"], ["k_proj", "v_proj"], ["k_proj", "o_proj", "q_proj", "v_proj"]),
}

# The outcome of each cell: None trains; a string is the start of the refusal.
EXPECTED: dict[tuple[str, str], str | None] = {(f, m): None for f in families.FAMILIES for m in METHODS}
# transformers' 4-bit conversion skips FalconLinear: refused after load, before base evaluation
EXPECTED[("falcon", "qlora")] = (
    "spec.method.adaptation: qlora: transformers converted none of this falcon model's layers"
)


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def quick_cells() -> Iterator[None]:
    """About a second per cell: one thread (tiny matmuls), the objects alive now frozen out of the
    collector (accelerate runs a full `gc.collect()` per training run, ~1 s over a test session's
    heap), and report.html's matplotlib charts (~2 s, tested in test_evaluation) replaced by a stub."""
    import gc

    from kubetune.trainer import report

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.collect()
    gc.freeze()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "render", lambda data: "<html>report</html>")
        yield
    gc.unfreeze()
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: families.build(name, root / name) for name in families.FAMILIES}


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight short conversations: two steps of batch 4, one held out."""
    path = tmp_path_factory.mktemp("family-data") / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w} {w}."}]}
        for w in ["red", "blue", "green", "gold", "pink", "gray", "teal", "plum", "lime"]
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def job(
    tmp: Path, model_dir: Path, data_path: Path, adaptation: str, block: dict[str, Any] | None = None, **dataset: Any
) -> Any:
    from kubetune.api.manifest import load_job

    method: dict[str, Any] = {"adaptation": adaptation}
    if block is not None:
        method[adaptation] = block
    elif adaptation in ("prefixTuning", "promptTuning"):
        method[adaptation] = {"numVirtualTokens": 4}
    elif adaptation == "gradualUnfreeze":
        method[adaptation] = {"stepsPerStage": 1}
    spec = {
        "model": {"source": str(model_dir)},
        "dataset": {"train": str(data_path), "validationSplit": 0.12, "maxSeqLength": 64, "minExamples": 1, **dataset},
        "method": method,
        "hyperparameters": {"epochs": 1, "batchSize": 4, "maxSteps": 2, "seed": 3, "learningRate": 1e-3},
        "evaluation": {"compareBase": False, "samples": 0},
        "checkpointing": {"everySteps": 100, "keep": 1},
        "output": {"uri": (tmp / "out").as_uri()},
    }
    path = tmp / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "fam"}, "spec": spec}
        )
    )
    return load_job(str(path))


def run_job(j: Any, tmp: Path) -> dict[str, Any]:
    from kubetune.trainer import run as run_mod

    return run_mod.run(j, run_mod.Options(scratch=tmp / "scratch"))


# -------------------------------------------------------------------------------------- matrix


@pytest.mark.parametrize("family", list(families.FAMILIES))
@pytest.mark.parametrize("method", METHODS)
def test_family_method(family: str, method: str, family_dirs: dict[str, Path], chat_data: Path, tmp_path: Path) -> None:
    from kubetune.trainer import run as run_mod

    expected = EXPECTED[(family, method)]
    j = job(tmp_path, family_dirs[family], chat_data, method)
    if expected is not None:
        with pytest.raises(run_mod.UserError) as err:
            run_job(j, tmp_path)
        assert str(err.value).startswith(expected)
        return
    summary = run_job(j, tmp_path)
    assert summary["status"] == "succeeded" and summary["steps"] == 2
    assert torch.isfinite(torch.tensor(summary["metrics"]["trainLoss"]))
    assert summary["trainableParameters"] > 0
    result = tmp_path / "out" / "adapter"
    if method in PEFT_METHODS:
        lora, ia3, qlora = DEFAULT_TARGETS[family]
        want = {"ia3": ia3, "qlora": qlora}.get(method, lora)
        assert summary["effective"]["targetModules"] == want
        saved = json.loads((result / "adapter_config.json").read_text())
        assert sorted(saved["target_modules"]) == sorted(want)
        if method == "qlora" and family == "mixtral":  # all-linear: the fused experts and router too
            assert sorted(saved["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj", "gate.weight"]
            assert saved["lora_dropout"] == 0.0
    elif method in ("prefixTuning", "promptTuning"):
        assert (result / "adapter_config.json").is_file()
    else:
        assert (result / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------- targets


def skeleton(family_dirs: dict[str, Path], family: str) -> Any:
    from transformers import AutoConfig

    return targets.skeleton(AutoConfig.from_pretrained(family_dirs[family]))


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_default_targets_are_peft_tables_kept_to_the_model(family: str, family_dirs: dict[str, Path]) -> None:
    """Unset targetModules: peft's entry for the family (what the model has of it), else all-linear."""
    from peft.utils import constants as c

    model = skeleton(family_dirs, family)
    model_type = model.config.model_type
    leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for block, table, got in [
        ("lora", c.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, targets.resolve("lora", LoraConfig(), model)),
        ("ia3", c.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING, targets.resolve("ia3", IA3Config(), model)),
    ]:
        peft_names = [t for t in table.get(model_type, []) if t.rsplit(".", 1)[-1] in leaves]
        assert list(got.modules) == (peft_names or targets._all_linear(model)), block
        assert got.matched and all(any(m.endswith("." + t) for t in got.modules) for m in got.matched)
    assert list(targets.resolve("dora", DoraConfig(), model).modules) == DEFAULT_TARGETS[family][0]
    assert list(targets.resolve("qlora", QLoraConfig(), model).modules) == DEFAULT_TARGETS[family][2]
    ia3 = targets.resolve("ia3", IA3Config(), model)
    ff = c.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type)
    if ff:  # peft's feed-forward subset, where the model has it
        assert list(ia3.feedforward) == [t for t in ff if t in ia3.modules]
    head = model.get_output_embeddings()
    head_name = next(n for n, m in model.named_modules() if m is head)
    assert head_name not in targets.resolve("lora", LoraConfig(target_modules=["all-linear"]), model).matched


def test_llama_names_on_gpt2_are_refused_before_any_weight_loads(
    family_dirs: dict[str, Path],
    chat_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Why: `[q_proj, v_proj]` on GPT-2 was a 56-line NoMatchingPeftModuleError after model load and
    base evaluation, exit 1 (retried on GPUs). Now: refused from config.json, naming the field and
    GPT-2's names, with the permanent exit code and no traceback."""
    import transformers
    from kubetune.api.contract import PERMANENT_EXIT_CODE
    from kubetune.trainer import __main__ as entry
    from kubetune.trainer import run as run_mod

    def no_load(*a: Any, **k: Any) -> Any:
        raise AssertionError("model weights were loaded before the targets were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    j = job(tmp_path, family_dirs["gpt2"], chat_data, "lora", {"targetModules": ["q_proj", "v_proj"]})
    with pytest.raises(run_mod.UserError) as err:
        run_job(j, tmp_path)
    assert err.value.param == "spec.method.lora.targetModules" and err.value.reason == "InvalidSpec"
    assert str(err.value).startswith(
        "spec.method.lora.targetModules: q_proj, v_proj match no layer of this gpt2 model."
    )
    assert "Its candidates: c_attn, c_fc, c_proj, lm_head, wpe, wte" in str(err.value)
    assert "family default (c_attn)" in str(err.value)

    # the pod's entry point: permanent exit code, the message in the summary, no traceback
    spec_file = tmp_path / "job.yaml"
    code = entry.main(["--spec", str(spec_file), "--termination-path", str(tmp_path / "term"), "--metrics-port", "-1"])
    assert code == PERMANENT_EXIT_CODE
    summary = json.loads((tmp_path / "term").read_text())
    assert summary["param"] == "spec.method.lora.targetModules" and "c_attn" in summary["message"]
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_partial_match_is_refused(family_dirs: dict[str, Path]) -> None:
    """Why: Phi-3 IA3 with Llama's names silently trained down_proj alone."""
    model = skeleton(family_dirs, "phi3")
    with pytest.raises(targets.TargetError) as err:
        targets.resolve(
            "ia3", IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]), model
        )
    assert err.value.param == "spec.method.ia3.targetModules"
    assert str(err.value).startswith(
        "spec.method.ia3.targetModules: k_proj, v_proj match no layer of this phi3 model; only down_proj matches."
    )
    assert "Its candidates: down_proj, gate_up_proj, lm_head, o_proj, qkv_proj" in str(err.value)
    # a module that exists but cannot be wrapped, all-linear mixed with names, feedforward outside the targets
    gpt2 = skeleton(family_dirs, "gpt2")
    with pytest.raises(
        targets.TargetError, match=r"mlp matches no layer of this gpt2 model \(it names GPT2MLP modules"
    ):
        targets.resolve("lora", LoraConfig(target_modules=["mlp"]), gpt2)
    with pytest.raises(targets.TargetError, match="all-linear stands alone"):
        targets.resolve("lora", LoraConfig(target_modules=["all-linear", "c_attn"]), gpt2)
    with pytest.raises(targets.TargetError, match="spec.method.ia3.feedforwardModules: c_fc is not in targetModules"):
        targets.resolve("ia3", IA3Config(target_modules=["c_attn"], feedforward_modules=["c_fc"]), gpt2)


def test_mixtral_all_linear_adapts_fused_experts(family_dirs: dict[str, Path], chat_data: Path, tmp_path: Path) -> None:
    """Why: Mixtral failed all-linear LoRA and QLoRA with `lora.ParamWrapper does not work with
    lora_dropout != 0`. all-linear now adapts attention, router and experts (peft target_parameters)
    without dropout when dropout was left at its default; an explicit dropout, or DoRA, is refused
    before the model loads with what to do."""
    import peft
    from transformers import AutoModelForCausalLM

    model = skeleton(family_dirs, "mixtral")
    got = targets.resolve("lora", LoraConfig(target_modules=["all-linear"]), model)
    assert got.parameters == ("experts.down_proj", "experts.gate_up_proj", "gate.weight") and got.dropout == 0.0
    assert "model.layers.1.mlp.experts.gate_up_proj" in got.matched and "lm_head" not in got.matched
    with pytest.raises(targets.TargetError) as err:
        targets.resolve("lora", LoraConfig(target_modules=["all-linear"], dropout=0.05), model)
    assert err.value.param == "spec.method.lora.dropout" and "set dropout: 0" in str(err.value)
    with pytest.raises(targets.TargetError, match="spec.method.dora.targetModules: mixtral's mixture-of-experts"):
        targets.resolve("dora", DoraConfig(target_modules=["all-linear"]), model)
    # a named expert parameter is a target too
    assert targets.resolve(
        "lora", LoraConfig(target_modules=["q_proj", "experts.down_proj"], dropout=0), model
    ).parameters == ("experts.down_proj",)

    # trains end to end, and the adapter loads in plain peft with the experts adapted
    summary = run_job(
        job(tmp_path, family_dirs["mixtral"], chat_data, "lora", {"r": 4, "targetModules": ["all-linear"]}), tmp_path
    )
    assert summary["effective"]["targetParameters"] == ["experts.down_proj", "experts.gate_up_proj", "gate.weight"]
    assert summary["effective"]["loraDropout"] == 0.0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["hyperparameters"]["targetModules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    loaded = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(family_dirs["mixtral"]), tmp_path / "out" / "adapter"
    )
    trained = {n for n, _ in loaded.named_parameters() if "lora_B" in n}
    assert any(".experts.lora_B" in n for n in trained) and any(".gate.lora_B" in n for n in trained)
    assert any(float(p.abs().max()) > 0 for n, p in loaded.named_parameters() if ".experts.lora_B" in n)


def test_effective_targets_cross_the_metrics_labels() -> None:
    """status.effective gets the targets while the run is young: comma-joined labels, parsed back."""
    from kubetune.api.status import ResolvedHyperparameters
    from kubetune.trainer.metrics import TrainerMetrics

    metrics = TrainerMetrics()
    metrics.set_effective(
        {
            "learningRate": 2e-4,
            "targetModules": ["q_proj", "v_proj"],
            "loraDropout": 0.05,
            "targetParameters": ["x" * 40, "y" * 40],
        }
    )  # too long for a label: left to the summary
    labels = next(s.labels for s in metrics.effective.collect()[0].samples)
    assert labels["target_modules"] == "q_proj,v_proj" and "target_parameters" not in labels
    parsed = ResolvedHyperparameters.model_validate(labels)
    assert parsed.target_modules == ["q_proj", "v_proj"] and parsed.lora_dropout == 0.05


# ------------------------------------------------------------------------------------- packing


def packed_vs_alone(model_dir: Path | None, model: Any = None) -> float:
    """Largest logit difference between three examples packed in one row and each alone."""
    from kubetune.trainer import data
    from transformers import AutoConfig, AutoModelForCausalLM

    if model is None:
        config = AutoConfig.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, attn_implementation=data.packing_attention("cpu", config)
        )
    model.eval()
    data.prepare_model_for_packing(model)
    g = torch.Generator().manual_seed(0)
    examples = [torch.randint(10, 200, (n,), generator=g).tolist() for n in (7, 12, 5)]
    ids = torch.tensor([[t for e in examples for t in e]])
    positions = torch.tensor([[i for e in examples for i in range(len(e))]])
    worst, start = 0.0, 0
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions).logits[0]
        for e in examples:
            alone = model(input_ids=torch.tensor([e])).logits[0]
            worst = max(worst, (packed[start : start + len(e)] - alone).abs().max().item())
            start += len(e)
    return worst


@pytest.mark.parametrize("family", [f for f in families.FAMILIES if f != "opt"])
def test_packing_allowed_families_keep_examples_apart(family: str, family_dirs: dict[str, Path]) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(family_dirs[family])
    fam_facts.check_packing(config)  # allowed
    assert packed_vs_alone(family_dirs[family]) < 1e-5


def test_packing_refused_where_examples_attend_to_each_other(
    family_dirs: dict[str, Path], chat_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why: packing let examples attend to each other on OPT (logits off by 0.37), BLOOM and MPT.
    They are off the allow-list, and a packed run on them is refused before the model loads."""
    import transformers
    from kubetune.trainer import run as run_mod
    from transformers import AutoConfig, AutoModelForCausalLM, BloomConfig, MptConfig

    assert packed_vs_alone(family_dirs["opt"]) > 0.05
    for cfg in (
        BloomConfig(vocab_size=300, hidden_size=32, n_layer=2, n_head=4),
        MptConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4),
    ):
        torch.manual_seed(0)
        assert packed_vs_alone(None, AutoModelForCausalLM.from_config(cfg)) > 1e-3
        with pytest.raises(ValueError, match=f"model type '{cfg.model_type}' does not keep packed examples apart"):
            fam_facts.check_packing(cfg)
    assert set(fam_facts.packing_families()) == {
        "llama",
        *(AutoConfig.from_pretrained(family_dirs[f]).model_type for f in families.FAMILIES if f != "opt"),
    }

    def no_load(*a: Any, **k: Any) -> Any:
        raise AssertionError("model weights were loaded before packing was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    with pytest.raises(run_mod.UserError) as err:
        run_job(job(tmp_path, family_dirs["opt"], chat_data, "lora", packing=True), tmp_path)
    assert err.value.param == "spec.dataset.packing"
    assert str(err.value).startswith("spec.dataset.packing: model type 'opt' does not keep packed examples apart")
