"""The seam between the HTTP layer and a backend: who is calling, what can go wrong, what a
backend does.

`app.py` authenticates a request to a `Tenant`, then calls one `Backend` method; a backend raises
one of the `GatewayError`s below, which the app turns into OpenAI's error envelope
`{"error": {message, type, param, code}}` with the HTTP status the official client expects (it
maps 400/401/403/404/409/422/429/≥500 to typed exceptions, and retries 408, 409, 429 and ≥ 500 —
so 409 only for real conflicts, and `Retry-After` where a retry can help).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Optional, Protocol, TypeVar, runtime_checkable

from kubetune.gateway.objects import (
    Checkpoint,
    Event,
    FileDeleted,
    FileObject,
    FineTuningJob,
    JobCreate,
    ListPage,
    Model,
)

# ------------------------------------------------------------------------------------ tenant


@dataclass(frozen=True)
class Tenant:
    """Whom a request acts for: every object a backend returns belongs to exactly one namespace,
    and a tenant only ever sees its own (tests/gateway/test_tenancy.py)."""

    namespace: str
    organization_id: str
    key_id: str
    """Which credential authenticated (a key's name, never the key): for logs and audits."""


# ------------------------------------------------------------------------------------ errors


class GatewayError(Exception):
    """An error with its OpenAI envelope; subclasses fix the HTTP status and `type`."""

    status: int = 500
    type: str = "server_error"
    default_code: Optional[str] = None

    def __init__(
        self, message: str, param: Optional[str] = None, code: Optional[str] = None, retry_after: Optional[int] = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.retry_after = retry_after

    def envelope(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class Invalid(GatewayError):
    """The request cannot be served as sent: `param` names the field (`method.type`,
    `hyperparameters.n_epochs`, `training_file`), the message says what to do."""

    status, type, default_code = 400, "invalid_request_error", "invalid_request"


class Unauthorized(GatewayError):
    status, type, default_code = 401, "invalid_request_error", "invalid_api_key"


class Forbidden(GatewayError):
    status, type, default_code = 403, "invalid_request_error", "permission_denied"


class NotFound(GatewayError):
    """No such object for this tenant (another tenant's objects are not found either, never 403:
    their ids must not be confirmable)."""

    status, type, default_code = 404, "invalid_request_error", "not_found"


class Conflict(GatewayError):
    """The object's state forbids the action (cancel a finished job, resume one not paused)."""

    status, type, default_code = 409, "invalid_request_error", "conflict"


class TooLarge(GatewayError):
    status, type, default_code = 413, "invalid_request_error", "file_too_large"


class RateLimited(GatewayError):
    """Too many requests or jobs; `retry_after` seconds become `Retry-After`."""

    status, type, default_code = 429, "rate_limit_error", "rate_limit_exceeded"


class Unavailable(GatewayError):
    """The backend cannot answer now (the API server or object store is down): retried by the client."""

    status, type, default_code = 503, "server_error", "service_unavailable"


# ------------------------------------------------------------------------------------ paging

T = TypeVar("T")

MAX_LIMIT = 10_000
"""OpenAI's files.list accepts limit up to 10 000; jobs, events and checkpoints up to 100 there,
but a larger page harms nobody here."""


def paginate(items: Sequence[T], after: Optional[str], limit: int, key=lambda o: o.id) -> ListPage:
    """One cursor page of `items` (already in the listing's order, newest first): those after the
    one whose id is `after` (an unknown cursor is a 400 naming `after`), at most `limit`."""
    start = 0
    if after:
        ids = [key(o) for o in items]
        if after not in ids:
            raise Invalid(f"no object with id {after!r} in this list; pass an id from a previous page", param="after")
        start = ids.index(after) + 1
    page = list(items[start : start + limit])
    return ListPage(
        data=page,
        has_more=start + limit < len(items),
        first_id=key(page[0]) if page else None,
        last_id=key(page[-1]) if page else None,
    )


# ------------------------------------------------------------------------------------ backend


@runtime_checkable
class Backend(Protocol):
    """What `app.py` needs. Every method acts for `tenant` only; ids of other tenants' objects
    raise NotFound. Lists are newest first. Upload limits and the request's own validation are
    the app's; the data checks of a job's files are the backend's (the job is `validating_files`
    until they pass, then `queued`, or `failed` with `error.param` naming the file line)."""

    # files
    async def create_file(
        self, tenant: Tenant, filename: str, purpose: str, chunks: AsyncIterator[bytes]
    ) -> FileObject:
        """Store an upload. `chunks` may raise a GatewayError midway (an upload limit): then
        nothing of it may be kept. The backend records size and sha256."""
        ...

    async def list_files(
        self, tenant: Tenant, *, purpose: Optional[str], after: Optional[str], limit: int, order: str = "desc"
    ) -> ListPage: ...

    async def get_file(self, tenant: Tenant, file_id: str) -> FileObject: ...

    async def file_content(self, tenant: Tenant, file_id: str) -> AsyncIterator[bytes]:
        """The file's bytes; NotFound is raised here, before the first chunk is sent."""
        ...

    async def delete_file(self, tenant: Tenant, file_id: str) -> FileDeleted: ...

    # jobs
    async def create_job(self, tenant: Tenant, request: JobCreate) -> FineTuningJob: ...

    async def list_jobs(
        self, tenant: Tenant, *, after: Optional[str], limit: int, metadata: dict[str, str]
    ) -> ListPage:
        """Jobs whose metadata has every pair of `metadata`."""
        ...

    async def get_job(self, tenant: Tenant, job_id: str) -> FineTuningJob: ...

    async def cancel_job(self, tenant: Tenant, job_id: str) -> FineTuningJob: ...

    async def pause_job(self, tenant: Tenant, job_id: str) -> FineTuningJob: ...

    async def resume_job(self, tenant: Tenant, job_id: str) -> FineTuningJob: ...

    async def list_events(self, tenant: Tenant, job_id: str, *, after: Optional[str], limit: int) -> ListPage: ...

    async def list_checkpoints(self, tenant: Tenant, job_id: str, *, after: Optional[str], limit: int) -> ListPage: ...

    # models
    async def list_models(self, tenant: Tenant) -> list[Model]: ...

    async def get_model(self, tenant: Tenant, model_id: str) -> Model: ...


__all__ = [
    "Backend",
    "Checkpoint",
    "Conflict",
    "Event",
    "FileDeleted",
    "FileObject",
    "FineTuningJob",
    "Forbidden",
    "GatewayError",
    "Invalid",
    "JobCreate",
    "ListPage",
    "Model",
    "NotFound",
    "RateLimited",
    "Tenant",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "paginate",
]
