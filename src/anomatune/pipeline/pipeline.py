"""The pipeline: features + detector + post-processing, fitted on good images, saved as a run.

``Pipeline(detector="glad").fit(dataset)`` learns what good looks like: the input size
from the training images, the features (and their PCA when asked), the detector, and a
decision threshold from held-out good images only. ``predict(images)`` returns one
typed result (scores, labels, maps, masks) at each image's own size; ``save(folder)`` /
``Pipeline.load(folder)`` go through :class:`RunFolder`, nothing pickled. Evaluating,
predicting, reporting and exporting all use this one object, so they cannot disagree.
"""

from __future__ import annotations

import copy
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
from ..calibration import ScoreCalibration
from ..data.datasets import AnomalyDataset, collate
from ..data.images import check_pixels, image_to_tensor, read_image
from ..device import resolve_device
from ..errors import AnomatuneError, RunFolderError, check_is_fitted, is_fitted
from ..features.backbones import create_backbone
from ..features.extractor import FeatureExtractor
from ..features.settings import AUTO, RANDOM
from ..folders.base import refuse_inside
from ..folders.kinds import ModelFolder, RunFolder, open_run
from ..models.registry import create_detector
from ..models.settings import UpdateSettings
from ..schema import flat_settings
from .postprocess import PostProcessor, defect_mask, resize_map
from .scoring import score_dataset
from .settings import FitRecord, PipelineSettings, RunConfig, RuntimeSettings

log = logging.getLogger(__name__)

RUN_FORMAT = 6  # the formats' history: CHANGELOG.md
JSON_ATTRIBUTES = (  # a run's JSON files and the fitted attributes they hold, when present
    (RunFolder.SELECTION, "selection_"),
    (RunFolder.CALIBRATION, "calibration_"),
    (RunFolder.LINEAGE, "lineage_"),
)
MEDIAN_STRIDE = 97  # every 97th pixel of the good images' out-of-fold maps gives the overlays' blue end


@dataclass
class Predictions:
    """What a pipeline says of some images, each map and mask at its image's own size.

    ``labels`` (1 defective, 0 good) and ``masks`` are ``None`` when there is no threshold.
    An image is labelled defective exactly when its mask is not empty. ``normalized`` (in [0, 1], 0.5 at the run's
    threshold) and ``false_alarm_rates`` (the share of good parts scoring higher) are the calibrated scores,
    ``None`` for a run without a calibration.
    """

    scores: np.ndarray
    labels: np.ndarray | None
    maps: list[np.ndarray]
    masks: list[np.ndarray] | None
    threshold: float | None
    normalized: np.ndarray | None = None
    false_alarm_rates: np.ndarray | None = None
    pixel_threshold: float | None = None  # a pixel above it is defective (the red end of overlays)

    def __len__(self) -> int:
        return len(self.scores)


