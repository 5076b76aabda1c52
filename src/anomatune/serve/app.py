"""The HTTP API and the operator page (FastAPI).

Routes: ``POST /predict`` (multipart: one or more ``file`` fields, optional ``model``;
``?images=base64|url|none``; each result has an ``id``), ``POST /feedback`` (the operator's
verdict on a result's ``id`` or on a ``file``, stored in the model's folder), ``POST
/models/{name}/reload`` (load the model's served version), ``POST /models/{name}/threshold``
(a new version at a new false-alarm rate or threshold; needs the API key), ``GET /health``,
``GET /models`` (each model's version, parent and drift), ``GET /metrics`` (Prometheus),
``GET /images/{name}`` (overlays and masks of ``?images=url``), ``GET /`` (the page),
``/docs`` (OpenAPI).
Every error is a 4xx (or 500) JSON body ``{"error": "one line"}``; the server keeps
answering. With an API key, every route but ``/``, ``/health`` and the docs needs it (header
``X-API-Key``); whatever the key, a write from another origin is refused.

A served model is a model folder's served version (its alias), read into memory once. A
new version (``update``, ``threshold``, ``promote``) is loaded beside the one served, then
swapped in: a request in flight finishes on the version it started with, and none fails.
Versions are written once and never changed, so a load never sees a half-written one.

Memory is bounded by settings, whatever the requests carry: a request's bytes
(``--max-request-mb``: refused without reading the rest), each image's pixels
(``--max-pixels``: refused from its header), the decoded pixels in flight over every
request (the same bound), the pixels of one request (``--max-request-pixels``), a forward
pass (``--max-batch``) and the overlays kept for ``?images=url`` (``--image-cache-mb``);
after a large request the free memory goes back to the kernel, so the bound holds over the
server's life.
"""

from __future__ import annotations

import asyncio
import io
import logging
import secrets
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from importlib import resources
from pathlib import Path
from typing import BinaryIO, Literal
from urllib.parse import urlsplit

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .. import __version__
from ..allocator import release_memory
from ..data.images import ImageTooLarge, header_size, open_image, read_image
from ..errors import AnomatuneError, DataError
from ..folders.feedback import VERDICTS, WITHDRAWN, FeedbackStore
from ..folders.kinds import RunFolder, folder_stamp
from ..pipeline.update import threshold_version
from ..store import InspectionStore, StoreSettings
from .batching import Batcher
from .drift import DriftMonitor, MetricsCollector
from .models import ServedModel, check_run_names, encode, png_bytes
from .settings import ServeSettings

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request the server refuses: an HTTP status and one line saying why and what to do."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


class BoundedCache:
    """Values by key, the newest kept within ``capacity`` bytes (``size`` of each given when put)."""

    def __init__(self, capacity: int):
        self.capacity, self.used, self.items = capacity, 0, OrderedDict()

    def put(self, value, size: int, key: str | None = None) -> str:
        key = key or uuid.uuid4().hex
        self.items[key] = (value, size)
        self.used += size
        while self.used > self.capacity and self.items:
            self.used -= self.items.popitem(last=False)[1][1]
        return key

    def get(self, key: str, missing: str):
        if key not in self.items:
            raise ApiError(404, missing)
        return self.items[key][0]


