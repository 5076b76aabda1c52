"""The pipeline: features + detector + post-processing, fitted on good images, saved as a run.

``Pipeline(detector="glad").fit(dataset)`` learns what good looks like: the input size
from the training images, the features (and their PCA when asked), the detector, and a
decision threshold from held-out good images only. ``predict(images)`` returns one
typed result (scores, labels, maps, masks) at each image's own size; ``save(folder)`` /
``Pipeline.load(folder)`` go through :class:`RunFolder`, nothing pickled. Evaluating,
predicting, reporting and exporting all use this one object, so they cannot disagree.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from .. import __version__
from ..data.datasets import GOOD, AnomalyDataset, Record, collate, seeded_split
from ..data.images import check_pixels, image_to_tensor, read_image
from ..device import resolve_device
from ..errors import AnomatuneError, RunFolderError, check_is_fitted, is_fitted
from ..features.backbones import create_backbone
from ..features.extractor import FeatureExtractor
from ..features.settings import AUTO, RANDOM
from ..folders.base import refuse_inside
from ..folders.kinds import RunFolder
from ..models.registry import create_detector
from ..models.settings import UpdateSettings
from ..schema import flat_settings
from .postprocess import PostProcessor, defect_mask, resize_map
from .scoring import score_dataset
from .settings import FitRecord, PipelineSettings, RunConfig, RuntimeSettings

log = logging.getLogger(__name__)

RUN_FORMAT = 4  # 3: features.normalization (issue 21); 4: PaDiM's sums, PatchCore's sample keys, calibration.json
JSON_ATTRIBUTES = (  # a run's JSON files and the fitted attributes they hold, when present
    (RunFolder.SELECTION, "selection_"),
    (RunFolder.CALIBRATION, "calibration_"),
    (RunFolder.LINEAGE, "lineage_"),
)
FEW_THRESHOLD_IMAGES = 10  # a threshold learnt from fewer held-out good images is said to be a rough guess


@dataclass
class Predictions:
    """What a pipeline says of some images, each map and mask at its image's own size.

    ``labels`` (1 defective, 0 good) and ``masks`` are ``None`` when there is no threshold.
    An image is labelled defective exactly when its mask is not empty.
    """

    scores: np.ndarray
    labels: np.ndarray | None
    maps: list[np.ndarray]
    masks: list[np.ndarray] | None
    threshold: float | None

    def __len__(self) -> int:
        return len(self.scores)


def split_holdout(dataset: AnomalyDataset, share: float, seed: int) -> tuple[AnomalyDataset, AnomalyDataset | None]:
    """Split off ``share`` of the training images (at least 1, seeded) to learn the threshold on."""
    n_held = round(share * len(dataset)) if share > 0 else 0
    if share > 0 and n_held == 0:
        n_held = 1
    if n_held and len(dataset) - n_held < 2:
        log.warning("only %d training images: no threshold is learnt (pass --threshold to predict)", len(dataset))
        n_held = 0
    if not n_held:
        return dataset, None
    if n_held < FEW_THRESHOLD_IMAGES:
        log.warning(
            "the threshold is learnt from %d held-out good image(s) only, a rough guess: give more good images "
            "(or a larger --threshold-holdout), or pass --threshold to predict",
            n_held,
        )
    kept, held = seeded_split(len(dataset), n_held, seed)
    return dataset.subset(kept), dataset.subset(held)


def check_threshold(value: Any) -> float:
    """A finite number: a NaN threshold would call every image good."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number):
        raise AnomatuneError(f"the threshold must be a finite number, not {value!r}")
    return number


