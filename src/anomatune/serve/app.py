"""The HTTP API and the operator page (FastAPI).

Routes: ``POST /predict`` (multipart: one or more ``file`` fields, optional ``model``;
``?images=base64|url|none``), ``GET /health``, ``GET /models``, ``GET /images/{name}``
(overlays and masks of ``?images=url``), ``GET /`` (the page), ``/docs`` (OpenAPI).
Every error is a 4xx (or 500) JSON body ``{"error": "one line"}``; the server keeps
answering. With an API key, POST routes need it in the ``X-API-Key`` header.

Memory is bounded by settings, whatever the requests carry: a request's bytes
(``--max-request-mb``: refused without reading the rest), each image's pixels
(``--max-pixels``: refused from its header), the decoded pixels in flight over every
request (the same bound), a forward pass (``--max-batch``) and the overlays kept for
``?images=url`` (``--image-cache-mb``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from importlib import resources
from typing import BinaryIO, Literal

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .. import __version__
from ..data.images import ImageTooLarge, header_size, read_image
from ..errors import DataError
from .batching import Batcher
from .models import ServedModel, check_run_names, encode
from .settings import ServeSettings

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request the server refuses: an HTTP status and one line saying why and what to do."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


class ImageCache:
    """The PNGs of ``?images=url`` answers, the newest kept within ``capacity`` bytes."""

    def __init__(self, capacity: int):
        self.capacity, self.used, self.items = capacity, 0, OrderedDict()

    def put(self, png: bytes) -> str:
        name = f"{uuid.uuid4().hex}.png"
        self.items[name] = png
        self.used += len(png)
        while self.used > self.capacity and self.items:
            self.used -= len(self.items.popitem(last=False)[1])
        return f"/images/{name}"

    def get(self, name: str) -> bytes:
        if name not in self.items:
            raise ApiError(404, f"image {name} is not (or no longer) kept: ask again, or use ?images=base64")
        return self.items[name]


class RequestBudget:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 (``message``), and is never read past the limit:
    refused from its Content-Length before any byte is read, or as soon as a streamed body passes it."""

    def __init__(self, app, limit: int, message: str):
        self.app, self.limit, self.message = app, limit, message

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await error(413, self.message)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # raised while FastAPI parses the form: it reaches the HTTPException handler
                raise HTTPException(413, self.message)
            return message

        await self.app(scope, counted, send)


class PixelBudget:
    """Decoded pixels in flight, over every request, at most ``capacity``: an upload waits for room before it is
    decoded, so the memory that images take is bounded by a setting, whatever the requests carry."""

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0
        self.changed = asyncio.Condition()

    @asynccontextmanager
    async def hold(self, pixels: int):
        async with self.changed:
            await self.changed.wait_for(lambda: self.used == 0 or self.used + pixels <= self.capacity)
            self.used += pixels
        try:
            yield
        finally:
            async with self.changed:
                self.used -= pixels
                self.changed.notify_all()


def image_size(upload: BinaryIO, name: str, size: int | None, settings: ServeSettings, max_pixels: int) -> tuple[int, int]:
    """An upload's (width, height) from its header, refused in one line when empty, not an image, or too large."""
    if not size:
        raise ApiError(400, f"{name}: the file is empty")
    try:
        width, height = header_size(upload, name, max_pixels)
    except ImageTooLarge as exc:
        raise ApiError(413, str(exc)) from None
    except DataError as exc:
        raise ApiError(415, str(exc)) from None
    if max(width, height) > settings.max_side:
        raise ApiError(413, f"{name}: {width}x{height} px; the largest side accepted is {settings.max_side} px (--max-side)")
    return width, height


def decode(upload: BinaryIO, name: str, max_pixels: int) -> Image.Image:
    """An upload as RGB, refused in one line when truncated or of an odd size."""
    try:
        return read_image(upload, name, max_pixels)
    except DataError as exc:
        raise ApiError(400, str(exc)) from None


