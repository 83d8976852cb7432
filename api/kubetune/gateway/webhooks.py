"""Webhooks: tell a tenant's endpoint when a fine-tuning job ends, as OpenAI does.

Events `fine_tuning.job.succeeded | failed | cancelled`, payload `{id, object: "event", created_at,
type, data: {id}}` (../shared/OPENAI_API.md), signed per the Standard Webhooks scheme: headers
`webhook-id`, `webhook-timestamp` and `webhook-signature: v1,<base64 HMAC-SHA256(secret,
"{id}.{timestamp}.{body}")>`, computed by the `standardwebhooks` reference library. Receivers verify
with the same library (`Webhook(secret).verify(body, headers)`) and drop duplicates by `webhook-id`.

Where deliveries go: one endpoint per namespace in the access file (`webhooks:`, see
kubetune.gateway.auth), with its signing secret (`whsec_` + base64, as the spec's libraries make
them); a job's `metadata.webhook_url` sends that job's events elsewhere, signed with the
namespace's secret (so a namespace without a webhook secret cannot name one).

How: `WebhookSender` posts in background asyncio tasks, never awaited on a request path or by a
backend's status handling; a refused or unreachable endpoint (network error, 408, 429, 5xx) is
retried with exponential backoff (`Retry-After` honoured), other 4xx end the delivery.

Once per transition: a `Ledger` remembers each (job, event) it claimed; `Dispatcher.observe` only
submits what the ledger lets it claim. The event id is derived from (job id, event type), so a
delivery re-sent after a restart carries the same `webhook-id` and receivers see one event. In
Kubernetes mode the ledger is an annotation on the FineTuneJob (kubetune.gateway.kube), claimed
with a resourceVersion precondition; `MemoryLedger` and `FileLedger` serve tests and one machine.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Optional, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

log = logging.getLogger(__name__)

EventType = Literal["fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"]
EVENTS: dict[str, EventType] = {
    "succeeded": "fine_tuning.job.succeeded",
    "failed": "fine_tuning.job.failed",
    "cancelled": "fine_tuning.job.cancelled",
}
"""The OpenAI job status that ends a job → the webhook event type it fires."""
JOB_URL_METADATA = "webhook_url"
"""A job's metadata key naming its own endpoint (overrides the namespace's URL, not its secret)."""
USER_AGENT = "kubetune-webhooks/1"
MAX_URL = 2048


class WebhookError(ValueError):
    """A webhook setting that cannot be used; `param` names it (`metadata.webhook_url`)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _check_url(url: str) -> str:
    from urllib.parse import urlsplit

    if len(url) > MAX_URL:
        raise ValueError(f"is {len(url)} characters long; at most {MAX_URL} are allowed")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{url[:100]!r} is not an http(s) URL with a host")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials (user:password@): the signature authenticates the gateway")
    return url


def check_secret(secret: str) -> str:
    """A Standard Webhooks secret: `whsec_` + base64 of 24 to 64 random bytes."""
    body = secret.removeprefix("whsec_")
    try:
        raw = base64.b64decode(body + "==", validate=False)
    except (ValueError, TypeError):
        raw = b""
    if not secret.startswith("whsec_") or not 24 <= len(raw) <= 64:
        raise ValueError(
            "must be `whsec_` followed by the base64 of 24 to 64 random bytes, e.g. "
            "whsec_$(head -c 32 /dev/urandom | base64)"
        )
    return secret


def new_secret() -> str:
    """A fresh signing secret in the spec's format."""
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


class WebhookConfig(BaseModel):
    """One namespace's webhook: where its jobs' end events go and the secret that signs them."""

    model_config = ConfigDict(extra="forbid")

    namespace: str = Field(
        max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", description="The namespace whose jobs report here."
    )
    url: Optional[str] = Field(
        default=None, description="The endpoint (http or https). Unset: only jobs with metadata.webhook_url report."
    )
    secret: str = Field(description="Standard Webhooks signing secret, whsec_<base64>.", repr=False)
    events: list[EventType] = Field(
        default_factory=lambda: list(EVENTS.values()), description="Which events to send (default all three)."
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: Optional[str]) -> Optional[str]:
        return None if value is None else _check_url(value)

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: str) -> str:
        return check_secret(value)


