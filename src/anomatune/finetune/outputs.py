"""The one writer of a fine-tuning folder: checkpoints while it trains, then the backbone it keeps and the diagnostics.

``checkpoint.pt`` is written atomically at every checkpoint and read back with
``weights_only=True``. At the end: ``backbone.safetensors`` (the kept checkpoint; the
frozen backbone after a fallback, with a note in its metadata that whoever loads it logs),
``backbone_last.safetensors`` (the last step's, whenever a validation chose), and
``diagnostics.json``, ``finetune.yaml`` and two figures.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import AnomatuneError, RunFolderError
from ..folders.kinds import FinetuneFolder
from . import diagnostics
from .settings import FinetuneSettings

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2
FALLBACK_NOTE = (
    f"the fine-tuning did not beat the frozen backbone on validation, so its {FinetuneFolder.BACKBONE} is the "
    f"frozen backbone (for the last step's weights pass {FinetuneFolder.LAST_BACKBONE})"
)


class FinetuneOutputs:
    """Reads and writes one fine-tuning folder."""

    def __init__(self, path: str | Path):
        self.folder = FinetuneFolder(path)

    @property
    def checkpoint_path(self) -> Path:
        return self.folder / FinetuneFolder.CHECKPOINT

    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.is_file()

    def is_finished(self) -> bool:
        return (self.folder / FinetuneFolder.BACKBONE).is_file()

    def save_checkpoint(self, checkpoint: dict) -> None:
        self.folder.write_torch(FinetuneFolder.CHECKPOINT, {"format": CHECKPOINT_FORMAT, **checkpoint})

    def load_checkpoint(self, settings: FinetuneSettings) -> dict:
        """The checkpoint, refused in one line when of another format or made with other settings (``steps`` may change)."""
        path = self.checkpoint_path
        saved = self.folder.read_torch(FinetuneFolder.CHECKPOINT)
        if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
            raise RunFolderError(f"{path}: checkpoint of another format (another anomatune version); delete it to start over")
        mine = settings.to_dict() | {"steps": None}
        theirs = saved["settings"] | {"steps": None}
        changed = sorted(k for k in mine if mine[k] != theirs.get(k))
        if changed:
            raise AnomatuneError(
                f"{path}: the checkpoint was made with other settings ({', '.join(changed)}); "
                "resume with the same settings (only --steps may change) or use another --out"
            )
        return saved

    def write_backbones(self, kept: dict[str, torch.Tensor], last: dict[str, torch.Tensor] | None, fallback: bool) -> None:
        """The kept backbone and, when a validation chose it, the last step's beside it."""
        self.folder.write_tensors(
            FinetuneFolder.BACKBONE, kept, metadata={FinetuneFolder.NOTE: FALLBACK_NOTE} if fallback else None
        )
        if last is not None:
            self.folder.write_tensors(FinetuneFolder.LAST_BACKBONE, last)

    def write_report(self, report: dict, record: dict, title: str) -> None:
        """``diagnostics.json`` (``report``), ``finetune.yaml`` (``record``) and the figures."""
        self.folder.write_json(FinetuneFolder.DIAGNOSTICS, report, indent=None)
        self.folder.write_yaml(FinetuneFolder.RECORD, record)
        self.folder.write_figure(
            FinetuneFolder.WEIGHTS_FIGURE, diagnostics.weight_figure(report["start"], report["end"], title), dpi=110
        )
        self.folder.write_figure(
            FinetuneFolder.LOSS_FIGURE, diagnostics.loss_figure(report["history"], report["validation"]), dpi=110
        )

    def write_dry_run(self, summary: dict) -> None:
        self.folder.write_json(FinetuneFolder.DRY_RUN, summary)
        self.folder.write_figure(
            FinetuneFolder.DRY_RUN_FIGURE, diagnostics.weight_figure(summary, None, "frozen features"), dpi=110
        )