@dataclass
class Scored:
    """An uploaded image as it was scored: what feedback on its ``id`` stores (the version that scored it, not a
    reference to it: a cached upload never keeps an old version in memory)."""

    data: bytes
    file: str  # the file name it was uploaded under
    run: str  # the served model's name
    model: str  # the version's id
    version: str  # the version's name (v1, v2, ...)
    threshold: float
    score: float
    normalized_score: float
    decision: str

    @classmethod
    def of(cls, data: bytes, name: str, served: ServedModel, result: dict) -> Scored:
        return cls(data, name, served.name, served.id, served.pipeline.version_, served.threshold, result["score"],
                   result["normalized_score"], result["decision"])  # fmt: skip

    @property
    def suffix(self) -> str:
        return Path(self.file).suffix


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
    decoded, so the memory that images take is bounded by a setting, whatever the requests carry. When the last
    hold ends after a large one, the process's free memory goes back to the kernel (``release_memory``): a server's
    memory stays bounded over its life, not only per request."""

    RELEASE_AFTER = 16_000_000  # pixels held since the last release that make one worth its few milliseconds

    def __init__(self, capacity: int):
        self.capacity, self.used, self.since_release = capacity, 0, 0
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
                self.since_release += pixels
                idle = self.used == 0 and self.since_release >= self.RELEASE_AFTER
                if idle:
                    self.since_release = 0
                self.changed.notify_all()
            if idle:
                await run_in_threadpool(release_memory)


class Registry:
    """The served models by run name, each with its drift monitor and feedback store; :meth:`swap` puts a new
    version in whole (a request holds the :class:`ServedModel` it started with)."""

    def __init__(self, models: list[ServedModel], settings: ServeSettings, store: StoreSettings | None = None):
        self.settings = settings
        self.models: dict[str, ServedModel] = {}
        self.monitors: dict[str, DriftMonitor] = {}
        self.stores = {m.name: FeedbackStore(m.run_dir) for m in models}
        shared = None if store is None or store.store is None else InspectionStore(store.store, store.station)
        self.inspections = {m.name: shared or InspectionStore.chosen(store, RunFolder(m.run_dir).model_path) for m in models}
        self.model_names = {m.name: RunFolder(m.run_dir).model_path.name for m in models}  # the rows' model column
        self.reloading: dict[str, asyncio.Lock] = {m.name: asyncio.Lock() for m in models}
        for m in models:
            self.swap(m)

    def swap(self, model: ServedModel) -> None:
        s = self.settings
        current = self.models.get(model.name)
        self.models[model.name] = model
        if current is not None and current.id == model.id:  # the same version again: its drift window goes on
            return
        calibration = model.pipeline.image_calibration
        self.monitors[model.name] = DriftMonitor(
            model.id,
            model.calibration_scores,
            model.threshold,
            s.drift_window,
            s.drift_bound,
            normalize=calibration.normalized,
            expected_rate=calibration.rate_at_threshold,
        )

    def find(self, model: str | None) -> ServedModel:
        """By id or run name; an older id of a served run (``NAME@version``) finds its current version."""
        if model is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise ApiError(400, f"several models are served: pass model (one of {', '.join(self.ids())})")
        found = self.models.get(model.partition("@")[0])
        if found is None:
            raise ApiError(404, f"no model {model!r}: served are {', '.join(self.ids())} (GET /models)")
        return found

    def ids(self) -> list[str]:
        return [m.id for m in self.models.values()]

    def describe(self, model: ServedModel) -> dict:
        """What ``/models`` says of a served model: its run, version and parent, and its drift."""
        return model.info() | {"drift": self.monitors[model.name].stats()}

    def info(self) -> list[dict]:
        return [self.describe(m) for m in self.models.values()]

    async def reload(self, name: str) -> ServedModel:
        """Load the run folder's current version beside the served one, then swap it in (one reload per run at once)."""
        current = self.find(name)
        async with self.reloading[current.name]:
            loaded = await run_in_threadpool(self.find(name).reloaded)
            self.swap(loaded)
        log.info("%s: now serving %s (was %s)", loaded.name, loaded.id, current.id)
        return loaded

    async def watch(self) -> None:
        """Every ``watch`` seconds, reload each run whose folder changed; a failed load is logged and tried again."""
        while True:
            await asyncio.sleep(self.settings.watch)
            for name, model in list(self.models.items()):
                if folder_stamp(model.run_dir) == model.stamp:
                    continue
                try:
                    await self.reload(name)
                except Exception as exc:  # the served version stays; the next check tries again
                    log.warning("%s changed but could not be loaded (%s): still serving %s", model.run_dir, exc, model.id)


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


def read_all(upload: BinaryIO) -> bytes:
    upload.seek(0)
    return upload.read()


def image_url(cache: BoundedCache, png: bytes) -> str:
    return f"/images/{cache.put(png, len(png), f'{uuid.uuid4().hex}.png')}"


