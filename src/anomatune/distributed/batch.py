"""``predict --engine ray``: batch scoring on Ray Data.

The driver expands the inputs (the same :func:`input_paths` as the local engine) into a
table of paths; Ray Data streams it through ``map_batches`` in an actor pool, where each
:class:`BatchScorer` loads the run once and runs the local engine's :func:`score_paths` on
its batches; the rows stream out to Parquet. A file that cannot be read is a row with its
error. A worker that dies is restarted by Ray and its batch retried, so the output holds
every input exactly once (tested by killing an actor mid-run). Overlays and masks are
written by the workers straight into the output folder, which must therefore be on a
filesystem every node sees when the cluster has several machines.
"""

from __future__ import annotations

import logging
import math
import typing
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..allocator import tune_allocator
from ..data.settings import DataSettings
from ..folders.kinds import PredictionsFolder
from ..inference.predict import COLUMNS, PredictionRow, input_paths, load_for_predict, score_paths, unique_names
from ..pipeline.settings import RuntimeSettings
from .cluster import connect, plan_workers
from .settings import EngineSettings

log = logging.getLogger(__name__)

BATCHES_PER_BLOCK = 4  # a block of paths is a few batches: small enough to spread over the actors


def results_schema():
    import pyarrow as pa

    hints = typing.get_type_hints(PredictionRow)  # a column is a number where the row's field is one
    numbers = {name for name, hint in hints.items() if hint is float or float in typing.get_args(hint)}
    return pa.schema([("index", pa.int64())] + [(name, pa.float64() if name in numbers else pa.string()) for name in COLUMNS])


class BatchScorer:
    """A Ray Data actor: loads the run once, then turns batches of paths into result rows."""

    def __init__(self, run_dir: str, threshold: float, images_dir: str | None, runtime: dict):
        tune_allocator()
        self.pipeline, self.threshold = load_for_predict(run_dir, threshold, **runtime)
        self.images = PredictionsFolder(images_dir) if images_dir else None
        self.schema = results_schema()

    def __call__(self, batch):
        import pyarrow as pa

        paths = [Path(p) for p in batch["path"].to_pylist()]
        rows = score_paths(self.pipeline, paths, batch["name"].to_pylist(), self.threshold, self.images)
        records = [{"index": index, **row.to_dict()} for index, row in zip(batch["index"].to_pylist(), rows)]
        return pa.Table.from_pylist(records, schema=self.schema)


def scored_dataset(
    run_dir: str | Path,
    paths: Sequence[Path],
    threshold: float,
    images_dir: str | Path | None = None,
    workers: int | None = None,
    scorer: type = BatchScorer,
    **runtime,
):
    """The lazy Ray Dataset of result rows (``index`` = position in ``paths``); nothing runs until it is consumed.
    ``runtime``: every worker's ``device`` (``auto``: a GPU each when the cluster has them), ``batch_size``, ``max_pixels``."""
    import pyarrow as pa
    import ray.data

    runtime = RuntimeSettings().updated(**runtime)
    batch_size = runtime.batch_size
    plan = plan_workers(connect(), workers, runtime.device)
    table = pa.table({"index": list(range(len(paths))), "path": [str(p) for p in paths], "name": unique_names(paths)})
    block = max(1, min(batch_size * BATCHES_PER_BLOCK, math.ceil(len(paths) / plan.workers)))  # work for every worker
    blocks = [table.slice(start, block) for start in range(0, len(table), block)]
    log.info(
        "scoring %d images with %d Ray workers (%g CPU%s each)",
        len(paths),
        plan.workers,
        plan.cpus,
        ", 1 GPU" if plan.device == "cuda" else "",
    )
    return ray.data.from_arrow(blocks).map_batches(
        scorer,
        fn_constructor_args=(
            str(run_dir),
            threshold,
            None if images_dir is None else str(images_dir),
            runtime.updated(device=plan.device).to_dict(),
        ),
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=plan.workers),
        **plan.ray_args,
    )


@dataclass(frozen=True)
class Tally:
    """What a prediction found: images scored, of them defective, and files that failed."""

    scored: int
    defective: int
    failed: int


def predict_on_ray(
    run_dir: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    threshold: float | None = None,
    images: bool = True,
    engine: EngineSettings | None = None,
    data: DataSettings | None = None,
    **runtime,
) -> Tally:
    """Score every image of ``inputs`` on Ray: ``out/results.parquet/`` (and ``overlays/``, ``masks/``), written as one set.
    ``runtime``: ``device``, ``batch_size`` (as :func:`~anomatune.inference.predict.predict`), for every worker.

    Paths are made absolute (the ``path`` column holds them so) for workers that run elsewhere."""
    import pyarrow.parquet as pq

    engine = engine or EngineSettings(engine="ray")
    pipeline, threshold = load_for_predict(run_dir, threshold, device="cpu")  # a bad run or threshold stops here
    paths = [path.resolve() for path in input_paths(pipeline, run_dir, inputs, out, data)]  # absolute: a worker may run elsewhere
    connect(engine.address)
    with PredictionsFolder(out).staged() as stage:
        results = stage.path.resolve() / PredictionsFolder.RESULTS_PARQUET
        scored_dataset(
            Path(run_dir).resolve(),
            paths,
            threshold,
            stage.path.resolve() if images else None,
            engine.workers,
            **runtime,
        ).write_parquet(str(results), ray_remote_args={"num_cpus": 0})  # the actors hold the CPUs
        decisions = Counter(pq.read_table(results, columns=["decision"]).column("decision").to_pylist())
    return Tally(decisions["good"] + decisions["defective"], decisions["defective"], decisions["error"])
