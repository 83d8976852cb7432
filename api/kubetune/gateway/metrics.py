"""Prometheus metrics of `kubetune api`: requests by route and status, their latency, webhook
deliveries; served on `/metrics` (text exposition, what the chart's ServiceMonitor scrapes).

Routes are labelled by their template (`/v1/fine_tuning/jobs/{fine_tuning_job_id}`), never the
raw path, so ids do not explode the series count; unmatched paths share the label `unmatched`.
Each app gets its own registry (`GatewayMetrics()`), so tests can run several side by side.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    """The gateway's series, in a registry of their own."""

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "kubetune_api_requests",
            "HTTP requests served by kubetune api, by method, route template and status code.",
            ["method", "route", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "kubetune_api_request_duration_seconds",
            "Time to answer a request (until the response started), by method and route template.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "kubetune_api_requests_in_flight", "Requests being answered now.", registry=self.registry
        )
        self.webhooks = Counter(
            "kubetune_api_webhook_deliveries",
            "Webhook deliveries by event type and outcome (delivered, rejected, gave_up).",
            ["event", "outcome"],
            registry=self.registry,
        )
        self.webhook_attempts = Counter(
            "kubetune_api_webhook_attempts",
            "Webhook delivery attempts by result (ok, or the failure: HTTP 500, ClientConnectorError, …).",
            ["result"],
            registry=self.registry,
        )

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of the /metrics response."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def webhook_attempt(self, _delivery: Any, result: str) -> None:
        """`WebhookSender(on_attempt=...)`: count one try (the result keeps its kind, not its text)."""
        self.webhook_attempts.labels("ok" if result == "ok" else result.split(":")[0][:40]).inc()

    async def webhook_done(self, delivery: Any, outcome: str) -> None:
        """`WebhookSender(on_done=...)`: count one finished delivery."""
        self.webhooks.labels(delivery.event_type, outcome).inc()


def route_of(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None) or getattr(route, "path_format", None)
    return str(path) if path else "unmatched"


class MetricsMiddleware:
    """Pure ASGI middleware counting every HTTP request (streamed responses included: the
    latency is to the start of the response) and serving `metrics_path` itself."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, metrics_path: str = "/metrics") -> None:
        self.app = app
        self.metrics = metrics
        self.metrics_path = metrics_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        if scope.get("path") == self.metrics_path and method in ("GET", "HEAD"):
            body, content_type = self.metrics.exposition()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
            return
        start = time.perf_counter()
        code = 500
        timed = False
        self.metrics.in_flight.inc()

        async def sending(message: dict[str, Any]) -> None:
            nonlocal code, timed
            if message["type"] == "http.response.start":
                code = int(message["status"])
                if not timed:
                    timed = True
                    self.metrics.latency.labels(method, route_of(scope)).observe(time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.in_flight.dec()
            route = route_of(scope)
            if not timed:
                self.metrics.latency.labels(method, route).observe(time.perf_counter() - start)
            self.metrics.requests.labels(method, route, str(code)).inc()


def install(app: Any, metrics: Optional[GatewayMetrics] = None, path: str = "/metrics") -> GatewayMetrics:
    """Add the middleware to a Starlette/FastAPI app; returns the metrics (for webhook counters)."""
    metrics = metrics or GatewayMetrics()
    app.add_middleware(MetricsMiddleware, metrics=metrics, metrics_path=path)
    return metrics
