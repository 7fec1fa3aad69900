"""The HTTP routes: OpenAI's request and response shapes over the engine loop.

    POST /v1/completions, /v1/chat/completions   (stream: true -> server-sent events)
    GET  /v1/models, /health, /metrics

A body is parsed and checked by the batch CLI's own code (formats.RequestBuilder.openai: the
same fields, limits and messages), answered in the CLI's shapes (records.result_record), and
any refusal is an OpenAI error body naming the culprit, with 400 (413 for a body over the
limit, 404 for an unknown model or route, 401 without the API key, 503 when the queue is full
or the server is stopping). A client that disconnects has its sequences aborted at once.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import time
import traceback
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from jaxpp.cli import structured, tools
from jaxpp.cli.errors import RequestError
from jaxpp.cli.formats import Job, RequestBuilder, parse_line
from jaxpp.cli.records import openai_logprobs, result_record
from jaxpp.server.loop import DELTA, DONE, EngineLoop, Event, Handle, Overloaded
from jaxpp.server.metrics import CONTENT_TYPE, Metrics

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is there


def error_response(
    status: int, message: str, code: str, kind: str = "invalid_request_error", headers=None
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def build_app(
    loop: EngineLoop,
    builder: RequestBuilder,
    metrics: Metrics,
    model_name: str,
    api_key: str | None = None,
) -> FastAPI:
    app = FastAPI(title="jaxpp", docs_url=None, redoc_url=None, openapi_url=None)
    max_body = builder.limits.max_line_bytes

    if api_key is not None:
        app.add_middleware(ApiKeyCheck, api_key=api_key)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        code = "not_found" if exc.status_code == 404 else "invalid_request"
        return error_response(exc.status_code, f"{request.method} {request.url.path}: "
                              f"{exc.detail}", code)  # fmt: skip

    @app.get("/health")
    async def health():
        return JSONResponse({}) if loop.accepting else error_response(
            503, "the server is shutting down", "unavailable", "server_error"
        )  # fmt: skip

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        card = {
            "id": model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "jaxpp",
            "max_model_len": builder.llm.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _serve(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _serve(request, "/v1/chat/completions")

    async def _serve(request: Request, url: str) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            return _too_large(max_body)
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > max_body:
                return _too_large(max_body)
        try:
            body = parse_line(raw)
            model = body.get("model")
            if model is not None and model != model_name:
                return error_response(
                    404, f"model {str(model)[:200]!r} is not served here (only {model_name!r})",
                    "model_not_found",
                )  # fmt: skip
            build = functools.partial(
                builder.openai, {"url": url, "body": body}, 0, uuid.uuid4().hex
            )
            # A new structured-output constraint compiles while its request is built (grammar.py:
            # seconds on a large vocabulary): in a worker thread, so that the event loop serves
            # the others meanwhile.
            constrained = any(k in body for k in (*structured.BODY_FIELDS, *tools.BODY_FIELDS))
            job = await asyncio.to_thread(build) if constrained else build()
        except RequestError as e:
            return error_response(400, str(e), e.code)
        except Exception:  # noqa: BLE001 - a bug, not the client's: 500, the server goes on
            traceback.print_exc()
            return error_response(500, "internal error while reading the request",
                                  "internal_error", "server_error")  # fmt: skip
        events: asyncio.Queue = asyncio.Queue()
        here = asyncio.get_running_loop()

        def sink(index: int):
            return lambda event: here.call_soon_threadsafe(events.put_nowait, (index, event))

        handles = [Handle(s.token_ids, s.params, sink(i)) for i, s in enumerate(job.seqs)]
        try:
            loop.submit(handles)
        except Overloaded as e:
            return error_response(503, f"server busy: {e}; retry later", "overloaded",
                                  "server_error", headers={"Retry-After": "1"})  # fmt: skip
        if job.stream:
            return StreamingResponse(_stream(job, handles, events), media_type="text/event-stream")
        return await _whole(request, job, handles, events)

    async def _whole(request: Request, job: Job, handles, events: asyncio.Queue) -> Response:
        job.results = [None] * len(handles)
        left = len(handles)
        try:
            while left:
                try:
                    index, event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        loop.abort(handles)
                        return Response(status_code=499)
                    continue
                if event.kind == DONE:
                    job.results[index] = event.completion
                    left -= 1
                elif event.kind != DELTA:
                    loop.abort(handles)
                    return _engine_error(event)
        except asyncio.CancelledError:
            loop.abort(handles)
            raise
        return JSONResponse(result_record(job)["response"]["body"])

    async def _stream(job: Job, handles, events: asyncio.Queue) -> AsyncIterator[str]:
        chat = job.kind == "chat"
        head = {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": job.model,
        }

        # Tool calls are read from the whole answer: its text is held back and sent as one
        # delta of content and tool_calls (tools.stream_delta) with the finish reason.
        held = chat and job.tools is not None and job.tools.mode != "none"

        def chunk(index: int, text: str, finish: str | None = None, logprobs=None, delta=None):
            choice = {"index": index}
            if delta is not None:
                choice["delta"] = delta
            elif chat:
                choice["delta"] = {"content": text} if text or finish is None else {}
            else:
                choice["text"] = text
            choice["logprobs"] = logprobs
            choice["finish_reason"] = finish
            return _sse({**head, "choices": [choice], **({"usage": None} if job.include_usage
                                                          else {})})  # fmt: skip

        left, generated = len(handles), 0
        try:
            if chat:
                for index in range(len(handles)):
                    role = {**head, "choices": [{"index": index, "delta": {"role": "assistant",
                            "content": ""}, "logprobs": None, "finish_reason": None}]}  # fmt: skip
                    yield _sse(role)
            while left:
                index, event = await events.get()
                if event.kind == DELTA:
                    if not held:
                        yield chunk(index, event.text)
                elif event.kind == DONE:
                    c = event.completion
                    generated += len(c.token_ids)
                    left -= 1
                    delta, finish = (
                        tools.stream_delta(job.tools, c.text, c.finish_reason)
                        if held
                        else (None, c.finish_reason)
                    )
                    yield chunk(index, event.text, finish, openai_logprobs(job.logprobs, c),
                                delta)  # fmt: skip
                else:
                    yield _sse({"error": _error_body(event)})
                    return
            if job.include_usage:
                usage = {
                    "prompt_tokens": job.prompt_tokens,
                    "completion_tokens": generated,
                    "total_tokens": job.prompt_tokens + generated,
                }
                yield _sse({**head, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        finally:
            if left:  # the client went away, or the engine failed: free what is left
                loop.abort(handles)

    return app


class ApiKeyCheck:
    """401 for a /v1/ request without `Authorization: Bearer KEY`. Plain ASGI, not Starlette's
    BaseHTTPMiddleware: that one relays every chunk of a streamed response through a memory
    stream of its own, a task switch per token."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                refusal = error_response(
                    401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                    "invalid_api_key", "authentication_error",
                )  # fmt: skip
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _too_large(limit: int) -> JSONResponse:
    return error_response(413, f"the request body is over the limit of {limit} bytes "
                          "(--max-line-bytes)", "limit_exceeded")  # fmt: skip


def _error_body(event: Event) -> dict:
    return {"message": event.message, "type": _kind(event.status), "param": None,
            "code": event.code}  # fmt: skip


def _kind(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


def _engine_error(event: Event) -> JSONResponse:
    return error_response(event.status, event.message, event.code, _kind(event.status))
