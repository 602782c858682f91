"""Generic image/mask folder pairs (any data set laid out as ``images/`` + ``masks/``)."""
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
    find_id_column,
    format_ids,
    list_image_files,
    match_masks,
    normalise_id,
    parse_foreground,
    parse_int,
    read_csv,
    str_tuple,
    warn_dropped,
)

__all__ = ["ImageMaskFolder"]

PathLike = str | os.PathLike


def _read_labels(path: Path) -> dict[str, int]:
    """``{id: label}`` from a CSV with an id column (``image``/``image_id``/``isic_id``) and ``label``."""
    what = "labels CSV"
    header, rows = read_csv(path, what=what)
    id_col = find_id_column(header, path=path, what=what)
    if "label" not in header:
        raise ValueError(f"{what} {path} is missing column(s) ['label']; found columns {header}")
    out: dict[str, int] = {}
    for line, row in rows:
        key = normalise_id(row[id_col])
        if not key:
            raise ValueError(f"{what} {path}, line {line}: empty image id in column {id_col!r}")
        if key in out:
            raise ValueError(f"{what} {path}, line {line}: duplicate image id {key!r}")
        value = parse_int(row["label"])
        if value is None or value < 0:
            raise ValueError(f"{what} {path}, line {line} (id {key!r}): column 'label' must be a "
                             f"non-negative integer, got {row['label']!r}")
        out[key] = value
    return out


class ImageMaskFolder(PairedImageMaskDataset):
    """Images in one folder, binary masks in another, matched by file stem.

    The mask of ``images/<stem>.<ext>`` is ``masks/<stem><suffix>.<ext2>`` for one of
    ``mask_suffixes`` and any of ``.png .jpg .jpeg .bmp .tif .tiff`` (case-insensitive); no match
    or more than one match is a ``ValueError`` naming the image(s). Non-image files are ignored.

    ``foreground`` says which mask pixels are foreground (see
    :func:`pyunlearn.data._io.parse_foreground` and :func:`~pyunlearn.data._io.binarise_mask`):
    ``None`` (default) reads unambiguous masks only ({0, m} for one m, bool, JPEG-noisy 0/255) and
    raises ``ValueError`` naming the file and its values otherwise; ``[1, 2]`` picks values /
    palette indices, ``[[255, 0, 0]]`` colours, ``{"threshold": 127}`` a cut-off.

    ``labels_csv`` (optional): an id column (``image``, ``image_id`` or ``isic_id``) and an integer
    ``label`` column; images without a row are dropped with a ``UserWarning``. Without it every
    ``label`` is -1 (unlabelled). ``artefacts`` is always empty (shape ``(0,)``).

    Items have the same format as :class:`pyunlearn.data.ISIC2018`. ``size=None`` keeps native
    sizes; give ``size`` (H, W) to batch images of different sizes.
    """

    def __init__(
        self,
        images: PathLike,
        masks: PathLike,
        *,
        labels_csv: PathLike | None = None,
        mask_suffixes: Sequence[str] = ("", "_mask", "_segmentation"),
        size: int | tuple[int, int] | None = None,
        coarse_radius: int | None = None,
        coarse_mode: str = "dilate",
        foreground: int | Sequence | dict | None = None,
    ) -> None:
        self._foreground = parse_foreground(foreground)
        self._size = check_size(size)
        self._coarse_radius, self._coarse_mode = check_coarse(coarse_radius, coarse_mode)
        suffixes = str_tuple(mask_suffixes, name="mask_suffixes", allow_empty=False)
        img_dir = check_dir(as_path(images, name="images"), what="image folder")
        msk_dir = check_dir(as_path(masks, name="masks"), what="mask folder")
        if img_dir.resolve() == msk_dir.resolve():
            raise ValueError(f"images and masks must be different folders, both are {img_dir}")
        labels_path = None if labels_csv is None else as_path(labels_csv, name="labels_csv")

        image_files = list_image_files(img_dir)
        if not image_files:
            raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {img_dir}")
        mask_files = list_image_files(msk_dir)

        pairs, missing, _ = match_masks(image_files, mask_files, suffixes, folder=msk_dir)
        if missing:
            raise ValueError(f"{len(missing)} image(s) in {img_dir} have no mask in {msk_dir} "
                             f"(tried suffixes {list(suffixes)}): {format_ids(missing)}")

        ids = sorted(pairs)
        if labels_path is not None:
            table = _read_labels(labels_path)
            warn_dropped([i for i in ids if i not in table], len(ids),
                         reason=f"that have no row in the labels CSV {labels_path}")
            ids = [i for i in ids if i in table]
            if not ids:
                raise ValueError(f"empty data set: none of the {len(pairs)} images in {img_dir} "
                                 f"has a row in the labels CSV {labels_path}")
            labels = [table[i] for i in ids]
        else:
            labels = [-1] * len(ids)

        self._ids = ids
        self._image_paths = [image_files[i] for i in ids]
        self._mask_paths = [pairs[i] for i in ids]
        self._labels = labels
        self._artefact_names = []
        self._artefacts = [[] for _ in ids]