@dataclass(frozen=True)
class Endpoint:
    url: str
    secret: str
    events: tuple[str, ...] = tuple(EVENTS.values())


def endpoint_for(config: Optional[WebhookConfig], metadata: Optional[Mapping[str, str]]) -> Optional[Endpoint]:
    """Where a job's events go: `metadata.webhook_url` or the namespace's URL, signed with the
    namespace's secret; None when neither names a URL. WebhookError when the job names a URL the
    gateway cannot sign for or use (check it when the job is created, so the user hears of it)."""
    url = (metadata or {}).get(JOB_URL_METADATA)
    if url is not None:
        if config is None:
            raise WebhookError(
                f"this namespace has no webhook secret to sign deliveries with; drop "
                f"metadata.{JOB_URL_METADATA} or ask your kubetune administrator to add one for it "
                "(`webhooks:` in the gateway's access file)",
                param=f"metadata.{JOB_URL_METADATA}",
            )
        try:
            url = _check_url(url)
        except ValueError as err:
            raise WebhookError(f"metadata.{JOB_URL_METADATA} {err}", param=f"metadata.{JOB_URL_METADATA}") from None
    elif config is not None:
        url = config.url
    if url is None or config is None:
        return None
    return Endpoint(url=url, secret=config.secret, events=tuple(config.events))


# ------------------------------------------------------------------------------ messages


def event_id(job_id: str, event_type: str) -> str:
    """The event's id, fixed by the job and the event: a re-sent delivery is recognisably the same."""
    return "evt_" + hashlib.sha256(f"{job_id}\0{event_type}".encode()).hexdigest()[:24]


def event_payload(job_id: str, event_type: str, created_at: int) -> dict[str, Any]:
    """OpenAI's webhook event object."""
    return {
        "id": event_id(job_id, event_type),
        "object": "event",
        "created_at": int(created_at),
        "type": event_type,
        "data": {"id": job_id},
    }


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    """`webhook-signature`: v1,<base64 HMAC-SHA256(secret, "{msg_id}.{timestamp}.{body}")>."""
    from standardwebhooks.webhooks import Webhook

    return Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, tz=UTC), body)


def signed_headers(secret: str, msg_id: str, body: str, timestamp: Optional[int] = None) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else int(timestamp)
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, msg_id, ts, body),
    }


@dataclass(frozen=True)
class Delivery:
    """One event for one endpoint; `key` identifies the job to the ledger (e.g. namespace/name)."""

    key: str
    job_id: str
    event_type: str
    endpoint: Endpoint
    created_at: int

    @property
    def id(self) -> str:
        return event_id(self.job_id, self.event_type)

    @property
    def body(self) -> str:
        return json.dumps(event_payload(self.job_id, self.event_type, self.created_at), separators=(",", ":"))


# ------------------------------------------------------------------------------ sending

Outcome = Literal["delivered", "rejected", "gave_up"]
RETRIED_STATUSES = frozenset({408, 409, 425, 429})


