"""report.html: one self-contained page people look at after a run.

Loss and eval-loss curves, the learning-rate schedule and throughput (matplotlib, PNG embedded as
data: URIs), the base-vs-tuned metrics table, the samples side by side, the dataset report, and
cost and energy. No script, no stylesheet or font from the network: it opens from a bucket, a mail
attachment or a laptop offline. The trainer writes it with `report-data.json` (everything the page
shows, machine-readable) beside it; `kubetune report OUTPUT` fetches it, or renders it again from
that file.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

REPORT_FILE = "report.html"
DATA_FILE = "report-data.json"
PLOT_SIZE = (8.0, 3.0)
PLOT_DPI = 100
"""Every plot is PLOT_SIZE × PLOT_DPI pixels: 800 × 300."""
PLOT_PIXELS = (int(PLOT_SIZE[0] * PLOT_DPI), int(PLOT_SIZE[1] * PLOT_DPI))


def _plot(
    series: list[tuple[str, list[tuple[float, float]], str]], ylabel: str, title: str, log_y: bool = False
) -> str | None:
    """A line plot as a data: URI (PNG), or None when there is nothing to draw."""
    series = [(label, pts, style) for label, pts, style in series if pts]
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI)
    ax = fig.add_subplot()
    for label, pts, style in series:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, style, label=label, linewidth=1.6, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI)  # no bbox_inches: the size stays PLOT_PIXELS
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _histogram(bins: list[dict[str, int]]) -> str | None:
    if not bins:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI)
    ax = fig.add_subplot()
    ax.bar([f"{b['from']}–{b['to']}" for b in bins], [b["count"] for b in bins], color="#4c78a8")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.set_title("Example length", fontsize=10)
    ax.tick_params(axis="x", labelsize=7, rotation=30)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, int):
        return f"{value:,}"
    return _e(value)


def _table(rows: list[tuple[str, Any]], table_id: str) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table id="{table_id}">{body}</table>'


def _img(uri: str | None, alt: str, img_id: str) -> str:
    if uri is None:
        return f'<p class="none">No data for {_e(alt.lower())}.</p>'
    w, h = PLOT_PIXELS
    return f'<img id="{img_id}" class="plot" alt="{_e(alt)}" width="{w}" height="{h}" src="{uri}">'


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0}th,td{border:1px solid #ddd;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f6f6f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
.samples td{white-space:pre-wrap;max-width:320px;font-size:.9rem}.none{color:#888}.warn{color:#a40}
img.plot{display:block;margin:.5rem 0;border:1px solid #eee}
"""


