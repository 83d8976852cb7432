"""What the dataset report (kubetune.trainer.datareport) adds to the data check, side by side.

Baseline: `data.check`, the streaming pass `kubetune validate --data` and the validation Job ran
before the report. Then `datareport.stream` on the same file: PII scan, MinHash signatures, LSH
duplicates and overlap. Synthetic chat examples (~110 words, a few with digits, e-mails and keys)
in a temporary JSON Lines file; time and peak RSS growth per example. Appends a RESULT line to
benchmarks/RESULTS.md with --record.

    python benchmarks/data_report.py --lines 20000 [--record]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import tempfile
import time
from datetime import date
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lines", type=int, default=20000)
    p.add_argument("--record", action="store_true")
    args = p.parse_args()
    from kubetune.api.spec import FineTuneJobSpec
    from kubetune.trainer import data, datareport

    rng = random.Random(1)

    def words(n: int) -> str:
        return " ".join("".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(3, 8))) for _ in range(n))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.jsonl"
        with path.open("w") as f:
            for i in range(args.lines):
                extra = [" order 4711 of 2024-05-01", " mail a.b@example.com", " key AKIAIOSFODNN7EXAMPLE", ""][
                    i % 8 if i % 8 < 3 else 3
                ]
                f.write(
                    json.dumps(
                        {
                            "messages": [
                                {"role": "system", "content": "You help."},
                                {"role": "user", "content": words(30) + extra},
                                {"role": "assistant", "content": words(80)},
                            ]
                        }
                    )
                    + "\n"
                )
        spec = FineTuneJobSpec.model_validate(
            {
                "model": {"source": "builtin://tiny-llama"},
                "dataset": {"train": str(path)},
                "method": {"adaptation": "lora"},
                "output": {"uri": "file:///tmp/x"},
            }
        )
        t = time.perf_counter()
        data.check(spec.dataset)
        check_s = time.perf_counter() - t
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        report = datareport.stream(spec)
        report_s = time.perf_counter() - t
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    per_example = (rss - rss0) * 1024 / args.lines
    line = (
        f"RESULT data_report lines={args.lines} check_s={check_s:.2f} report_s={report_s:.2f} "
        f"report_vs_check={report_s / check_s:.2f} examples_per_s={args.lines / report_s:.0f} "
        f"rss_growth_bytes_per_example={per_example:.0f} pii={report['pii']['total']} near_duplicates={report['duplicates']['near']}"
    )
    print(line)
    if args.record:
        with (Path(__file__).parent / "RESULTS.md").open("a") as f:
            f.write(
                f"\n### data_report — {date.today()}\n\n{platform.machine()}, Python {platform.python_version()}; "
                "data.check (baseline) then datareport.stream on the same synthetic chat file, in one process.\n\n"
                f"{line}\n"
            )


if __name__ == "__main__":
    main()
