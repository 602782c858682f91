"""ISIC 2018 lesion images with fine masks, image-level diagnosis labels and artefact flags."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ._io import (
    IMAGE_EXTENSIONS,
    PairedImageMaskDataset,
    as_path,
    check_coarse,
    check_dir,
    check_size,
    format_ids,
    list_image_files,
    match_masks,
    parse_foreground,
    read_binary_table,
    str_tuple,
    warn_dropped,
)

__all__ = ["ISIC2018"]

PathLike = str | os.PathLike


def _resolve_file(root: Path, value: PathLike, *, name: str) -> Path:
    """``value`` if absolute; else ``root / value`` if that exists, else ``value`` from the cwd."""
    path = as_path(value, name=name)
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [root / path, path]
    for c in candidates:
        if c.is_file():
            return c
    tried = " or ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"{name} not found: {tried}")


class ISIC2018(PairedImageMaskDataset):
    """ISIC 2018 Task 1 images + Task 1 masks + image-level labels (+ optional artefact flags).

    Expected layout under ``root`` (the challenge's own folder and file names)::

        ISIC2018_Task1-2_Training_Input/ISIC_0000000.jpg          (ATTRIBUTION.txt etc. ignored)
        ISIC2018_Task1_Training_GroundTruth/ISIC_0000000_segmentation.png
        ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv

    Every image must have a mask (``ValueError`` naming the ids otherwise). The labels CSV needs an
    id column (``image``, ``image_id`` or ``isic_id``; ids may carry a file extension) and one 0/1
    column per entry of ``positive_classes``; ``label`` is 1 if any of them is 1. Other columns
    are ignored, so e.g. the ISIC 2017 Part 3 ground truth works with
    ``positive_classes=("melanoma",)``. Images without a label row (and, with ``artefacts_csv``,
    without an artefact row) are dropped with a ``UserWarning`` saying how many.

    ``artefacts_csv`` (e.g. the Bissoto et al. annotations) has an id column and 0/1 columns
    (``dark_corner``, ``hair``, ``ruler``, ...); ``artefact_columns`` picks some (default: all
    non-id columns). Relative CSV paths are looked up under ``root`` first, then from the cwd.

    Items: ``image`` float32 (3, H, W) in [0, 1] (bilinear resize to ``size``), ``fine`` bool
    (H, W) (nearest resize), ``coarse`` bool (H, W) only if ``coarse_radius`` or ``coarse_dir`` is
    given, ``has_fine`` bool scalar (always True: every ISIC image has a fine mask), ``label``
    int64 scalar, ``artefacts`` float32 (A,), ``id`` str. ``size=None`` keeps native sizes (which
    then differ between images).

    Coarse masks are either simulated from the fine ones (``coarse_radius``:
    ``pyunlearn.masks.coarsen(fine, radius=coarse_radius, mode=coarse_mode)`` at the output size)
    or *given* (``coarse_dir``, a folder under ``root`` or an absolute path, holding
    ``<id><suffix>.<ext>`` for one of ``coarse_suffixes`` per image; a missing one is a
    ``ValueError`` at construction). Given coarse masks must cover the fine mask (checked per
    item at native size, ``ValueError`` naming both files and the pixels outside). The two
    options exclude each other.

    ``foreground`` (default ``None``: automatic, strict) says which mask pixels are foreground, for
    fine and coarse masks alike; see :func:`pyunlearn.data._io.parse_foreground`. The official
    0/255 PNG masks read automatically; an ambiguous mask raises ``ValueError`` naming the file and
    its values.

    Corrupt or truncated image/mask files are detected when an item is read and raise
    ``ValueError`` naming the file.
    """

    def __init__(
        self,
        root: PathLike,
        *,
        image_dir: PathLike = "ISIC2018_Task1-2_Training_Input",
        mask_dir: PathLike = "ISIC2018_Task1_Training_GroundTruth",
        labels_csv: PathLike = "ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv",
        artefacts_csv: PathLike | None = None,
        artefact_columns: Sequence[str] | None = None,
        positive_classes: Sequence[str] = ("MEL",),
        size: int | tuple[int, int] | None = (128, 128),
        coarse_radius: int | None = None,
        coarse_mode: str = "dilate",
        coarse_dir: PathLike | None = None,
        coarse_suffixes: Sequence[str] = ("_segmentation", "", "_coarse", "_mask"),
        foreground: int | Sequence | dict | None = None,
    ) -> None:
        self._foreground = parse_foreground(foreground)
        self._size = check_size(size)
        self._coarse_radius, self._coarse_mode = check_coarse(coarse_radius, coarse_mode)
        if coarse_dir is not None and self._coarse_radius is not None:
            raise ValueError("give coarse_dir (given coarse masks) or coarse_radius (simulated from "
                             "the fine masks), not both")
        coarse_sfx = str_tuple(coarse_suffixes, name="coarse_suffixes", allow_empty=False)
        positive = str_tuple(positive_classes, name="positive_classes", allow_empty=False)
        if artefact_columns is not None:
            if artefacts_csv is None:
                raise ValueError("artefact_columns was given but artefacts_csv is None")
            artefact_columns = list(str_tuple(artefact_columns, name="artefact_columns"))

        root_p = check_dir(as_path(root, name="root"), what="ISIC root folder")
        img_dir = check_dir(root_p / as_path(image_dir, name="image_dir"), what="image folder")
        msk_dir = check_dir(root_p / as_path(mask_dir, name="mask_dir"), what="mask folder")
        crs_dir = (None if coarse_dir is None else
                   check_dir(root_p / as_path(coarse_dir, name="coarse_dir"), what="coarse mask folder"))
        labels_path = _resolve_file(root_p, labels_csv, name="labels_csv")
        artefacts_path = (None if artefacts_csv is None
                          else _resolve_file(root_p, artefacts_csv, name="artefacts_csv"))

        images = list_image_files(img_dir)
        if not images:
            raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {img_dir}")
        mask_names = {p.name for p in msk_dir.iterdir()}
        no_mask = [i for i in images if f"{i}_segmentation.png" not in mask_names]
        if no_mask:
            raise ValueError(f"{len(no_mask)} image(s) in {img_dir} have no mask "
                             f"'<id>_segmentation.png' in {msk_dir}: {format_ids(no_mask)}")

        _, label_table = read_binary_table(labels_path, what="labels CSV", columns=positive)
        if artefacts_path is not None:
            names, art_table = read_binary_table(artefacts_path, what="artefacts CSV",
                                                 columns=artefact_columns)
        else:
            names, art_table = [], None

        ids = sorted(images)
        kept = [i for i in ids if i in label_table]
        warn_dropped([i for i in ids if i not in label_table], len(ids),
                     reason=f"that have no row in the labels CSV {labels_path}")
        if art_table is not None:
            dropped = [i for i in kept if i not in art_table]
            warn_dropped(dropped, len(ids), reason=f"that have no row in the artefacts CSV "
                                                   f"{artefacts_path}")
            kept = [i for i in kept if i in art_table]
        if not kept:
            raise ValueError(
                f"empty data set: none of the {len(ids)} images in {img_dir} has a row in the "
                f"labels CSV {labels_path}" + ("" if art_table is None else
                                               f" and the artefacts CSV {artefacts_path}")
                + ". Note: in the official release the Task 1 training ids end at ISIC_0016072 "
                "and the Task 3 (HAM10000) ids start at ISIC_0024306; pass a labels_csv that "
                "covers the Task 1 images (any CSV with an image id column and 0/1 columns named "
                "in positive_classes).")

        self._ids = kept
        self._image_paths = [images[i] for i in kept]
        self._mask_paths = [msk_dir / f"{i}_segmentation.png" for i in kept]
        self._labels = [max(label_table[i]) for i in kept]
        self._artefact_names = list(names)
        self._artefacts = [art_table[i] if art_table is not None else [] for i in kept]
        if crs_dir is not None:
            if crs_dir.resolve() in (msk_dir.resolve(), img_dir.resolve()):
                raise ValueError(f"coarse_dir must be its own folder, not the image or mask folder: "
                                 f"{crs_dir}")
            coarse_pairs, no_coarse, _ = match_masks({i: images[i] for i in kept},
                                                     list_image_files(crs_dir), coarse_sfx,
                                                     folder=crs_dir, what="coarse mask")
            if no_coarse:
                raise ValueError(f"{len(no_coarse)} image(s) have no coarse mask in {crs_dir} "
                                 f"(tried suffixes {list(coarse_sfx)}): {format_ids(no_coarse)}")
            self._coarse_paths = [coarse_pairs[i] for i in kept]