def binary_mask(upload: UploadFile, image: bytes, max_pixels: int) -> bytes:
    """A feedback mask as a 0/255 PNG, refused in one line unless it is a binary image of the image's size (checked
    from both headers before the mask is decoded: a mask costs no more than its image)."""
    name = upload.filename or "mask"
    try:
        expected = header_size(io.BytesIO(image), "image", max_pixels)
        found = header_size(upload.file, name, max_pixels)
    except ImageTooLarge as exc:
        raise ApiError(413, str(exc)) from None
    except DataError as exc:
        raise ApiError(400, f"{name}: not a readable image ({exc})") from None
    if found != expected:
        raise ApiError(
            400, f"{name}: the mask is {found[0]}x{found[1]} px, its image {expected[0]}x{expected[1]}: draw it on the image"
        )
    try:
        upload.file.seek(0)
        with open_image(upload.file) as drawn:
            drawn.load()
            values = np.asarray(drawn.convert("L"))
    except (OSError, Image.DecompressionBombError) as exc:
        raise ApiError(400, f"{name}: not a readable image ({exc})") from None
    if not np.isin(np.unique(values), (0, 1, 255)).all() or values.max(initial=0) == 1 and (values == 255).any():
        raise ApiError(400, f"{name}: the mask is not binary: use 0 for good pixels and 255 (or 1) for the defect")
    return png_bytes(Image.fromarray(((values > 0) * 255).astype(np.uint8)))


