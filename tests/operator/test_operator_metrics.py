"""The operator's Prometheus exposition parses and passes `promtool check metrics` (DESIGN style 8)."""

from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path

from kubetune.api.enums import Phase
from kubetune.operator.metrics import OperatorMetrics
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]


def recorded() -> OperatorMetrics:
    m = OperatorMetrics()
    m.set_phase_counts({"Running": 2, "Queued": 1})
    m.transition(None, "Pending")
    m.transition("Pending", "Running")
    with m.reconcile_timer():
        pass
    m.api_error("patch", "finetunejobs/status", 500)
    m.api_error("create", "jobs", 429)
    m.scrape_failure()
    return m


def test_exposition_has_every_series() -> None:
    text = recorded().exposition()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    for phase in Phase:
        assert ("kubetune_operator_finetunejobs", (("phase", phase.value),)) in samples
    assert samples[("kubetune_operator_finetunejobs", (("phase", "Running"),))] == 2
    assert samples[("kubetune_operator_transitions_total", (("from", "Pending"), ("to", "Running")))] == 1
    assert samples[("kubetune_operator_transitions_total", (("from", "None"), ("to", "Pending")))] == 1
    assert samples[("kubetune_operator_reconcile_duration_seconds_count", ())] == 1
    assert (
        samples[
            (
                "kubetune_operator_api_errors_total",
                (("code", "500"), ("resource", "finetunejobs/status"), ("verb", "patch")),
            )
        ]
        == 1
    )
    assert samples[("kubetune_operator_scrape_failures_total", ())] == 1


def test_promtool_check_metrics_is_silent() -> None:
    text = recorded().exposition()
    promtool = subprocess.run(
        ["bash", str(ROOT / "hack" / "get-promtool.sh")], capture_output=True, text=True, check=True
    ).stdout.strip()
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert check.returncode == 0 and check.stdout.strip() == "" and check.stderr.strip() == "", (
        check.stdout + check.stderr
    )


def test_serve_answers_metrics() -> None:
    m = recorded()
    server = m.serve(0, addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        assert "kubetune_operator_scrape_failures_total 1.0" in body
    finally:
        server.shutdown()
        server.server_close()