class WebhookSender:
    """Posts deliveries in background tasks, retrying with exponential backoff.

    `attempts` tries in all; the wait before try n+1 is `base_delay · 2ⁿ` (capped at `max_delay`,
    ±20 % jitter), or the endpoint's `Retry-After` when it is longer (still capped). `on_done(delivery,
    outcome)` is awaited once per delivery: `delivered` (a 2xx), `rejected` (a 4xx other than 408,
    409, 425, 429: retrying cannot help) or `gave_up` (attempts exhausted)."""

    def __init__(
        self,
        *,
        attempts: int = 8,
        base_delay: float = 2.0,
        max_delay: float = 600.0,
        timeout: float = 15.0,
        on_done: Optional[Callable[[Delivery, Outcome], Awaitable[None]]] = None,
        on_attempt: Optional[Callable[[Delivery, str], None]] = None,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.attempts, self.base_delay, self.max_delay, self.timeout = attempts, base_delay, max_delay, timeout
        self.on_done = on_done
        self.on_attempt = on_attempt
        self._tasks: dict[str, asyncio.Task[Outcome]] = {}
        self._session: Any = None

    def in_flight(self, key: str, event_type: str) -> bool:
        task = self._tasks.get(f"{key}\0{event_type}")
        return task is not None and not task.done()

    def submit(self, delivery: Delivery) -> asyncio.Task[Outcome]:
        """Start delivering in the background (at most one task per job and event); returns its task."""
        slot = f"{delivery.key}\0{delivery.event_type}"
        task = self._tasks.get(slot)
        if task is not None and not task.done():
            return task
        task = asyncio.get_running_loop().create_task(self._run(delivery), name=f"webhook {delivery.id}")
        self._tasks[slot] = task

        def forget(done: asyncio.Task[Outcome]) -> None:
            if self._tasks.get(slot) is done:
                self._tasks.pop(slot, None)

        task.add_done_callback(forget)
        return task

    def delay(self, attempt: int, retry_after: Optional[float] = None) -> float:
        """Seconds to wait after failed try number `attempt` (0-based)."""
        backoff = min(self.max_delay, self.base_delay * (2**attempt)) * random.uniform(0.8, 1.2)
        if retry_after is not None:
            backoff = max(backoff, retry_after)
        return min(backoff, self.max_delay)

    async def _client(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def send_once(self, delivery: Delivery) -> tuple[Optional[int], Optional[float], str]:
        """One try: (HTTP status or None, Retry-After seconds or None, what happened)."""
        import aiohttp

        body = delivery.body
        headers = signed_headers(delivery.endpoint.secret, delivery.id, body)
        session = await self._client()
        try:
            async with session.post(
                delivery.endpoint.url, data=body.encode(), headers=headers, allow_redirects=False
            ) as resp:
                await resp.read()
                retry_after = None
                with contextlib.suppress(TypeError, ValueError):
                    retry_after = float(resp.headers.get("Retry-After", ""))
                return resp.status, retry_after, f"HTTP {resp.status}"
        except (TimeoutError, aiohttp.ClientError, OSError) as err:
            return None, None, f"{type(err).__name__}: {err}"

    async def _run(self, delivery: Delivery) -> Outcome:
        outcome: Outcome = "gave_up"
        for attempt in range(self.attempts):
            status, retry_after, what = await self.send_once(delivery)
            if self.on_attempt is not None:
                self.on_attempt(delivery, "ok" if status is not None and 200 <= status < 300 else what)
            if status is not None and 200 <= status < 300:
                outcome = "delivered"
                break
            if status is not None and 400 <= status < 500 and status not in RETRIED_STATUSES:
                log.warning(
                    "webhook %s for job %s to %s refused (%s): not retried",
                    delivery.event_type,
                    delivery.job_id,
                    delivery.endpoint.url,
                    what,
                )
                outcome = "rejected"
                break
            if attempt + 1 < self.attempts:
                wait = self.delay(attempt, retry_after)
                log.info(
                    "webhook %s for job %s to %s failed (%s); try %d of %d in %.1f s",
                    delivery.event_type,
                    delivery.job_id,
                    delivery.endpoint.url,
                    what,
                    attempt + 2,
                    self.attempts,
                    wait,
                )
                await asyncio.sleep(wait)
        else:
            log.warning(
                "webhook %s for job %s to %s: giving up after %d tries",
                delivery.event_type,
                delivery.job_id,
                delivery.endpoint.url,
                self.attempts,
            )
        if self.on_done is not None:
            try:
                await self.on_done(delivery, outcome)
            except Exception:
                log.exception("recording the webhook outcome of job %s failed", delivery.job_id)
        return outcome

    async def drain(self, timeout: Optional[float] = None) -> None:
        """Wait for every delivery in flight (tests; a graceful shutdown)."""
        tasks = [t for t in self._tasks.values() if not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def aclose(self) -> None:
        """Stop: cancel deliveries in flight (their ledger entries stay `pending` and are resumed
        by the next process) and close the HTTP session."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None


# ------------------------------------------------------------------------------ once per transition

LedgerState = Literal["pending", "delivered", "rejected", "gave_up"]


class Ledger(Protocol):
    """What was sent for which job. `claim` returns True exactly once per (key, event type)
    across every process sharing the ledger, `resume` lists claims still pending (a process
    stopped while delivering them)."""

    async def claim(self, key: str, event_type: str) -> bool: ...

    async def record(self, key: str, event_type: str, state: LedgerState) -> None: ...

    async def state(self, key: str, event_type: str) -> Optional[LedgerState]: ...


class MemoryLedger:
    """A ledger in this process only (tests)."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], LedgerState] = {}

    async def claim(self, key: str, event_type: str) -> bool:
        if (key, event_type) in self.entries:
            return False
        self.entries[(key, event_type)] = "pending"
        return True

    async def record(self, key: str, event_type: str, state: LedgerState) -> None:
        self.entries[(key, event_type)] = state

    async def state(self, key: str, event_type: str) -> Optional[LedgerState]:
        return self.entries.get((key, event_type))


class FileLedger(MemoryLedger):
    """A ledger in a JSON file (one machine, survives restarts); written atomically."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = Path(path)
        with contextlib.suppress(FileNotFoundError, ValueError):
            for row in json.loads(self.path.read_text()):
                self.entries[(row["key"], row["type"])] = row["state"]

    def _save(self) -> None:
        rows = [{"key": k, "type": t, "state": s} for (k, t), s in sorted(self.entries.items())]
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        os.replace(tmp, self.path)

    async def claim(self, key: str, event_type: str) -> bool:
        claimed = await super().claim(key, event_type)
        if claimed:
            self._save()
        return claimed

    async def record(self, key: str, event_type: str, state: LedgerState) -> None:
        await super().record(key, event_type, state)
        self._save()


class Dispatcher:
    """Turns observed job states into deliveries, once each.

    A backend calls `observe` with every job state it sees (a poll, a watch event, a status
    write); `observe` returns at once. Terminal statuses with an endpoint are claimed in the
    ledger and handed to the sender; the outcome is recorded back in the ledger. A claim found
    `pending` the first time this process sees the job (the previous process stopped midway) is
    delivered again, with the same webhook-id: at least once, and receivers drop the repeat."""

    def __init__(self, ledger: Ledger, sender: Optional[WebhookSender] = None) -> None:
        self.ledger = ledger
        self.sender = sender or WebhookSender()
        self._seen: set[tuple[str, str]] = set()
        previous = self.sender.on_done

        async def done(delivery: Delivery, outcome: Outcome) -> None:
            await self.ledger.record(delivery.key, delivery.event_type, outcome)
            if previous is not None:
                await previous(delivery, outcome)

        self.sender.on_done = done

    async def observe(
        self, key: str, job_id: str, status: str, endpoint: Optional[Endpoint], finished_at: Optional[int] = None
    ) -> Optional[Delivery]:
        """Deliver the job's end event if it just ended and was not delivered; returns the
        delivery started, if any."""
        event_type = EVENTS.get(status)
        if event_type is None or endpoint is None or event_type not in endpoint.events:
            return None
        if self.sender.in_flight(key, event_type):
            return None
        delivery = Delivery(
            key=key, job_id=job_id, event_type=event_type, endpoint=endpoint, created_at=int(finished_at or time.time())
        )
        first_look = (key, event_type) not in self._seen
        self._seen.add((key, event_type))
        if not await self.ledger.claim(key, event_type):  # noqa: SIM102 -- claim first, then ask
            # Claimed before: delivered, refused or given up on, or still being delivered by
            # another replica; only a claim left pending by a stopped process is resumed, once,
            # when this process first sees it.
            if not first_look or await self.ledger.state(key, event_type) != "pending":
                return None
        self.sender.submit(delivery)
        return delivery

    async def aclose(self) -> None:
        await self.sender.aclose()


__all__ = [
    "EVENTS",
    "JOB_URL_METADATA",
    "Delivery",
    "Dispatcher",
    "Endpoint",
    "FileLedger",
    "Ledger",
    "MemoryLedger",
    "WebhookConfig",
    "WebhookError",
    "WebhookSender",
    "endpoint_for",
    "event_id",
    "event_payload",
    "new_secret",
    "sign",
    "signed_headers",
]
