"""kubetune.gateway.metrics: the gateway's exposition (requests by route template, latency, webhook
deliveries) parses and passes `promtool check metrics`; the method context the auth layer reads."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from kubetune.gateway.auth import REQUEST_METHOD, Authenticator, RequestMethodMiddleware, TokenReviewer
from kubetune.gateway.backend import Forbidden, Tenant
from kubetune.gateway.metrics import GatewayMetrics, MetricsMiddleware
from kubetune.gateway.webhooks import Delivery, Endpoint
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]


class Route:
    path = "/v1/fine_tuning/jobs/{fine_tuning_job_id}"


async def run(app: Any, method: str, path: str) -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "method": method, "path": path, "headers": []}, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


async def recorded() -> tuple[GatewayMetrics, str]:
    metrics = GatewayMetrics()

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope["route"] = Route()  # what Starlette's router leaves in the scope
        status = 404 if scope["path"].endswith("missing") else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    app = MetricsMiddleware(inner, metrics)
    for path in ("/v1/fine_tuning/jobs/ftjob-1", "/v1/fine_tuning/jobs/ftjob-2", "/v1/fine_tuning/jobs/missing"):
        await run(app, "GET", path)
    delivery = Delivery("ns/j", "ftjob-1", "fine_tuning.job.succeeded", Endpoint("http://x", "whsec_x"), 0)
    metrics.webhook_attempt(delivery, "HTTP 500")
    metrics.webhook_attempt(delivery, "ok")
    await metrics.webhook_done(delivery, "delivered")
    status, body = await run(app, "GET", "/metrics")
    assert status == 200
    return metrics, body.decode()


async def test_exposition_counts_by_route_template() -> None:
    _, text = await recorded()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    route = Route.path
    assert samples[("kubetune_api_requests_total", (("code", "200"), ("method", "GET"), ("route", route)))] == 2
    assert samples[("kubetune_api_requests_total", (("code", "404"), ("method", "GET"), ("route", route)))] == 1
    assert samples[("kubetune_api_request_duration_seconds_count", (("method", "GET"), ("route", route)))] == 3
    assert samples[("kubetune_api_requests_in_flight", ())] == 0
    assert (
        samples[
            (
                "kubetune_api_webhook_deliveries_total",
                (("event", "fine_tuning.job.succeeded"), ("outcome", "delivered")),
            )
        ]
        == 1
    )
    assert samples[("kubetune_api_webhook_attempts_total", (("result", "HTTP 500"),))] == 1
    assert "ftjob-1" not in text


async def test_promtool_check_metrics_is_silent() -> None:
    _, text = await recorded()
    promtool = subprocess.run(
        ["bash", str(ROOT / "hack" / "get-promtool.sh")], capture_output=True, text=True, check=True
    ).stdout.strip()
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert check.returncode == 0 and check.stdout.strip() == "" and check.stderr.strip() == "", (
        check.stdout + check.stderr
    )


class Reviewer(TokenReviewer):
    def __init__(self) -> None:
        super().__init__(api_client=None)
        self.verbs: list[str] = []

    def _token_review(self, token):  # type: ignore[override]
        from kubetune.gateway.auth import _Review

        return _Review("system:serviceaccount:team-a:bot", (), "", ())

    def _access_review(self, review, namespace, verb):  # type: ignore[override]
        self.verbs.append(verb)
        return verb == "list", ""


async def test_the_access_review_verb_follows_the_request_method() -> None:
    """A caller passing only the headers (the app does) gets `list` for GET through the middleware's
    context, `create` for POST, and the stricter `create` when the method is unknown."""
    reviewer = Reviewer()
    authn = Authenticator(tokens=reviewer, access=None)
    seen: list[Any] = []

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            seen.append(await authn({"authorization": "Bearer t"}))
        except Forbidden as err:
            seen.append(err.status)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = RequestMethodMiddleware(inner)
    await run(app, "GET", "/v1/files")
    await run(app, "POST", "/v1/files")
    assert seen == [Tenant("team-a", "org-team-a", "system:serviceaccount:team-a:bot"), 403]
    assert REQUEST_METHOD.get() is None
    with pytest.raises(Forbidden):
        await authn({"authorization": "Bearer t"})  # no middleware: counted as a write
    assert reviewer.verbs == ["list", "create"]  # the unknown method's create came from the cache
