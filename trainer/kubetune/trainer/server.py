"""`kubetune serve`: an OpenAI-compatible HTTP server for finished outputs, on aiohttp.

So that the official `openai` client (and anything built on it) can talk to a fine-tuned model
on a laptop: `GET /v1/models`, `POST /v1/chat/completions` (streamed as server-sent events or
not) and `POST /v1/completions`, with OpenAI's error body `{"error": {message, type, param,
code}}`. Tuned outputs are listed as `ft:<base>:<name>` with `parent` (the base's id) and `root`
(where the output came from), as vLLM lists LoRA modules; the bases are listed too.

Generation is `inference.ModelPool`: one request at a time, in worker threads, so the event loop
keeps answering `/v1/models` while a model generates. Production serving belongs to vLLM or
KServe (spec.serving).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from functools import partial
from typing import Any, Literal, Union

from aiohttp import web
from kubetune.trainer.inference import ModelPool, RequestError, Served, Stream
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger(__name__)
POOL: web.AppKey[ModelPool] = web.AppKey("pool", ModelPool)
CREATED: web.AppKey[int] = web.AppKey("created", int)


# ----------------------------------------------------------------------------------- requests


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # accept (and ignore) fields we do not implement

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: Any) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    def params(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "stop": self.stop,
        }


class _Part(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[_Part], None] = None

    def plain(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(_Request):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: Union[str, list[str]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for /v1/completions


# ------------------------------------------------------------------------------------- errors


def error(
    status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}, status=status
    )


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:  # unknown routes and methods, in OpenAI's shape
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status)
        return error(exc.status, f"{request.method} {request.path}: {exc.reason}", param=None, code=code)
    except Exception:
        log.exception("request %s %s failed", request.method, request.path)
        return error(500, "the server failed to answer this request; see the server's log", "server_error")


async def _parse(request: web.Request, model: type[_Request]) -> _Request | web.Response:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return error(400, "the request body is not valid JSON")
    if not isinstance(body, dict):
        return error(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".") or None
        return error(400, f"{param}: {first['msg']}" if param else first["msg"], param=param)


def _served(pool: ModelPool, name: str) -> Served | web.Response:
    try:
        return pool.get(name)
    except KeyError:
        known = ", ".join(sorted(pool.models))
        return error(
            404, f"The model `{name}` does not exist. This server has: {known}", param="model", code="model_not_found"
        )


# ------------------------------------------------------------------------------------- models


def _model_card(served: Served, created: int) -> dict[str, Any]:
    return {
        "id": served.id,
        "object": "model",
        "created": created,
        "owned_by": "kubetune",
        "root": served.root,
        "parent": served.parent,
    }


async def list_models(request: web.Request) -> web.Response:
    pool, created = request.app[POOL], request.app[CREATED]
    return web.json_response({"object": "list", "data": [_model_card(m, created) for m in pool.models.values()]})


async def get_model(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    served = pool.models.get(request.match_info["model"])
    if served is None:
        return error(
            404, f"The model `{request.match_info['model']}` does not exist", param="model", code="model_not_found"
        )
    return web.json_response(_model_card(served, request.app[CREATED]))


# -------------------------------------------------------------------------------- completions


async def chat_completions(request: web.Request) -> web.StreamResponse:
    req = await _parse(request, ChatRequest)
    if isinstance(req, web.Response):
        return req
    assert isinstance(req, ChatRequest)
    return await _answer(request, req, "chat", lambda pool, s: pool.chat_ids(s, [m.plain() for m in req.messages]))


async def completions(request: web.Request) -> web.StreamResponse:
    req = await _parse(request, CompletionRequest)
    if isinstance(req, web.Response):
        return req
    assert isinstance(req, CompletionRequest)
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            return error(400, "this server answers one prompt per request; send a string", param="prompt")
        prompt = prompt[0]
    return await _answer(request, req, "text", lambda pool, s: pool.text_ids(s, prompt))


async def _answer(request: web.Request, req: Any, kind: str, render: Any) -> web.StreamResponse:
    pool = request.app[POOL]
    loop = asyncio.get_running_loop()
    try:
        served = await loop.run_in_executor(None, _served, pool, req.model)
    except Exception as err:
        return error(
            400,
            f"model {req.model} is listed but cannot be loaded here: {err}",
            param="model",
            code="model_not_available",
        )
    if isinstance(served, web.Response):
        return served
    params = req.params()
    if kind == "chat" and req.max_completion_tokens is not None:
        params["max_tokens"] = req.max_completion_tokens
    try:
        ids = render(pool, served)
        seeds = [None if req.seed is None else req.seed + i for i in range(req.n)]  # n differing samples, repeatable
        if not req.stream:
            done = [
                await loop.run_in_executor(None, partial(pool.complete, served, ids, seed=seed, **params))
                for seed in seeds
            ]
            return web.json_response(_full_body(kind, served.id, done))
        # The first generation starts before the 200 so that a bad request still gets its 400.
        first = pool.stream(served, ids, seed=seeds[0], **params)
    except RequestError as err:
        return error(400, str(err), param=err.param, code=err.code)
    later = [lambda seed=seed: pool.stream(served, ids, seed=seed, **params) for seed in seeds[1:]]
    return await _sse(request, kind, served.id, first, later, req)


def _usage(streams: list[Stream]) -> dict[str, int]:
    prompt = streams[0].prompt_tokens if streams else 0
    completion = sum(s.completion_tokens for s in streams)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _full_body(kind: str, model: str, streams: list[Stream]) -> dict[str, Any]:
    if kind == "chat":
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": s.text, "refusal": None},
                "logprobs": None,
                "finish_reason": s.finish_reason,
            }
            for i, s in enumerate(streams)
        ]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": _usage(streams),
            "system_fingerprint": None,
        }
    choices = [
        {"index": i, "text": s.text, "logprobs": None, "finish_reason": s.finish_reason} for i, s in enumerate(streams)
    ]
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": _usage(streams),
    }


async def _sse(
    request: web.Request, kind: str, model: str, first: Stream, rest: list[Any], req: Any
) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())

    def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if kind == "chat":
            delta: dict[str, Any] = (
                {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            )
            choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [choice],
            }
        return {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}],
        }

    async def send(body: dict[str, Any]) -> None:
        await response.write(f"data: {json.dumps(body)}\n\n".encode())

    done: list[Stream] = []
    stream: Stream | None = first
    index = 0
    try:
        while stream is not None:
            if kind == "chat":
                await send(chunk(index, None, None, role=True))
            pieces = iter(stream)
            while (piece := await loop.run_in_executor(None, next, pieces, None)) is not None:
                await send(chunk(index, piece, None))
            await send(chunk(index, None, stream.finish_reason))
            done.append(stream)
            index += 1
            stream = await loop.run_in_executor(None, rest[index - 1]) if index - 1 < len(rest) else None
        if (req.stream_options or {}).get("include_usage"):
            body = chunk(0, None, None)
            body["choices"], body["usage"] = [], _usage(done)
            await send(body)
        await response.write(b"data: [DONE]\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        if stream is not None:
            stream.close()  # the client went away: stop generating for nobody
        raise
    await response.write_eof()
    return response


# ---------------------------------------------------------------------------------------- app


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def make_app(pool: ModelPool) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=8 << 20)
    app[POOL] = pool
    app[CREATED] = int(time.time())
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    return app


def serve(pool: ModelPool, host: str = "127.0.0.1", port: int = 8000, print_fn: Any = print) -> None:
    """Run until interrupted (Ctrl-C or SIGTERM). Port 0 picks a free port; the line printed
    once listening says which."""
    import signal

    async def main() -> None:
        runner = web.AppRunner(make_app(pool))
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
            bound = runner.addresses[0][1] if runner.addresses else port
            print_fn(f"serving {', '.join(pool.models)} on http://{host}:{bound}/v1 (OpenAI-compatible; Ctrl-C stops)")
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            await stop.wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
