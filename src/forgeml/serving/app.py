"""The model server: a FastAPI app around one served model.

Classifiers answer ``POST /v1/predict`` through the dynamic batcher; language models answer
``POST /v1/generate``, streamed as server-sent events on request. ``/healthz``, ``/readyz`` and
``/metrics`` (Prometheus) are open to probes; with an API key, ``/v1/*`` needs it.
"""

import asyncio
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.concurrency import iterate_in_threadpool

from forgeml.serving.backends import Served
from forgeml.serving.batcher import Batcher, QueueFull
from forgeml.serving.config import ServeConfig

OPEN = ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json")  # no key needed
ROUTES = {"/v1/predict", "/v1/generate", *OPEN}  # metric labels; any other path counts as "other"


class Metrics:
    """The server's Prometheus series, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "forgeml_requests_total", "Requests by route and status", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "forgeml_request_seconds", "Request latency", ["route"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )  # fmt: skip
        self.batch_size = Histogram(
            "forgeml_batch_size", "Inputs per model call", registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )  # fmt: skip
        self.queue_depth = Gauge("forgeml_queue_depth", "Inputs waiting for the model", registry=self.registry)


def error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers or None)


def input_model(served: Served, cfg: ServeConfig) -> type[BaseModel]:
    """The request body of /v1/predict: texts, or objects with exactly the model's features."""
    item = served.variant.family.request_item(cfg.max_text_chars)
    return create_model(
        "PredictRequest",
        __config__=ConfigDict(extra="forbid"),
        inputs=(list[item], Field(min_length=1, max_length=cfg.max_items)),
    )


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str  # at most serve.max_text_chars, checked in the route
    max_new_tokens: Annotated[int, Field(ge=1)] = 64
    temperature: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)] = 1.0
    top_k: Annotated[int, Field(ge=1)] | None = None
    stream: bool = False


def create_app(served: Served, cfg: ServeConfig) -> FastAPI:
    metrics = Metrics()
    family = served.variant.family
    labels = family.labels if family.task.classifies else []

    def run(items: list[Any]) -> list[list[float]]:
        return served.predict(items).tolist()

    batcher = Batcher(run, cfg.max_batch, cfg.max_wait_ms, cfg.max_queue, metrics.batch_size.observe)
    metrics.queue_depth.set_function(lambda: batcher.depth)
    generating = asyncio.Semaphore(1)  # one sampling loop at a time: each already uses every thread
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        await asyncio.to_thread(warm_up, served)
        state["ready"] = True
        yield
        state["ready"] = False
        await batcher.stop()

    app = FastAPI(title="forgeml model server", version=served.version, lifespan=lifespan)

    app.add_middleware(Guard, cfg=cfg, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Any, exc: RequestValidationError) -> JSONResponse:
        # Where, what and why, without echoing the input: FastAPI's own handler sends it back,
        # and an input of Infinity (which Python's JSON parser accepts) cannot be encoded: a 500.
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if not state["ready"]:
            return error(503, "the model is loading or the server is stopping")
        return JSONResponse({"status": "ready", "model_version": served.version})

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if family.task.classifies:
        body_model = input_model(served, cfg)

        # No `from __future__ import annotations` in this module: FastAPI reads this annotation,
        # a class built above, at run time.
        async def predict(body: body_model) -> JSONResponse:  # type: ignore[valid-type]
            items = [item if isinstance(item, str) else item.model_dump(by_alias=True) for item in body.inputs]
            sizes = [len(item) if isinstance(item, str) else 1 for item in items]
            try:
                rows = await asyncio.wait_for(batcher.submit(items, sizes), cfg.timeout_s)
            except QueueFull:
                return error(503, "the queue is full; retry shortly", **{"Retry-After": "1"})
            except TimeoutError:
                return error(504, f"no answer within {cfg.timeout_s} s")
            predictions = [
                {"label": labels[row.index(max(row))], "probabilities": dict(zip(labels, row, strict=True))}
                for row in rows
            ]
            return JSONResponse({"model_version": served.version, "predictions": predictions})

        app.post("/v1/predict", summary="Classify texts or feature objects")(predict)
    if family.generates:

        @app.post("/v1/generate", summary="Continue a prompt; stream=true sends tokens as server-sent events")
        async def generate(body: GenerateRequest):
            for field, value, limit in (
                ("max_new_tokens", body.max_new_tokens, cfg.max_new_tokens),
                ("prompt", len(body.prompt), cfg.max_text_chars),
            ):
                if value > limit:
                    detail = [{"loc": ["body", field], "msg": f"at most {limit}", "type": "limit"}]
                    return JSONResponse({"detail": detail}, status_code=422)
            pieces = served.stream(body.prompt, body.max_new_tokens, body.temperature, body.top_k)
            if body.stream:
                return StreamingResponse(events(pieces, generating, served.version), media_type="text/event-stream")
            stop = threading.Event()
            async with generating:
                sampling = asyncio.ensure_future(asyncio.to_thread(collect, pieces, stop))
                try:
                    done, _ = await asyncio.wait({sampling}, timeout=cfg.timeout_s)
                finally:  # answered, timed out or cancelled: the lock is freed only once the sampling ends
                    stop.set()
                    text = await sampling
            if not done:
                return error(504, f"no answer within {cfg.timeout_s} s")
            return JSONResponse({"model_version": served.version, "text": text})

    return app


