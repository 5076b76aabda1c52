"""Micro-batching: the images of concurrent requests share one forward pass.

Decoded images join a queue; the collector takes the first waiting one, then more for up
to ``max_wait_ms`` or until ``max_batch`` images, and runs each model's share in forward
passes of at most ``max_batch`` images on the single compute thread (torch uses its own
threads inside it). With ``max_batch=1`` every image is computed on its own, in arrival
order. The counters (requests, images, forward passes) are what ``/health`` reports.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .models import ServedModel

log = logging.getLogger(__name__)


@dataclass
class PendingScore:
    """A request's pictures waiting for their forward pass; ``done`` gets their results."""

    model: ServedModel
    pictures: list
    done: asyncio.Future
    drawn: bool = True  # overlays and masks wanted


@dataclass
class Counters:
    requests: int = 0
    images: int = 0
    forward_passes: int = 0

    def to_dict(self) -> dict:
        mean = self.images / self.forward_passes if self.forward_passes else 0.0
        return {
            "requests": self.requests,
            "images": self.images,
            "forward_passes": self.forward_passes,
            "mean_batch": round(mean, 2),
        }


@dataclass
class Batcher:
    max_batch: int
    max_wait_ms: float
    counters: Counters = field(default_factory=Counters)

    def __post_init__(self):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anomatune-compute")
        self.queue: asyncio.Queue[PendingScore] | None = None
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._collect())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def score(self, model: ServedModel, pictures: list, drawn: bool = True) -> list[dict]:
        """The results of ``pictures`` (with overlays and masks when ``drawn``), computed with other requests' images
        when batching is on."""
        job = PendingScore(model, pictures, asyncio.get_running_loop().create_future(), drawn)
        await self.queue.put(job)
        return await job.done

    async def _collect(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            size = len(jobs[0].pictures)
            deadline = time.monotonic() + self.max_wait_ms / 1000
            while size < self.max_batch:
                try:
                    job = (
                        self.queue.get_nowait()
                        if deadline <= time.monotonic()
                        else await asyncio.wait_for(self.queue.get(), deadline - time.monotonic())
                    )
                except (TimeoutError, asyncio.QueueEmpty):
                    break
                jobs.append(job)
                size += len(job.pictures)
            await self._run(jobs)

    async def _run(self, jobs: list[PendingScore]) -> None:
        """Each model's images in one forward pass; its results (or its error) back to every request."""
        by_model: dict[int, list[PendingScore]] = defaultdict(list)
        for job in jobs:
            by_model[id(job.model)].append(job)
        loop = asyncio.get_running_loop()
        for group in by_model.values():
            pictures = [p for job in group for p in job.pictures]
            drawn = [job.drawn for job in group for _ in job.pictures]
            results = []
            try:
                for start in range(0, len(pictures), self.max_batch):  # a large request is split too
                    chunk = slice(start, start + self.max_batch)
                    results += await loop.run_in_executor(self.executor, group[0].model.score, pictures[chunk], drawn[chunk])
                    self.counters.images += len(pictures[chunk])
                    self.counters.forward_passes += 1
            except Exception as exc:  # the requests get the error; the server goes on
                log.exception("scoring failed")
                for job in group:
                    if not job.done.done():
                        job.done.set_exception(exc)
                continue
            start = 0
            for job in group:
                if not job.done.done():  # a client that went away
                    job.done.set_result(results[start : start + len(job.pictures)])
                start += len(job.pictures)