def fold_indices(n: int, folds: int, seed: int) -> torch.Tensor:
    """A fold index per image: a seeded permutation dealt round-robin, so fold sizes differ by one at most."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    indices = torch.empty(n, dtype=torch.long)
    indices[order] = torch.arange(n) % min(folds, n)
    return indices


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
    ``calibration_`` (the good images' out-of-fold scores), ``lineage_`` after an update and, once saved or
    loaded, ``model_id_`` (the model's name and the digest of what determines its outputs) and ``version_``
    (the version's name in its model, ``v1``, ``v2``, ...).
    """

    fitted_attribute = "fit_record_"  # set once a fit or a load succeeded (see errors.check_is_fitted)

    def __init__(self, settings: PipelineSettings | None = None, **changes: Any):
        runtime_keys = {flat.key for flat in flat_settings(RuntimeSettings)}
        self.runtime = RuntimeSettings().updated(**{k: v for k, v in changes.items() if k in runtime_keys})
        self.settings = (settings or PipelineSettings()).updated(**{k: v for k, v in changes.items() if k not in runtime_keys})
        features, detector = self.settings.features, self.settings.detector
        if features.proj == AUTO and features.proj_dim is None and detector.auto_proj_dim is not None:
            # the detector's choice, saved with the run
            features = replace(features, proj_dim=detector.auto_proj_dim)
        if features.aggregation == AUTO:
            features = replace(features, aggregation=detector.auto_aggregation)
        self.settings = replace(self.settings, features=features)

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

    def fit(self, dataset: AnomalyDataset, raw_features: torch.Tensor | None = None) -> Pipeline:
        """Fit on the good images of ``dataset`` (a training split).

        The input size follows the images' median aspect ratio (or ``WxH``). Every image is fitted on; each is also
        scored by a model fitted without its fold (``threshold.folds``), and those out-of-fold scores set the decision
        threshold at the ``false_alarm_rate`` asked (see :attr:`image_calibration`). ``raw_features``: the images'
        features before any projection, in the dataset's order, when the caller has already computed them with this
        pipeline's stages (the detector search): the backbone pass is skipped.
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
            "version_",
        ):  # a failed fit leaves it unfitted
            self.__dict__.pop(name, None)
        weights = s.features.backbone_weights
        if weights not in (None, RANDOM):  # a run finds its weights wherever it is loaded from
            self.settings = s = s.updated(backbone_weights=str(Path(weights).expanduser().resolve()))
        dataset = dataset.within(self.runtime.max_pixels)
        dataset.check_readable()  # every unusable file named at once, before the input size is read from the headers
        size = dataset.size_for(s.features.image_size)
        train = dataset.at_size(size)
        extractor = self._extractor()
        detector = create_detector(s.detector)
        cross_fit = s.threshold.folds >= 2 and len(train) >= 2
        if raw_features is not None and tuple(raw_features.shape[:2]) != (len(train), extractor.raw_dim):
            raise AnomatuneError(
                f"raw_features of shape {tuple(raw_features.shape)} do not fit {len(train)} images of "
                f"{extractor.raw_dim} features: pass the features of these images, or none"
            )
        given = None if raw_features is None else torch.split(raw_features, self.runtime.batch_size)
        if extractor.proj_dim is not None and extractor.proj == "pca":  # one pass over the images: fit the PCA, then project
            raw = list(given or extractor.stream(self._loader(train), desc="train features", raw=True))
            extractor.fit_projection_on(raw, seed=s.seed)
            projected = []
            while raw:  # each raw batch is freed once projected: at most the raw features and the projected ones at once
                projected.append(extractor.project(raw.pop(0).to(device)))
            features = torch.cat(projected)
            del projected
            detector.fit(features)
        else:  # streamed: a detector that keeps a bounded sample (PatchCore) never holds every feature unless cross-fitted
            kept = []

            def streamed():
                if given is None:
                    batches = extractor.stream(self._loader(train), desc="train features")
                else:
                    batches = (extractor.project(b) for b in given)
                for batch in batches:
                    batch = batch.to(device)
                    if cross_fit:  # the cross-fitting scores every training image again
                        kept.append(batch)
                    yield batch

            detector.fit_batches(streamed(), len(train))
            features = torch.cat(kept) if kept else None
        self.extractor_, self.detector_ = extractor, detector
        self.postprocessor_ = PostProcessor(s.postprocess, size)
        self.fit_record_ = FitRecord(
            input_size=size,
            weights_id=extractor.weights_id,
            layers=extractor.layers,
            threshold=None,
            pixel_threshold=None,
            good_map_median=None,
            calibration_images=0,
            n_train=len(train),
        )
        if cross_fit:
            folds = fold_indices(len(train), s.threshold.folds, s.seed)
            held_out_maps, held_out_scores = detector.held_out_detect(features, folds)
            del features
            if s.postprocess.standardize:
                self.postprocessor_.learn(held_out_maps, self.runtime.batch_size)
            scores, peaks, median = self._outputs(held_out_maps, held_out_scores)
            self._calibrate([str(r.path.resolve()) for r in train.records], scores, peaks, median, folds.tolist())
        elif s.threshold.folds:
            log.warning("no threshold is learnt from 1 good image: give more, or pass --threshold to predict")
        if s.postprocess.standardize and not cross_fit:
            log.warning("--standardize needs the cross-fitting (--threshold-folds >= 2 and 2 images): maps not standardised")
        self.fit_seconds_ = round(time.perf_counter() - start, 2)
        self.data_ = getattr(dataset, "source", None)
        log.info("fitted %s on %d images (%dx%d px) in %.1f s", s.detector.name, len(train), size[1], size[0], self.fit_seconds_)
        return self

    def _outputs(self, patch_maps: torch.Tensor, scores: torch.Tensor | None) -> tuple[list[float], list[float], float]:
        """Image scores, map peaks and the pixels' median of a detector's output, through the post-processing in
        batches (the maps at the input size are never all held at once)."""
        n = len(patch_maps)
        size = self.runtime.batch_size
        image_scores, peaks, pixels = [], [], []
        for i in range(0, n, size):
            maps, batch_scores = self.postprocessor_(patch_maps[i : i + size], None if scores is None else scores[i : i + size])
            image_scores += batch_scores.double().cpu().tolist()
            peaks += maps.flatten(1).amax(1).double().cpu().tolist()
            pixels.append(maps.flatten()[::MEDIAN_STRIDE].cpu())
        return image_scores, peaks, float(torch.cat(pixels).double().median())

    def _calibrate(self, files: Sequence[str], scores: Sequence[float], peaks: Sequence[float], median: float,
                   folds: Sequence[int]) -> None:  # fmt: skip
        """The image and pixel calibrations of the good images' out-of-fold scores and map peaks (kept in
        ``calibration_``, with the files: the reference of an update's threshold and of the server's drift)."""
        t, seed = self.settings.threshold, self.settings.seed
        image = ScoreCalibration.fit(
            scores, t.false_alarm_rate, confidence=t.confidence, quantile=t.quantile, threshold=t.value, seed=seed
        )
        pixel = ScoreCalibration.fit(peaks, image.rate_at_threshold, confidence=t.confidence, seed=seed)  # the same rate
        self.calibration_ = {
            "files": list(files),
            "scores": list(scores),
            "peaks": list(peaks),
            "folds": list(folds),
            "image": image.to_dict(),
            "pixel": pixel.to_dict(),
        }
        self.__dict__.pop("_calibrations", None)
        self.fit_record_ = replace(
            self.fit_record_,
            threshold=image.threshold,
            pixel_threshold=pixel.threshold,
            good_map_median=median,
            calibration_images=len(scores),
        )
        log.info("%s", image.describe())
        if image.target_rate and image.images_for_tight and len(scores) < image.images_for_tight:
            log.warning(
                "%d good images are few for a %.2g%% false-alarm rate: its estimate is loose (about %d would make it "
                "tight); the threshold is %s",
                len(scores),
                100 * image.target_rate,
                image.images_for_tight,
                "extrapolated by the tail model" if image.count_above == 0 else "from the few scores above it",
            )

    def recalibrated(self, **rule: Any) -> Pipeline:
        """A copy deciding by a new threshold rule (``false_alarm_rate``, ``threshold_quantile`` or
        ``threshold_value``; see :meth:`ThresholdSettings.rule`), learnt from the same out-of-fold scores: the
        tensors are shared, nothing is refitted (``anomatune threshold``)."""
        self.check_is_fitted()
        calibration = getattr(self, "calibration_", None)
        if not calibration:
            raise AnomatuneError("the run learnt no threshold (fitted with --threshold-folds 0): refit it to calibrate one")
        new = copy.copy(self)
        new.settings = replace(self.settings, threshold=self.settings.threshold.rule(**rule))
        new.__dict__.pop("_calibrations", None)
        new.__dict__.pop("lineage_", None)
        c = calibration
        new._calibrate(c["files"], c["scores"], c["peaks"], self.fit_record_.good_map_median, c["folds"])
        return new

    @property
    def image_calibration(self) -> ScoreCalibration | None:
        """The false-alarm rate, threshold and normalised score of image scores (``None``: no threshold learnt)."""
        return self._calibration("image")

    @property
    def pixel_calibration(self) -> ScoreCalibration | None:
        """The same for pixel scores, from the good images' map peaks: at its threshold a good image's mask is empty
        at the rate asked."""
        return self._calibration("pixel")

    def _calibration(self, kind: str) -> ScoreCalibration | None:
        self.check_is_fitted()
        raw = getattr(self, "calibration_", None)
        if not raw or kind not in raw:
            return None
        cached = self.__dict__.setdefault("_calibrations", {})
        if kind not in cached:
            cached[kind] = ScoreCalibration.from_dict(raw[kind])
        return cached[kind]

    def update(self, dataset: AnomalyDataset, settings: UpdateSettings | None = None) -> Pipeline:
        """Learn from more good images without the ones fitted on (``anomatune update``): the detector's
        ``partial_fit`` on their features (PaDiM exactly as a refit on all the images; see
        :class:`~anomatune.models.settings.UpdateSettings`). The new images are scored by the model before it learns
        them (out of fit, like the cross-fitted ones), and their scores join the calibration, whose threshold is
        learnt again at the same false-alarm rate. The input size, features and projection stay the fit's.
        Returns ``self``; records ``update_seconds_``."""
        self.check_is_fitted()
        start = time.perf_counter()
        record = self.fit_record_
        dataset = dataset.within(self.runtime.max_pixels)
        dataset.check_readable()
        train = dataset.at_size(self.input_size)
        features = self.extractor_.extract(self._loader(train), desc="new features").to(self.device)
        calibration = getattr(self, "calibration_", None)
        if calibration:
            scores, peaks, median = self._outputs(*self.detector_.detect(features))
        self.detector_.partial_fit(features, record.n_train, settings)
        del features
        self.fit_record_ = replace(record, n_train=record.n_train + len(train))
        if calibration:
            n_folds = max(calibration["folds"], default=-1) + 1
            self._calibrate(
                calibration["files"] + [str(r.path.resolve()) for r in train.records],
                calibration["scores"] + scores,
                calibration["peaks"] + peaks,
                (record.good_map_median * len(calibration["scores"]) + median * len(scores))
                / (len(calibration["scores"]) + len(scores)),
                calibration["folds"] + [n_folds] * len(scores),
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
        if isinstance(images, (str, Path, Image.Image, np.ndarray)) and not (
            isinstance(images, np.ndarray) and images.ndim == 4
        ):  # one image, not a sequence of them
            images = [images]
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
        """Scores, labels, maps and masks of ``images``: a path, PIL image or ``HxWx3`` uint8 array, a list of
        them, or a ``(B, 3, H, W)`` tensor in [0, 1]. ``threshold`` overrides the learnt one.

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
        full = [resize_map(m, hw) for m, hw in zip(maps, sizes)]
        scores = scores.numpy()
        calibration, pixel_threshold = self.image_calibration, self.fit_record_.pixel_threshold
        if threshold is not None:  # an explicit threshold: the pixels' at the same false-alarm rate
            threshold = check_threshold(threshold)
            if calibration is not None and self.pixel_calibration is not None:
                pixel_threshold = self.pixel_calibration.score_at(calibration.false_alarm_rate(threshold).item())
            else:
                pixel_threshold = threshold
        threshold = self.threshold if threshold is None else threshold
        calibrated = (calibration.normalized(scores), calibration.false_alarm_rate(scores)) if calibration else (None, None)
        if threshold is None:
            return Predictions(scores, None, full, None, None, *calibrated)
        labels = (scores > threshold).astype(np.int64)
        masks = [defect_mask(m, pixel_threshold, bool(y)) for m, y in zip(full, labels)]
        return Predictions(scores, labels, full, masks, threshold, *calibrated, pixel_threshold=pixel_threshold)

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

    def save(self, folder: str | Path, extra: Mapping[str, Path] | None = None, *, parent: str | None = None,
             command: str = "fit", promote: bool = True) -> RunFolder:  # fmt: skip
        """Write the pipeline as a new version of the model at ``folder`` (a new model folder if there is none; never
        inside the training data's folders) and serve it (``promote``). ``extra``: more files copied into the version,
        by their name in it; ``parent``: the version it was made from. A version identical to one the model holds is
        not written twice. Returns the version's folder."""
        self.check_is_fitted()
        data = getattr(self, "data_", None)
        refuse_inside(folder, data.folders if data is not None else ())
        version, _ = ModelFolder(folder).add(
            lambda stage: self._write(stage, extra), parent=parent, command=command, promote=promote
        )
        self.model_id_, self.version_ = version.fingerprint(), version.path.name
        return version

    def _write(self, stage: RunFolder, extra: Mapping[str, Path] | None) -> None:
        stage.write_tensors(RunFolder.DETECTOR, self.detector_.state_dict())
        if self.postprocessor_.state_dict():
            stage.write_tensors(RunFolder.POSTPROCESS, self.postprocessor_.state_dict())
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

    @classmethod
    def load(cls, folder: str | Path, version: str | None = None, **runtime: Any) -> Pipeline:
        """Rebuild a model's served version (or ``version``; or a version's own folder), refusing one of another
        format, incomplete, changed since it was written, or with other backbone weights. Every file is read into
        memory: the loaded pipeline never depends on the files again."""
        run = open_run(folder, version)
        config = read_run_config(run)  # first: a run of another format says so, whatever else changed
        model_id = run.verified()
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
        state = run.read_tensors(RunFolder.POSTPROCESS) if (run / RunFolder.POSTPROCESS).is_file() else None
        pipeline.postprocessor_ = PostProcessor(config.settings.postprocess, fitted.input_size, state)
        pipeline.fit_record_, pipeline.data_ = fitted, config.data
        for name, attribute in JSON_ATTRIBUTES:
            if (run / name).is_file():
                setattr(pipeline, attribute, run.read_json(name))
        pipeline.model_id_, pipeline.version_ = model_id, run.path.name
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
