"""The Grafana dashboard queries only series kubetune exports, in valid PromQL.

Every metric name in the dashboard's expressions must be one the code registers: trainer series
from kubetune.trainer.metrics, operator series from kubetune.operator.metrics (read from their
prometheus_client registries, with the suffixes each metric type adds on the wire). Every
expression, with Grafana's variables filled in, must pass `promtool check rules`. The chart ships
the file unchanged in its ConfigMap.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.operator.metrics import OperatorMetrics
from kubetune.trainer.metrics import TrainerMetrics
from prometheus_client import CollectorRegistry

from tests.chart.render import CHART, ROOT, one, scenario

DASHBOARD_FILE = CHART / "dashboards" / "kubetune.json"
DASHBOARD = json.loads(DASHBOARD_FILE.read_text())
METRIC = re.compile(r"\bkubetune_[a-z0-9_]+\b")
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created", ""),
    "info": ("_info",),
}
# Grafana fills these in before Prometheus sees the query.
VARIABLES = {
    "$__rate_interval": "5m",
    "$namespace": ".*",
    "$finetunejob": ".*",
    "$gpu_price_per_hour": "2.5",
    "$grid_carbon_kg_per_kwh": "0.4",
}


def exported(registry: CollectorRegistry) -> set[str]:
    """Every series name a registry can expose, including those of labelled metrics with no child yet."""
    return {m.name + suffix for m in registry.collect() for suffix in SUFFIXES[m.type]}


def panels(items: list[dict[str, Any]] = DASHBOARD["panels"]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels") or [])


def expressions() -> list[str]:
    return [t["expr"] for p in panels() for t in p.get("targets") or []]


def test_every_metric_exists_in_the_code() -> None:
    trainer, operator = exported(TrainerMetrics().registry), exported(OperatorMetrics().registry)
    used = {name for expr in expressions() for name in METRIC.findall(expr)}
    assert len(used) >= 15
    unknown = sorted(
        name for name in used if name not in (trainer if name.startswith("kubetune_trainer_") else operator)
    )
    assert unknown == [], f"not exported by kubetune: {unknown}"
    # The variables' queries too.
    for var in DASHBOARD["templating"]["list"]:
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else query or ""
        assert set(METRIC.findall(text)) <= trainer | operator, var["name"]


def test_the_panels_the_issue_asks_for() -> None:
    everything = " ".join(expressions())
    for series in (
        "kubetune_operator_finetunejobs",
        "kubetune_trainer_train_loss",
        "kubetune_trainer_eval_loss",
        "kubetune_trainer_tokens_per_second",
        "kubetune_trainer_gpu_memory_bytes",
        "kubetune_trainer_eta_seconds",
        "kubetune_trainer_gpu_energy_joules_total",
        "kubetune_trainer_start_timestamp_seconds",
    ):
        assert series in everything, series
    by_title = {p["title"]: p for p in panels()}
    assert by_title["FineTuneJobs by phase"]["targets"][0]["expr"] == "sum by (phase) (kubetune_operator_finetunejobs)"


def test_expressions_are_valid_promql(tmp_path: Path) -> None:
    rules = []
    for i, expr in enumerate(expressions()):
        for var, value in sorted(VARIABLES.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unfilled variable in {expr}"
        rules.append({"record": f"kubetune:dashboard:expr{i}", "expr": expr})
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool = subprocess.run(
        ["bash", str(ROOT / "hack" / "get-promtool.sh")], capture_output=True, text=True, check=True
    ).stdout.strip()
    check = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_structure() -> None:
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids))
    assert DASHBOARD["uid"] == "kubetune"
    for panel in panels():
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]


@pytest.mark.parametrize("enabled", [True, False])
def test_configmap_ships_the_file(enabled: bool) -> None:
    objs = scenario("monitoring") if enabled else scenario("defaults")
    maps = [o for o in objs if o["kind"] == "ConfigMap"]
    if not enabled:
        assert maps == []
        return
    cm = one(objs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"] == {"kubetune.json": DASHBOARD_FILE.read_text()}