class Pipeline:
    """Features + detector + post-processing; scikit-learn style ``fit`` / ``predict`` / ``score``.

    Args:
        settings: :class:`PipelineSettings` (default: the package defaults).
        **changes: settings by their flat names, e.g. ``detector="padim"``,
            ``image_size=128``, ``threshold_quantile=0.995``, and the runtime settings
            ``device`` and ``batch_size`` (:class:`RuntimeSettings`).

    Fitted attributes: ``extractor_``, ``detector_``, ``postprocessor_``, ``fit_record_``
    (input size, threshold, ...), ``data_`` (the data settings of the training set),
    ``selection_`` when ``--detector auto`` chose it (the candidates' validation table),
    ``calibration_`` (the held-out good images and their scores), ``lineage_`` after an update and,
    once saved or loaded, ``model_id_`` (the run folder's name and files' hash).
    """

    fitted_attribute = "fit_record_"  # set once a fit or a load succeeded (see errors.check_is_fitted)

    def __init__(self, settings: PipelineSettings | None = None, **changes: Any):
        runtime_keys = {flat.key for flat in flat_settings(RuntimeSettings)}
        self.runtime = RuntimeSettings().updated(**{k: v for k, v in changes.items() if k in runtime_keys})
        self.settings = (settings or PipelineSettings()).updated(**{k: v for k, v in changes.items() if k not in runtime_keys})
        features, detector = self.settings.features, self.settings.detector
        if features.proj == AUTO and features.proj_dim is None and detector.auto_proj_dim is not None:
            # the detector's choice, saved with the run
            self.settings = replace(self.settings, features=replace(features, proj_dim=detector.auto_proj_dim))

    def __repr__(self) -> str:
        f = self.settings.features
        return f"Pipeline({self.settings.detector.name} on {f.backbone}, image_size={f.image_size}{', fitted' if is_fitted(self) else ''})"

    @property
    def device(self) -> torch.device:
        return resolve_device(self.runtime.device)

    def check_is_fitted(self) -> None:
        check_is_fitted(self, "call fit(dataset) or Pipeline.load(run folder) first")

    @property
    def threshold(self) -> float | None:
        self.check_is_fitted()
        return self.fit_record_.threshold

    @property
    def input_size(self) -> tuple[int, int]:
        self.check_is_fitted()
        return tuple(self.fit_record_.input_size)

    # -- building --------------------------------------------------------------------------

    def _extractor(self, layers=None) -> FeatureExtractor:
        features = self.settings.features
        if layers is not None:
            features = features.updated(layers=tuple(layers))
        backbone = create_backbone(features.backbone, weights=features.backbone_weights)
        return FeatureExtractor(features, backbone=backbone, seed=self.settings.seed).to(self.device).eval()

    def _loader(self, dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.runtime.batch_size, collate_fn=collate)

    # -- fitting ----------------------------------------------------------------------------

    def fit(self, dataset: AnomalyDataset) -> Pipeline:
        """Fit on the good images of ``dataset`` (a training split).

        The input size follows the images' median aspect ratio (or ``WxH``); a
        ``threshold_holdout`` share (seeded) is kept out of the fit, and the
        ``threshold_quantile`` of their image scores becomes the decision threshold.
        """
        s = self.settings
        device = self.device
        start = time.perf_counter()
        for name in (
            "fit_record_",
            "extractor_",
            "detector_",
            "postprocessor_",
            "data_",
            "model_id_",
            "selection_",
            "calibration_",
            "lineage_",
            "update_seconds_",
        ):  # a failed fit leaves it unfitted
            self.__dict__.pop(name, None)
        weights = s.features.backbone_weights
        if weights not in (None, RANDOM):  # a run finds its weights wherever it is loaded from
            self.settings = s = s.updated(backbone_weights=str(Path(weights).expanduser().resolve()))
        dataset = dataset.within(self.runtime.max_pixels)
        dataset.check_readable()  # every unusable file named at once, before the input size is read from the headers
        size = dataset.size_for(s.features.image_size)
        train, held_out = split_holdout(dataset.at_size(size), s.threshold.holdout, s.seed)
        extractor = self._extractor()
        detector = create_detector(s.detector)
        if extractor.proj_dim is not None and extractor.proj == "pca":  # one pass over the images: fit the PCA, then project
            raw = list(extractor.stream(self._loader(train), desc="train features", raw=True))
            extractor.fit_projection_on(raw, seed=s.seed)
            projected = []
            while raw:  # each raw batch is freed once projected: at most the raw features and the projected ones at once
                projected.append(extractor.project(raw.pop(0).to(device)))
            detector.fit(torch.cat(projected))
        else:  # streamed: a detector that keeps a bounded sample (PatchCore) never holds every feature
            detector.fit_batches((f.to(device) for f in extractor.stream(self._loader(train), desc="train features")), len(train))
        self.extractor_, self.detector_ = extractor, detector
        self.postprocessor_ = PostProcessor(s.postprocess, size)
        threshold, good_median = self._calibrate(held_out)
        self.fit_record_ = FitRecord(
            input_size=size,
            weights_id=extractor.weights_id,
            layers=extractor.layers,
            threshold=threshold,
            good_map_median=good_median,
            holdout_images=0 if held_out is None else len(held_out),
            n_train=len(train),
            fit_seconds=round(time.perf_counter() - start, 2),
        )
        self.data_ = getattr(dataset, "source", None)
        log.info(
            "fitted %s on %d images (%dx%d px) in %.1f s",
            s.detector.name,
            len(train),
            size[1],
            size[0],
            self.fit_record_.fit_seconds,
        )
        return self

    def _calibrate(self, held_out: AnomalyDataset | None, also: Sequence[str] = ()) -> tuple[float | None, float | None]:
        """Score the held-out good images (and the files ``also``): the ``threshold_quantile`` of their scores is the
        threshold, the median of their maps the blue end of overlays; the files and scores are kept in ``calibration_``
        (the reference of an update's threshold and of the server's drift statistic)."""
        self.__dict__.pop("calibration_", None)
        if also:
            records = (held_out.records if held_out is not None else []) + [Record(Path(p), 0, GOOD) for p in also]
            calibration = AnomalyDataset(records, False, name="calibration images").at_size(self.input_size)
            held_out = calibration.within(self.runtime.max_pixels)
        if held_out is None:
            return None, None
        maps, scores, files = [], [], []
        for batch in self._loader(held_out):
            batch_maps, batch_scores = self._forward(batch["image"])
            maps.append(batch_maps), scores.append(batch_scores), files.extend(str(p) for p in batch["path"])
        maps, scores = torch.cat(maps), torch.cat(scores).double()
        self.calibration_ = {"files": files, "scores": scores.tolist()}
        return float(torch.quantile(scores, self.settings.threshold.quantile)), float(maps.flatten()[::97].double().median())

    def update(self, dataset: AnomalyDataset, settings: UpdateSettings | None = None) -> Pipeline:
        """Learn from more good images without the ones fitted on (``anomatune update``): the detector's
        ``partial_fit`` on their features (PaDiM exactly as a refit on all the images; see
        :class:`~anomatune.models.settings.UpdateSettings`), then, if the run learnt a threshold, a new one
        from the held-out good images of the fit (scored again) and the same share held out of the new ones.
        The input size, features and projection stay the fit's. Returns ``self``; records ``update_seconds_``."""
        self.check_is_fitted()
        start = time.perf_counter()
        record = self.fit_record_
        dataset = dataset.within(self.runtime.max_pixels)
        dataset.check_readable()
        share = self.settings.threshold.holdout if record.holdout_images else 0.0
        train, held_out = split_holdout(dataset.at_size(self.input_size), share, self.settings.seed)
        features = self.extractor_.extract(self._loader(train), desc="new features").to(self.device)
        self.detector_.partial_fit(features, record.n_train, settings)
        del features
        threshold, good_median = record.threshold, record.good_map_median
        if record.holdout_images:
            before = [f for f in getattr(self, "calibration_", {}).get("files", []) if Path(f).is_file()]
            if len(before) < record.holdout_images:
                log.warning(
                    "%d of the %d held-out images of the fit are no longer readable: the new threshold is learnt without them",
                    record.holdout_images - len(before),
                    record.holdout_images,
                )
            threshold, good_median = self._calibrate(held_out, also=before)
        self.fit_record_ = replace(
            record,
            threshold=threshold,
            good_map_median=good_median,
            holdout_images=len(self.calibration_["files"]) if record.holdout_images else 0,
            n_train=record.n_train + len(train),
        )
        self.update_seconds_ = round(time.perf_counter() - start, 2)
        log.info("updated %s with %d new images in %.1f s", self.settings.detector.name, len(train), self.update_seconds_)
        return self

    # -- predicting ----------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel maps at the input size and image scores of a ``(B, 3, H, W)`` batch in [0, 1] at the input size.

        The one computation behind evaluate, predict and export; results on the CPU.
        """
        self.check_is_fitted()
        return self._forward(images)

    @torch.no_grad()
    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.extractor_(images.to(self.device))
        maps, scores = self.postprocessor_(*self.detector_.detect(features))
        return maps.cpu(), scores.cpu()

    def _as_batch(self, images) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Images of any kind → a batch at the input size, and each image's own (height, width)."""
        size = self.input_size
        if isinstance(images, torch.Tensor):
            if images.dim() != 4 or images.shape[1] != 3:
                raise AnomatuneError(f"expected an image batch (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
            sizes = [tuple(images.shape[-2:])] * len(images)
            if tuple(images.shape[-2:]) != size:
                images = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
            return images, sizes
        limit = self.runtime.max_pixels
        pictures = [read_image(i, max_pixels=limit) if isinstance(i, (str, Path)) else _as_pil(i) for i in images]
        for n, picture in enumerate(pictures):
            check_pixels(f"image {n + 1}", picture.size, limit)
        return torch.stack([image_to_tensor(p, size) for p in pictures]), [(p.height, p.width) for p in pictures]

    def predict(
        self,
        images: Sequence | torch.Tensor,
        threshold: float | None = None,
        forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> Predictions:
        """Scores, labels, maps and masks of ``images``: paths, PIL images, ``HxWx3`` uint8 arrays
        or a ``(B, 3, H, W)`` tensor in [0, 1]. ``threshold`` overrides the learnt one.

        ``forward``: another engine computing :meth:`forward` (the run exported to ONNX Runtime or
        OpenVINO); decisions and masks stay the pipeline's whatever the engine.
        """
        self.check_is_fitted()
        forward = forward or self.forward
        batch, sizes = self._as_batch(images)
        maps, scores = zip(*(forward(chunk) for chunk in torch.split(batch, self.runtime.batch_size)))
        return self._predictions_from(torch.cat(maps), torch.cat(scores), sizes, threshold)

    def _predictions_from(
        self, maps: torch.Tensor, scores: torch.Tensor, sizes: Iterable[tuple[int, int]], threshold: float | None = None
    ) -> Predictions:
        """Predictions from the output of :meth:`forward`: maps resized to ``sizes``, decisions and masks."""
        threshold = self.threshold if threshold is None else check_threshold(threshold)
        full = [resize_map(m, hw) for m, hw in zip(maps, sizes)]
        scores = scores.numpy()
        if threshold is None:
            return Predictions(scores, None, full, None, None)
        labels = (scores > threshold).astype(np.int64)
        return Predictions(scores, labels, full, [defect_mask(m, threshold, bool(y)) for m, y in zip(full, labels)], threshold)

    def score(self, dataset: AnomalyDataset) -> dict[str, float]:
        """Image AUROC, pixel AUROC and AUPRO on a labelled test split (scikit-learn's ``score``)."""
        return score_dataset(self, dataset).metrics

    # -- saving ------------------------------------------------------------------------------

    def config(self) -> RunConfig:
        self.check_is_fitted()
        return RunConfig(
            anomatune_version=__version__,
            run_format=RUN_FORMAT,
            settings=self.settings,
            data=getattr(self, "data_", None),
            fitted=self.fit_record_,
        )

    def save(self, folder: str | Path, extra: Mapping[str, Path] | None = None) -> RunFolder:
        """Write the run (config.yaml and safetensors) as one set, replacing an earlier run there (never inside the
        training data's folders); ``extra``: more files copied into it, by their name in the run."""
        self.check_is_fitted()
        data = getattr(self, "data_", None)
        refuse_inside(folder, data.folders if data is not None else ())
        run = RunFolder(folder)
        with run.staged() as stage:
            stage.write_tensors(RunFolder.DETECTOR, self.detector_.state_dict())
            if self.extractor_.proj_dim is not None:
                stage.write_tensors(
                    RunFolder.PROJECTION, {k: v for k, v in self.extractor_.state_dict().items() if k.startswith("proj_")}
                )
            for name, attribute in JSON_ATTRIBUTES:
                if getattr(self, attribute, None) is not None:
                    stage.write_json(name, getattr(self, attribute))
            for name, source in (extra or {}).items():
                stage.write_with(name, lambda tmp, source=source: shutil.copyfile(source, tmp))
            stage.write_yaml(RunFolder.CONFIG, self.config().to_dict())
        self.model_id_ = run.fingerprint()
        return run

    @classmethod
    def load(cls, folder: str | Path, **runtime: Any) -> Pipeline:
        """Rebuild a saved run, refusing one of another format, incomplete, or with other backbone weights."""
        run = RunFolder(folder).require()
        config = read_run_config(run)
        pipeline = cls(config.settings, **runtime)
        fitted = config.fitted
        extractor = pipeline._extractor(layers=fitted.layers)
        if extractor.weights_id != fitted.weights_id:
            raise RunFolderError(
                f"{run.path}: fitted with backbone weights {fitted.weights_id}, but "
                f"{config.settings.features.backbone} now has {extractor.weights_id}: install the same weights or refit"
            )
        if extractor.proj_dim is not None:
            extractor.load_state_dict(run.read_tensors(RunFolder.PROJECTION), strict=False)
        detector = create_detector(config.settings.detector)
        detector.load_state_dict(run.read_tensors(RunFolder.DETECTOR), source=str(run / RunFolder.DETECTOR)).to(pipeline.device)
        pipeline.extractor_, pipeline.detector_ = extractor, detector
        pipeline.postprocessor_ = PostProcessor(config.settings.postprocess, fitted.input_size)
        pipeline.fit_record_, pipeline.data_ = fitted, config.data
        for name, attribute in JSON_ATTRIBUTES:
            if (run / name).is_file():
                setattr(pipeline, attribute, run.read_json(name))
        pipeline.model_id_ = run.fingerprint()
        return pipeline


def read_run_config(run: RunFolder) -> RunConfig:
    """The run's config.yaml, checked: format first (an older run says so), then every key and value."""
    raw = run.read_yaml(RunFolder.CONFIG)
    path = run / RunFolder.CONFIG
    if not isinstance(raw, dict) or raw.get("run_format") != RUN_FORMAT:
        version = raw.get("anomatune_version", "?") if isinstance(raw, dict) else "?"
        found = raw.get("run_format") if isinstance(raw, dict) else None
        raise RunFolderError(
            f"{path}: run format {found!r} (anomatune {version}); this anomatune {__version__} reads format "
            f"{RUN_FORMAT}: refit the run with this version"
        )
    return RunConfig.from_dict(raw, source=str(path), complete=True)


def _as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise AnomatuneError(
            f"expected an image path, a PIL image or an HxW(x3) uint8 array, got {type(image).__name__} "
            f"{getattr(array, 'dtype', '')} {getattr(array, 'shape', '')}"
        )
    return Image.fromarray(array).convert("RGB")
