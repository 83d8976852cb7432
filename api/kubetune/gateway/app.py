"""The HTTP layer of `kubetune api`: OpenAI's fine-tuning endpoints under /v1, on FastAPI.

`create_app(backend, authenticate)` serves files, fine-tuning jobs (cancel, pause, resume, events,
checkpoints) and models with OpenAI's shapes, cursor pagination (`after`, `limit`, `has_more`,
`first_id`/`last_id`) and OpenAI's error envelope; FastAPI publishes the OpenAPI document at
/openapi.json (the schemathesis test reads it). It does what is the same for every backend:
authentication to a `Tenant`, request validation (400 naming the field as `param`), upload limits
(size, `.jsonl`, line count, UTF-8 JSON lines for `fine-tune` files) and the job request's own
checks (translate.check_request); the backend does the rest.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from fastapi import Body, Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer
from kubetune.gateway import translate
from kubetune.gateway.backend import MAX_LIMIT, Backend, GatewayError, Invalid, Tenant, TooLarge
from kubetune.gateway.objects import (
    FILE_PURPOSES,
    Checkpoint,
    ErrorEnvelope,
    Event,
    FileDeleted,
    FileObject,
    FineTuningJob,
    JobCreate,
    ListPage,
    Model,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

Authenticate = Callable[[Mapping[str, str]], Union[Tenant, Awaitable[Tenant]]]
"""Request headers → the caller's Tenant, or Unauthorized/Forbidden: gateway.auth.Authenticator (API keys
of an access file, Kubernetes tokens, or one anonymous local tenant)."""


@dataclass(frozen=True)
class UploadLimits:
    """What an upload may be. OpenAI caps a file at 512 MB; fine-tuning files are JSON Lines."""

    max_bytes: int = 512 * 1024 * 1024
    max_lines: int = 1_000_000
    chunk_bytes: int = 1 << 20


# ------------------------------------------------------------------------------------ app


_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorEnvelope} for code in (400, 401, 404, 413, 429, 503)}


def _param(loc: tuple[Any, ...]) -> Optional[str]:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    # pydantic adds the branch of a union (`int`, `literal['auto']`) to the location: not a field
    parts = [
        p
        for p in parts
        if not (
            p in ("int", "float", "str", "function-after[_batch(), int]")
            or p.startswith(("literal[", "function-", "union["))
        )
    ]
    return ".".join(parts) or None


def create_app(
    backend: Backend, authenticate: Authenticate, *, limits: UploadLimits = UploadLimits(), title: str = "kubetune api"
) -> FastAPI:
    """The ASGI app. A backend with `start()`/`close()` coroutines gets them on startup/shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if hasattr(backend, "start"):
            await backend.start()
        try:
            yield
        finally:
            if hasattr(backend, "close"):
                await backend.close()

    app = FastAPI(
        title=title,
        version="v1",
        lifespan=lifespan,
        description="OpenAI's fine-tuning API (files, fine-tuning jobs, models), served by kubetune.",
    )
    bearer = HTTPBearer(auto_error=False, description="An API key: Authorization: Bearer <key>.")

    async def tenant_of(request: Request, _: Any = Depends(bearer)) -> Tenant:
        result = authenticate(request.headers)
        return await result if inspect.isawaitable(result) else result

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, err: GatewayError) -> JSONResponse:
        return JSONResponse(err.envelope(), status_code=err.status, headers=err.headers())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        first = errors[0] if errors else {}
        param = _param(tuple(first.get("loc") or ()))
        msg = str(first.get("msg") or "invalid request")
        if first.get("type") == "extra_forbidden":
            msg = f"Unrecognized request argument supplied: {param}"
        elif first.get("type") == "json_invalid":
            msg = "the body is not valid JSON"
        message = f"{param}: {msg}" if param and not msg.startswith("Unrecognized") else msg
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return JSONResponse(Invalid(message, param=param).envelope(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if err.status_code == 404 else "invalid_request_error"
        body = {
            "error": {
                "message": f"{request.method} {request.url.path}: {err.detail}",
                "type": "invalid_request_error",
                "param": None,
                "code": kind,
            }
        }
        return JSONResponse(body, status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:  # pragma: no cover - a bug
        import logging

        logging.getLogger("kubetune.gateway").exception("unexpected error on %s %s", request.method, request.url.path)
        body = {
            "error": {
                "message": f"internal error ({type(err).__name__}); the server log has details",
                "type": "server_error",
                "param": None,
                "code": "internal_error",
            }
        }
        return JSONResponse(body, status_code=500)

    def Id() -> Any:  # a fresh FieldInfo per parameter (FastAPI binds one to its first name)
        return PathParam(min_length=1, max_length=256)

    # ----------------------------------------------------------------------------- files

    @app.post("/v1/files", response_model=FileObject, responses=_ERRORS, tags=["files"])
    async def create_file(
        request: Request, file: UploadFile = File(...), purpose: str = Form(...), tenant: Tenant = Depends(tenant_of)
    ) -> FileObject:
        if purpose not in FILE_PURPOSES:
            raise Invalid(f"purpose {purpose!r} is not one of {', '.join(FILE_PURPOSES)}", param="purpose")
        if purpose != "fine-tune":
            raise Invalid(
                f'purpose {purpose!r}: this server stores fine-tuning files only; use purpose="fine-tune"',
                param="purpose",
            )
        filename = Path(file.filename or "").name
        if not filename.endswith(".jsonl"):
            raise Invalid(
                f"file {filename or '(unnamed)'!r}: fine-tuning files are JSON Lines; name it *.jsonl, "
                "one JSON object per line",
                param="file",
            )
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_bytes + 64 * 1024:
            raise TooLarge(
                f"the upload is {int(declared):,} bytes; at most {limits.max_bytes:,} are accepted "
                "(split the data into several files)",
                param="file",
            )
        return await backend.create_file(tenant, filename, purpose, _checked_chunks(file, limits))

    @app.get("/v1/files", response_model=ListPage[FileObject], responses=_ERRORS, tags=["files"])
    async def list_files(
        after: Optional[str] = Query(None, max_length=256),
        limit: int = Query(10_000, ge=1, le=MAX_LIMIT),
        order: str = Query("desc", pattern="^(asc|desc)$"),
        purpose: Optional[str] = Query(None, max_length=64),
        tenant: Tenant = Depends(tenant_of),
    ) -> Any:
        return await backend.list_files(tenant, purpose=purpose, after=after, limit=limit, order=order)

    @app.get("/v1/files/{file_id}", response_model=FileObject, responses=_ERRORS, tags=["files"])
    async def get_file(file_id: str = Id(), tenant: Tenant = Depends(tenant_of)) -> Any:
        return await backend.get_file(tenant, file_id)

    @app.delete("/v1/files/{file_id}", response_model=FileDeleted, responses=_ERRORS, tags=["files"])
    async def delete_file(file_id: str = Id(), tenant: Tenant = Depends(tenant_of)) -> Any:
        return await backend.delete_file(tenant, file_id)

    @app.get(
        "/v1/files/{file_id}/content",
        responses={200: {"content": {"application/octet-stream": {}}}, **_ERRORS},
        tags=["files"],
        response_class=StreamingResponse,
    )
    async def file_content(file_id: str = Id(), tenant: Tenant = Depends(tenant_of)) -> StreamingResponse:
        meta = await backend.get_file(tenant, file_id)
        chunks = await backend.file_content(tenant, file_id)
        return StreamingResponse(
            chunks,
            media_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{meta.filename}"'},
        )

    # ----------------------------------------------------------------------------- jobs

    @app.post("/v1/fine_tuning/jobs", response_model=FineTuningJob, responses=_ERRORS, tags=["fine-tuning"])
    async def create_job(body: JobCreate, tenant: Tenant = Depends(tenant_of)) -> Any:
        translate.check_request(body)
        for param in ("training_file", "validation_file"):
            file_id = getattr(body, param)
            if file_id is None:
                continue
            try:
                meta = await backend.get_file(tenant, file_id)
            except GatewayError as err:
                if err.status == 404:
                    raise Invalid(
                        f'{param} {file_id!r}: no such file; upload it with files.create(purpose="fine-tune")',
                        param=param,
                        code="invalid_file",
                    ) from None
                raise
            if meta.purpose != "fine-tune":
                raise Invalid(
                    f"{param} {file_id!r} was uploaded with purpose {meta.purpose!r}; upload it with "
                    'purpose="fine-tune"',
                    param=param,
                    code="invalid_file",
                )
        return await backend.create_job(tenant, body)

    @app.get("/v1/fine_tuning/jobs", response_model=ListPage[FineTuningJob], responses=_ERRORS, tags=["fine-tuning"])
    async def list_jobs(
        request: Request,
        after: Optional[str] = Query(None, max_length=256),
        limit: int = Query(20, ge=1, le=MAX_LIMIT),
        tenant: Tenant = Depends(tenant_of),
    ) -> Any:
        metadata = {
            k[len("metadata[") : -1]: v
            for k, v in request.query_params.multi_items()
            if k.startswith("metadata[") and k.endswith("]")
        }
        return await backend.list_jobs(tenant, after=after, limit=limit, metadata=metadata)

    @app.get("/v1/fine_tuning/jobs/{job_id}", response_model=FineTuningJob, responses=_ERRORS, tags=["fine-tuning"])
    async def get_job(job_id: str = Id(), tenant: Tenant = Depends(tenant_of)) -> Any:
        return await backend.get_job(tenant, job_id)

    @app.post(
        "/v1/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJob, responses=_ERRORS, tags=["fine-tuning"]
    )
    async def cancel_job(job_id: str = Id(), tenant: Tenant = Depends(tenant_of)) -> Any:
        return await backend.cancel_job(tenant, job_id)

    @app.post(
        "/v1/fine_tuning/jobs/{job_id}/pause", response_model=FineTuningJob, responses=_ERRORS, tags=["fine-tuning"]
    )
    async def pause_job(job_id: str = Id(), tenant: Tenant = Depends(tenant_of)) -> Any:
        return await backend.pause_job(tenant, job_id)

    @app.post(
        "/v1/fine_tuning/jobs/{job_id}/resume", response_model=FineTuningJob, responses=_ERRORS, tags=["fine-tuning"]
    )
    async def resume_job(job_id: str = Id(), tenant: Tenant = Depends(tenant_of)) -> Any:
        return await backend.resume_job(tenant, job_id)

    @app.get(
        "/v1/fine_tuning/jobs/{job_id}/events", response_model=ListPage[Event], responses=_ERRORS, tags=["fine-tuning"]
    )
    async def list_events(
        job_id: str = Id(),
        after: Optional[str] = Query(None, max_length=256),
        limit: int = Query(20, ge=1, le=MAX_LIMIT),
        tenant: Tenant = Depends(tenant_of),
    ) -> Any:
        return await backend.list_events(tenant, job_id, after=after, limit=limit)

    @app.get(
        "/v1/fine_tuning/jobs/{job_id}/checkpoints",
        response_model=ListPage[Checkpoint],
        responses=_ERRORS,
        tags=["fine-tuning"],
    )
    async def list_checkpoints(
        job_id: str = Id(),
        after: Optional[str] = Query(None, max_length=256),
        limit: int = Query(10, ge=1, le=MAX_LIMIT),
        tenant: Tenant = Depends(tenant_of),
    ) -> Any:
        return await backend.list_checkpoints(tenant, job_id, after=after, limit=limit)

    # ----------------------------------------------------------------------------- models

    @app.get("/v1/models", response_model=ListPage[Model], responses=_ERRORS, tags=["models"])
    async def list_models(tenant: Tenant = Depends(tenant_of)) -> Any:
        models = await backend.list_models(tenant)
        return ListPage(
            data=models,
            has_more=False,
            first_id=models[0].id if models else None,
            last_id=models[-1].id if models else None,
        )

    @app.get("/v1/models/{model_id:path}", response_model=Model, responses=_ERRORS, tags=["models"])
    async def get_model(model_id: str, tenant: Tenant = Depends(tenant_of)) -> Any:
        return await backend.get_model(tenant, model_id)

    if hasattr(backend, "chat_completions"):

        @app.post(
            "/v1/chat/completions",
            responses={200: {"content": {"application/json": {}, "text/event-stream": {}}}, **_ERRORS},
            tags=["models"],
            response_class=StreamingResponse,
        )
        async def chat_completions(
            body: dict[str, Any] = Body(...), tenant: Tenant = Depends(tenant_of)
        ) -> StreamingResponse:
            """Chat with a fine-tuned model of the caller (OpenAI's request and response, streamed or not)."""
            status, headers, chunks = await backend.chat_completions(tenant, body)
            return StreamingResponse(chunks, status_code=status, media_type=headers.get("content-type"))

    return app


async def _checked_chunks(file: UploadFile, limits: UploadLimits) -> AsyncIterator[bytes]:
    """The upload in chunks, refused midway (nothing kept) past the size or line limit; every line
    must be UTF-8. The record checks come with the job (the trainer's checks, with line numbers)."""
    size = lines = 0
    last = b"\n"
    while chunk := await file.read(limits.chunk_bytes):
        size += len(chunk)
        if size > limits.max_bytes:
            raise TooLarge(
                f"the file is larger than {limits.max_bytes:,} bytes; split it into several files", param="file"
            )
        lines += chunk.count(b"\n")
        if lines > limits.max_lines:
            raise Invalid(
                f"the file has more than {limits.max_lines:,} lines; split it into several files", param="file"
            )
        last = chunk[-1:]
        yield chunk
    if size == 0:
        raise Invalid("the file is empty; a fine-tuning file has one JSON example per line", param="file")
    if last != b"\n" and lines + 1 > limits.max_lines:
        raise Invalid(f"the file has more than {limits.max_lines:,} lines; split it into several files", param="file")
