"""The OpenAI-compatible HTTP server: `create_app(lv, settings)` gives a FastAPI app serving one model.

Routes: `POST /v1/chat/completions` (plain or streamed as server-sent events), `GET /v1/models`,
`GET /health` (liveness, the one route without an API key), `GET /ready` (503 while draining on
SIGTERM), `GET /metrics` (Prometheus). Response shapes are OpenAI's, as its Python client parses them.

How a request runs: the body is parsed and checked (requests.py), then in a worker thread its images
are decoded (media.py), its prompt is counted against the limit and its `n` choices are submitted to
the engine (`lv.submit`), which batches them with every other running request. Each choice's `Answer`
is read by a thread of its own that forwards the pieces to the event loop through an asyncio queue, so
no worker thread is held while a request waits for a row. The choices of a request with a seed use
seed, seed + 1, ...: reproducible, and different from each other when sampling.

A client that disconnects cancels its choices (Starlette cancels the streaming generator; a plain
request polls `is_disconnected`), which frees their rows at the next decode step. `usage` counts the
prompt once and the completion tokens of every choice; `prompt_tokens_details.image_tokens` reports
the image tokens the cross-attention layers attend to (4 tiles x 1601 per image on the 11B model), which
are not part of `prompt_tokens`.

Security: API keys are compared with `hmac.compare_digest` against every configured key (no early
exit) on every route but /health, before anything else runs; CORS headers exist only for the origins
given; the body size is capped by Starlette's `RequestBodyLimitMiddleware`; the interactive docs and
the OpenAPI schema are off; every error is OpenAI-shaped and scrubbed of internals (errors.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llama_vision.api import LlamaVision
from llama_vision.engine import QueueFull
from llama_vision.generation import Answer
from llama_vision.server.errors import APIError, error_body, error_response
from llama_vision.server.grammar import Grammars, token_bytes
from llama_vision.server.media import MediaLoader
from llama_vision.server.metrics import Metrics
from llama_vision.server.requests import ChatRequest, parse_chat
from llama_vision.server.settings import Settings

log = logging.getLogger("llama_vision.server")
OPEN_ROUTES = ("/health",)
POLL_SECONDS = 0.25  # how often a non-streamed request checks that its client is still there


def create_app(
    lv: LlamaVision, settings: Settings | None = None, *, media: MediaLoader | None = None
) -> FastAPI:
    """The app serving `lv`. `media` replaces the image loader (tests give one with its own resolver)."""
    settings = settings or Settings()
    server = _Server(lv, settings, media or MediaLoader(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        server.shutdown()

    app = FastAPI(title="llama-vision", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server
    app.add_exception_handler(APIError, lambda request, e: e.response())
    app.add_exception_handler(HTTPException, lambda request, e: _http_error(e, settings))
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(_Auth, keys=settings.api_keys)  # added last, runs first: no key, no body read
    if settings.cors_origins:  # outermost, so that preflight requests (which carry no key) get answered
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if server.draining:
            return error_response(503, "the server is shutting down", code="shutting_down")
        return JSONResponse({"status": "ready", "model": settings.model_name})

    card = {
        "id": settings.model_name,
        "object": "model",
        "created": server.started,
        "owned_by": "llama-vision",
    }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        if model != settings.model_name:
            raise APIError(404, f"the model {model!r} does not exist", param="model", code="model_not_found")
        return card

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrived = time.monotonic()
        try:
            response = await server.chat(request, arrived)
        except APIError as e:
            server.metrics.requests.labels("chat", str(e.status)).inc()
            raise
        server.metrics.requests.labels("chat", str(response.status_code)).inc()
        return response

    return app


@dataclass(eq=False)  # runs are told apart by identity (a set holds those in flight)
class _Run:
    """The choices of one request in flight: their answers, and the queue their reader threads fill."""

    answers: list[Answer]
    arrived: float
    queue: asyncio.Queue[tuple[int, str | BaseException | None, int]] = field(default_factory=asyncio.Queue)
    first_token: float | None = None
    done: set[int] = field(default_factory=set)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        for index, answer in enumerate(self.answers):
            threading.Thread(target=self._read, args=(index, answer, loop), daemon=True).start()

    def _read(self, index: int, answer: Answer, loop: asyncio.AbstractEventLoop) -> None:
        """Runs in a thread: forwards (choice, piece, tokens so far), then (choice, None | error, n)."""

        def put(item: tuple[int, str | BaseException | None, int]) -> None:
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, item)
            except RuntimeError:  # the loop has closed (the server stopped): nobody is listening
                answer.cancel()

        try:
            for piece in answer:
                put((index, piece, len(answer.token_ids)))
        except BaseException as error:  # the engine failed this request
            put((index, error, len(answer.token_ids)))
        else:
            put((index, None, len(answer.token_ids)))

    def cancel(self) -> None:
        for answer in self.answers:
            answer.cancel()

    async def next(self, deadline: float) -> tuple[int, str | None, int]:
        """The next piece of any choice; (choice, None, n) when that choice has ended."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        index, item, tokens = await asyncio.wait_for(self.queue.get(), left)
        if isinstance(item, BaseException):
            raise item
        if item is None:
            self.done.add(index)
        elif self.first_token is None:
            self.first_token = time.monotonic()
        return index, item, tokens

    @property
    def finished(self) -> bool:
        return len(self.done) == len(self.answers)


