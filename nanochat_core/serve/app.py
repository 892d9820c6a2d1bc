"""The FastAPI app: the chat page, nanochat's streaming endpoint and the OpenAI-compatible API.

    app = create_app(cfg)                     # loads the model when the server starts, not at import
    uvicorn --factory nanochat_core.serve.app:create_app      # the same with the default config

Routes:
    GET  /                      the single-page chat UI (static/index.html, no external assets)
    POST /chat/completions      nanochat's SSE stream: data: {"token", "kind"} ... data: {"done": true, ...}
    POST /v1/chat/completions   OpenAI chat completions, stream or not, with usage counts
    GET  /v1/models             the one served model
    GET  /health, GET /stats    liveness; pool and request counters
Every error is JSON in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat_core.config import PipelineConfig
from nanochat_core.errors import UserError
from nanochat_core.serve.generation import Finish, SamplingParams
from nanochat_core.serve.pool import PoolBusy, ReplicaPool
from nanochat_core.serve.schemas import (
    MAX_BODY_BYTES, ChatRequest, OpenAIChatRequest, describe_errors, error_body,
)

API_KEY_ENV = "NANOCHAT_API_KEY"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# How a tool call reads inside OpenAI `content`, which has no place for it: GSM8K's calculator
# annotation, <<expression=result>>, the form the model met in training.
TOOL_MARKS = {("text", "python"): "<<", ("python", "python_output"): "=", ("python_output", "text"): ">>",
              ("python", "text"): ">>", ("text", "python_output"): "<<=", ("python_output", "python"): ">><<"}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, param, code)


def _sse(obj: dict | str) -> bytes:
    # ASCII-only JSON: non-ASCII arrives as \\uXXXX escapes, so no client-side line splitter (some split on
    # U+2028 or U+0085) can tear an event, and every byte on the wire is a whole character.
    data = obj if isinstance(obj, str) else json.dumps(obj)
    return f"data: {data}\n\n".encode()


def create_app(cfg: PipelineConfig | None = None, pool: ReplicaPool | None = None) -> FastAPI:
    """The app for `cfg` (default: the d20 preset's serve settings). `pool` skips loading (tests, benches)."""
    cfg = cfg or PipelineConfig()
    api_key = cfg.serve.api_key or os.environ.get(API_KEY_ENV) or None
    model_name = cfg.serve.model_name

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.pool is None:
            from nanochat_core.serve.loading import load_replicas

            replicas = load_replicas(cfg.inference, cfg.serve.workers_per_device)
            app.state.pool = ReplicaPool(replicas, cfg.serve.max_queue)
        yield

    app = FastAPI(title="nanochat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool = pool
    app.state.created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), param=None, code=code), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        message, param = describe_errors(exc.errors())
        return JSONResponse(error_body(message, param=param), status_code=400)

    def current_pool() -> ReplicaPool:
        if app.state.pool is None:
            raise APIError(503, "the model is still loading; retry in a moment", "server_error", code="loading")
        return app.state.pool

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key; send `Authorization: Bearer <key>`",
                           code="invalid_api_key")

    async def parse(request: Request, cls: type[ChatRequest]) -> ChatRequest:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body has {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
        try:
            obj = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON; send a JSON object") from None
        if not isinstance(obj, dict):
            raise APIError(400, "the request body must be a JSON object with a \"messages\" list")
        try:
            req = cls.model_validate(obj)
        except ValidationError as e:
            message, param = describe_errors(e.errors())
            raise APIError(400, message, param=param) from None
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return req

    def sampling(req: ChatRequest) -> SamplingParams:
        inf = cfg.inference
        return SamplingParams(
            temperature=inf.temperature if req.temperature is None else req.temperature,
            top_k=inf.top_k if req.top_k is None else req.top_k,
            max_tokens=req.max_completion_tokens or req.max_tokens or inf.max_tokens,
            stop=req.stop or [],
            seed=req.seed if req.seed is not None else secrets.randbits(31),  # regenerate = a new sample
        )

    def admit(pool: ReplicaPool, req: ChatRequest, params: SamplingParams) -> list[dict]:
        messages = req.conversation()
        try:
            pool.check(messages, params)
        except UserError as e:
            raise APIError(400, str(e), param="messages") from None
        if pool.waiting >= pool.max_queue:
            raise APIError(429, "the server is busy (request queue full); retry shortly", "server_error",
                           code="queue_full")
        return messages

    # --- pages and status --------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(resources.files("nanochat_core.serve").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/health")
    async def health():
        pool = app.state.pool
        return {"status": "ok", "ready": pool is not None, "model": model_name,
                "checkpoint": pool.replicas[0].meta.get("label") if pool else None,
                "replicas": len(pool.replicas) if pool else 0}

    @app.get("/stats")
    async def stats(request: Request):
        authorize(request)
        pool = current_pool()
        meta = pool.replicas[0].meta
        return {"model": model_name, "checkpoint": meta.get("label"), "step": meta.get("step"),
                "context_len": pool.context_len, **pool.stats()}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [_model_card(model_name, app.state.created)]}

    @app.get("/v1/models/{name}")
    async def model(name: str, request: Request):
        authorize(request)
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return _model_card(model_name, app.state.created)

    # --- nanochat's streaming endpoint (the page uses it) ------------------------------------------

    @app.post("/chat/completions")
    async def chat(request: Request):
        authorize(request)
        pool = current_pool()
        req = await parse(request, ChatRequest)
        params = sampling(req)
        messages = admit(pool, req, params)

        async def events() -> AsyncIterator[bytes]:
            try:
                async for item in pool.stream(messages, params):
                    if isinstance(item, Finish):
                        yield _sse({"done": True, "finish_reason": item.reason, "usage": _usage(item),
                                    "dropped_messages": item.dropped_messages})
                    else:
                        yield _sse({"token": item.text, "kind": item.kind})
            except PoolBusy:
                yield _sse(error_body("the server is busy; retry shortly", "server_error", code="queue_full"))
            except Exception as e:  # headers are sent: report in-band, never a torn stream without a word
                yield _sse(error_body(f"generation failed: {e}", "server_error"))

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    # --- OpenAI-compatible ---------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        authorize(request)
        pool = current_pool()
        req = await parse(request, OpenAIChatRequest)
        params = sampling(req)
        messages = admit(pool, req, params)
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        head = {"id": cid, "created": created, "model": model_name, "system_fingerprint": None}
        if not req.stream:
            parts, finish = [], None
            try:
                async for item in pool.stream(messages, params):
                    if isinstance(item, Finish):
                        finish = item
                    else:
                        parts.append(item)
            except PoolBusy:
                raise APIError(429, "the server is busy; retry shortly", "server_error", code="queue_full") from None
            return {**head, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": _content(parts)},
                                 "logprobs": None, "finish_reason": _finish_reason(finish)}],
                    "usage": _usage(finish)}

        def chunk(delta: dict, finish_reason: str | None = None) -> bytes:
            return _sse({**head, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

        async def events() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant", "content": ""})
            kind = "text"
            try:
                async for item in pool.stream(messages, params):
                    if isinstance(item, Finish):
                        if kind != "text":
                            yield chunk({"content": ">>"})
                        yield chunk({}, _finish_reason(item))
                        if req.include_usage():
                            yield _sse({**head, "object": "chat.completion.chunk", "choices": [],
                                        "usage": _usage(item)})
                        break
                    mark = TOOL_MARKS.get((kind, item.kind), "")
                    kind = item.kind
                    yield chunk({"content": mark + item.text})
            except PoolBusy:
                yield _sse(error_body("the server is busy; retry shortly", "server_error", code="queue_full"))
            except Exception as e:
                yield _sse(error_body(f"generation failed: {e}", "server_error"))
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    return app


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "nanochat"}


def _usage(finish: Finish | None) -> dict:
    p, c = (finish.prompt_tokens, finish.completion_tokens) if finish else (0, 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _finish_reason(finish: Finish | None) -> str:
    return "length" if finish is None or finish.reason == "length" else "stop"


def _content(parts) -> str:
    """Reply pieces as one OpenAI `content` string, tool calls written as <<expression=result>>."""
    out, kind = [], "text"
    for p in parts:
        out.append(TOOL_MARKS.get((kind, p.kind), "") + p.text)
        kind = p.kind
    if kind != "text":
        out.append(">>")
    return "".join(out)
