"""What a data set is made of: samples (one image each) grouped into a train/test split."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .images import DataError

__all__ = [
    "Sample",
    "DataSplit",
    "summarise",
    "check_test_classes",
    "REGIMES",
    "REGIME_CHOICES",
    "training_regime",
    "resolve_regime",
    "describe_regime",
    "hold_out_validation",
]


@dataclass(frozen=True)
class Sample:
    """One image: its file, its label (0 good, 1 defect) and, for defects, an optional mask file.

    ``defect_type`` is the MVTec-style defect folder name (``"good"`` for good images).
    """

    path: Path
    label: int
    mask_path: Path | None = None
    defect_type: str = "good"

    def __post_init__(self) -> None:
        # Accept str paths from users; the dataclass is frozen, hence object.__setattr__.
        object.__setattr__(self, "path", Path(self.path))
        if self.mask_path is not None:
            object.__setattr__(self, "mask_path", Path(self.mask_path))
        if self.label not in (0, 1) or isinstance(self.label, bool):
            raise DataError(
                f"Sample {self.path} has label {self.label!r}; labels are 0 (good) or 1 (defect). "
                "Fix: pass 0 or 1."
            )
        object.__setattr__(self, "label", int(self.label))


@dataclass
class DataSplit:
    """Train and test samples of one data set (one MVTec category, one ELPV cell type, ...).

    ``notes`` hold everything a user should know that is not an error: defects without masks,
    skipped folders, metrics that this test set cannot support.
    """

    name: str
    train: list[Sample]
    test: list[Sample]
    notes: list[str] = field(default_factory=list)


def _counts(samples: list[Sample]) -> str:
    good = sum(s.label == 0 for s in samples)
    defects = [s for s in samples if s.label == 1]
    text = f"{len(samples)} (good {good}, defect {len(defects)}"
    types = Counter(s.defect_type for s in defects)
    if types and set(types) != {"defect"}:
        text += ": " + ", ".join(f"{t} {n}" for t, n in sorted(types.items()))
    if defects:
        text += f"; masks {sum(s.mask_path is not None for s in defects)}/{len(defects)}"
    return text + ")"


def summarise(split: DataSplit) -> str:
    """One line of counts per label and defect type, e.g. for a log or a CLI."""
    line = f"{split.name}: train {_counts(split.train)} | test {_counts(split.test)}"
    if split.notes:
        line += f" | {len(split.notes)} note{'s' if len(split.notes) != 1 else ''}"
    return line


def check_test_classes(split: DataSplit) -> list[str]:
    """Notes on the metrics that ``split.test`` cannot support (empty list when all can be computed).

    Image AUROC and F1 need both good and defect test images; pixel AUROC and AUPRO additionally
    need defect masks.
    """
    test = split.test
    where = f"Test set of {split.name!r}"
    if not test:
        return [f"{where} is empty: no metric can be computed. Fix: add good and defect test images."]
    n_good = sum(s.label == 0 for s in test)
    defects = [s for s in test if s.label == 1]
    with_mask = sum(s.mask_path is not None for s in defects)
    if not defects:
        return [
            f"{where} has only good images ({n_good}): image AUROC, F1-max, pixel AUROC and AUPRO "
            "cannot be computed (they need defect images); only false-positive rates can. "
            "Fix: add defect images to the test set."
        ]
    notes = []
    if n_good == 0:
        notes.append(
            f"{where} has only defect images ({len(defects)}): image AUROC cannot be computed and "
            "image F1-max / the image threshold are meaningless (no good images to tell apart); "
            "pixel AUROC and AUPRO still work on the defect masks. "
            "Fix: hold out some good images for testing."
        )
    if with_mask == 0:
        notes.append(
            f"{where}: none of its {len(defects)} defect images has a mask, so pixel AUROC and "
            "AUPRO cannot be computed; image-level metrics can. Fix: add masks if pixel metrics "
            "are needed."
        )
    elif with_mask < len(defects):
        notes.append(
            f"{where}: {len(defects) - with_mask} of {len(defects)} defect images have no mask; "
            "pixel AUROC and AUPRO can only use the good images and the defects that have masks."
        )
    return notes


REGIMES = ("unsupervised", "weakly", "mixed", "supervised")
REGIME_CHOICES = ("auto", *REGIMES)


def training_regime(samples: list[Sample]) -> str:
    """The supervision regime the training samples allow.

    - ``unsupervised``: good images only;
    - ``supervised``: every defective image has a pixel mask;
    - ``weakly``: defective images with image labels only (no masks);
    - ``mixed``: some defective images with masks, some with labels only.
    """
    defects = [s for s in samples if s.label == 1]
    if not defects:
        return "unsupervised"
    with_mask = sum(s.mask_path is not None for s in defects)
    if with_mask == len(defects):
        return "supervised"
    return "weakly" if with_mask == 0 else "mixed"


def resolve_regime(samples: list[Sample], requested: str = "auto") -> tuple[list[Sample], str, list[str]]:
    """Training samples, regime and notices for a requested regime.

    ``auto`` follows the data (:func:`training_regime`). A request the data cannot meet is
    adjusted, never an error, and a notice says how:

    - ``unsupervised`` with labelled defects: the defects are left out of training;
    - ``weakly`` with masks: the masks are not used (image labels only);
    - ``supervised`` with some defects lacking masks: those train on their image label (mixed);
    - any supervised regime without defective images: unsupervised.
    """
    if requested not in REGIME_CHOICES:
        raise DataError(f"Unknown training regime {requested!r}. Fix: use one of {', '.join(REGIME_CHOICES)}.")
    found = training_regime(samples)
    defects = [s for s in samples if s.label == 1]
    with_mask = sum(s.mask_path is not None for s in defects)
    notes: list[str] = []
    if requested == "unsupervised" and defects:
        notes.append(f"Regime 'unsupervised' requested: the {len(defects)} labelled defective training images are not used.")
        return [s for s in samples if s.label == 0], "unsupervised", notes
    if requested in ("weakly", "supervised", "mixed") and not defects:
        notes.append(
            f"Regime {requested!r} requested but the training set has no labelled defective images: "
            "training unsupervised. Fix: add defective training images (e.g. --train-defects)."
        )
        return samples, "unsupervised", notes
    if requested == "weakly" and with_mask:
        notes.append(f"Regime 'weakly' requested: the masks of {with_mask} defective training images are not used.")
        samples = [Sample(s.path, s.label, None, s.defect_type) if s.label == 1 else s for s in samples]
        return samples, "weakly", notes
    if requested in ("supervised", "mixed") and found != requested and found != "unsupervised":
        missing = len(defects) - with_mask
        if requested == "supervised":
            notes.append(
                f"Regime 'supervised' requested but {missing} of {len(defects)} defective training images "
                f"have no mask: they train on their image label only (regime '{found}')."
            )
        else:
            notes.append(f"Regime 'mixed' requested; the data gives '{found}' ({with_mask} of {len(defects)} defects with masks).")
    return samples, found, notes


def describe_regime(samples: list[Sample], regime: str) -> str:
    """One line for the user, e.g. ``weakly supervised: 441 good, 10 defective with image labels only``."""
    good = sum(s.label == 0 for s in samples)
    defects = [s for s in samples if s.label == 1]
    with_mask = sum(s.mask_path is not None for s in defects)
    name = {"unsupervised": "unsupervised", "weakly": "weakly supervised", "mixed": "mixed supervision",
            "supervised": "supervised"}[regime]
    if not defects:
        return f"Training regime: {name} ({good} good images)"
    return (f"Training regime: {name} ({good} good images, {len(defects)} defective: {with_mask} with masks, "
            f"{len(defects) - with_mask} with image labels only)")


def hold_out_validation(
    samples: list[Sample], fraction: float = 0.2, seed: int = 0, hold_out_defects: bool = False
) -> tuple[list[Sample], list[Sample], list[str]]:
    """Split training samples into (train, validation, notes) for fitting the verdict threshold.

    A seeded ``fraction`` of the good images is held out (at least one, and at least two stay
    for training), and with ``hold_out_defects`` the same share of the labelled defects (at
    least one when there are two or more). The choice depends only on the file names and
    ``seed``, so a resumed or repeated run holds out the same images. ``fraction`` 0 holds out
    nothing (the caller then has no unseen images to set a threshold on)."""
    import random

    fraction = float(fraction)
    if not 0.0 <= fraction < 1.0 or fraction != fraction:
        raise DataError(f"The validation fraction must be in [0, 1), got {fraction!r}. Fix: e.g. 0.2.")
    notes: list[str] = []
    if fraction == 0.0:
        return list(samples), [], notes
    rng = random.Random(seed)

    def pick(group: list[Sample], minimum: int, keep: int) -> set[int]:
        if len(group) < minimum + keep:
            return set()
        count = min(max(minimum, round(len(group) * fraction)), len(group) - keep)
        order = sorted(range(len(group)), key=lambda i: str(group[i].path))
        return set(rng.sample(order, count))

    good = [i for i, s in enumerate(samples) if s.label == 0]
    defects = [i for i, s in enumerate(samples) if s.label == 1]
    chosen = {good[i] for i in pick([samples[i] for i in good], 1, 2)}
    if not chosen:
        notes.append(
            f"Only {len(good)} good training images: none can be held out to set the threshold, so it is set on "
            "the training images themselves (optimistic). Fix: add good images."
        )
    if hold_out_defects and defects:
        held = {defects[i] for i in pick([samples[i] for i in defects], 1, 1)}
        if not held:
            notes.append(f"Only {len(defects)} labelled defect(s): none held out for the threshold.")
        chosen |= held
    train = [s for i, s in enumerate(samples) if i not in chosen]
    validation = [s for i, s in enumerate(samples) if i in chosen]
    return train, validation, notes
