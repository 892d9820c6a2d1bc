"""The FastAPI app: the chat page, nanochat's streaming endpoint and the OpenAI-compatible API.

    app = create_app(cfg)                     # loads the model when the server starts, not at import
    uvicorn --factory nanochat_core.serve.app:create_app      # the same with the default config

Routes:
    GET  /                      the single-page chat UI (static/index.html, no external assets)
    POST /chat/completions      nanochat's SSE stream: data: {"token", "kind"} ... data: {"done": true, ...}
    POST /v1/chat/completions   OpenAI chat completions, stream or not, with usage counts
    POST /v1/completions        OpenAI text completions (serving/completion.py): echo, logprobs, token-id prompts
    GET  /v1/models             the one served model
    GET  /health, GET /stats    liveness; pool and request counters
    GET  /tokenizer_info, POST /tokenize, POST /detokenize   vLLM's tokenizer routes, which
                                lm-evaluation-harness's `local-completions` finds and uses (no HF tokenizer here)
Every error is JSON in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`; a field this
server does not implement is a 400 naming it, never silently dropped.
"""

from __future__ import annotations

import asyncio
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

from nanochat_core.config import ServingConfig
from nanochat_core.errors import UserError
from nanochat_core.serve.completion import TextDelta, completion_job, encode_prompt
from nanochat_core.serve.generation import Finish, SamplingParams, chat_job
from nanochat_core.serve.pool import PoolBusy, ReplicaPool
from nanochat_core.serve.schemas import (
    MAX_BODY_BYTES, ChatRequest, CompletionRequest, DetokenizeRequest, OpenAIChatRequest, TokenizeRequest,
    describe_errors, error_body,
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


def create_app(cfg: ServingConfig | None = None, pool: ReplicaPool | None = None) -> FastAPI:
    """The app for `cfg` (default: the d20 preset's serve settings). `pool` skips loading (tests, benches)."""
    cfg = cfg or ServingConfig()
    api_key = os.environ.get(API_KEY_ENV) or None  # never a config field: it would travel as a parameter
    model_name = cfg.serve.model_name

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.pool is not None:
            yield
            return
        import torch

        from nanochat_core.serve.loading import load_replicas
        from nanochat_core.serve.pool import claim_cpu_threads

        replicas = load_replicas(cfg.inference, cfg.serve.workers_per_device)
        threads = torch.get_num_threads()
        claim_cpu_threads(replicas)  # this process is the server (`uvicorn --factory`)
        app.state.pool = ReplicaPool(replicas, cfg.serve.max_queue)
        try:
            yield
        finally:
            torch.set_num_threads(threads)  # an app started in-process (tests) gives the threads back

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

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):  # a bug or a failed generation: JSON too
        return JSONResponse(error_body(f"generation failed: {exc}", "server_error"), status_code=500)

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

    async def parse(request: Request, cls: type):
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body has {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
        try:
            obj = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON; send a JSON object") from None
        if not isinstance(obj, dict):
            field = {CompletionRequest: "prompt", TokenizeRequest: "prompt",
                     DetokenizeRequest: "tokens"}.get(cls, "messages")
            raise APIError(400, f"the request body must be a JSON object with a \"{field}\"")
        try:
            req = cls.model_validate(obj)
        except ValidationError as e:
            message, param = describe_errors(e.errors())
            raise APIError(400, message, param=param) from None
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return req

    def sampling(req: ChatRequest | CompletionRequest, max_tokens: int) -> SamplingParams:
        inf = cfg.inference
        return SamplingParams(
            temperature=inf.temperature if req.temperature is None else req.temperature,
            top_k=inf.top_k if req.top_k is None else req.top_k,
            max_tokens=max_tokens,
            stop=req.stop or [],
            seed=req.seed if req.seed is not None else secrets.randbits(31),  # regenerate = a new sample
        )

    def admit(pool: ReplicaPool, req: ChatRequest, params: SamplingParams):
        """The chat job for `req`, or a 400 for a conversation that cannot be rendered, before queueing."""
        try:
            job = chat_job(pool.tokenizer, req.conversation(), params, pool.context_len)
        except UserError as e:
            raise APIError(400, str(e), param="messages") from None
        queue_room(pool)
        return job

    def queue_room(pool: ReplicaPool, n: int = 1) -> None:
        if pool.waiting + n > pool.max_queue:
            raise APIError(429, "the server is busy (request queue full); retry shortly", "server_error",
                           code="queue_full")

    def chat_max_tokens(req: ChatRequest) -> int:
        return req.max_completion_tokens or req.max_tokens or cfg.inference.max_tokens

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
        params = sampling(req, chat_max_tokens(req))
        job = admit(pool, req, params)

        async def events() -> AsyncIterator[bytes]:
            try:
                async for item in pool.stream(job):
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
        params = sampling(req, chat_max_tokens(req))
        job = admit(pool, req, params)
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        head = {"id": cid, "created": created, "model": model_name, "system_fingerprint": None}
        if not req.stream:
            parts, finish = [], None
            try:
                async for item in pool.stream(job):
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
                async for batch in pool.batches(job):  # what arrived together goes out as one event
                    text, finish = [], None
                    for item in batch:
                        if isinstance(item, Finish):
                            finish = item
                            break
                        text.append(TOOL_MARKS.get((kind, item.kind), "") + item.text)
                        kind = item.kind
                    if finish is not None and kind != "text":
                        text.append(">>")
                    if text:
                        yield chunk({"content": "".join(text)})
                    if finish is not None:
                        yield chunk({}, _finish_reason(finish))
                        if req.include_usage():
                            yield _sse({**head, "object": "chat.completion.chunk", "choices": [],
                                        "usage": _usage(finish)})
                        break
            except PoolBusy:
                yield _sse(error_body("the server is busy; retry shortly", "server_error", code="queue_full"))
            except Exception as e:
                yield _sse(error_body(f"generation failed: {e}", "server_error"))
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    # --- text completion, and the tokenizer an evaluation harness needs ------------------------------

    @app.post("/v1/completions")
    async def text_completions(request: Request):
        authorize(request)
        pool = current_pool()
        req = await parse(request, CompletionRequest)
        params = sampling(req, 16 if req.max_tokens is None else req.max_tokens)  # 16: OpenAI's default
        prompts = req.prompts()
        jobs = []
        for i, prompt in enumerate(prompts):
            try:
                jobs.append(completion_job(pool.tokenizer, prompt, params, pool.context_len, req.logprobs, req.echo))
            except UserError as e:
                raise APIError(400, f"prompt{f' {i}' if len(prompts) > 1 else ''}: {e}", param="prompt") from None
        queue_room(pool, len(jobs))
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": model_name, "system_fingerprint": None}
        if not req.stream:
            try:
                results = await asyncio.gather(*(_collect(pool, job, req.logprobs is not None) for job in jobs))
            except PoolBusy:
                raise APIError(429, "the server is busy; retry shortly", "server_error", code="queue_full") from None
            choices = [{"index": i, "text": text, "logprobs": lp, "finish_reason": _finish_reason(finish)}
                       for i, (text, lp, finish) in enumerate(results)]
            return {**head, "choices": choices, "usage": _usage_sum([f for _, _, f in results])}

        def chunk(index: int, text: str, logprobs: dict | None, finish_reason: str | None = None) -> bytes:
            return _sse({**head, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                              "finish_reason": finish_reason}]})

        async def events() -> AsyncIterator[bytes]:
            merged: asyncio.Queue = asyncio.Queue()  # (choice index, item) from every prompt's stream

            async def relay(index: int, job) -> None:
                try:
                    async for batch in pool.batches(job):
                        merged.put_nowait((index, batch))
                except Exception as e:
                    merged.put_nowait((index, [e]))

            tasks = [asyncio.create_task(relay(i, job)) for i, job in enumerate(jobs)]
            finishes: list[Finish] = []
            failed = False
            try:
                while len(finishes) < len(jobs) and not failed:
                    index, batch = await merged.get()
                    deltas = [item for item in batch if isinstance(item, TextDelta)]
                    if deltas:  # what arrived together goes out as one event
                        yield chunk(index, "".join(d.text for d in deltas), _join_logprobs(deltas))
                    for item in batch:
                        if isinstance(item, PoolBusy):
                            yield _sse(error_body("the server is busy; retry shortly", "server_error",
                                                  code="queue_full"))
                            failed = True
                        elif isinstance(item, Exception):
                            yield _sse(error_body(f"generation failed: {item}", "server_error"))
                            failed = True
                        elif isinstance(item, Finish):
                            finishes.append(item)
                            yield chunk(index, "", None, _finish_reason(item))
                if not failed:
                    if req.include_usage():
                        yield _sse({**head, "choices": [], "usage": _usage_sum(finishes)})
            finally:
                for t in tasks:  # a client gone mid-stream: every prompt's row leaves the batch
                    t.cancel()
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        authorize(request)
        pool = current_pool()
        # <|bos|> both ways: it begins every document, and a base model ends one by starting the next
        return {"tokenizer_class": "nanochat", "bos_token": "<|bos|>", "eos_token": "<|bos|>", "pad_token": None,
                "vocab_size": pool.tokenizer.vocab_size, "model_max_length": pool.context_len}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        authorize(request)
        pool = current_pool()
        req = await parse(request, TokenizeRequest)
        tok = pool.tokenizer
        if req.add_special_tokens:  # BOS in front, as /v1/completions reads a prompt
            ids = encode_prompt(tok, req.prompt)
        else:
            ids = tok.enc.encode(req.prompt, allowed_special="all")
        return {"count": len(ids), "max_model_len": pool.context_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        authorize(request)
        pool = current_pool()
        req = await parse(request, DetokenizeRequest)
        vocab = pool.tokenizer.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"tokens: token id {bad} is outside the vocabulary (0..{vocab - 1})", param="tokens")
        return {"prompt": pool.tokenizer.enc.decode(req.tokens)}

    return app


async def _collect(pool: ReplicaPool, job, logprobs: bool) -> tuple[str, dict | None, Finish | None]:
    """One prompt's whole completion: (text, merged logprobs, Finish)."""
    deltas, finish = [], None
    async for item in pool.stream(job):
        if isinstance(item, Finish):
            finish = item
        else:
            deltas.append(item)
    merged = _join_logprobs(deltas)
    if logprobs and merged is None:  # asked for, nothing scored (max_tokens 0 without echo): empty lists
        merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    return "".join(d.text for d in deltas), merged, finish


def _join_logprobs(deltas: list[TextDelta]) -> dict | None:
    parts = [d.logprobs for d in deltas if d.logprobs]
    if not parts:
        return None
    return {key: [v for p in parts for v in p[key]] for key in parts[0]}


def _usage_sum(finishes: list[Finish | None]) -> dict:
    p = sum(f.prompt_tokens for f in finishes if f)
    c = sum(f.completion_tokens for f in finishes if f)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


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
