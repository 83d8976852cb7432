"""`kubetune run`: the trainer on this machine, with a rich progress bar and a summary table.

Imported lazily by the CLI (it pulls in torch). The output defaults to
`file://./kubetune-output/<name>/` so a local run never needs credentials.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kubetune.api.contract import PERMANENT_EXIT_CODE, PREEMPTED_EXIT_CODE
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


def run_locally(job: Any, output: str | None, metrics_port: int) -> int:
    from kubetune.trainer import quiet

    quiet.install()  # before the ML libraries are imported (bitsandbytes logs at import)
    from kubetune.trainer.callbacks import steps_log
    from kubetune.trainer.run import Options, Preempted, UserError, run
    from kubetune.trainer.storage import PermanentStorageError, StorageError

    console = Console(stderr=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not console.is_terminal:  # no live bar to look at (CI, a pipe): a log line per step instead
        steps_log.setLevel(logging.INFO)
    output = output or (Path.cwd() / "kubetune-output" / job.metadata.name).resolve().as_uri()
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        # A busy redraw thread competes with torch's worker threads on small machines.
        refresh_per_second=2,
    )
    # Hidden until the first step: validating and loading show their status lines, not "step 0/None".
    task = progress.add_task("training", total=None, loss="–", tps="–", visible=False)

    def on_progress(p: dict[str, Any]) -> None:
        loss = f"{p['loss']:.4f}" if p.get("loss") is not None else "–"
        progress.update(
            task, completed=p["step"], total=p["total"], loss=loss, tps=f"{p['tokens_per_s']:.0f}", visible=True
        )

    opts = Options(output=output, on_progress=on_progress, on_status=lambda m: console.print(f"[dim]• {m}[/dim]"))
    if metrics_port >= 0:
        server = opts.metrics.serve(metrics_port, "127.0.0.1")
        console.print(f"metrics: http://127.0.0.1:{server.server_port}/metrics")  # type: ignore[attr-defined]
    console.print(
        f"[bold]{job.metadata.name}[/bold]: {job.spec.method.adaptation} on {job.spec.model.source} → {output}"
    )
    try:
        with progress:
            summary = run(job, opts)
    except UserError as err:
        console.print(f"[red]error[/red] ({err.reason}): {err}")
        return PERMANENT_EXIT_CODE
    except Preempted as err:
        console.print(f"[yellow]stopped[/yellow]: {err}; run the same command again to resume from it")
        return PREEMPTED_EXIT_CODE
    except StorageError as err:  # the object store: a transient failure is worth a retry
        console.print(f"[red]error[/red] (StorageError): {err}")
        return PERMANENT_EXIT_CODE if isinstance(err, PermanentStorageError) else 1
    table = Table(title=f"{job.metadata.name}: fine-tuning finished", show_header=False)
    m = summary["metrics"]
    if "baseEvalLoss" in m:
        table.add_row("base model eval loss", f"{m['baseEvalLoss']:.4f}")
    if "evalLoss" in m:
        table.add_row("tuned model eval loss", f"{m['evalLoss']:.4f}")
        table.add_row("perplexity", f"{m['perplexity']:.2f}")
        table.add_row("token accuracy", f"{m['tokenAccuracy']:.1%}")
    # dpo, orpo, kto: held-out preference accuracy; grpo: mean grader reward (base, then tuned)
    for key, label, fmt in (
        ("basePreferenceAccuracy", "base model preference accuracy", "{:.1%}"),
        ("preferenceAccuracy", "tuned model preference accuracy", "{:.1%}"),
        ("baseMeanReward", "base model mean reward", "{:.3f}"),
        ("meanReward", "tuned model mean reward", "{:.3f}"),
    ):
        if key in m:
            table.add_row(label, fmt.format(m[key]))
    table.add_row("steps", str(summary["steps"]))
    table.add_row("trainable parameters", f"{summary['trainableParameters']:,}")
    table.add_row("adapter", summary["adapter"]["uri"])
    table.add_row("manifest", summary["adapter"]["manifestUri"])
    gen = m.get("generation") or {}
    for name in gen.get("tuned") or {}:
        base = (gen.get("base") or {}).get(name)
        table.add_row(
            f"{name} (samples, base → tuned)",
            (f"{base:.3f} → " if base is not None else "") + f"{gen['tuned'][name]:.3f}",
        )
    if (judge := gen.get("judge")) and judge.get("winRate") is not None:
        table.add_row(
            "judge: tuned win rate",
            f"{judge['winRate']:.1%} ({judge['tunedWins']} won, {judge['baseWins']} lost, {judge['ties']} ties)",
        )
    data = summary.get("dataReport") or {}
    if data:
        table.add_row(
            "data: duplicates / overlap / PII",
            f"{data.get('duplicates', 0)} / {data.get('overlap', 0)} / "
            f"{data.get('piiFindings', 0)} ({data.get('piiPolicy', '')})",
        )
    table.add_row("wall time", f"{summary['durationSeconds']:.1f} s")
    if summary.get("reportUri"):
        table.add_row("report", summary["reportUri"])
    Console().print(table)
    if summary.get("reportUri"):
        # The one line people copy: where to look at the run (kubetune report OUTPUT opens it).
        print(f"report: {summary['reportUri']}")
    return 0