class Guard:
    """ASGI middleware: the API key and body-size checks before a route runs, and the request
    metrics after it answers. Plain ASGI rather than FastAPI's http middleware, which wraps every
    response in extra tasks and queues, a cost every request would pay."""

    def __init__(self, app: Any, cfg: ServeConfig, metrics: Metrics) -> None:
        self.app, self.cfg, self.metrics = app, cfg, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        path = scope["path"]
        headers = dict(scope["headers"])
        status = 500

        async def sent(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        limit = self.cfg.max_body_bytes
        if self.cfg.api_key and not path.startswith(OPEN) and not authorized(headers, self.cfg.api_key):
            await error(401, "missing or wrong API key: send it as 'Authorization: Bearer KEY'")(scope, receive, sent)
        elif too_large(headers, limit) or (body := await read_body(receive, limit)) is None:
            detail = [{"loc": ["body"], "msg": f"the body is over {limit} bytes", "type": "size"}]
            await JSONResponse({"detail": detail}, status_code=422)(scope, receive, sent)
        else:
            await self.app(scope, replay(body, receive), sent)
        route = path if path in ROUTES else "other"
        self.metrics.requests.labels(route, str(status)).inc()
        self.metrics.latency.labels(route).observe(time.perf_counter() - started)


async def events(pieces, lock: asyncio.Semaphore, version: str) -> AsyncIterator[str]:
    """One ``data:`` event per sampled token, in order, then an ``end`` event."""
    async with lock:
        index = 0
        async for piece in iterate_in_threadpool(pieces):
            yield f"data: {json.dumps({'index': index, 'text': piece})}\n\n"
            index += 1
    yield f"event: end\ndata: {json.dumps({'tokens': index, 'model_version': version})}\n\n"


def authorized(headers: dict[bytes, bytes], key: str) -> bool:
    given = headers.get(b"authorization", b"").removeprefix(b"Bearer ").strip()
    return hmac.compare_digest(given, key.encode())


def too_large(headers: dict[bytes, bytes], limit: int) -> bool:
    length = headers.get(b"content-length", b"")
    return length.isdigit() and int(length) > limit


async def read_body(receive: Callable[[], Awaitable[dict]], limit: int) -> list[dict] | None:
    """The request's body messages, counted as they arrive; None once they pass ``limit`` bytes.
    A chunked body has no Content-Length to check beforehand."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":  # the client left
            return messages
        size += len(message.get("body", b""))
        if size > limit:
            return None
        if not message.get("more_body", False):
            return messages


def replay(messages: list[dict], receive: Callable[[], Awaitable[dict]]) -> Callable[[], Awaitable[dict]]:
    """A receive that gives the messages read already, then what comes next (a disconnect)."""
    pending = list(messages)

    async def replayed() -> dict:
        return pending.pop(0) if pending else await receive()

    return replayed


def collect(pieces: Iterator[str], stop: threading.Event) -> str:
    """The pieces (one a sampled token) joined; once ``stop`` is set, no further token is sampled."""
    text = []
    for piece in pieces:
        text.append(piece)
        if stop.is_set():
            break
    close = getattr(pieces, "close", None)
    if close is not None:  # a generator: run its cleanup now, in this thread, not when it is collected
        close()
    return "".join(text)


def warm_up(served: Served) -> None:
    """One call through the model, so the first request does not pay for lazy initialisation."""
    family = served.variant.family
    if family.task.classifies:
        served.predict([family.example_input()])
    if family.generates:
        "".join(served.stream("", 1, 1.0, None))
