"""Readers for folder layouts on disk: the MVTec AD layout and a user's own folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .images import IMAGE_EXTENSIONS, DataError, _image_files, _is_image_file, _show, list_images
from .samples import DataSplit, Sample, check_test_classes

__all__ = ["mvtec_split", "folder_split", "move_defects_to_train"]

MVTEC_LAYOUT = """\
  <root>/<category>/train/good/*.png                      good training images
  <root>/<category>/test/good/*.png                       good test images
  <root>/<category>/test/<defect_type>/*.png              defective test images
  <root>/<category>/ground_truth/<defect_type>/<name>_mask.png   masks (optional)"""


def _examples(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _index_masks(folder: Path) -> dict[str, Path]:
    """Mask files in ``folder`` by stem, each also under its stem without a ``_mask`` suffix.

    An exact stem wins over a stripped one, so ``a.png`` and ``a_mask.png`` can never be confused
    when both exist for different images.
    """
    files = _image_files(folder)  # a broken link or pipe with a mask name gets a notice
    index: dict[str, Path] = {}
    exact: dict[str, Path] = {}
    for path in files:
        if path.stem in exact:
            raise DataError(
                f"Two masks with the same name in {_show(folder)}: {exact[path.stem].name} and "
                f"{path.name}. Fix: keep one of them."
            )
        exact[path.stem] = path
    for stem, path in exact.items():
        if stem.endswith("_mask"):
            index.setdefault(stem[: -len("_mask")], path)
    index.update(exact)
    return index


def _match_masks(
    images: list[Path], mask_folder: Path | None
) -> tuple[list[Path | None], list[str], list[Path]]:
    """The mask for each image (``<stem>_mask.*`` first, then ``<stem>.*``), the names of images
    without one, and the mask files no image claimed."""
    if mask_folder is None or not mask_folder.is_dir():
        return [None] * len(images), [p.name for p in images], []
    index = _index_masks(mask_folder)
    matched: list[Path | None] = []
    for image in images:
        matched.append(index.get(image.stem + "_mask") or index.get(image.stem))
    used = {p for p in matched if p is not None}
    unused = sorted(set(index.values()) - used)
    missing = [img.name for img, m in zip(images, matched, strict=True) if m is None]
    return matched, missing, unused


def _check_fraction(fraction: float, name: str) -> float:
    if isinstance(fraction, bool) or not 0.0 <= float(fraction) < 1.0:
        raise DataError(f"{name} must be in [0, 1), got {fraction!r}. Fix: pass e.g. 0.2 (0: no labelled defects in training).")
    return float(fraction)


def move_defects_to_train(split: DataSplit, fraction: float, seed: int = 0) -> DataSplit:
    """Move ``round(n * fraction)`` defective test images of each defect type (seeded) into the
    training set, with their masks when they have them, for supervised training.

    The rest of the test set is unchanged, and a note records the move.
    """
    fraction = _check_fraction(fraction, "train_defect_fraction")
    if fraction == 0:
        return split
    rng = np.random.default_rng(seed)
    moved: list[Sample] = []
    for kind in sorted({s.defect_type for s in split.test if s.label == 1}):
        group = [s for s in split.test if s.label == 1 and s.defect_type == kind]
        n = int(round(len(group) * fraction))
        if n >= len(group) and len(group) > 1:
            n = len(group) - 1  # keep at least one of each type for testing
        moved.extend(group[i] for i in sorted(rng.permutation(len(group))[:n].tolist()))
    chosen = set(moved)
    split.test = [s for s in split.test if s not in chosen]
    split.train = split.train + moved
    with_mask = sum(s.mask_path is not None for s in moved)
    split.notes.append(
        f"{len(moved)} defective test images (share {fraction:g} of each defect type, seed {seed}) moved to "
        f"training: {with_mask} with masks, {len(moved) - with_mask} with image labels only."
    )
    return split


def mvtec_split(
    root: str | os.PathLike, category: str, train_defect_fraction: float = 0.0, seed: int = 0
) -> DataSplit:
    """Read one category of an MVTec-AD-layout data set (also VisA converted to it, BTAD, ...).

    Layout::

        <root>/<category>/train/good/*.png
        <root>/<category>/test/good/*.png
        <root>/<category>/test/<defect_type>/*.png
        <root>/<category>/ground_truth/<defect_type>/<stem>_mask.png   (or <stem>.png)

    ``train`` holds only ``train/good`` (label 0). ``test`` holds ``test/good`` (label 0) and every
    other ``test/<defect_type>`` folder (label 1, ``defect_type`` = folder name), sorted. A defect
    without a mask file is kept with ``mask_path=None`` and a note; so are empty defect folders
    (skipped) and masks that match no image. One mask file per image: MVTec LOCO's per-image mask
    folders are not merged, so those defects get image labels only (with a note).
    ``train_defect_fraction`` > 0 moves that share of each defect type (chosen with ``seed``) from
    test to train, with masks, for supervised training (:func:`move_defects_to_train`).
    :func:`check_test_classes` notes are appended.
    Raises :class:`DataError` naming the expected path when a required folder is missing.
    """
    _check_fraction(train_defect_fraction, "train_defect_fraction")
    root = Path(root)
    base = root / category
    for folder, what in ((root, "Data set root"), (base, f"Category folder {category!r}")):
        if not folder.is_dir():
            raise DataError(
                f"{what} not found: {_show(folder)}. Expected the MVTec AD layout:\n{MVTEC_LAYOUT}\n"
                "Fix: check root and category (category is a folder name under root)."
            )
    notes: list[str] = []
    for sub in ("train/good", "test"):
        if not (base / sub).is_dir():
            raise DataError(
                f"Missing folder {_show(base / sub)}. Expected the MVTec AD layout:\n{MVTEC_LAYOUT}\n"
                "Fix: restore the folder or point root/category at a complete copy."
            )
    train = [Sample(path, 0) for path in list_images(base / "train" / "good")]

    test_dirs = sorted(p for p in (base / "test").iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p.name for p in (base / "test").iterdir() if p.is_file() and _is_image_file(p))
    if loose:
        notes.append(
            f"{len(loose)} images lie directly in {base / 'test'} ({_examples(loose)}) and were "
            "ignored: test images belong in test/good or test/<defect_type>."
        )
    test: list[Sample] = []
    ground_truth = base / "ground_truth"
    for folder in test_dirs:
        kind = folder.name
        images = _image_files(folder)  # broken links / pipes with image names: a notice
        if not images:
            notes.append(f"Skipped {folder}: no images (accepted: {' '.join(IMAGE_EXTENSIONS)}).")
            continue
        if kind == "good":
            test.extend(Sample(path, 0) for path in images)
            continue
        masks, missing, unused = _match_masks(images, ground_truth / kind)
        test.extend(Sample(p, 1, m, kind) for p, m in zip(images, masks, strict=True))
        if missing:
            notes.append(
                f"{len(missing)} of {len(images)} defect images in {folder} have no mask in "
                f"{ground_truth / kind} (looked for <stem>_mask.png or <stem>.png; e.g. "
                f"{_examples(missing)}): kept as defects with an image label only."
            )
        if unused:
            notes.append(
                f"{len(unused)} mask files in {ground_truth / kind} match no image in {folder} "
                f"(e.g. {_examples([p.name for p in unused])}): ignored."
            )
    if not test:
        raise DataError(
            f"No test images under {_show(base / 'test')}. Expected the MVTec AD layout:\n"
            f"{MVTEC_LAYOUT}\nFix: add test/good and test/<defect_type> folders with images."
        )
    if ground_truth.is_dir():
        orphans = sorted(
            p.name
            for p in ground_truth.iterdir()
            if p.is_dir()
            and not p.name.startswith(".")
            and p.name != "good"
            and not (base / "test" / p.name).is_dir()
        )
        if orphans:
            notes.append(
                f"Mask folders in {ground_truth} with no test folder: {', '.join(orphans)} (ignored)."
            )
    split = move_defects_to_train(DataSplit(name=category, train=train, test=test, notes=notes), train_defect_fraction, seed)
    split.notes.extend(check_test_classes(split))
    return split


def _held_out(paths: list[Path], fraction: float, seed: int, what: str) -> tuple[list[Path], list[Path]]:
    """Split ``paths`` (sorted) into kept and held-out lists; the held-out share is seeded."""
    n_out = int(round(len(paths) * fraction))
    if n_out >= len(paths):
        raise DataError(
            f"Holding out {fraction:g} of the {len(paths)} images of {what} for testing leaves none "
            "for training. Fix: lower the fraction or add images."
        )
    order = np.random.default_rng(seed).permutation(len(paths))
    out = set(order[:n_out].tolist())
    kept = [p for i, p in enumerate(paths) if i not in out]
    held = [p for i, p in enumerate(paths) if i in out]
    return kept, held


def folder_split(
    normal_dir: str | os.PathLike,
    abnormal_dir: str | os.PathLike | None = None,
    mask_dir: str | os.PathLike | None = None,
    normal_test_dir: str | os.PathLike | None = None,
    test_split_ratio: float = 0.2,
    seed: int = 0,
    train_abnormal_dir: str | os.PathLike | None = None,
    train_defect_fraction: float = 0.0,
) -> DataSplit:
    """A split from a user's own folders.

    - ``normal_dir``: good images. All go to train when ``normal_test_dir`` is given; otherwise
      ``round(n * test_split_ratio)`` of them, chosen with ``seed``, go to test (label 0).
    - ``abnormal_dir``: defective images (label 1, test only). Images directly inside get
      ``defect_type="defect"``; if it only has sub-folders, each sub-folder is a defect type.
    - ``mask_dir``: masks matched to defective images by stem, as ``<stem>_mask.*`` or
      ``<stem>.*`` (any image extension; also per-type sub-folders). Defects without a mask are
      kept with ``mask_path=None`` and a note.
    - ``normal_test_dir``: good test images, instead of holding out part of ``normal_dir``.
    - ``train_abnormal_dir``: labelled defective images for supervised training (same layout as
      ``abnormal_dir``; masks from ``mask_dir`` when they match, else image labels only). An
      empty folder adds none, with a note (training is then unsupervised).
    - ``train_defect_fraction``: share of each defect type of ``abnormal_dir`` moved to training.

    :func:`check_test_classes` notes are appended (e.g. when no abnormal images are given).
    """
    normal_dir = Path(normal_dir)
    if not 0.0 <= float(test_split_ratio) < 1.0:
        raise DataError(
            f"test_split_ratio must be in [0, 1), got {test_split_ratio!r} (for {_show(normal_dir)}). "
            "Fix: pass e.g. 0.2."
        )
    normals = list_images(normal_dir)
    notes: list[str] = []
    if normal_test_dir is not None:
        normal_test_dir = Path(normal_test_dir)
        if normal_test_dir.resolve() == normal_dir.resolve():
            raise DataError(
                f"normal_test_dir and normal_dir are the same folder ({_show(normal_dir)}): the model "
                "would be tested on its own training images. Fix: use separate folders, or leave "
                "normal_test_dir out to hold out a share of normal_dir."
            )
        train_paths, test_good = normals, list_images(normal_test_dir)
    else:
        train_paths, test_good = _held_out(normals, float(test_split_ratio), seed, str(normal_dir))
        notes.append(
            f"{len(test_good)} of {len(normals)} images of {normal_dir} held out as good test images "
            f"(test_split_ratio={test_split_ratio:g}, seed={seed})."
        )
    train = [Sample(p, 0) for p in train_paths]
    test = [Sample(p, 0) for p in test_good]

    if abnormal_dir is not None:
        abnormal_dir = Path(abnormal_dir)
        if abnormal_dir.resolve() == normal_dir.resolve():
            raise DataError(
                f"abnormal_dir and normal_dir are the same folder ({_show(normal_dir)}). Fix: put "
                "good and defective images in separate folders."
            )
        groups = _abnormal_groups(abnormal_dir)
        mask_root = Path(mask_dir) if mask_dir is not None else None
        if mask_root is not None and not mask_root.is_dir():
            raise DataError(
                f"Mask folder not found: {_show(mask_root)}. Fix: check the path, or leave mask_dir "
                "out to use image labels only."
            )
        for kind, images in groups:
            folder = mask_root
            if mask_root is not None and kind != "defect" and (mask_root / kind).is_dir():
                folder = mask_root / kind
            masks, missing, _ = _match_masks(images, folder)
            test.extend(Sample(p, 1, m, kind) for p, m in zip(images, masks, strict=True))
            if mask_root is not None and missing:
                notes.append(
                    f"{len(missing)} of {len(images)} defect images ({kind}) have no mask in "
                    f"{folder} (looked for <stem>_mask.* or <stem>.*; e.g. {_examples(missing)}): "
                    "kept as defects with an image label only."
                )
    elif mask_dir is not None:
        notes.append(
            f"mask_dir {mask_dir} ignored: masks belong to abnormal images and no abnormal_dir was given."
        )

    if train_abnormal_dir is not None:
        train.extend(_train_defects(Path(train_abnormal_dir), mask_dir, notes))
    _check_fraction(train_defect_fraction, "train_defect_fraction")
    name = (
        normal_dir.name if normal_dir.name not in ("", "good", "normal") else normal_dir.resolve().parent.name
    )
    split = DataSplit(name=name or "folder", train=train, test=sorted(test, key=_order), notes=notes)
    split = move_defects_to_train(split, train_defect_fraction, seed)
    split.notes.extend(check_test_classes(split))
    return split


def _train_defects(folder: Path, mask_dir, notes: list[str]) -> list[Sample]:
    """Labelled training defects from ``folder`` (masks from ``mask_dir`` when they match)."""
    if not folder.is_dir():
        raise DataError(
            f"Training defect folder not found: {_show(folder)}. Fix: check the path, or leave "
            "train_abnormal_dir out for unsupervised training."
        )
    has_images = any(p.is_file() and _is_image_file(p) for p in folder.rglob("*"))
    if not has_images:
        notes.append(
            f"The training defect folder {folder} has no images: no labelled defects, so training is unsupervised."
        )
        return []
    mask_root = Path(mask_dir) if mask_dir is not None else None
    samples: list[Sample] = []
    for kind, images in _abnormal_groups(folder):
        masks = [None] * len(images)
        if mask_root is not None and mask_root.is_dir():
            sub = mask_root / kind if kind != "defect" and (mask_root / kind).is_dir() else mask_root
            masks, _, _ = _match_masks(images, sub)
        samples.extend(Sample(p, 1, m, kind) for p, m in zip(images, masks, strict=True))
    with_mask = sum(s.mask_path is not None for s in samples)
    notes.append(
        f"{len(samples)} labelled defective training images from {folder}: {with_mask} with masks, "
        f"{len(samples) - with_mask} with image labels only."
    )
    return samples


def _order(sample: Sample) -> tuple[int, str, str]:
    return (sample.label, sample.defect_type, str(sample.path))


def _abnormal_groups(abnormal_dir: Path) -> list[tuple[str, list[Path]]]:
    """``[(defect_type, images)]``: the folder's own images, else one group per sub-folder."""
    if abnormal_dir.is_dir():
        direct = _image_files(abnormal_dir)
        if direct:
            return [("defect", direct)]
        subdirs = sorted(p for p in abnormal_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        groups = [
            (sub.name, _image_files(sub))
            for sub in subdirs
        ]
        groups = [(kind, images) for kind, images in groups if images]
        if groups:
            return groups
    # Nothing usable: let list_images raise its missing / not-a-folder / no-images error.
    return [("defect", list_images(abnormal_dir))]
