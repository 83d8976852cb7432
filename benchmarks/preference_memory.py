"""ORPO's peak memory at a 128k vocabulary: kubetune's chunked forward against TRL's own.

TRL 1.16's experimental ORPOTrainer takes the model's full logits ([2·batch, seq, vocab]: chosen
and rejected rows) and log-softmaxes them; kubetune's `preference._chunked_orpo` replaces that
forward with kubetune.trainer.chunked (no full logits). Both sides build the same
ChunkedORPOTrainer on the same random-init Llama (2 layers, hidden 512, vocabulary 128 256, LoRA
r8 all-linear, fp32) and batch (one pair, prompt + answers of about `--seq` tokens); the "trl"
side runs TRL's `ORPOTrainer.concatenated_forward` in its place. Each side runs `--steps`
forward+backward passes of `get_batch_loss_metrics` in a fresh process with 2 threads.

Numbers: peak RSS of the process (ru_maxrss), the RSS before the first step and what the steps
added, ms per step, and the loss of the first step (must agree within 1e-4).

    python benchmarks/preference_memory.py            # appends RESULTS.md
    python benchmarks/preference_memory.py --smoke     # small sizes (≈ 1 min), RESULTS.md untouched
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(side: str, vocab: int, hidden: int, seq: int, steps: int) -> dict[str, float]:
    import torch
    from datasets import Dataset
    from kubetune.trainer import builtin, preference
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    torch.set_num_threads(2)
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    tok = AutoTokenizer.from_pretrained(builtin.build("tiny-llama", tmp / "tok"))  # byte-level: ids < 260
    preference.ensure_chat_template(tok)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=4 * seq,
        use_cache=False,
        tie_word_embeddings=False,
    )
    model = get_peft_model(
        LlamaForCausalLM(config).float(),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    words = "the order shipped on monday and arrives within five days "
    prompt = (words * 40)[: seq // 4]
    answer = (words * 200)[: seq - seq // 4 - 40]
    row = {"prompt": prompt, "chosen": answer, "rejected": answer[::-1]}
    args = ORPOConfig(
        output_dir=str(tmp / "run"),
        per_device_train_batch_size=1,
        max_length=2 * seq,
        use_cpu=True,
        report_to=[],
        remove_unused_columns=False,
        beta=0.1,
    )
    trainer = preference._chunked_orpo()(
        model=model, args=args, train_dataset=Dataset.from_list([row]), processing_class=tok
    )
    if side == "trl":
        trainer.concatenated_forward = types.MethodType(ORPOTrainer.concatenated_forward, trainer)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    tokens = int(batch["chosen_input_ids"].shape[1] + batch["rejected_input_ids"].shape[1])
    model.train()
    loaded = _rss_mb()
    losses, times = [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss, _metrics = trainer.get_batch_loss_metrics(model, batch)
        loss.backward()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
        model.zero_grad(set_to_none=True)
    peak = _rss_mb()
    return {
        "peak_mb": peak,
        "loaded_mb": loaded,
        "added_mb": peak - loaded,
        "ms_step": 1000 * min(times),
        "loss": losses[0],
        "tokens": tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="small sizes; RESULTS.md untouched unless --results")
    parser.add_argument("--results", type=Path)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "JSON"))
    a = parser.parse_args()
    if a.child:
        print("RESULT_JSON " + json.dumps(child(a.child[0], **json.loads(a.child[1]))))
        return
    sizes = (
        {"vocab": 4096, "hidden": 64, "seq": 128, "steps": 1}
        if a.smoke
        else {"vocab": 128256, "hidden": 512, "seq": a.seq, "steps": a.steps}
    )
    out = {}
    for side in ("trl", "ours"):
        done = subprocess.run(
            [sys.executable, __file__, "--child", side, json.dumps(sizes)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        )
        line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT_JSON "))
        out[side] = json.loads(line.split(" ", 1)[1])
    import torch
    import transformers
    import trl

    lines = [
        f"### preference_memory — {datetime.date.today()}",
        "",
        f"{platform.machine()}, torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
        f"Python {platform.python_version()}; 2 threads; ORPO, random-init Llama, vocab {sizes['vocab']}, hidden "
        f"{sizes['hidden']}, 2 layers, LoRA r8 all-linear, fp32; one pair ({out['ours']['tokens']} tokens: chosen + "
        f"rejected rows); {sizes['steps']} forward+backward passes of get_batch_loss_metrics, each side in a fresh process.",
        "",
        "| side | peak MB | RSS before the steps, MB | added by the steps, MB | ms/step (min) | loss |",
        "|---|---|---|---|---|---|",
    ]
    for side, r in out.items():
        lines.append(
            f"| {side} | {r['peak_mb']:.0f} | {r['loaded_mb']:.0f} | {r['added_mb']:.0f} | {r['ms_step']:.0f} | "
            f"{r['loss']:.6f} |"
        )
    ratio = out["ours"]["added_mb"] / max(out["trl"]["added_mb"], 1e-9)
    delta = abs(out["ours"]["loss"] - out["trl"]["loss"])
    lines += [
        "",
        f"RESULT preference_memory added_ratio={ratio:.3f} peak_trl={out['trl']['peak_mb']:.0f} "
        f"peak_ours={out['ours']['peak_mb']:.0f} loss_delta={delta:.2e} vocab={sizes['vocab']} "
        f"tokens={out['ours']['tokens']} date={datetime.date.today()}",
        "",
    ]
    print("\n".join(lines))
    target = a.results or (None if a.smoke else ROOT / "benchmarks" / "RESULTS.md")
    if target is not None:
        with open(target, "a") as f:
            f.write("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