class _Server:
    """The state behind the routes: the model, the limits, the metrics, the requests in flight."""

    def __init__(self, lv: LlamaVision, settings: Settings, media: MediaLoader) -> None:
        self.lv, self.settings, self.media = lv, settings, media
        stop_ids = sorted({*lv.config.text.eos_token_id, *lv.tokenizer.stop_ids})
        self.grammars = Grammars(lv.tokenizer, stop_ids)
        self.metrics = Metrics(lv.engine.stats)
        self.started = int(time.time())
        self.draining = False
        self.runs: set[_Run] = set()

    def shutdown(self) -> None:
        """After the HTTP server has stopped: cancel whatever still runs, close the media client."""
        self.draining = True
        for run in list(self.runs):
            run.cancel()
        self.media.close()

    async def chat(self, request: Request, arrived: float) -> Response:
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        body = await request.body()
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
        parsed = parse_chat(data, self.settings)
        answers = await run_in_threadpool(self.submit, parsed)
        run = _Run(answers, arrived)
        self.runs.add(run)
        run.start(asyncio.get_running_loop())
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if parsed.stream:
            return EventSourceResponse(
                self.events(run, parsed, completion_id),
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            await self.wait(run, request)
        finally:
            self.finish(run)
        return JSONResponse(self.completion(run, parsed, completion_id))

    def submit(self, parsed: ChatRequest) -> list[Answer]:
        """In a worker thread: check the prompt's length, decode the images, queue the n choices."""
        lv = self.lv
        try:  # the image parts are placeholders here: the length is known before any image is decoded
            prompt = lv.processor.apply_chat_template(parsed.messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        ids = lv.tokenizer.encode(prompt)
        prompt_tokens = len(ids) + (lv.tokenizer.bos_id not in ids)  # the processor adds a missing BOS
        limit = self.settings.max_prompt_tokens
        if prompt_tokens > limit:
            raise APIError(
                400,
                f"the prompt has {prompt_tokens} tokens; this server takes at most {limit}",
                param="messages",
                code="context_length_exceeded",
            )
        images = iter([self.media.load(url, param) for url, param in parsed.image_urls])
        messages = [
            {**m, "content": [{"type": "image", "image": next(images)} if p["type"] == "image" else p for p in m["content"]]}
            if isinstance(m["content"], list) else m
            for m in parsed.messages
        ]  # fmt: skip
        answers: list[Answer] = []
        try:
            for i in range(parsed.n):
                options = dict(parsed.options)
                if "seed" in options:
                    options["seed"] += i
                constraint = (
                    None
                    if parsed.response_format is None
                    else self.grammars.constraint(parsed.response_format)
                )
                answers.append(
                    lv.submit(
                        messages,
                        max_num_tiles=parsed.max_num_tiles,
                        logprobs=parsed.logprobs,
                        logits_processor=constraint,
                        **options,
                    )
                )
        except BaseException as e:
            for answer in answers:
                answer.cancel()
            if isinstance(e, QueueFull):
                raise APIError(
                    429, "the server is busy: too many requests are waiting; retry later", code="queue_full"
                ) from None
            if isinstance(e, ValueError):
                raise APIError(400, str(e), code="invalid_request") from None
            raise
        return answers

    async def wait(self, run: _Run, request: Request) -> None:
        """Until every choice has ended; checks every POLL_SECONDS, pieces arriving or not, that the
        client is still there and the request within its time."""
        deadline = run.arrived + self.settings.request_timeout
        checked = time.monotonic()
        while not run.finished:
            try:
                await run.next(min(deadline, checked + POLL_SECONDS))
            except TimeoutError:
                pass
            except Exception as e:
                run.cancel()
                raise _engine_error(e) from None
            now = time.monotonic()
            if run.finished or now < min(deadline, checked + POLL_SECONDS):
                continue
            checked = now
            if await request.is_disconnected():
                run.cancel()
                raise APIError(400, "the client disconnected", code="client_disconnected")
            if now >= deadline:
                run.cancel()
                message = f"the request took more than {self.settings.request_timeout:g} s"
                raise APIError(503, message, code="timeout")

    async def events(self, run: _Run, parsed: ChatRequest, completion_id: str) -> AsyncIterator[bytes]:
        """The SSE stream: a role chunk per choice, content chunks, a finish chunk per choice, the usage
        chunk when asked, then [DONE]. Cancelled (client gone) -> the choices are cancelled."""
        head = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.settings.model_name,
        }
        usage = {"usage": None} if parsed.include_usage else {}

        def chunk(
            index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None
        ) -> bytes:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return format_sse_event(data_str=json.dumps({**head, "choices": [choice], **usage}))

        sent = [0] * len(run.answers)  # tokens whose logprobs went out, per choice
        deadline = run.arrived + self.settings.request_timeout
        try:
            for i in range(len(run.answers)):
                yield chunk(i, {"role": "assistant", "content": ""})
            while not run.finished:
                try:
                    index, piece, tokens = await run.next(deadline)
                except Exception as e:
                    run.cancel()
                    error = (
                        _engine_error(e)
                        if not isinstance(e, TimeoutError)
                        else APIError(503, "the request timed out", code="timeout")
                    )
                    yield format_sse_event(
                        data_str=json.dumps(error_body(error.status, error.message, code=error.code))
                    )
                    return
                answer = run.answers[index]
                if piece is None:
                    lp = self.logprobs(parsed, answer, sent[index], len(answer.token_ids))
                    yield chunk(index, {}, _finish_reason(answer), lp)
                    continue
                lp = self.logprobs(parsed, answer, sent[index], tokens)
                sent[index] = max(sent[index], tokens)
                yield chunk(index, {"content": piece}, None, lp)
            if parsed.include_usage:
                yield format_sse_event(data_str=json.dumps({**head, "choices": [], "usage": self.usage(run)}))
            yield format_sse_event(data_str="[DONE]")
        finally:
            if not run.finished:
                run.cancel()
            self.finish(run)

    def completion(self, run: _Run, parsed: ChatRequest, completion_id: str) -> dict[str, Any]:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": answer.text, "refusal": None},
                "logprobs": self.logprobs(parsed, answer, 0, len(answer.token_ids)),
                "finish_reason": _finish_reason(answer),
            }
            for i, answer in enumerate(run.answers)
        ]
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.settings.model_name,
            "choices": choices,
            "usage": self.usage(run),
        }

    def logprobs(self, parsed: ChatRequest, answer: Answer, start: int, end: int) -> dict[str, Any] | None:
        """OpenAI's `logprobs` of the answer's tokens start..end (None unless the request asked)."""
        if parsed.logprobs is None:
            return None
        tokenizer = self.lv.tokenizer

        def entry(token: int, logprob: float) -> dict[str, Any]:
            data = token_bytes(tokenizer, token)
            return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}

        content = [
            {**entry(t.token, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
            for t in answer.logprobs[start:end]
        ]
        return {"content": content, "refusal": None}

    def usage(self, run: _Run) -> dict[str, Any]:
        first = run.answers[0]
        completion = sum(a.completion_tokens for a in run.answers)
        return {
            "prompt_tokens": first.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": first.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "image_tokens": first.image_tokens},
        }

    def finish(self, run: _Run) -> None:
        """Once per run, when the response is complete or abandoned: metrics, forget the run."""
        if run not in self.runs:
            return
        self.runs.discard(run)
        m, now = self.metrics, time.monotonic()
        m.prompt_tokens.inc(run.answers[0].prompt_tokens)
        m.image_tokens.inc(run.answers[0].image_tokens)
        m.duration.observe(now - run.arrived)
        if run.first_token is not None:
            m.ttft.observe(run.first_token - run.arrived)
        for answer in run.answers:
            m.completion_tokens.inc(answer.completion_tokens)
            m.finished.labels(answer.finish_reason or "cancelled").inc()
            if run.first_token is not None and answer.completion_tokens > 1:
                m.per_token.observe((now - run.first_token) / (answer.completion_tokens - 1))


def _finish_reason(answer: Answer) -> str:
    reason = answer.finish_reason
    return reason if reason in ("stop", "length") else "stop"


def _engine_error(error: BaseException) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, TimeoutError):  # waited past the engine's queue_timeout
        return APIError(
            503, "the server is busy: the request waited too long for a slot", code="queue_timeout"
        )
    if isinstance(error, ValueError):  # a request that failed alone in the engine (its images, ...)
        return APIError(400, str(error), code="invalid_request")
    log.error("generation failed", exc_info=error)
    return APIError(500, "the model failed to answer this request", code="internal_error")


class _Auth:
    """ASGI middleware: a valid `Authorization: Bearer <key>` on every route but /health (when keys are set)."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self.app, self.keys = app, [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in OPEN_ROUTES:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        valid = False
        for key in self.keys:  # every key compared, in constant time each
            valid |= hmac.compare_digest(given.strip(), key)
        if scheme.lower() != b"bearer" or not valid:
            message = "missing API key" if not header else "invalid API key"
            return await error_response(401, message, code="invalid_api_key")(scope, receive, send)
        return await self.app(scope, receive, send)


class _BodyLimit:
    """ASGI middleware: a body over `limit` bytes is refused (413) from its Content-Length before it is
    read, or as soon as the bytes received pass the limit (chunked bodies)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self.error().response()(scope, receive, send)
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise self.error()
            return message

        await self.app(scope, counted, send)

    def error(self) -> APIError:
        message = f"the request body is larger than this server's limit of {self.limit} bytes"
        return APIError(413, message, code="request_too_large")


def _http_error(error: HTTPException, settings: Settings) -> JSONResponse:
    """Starlette's own errors (no route, wrong method, body too large) in OpenAI's shape."""
    messages = {
        404: "no such route",
        405: "method not allowed on this route",
        413: f"the request body is larger than this server's limit of {settings.max_body_bytes} bytes",
    }
    code = "request_too_large" if error.status_code == 413 else None
    return error_response(error.status_code, messages.get(error.status_code, "bad request"), code=code)


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=error)
    return error_response(500, "internal server error", code="internal_error")
