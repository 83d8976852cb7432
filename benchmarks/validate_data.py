"""`kubetune validate --data` on a large dataset: time and peak memory, beside just reading the file.

Issue 16 asks that checking a dataset on a laptop cost about what reading it costs (within 2×),
and no more memory than twice the file. Three commands run on the same file, each in a fresh
process measured by GNU time (wall seconds, maximum resident set size):

Each runs at two sizes, to tell the per-line cost from start-up.

* `read`: the baseline, a Python loop that reads the file and parses every line with json.loads
  (what any check must at least do);
* `validate --data`: the CLI a user runs (`kubetune validate --data job.yaml`);
* `validate-only`: the trainer's own check in the validation Job (`python -m kubetune.trainer
  --spec ... --validate-only`).

The dataset is examples/data/support-chat.jsonl repeated to `--lines` lines (10⁵ by default,
≈ 48 MB). The model is builtin://tiny-llama (its tokenizer is made locally).

    .venv/bin/python benchmarks/validate_data.py [--lines 100000] [--smoke] [--no-append]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import RESULTS, publish

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "examples" / "data" / "support-chat.jsonl"

READ = """
import json, sys
n = 0
with open(sys.argv[1], "rb") as f:
    for line in f:
        if line.strip():
            json.loads(line)
            n += 1
print(n)
"""


def make_dataset(path: Path, lines: int) -> int:
    rows = [r for r in SOURCE.read_bytes().splitlines() if r.strip()]
    with path.open("wb") as f:
        for i in range(lines):
            f.write(rows[i % len(rows)] + b"\n")
    return path.stat().st_size


def measure(argv: list[str], env: dict[str, str]) -> tuple[float, int, subprocess.CompletedProcess[str]]:
    """(wall seconds, max RSS bytes, the process) of one command under GNU time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as out:
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%e %M", "-o", out.name, *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
        )
        wall, kib = out.read().split()[-2:]
    return float(wall), int(kib) * 1024, proc


def run_size(lines: int) -> tuple[int, dict[str, tuple[float, int]]]:
    """(file bytes, {command: (wall s, max RSS bytes)}) for a dataset of `lines` lines."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "train.jsonl"
        size = make_dataset(data, lines)
        job = {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "bench"},
            "spec": {
                "model": {"source": "builtin://tiny-llama"},
                "dataset": {"train": str(data), "format": "chat", "maxSeqLength": 1024},
                "method": {"adaptation": "lora"},
                "resources": {"gpus": 0},
                "output": {"uri": f"file://{work / 'out'}"},
            },
        }
        manifest = work / "job.yaml"
        manifest.write_text(json.dumps(job))
        env = {**os.environ, "KUBETUNE_CACHE": str(work / "cache"), "PYTHONWARNINGS": "ignore"}
        kubetune = str(Path(sys.executable).parent / "kubetune")
        runs = {
            "read": [sys.executable, "-c", READ, str(data)],
            "validate --data": [kubetune, "validate", "--data", str(manifest)],
            "validate-only": [
                sys.executable,
                "-m",
                "kubetune.trainer",
                "--spec",
                str(manifest),
                "--validate-only",
                "--metrics-port",
                "-1",
                "--termination-path",
                str(work / "term"),
            ],
        }
        results = {}
        for name, argv in runs.items():
            wall, rss, proc = measure(argv, env)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
            results[name] = (wall, rss)
    return size, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--smoke", action="store_true", help="2,000 lines; checks the script, not the numbers")
    parser.add_argument("--no-append", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    lines = 2_000 if args.smoke else args.lines
    size, results = run_size(lines)
    # A run 4× larger separates the per-line cost from the fixed start-up (imports, models).
    big_size, big = run_size(lines * 4)
    read_s, read_rss = results["read"]
    cli_s, cli_rss = results["validate --data"]
    only_s, only_rss = results["validate-only"]
    marginal = (big["validate --data"][0] - cli_s) / max(big["read"][0] - read_s, 1e-9)
    table = [
        f"## validate_data ({lines:,} lines, {size / 2**20:.1f} MiB; and {lines * 4:,} lines, {big_size / 2**20:.1f} MiB)",
        "",
        "| command | lines | wall s | max RSS MiB | × read time | RSS ÷ file size |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | {n:,} | {s:.2f} | {rss / 2**20:.0f} | {s / res['read'][0]:.2f} | {rss / fsize:.2f} |"
            for n, fsize, res in ((lines, size, results), (lines * 4, big_size, big))
            for name, (s, rss) in res.items()
        ),
        "",
        f"Per extra line, `validate --data` costs {marginal:.2f}× what reading and parsing it costs; the rest is "
        "start-up (Python, pydantic models, fsspec).",
        "",
    ]
    result = (
        f"RESULT validate_data lines={lines} file_mib={size / 2**20:.1f} read_s={read_s:.2f} cli_s={cli_s:.2f} "
        f"validate_only_s={only_s:.2f} cli_vs_read={cli_s / read_s:.2f} "
        f"cli_vs_read_4x={big['validate --data'][0] / big['read'][0]:.2f} marginal_vs_read={marginal:.2f} "
        f"cli_rss_mib={cli_rss / 2**20:.0f} cli_rss_vs_file={cli_rss / size:.2f} read_rss_mib={read_rss / 2**20:.0f}"
    )
    publish(table, result, None if (args.smoke or args.no_append) else RESULTS)


if __name__ == "__main__":
    main()
