"""kubetune's trainer against a plain `transformers.Trainer` + `peft` script doing the same work.

Both sides fine-tune the same random-init Llama (`builtin://small-llama`: 4 layers, hidden 256,
built from a `LlamaConfig` with a fixed seed) with LoRA r8 on every linear layer, in fp32, with
AdamW, the same seed, learning rate, schedule and batch, on the same chat examples (log-normal
turn lengths, generated with a seed) tokenised by the same byte-level tokenizer. Each side runs in
a fresh subprocess (so its peak RSS is its own) with `torch.set_num_threads(2)`; the sides are
alternated `--rounds` times and medians are reported.

Sides:
- `hf`          the plain baseline: `datasets.Dataset`, `DataCollatorForSeq2Seq` (pad to the longest
                example in the batch), HF's default optimizer (AdamW), `Trainer.train()`.
- `ours`        `kubetune.trainer.run.run(job)` on a FineTuneJob, `spec.dataset.packing: false`.
- `ours-packed` the same with `packing: true` (first-fit packing into `maxSeqLength` rows,
                positions restarting per example, block-diagonal attention).

Numbers: steps/s and useful (non-pad) tokens/s over the steps after `--warmup` (step boundaries
as the Trainer's `on_step_end` sees them; data collation, forward, backward, optimizer and every
callback are inside, model loading, evaluation and saving are not); framework overhead =
ours ms/step − HF ms/step on identical batches (no packing); peak RSS of each side's process.

Correctness, checked on every run:
- both sides tokenise every example to identical ids and labels;
- without packing both sides see the same batches in the same order (same seed, same dataset
  length, same right-padding collation), so the training losses must agree within 1e-4 at the
  fixed step `--loss-step`;
- with packing, the logits of each example inside a packed batch (the trainer's `data.pack` +
  `Collator(packing=True)` + `prepare_model_for_packing`) equal its logits run alone within 1e-5.

    python benchmarks/trainer_vs_hf.py             # full: < 10 min on 2 CPU cores, appends RESULTS.md
    python benchmarks/trainer_vs_hf.py --smoke     # ~1 min; RESULTS.md untouched unless --results
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
from report import RESULTS, publish

IGNORE_INDEX = -100
TARGET_TOKENS_RATIO = 1.5  # ours (packed) / HF useful tokens per second
TARGET_OVERHEAD_MS = 2.0  # ours (unpacked) ms/step − HF ms/step
LOSS_TOLERANCE = 1e-4
LOGITS_TOLERANCE = 1e-5


@dataclass
class Setup:
    """Everything both sides share; passed to each child process as JSON."""

    model_dir: str = ""
    train: str = ""
    validation: str = ""
    out: str = ""
    steps: int = 40
    warmup: int = 3
    batch: int = 8
    grad_accum: int = 1
    max_seq: int = 1024
    lr: float = 2e-4
    seed: int = 42
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    precision: str = "fp32"  # fp32 | bf16
    adaptation: str = "lora"  # lora | qlora | full (kubetune side only; the baseline is LoRA)
    threads: int = 2
    packing: bool = False
    gradient_checkpointing: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------ data


def make_chat_dataset(path: Path, n: int, seed: int, max_tokens: int, scale: float = 1.0) -> list[int]:
    """Chat JSONL with log-normal turn lengths (characters = byte tokens); returns token lengths.

    1–3 user/assistant turns (60/30/10 %), a system prompt half the time; median user turn 80
    bytes, assistant 200, σ 0.9 in log space — a long-tailed shape like public SFT sets. Examples
    that would exceed `max_tokens` after the chat template are redrawn, so nothing is truncated.
    """
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 9))) for _ in range(3000)]

    def text(median: float) -> str:
        target = max(4, int(rng.lognormvariate(math.log(median * scale), 0.9)))
        out: list[str] = []
        size = 0
        while size < target:
            w = rng.choice(words)
            out.append(w)
            size += len(w) + 1
        return " ".join(out)[:target].strip() or "ok"

    lengths = []
    with path.open("w") as f:
        while len(lengths) < n:
            messages = []
            if rng.random() < 0.5:
                messages.append({"role": "system", "content": text(40)})
            for _ in range(rng.choices((1, 2, 3), (0.6, 0.3, 0.1))[0]):
                messages.append({"role": "user", "content": text(80)})
                messages.append({"role": "assistant", "content": text(200)})
            # ChatML: "<|im_start|>" + role + "\n" + content + "<|im_end|>" + "\n" per message
            tokens = sum(1 + len(m["role"]) + 1 + len(m["content"].encode()) + 1 + 1 for m in messages)
            if tokens > max_tokens:
                continue
            lengths.append(tokens)
            f.write(json.dumps({"messages": messages}) + "\n")
    return lengths


# ------------------------------------------------------------------------------ the plain HF + peft baseline


def hf_encode(messages: list[dict], tokenizer: Any) -> dict[str, list[int]]:
    """ChatML, tokenised message by message; loss on assistant content and its <|im_end|>.

    What a hand-written SFT script does; `trainer_vs_hf` checks that it gives exactly the ids and
    labels of kubetune's data layer.
    """
    ids: list[int] = []
    labels: list[int] = []

    def enc(s: str) -> list[int]:
        return list(tokenizer(s, add_special_tokens=False)["input_ids"])

    for m in messages:
        head, body, tail = enc(f"<|im_start|>{m['role']}\n"), enc(m["content"] + "<|im_end|>"), enc("\n")
        learn = m["role"] == "assistant" and m.get("weight", 1) != 0
        ids += head + body + tail
        labels += (
            [IGNORE_INDEX] * len(head) + (body if learn else [IGNORE_INDEX] * len(body)) + [IGNORE_INDEX] * len(tail)
        )
    return {"input_ids": ids, "labels": labels}


class _Timer:
    """Step-end wall times (perf_counter), and the useful/padded tokens of each collated batch."""

    def __init__(self) -> None:
        self.step_end: dict[int, float] = {}
        self.step_cpu: dict[int, float] = {}  # process CPU seconds (all threads) at each step end
        self.batch_tokens: list[int] = []
        self.batch_slots: list[int] = []
        self.batch_width: list[int] = []

    def record_batch(self, features: list[Any], batch: dict[str, Any]) -> None:
        self.batch_tokens.append(sum(len(f["input_ids"] if isinstance(f, dict) else f.input_ids) for f in features))
        self.batch_slots.append(int(batch["input_ids"].numel()))
        self.batch_width.append(int(batch["input_ids"].shape[-1]))

    def stats(self, s: Setup) -> dict[str, Any]:
        """Rates over steps warmup+1 … last; step k consumed the k-th collated batch(es)."""
        steps = sorted(self.step_end)
        first, last = s.warmup, steps[-1]
        elapsed = self.step_end[last] - self.step_end[first]
        ga = s.grad_accum
        tokens = sum(self.batch_tokens[first * ga : last * ga])
        slots = sum(self.batch_slots[first * ga : last * ga])
        n = last - first
        intervals = [self.step_end[k] - self.step_end[k - 1] for k in steps if k - 1 in self.step_end and k > first]
        return {
            "timed_steps": n,
            "steps_per_s": n / elapsed,
            "ms_per_step": 1000 * elapsed / n,
            "median_ms_per_step": 1000 * statistics.median(intervals),
            "useful_tokens_per_s": tokens / elapsed,
            "padding_efficiency": tokens / max(slots, 1),
            "mean_row_length": statistics.mean(self.batch_width[first * ga : last * ga] or [0]),
            "examples_tokens": tokens,
            "intervals_ms": {
                k: 1000 * (self.step_end[k] - self.step_end[k - 1])
                for k in steps
                if k - 1 in self.step_end and k > first
            },
            "cpu_intervals_ms": {
                k: 1000 * (self.step_cpu[k] - self.step_cpu[k - 1])
                for k in steps
                if k - 1 in self.step_cpu and k > first
            },
        }


def hf_baseline(s: Setup, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Fine-tune `s.model_dir` on `s.train` with a plain Trainer + peft script; returns timings."""
    import datasets
    import torch
    from kubetune.trainer.builtin import byte_tokenizer
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    tokenizer = byte_tokenizer()
    rows = [
        hf_encode(json.loads(line)["messages"], tokenizer)
        for line in Path(s.train).read_text().splitlines()
        if line.strip()
    ]
    dataset = datasets.Dataset.from_list(rows)
    bf16 = s.precision == "bf16"
    cuda = torch.cuda.is_available()
    torch.manual_seed(s.seed)
    kwargs: dict[str, Any] = {}
    if cuda:
        kwargs["device_map"] = {"": 0}
        if bf16:
            kwargs["dtype"] = torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(s.model_dir, **kwargs)
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules="all-linear"
    )
    model = get_peft_model(model, lora)
    timer = _Timer()
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")

    def collate(features: list[dict]) -> dict:
        batch = pad(features)
        timer.record_batch(features, batch)
        return batch

    class StepTimes(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            timer.step_end[state.global_step] = time.perf_counter()
            timer.step_cpu[state.global_step] = time.process_time()
            if on_step:
                on_step(state.global_step)

    losses: dict[int, float] = {}

    class Losses(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                losses[state.global_step] = float(logs["loss"])

    args = TrainingArguments(
        output_dir=s.out,
        max_steps=s.steps,
        learning_rate=s.lr,
        per_device_train_batch_size=s.batch,
        gradient_accumulation_steps=s.grad_accum,
        warmup_steps=0.03,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=s.seed,
        data_seed=s.seed,
        bf16=bf16,
        gradient_checkpointing=s.gradient_checkpointing,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=not cuda,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[StepTimes(), Losses()]
    )
    trainer.train()
    return {
        **timer.stats(s),
        "losses": losses,
        "optimizer": str(getattr(args.optim, "value", args.optim)),
        "trainable": _trainable(model),
    }


def _trainable(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------ kubetune's trainer


def job_document(s: Setup, name: str = "bench") -> dict[str, Any]:
    source = s.model_dir if "://" in s.model_dir else Path(s.model_dir).as_uri()
    method: dict[str, Any] = {"adaptation": s.adaptation}
    if s.adaptation in ("lora", "qlora"):
        method[s.adaptation] = {"r": s.r, "alpha": s.alpha, "dropout": s.dropout, "targetModules": ["all-linear"]}
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": source},
            "dataset": {
                "train": s.train,
                "validation": s.validation,
                "format": "chat",
                "maxSeqLength": s.max_seq,
                "packing": s.packing,
            },
            "method": method,
            "hyperparameters": {
                "epochs": 1000,  # maxSteps ends the run
                "maxSteps": s.steps,
                "learningRate": s.lr,
                "batchSize": s.batch,
                "gradientAccumulation": s.grad_accum,
                "warmupRatio": 0.03,
                "scheduler": "cosine",
                "seed": s.seed,
                "precision": s.precision,
                "gradientCheckpointing": s.gradient_checkpointing,
            },
            "output": {"uri": Path(s.out).as_uri()},
            "resources": {"gpus": 1 if s.extra.get("gpu") else 0},
            "checkpointing": {"everySteps": 1_000_000, "keep": 1},
            "evaluation": {"compareBase": False},
        },
    }


def kubetune_trainer(s: Setup, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run the FineTuneJob through `kubetune.trainer.run.run`, as the pod entrypoint does."""
    from kubetune.api import parse_manifest
    from kubetune.trainer import run as run_module
    from kubetune.trainer.callbacks import TokenCounter

    timer = _Timer()

    class RecordingCounter(TokenCounter):  # the trainer's own collation path, observed
        def __call__(self, features: list[Any]) -> dict[str, Any]:
            batch = super().__call__(features)
            timer.record_batch(features, batch)
            return batch

    def progress(p: dict[str, Any]) -> None:
        timer.step_end[p["step"]] = time.perf_counter()
        timer.step_cpu[p["step"]] = time.process_time()
        if on_step:
            on_step(p["step"])

    job, problems = parse_manifest(job_document(s))
    assert job is not None, problems
    run_module.TokenCounter = RecordingCounter  # type: ignore[misc]
    try:
        summary = run_module.run(
            job, run_module.Options(output=Path(s.out).as_uri(), on_progress=progress, on_status=lambda _m: None)
        )
    finally:
        run_module.TokenCounter = TokenCounter  # type: ignore[misc]
    log = json.loads((Path(s.out) / "adapter" / "training_log.json").read_text())
    losses = {int(step): float(loss) for step, loss in log["losses"]}
    return {
        **timer.stats(s),
        "losses": losses,
        "optimizer": "adamw (kubetune)",
        "trainable": summary["trainableParameters"],
    }


# ------------------------------------------------------------------------------ one side in a child process


def child(side: str, s: Setup) -> dict[str, Any]:
    import logging
    import resource

    import torch

    logging.disable(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.set_num_threads(s.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    if side == "hf":
        out = hf_baseline(s)
    else:
        out = kubetune_trainer(s)
    out["wall_s"] = time.perf_counter() - started
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if torch.cuda.is_available():
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    out["side"] = side
    out["load"] = max(load_before, os.getloadavg()[0])  # 1-min load average: > 2 means other work shared the 2 cores
    return out


def spawn(side: str, s: Setup, timeout: float = 900) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--setup", json.dumps(asdict(s))]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("CHILD ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{side} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("CHILD ") :])


# ------------------------------------------------------------------------------ correctness checks


def tokenization_identical(s: Setup) -> bool:
    """The baseline's hand-written ChatML encoding equals kubetune's data layer on every example."""
    from kubetune.api.enums import DatasetFormat
    from kubetune.trainer import data
    from kubetune.trainer.builtin import byte_tokenizer

    tok = byte_tokenizer()
    records, problems = data.read_records(s.train, DatasetFormat.CHAT)
    assert not problems, problems[:3]
    for r in records:
        ours = data.encode_example(r, DatasetFormat.CHAT, tok, s.max_seq, "error")
        theirs = hf_encode(r.data["messages"], tok)
        if ours is None or ours.input_ids != theirs["input_ids"] or ours.labels != theirs["labels"]:
            return False
    return True


def packed_logits_max_diff(s: Setup, n_examples: int = 24) -> float:
    """Max |logit| difference between examples inside packed rows and the same examples alone."""
    import torch
    from kubetune.api.enums import DatasetFormat
    from kubetune.trainer import data
    from kubetune.trainer.builtin import byte_tokenizer
    from kubetune.trainer.methods.lora import lora_config
    from kubetune.trainer.methods.targets import Targets
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    tok = byte_tokenizer()
    records, _ = data.read_records(s.train, DatasetFormat.CHAT)
    examples = [data.encode_example(r, DatasetFormat.CHAT, tok, s.max_seq, "error") for r in records[:n_examples]]
    torch.manual_seed(s.seed)
    model = AutoModelForCausalLM.from_pretrained(s.model_dir)

    class Cfg:  # the API block lora_config reads
        r, alpha, dropout, target_modules = s.r, s.alpha, 0.0, ["all-linear"]

    model = get_peft_model(model, lora_config(Cfg, Targets(modules=("all-linear",))))
    with torch.no_grad():  # B = 0 at init would hide the adapter: give it weight
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    data.prepare_model_for_packing(model)
    model.eval()
    rows = data.pack(examples, s.max_seq)
    packed = data.Collator(tok.pad_token_id, packing=True)(rows)
    packed.pop("labels")
    worst = 0.0
    with torch.no_grad():
        logits = model(**packed).logits
        alone = data.Collator(tok.pad_token_id, packing=False)
        for b, row in enumerate(rows):
            starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
            ends = starts[1:] + [len(row["position_ids"])]
            for start, end in zip(starts, ends):
                match = [e for e in examples if e.input_ids == row["input_ids"][start:end]]
                single = alone([match[0]])
                single.pop("labels")
                ref = model(**single).logits[0]
                worst = max(worst, float((logits[b, start:end] - ref).abs().max()))
    return worst


# ------------------------------------------------------------------------------ main


def environment() -> str:
    import peft
    import torch
    import transformers

    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, Python {platform.python_version()}"
    )


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="alternations of the three sides (≥ 5 for a recorded result)")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=4, help="first steps not timed")
    p.add_argument("--examples", type=int, default=600)
    p.add_argument("--batch", type=int, default=4, help="rows per optimizer step (both sides)")
    p.add_argument("--max-seq", type=int, default=512, help="maxSeqLength: packed row length, longest example")
    p.add_argument("--scale", type=float, default=0.5, help="multiplies every median turn length")
    p.add_argument("--loss-step", type=int, default=10, help="the fixed step whose losses must agree")
    p.add_argument("--smoke", action="store_true", help="tiny run; RESULTS.md untouched unless --results")
    p.add_argument(
        "--results", type=Path, help="append the section here (default: benchmarks/RESULTS.md, not in --smoke)"
    )
    p.add_argument("--child", choices=["hf", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--setup", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        s = Setup(**json.loads(args.setup))
        print("CHILD " + json.dumps(child(args.child, s)), flush=True)
        return 0

    from kubetune.trainer import builtin

    if args.smoke:
        args.rounds, args.steps, args.warmup, args.examples, args.loss_step = 1, 5, 1, 120, 5
        args.max_seq, args.scale = 256, 0.25
    args.loss_step = min(args.loss_step, args.steps)
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    with tempfile.TemporaryDirectory(prefix="trainer-vs-hf-") as tmp:
        tmpdir = Path(tmp)
        base = Setup(
            model_dir=str(builtin.ensure("small-llama")),
            steps=args.steps,
            warmup=args.warmup,
            max_seq=args.max_seq,
            batch=args.batch,
        )
        base.train = str(tmpdir / "train.jsonl")
        base.validation = str(tmpdir / "validation.jsonl")
        lengths = make_chat_dataset(Path(base.train), args.examples, base.seed, base.max_seq, args.scale)
        make_chat_dataset(Path(base.validation), 16, base.seed + 1, base.max_seq, args.scale)
        same_tokens = tokenization_identical(base)
        logits_diff = packed_logits_max_diff(base)
        print(
            f"  data: {len(lengths)} examples, tokens p50 {statistics.median(lengths):.0f}, mean {statistics.mean(lengths):.0f}, max {max(lengths)}; "
            f"tokenisation identical: {same_tokens}; packed-vs-alone max |Δlogit| {logits_diff:.2e}",
            file=sys.stderr,
        )
        sides = {"hf": ("hf", False), "ours": ("ours", False), "ours-packed": ("ours", True)}
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in sides}
        order = list(sides)
        for r in range(args.rounds):
            for name in order if r % 2 == 0 else list(reversed(order)):
                kind, packing = sides[name]
                s = Setup(**{**asdict(base), "packing": packing, "out": str(tmpdir / f"{name}-{r}")})
                res = spawn(kind, s)
                runs[name].append(res)
                print(
                    f"  round {r + 1} {name:12s} {res['ms_per_step']:8.1f} ms/step {res['useful_tokens_per_s']:8.0f} useful tok/s "
                    f"pad-eff {res['padding_efficiency']:.2f} rss {res['peak_rss_mb']:.0f} MB wall {res['wall_s']:.1f} s load {res['load']:.1f}",
                    file=sys.stderr,
                )

    # Loss agreement: ours (unpacked) and HF in the same round see identical batches.
    k = args.loss_step
    deltas = [abs(o["losses"][str(k)] - h["losses"][str(k)]) for o, h in zip(runs["ours"], runs["hf"])]
    loss_delta = max(deltas)
    max_any = max(
        abs(o["losses"][step] - h["losses"][step])
        for o, h in zip(runs["ours"], runs["hf"])
        for step in h["losses"]
        if step in o["losses"]
    )
    loss_match = loss_delta <= LOSS_TOLERANCE
    logits_match = logits_diff <= LOGITS_TOLERANCE

    med = {
        name: {
            key: median_of(rs, key)
            for key in ("steps_per_s", "ms_per_step", "useful_tokens_per_s", "padding_efficiency", "peak_rss_mb")
        }
        for name, rs in runs.items()
    }
    max_load = max(r["load"] for rs in runs.values() for r in rs)
    tokens_ratio = med["ours-packed"]["useful_tokens_per_s"] / med["hf"]["useful_tokens_per_s"]
    steps_ratio = med["ours"]["steps_per_s"] / med["hf"]["steps_per_s"]
    # Ours unpacked and HF step through identical batches in the same order: pair step k with
    # step k of the same round and take the median difference (robust to a slow moment on a
    # shared machine; a mean of two noisy rates would not resolve a few milliseconds).
    overhead = statistics.median(
        o["intervals_ms"][k_] - h["intervals_ms"][k_]
        for o, h in zip(runs["ours"], runs["hf"])
        for k_ in h["intervals_ms"]
        if k_ in o["intervals_ms"]
    )
    tokens_ratio_unpacked = med["ours"]["useful_tokens_per_s"] / med["hf"]["useful_tokens_per_s"]
    # The same pairing on process CPU time: less sensitive to other processes on the machine.
    overhead_cpu = statistics.median(
        o["cpu_intervals_ms"][k_] - h["cpu_intervals_ms"][k_]
        for o, h in zip(runs["ours"], runs["hf"])
        for k_ in h["cpu_intervals_ms"]
        if k_ in o["cpu_intervals_ms"]
    )

    def verdict(ok: bool) -> str:
        return "met" if ok else "**MISSED**"

    lines = [
        f"### trainer_vs_hf — {date}",
        "",
        f"{environment()}; 2 threads; builtin://small-llama (4 layers, hidden 256, random init seed 0), LoRA r{base.r} α{base.alpha} "
        f"dropout {base.dropout} all-linear, fp32, AdamW lr {base.lr}, batch {base.batch} × accumulation {base.grad_accum}, "
        f"maxSeqLength {base.max_seq}; {len(lengths)} chat examples (log-normal turns, tokens p50 {statistics.median(lengths):.0f}, "
        f"mean {statistics.mean(lengths):.0f}, max {max(lengths)}); {args.steps} steps, first {args.warmup} untimed; "
        f"{args.rounds} alternating rounds, medians; each side in a fresh process. HF baseline optimizer: {runs['hf'][0]['optimizer']}.",
        "",
        "| side | steps/s | ms/step | useful tokens/s | padding efficiency | peak RSS MB | × HF useful tokens/s |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {name} | {m['steps_per_s']:.2f} | {m['ms_per_step']:.1f} | {m['useful_tokens_per_s']:.0f} | {m['padding_efficiency']:.2f} | "
            f"{m['peak_rss_mb']:.0f} | {m['useful_tokens_per_s'] / med['hf']['useful_tokens_per_s']:.2f} |"
            for name, m in med.items()
        ],
        "",
        f"- useful tokens/s, ours packed / HF: **{tokens_ratio:.2f}×** (target ≥ {TARGET_TOKENS_RATIO}×: {verdict(tokens_ratio >= TARGET_TOKENS_RATIO)})",
        f"- framework overhead, ours unpacked − HF on identical batches: **{overhead:+.1f} ms/step** (median of paired per-step differences; "
        f"target ≤ {TARGET_OVERHEAD_MS} ms: {verdict(overhead <= TARGET_OVERHEAD_MS)}); the same on process CPU time {overhead_cpu:+.1f} ms/step; "
        f"steps/s ratio {steps_ratio:.3f}",
        f"- loss at step {k}, ours unpacked vs HF: max |Δ| {loss_delta:.2e} over rounds (≤ {LOSS_TOLERANCE}: {loss_match}); "
        f"max |Δ| over every logged step {max_any:.2e}; tokenisation identical: {same_tokens}",
        f"- packed vs alone, per-example logits: max |Δ| {logits_diff:.2e} (≤ {LOGITS_TOLERANCE}: {logits_match})",
        f"- highest 1-minute load average seen by a run: {max_load:.1f} on {os.cpu_count()} CPUs"
        + (
            " (other processes shared the machine: rates are noisier than usual)"
            if max_load > (os.cpu_count() or 1) + 0.5
            else ""
        ),
        "",
    ]
    result = (
        f"RESULT trainer_vs_hf useful_tokens_ratio={tokens_ratio:.3f} steps_ratio={steps_ratio:.3f} overhead_ms={overhead:.2f} overhead_cpu_ms={overhead_cpu:.2f} "
        f"unpacked_tokens_ratio={tokens_ratio_unpacked:.3f} loss_delta={loss_delta:.2e} loss_match={str(loss_match).lower()} "
        f"logits_delta={logits_diff:.2e} logits_match={str(logits_match).lower()} tokenization_match={str(same_tokens).lower()} "
        f"rss_mb_ours={med['ours-packed']['peak_rss_mb']:.0f} rss_mb_hf={med['hf']['peak_rss_mb']:.0f} rounds={args.rounds} date={date}"
    )
    publish(lines, result, args.results or (None if args.smoke else RESULTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
