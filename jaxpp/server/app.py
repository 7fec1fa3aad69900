"""The HTTP routes: OpenAI's request and response shapes over the engine loop.

    POST /v1/completions, /v1/chat/completions   (stream: true -> server-sent events)
    GET  /v1/models, /health, /metrics

A body is parsed and checked by the batch CLI's own code (formats.RequestBuilder.openai: the
same fields, limits and messages), answered in the CLI's shapes (records.result_record), and
any refusal is an OpenAI error body naming the culprit, with 400 (413 for a body over the
limit, 404 for an unknown model or route, 401 without the API key, 503 when the queue is full
or the server is stopping). A client that disconnects has its sequences aborted at once.
Every request gets one access log line (AccessLog) unless the server is told not to.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
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
from jaxpp.cli.records import result_record
from jaxpp.server.chunks import StreamChunks, sse
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
    access_log: bool = True,
) -> FastAPI:
    app = FastAPI(title="jaxpp", docs_url=None, redoc_url=None, openapi_url=None)
    max_body = builder.limits.max_line_bytes

    if api_key is not None:
        app.add_middleware(ApiKeyCheck, api_key=api_key)
    if access_log:  # added last: the outermost, so that it sees a 401 too
        app.add_middleware(AccessLog)

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
        job.results = [None] * len(handles)
        job.prompt_logprobs = [None] * len(handles)
        request.state.tokens = (job.prompt_tokens, 0)  # the access log's, until the end
        if job.stream:
            return StreamingResponse(
                _stream(request, job, handles, events), media_type="text/event-stream"
            )
        return await _whole(request, job, handles, events)

    def _done(request: Request, job: Job, index: int, event: Event) -> None:
        """Sequence `index` finished: keep its results, count it in the metrics (and the
        request, once all of its prompt's sequences are done)."""
        job.results[index], job.prompt_logprobs[index] = event.completion, event.prompt_logprobs
        seq = job.seqs[index]
        metrics.sequence_done(event.completion, event.metrics, len(seq.token_ids),
                              seq.params.max_tokens)  # fmt: skip
        group = [i for i, s in enumerate(job.seqs) if s.prompt_index == seq.prompt_index]
        if all(job.results[i] is not None for i in group):
            metrics.request_done(len(group), [len(job.results[i].token_ids) for i in group])
        generated = sum(len(c.token_ids) for c in job.results if c is not None)
        request.state.tokens = (job.prompt_tokens, generated)

    async def _whole(request: Request, job: Job, handles, events: asyncio.Queue) -> Response:
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
                    _done(request, job, index, event)
                    left -= 1
                elif event.kind != DELTA:
                    loop.abort(handles)
                    return _engine_error(event)
        except asyncio.CancelledError:
            loop.abort(handles)
            raise
        return JSONResponse(result_record(job)["response"]["body"])

    async def _stream(
        request: Request, job: Job, handles, events: asyncio.Queue
    ) -> AsyncIterator[str]:
        chunks = StreamChunks(job)
        left = len(handles)
        try:
            for role in chunks.roles():
                yield role
            while left:
                index, event = await events.get()
                if event.kind == DELTA:
                    chunk = chunks.delta(index, event)
                    if chunk is not None:
                        yield chunk
                elif event.kind == DONE:
                    _done(request, job, index, event)
                    left -= 1
                    yield chunks.last(index, event)
                else:
                    yield sse({"error": _error_body(event)})
                    return
            if job.include_usage:
                yield chunks.usage()
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


ACCESS = logging.getLogger("jaxpp.serve.access")


class AccessLog:
    """One line per request once its response is complete (or its client gone): client,
    method, route, status, prompt + generated tokens (what the route's handler left in
    `request.state.tokens`), seconds. Plain ASGI, as ApiKeyCheck."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [499]  # 499: the client left before an answer

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            client = scope.get("client") or ("-", 0)
            tokens = scope.get("state", {}).get("tokens")
            used = "-" if tokens is None else f"{tokens[0]}+{tokens[1]}"
            ACCESS.info(
                '%s:%s "%s %s" %d tokens=%s %.3fs', client[0], client[1], scope["method"],
                scope["path"], status[0], used, time.perf_counter() - start,
            )  # fmt: skip


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
