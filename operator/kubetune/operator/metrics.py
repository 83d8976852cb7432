"""Every Prometheus metric the operator exports, in one place (DESIGN style 8).

Handlers record through `OperatorMetrics` instead of creating metrics where they are used, so
the full list of series, their labels and help texts is readable here and one test lints the
exposition with `promtool check metrics`. Names follow Prometheus conventions: `_total` for
counters, `_seconds` for durations. The registry is private (not the global default) so that
tests can build as many instances as they like; the running operator uses `METRICS`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from kubetune.api.enums import Phase
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

P = "kubetune_operator_"
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class OperatorMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.finetunejobs = Gauge(
            P + "finetunejobs", "FineTuneJobs this operator sees, by phase", ["phase"], registry=r
        )
        self.transitions = Counter(P + "transitions", "FineTuneJob phase transitions", ["from", "to"], registry=r)
        self.reconcile_duration = Histogram(
            P + "reconcile_duration_seconds",
            "Time one handler call took, API requests included",
            buckets=RECONCILE_BUCKETS,
            registry=r,
        )
        self.api_errors = Counter(
            P + "api_errors",
            "Failed Kubernetes API requests, by verb, resource and HTTP status code",
            ["verb", "resource", "code"],
            registry=r,
        )
        self.scrape_failures = Counter(
            P + "scrape_failures", "Failed scrapes of a running trainer's /metrics endpoint", registry=r
        )
        for phase in Phase:  # every phase is a series from the start: dashboards show 0, not a gap
            self.finetunejobs.labels(phase=phase.value).set(0)

    def set_phase_counts(self, counts: Mapping[str, int]) -> None:
        """Set the per-phase gauge from a full count; phases missing from `counts` read 0."""
        for phase in Phase:
            self.finetunejobs.labels(phase=phase.value).set(counts.get(phase.value, 0))

    def transition(self, old_phase: str | None, new_phase: str) -> None:
        """Count a phase change; a new object's first phase counts from `None`."""
        self.transitions.labels(**{"from": old_phase or "None", "to": new_phase}).inc()

    @contextlib.contextmanager
    def reconcile_timer(self) -> Iterator[None]:
        """Time a handler call, including when it raises."""
        with self.reconcile_duration.time():
            yield

    def api_error(self, verb: str, resource: str, code: int | str) -> None:
        self.api_errors.labels(verb=verb, resource=resource, code=str(code)).inc()

    def scrape_failure(self) -> None:
        self.scrape_failures.inc()

    def exposition(self) -> str:
        """The metrics as Prometheus text."""
        return generate_latest(self.registry).decode()

    def serve(self, port: int, addr: str = "0.0.0.0") -> Any:
        """Serve /metrics on `port` (0 picks a free one; the server's `server_port` says which)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server


METRICS = OperatorMetrics()
"""The instance the running operator records to."""


def serve(port: int, addr: str = "0.0.0.0") -> Any:
    """Serve the operator's metrics (`METRICS`) on `port`."""
    return METRICS.serve(port, addr)
