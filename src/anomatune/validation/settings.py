"""How the label-free validation set is built, and how candidates are searched on it (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from ..schema import Settings, setting

AUTO_DETECTOR = "auto"  # --detector auto: the detector search of validation.search
FAMILIES = ("cutpaste", "scar", "texture", "blend", "deform", "color")  # the anomaly families of validation.synthetic


SEARCH_DETECTORS = ("padim", "glad", "patchcore")  # the detectors of the search's candidates
DEFAULT, FINE = "default", "fine"  # stage sets: the backbone's own, and the same with its stride-4 stage


def distinct_names(allowed: tuple[str, ...], what: str):
    """A parser of a comma-separated (or sequence) choice of distinct names among ``allowed``."""

    def parse(value) -> tuple[str, ...]:
        parts = [value] if isinstance(value, str) else value  # a repeated option gives several, each maybe "a,b"
        names = tuple(n.strip() for part in parts for n in str(part).split(",") if n.strip())
        unknown = [n for n in names if n not in allowed]
        if not names or unknown or len(set(names)) < len(names):
            raise ValueError(f"expected distinct {what} among {', '.join(allowed)}, got {value!r}")
        return names

    return parse


parse_families = distinct_names(FAMILIES, "anomaly families")


@dataclass(frozen=True)
class ValidationSettings(Settings):
    """The validation set: held-out good images, the same with synthetic anomalies, and any real defects given."""

    section = "validation"
    flag_prefix = "validation-"
    share: float = setting(
        0.2, "Share of the good training images held out (seeded) to build the validation set.", interval="(0, 0.9]"
    )
    max_images: int = setting(30, "Good images held out for the validation set at most.", interval="[2, 100000]")
    families: tuple[str, ...] = setting(
        FAMILIES,
        f"Synthetic anomaly families, comma-separated ({', '.join(FAMILIES)}).",
        parse=parse_families,
    )
    photos: str | None = setting(
        None,
        "Folder of photos whose crops fill the 'texture' anomalies (keep it apart from the fine-tuning's "
        "--negatives); default: procedural textures.",
        metavar="DIR",
        aliases=("validation-negatives",),
    )
    defects: str | None = setting(
        None,
        "Folder of a few real defective images (never from a test split), masks optional as <stem>_mask.png beside "
        "them: added to the validation as one more family, 'real'.",
        metavar="DIR",
    )
    fit_images: int = setting(
        300,
        "Good images each candidate is fitted on during the search at most (seeded choice); the winner is refit on all.",
        interval="[2, 100000]",
    )
    detectors: tuple[str, ...] = setting(
        ("padim", "patchcore"),
        "Detectors the search compares, comma-separated (padim, glad, patchcore), each with its projections. GLAD is "
        "left out of the default: it costs minutes where the two others cost seconds; with it the pick was 0.005 "
        "better on average over six development categories (see 'Choosing a detector').",
        parse=distinct_names(SEARCH_DETECTORS, "detectors"),
        flag="search-detectors",
    )
    stages: tuple[str, ...] = setting(
        (DEFAULT,),
        "Feature stage sets the search compares, comma-separated: default (the backbone's stages) and fine (the same "
        "with its stride-4 stage, for small defects; CNN backbones). Fine is left out of the default: it won the "
        "validation and lost the test too often (see 'Choosing a detector').",
        parse=distinct_names((DEFAULT, FINE), "stage sets"),
        flag="search-stages",
    )
    budget: float | None = setting(
        None,
        "Seconds the detector search may spend (validation set, features, candidates; not the final fit): candidates "
        "whose estimated cost would overrun it are skipped, and the run says which; default: no limit.",
        interval="(0, inf)",
        flag="search-budget",
        metavar="SECONDS",
    )
    seed: int = setting(0, "Seed of the held-out images and of the synthetic anomalies.")

    @property
    def folders(self) -> list[str]:
        """The folders the validation reads: where no output may go."""
        return [f for f in (self.photos, self.defects) if f]
