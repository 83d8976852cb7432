"""The memory model (kubetune.api.memory) against measured CPU peaks over the whole grid.

Issue 22's grid: vocabulary 32k/128k × sequence 512/2048 × batch 1/4 × LoRA/full fine-tuning,
16 points, on the trainer's path (chunked logits), with a small random-init Llama (2 layers,
hidden 64) so that the vocabulary-sized terms — the ones that decide a batch size — dominate.
`memory_probe.py` runs two optimizer steps per point in one process and reports the RSS high-water
mark; the prediction is `breakdown(Workload(...)).total` as the operator's estimate and the
trainer's `auto` batch size compute it. tests/trainer/test_memory_model.py checks a one-minute
subset of this grid in CI; this script measures all of it.

    python benchmarks/memory_grid.py            # ~5-10 min on 2 CPU cores, appends RESULTS.md
    python benchmarks/memory_grid.py --smoke    # two tiny points, RESULTS.md untouched
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "api"))
from kubetune.api.memory import breakdown
from memory_probe import workload
from report import RESULTS, publish

TOLERANCE = 0.25
SMALL = {"hidden": 64, "intermediate": 172, "layers": 2, "heads": 4, "chunked": True}


def grid(smoke: bool) -> list[dict]:
    if smoke:
        return [
            {**SMALL, "vocab": 4000, "seq": 128, "batch": b, "adaptation": a} for b, a in ((1, "lora"), (2, "full"))
        ]
    return [
        {**SMALL, "vocab": v, "seq": s, "batch": b, "adaptation": a}
        for v, s, b, a in itertools.product((32000, 128000), (512, 2048), (1, 4), ("lora", "full"))
    ]


def predicted(c: dict) -> float:
    """What the memory model says a CPU run of this point adds."""
    return breakdown(workload(c)).total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="two tiny points; RESULTS.md untouched unless --results")
    p.add_argument("--results", type=Path)
    args = p.parse_args()
    points = grid(args.smoke)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(HERE.parent / "api"), str(HERE.parent / "trainer"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    proc = subprocess.run(
        [sys.executable, str(HERE / "memory_probe.py"), json.dumps(points)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    measured = [json.loads(line[len("PROBE ") :]) for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    rows, ratios = [], []
    for c in measured:
        added = c["peak"] - c["base"]
        ratio = predicted(c) / added
        ratios.append(ratio)
        rows.append(
            f"| {c['vocab']} | {c['seq']} | {c['batch']} | {c['adaptation']} | {added / 2**20:.0f} | "
            f"{predicted(c) / 2**20:.0f} | {ratio:.2f} |"
        )
    inside = sum(1 - TOLERANCE <= r <= 1 + TOLERANCE for r in ratios)
    date = datetime.date.today().isoformat()
    lines = [
        f"### memory_grid — {date}",
        "",
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; 1 thread; random-init Llama "
        f"(hidden {SMALL['hidden']}, {SMALL['layers']} layers), fp32, AdamW, chunked logits, loss on the last ¾ of each row; "
        "two optimizer steps per point in one process (memory_probe.py), peak = VmHWM − RSS before the model.",
        "",
        "| vocab | seq | batch | adaptation | measured MiB | predicted MiB | predicted/measured |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"- {inside} of {len(ratios)} points within ±{TOLERANCE:.0%}; ratios {min(ratios):.2f}–{max(ratios):.2f}",
        "",
    ]
    result = (
        f"RESULT memory_grid points={len(ratios)} within_25pct={inside} min_ratio={min(ratios):.2f} "
        f"max_ratio={max(ratios):.2f} date={date}"
    )
    publish(lines, result, args.results or (None if args.smoke else RESULTS))
    return 0 if args.smoke or inside == len(ratios) else 1


if __name__ == "__main__":
    sys.exit(main())
