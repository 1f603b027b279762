"""The FastAPI app of ``dinodet serve``: ``create_app(detector, ServeOptions(...))``.

Endpoints: ``POST /v1/detect`` (a multipart upload in the field ``image`` or JSON ``{"image": base64}``;
query ``threshold``, ``classes``, ``max_det``), ``GET /`` (the web page, files in ``static/``, no
external resource), ``GET /health``, ``GET /ready``, ``GET /v1/model`` and ``GET /metrics``
(Prometheus text).  Detections are ``dinodet predict``'s: the same detector, preprocessing and
post-processing (``Detector.predict``), the same threshold rule (score > threshold) and the same
class / max-det selection (``inference.predict.make_selection``).  Every bad input is a JSON error
``{"error": message, "status": code}`` with a 4xx status; the model runs in the batcher's worker
thread and image decoding in a thread pool, so the event loop never blocks.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import io
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageOps, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.images import to_rgb
from ..errors import ConfigError, first_line
from ..inference.predict import Selection, make_selection
from .batching import (
    RGB_PIXEL_BYTES,
    DynamicBatcher,
    QueueFullError,
    QueueMemoryError,
    StoppedError,
    parse_max_batch,
    resolve_max_batch,
)
from .metrics import CONTENT_TYPE, ServeMetrics

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MULTIPART_SLACK = 64 * 1024  # bytes a multipart body or JSON body may carry besides the image itself
RETRY_AFTER_S = 1  # what a full queue tells clients to wait
# decoded images waiting, at most: 64 queued 1080p frames hold ~530 MB (4 bytes a pixel), 64 12-MP
# photos ~3 GB; 1 GB keeps a busy service's queue to what a modest server can spare
DEFAULT_MAX_QUEUE_MB = 1024.0
# a page that loads nothing from elsewhere: the browser refuses any external script, style or image
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
BACKENDS = {"Detector": "torch", "OnnxDetector": "onnxruntime", "OpenVinoDetector": "openvino"}


@dataclass(frozen=True)
class ServeOptions:
    """How the service answers: ``host`` / ``port`` to bind (127.0.0.1 unless told otherwise; port 0:
    any free port), batching (``max_batch`` images per forward pass, the oldest waiting at most
    ``max_wait_ms`` for others; ``max_batch=1`` turns it off, ``"auto"`` picks it per device: see
    ``batching.resolve_max_batch``), ``max_queue`` requests or ``max_queue_mb`` of decoded images
    waiting before 503s, the upload limits (``max_image_mb`` of encoded image, ``max_pixels``
    decoded; more is a 413), and the API key that ``/v1/*`` and ``/metrics`` require: ``api_key``, or read from
    ``api_key_file`` (neither: no key needed)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int | str = "auto"
    max_wait_ms: float = 10.0
    max_queue: int = 64
    max_queue_mb: float = DEFAULT_MAX_QUEUE_MB
    max_image_mb: float = 20.0
    max_pixels: int = int(Image.MAX_IMAGE_PIXELS or 89_478_485)  # PIL's decompression-bomb limit
    api_key: str | None = None
    api_key_file: str | Path | None = None

    def check(self) -> None:
        """Raises ConfigError for options out of range (messages name the CLI's options)."""
        try:
            parse_max_batch(self.max_batch)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.max_wait_ms < 0:
            raise ConfigError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if self.max_queue < 1:
            raise ConfigError(f"--max-queue must be >= 1, got {self.max_queue}")
        if not self.max_queue_mb > 0:
            raise ConfigError(f"--max-queue-mb must be > 0, got {self.max_queue_mb}")
        if not self.max_image_mb > 0:
            raise ConfigError(f"--max-image-mb must be > 0, got {self.max_image_mb}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        if self.api_key is not None and self.api_key_file is not None:
            raise ConfigError("give the API key or a file holding it, not both")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty")

    def key(self) -> str | None:
        """The API key (None: none needed), read from ``api_key_file`` if that is given.

        Raises:
            ConfigError: the file cannot be read or holds no key.
        """
        if self.api_key_file is None:
            return self.api_key
        path = self.api_key_file
        try:
            key = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--api-key-file '{path}' cannot be read: {getattr(e, 'strerror', None) or e}") from e
        if not key or len(key.splitlines()) > 1:
            raise ConfigError(f"--api-key-file '{path}' must hold the key alone on one line")
        return key

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * 1024 * 1024)

    @property
    def max_queue_bytes(self) -> int:
        return max(1, int(self.max_queue_mb * 1024 * 1024))


class ApiError(Exception):
    """An error answer: ``status`` (4xx/5xx), a one-line ``message``, a metrics ``reason``."""

    def __init__(self, status: int, message: str, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.reason, self.headers = status, message, reason, headers


def decode_image(data: bytes, max_pixels: int, admit: Callable[[int], None] | None = None) -> Image.Image:
    """An uploaded image as RGB, upright by its EXIF orientation: the rules of ``data.images.load_image``
    (PIL formats, ``to_rgb`` conversions) for bytes instead of a file, with the pixel count checked from
    the header before anything is decoded, and ``admit`` (given the decoded size in bytes; it raises
    to refuse) asked before decoding too.

    Raises:
        ApiError: 400 not an image / truncated / corrupt, 413 more than ``max_pixels`` pixels; what
            ``admit`` raises.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:  # said before decoding: a small file can unpack to gigabytes
                raise ApiError(413, f"the image is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels} "
                               "(a decompression bomb?)", "too_many_pixels")
            if admit is not None:
                admit(w * h * RGB_PIXEL_BYTES)
            return to_rgb(ImageOps.exif_transpose(im))  # decodes: a truncated file fails here
    except Image.DecompressionBombError as e:
        raise ApiError(413, f"the image is too large to decode safely: {first_line(e)}", "too_many_pixels") from e
    except UnidentifiedImageError as e:
        raise ApiError(400, "the upload is not an image, or an unsupported format", "not_an_image") from e
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports corrupt data with each of these
        raise ApiError(400, f"the image cannot be decoded: {first_line(e)}", "bad_image") from e


def parse_classes(text: str | None) -> list[int | str] | None:
    """``classes=1,car``: numbers are category ids, other words class names (as ``--classes``)."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    return [int(t) if t.lstrip("-").isdigit() else t for t in items]


def detector_device(detector: Any) -> str:
    """Where ``detector`` runs: a torch detector's device, ``cuda`` for an onnxruntime session on
    CUDAExecutionProvider, else ``cpu`` (OpenVINO runs on the CPU)."""
    device = getattr(detector, "device", None)
    if device is not None:
        return str(device)
    session = getattr(detector, "session", None)
    providers = session.get_providers() if hasattr(session, "get_providers") else []
    return "cuda" if providers and providers[0] == "CUDAExecutionProvider" else "cpu"


def model_summary(detector: Any) -> dict[str, Any]:
    """What a detection answer says about the model."""
    config = getattr(detector, "config", None)
    preset = getattr(detector, "preset", None) or (config.name if config is not None else None)
    return {"preset": preset, "backend": BACKENDS.get(type(detector).__name__, type(detector).__name__),
            "mode": getattr(detector, "mode", "exact"), "device": detector_device(detector)}


def create_app(detector: Any, options: ServeOptions | None = None) -> FastAPI:
    """The service's ASGI app around a loaded ``detector``.  The batcher's worker thread starts and
    stops with the app (its lifespan): queued requests are finished before it ends.

    Raises:
        ConfigError: ``options`` out of range.
    """
    options = options or ServeOptions()
    options.check()
    api_key = options.key()
    summary = model_summary(detector)
    max_batch, why = resolve_max_batch(options.max_batch, summary["device"], getattr(detector, "fixed_batch", None))
    log.info("dynamic batching: at most %d image(s) per forward pass (%s)", max_batch, why)
    batcher = DynamicBatcher(detector, max_batch=max_batch, max_wait_ms=options.max_wait_ms,
                             max_queue=options.max_queue, max_queue_bytes=options.max_queue_bytes)
    metrics = ServeMetrics(max_batch, lambda: batcher.depth, lambda: batcher.queued_bytes)
    batcher.on_batch = metrics.batch_size.observe
    class_ids = list(getattr(detector, "category_ids", None) or detector._category_ids.tolist())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:  # uvicorn has let the in-flight requests finish; the queue is empty or finishing
            await run_in_threadpool(batcher.stop)

    app = FastAPI(title="dinodet", summary="DINO object detection", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)  # the docs pages load scripts from a CDN: off
    app.state.batcher, app.state.metrics, app.state.options = batcher, metrics, options

    def failure(status: int, message: str, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.errors.labels(reason).inc()
        return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return failure(e.status, e.message, e.reason, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        reasons = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
        return failure(e.status_code, str(e.detail), reasons.get(e.status_code, f"http_{e.status_code}"),
                       getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = " ".join(str(x) for x in first.get("loc", ()))
        return failure(422, f"{where}: {first.get('msg', 'invalid value')}", "invalid_parameter")

    @app.middleware("http")
    async def _count(request: Request, call_next: Any) -> Response:
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            path = getattr(route, "path", "other")  # unmatched paths share one label: no label per typo
            metrics.requests.labels(path, request.method, str(status)).inc()
            metrics.latency.labels(path).observe(time.perf_counter() - start)

    def admit(nbytes: int) -> None:
        try:
            batcher.check_room(nbytes)
        except QueueMemoryError as e:
            raise busy(e, "queue_memory") from e

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            given = given or auth[7:].strip()
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(401, "an API key is required: send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                           "unauthorized", {"WWW-Authenticate": "Bearer"})

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        ok = batcher.running
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    keyed = [Depends(check_key)]  # checked before the query parameters: no key, no other answer than 401

    @app.get("/v1/model", dependencies=keyed)
    async def model() -> dict[str, Any]:
        return {
            **summary,
            "classes": [{"index": i, "category_id": c, "name": n}
                        for i, (c, n) in enumerate(zip(class_ids, detector.class_names))],
            "input": {"field": "image", "content_types": ["multipart/form-data", "application/json"],
                      "json": {"image": "base64 of the encoded image file"}, "image_urls": False,
                      "resize": {"size": detector.size, "max_size": detector.max_size},
                      "max_image_mb": options.max_image_mb, "max_pixels": options.max_pixels},
            "batching": {"max_batch": max_batch, "max_batch_option": str(options.max_batch),
                         "max_batch_reason": why, "max_wait_ms": options.max_wait_ms,
                         "max_queue": options.max_queue, "max_queue_mb": options.max_queue_mb},
        }

    @app.get("/metrics", dependencies=keyed)
    async def metrics_text() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/detect", dependencies=keyed)
    async def detect(request: Request, threshold: float = Query(0.3, ge=0.0, le=1.0),
                     classes: str | None = Query(None, description="category ids and/or class names, comma-separated"),
                     max_det: int | None = Query(None, ge=1)) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            selection = make_selection(parse_classes(classes), max_det, detector.class_names)
        except ConfigError as e:
            raise ApiError(400, str(e).replace("--classes", "classes").replace("--max-det", "max_det"),
                           "bad_classes") from e
        data = await read_upload(request, options.max_image_bytes)
        decode_start = time.perf_counter()
        # off the event loop; a full queue refuses the image before it is decoded
        image = await run_in_threadpool(decode_image, data, options.max_pixels, admit)
        decode_ms = (time.perf_counter() - decode_start) * 1000.0
        try:
            future = batcher.submit(image)
        except QueueMemoryError as e:
            raise busy(e, "queue_memory") from e
        except QueueFullError as e:
            raise busy(e, "queue_full") from e
        except StoppedError as e:
            raise ApiError(503, str(e), "stopping", {"Retry-After": str(RETRY_AFTER_S)}) from e
        try:
            result = await asyncio.wrap_future(future)
        except Exception as e:  # the model failed on this image: the service itself is fine
            log.warning("detection failed: %s", first_line(e))
            raise ApiError(500, f"detection failed: {first_line(e)}", "model_error") from e
        pred = select(result.prediction, threshold, selection)
        return {
            "image_size": list(pred.image_size),
            "detections": [{"bbox": box, "score": score, "category_id": cat, "class_name": name}
                           for box, score, cat, name in zip(pred.boxes.tolist(), pred.scores.tolist(),
                                                            pred.category_ids.tolist(), pred.class_names)],
            "model": summary,
            "batch_size": result.batch_size,
            "timing_ms": {"decode": round(decode_ms, 3), "queue": round(result.queue_ms, 3),
                          "inference": round(result.inference_ms, 3),
                          "total": round((time.perf_counter() - start) * 1000.0, 3)},
        }

    return app


def busy(error: Exception, reason: str) -> ApiError:
    """A 503 telling the client to retry after ``RETRY_AFTER_S``."""
    return ApiError(503, f"busy: {error}; retry later", reason, {"Retry-After": str(RETRY_AFTER_S)})


def select(pred: Any, threshold: float, selection: Selection) -> Any:
    """A threshold-0 Prediction cut to ``score > threshold`` (``Detector.predict``'s rule, so the same
    detections as predicting at ``threshold``) and ``selection``."""
    keep = (pred.scores > threshold).nonzero().flatten()
    cut = dataclasses.replace(pred, boxes=pred.boxes[keep], scores=pred.scores[keep], labels=pred.labels[keep],
                              category_ids=pred.category_ids[keep],
                              class_names=[pred.class_names[i] for i in keep.tolist()])
    return selection.apply(cut) if selection.active else cut


async def read_upload(request: Request, max_bytes: int) -> bytes:
    """The encoded image of a detect request: the multipart field ``image`` or JSON ``{"image": base64}``.

    Raises:
        ApiError: 413 over ``max_bytes`` (checked while reading, also without a Content-Length),
            415 another content type, 400 a malformed body, a missing image or an image URL.
    """
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        body = await read_body(request, max_bytes + MULTIPART_SLACK, max_bytes)

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "no file in the multipart field 'image'", "no_image")
        data = await upload.read()
    elif kind == "application/json":
        # base64 takes 4 bytes per 3
        body = await read_body(request, (max_bytes * 4) // 3 + MULTIPART_SLACK, max_bytes)
        data = await run_in_threadpool(decode_json_image, body)  # megabytes of JSON + base64: off the loop
    else:
        raise ApiError(415, f"unsupported content type '{kind or 'none'}': send multipart/form-data with the file "
                       "in the field 'image', or application/json {\"image\": BASE64}", "unsupported_media_type")
    if len(data) > max_bytes:
        raise ApiError(413, too_large(max_bytes), "too_large")
    if not data:
        raise ApiError(400, "the image is empty", "no_image")
    return data


def decode_json_image(body: bytes) -> bytes:
    """The image bytes of a JSON body ``{"image": BASE64}`` (a ``data:`` URL is accepted too)."""
    try:
        obj = json.loads(body)
    except ValueError as e:
        raise ApiError(400, f"the body is not valid JSON: {first_line(e)}", "bad_json") from e
    value = obj.get("image") if isinstance(obj, dict) else None
    if not isinstance(value, str):
        raise ApiError(400, "JSON bodies need {\"image\": BASE64 of the image file}", "no_image")
    if value.startswith(("http://", "https://", "ftp://")) or "url" in obj or "image_url" in obj:
        raise ApiError(400, "image URLs are not supported (the service fetches nothing): send the image itself",
                       "image_url")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"'image' is not valid base64: {first_line(e)}", "bad_base64") from e


async def read_body(request: Request, limit: int, image_limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, too_large(image_limit), "too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, too_large(image_limit), "too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(max_bytes: int) -> str:
    return f"the upload is larger than the limit of {max_bytes / 2**20:g} MB (--max-image-mb)"