def create_app(models: list[ServedModel], settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI application serving ``models`` (their ids must differ)."""
    settings = settings or ServeSettings()
    check_run_names([m.run_dir for m in models])
    by_id = {m.id: m for m in models}
    batcher = Batcher(settings.max_batch, settings.max_wait_ms)
    cache = ImageCache(int(settings.image_cache_mb * 2**20))
    budget = PixelBudget(max(m.max_pixels for m in models))
    request_limit = int(settings.max_request_mb * 2**20)

    @asynccontextmanager
    async def lifespan(_app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="anomatune",
        version=__version__,
        lifespan=lifespan,
        description="Industrial anomaly detection: score images with fitted runs. The page for the operator is at /.",
    )

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return error(exc.status, str(exc))

    too_large = (
        f"the request is larger than the {settings.max_request_mb:g} MB accepted (--max-request-mb): "
        "send fewer or smaller files per request"
    )
    app.add_middleware(RequestBudget, limit=request_limit, message=too_large)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        return error(exc.status_code, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
        if where == "file" and first.get("type") == "missing":
            return error(400, "no image: send it as the multipart form field 'file' (several 'file' fields for a batch)")
        return error(422, f"{where or 'request'}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def failed(_request, exc: Exception):
        log.exception("request failed")
        return error(500, f"internal error ({type(exc).__name__}: {exc}); the server goes on")

    def authorised(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(given.encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send it in the X-API-Key header")

    def chosen(model: str | None) -> ServedModel:
        if model is None:
            if len(by_id) == 1:
                return next(iter(by_id.values()))
            raise ApiError(400, f"several models are served: pass model (one of {', '.join(by_id)})")
        found = by_id.get(model) or next((m for m in models if m.run_dir.name == model), None)  # names are unique
        if found is None:
            raise ApiError(404, f"no model {model!r}: served are {', '.join(by_id)} (GET /models)")
        return found

    @app.post("/predict", dependencies=[Depends(authorised)])
    async def predict(
        file: list[UploadFile] = File(..., description="The image(s); repeat the field for a batch."),
        model: str | None = Form(None, description="A model id or run name (GET /models); needed when several are served."),
        images: Literal["base64", "url", "none"] = Query(
            "base64", description="Overlay and mask as base64 PNG, as URLs, or not at all."
        ),
    ):
        """Score images: per image its score, decision (against the run's threshold), heatmap overlay and defect mask."""
        served = chosen(model)
        batcher.counters.requests += 1
        names = [upload.filename or f"file {i + 1}" for i, upload in enumerate(file)]
        sizes = [
            await run_in_threadpool(image_size, upload.file, name, upload.size, settings, served.max_pixels)
            for name, upload in zip(names, file)
        ]  # every file is checked before any is decoded

        async def score(upload: UploadFile, name: str, size: tuple[int, int]) -> dict:
            async with budget.hold(size[0] * size[1]):
                picture = await run_in_threadpool(decode, upload.file, name, served.max_pixels)
                return (await batcher.score(served, [picture], drawn=images != "none"))[0]

        results = await asyncio.gather(*(score(upload, name, size) for upload, name, size in zip(file, names, sizes)))
        answers = []
        for name, result in zip(names, results):
            answer = {"file": name, "score": result["score"], "decision": result["decision"]}
            if images == "base64":
                answer |= {"overlay": encode(result["overlay"]), "mask": encode(result["mask"])}
            elif images == "url":
                answer |= {"overlay": cache.put(result["overlay"]), "mask": cache.put(result["mask"])}
            answers.append(answer)
        return {"model": served.id, "anomatune_version": __version__, "threshold": served.threshold, "results": answers}

    @app.get("/images/{name}", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def image(name: str):
        """An overlay or mask of an answer to ``?images=url``."""
        return Response(cache.get(name), media_type="image/png")

    @app.get("/health")
    async def health():
        """Liveness, and how batching went: requests, images, forward passes."""
        return {
            "status": "ok",
            "anomatune_version": __version__,
            "models": len(by_id),
            "runtime": settings.runtime,
            "max_batch": settings.max_batch,
            **batcher.counters.to_dict(),
        }

    @app.get("/models")
    async def list_models():
        """Each served run: id, backbone, detector, threshold, input size and its evaluation's metrics (null if not evaluated)."""
        return [m.info() for m in models]

    static = resources.files(__package__) / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(str(static / "index.html"))

    return app
