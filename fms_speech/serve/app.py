"""The FastAPI app: OpenAI's audio endpoints, /v1/models, /health, /metrics and the page at /.

A request is checked (API key, readiness, size, fields, audio) before it takes a place in the
queue; then its windows go to the Batcher and the handler waits for its Transcription, or for
its client to go away (its windows are then dropped). Every error is OpenAI's error body.
"""

import asyncio
import contextlib
import hmac
import importlib.resources
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from fms_speech.audio import AudioError
from fms_speech.serve.batcher import Batcher, Job, QueueFull
from fms_speech.serve.metrics import ServerMetrics
from fms_speech.serve.openai_api import APIError, AudioRequest, Limits, parse_request, render
from fms_speech.serve.streaming import TextDeltas, delta_event, done_event, sse
from fms_speech.serve.uploads import (
    NotMultipart,
    UploadTooLarge,
    display_name,
    load_upload,
    read_form,
)
from fms_speech.transcribe import Transcriber, Transcription

log = logging.getLogger("fms_speech.serve")
ROUTES = (
    "/",
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
)
DISCONNECTED = 499  # nginx's status for "the client closed the request", in logs and metrics


SHUTDOWN_SECONDS = 30.0  # how long shutting down waits for the model thread's batch


def create_app(
    transcriber: Transcriber,
    batcher: Batcher,
    metrics: ServerMetrics,
    limits: Limits,
    *,
    api_key: str | None,
    max_upload_bytes: int,
) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # shutting down, also on SIGTERM or Ctrl-C (after which uvicorn raises the signal again
        # and the process ends at once): the model thread finishes its batch and, under
        # tensor parallelism, releases the other ranks first
        batcher.stop()
        await run_in_threadpool(batcher.join, SHUTDOWN_SECONDS)

    app = FastAPI(
        title="fms-speech", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.add_middleware(RequestLog, metrics=metrics)
    page = importlib.resources.files("fms_speech.serve").joinpath("page.html").read_text()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return APIError(error.status_code, str(error.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):
        log.exception("unexpected error on %s", request.url.path)
        message = (
            f"internal error: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        )
        return APIError(500, message, type="server_error").response()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.encode(), api_key.encode()):
            raise APIError(
                401,
                "Missing or incorrect API key: send it as 'Authorization: Bearer KEY'.",
                code="invalid_api_key",
            )

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        if batcher.ready.is_set():
            return {"status": "ready", "model": limits.served_model_name}
        return JSONResponse({"status": "warming up"}, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [_model_card(limits.served_model_name)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        authorize(request)
        if name != limits.served_model_name:
            raise APIError(404, f"The model '{name}' does not exist.", code="model_not_found")
        return _model_card(name)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        return await audio(request, "transcribe")

    @app.post("/v1/audio/translations")
    async def translations(request: Request):
        return await audio(request, "translate")

    async def audio(request: Request, task: str) -> Response:
        authorize(request)
        if not batcher.ready.is_set():
            raise APIError(
                503, "The model is warming up: retry when /health says ready.", type="server_error"
            )
        try:
            form = await read_form(request, max_upload_bytes)
        except UploadTooLarge:
            limit = max_upload_bytes / 2**20
            raise APIError(
                413,
                f"The upload is larger than the {limit:g} MB allowed (--max-upload-mb).",
                param="file",
                code="file_too_large",
            ) from None
        except NotMultipart:
            raise APIError(
                400, "Send the request as multipart/form-data with the audio in 'file'."
            ) from None
        try:
            parsed = parse_request(form, task, limits)
            if batcher.full():  # refused before its audio is decoded (submit checks again)
                raise QueueFull
            name = display_name(parsed.upload)
            waveform = await run_in_threadpool(load_upload, parsed.upload, name)
        except AudioError as error:
            raise APIError(400, str(error), param="file", code="invalid_audio") from None
        except QueueFull:
            raise _busy() from None
        finally:
            await form.close()
        result = Transcription(name)
        result.timings = dict.fromkeys(transcriber.stages, 0.0)
        try:
            entry = await run_in_threadpool(transcriber.prepare, result, waveform, parsed.options)
        except AudioError as error:  # longer than --max-audio-seconds
            raise APIError(400, str(error), param="file", code="audio_too_long") from None
        except ValueError as error:  # a PromptError: the prompt cannot be made a chat prompt
            raise APIError(400, str(error), param="prompt", code="invalid_value") from None
        request.state.summary = f"{result.duration:.1f} s of audio in {len(entry.windows)} windows"
        job = _job(entry, parsed)
        try:
            batcher.submit(job)
        except QueueFull:
            raise _busy() from None
        if parsed.stream:
            return StreamingResponse(
                _events(job, request), media_type="text/event-stream", headers=_NO_CACHE
            )
        done = await _wait(job, request)
        if done is None:
            return Response(status_code=DISCONNECTED)
        return _respond(done, parsed)

    def _busy() -> APIError:
        return APIError(
            503,
            f"The server is busy ({batcher.max_queue} requests queued, --max-queue): retry later.",
            type="server_error",
            code="queue_full",
        )

    def _job(entry, parsed: AudioRequest) -> Job:
        loop = asyncio.get_running_loop()
        # a CTC model's text comes whole per window: its stream is one delta per window
        one_greedy_window = (
            len(entry.windows) == 1 and entry.options.num_beams == 1 and transcriber.ctc is None
        )
        return Job(
            entry,
            loop,
            loop.create_future(),
            events=asyncio.Queue() if parsed.stream else None,
            stream_tokens=parsed.stream and one_greedy_window,
        )

    def _respond(result: Transcription, parsed: AudioRequest) -> Response:
        if result.error is not None:
            raise APIError(500, result.error, type="server_error", code="model_error")
        metrics.audio_seconds.inc(result.duration)
        return render(result, parsed)

    async def _wait(job: Job, request: Request) -> Transcription | None:
        """The job's result, or None if its client disconnected first (its windows dropped)."""
        disconnected = asyncio.ensure_future(_disconnect(request))
        try:
            await asyncio.wait({job.done, disconnected}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnected.cancel()
        if job.done.done():
            return job.done.result()
        batcher.cancel(job)
        request.state.disconnected = True
        return None

    async def _events(job: Job, request: Request):
        deltas = TextDeltas(transcriber.tokenizer)
        try:
            while True:
                kind, value = await job.events.get()
                if kind == "done":
                    break
                if kind == "tokens":
                    delta = deltas.add_token(value)
                else:
                    delta = deltas.windows_done([w.text for w in job.entry.windows[:value]])
                if delta:
                    yield delta_event(delta)
            if value.error is not None:
                yield sse(APIError(500, value.error, type="server_error").body())
                return
            if rest := deltas.finish(value.text):
                yield delta_event(rest)
            metrics.audio_seconds.inc(value.duration)
            yield done_event(value.text)
        except asyncio.CancelledError:  # the client went away mid-stream
            request.state.disconnected = True
            raise
        finally:
            batcher.cancel(job)  # nothing if it finished

    return app


_NO_CACHE = {"Cache-Control": "no-cache"}


async def _disconnect(request: Request) -> None:
    # the body is read: the next message is the client's disconnect (or the response's end)
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "fms-speech"}


class RequestLog:
    """ASGI middleware: one log line and the metrics of each request, streams included."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500
        state = scope.setdefault("state", {})

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            seconds = time.perf_counter() - started
            if state.get("disconnected"):
                status = DISCONNECTED
            path = scope["path"]
            route = (
                path
                if path in ROUTES
                else "/v1/models"
                if path.startswith("/v1/models/")
                else "other"
            )
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(seconds)
            if route not in ("/health", "/metrics"):
                summary = state.get("summary")
                log.info(
                    "%s %s %s in %.3f s%s",
                    scope["method"],
                    path,
                    "client disconnected" if status == DISCONNECTED else status,
                    seconds,
                    f": {summary}" if summary else "",
                )
