"""Memory and speed of kubetune's trainer against plain transformers + peft at a 128k vocabulary.

The largest tensor in LLM fine-tuning is the logits: 2 048 tokens × 128k vocabulary × 4 bytes is
1 GiB per sequence, and plain cross-entropy holds three of those (logits, log-softmax, gradient).
kubetune's trainer projects no full logits (kubetune.trainer.chunked: fused linear cross-entropy
over label rows, a chunk at a time). This benchmark shows what that buys on a model where the
logits dominate: a tiny-depth random-init Llama (2 layers, hidden 512) with a Llama-3-sized
vocabulary (128 256 rows), LoRA r8 on every linear layer, fp32, AdamW, batch 1, examples near
`maxSeqLength` 2 048 (chat, log-normal turns; loss on the assistant turns only).

Both sides are trainer_vs_hf's (`hf_baseline`: `Trainer.train()` on a peft model, the model's own
loss; `kubetune_trainer`: `kubetune.trainer.run.run` on a FineTuneJob, packing off so both sides
see identical batches), each in a fresh subprocess with 2 threads, alternated `--rounds` times.

Numbers: peak RSS of each process (ru_maxrss: the whole process — Python, torch, the model —
as a pod's memory limit sees it; and the part above the RSS after loading, i.e. what training
adds), useful tokens/s after `--warmup` steps, and the training loss at `--loss-step` (identical
batches, same seed: must agree within 1e-4). On a GPU (benchmarks/gpu.py) the peak is
`torch.cuda.max_memory_allocated`.

    python benchmarks/trainer_memory.py            # the recorded run (~5-10 min on 2 CPU cores), appends RESULTS.md
    python benchmarks/trainer_memory.py --smoke    # tiny sizes, RESULTS.md untouched
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import RESULTS, publish
from trainer_vs_hf import ROOT, Setup, environment, hf_baseline, kubetune_trainer, make_chat_dataset

TARGET_PEAK_RATIO = 0.6
TARGET_TOKENS_RATIO = 1.0
LOSS_TOLERANCE = 1e-4


def build_model(directory: Path, vocab: int, hidden: int, layers: int, heads: int, intermediate: int, seq: int) -> Path:
    """A random-init Llama with a big vocabulary and the byte tokenizer (ids < 260 are used)."""
    import torch
    from kubetune.trainer.builtin import byte_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max(4096, seq),
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    return directory


def child(side: str, s: Setup) -> dict[str, Any]:
    """One side in this process; RSS after imports and model load is sampled at the first step."""
    import logging
    import resource

    import torch

    logging.disable(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.set_num_threads(s.threads)
    loaded: dict[str, float] = {}

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def on_step(step: int) -> None:
        if step == 1:
            loaded["hwm"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # The RSS with the model loaded, before any forward: a hook on the first forward.
    import transformers

    original = transformers.LlamaForCausalLM.forward

    @functools.wraps(original)  # the Trainer reads the forward's signature
    def first_forward(self: Any, *a: Any, **kw: Any) -> Any:
        loaded.setdefault("before_training", rss_mb())
        return original(self, *a, **kw)

    transformers.LlamaForCausalLM.forward = first_forward  # type: ignore[method-assign]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    out = hf_baseline(s, on_step) if side == "hf" else kubetune_trainer(s, on_step)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["loaded_rss_mb"] = loaded.get("before_training", 0.0)
    if torch.cuda.is_available():
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    out["side"] = side
    out["load"] = os.getloadavg()[0]
    return out


def spawn(side: str, s: Setup, timeout: float = 1800) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--setup", json.dumps(asdict(s))]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("CHILD ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{side} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("CHILD ") :])


def compare(runs: dict[str, list[dict[str, Any]]], loss_step: int) -> dict[str, float]:
    """Ratios ours/hf of the medians, and the worst loss difference at `loss_step`."""
    med = {
        side: {
            k: statistics.median(r.get(k, 0.0) for r in rs)
            for k in ("peak_rss_mb", "loaded_rss_mb", "useful_tokens_per_s", "ms_per_step")
        }
        for side, rs in runs.items()
    }
    peak_key = "peak_gpu_gb" if all("peak_gpu_gb" in r for rs in runs.values() for r in rs) else "peak_rss_mb"
    peak = {side: statistics.median(r[peak_key] for r in rs) for side, rs in runs.items()}
    deltas = [abs(o["losses"][str(loss_step)] - h["losses"][str(loss_step)]) for o, h in zip(runs["ours"], runs["hf"])]
    added = {side: med[side]["peak_rss_mb"] - med[side]["loaded_rss_mb"] for side in med}
    return {
        "peak_ratio": peak["ours"] / peak["hf"],
        "added_ratio": added["ours"] / max(added["hf"], 1e-9),
        "tokens_ratio": med["ours"]["useful_tokens_per_s"] / med["hf"]["useful_tokens_per_s"],
        "loss_delta": max(deltas),
        "peak_key": peak_key,  # type: ignore[dict-item]
        **{f"{side}_{k}": v for side, m in med.items() for k, v in m.items()},
        **{f"{side}_peak": v for side, v in peak.items()},
        **{f"{side}_added_mb": v for side, v in added.items()},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--loss-step", type=int, default=10)
    p.add_argument("--vocab", type=int, default=128_256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--max-seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--scale", type=float, default=4.0, help="multiplies every median turn length (long examples)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes; RESULTS.md untouched unless --results")
    p.add_argument("--results", type=Path)
    p.add_argument("--child", choices=["hf", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--setup", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("CHILD " + json.dumps(child(args.child, Setup(**json.loads(args.setup)))), flush=True)
        return 0
    if args.smoke:
        args.rounds, args.steps, args.warmup, args.loss_step = 1, 4, 1, 3
        args.vocab, args.hidden, args.intermediate, args.max_seq, args.scale = 8192, 64, 128, 256, 0.5
    args.loss_step = min(args.loss_step, args.steps)
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    with tempfile.TemporaryDirectory(prefix="trainer-memory-") as tmp:
        tmpdir = Path(tmp)
        model_dir = build_model(
            tmpdir / "model", args.vocab, args.hidden, args.layers, args.heads, args.intermediate, args.max_seq
        )
        base = Setup(
            model_dir=str(model_dir), steps=args.steps, warmup=args.warmup, max_seq=args.max_seq, batch=args.batch
        )
        base.train, base.validation = str(tmpdir / "train.jsonl"), str(tmpdir / "validation.jsonl")
        lengths = make_chat_dataset(
            Path(base.train), max(60, args.steps * args.batch * 2), base.seed, base.max_seq, args.scale
        )
        make_chat_dataset(Path(base.validation), 4, base.seed + 1, base.max_seq, args.scale)
        runs: dict[str, list[dict[str, Any]]] = {"hf": [], "ours": []}
        for r in range(args.rounds):
            for side in ("hf", "ours") if r % 2 == 0 else ("ours", "hf"):
                res = spawn(side, Setup(**{**asdict(base), "out": str(tmpdir / f"{side}-{r}")}))
                runs[side].append(res)
                print(
                    f"  round {r + 1} {side:5s} {res['ms_per_step']:9.1f} ms/step {res['useful_tokens_per_s']:7.0f} useful tok/s "
                    f"peak rss {res['peak_rss_mb']:.0f} MB (loaded {res['loaded_rss_mb']:.0f}) load {res['load']:.1f}",
                    file=sys.stderr,
                )
    c = compare(runs, args.loss_step)

    def verdict(ok: bool) -> str:
        return "met" if ok else "**MISSED**"

    unit = "GiB (torch.cuda.max_memory_allocated)" if c["peak_key"] == "peak_gpu_gb" else "MB (peak RSS of the process)"
    row_len = statistics.mean(r["mean_row_length"] for rs in runs.values() for r in rs)
    lines = [
        f"### trainer_memory — {date}",
        "",
        f"{environment()}; 2 threads; random-init Llama, vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, "
        f"LoRA r{base.r} all-linear, fp32, AdamW, batch {args.batch}, maxSeqLength {args.max_seq} (mean row {row_len:.0f} tokens, "
        f"{len(lengths)} chat examples, loss on assistant turns); {args.steps} steps, first {args.warmup} untimed; "
        f"{args.rounds} alternating rounds, medians; each side in a fresh process; packing off on both sides (identical batches).",
        "",
        f"| side | peak {unit} | RSS loaded, MB | added by training, MB | ms/step | useful tokens/s |",
        "|---|---|---|---|---|---|",
        *[
            f"| {side} | {c[f'{side}_peak']:.2f} | {c[f'{side}_loaded_rss_mb']:.0f} | {c[f'{side}_added_mb']:.0f} | "
            f"{c[f'{side}_ms_per_step']:.0f} | {c[f'{side}_useful_tokens_per_s']:.0f} |"
            for side in ("hf", "ours")
        ],
        "",
        f"- peak memory ours/HF: **{c['peak_ratio']:.3f}×** (target ≤ {TARGET_PEAK_RATIO}: {verdict(c['peak_ratio'] <= TARGET_PEAK_RATIO)}); "
        f"memory added by training ours/HF {c['added_ratio']:.3f}×",
        f"- useful tokens/s ours/HF: **{c['tokens_ratio']:.3f}×** (target ≥ {TARGET_TOKENS_RATIO}: {verdict(c['tokens_ratio'] >= TARGET_TOKENS_RATIO)})",
        f"- loss at step {args.loss_step}: max |Δ| {c['loss_delta']:.2e} (≤ {LOSS_TOLERANCE}: {verdict(c['loss_delta'] <= LOSS_TOLERANCE)})",
        "",
    ]
    result = (
        f"RESULT trainer_memory peak_ratio={c['peak_ratio']:.3f} tokens_ratio={c['tokens_ratio']:.3f} loss_delta={c['loss_delta']:.2e} "
        f"added_ratio={c['added_ratio']:.3f} peak_hf={c['hf_peak']:.2f} peak_ours={c['ours_peak']:.2f} vocab={args.vocab} "
        f"seq={args.max_seq} rounds={args.rounds} date={date}"
    )
    publish(lines, result, args.results or (None if args.smoke else RESULTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
