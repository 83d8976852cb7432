"""Per-step cost of every adaptation, objective term, optimizer and training type (dpo, orpo, kto,
grpo) relative to LoRA SFT.

Runs each `examples/methods/<name>.yaml` through the real trainer on the same model and data
for the same number of steps, takes the median seconds per optimizer step (step boundaries as
the Trainer reports them, so data loading and the loss are included; evaluation and saving are
not), and divides by LoRA's. Repeats the whole sweep `--repeats` times, alternating methods, and
reports the median ratio. A grpo step includes sampling numGenerations answers per prompt.

    python benchmarks/objectives_cost.py                 # tiny model, CPU, a few minutes
    python benchmarks/objectives_cost.py --model builtin://small-llama --steps 30
    python benchmarks/objectives_cost.py --smoke         # seconds; what the test suite runs
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
from report import RESULTS, publish


def run_one(path: Path, model: str, steps: int, out: Path) -> float:
    from kubetune.api import parse_manifest
    from kubetune.api.manifest import Loader
    from kubetune.trainer.run import Options, run

    doc = yaml.load(path.read_text(), Loader=Loader)  # YAML 1.2 numbers, as kubectl reads them
    doc["spec"]["model"]["source"] = model
    doc["spec"]["hyperparameters"]["maxSteps"] = steps
    doc["spec"]["checkpointing"] = {"everySteps": 10_000, "keep": 1}
    doc["spec"]["evaluation"] = {"compareBase": False}
    for term in doc["spec"]["method"].get("objectives", []):
        if term["type"] == "reweighting":
            term["reweighting"]["warmupRatio"] = 0.0  # measure the reweighted step, not the warm-up
    job, problems = parse_manifest(doc)
    assert job is not None, problems
    os.chdir(ROOT)
    summary = run(job, Options(output=out.as_uri()))
    return float(summary["secondsPerStep"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin://tiny-llama")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="2 steps, 1 repeat, 3 methods, no RESULTS.md")
    p.add_argument("--only", nargs="*", help="method names (default: every examples/methods manifest)")
    args = p.parse_args()
    import logging

    logging.disable(logging.WARNING)
    names = sorted(x.stem for x in (ROOT / "examples" / "methods").glob("*.yaml"))
    if args.smoke:
        args.steps, args.repeats, names = 3, 1, ["lora", "full", "adversarial"]
    if args.only:
        names = [n for n in names if n in set(args.only) | {"lora"}]
    times: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name in names if r % 2 == 0 else reversed(names):
                out = Path(tmp) / f"{name}-{r}"
                times[name].append(run_one(ROOT / "examples" / "methods" / f"{name}.yaml", args.model, args.steps, out))
                print(f"  {name:18s} run {r + 1}: {times[name][-1] * 1000:8.1f} ms/step", file=sys.stderr)
    base = statistics.median(times["lora"])
    rows = [(n, statistics.median(t), statistics.median(t) / base) for n, t in times.items()]
    import torch

    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    lines = [
        f"### objectives_cost — {date}",
        "",
        f"{machine}; model {args.model}; {args.steps} steps × {args.repeats} repeats; median ms/step; ratio to LoRA SFT",
        "",
        "| method | ms/step | × LoRA |",
        "|---|---|---|",
        *[f"| {n} | {t * 1000:.1f} | {ratio:.2f} |" for n, t, ratio in rows],
        "",
    ]
    result = (
        "RESULT objectives_cost "
        + " ".join(f"{n}={ratio:.2f}" for n, _, ratio in rows)
        + f" model={args.model} date={date}"
    )
    publish(lines, result, None if args.smoke else RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