def create_app(models: list[ServedModel], settings: ServeSettings | None = None, store: StoreSettings | None = None) -> FastAPI:
    """The FastAPI application serving ``models`` (their ids must differ); their inspections go to ``store`` (default:
    each model's own SQLite file)."""
    settings = settings or ServeSettings()
    check_run_names([m.run_dir for m in models])
    registry = Registry(models, settings, store)
    batcher = Batcher(settings.max_batch, settings.max_wait_ms)
    cache = BoundedCache(int(settings.image_cache_mb * 2**20))  # overlays and masks of ?images=url
    uploads = BoundedCache(int(settings.image_cache_mb * 2**20))  # scored uploads, for feedback on their id
    budget = PixelBudget(max(m.max_pixels for m in models))
    request_limit = int(settings.max_request_mb * 2**20)
    metrics = CollectorRegistry(auto_describe=True)
    metrics.register(MetricsCollector(lambda: dict(registry.monitors), batcher.counters.to_dict))

    @asynccontextmanager
    async def lifespan(_app):
        await batcher.start()
        watcher = asyncio.create_task(registry.watch()) if settings.watch > 0 else None
        yield
        if watcher is not None:
            watcher.cancel()
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
        """Writes need the API key when one is set, and come from this server's own origin whatever the setting: a
        page elsewhere cannot plant verdicts or change a model through the operator's browser."""
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host", ""):
            raise ApiError(403, f"cross-origin request from {origin} refused: use the page this server serves")
        if request.headers.get("sec-fetch-site") == "cross-site":
            raise ApiError(403, "cross-site request refused: use the page this server serves")
        if settings.api_key is None:
            return
        given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(given.encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send it in the X-API-Key header")

    async def score_upload(served: ServedModel, upload: UploadFile, name: str, size: tuple[int, int], drawn: bool) -> dict:
        """One checked upload decoded within the pixel budget and scored in a shared forward pass."""
        async with budget.hold(size[0] * size[1]):
            picture = await run_in_threadpool(decode, upload.file, name, served.max_pixels)
            return (await batcher.score(served, [picture], drawn=drawn))[0]

    @app.post("/predict", dependencies=[Depends(authorised)])
    async def predict(
        file: list[UploadFile] = File(..., description="The image(s); repeat the field for a batch."),
        model: str | None = Form(None, description="A model id or run name (GET /models); needed when several are served."),
        images: Literal["base64", "url", "none"] = Query(
            "base64", description="Overlay and mask as base64 PNG, as URLs, or not at all."
        ),
    ):
        """Score images: per image its score, decision (against the run's threshold), heatmap overlay and defect mask."""
        served = registry.find(model)
        batcher.counters.requests += 1
        names = [upload.filename or f"file {i + 1}" for i, upload in enumerate(file)]
        sizes = [
            await run_in_threadpool(image_size, upload.file, name, upload.size, settings, served.max_pixels)
            for name, upload in zip(names, file)
        ]  # every file is checked before any is decoded
        total = sum(w * h for w, h in sizes)
        if total > settings.max_request_pixels:
            raise ApiError(
                413,
                f"the request's {len(sizes)} images hold {total / 1e6:.3g} megapixels; at most "
                f"{settings.max_request_pixels / 1e6:g} are accepted per request (--max-request-pixels): send fewer",
            )

        drawn = images != "none"
        results = await asyncio.gather(
            *(score_upload(served, upload, name, size, drawn) for upload, name, size in zip(file, names, sizes))
        )
        registry.monitors[served.name].add(r["score"] for r in results)
        answers = []
        for name, upload, result in zip(names, file, results):
            data = await run_in_threadpool(read_all, upload.file)
            kept = Scored.of(data, name, served, result)
            answer = {"file": name, "id": uploads.put(kept, len(data))}
            answer |= {key: result[key] for key in ("score", "normalized_score", "false_alarm_rate", "decision")}
            if images == "base64":
                answer |= {"overlay": encode(result["overlay"]), "mask": encode(result["mask"])}
            elif images == "url":
                answer |= {"overlay": image_url(cache, result["overlay"]), "mask": image_url(cache, result["mask"])}
            answers.append(answer)
            await run_in_threadpool(record, served, answer["id"], name, result)
        return {"model": served.id, "anomatune_version": __version__, "threshold": served.threshold, "results": answers}

    def record(served: ServedModel, inspection_id: str, name: str, result: dict) -> None:
        """One inspection in the store, under the id the answer gives (feedback on it finds it)."""
        decision = result["decision"]
        registry.inspections[served.name].add(
            id=inspection_id,
            source="api",
            model=registry.model_names[served.name],
            version=served.pipeline.version_,
            model_id=served.id,
            file_name=name,
            score=result["score"],
            normalized=result["normalized_score"],
            false_alarm_rate=result["false_alarm_rate"],
            threshold=served.threshold,
            verdict="defect" if decision == "defective" else decision,
        )

    @app.post("/feedback", dependencies=[Depends(authorised)])
    async def feedback(
        verdict: Literal[(*VERDICTS, WITHDRAWN)] = Form(
            ..., description="good: a false alarm (the part is good); defect: a defect; none: take the verdict back."
        ),
        id: str | None = Form(None, description="The id of a result of /predict (kept while --image-cache-mb allows)."),
        file: UploadFile | None = File(None, description="The image, when not given by its id (it is scored first)."),
        mask: UploadFile | None = File(None, description="Where the defect is: a binary PNG of the image's size."),
        note: str | None = Form(None, max_length=2000, description="Anything the operator wants to say."),
        model: str | None = Form(None, description="With file: a model id or run name, when several are served."),
    ):
        """Store the operator's verdict on a part in the model's folder (append-only; kept across restarts and
        versions): the last verdict on a part counts, and ``anomatune update RUN --feedback`` learns from the good
        ones once and keeps the defects for validation."""
        if id is not None:
            kept = uploads.get(id, f"no scored image {id!r} is kept (any more): send the image as 'file' instead")
            served = registry.find(kept.run)
        elif file is not None:
            served = registry.find(model)
            name = file.filename or "file"
            size = await run_in_threadpool(image_size, file.file, name, file.size, settings, served.max_pixels)
            result = await score_upload(served, file, name, size, drawn=False)
            data = await run_in_threadpool(read_all, file.file)
            kept = Scored.of(data, name, served, result)
        else:
            raise ApiError(400, "no image: send the 'id' of a result of /predict, or the image as 'file'")
        mask_png = None
        if mask is not None:
            width, height = await run_in_threadpool(header_size, io.BytesIO(kept.data), "image", served.max_pixels)
            async with budget.hold(width * height):
                mask_png = await run_in_threadpool(binary_mask, mask, kept.data, served.max_pixels)
        line = {
            "verdict": verdict,
            "result_id": id,
            "file": kept.file,
            "model": kept.model,
            "version": kept.version,
            "score": kept.score,
            "normalized_score": kept.normalized_score,
            "threshold": kept.threshold,
            "decision": kept.decision,
            "note": note,
        }
        entry = await run_in_threadpool(registry.stores[served.name].add, kept.data, kept.suffix, line, mask_png)
        inspections = registry.inspections[served.name]
        await run_in_threadpool(
            partial(inspections.add_feedback, id=entry["id"], model=registry.model_names[served.name], model_id=kept.model,
                    version=kept.version, part=entry["part"], verdict=verdict, note=note, file_name=kept.file,
                    inspection_id=id, score=kept.score, normalized=kept.normalized_score, threshold=kept.threshold,
                    decision=kept.decision, image=entry["image"], mask=entry["mask"])
        )  # fmt: skip
        if id is not None:
            await run_in_threadpool(inspections.set_operator_verdict, id, verdict, note or "")
        return {"id": entry["id"], "part": entry["part"], "verdict": verdict, "model": kept.model, "time": entry["time"]}

    @app.post("/models/{name}/threshold", dependencies=[Depends(authorised)])
    async def set_threshold(
        name: str,
        false_alarm_rate: float | None = Form(None, gt=0, le=0.5, description="The share of good parts that may be flagged."),
        threshold: float | None = Form(None, description="Or a threshold on image scores, set by hand."),
    ):
        """A new version of the served model deciding by a new false-alarm rate or threshold (never an edit of the
        version in service), then served. Needs the server's API key: without --api-key this route is closed."""
        if settings.api_key is None:
            raise ApiError(403, "changing a threshold needs an API key: start the server with --api-key")
        served = registry.find(name)
        if (false_alarm_rate is None) == (threshold is None):
            raise ApiError(400, "send one of false_alarm_rate and threshold")
        try:
            await run_in_threadpool(
                threshold_version, served.run_dir, false_alarm_rate=false_alarm_rate, threshold_value=threshold
            )
        except AnomatuneError as exc:
            raise ApiError(409, str(exc)) from None
        return registry.describe(await registry.reload(served.name))

    @app.post("/models/{name}/reload", dependencies=[Depends(authorised)])
    async def reload(name: str):
        """Load the run folder's current version (after 'anomatune update --out RUN' or a refit) and swap it in;
        requests in flight finish on the version they started with. The answer is the model as /models shows it."""
        try:
            loaded = await registry.reload(name)
        except AnomatuneError as exc:
            raise ApiError(409, f"{exc}; still serving {registry.find(name).id}") from None
        return registry.describe(loaded)

    @app.get(
        "/images/{name}",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
        dependencies=[Depends(authorised)],
    )
    async def image(name: str):
        """An overlay or mask of an answer to ``?images=url``."""
        return Response(
            cache.get(name, f"image {name} is not (or no longer) kept: ask again, or use ?images=base64"), media_type="image/png"
        )

    @app.get("/health")
    async def health():
        """Liveness, and how batching went: requests, images, forward passes."""
        return {
            "status": "ok",
            "anomatune_version": __version__,
            "models": len(registry.models),
            "runtime": settings.runtime,
            "max_batch": settings.max_batch,
            **batcher.counters.to_dict(),
        }

    @app.get("/models", dependencies=[Depends(authorised)])
    async def list_models():
        """Each served run: id, version and parent, backbone, detector, threshold, input size, its evaluation's metrics
        (null if not evaluated) and the drift of its recent scores."""
        return registry.info()

    @app.get("/inspections", dependencies=[Depends(authorised)])
    async def inspections(
        since: datetime | None = Query(None, description="From this time on (ISO 8601, e.g. 2026-12-04T06:00:00+01:00)."),
        until: datetime | None = Query(None, description="Before this time."),
        verdict: Literal["good", "defect", "unknown", "failed"] | None = Query(None),
        version: str | None = Query(None, description="A version name (v1, v2, ...)."),
        model: str | None = Query(None, description="A model's name; default: the only one served."),
        limit: int = Query(100, ge=1, le=10_000),
    ):
        """The newest inspections first (every /predict result and, with a shared store, every station's), with the
        operator's verdicts: for dashboards and the page's history."""
        served = registry.find(model)
        store = registry.inspections[served.name]
        name = registry.model_names[served.name]
        return await run_in_threadpool(store.inspections, since, until, verdict, version, name, None, limit)

    @app.get("/tally", dependencies=[Depends(authorised)])
    async def tally(
        since: datetime | None = Query(None, description="The shift's start (ISO 8601); default: every inspection."),
        model: str | None = Query(None, description="A model's name; default: the only one served."),
    ):
        """The shift's counts: inspected, good, defective, failed, and the operator's verdicts that confirmed or
        overturned the tool's."""
        served = registry.find(model)
        return await run_in_threadpool(registry.inspections[served.name].tally, since, registry.model_names[served.name])

    @app.get("/metrics", response_class=Response, dependencies=[Depends(authorised)])
    async def prometheus_metrics():
        """Counters and, per model, the drift window's alarm share, score quantiles and KS statistic (Prometheus)."""
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    static = resources.files(__package__) / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(str(static / "index.html"))

    return app
