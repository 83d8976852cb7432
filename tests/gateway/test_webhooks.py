"""kubetune.gateway.webhooks: Standard Webhooks signatures, retries with backoff after a 500,
once per transition (the ledger), never blocking the caller."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp.web
import pytest
import pytest_asyncio
from kubetune.gateway.webhooks import (
    Delivery,
    Dispatcher,
    Endpoint,
    FileLedger,
    MemoryLedger,
    WebhookConfig,
    WebhookError,
    WebhookSender,
    endpoint_for,
    event_id,
    new_secret,
    sign,
)
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

SECRET = new_secret()


def test_signature_matches_the_specs_test_vector() -> None:
    """The vector published with the Standard Webhooks spec and its reference libraries."""
    assert (
        sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, '{"test": 2432232314}'
        )
        == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


class Receiver:
    """A local HTTP endpoint that verifies each delivery with the reference library and answers
    the statuses it is told to, in order (then 200)."""

    def __init__(self, secret: str, statuses: list[int | tuple[int, dict[str, str]]]) -> None:
        self.verifier = Webhook(secret)
        self.statuses = list(statuses)
        self.received: list[dict[str, Any]] = []
        self.times: list[float] = []
        self.url = ""

    async def handle(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        body = await request.text()
        self.times.append(time.monotonic())
        try:
            payload = self.verifier.verify(body, dict(request.headers))
            verified = True
        except WebhookVerificationError:
            payload, verified = json.loads(body), False
        self.received.append({"id": request.headers.get("webhook-id"), "payload": payload, "verified": verified})
        answer = self.statuses.pop(0) if self.statuses else 200
        status, hdrs = answer if isinstance(answer, tuple) else (answer, {})
        return aiohttp.web.Response(status=status, headers=hdrs, text="ok" if status < 300 else "nope")


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver(SECRET, [])
    app = aiohttp.web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    rec.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield rec
    finally:
        await runner.cleanup()


def delivery(url: str, status: str = "succeeded", job: str = "ftjob-abc", secret: str = SECRET) -> Delivery:
    from kubetune.gateway.webhooks import EVENTS

    return Delivery(
        key=f"team-a/{job}",
        job_id=job,
        event_type=EVENTS[status],
        endpoint=Endpoint(url, secret),
        created_at=1_700_000_000,
    )


async def test_a_500_is_retried_with_backoff_and_the_delivery_verifies(receiver: Receiver) -> None:
    receiver.statuses = [500, 503]
    outcomes: list[str] = []

    async def done(d: Delivery, outcome: str) -> None:
        outcomes.append(outcome)

    sender = WebhookSender(base_delay=0.1, max_delay=1.0, on_done=done)
    try:
        outcome = await asyncio.wait_for(sender.submit(delivery(receiver.url)), 10)
    finally:
        await sender.aclose()
    assert outcome == "delivered" and outcomes == ["delivered"]
    assert [r["verified"] for r in receiver.received] == [True, True, True]
    assert {r["id"] for r in receiver.received} == {
        event_id("ftjob-abc", "fine_tuning.job.succeeded")
    }  # one event, 3 tries
    assert receiver.received[-1]["payload"] == {
        "id": event_id("ftjob-abc", "fine_tuning.job.succeeded"),
        "object": "event",
        "created_at": 1_700_000_000,
        "type": "fine_tuning.job.succeeded",
        "data": {"id": "ftjob-abc"},
    }
    gaps = [b - a for a, b in zip(receiver.times, receiver.times[1:])]
    assert gaps[0] >= 0.08 and gaps[1] >= 0.16 and gaps[1] > gaps[0] * 1.2  # 0.1 s then 0.2 s, ±20 % jitter


async def test_retry_after_is_honoured_and_a_4xx_is_not_retried(receiver: Receiver) -> None:
    receiver.statuses = [(429, {"Retry-After": "0.5"}), 400]
    sender = WebhookSender(base_delay=0.01, max_delay=2.0)
    try:
        outcome = await asyncio.wait_for(sender.submit(delivery(receiver.url)), 10)
    finally:
        await sender.aclose()
    assert outcome == "rejected" and len(receiver.received) == 2
    assert receiver.times[1] - receiver.times[0] >= 0.45


async def test_an_unreachable_endpoint_is_given_up_after_the_attempts() -> None:
    sender = WebhookSender(attempts=3, base_delay=0.01, timeout=2)
    try:
        outcome = await asyncio.wait_for(sender.submit(delivery("http://127.0.0.1:9/hook")), 10)
    finally:
        await sender.aclose()
    assert outcome == "gave_up"


async def test_a_wrong_secret_does_not_verify(receiver: Receiver) -> None:
    sender = WebhookSender(attempts=1)
    try:
        await sender.submit(delivery(receiver.url, secret=new_secret()))
    finally:
        await sender.aclose()
    assert [r["verified"] for r in receiver.received] == [False]


async def test_dispatcher_delivers_each_transition_once_and_never_blocks(receiver: Receiver) -> None:
    receiver.statuses = [500]
    ledger = MemoryLedger()
    dispatcher = Dispatcher(ledger, WebhookSender(base_delay=0.2))
    endpoint = Endpoint(receiver.url, SECRET)
    try:
        assert await dispatcher.observe("team-a/ftjob-1", "ftjob-1", "running", endpoint) is None
        started = time.monotonic()
        first = await dispatcher.observe("team-a/ftjob-1", "ftjob-1", "succeeded", endpoint, finished_at=1_700_000_100)
        assert first is not None and time.monotonic() - started < 0.1  # returned before the 500 and the retry
        for _ in range(5):  # polled again and again while delivering, and after
            assert await dispatcher.observe("team-a/ftjob-1", "ftjob-1", "succeeded", endpoint) is None
        await dispatcher.sender.drain(10)
        assert await dispatcher.observe("team-a/ftjob-1", "ftjob-1", "succeeded", endpoint) is None
        assert await dispatcher.observe("team-a/ftjob-2", "ftjob-2", "cancelled", None) is None  # no endpoint
        await dispatcher.observe("team-a/ftjob-3", "ftjob-3", "failed", endpoint)
        await dispatcher.sender.drain(10)
    finally:
        await dispatcher.aclose()
    assert [r["payload"]["data"]["id"] for r in receiver.received if r["verified"]] == ["ftjob-1", "ftjob-1", "ftjob-3"]
    assert receiver.received[0]["payload"]["created_at"] == 1_700_000_100
    assert ledger.entries == {
        ("team-a/ftjob-1", "fine_tuning.job.succeeded"): "delivered",
        ("team-a/ftjob-3", "fine_tuning.job.failed"): "delivered",
    }


async def test_a_pending_claim_left_by_a_stopped_process_is_resumed_once(receiver: Receiver, tmp_path: Path) -> None:
    ledger = FileLedger(tmp_path / "ledger.json")
    assert await ledger.claim("team-a/ftjob-9", "fine_tuning.job.succeeded")  # claimed, then the process died
    resumed = Dispatcher(FileLedger(tmp_path / "ledger.json"), WebhookSender())
    endpoint = Endpoint(receiver.url, SECRET)
    try:
        assert await resumed.observe("team-a/ftjob-9", "ftjob-9", "succeeded", endpoint) is not None
        await resumed.sender.drain(10)
        assert await resumed.observe("team-a/ftjob-9", "ftjob-9", "succeeded", endpoint) is None
    finally:
        await resumed.aclose()
    assert len(receiver.received) == 1
    assert FileLedger(tmp_path / "ledger.json").entries == {
        ("team-a/ftjob-9", "fine_tuning.job.succeeded"): "delivered"
    }


def test_endpoint_from_namespace_config_and_job_metadata() -> None:
    config = WebhookConfig(
        namespace="team-a", url="https://hooks.example.com/a", secret=SECRET, events=["fine_tuning.job.failed"]
    )
    assert endpoint_for(config, None) == Endpoint("https://hooks.example.com/a", SECRET, ("fine_tuning.job.failed",))
    assert endpoint_for(config, {"webhook_url": "https://other.example/x"}).url == "https://other.example/x"
    assert endpoint_for(None, {"team": "x"}) is None
    assert endpoint_for(WebhookConfig(namespace="team-a", secret=SECRET), None) is None  # a secret, no URL
    with pytest.raises(WebhookError) as err:
        endpoint_for(None, {"webhook_url": "https://other.example/x"})
    assert err.value.param == "metadata.webhook_url" and "no webhook secret" in str(err.value)
    with pytest.raises(WebhookError, match="credentials"):
        endpoint_for(config, {"webhook_url": "https://user:pw@other.example/x"})
