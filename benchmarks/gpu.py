"""Throughput and MFU of kubetune's trainer on one GPU (written for an H200), against plain HF + peft.

Models are random-init Llamas of real shapes (weights do not change the speed), written once as
safetensors and loaded by both sides the way a real base model is:

    0.5b  hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, vocab 151936, tied embeddings
          (the shape of Qwen2.5-0.5B)                                              ≈ 0.49 B params
    8b    hidden 4096, 32 layers, 32 heads / 8 KV heads, MLP 14336, vocab 128256
          (the shape of Llama-3.1-8B)                                               ≈ 8.0 B params

Runs: LoRA r16 α32 on every linear layer, bf16, maxSeqLength 2048; kubetune packs (first-fit
into 2048-token rows, block-diagonal attention), the baseline is `trainer_vs_hf.hf_baseline`
(imported: one copy of the baseline) padding each batch to its longest example. Also kubetune
full fine-tuning of 0.5b, and QLoRA of 8b when bitsandbytes works on this GPU. Each run is a fresh
process (`trainer_vs_hf.spawn`), so peak GPU memory (`torch.cuda.max_memory_allocated`) is its own.

Model FLOPs per useful (non-pad) token, after PaLM (Chowdhery et al. 2022, appendix B):

    F = c·N + 6·N_trainable_extra + 12·L·H·Q·T

    N  parameters that take part in a matmul per token: every linear weight of the blocks plus the
       output head (the input embedding is a lookup; with tied embeddings the head is counted once)
    c  = 6 for full fine-tuning (forward 2N, backward 2N for activations + 2N for weight grads),
       = 4 for frozen-base methods (LoRA, QLoRA: no weight gradients for the base)
    N_trainable_extra  the adapter's parameters (LoRA A and B), which do get weight gradients
    12·L·H·Q·T  attention scores and mix (QKᵀ and A·V, 2·T·Q each per head, forward + 2× backward),
       L layers, H query heads, Q head dim, T the row length attention runs over: 2048 for packed
       rows, the mean padded width for the baseline. No discount for the causal mask (as PaLM).

    MFU = F · useful tokens/s / peak, peak = 989 TFLOPS (H200 / H100 SXM dense bf16).

    python benchmarks/gpu.py                # on a GPU: 0.5b and 8b; appends to RESULTS.md
    python benchmarks/gpu.py --smoke        # CPU, tiny model, seconds: checks the script; never appends

Memory (issue 22, as benchmarks/trainer_memory.py on CPU): on the 8b shape kubetune LoRA with
packing off and hf+peft LoRA run identical batches; peak GPU memory ratio, useful tokens/s ratio,
loss delta at step 10, and the memory model's prediction (kubetune.api.memory with the 8b shape)
against kubetune's measured peak (target ±25 %) → `RESULT gpu_memory_8b`. `--smoke` runs the same
comparison on the tiny CPU shape and prints its table rows only.

The `RESULT gpu_lora_8b` line is printed only after a real GPU run of the 8b shape; `--smoke` prints
`RESULT gpu_smoke` instead.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import RESULTS, publish
from trainer_memory import compare as compare_memory
from trainer_vs_hf import Setup, make_chat_dataset, spawn

PEAK_TFLOPS = 989.0  # H200 (= H100 SXM) dense bf16
TARGET_MFU = 0.40
TARGET_RATIO = 1.5

SHAPES: dict[str, dict[str, Any]] = {
    # name: LlamaConfig fields
    "smoke": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=False,
    ),
    "0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}


def build_model(shape: str, directory: Path) -> Path:
    """A random-init Llama of `shape` in bf16 safetensors (built on the GPU when there is one)."""
    import torch
    from kubetune.trainer.builtin import byte_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    if (directory / "config.json").exists():
        return directory
    tok = byte_tokenizer()
    config = LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=4096,
        rope_theta=500000.0,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    assert config.vocab_size >= len(tok)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return directory


def matmul_parameters(shape: str) -> int:
    """N of the FLOPs formula: every linear weight of the blocks plus the output head."""
    c = SHAPES[shape]
    h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    q = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * q
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * i  # q, k, v, o, gate, up, down
    return layers * per_layer + c["vocab_size"] * h


def lora_parameters(shape: str, r: int) -> int:
    c = SHAPES[shape]
    h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    pairs = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # (in, out) of each linear
    return layers * sum(r * (a + b) for a, b in pairs)


def flops_per_token(shape: str, adaptation: str, r: int, t: float) -> float:
    c = SHAPES[shape]
    n = matmul_parameters(shape)
    layers, heads = c["num_hidden_layers"], c["num_attention_heads"]
    q = c["hidden_size"] // heads
    attention = 12 * layers * heads * q * t
    if adaptation == "full":
        return 6 * n + attention
    return 4 * n + 6 * lora_parameters(shape, r) + attention


def table_row(x: dict[str, Any]) -> str:
    ratio = f"{x['ratio']:.2f}" if x["ratio"] is not None else "—"
    return (
        f"| {x['shape']} | {x['run']} | {x['tokens_per_s']:.0f} | {x['ms_per_step']:.0f} | {x['padding_efficiency']:.2f} | "
        f"{x['flops_per_token'] / 1e9:.2f} | {100 * x['mfu']:.1f} % | {ratio} | {x['peak_gpu_gb']:.1f} |"
    )


def bnb_cuda() -> bool:
    try:
        import bitsandbytes as bnb
        import torch

        if not torch.cuda.is_available():
            return False
        x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
        q, state = bnb.functional.quantize_4bit(x, quant_type="nf4")
        return bool(torch.isfinite(bnb.functional.dequantize_4bit(q, state)).all())
    except Exception:  # no wheel, no CUDA library for this GPU: QLoRA is skipped, and said so
        return False


def memory_runs(
    shape: str,
    model_dir: Path,
    train: Path,
    validation: Path,
    work: Path,
    batch: int,
    max_seq: int,
    gpu: bool,
    steps: int = 12,
    loss_step: int = 10,
) -> tuple[list[str], dict[str, Any]]:
    """kubetune (packing off) vs hf+peft LoRA on identical batches: peak, tokens/s, loss; the
    memory model's prediction against kubetune's measured peak."""
    from kubetune.api.estimate import gpu_workload
    from kubetune.api.memory import GIB, breakdown

    runs: dict[str, list[dict[str, Any]]] = {"hf": [], "ours": []}
    for side in ("hf", "ours"):
        s = Setup(
            model_dir=str(model_dir),
            train=str(train),
            validation=str(validation),
            out=str(work / f"mem-{shape}-{side}"),
            steps=steps,
            warmup=2,
            batch=batch,
            max_seq=max_seq,
            lr=2e-4,
            r=16,
            alpha=32,
            dropout=0.05,
            precision="bf16" if gpu else "fp32",
            threads=min(8, os.cpu_count() or 1),
            packing=False,
            adaptation="lora",
            extra={"gpu": gpu},
        )
        runs[side].append(spawn(side, s, timeout=1800))
    c = compare_memory(runs, min(loss_step, steps))
    cfg = SHAPES[shape]
    parameters = matmul_parameters(shape) + (
        0 if cfg["tie_word_embeddings"] else cfg["vocab_size"] * cfg["hidden_size"]
    )
    workload = gpu_workload(
        parameters,
        "lora",
        max_seq,
        batch,
        False,
        cfg["hidden_size"],
        cfg["num_hidden_layers"],
        cfg["vocab_size"],
        intermediate_size=cfg["intermediate_size"],
    )
    predicted = breakdown(workload).total / GIB
    measured = c["ours_peak"] if c["peak_key"] == "peak_gpu_gb" else c["ours_peak"] / 1024
    c.update(
        predicted_gb=predicted,
        measured_gb=measured,
        prediction_ratio=predicted / measured if measured else float("nan"),
    )
    lines = [
        f"Memory, {shape} LoRA, packing off, batch {batch} × {max_seq}, identical batches ({c['peak_key']}): "
        f"peak ours/hf {c['peak_ratio']:.3f} (target ≤ 0.6), useful tokens/s ours/hf {c['tokens_ratio']:.3f} (target ≥ 1.0), "
        f"loss |Δ| at step {min(loss_step, steps)} {c['loss_delta']:.2e} (target ≤ 1e-4); memory model {predicted:.1f} GiB predicted "
        f"vs {measured:.1f} measured ({c['prediction_ratio']:.2f}×, target 0.75–1.25).",
        "",
    ]
    return lines, c


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--smoke", action="store_true", help="CPU, tiny model, a few steps; prints RESULT gpu_smoke, never appends"
    )
    p.add_argument("--shapes", nargs="+", default=["0.5b", "8b"], choices=[s for s in SHAPES if s != "smoke"])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2, help="alternations of kubetune and the baseline per shape")
    p.add_argument(
        "--batch", type=json.loads, default={"0.5b": 8, "8b": 2, "smoke": 2}, help="rows per step per shape, JSON"
    )
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-seq", type=int, default=2048)
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS)
    p.add_argument("--workdir", type=Path, help="where models and data are written (default: a temporary folder)")
    p.add_argument("--results", type=Path, help="append here instead of benchmarks/RESULTS.md (GPU runs only)")
    args = p.parse_args()

    import torch

    gpu = torch.cuda.is_available()
    if args.smoke:
        args.shapes, args.steps, args.warmup, args.rounds, args.max_seq = ["smoke"], 4, 1, 1, 256
    elif not gpu:
        print("no CUDA device: run with --smoke on CPU, or on a GPU machine", file=sys.stderr)
        return 2
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    device = torch.cuda.get_device_name(0) if gpu else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kubetune-gpu-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        train, validation = work / "train.jsonl", work / "validation.jsonl"
        scale = 4.0 if not args.smoke else 0.25  # median example ≈ 1000 tokens at 2048
        examples = 200 if args.smoke else 6000
        lengths = make_chat_dataset(train, examples, 42, args.max_seq, scale)
        make_chat_dataset(validation, 8, 43, args.max_seq, scale)
        for shape in args.shapes:
            model_dir = build_model(shape, work / f"model-{shape}")
            runs: list[tuple[str, str, str]] = [("kubetune lora", "ours", "lora"), ("hf+peft lora", "hf", "lora")]
            if shape == "0.5b":
                runs.append(("kubetune full", "ours", "full"))
            if shape == "8b" and bnb_cuda():
                runs.append(("kubetune qlora", "ours", "qlora"))
            results: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in runs}
            for r in range(args.rounds):
                for name, side, adaptation in runs if r % 2 == 0 else list(reversed(runs)):
                    if adaptation != "lora" and r > 0:
                        continue  # one run is enough for the extra methods
                    s = Setup(
                        model_dir=str(model_dir),
                        train=str(train),
                        validation=str(validation),
                        out=str(work / f"out-{shape}-{name.replace(' ', '-')}-{r}"),
                        steps=args.steps,
                        warmup=args.warmup,
                        batch=args.batch.get(shape, 2),
                        grad_accum=args.grad_accum,
                        max_seq=args.max_seq,
                        lr=2e-4 if adaptation != "full" else 2e-5,
                        r=16,
                        alpha=32,
                        dropout=0.05,
                        precision="bf16" if gpu else "fp32",
                        threads=min(8, os.cpu_count() or 1),
                        packing=side == "ours",
                        adaptation=adaptation,
                        extra={"gpu": gpu},
                    )
                    res = spawn(side, s, timeout=1800)
                    results[name].append(res)
                    print(
                        f"  {shape} {name:15s} round {r + 1}: {res['ms_per_step']:8.1f} ms/step {res['useful_tokens_per_s']:9.0f} useful tok/s "
                        f"peak {res.get('peak_gpu_gb', 0):.1f} GiB",
                        file=sys.stderr,
                    )
            for name, side, adaptation in runs:
                rs = results[name]
                tps = statistics.median(x["useful_tokens_per_s"] for x in rs)
                width = args.max_seq if side == "ours" else statistics.median(x["mean_row_length"] for x in rs)
                f = flops_per_token(shape, adaptation, 16, width)
                rows.append(
                    {
                        "shape": shape,
                        "run": name,
                        "adaptation": adaptation,
                        "tokens_per_s": tps,
                        "ms_per_step": statistics.median(x["ms_per_step"] for x in rs),
                        "padding_efficiency": statistics.median(x["padding_efficiency"] for x in rs),
                        "mfu": f * tps / (args.peak_tflops * 1e12),
                        "flops_per_token": f,
                        "width": width,
                        "peak_gpu_gb": max(x.get("peak_gpu_gb", 0.0) for x in rs),
                        "peak_rss_gb": max(x["peak_rss_mb"] for x in rs) / 1024,
                    }
                )
            base = next(x for x in rows if x["shape"] == shape and x["run"] == "hf+peft lora")
            for x in rows:
                if x["shape"] == shape:
                    x["ratio"] = x["tokens_per_s"] / base["tokens_per_s"] if x["adaptation"] == "lora" else None

        memory_shape = "8b" if "8b" in args.shapes else (args.shapes[0] if args.smoke else None)
        memory: dict[str, Any] | None = None
        memory_lines: list[str] = []
        if memory_shape is not None:
            memory_lines, memory = memory_runs(
                memory_shape,
                work / f"model-{memory_shape}",
                train,
                validation,
                work,
                args.batch.get(memory_shape, 2),
                args.max_seq,
                gpu,
                steps=4 if args.smoke else 12,
                loss_step=3 if args.smoke else 10,
            )
            print("  " + memory_lines[0], file=sys.stderr)

    import peft
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
    lines = [
        f"### gpu — {date}",
        "",
        f"{device}; {versions}; LoRA r16 α32 all-linear, {'bf16' if gpu else 'fp32 (CPU smoke)'}, maxSeqLength {args.max_seq}, {args.steps} steps "
        f"(first {args.warmup} untimed) × {args.rounds} alternating rounds, medians; {len(lengths)} chat examples "
        f"(tokens p50 {statistics.median(lengths):.0f}); kubetune packs, the baseline pads; MFU = (c·N + 6·N_lora + 12·L·H·Q·T) × "
        f"useful tokens/s / {args.peak_tflops:g} TFLOPS (c = 4 frozen base, 6 full; see benchmarks/README.md).",
        "",
        "| shape | run | useful tokens/s | ms/step | padding eff. | GFLOP/token | MFU | × baseline | peak GPU GiB |",
        "|---|---|---|---|---|---|---|---|---|",
        *[table_row(x) for x in rows],
        "",
    ]
    if gpu and not any(x["adaptation"] == "qlora" for x in rows) and "8b" in args.shapes:
        lines.insert(-1, "QLoRA skipped: bitsandbytes has no working CUDA backend in this environment.")
    ours = {x["shape"]: x for x in rows if x["run"] == "kubetune lora"}
    if "8b" in ours and gpu and not args.smoke:
        x = ours["8b"]
        lines.append(
            f"- 8b LoRA: MFU {100 * x['mfu']:.1f} % (target ≥ {100 * TARGET_MFU:.0f} %: {'met' if x['mfu'] >= TARGET_MFU else '**MISSED**'}), "
            f"{x['ratio']:.2f}× the baseline (target ≥ {TARGET_RATIO}×: {'met' if x['ratio'] >= TARGET_RATIO else '**MISSED**'})"
        )
        lines.append("")
        result = f"RESULT gpu_lora_8b mfu={x['mfu']:.3f} tokens_per_s={x['tokens_per_s']:.0f} baseline_ratio={x['ratio']:.3f} peak_gpu_gb={x['peak_gpu_gb']:.1f} date={date}"
    else:
        x = next(iter(ours.values()))
        result = (
            f"RESULT gpu_smoke shape={x['shape']} mfu={x['mfu']:.3e} tokens_per_s={x['tokens_per_s']:.0f} "
            f"baseline_ratio={x['ratio']:.3f} runs={len(rows)} device={'cuda' if gpu else 'cpu'} date={date}"
        )
    lines += memory_lines
    if memory is not None and gpu and not args.smoke and memory_shape == "8b":
        result += (
            f"\nRESULT gpu_memory_8b peak_ratio={memory['peak_ratio']:.3f} tokens_ratio={memory['tokens_ratio']:.3f} "
            f"loss_delta={memory['loss_delta']:.2e} predicted_gb={memory['predicted_gb']:.1f} measured_gb={memory['measured_gb']:.1f} "
            f"prediction_ratio={memory['prediction_ratio']:.2f} date={date}"
        )
    publish(lines, result, args.results or RESULTS if gpu and not args.smoke else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