def render(data: dict[str, Any]) -> str:
    """The page for `data` (what report-data.json holds)."""
    name = data.get("name", "run")
    m = data.get("metrics") or {}
    hist = data.get("history") or {}
    parts = [
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>kubetune report: {_e(name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>kubetune report: {_e(name)}</h1>",
        f"<p>Base model <code>{_e(data.get('baseModel', ''))}</code>, method <code>{_e(data.get('method', ''))}</code>, "
        f"{_num(data.get('steps'))} steps in {_num(data.get('durationSeconds'))} s.</p>",
    ]

    parts.append("<h2>Training</h2>")
    parts.append(
        _table(
            [
                ("train loss", _num(m.get("trainLoss"))),
                ("eval loss (tuned)", _num(m.get("evalLoss"))),
                ("eval loss (base)", _num(m.get("baseEvalLoss"))),
                ("perplexity", _num(m.get("perplexity"))),
                ("token accuracy", _num(m.get("tokenAccuracy"))),
                ("tokens/s", _num(m.get("tokensPerSecond"))),
            ],
            "training",
        )
    )
    losses = [tuple(p) for p in hist.get("loss", [])]
    evals = [tuple(p) for p in hist.get("evalLoss", [])]
    parts.append(
        _img(
            _plot([("train loss", losses, "-"), ("eval loss", evals, "o-")], "loss", "Loss"), "Loss curves", "plot-loss"
        )
    )
    parts.append(
        _img(
            _plot(
                [("learning rate", [tuple(p) for p in hist.get("learningRate", [])], "-")],
                "learning rate",
                "Learning-rate schedule",
            ),
            "Learning-rate schedule",
            "plot-lr",
        )
    )
    parts.append(
        _img(
            _plot([("tokens/s", [tuple(p) for p in hist.get("tokensPerSecond", [])], "-")], "tokens / s", "Throughput"),
            "Throughput",
            "plot-throughput",
        )
    )

    gen = m.get("generation") or {}
    parts.append("<h2>Base vs tuned</h2>")
    if gen.get("samples"):
        names = sorted(set(gen.get("base", {})) | set(gen.get("tuned", {})))
        head = "<tr><th>metric</th><th>base</th><th>tuned</th><th>change</th></tr>"
        body = ""
        for k in names:
            b, t = gen.get("base", {}).get(k), gen.get("tuned", {}).get(k)
            delta = _num(t - b) if isinstance(b, (int, float)) and isinstance(t, (int, float)) else "–"
            body += f"<tr><th>{_e(k)}</th><td class=num>{_num(b)}</td><td class=num>{_num(t)}</td><td class=num>{delta}</td></tr>"
        parts.append(f'<table id="ab">{head}{body}</table>')
        judge = gen.get("judge")
        if judge:
            parts.append(
                _table(
                    [
                        ("judge", _e(judge.get("model", ""))),
                        ("tuned wins", _num(judge.get("tunedWins"))),
                        ("base wins", _num(judge.get("baseWins"))),
                        ("ties", _num(judge.get("ties"))),
                        ("failed", _num(judge.get("failed"))),
                        ("tuned win rate", _num(judge.get("winRate"))),
                    ],
                    "judge",
                )
            )
        rows = data.get("samples") or []
        body = "".join(
            f"<tr><td>{_e(r.get('prompt', ''))}</td><td>{_e(r.get('reference', ''))}</td><td>{_e(r.get('base') or '')}</td>"
            f"<td>{_e(r.get('tuned', ''))}</td></tr>"
            for r in rows
        )
        parts.append(
            '<h3>Samples</h3><table id="samples" class="samples"><tr><th>prompt</th><th>reference</th>'
            f"<th>base</th><th>tuned</th></tr>{body}</table>"
        )
    else:
        parts.append('<p class="none">No samples (spec.evaluation.samples: 0).</p>')

    dr = data.get("dataReport")
    parts.append("<h2>Dataset</h2>")
    if dr:
        t, d, o, p = dr["tokens"], dr["duplicates"], dr["overlap"], dr["pii"]
        parts.append(
            _table(
                [
                    ("training examples", _num(dr["examples"])),
                    ("validation examples", _num(dr["validationExamples"])),
                    ("tokens" + ("" if dr.get("tokensExact") else " (estimated)"), _num(t["total"])),
                    (
                        "tokens per example (min / p50 / p95 / max)",
                        f"{t['min']} / {t['p50']} / {t['p95']} / {t['max']}",
                    ),
                    ("turns per example (mean)", _num(dr["turns"]["mean"])),
                    (f"over maxSeqLength {dr['maxSeqLength']}", _num(dr["overMaxSeqLength"])),
                    ("exact duplicates", _num(d["exact"])),
                    ("near duplicates", _num(d["near"])),
                    ("train/validation overlap (exact)", _num(o["exact"])),
                    ("train/validation overlap (near)", _num(o["near"])),
                    ("distinct system prompts", _num(dr["systemPrompts"]["distinct"])),
                    (f"PII findings (policy {p['policy']})", _num(p["total"])),
                ],
                "data",
            )
        )
        parts.append(_img(_histogram(dr.get("lengthHistogram") or []), "Length histogram", "plot-lengths"))
        if p["findings"]:
            body = "".join(
                f"<tr><td>{_e(f['file'])}:{f['line']}</td><td>{_e(f['kind'])}</td><td>{_e(f['field'])}</td>"
                f"<td>{_e(f['preview'])}</td></tr>"
                for f in p["findings"][:50]
            )
            parts.append(
                f'<table id="pii"><tr><th>where</th><th>kind</th><th>field</th><th>preview</th></tr>{body}</table>'
            )
    else:
        parts.append('<p class="none">No dataset report.</p>')

    cost = data.get("cost") or {}
    est = (dr or {}).get("estimate") or {}
    parts.append("<h2>Cost and energy</h2>")
    parts.append(
        _table(
            [
                ("duration (s)", _num(data.get("durationSeconds"))),
                ("energy (kWh)", _num(cost.get("energyKWh"))),
                ("estimated training tokens", _num(est.get("trainingTokens"))),
                ("billing tokens (OpenAI cookbook)", _num(est.get("billingTokens"))),
                ("estimated GPU-hours", _num(est.get("gpuHours"))),
                ("estimated cost (USD)", _num(est.get("estimatedUSD"))),
            ],
            "cost",
        )
    )
    parts.append("</body></html>")
    return "\n".join(parts)


def to_json(data: dict[str, Any]) -> bytes:
    """report-data.json: non-finite numbers (a diverged loss) become null, as JSON has no NaN."""
    return json.dumps(_finite(data), indent=1, allow_nan=False, default=str).encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
