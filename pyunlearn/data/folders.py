"""Generic image/mask folders: ``images/`` + ``masks/`` (:class:`ImageMaskFolder`) and ``images/`` +
``coarse/`` + ``fine/`` (:class:`CoarseFineFolder`)."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._io import (
    IMAGE_EXTENSIONS,
    ForegroundRule,
    PairedImageMaskDataset,
    as_path,
    check_coarse,
    check_dir,
    check_index,
    check_inside,
    check_size,
    find_id_column,
    format_ids,
    list_image_files,
    match_masks,
    normalise_id,
    parse_foreground,
    parse_int,
    read_binary_table,
    read_csv,
    read_image_array,
    read_mask_array,
    resize_image_array,
    resize_mask_array,
    str_tuple,
    warn_dropped,
)

__all__ = ["CoarseFineFolder", "ImageMaskFolder"]

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


# ----------------------------------------------------------------------------------------------
# coarse + fine masks
# ----------------------------------------------------------------------------------------------
COARSE_FINE_SUFFIXES: tuple[str, ...] = ("", "_mask", "_segmentation", "_coarse", "_fine")


@dataclasses.dataclass
class _Index:
    """What a coarse/fine folder holds, found without reading any image."""

    ids: list[str]
    images: list[Path]
    coarse: list[Path]
    fine: list[Path | None]
    labels: list[int]
    artefact_names: list[str]
    artefacts: list[list[int]]


def index_coarse_fine(
    images: PathLike, coarse: PathLike, fine: PathLike | None, *, labels_csv: PathLike | None,
    artefacts_csv: PathLike | None, artefact_columns: Sequence[str] | None,
    mask_suffixes: Sequence[str], list_files: Callable[[Path], dict[str, Path]], kind: str,
) -> _Index:
    """Match ``images/`` to ``coarse/`` (every image) and ``fine/`` (a subset) by file stem and
    read the optional CSVs; every inconsistency is a ``ValueError`` naming the files."""
    suffixes = str_tuple(mask_suffixes, name="mask_suffixes", allow_empty=False)
    if artefact_columns is not None:
        if artefacts_csv is None:
            raise ValueError("artefact_columns was given but artefacts_csv is None")
        artefact_columns = list(str_tuple(artefact_columns, name="artefact_columns"))
    img_dir = check_dir(as_path(images, name="images"), what=f"{kind} folder")
    crs_dir = check_dir(as_path(coarse, name="coarse"), what="coarse mask folder")
    fin_dir = None if fine is None else check_dir(as_path(fine, name="fine"), what="fine mask folder")
    dirs = {"images": img_dir, "coarse": crs_dir, "fine": fin_dir}
    seen: dict[Path, str] = {}
    for name, d in dirs.items():
        if d is None:
            continue
        if d.resolve() in seen:
            raise ValueError(f"{seen[d.resolve()]} and {name} must be different folders, both are {d}")
        seen[d.resolve()] = name
    labels_path = None if labels_csv is None else as_path(labels_csv, name="labels_csv")
    artefacts_path = None if artefacts_csv is None else as_path(artefacts_csv, name="artefacts_csv")

    image_files = list_files(img_dir)
    if not image_files:
        raise ValueError(f"no {kind} files in {img_dir}")
    coarse_pairs, no_coarse, coarse_orphans = match_masks(image_files, list_files(crs_dir), suffixes,
                                                          folder=crs_dir, what="coarse mask")
    def refuse_orphans(orphans: list[Path], folder: Path, what: str) -> None:
        if orphans:
            raise ValueError(f"{len(orphans)} {what} file(s) in {folder} have no {kind} in {img_dir} (tried "
                             f"suffixes {list(suffixes)}): {format_ids([p.name for p in orphans])}")

    refuse_orphans(coarse_orphans, crs_dir, "coarse mask")
    if no_coarse:
        raise ValueError(f"{len(no_coarse)} {kind}(s) in {img_dir} have no coarse mask in {crs_dir} "
                         f"(tried suffixes {list(suffixes)}): {format_ids(no_coarse)}")
    fine_pairs: dict[str, Path] = {}
    if fin_dir is not None:
        fine_pairs, _, fine_orphans = match_masks(image_files, list_files(fin_dir), suffixes,
                                                  folder=fin_dir, what="fine mask")
        refuse_orphans(fine_orphans, fin_dir, "fine mask")

    ids = sorted(image_files)
    total = len(ids)
    label_table = None if labels_path is None else _read_labels(labels_path)
    if label_table is not None:
        warn_dropped([i for i in ids if i not in label_table], total,
                     reason=f"that have no row in the labels CSV {labels_path}")
        ids = [i for i in ids if i in label_table]
    names: list[str] = []
    art_table = None
    if artefacts_path is not None:
        names, art_table = read_binary_table(artefacts_path, what="artefacts CSV",
                                             columns=artefact_columns)
        warn_dropped([i for i in ids if i not in art_table], total,
                     reason=f"that have no row in the artefacts CSV {artefacts_path}")
        ids = [i for i in ids if i in art_table]
    if not ids:
        raise ValueError(f"empty data set: none of the {total} {kind}s in {img_dir} has a row in "
                         + " and ".join(f"the {w} CSV {p}" for w, p in
                                        (("labels", labels_path), ("artefacts", artefacts_path))
                                        if p is not None))
    return _Index(
        ids=ids, images=[image_files[i] for i in ids], coarse=[coarse_pairs[i] for i in ids],
        fine=[fine_pairs.get(i) for i in ids],
        labels=[label_table[i] for i in ids] if label_table is not None else [-1] * len(ids),
        artefact_names=list(names),
        artefacts=[art_table[i] for i in ids] if art_table is not None else [[] for _ in ids])


class CoarseFineDataset(torch.utils.data.Dataset):
    """Shared item contract of :class:`CoarseFineFolder` and :class:`pyunlearn.data.NiftiFolder`;
    subclasses implement ``_read(i) -> (image, coarse, fine)`` at the output size."""

    _index: _Index
    _foreground: ForegroundRule

    def __len__(self) -> int:
        return len(self._index.ids)

    @property
    def ids(self) -> list[str]:
        """Image ids (file stems), in item order."""
        return list(self._index.ids)

    @property
    def labels(self) -> torch.Tensor:
        """int64 ``(N,)`` labels (-1 without a labels CSV), without reading any image."""
        return torch.tensor(self._index.labels, dtype=torch.int64)

    @property
    def artefact_names(self) -> list[str]:
        """Names of the entries of ``item["artefacts"]``."""
        return list(self._index.artefact_names)

    @property
    def artefacts(self) -> torch.Tensor:
        """float32 ``(N, A)`` artefact flags (A = 0 without an artefacts CSV)."""
        return torch.tensor(self._index.artefacts, dtype=torch.float32).reshape(len(self), -1)

    @property
    def has_fine(self) -> torch.Tensor:
        """bool ``(N,)``: which items have a fine mask, without reading any image."""
        return torch.tensor([p is not None for p in self._index.fine], dtype=torch.bool)

    def _read(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = check_index(index, len(self))
        image, coarse, fine = self._read(i)
        return {
            "image": image,
            "coarse": coarse,
            "fine": fine,
            "has_fine": torch.tensor(self._index.fine[i] is not None),
            "label": torch.tensor(self._index.labels[i], dtype=torch.int64),
            "artefacts": torch.tensor(self._index.artefacts[i], dtype=torch.float32).reshape(-1),
            "id": self._index.ids[i],
        }

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n={len(self)}, with_fine={int(self.has_fine.sum())}, "
                f"size={self._size}, artefacts={self._index.artefact_names}, "
                f"{self._foreground.describe()})")


class CoarseFineFolder(CoarseFineDataset):
    """2-D images with a coarse mask each and fine masks for a subset, matched by file stem.

    Layout (the folders are given explicitly)::

        images/<stem>.<ext>                  every image
        coarse/<stem><suffix>.<ext>          a coarse mask for every image
        fine/<stem><suffix>.<ext>            fine masks for some images (optional folder)
        labels.csv                           optional: id column (image / image_id / isic_id), label
        artefacts.csv                        optional: id column + one 0/1 column per artefact kind

    ``<suffix>`` is one of ``mask_suffixes``; extensions ``.png .jpg .jpeg .bmp .tif .tiff``
    (case-insensitive); other files are ignored. Errors at construction (``ValueError`` naming
    the files/ids): an image without a coarse mask, a coarse or fine mask without an image, a mask
    matching two images or an image matching two masks, bad CSVs. Images without a row in a given
    CSV are dropped with a ``UserWarning``. Reading is lazy: construction lists files and reads
    the CSVs only.

    Items (dicts, exactly these keys): ``image`` float32 (3, H, W) in [0, 1] (see
    :func:`pyunlearn.data._io.read_image_array`: 8-bit by 255, deeper images by their own
    min..max), ``coarse`` bool (H, W), ``fine`` bool (H, W) (all False without a fine mask),
    ``has_fine`` bool scalar, ``label`` int64 scalar (-1 without labels CSV), ``artefacts``
    float32 (A,), ``id`` str. Reading an item checks (``ValueError`` naming the file) that the
    files decode (truncated / corrupt files), that both masks have the image's size, and that the
    fine mask lies inside the coarse one (the count of pixels outside is given). ``size`` (H, W)
    resizes: bilinear image, nearest masks (which keeps fine inside coarse).

    ``foreground`` is the mask rule for coarse and fine masks alike (default automatic and strict;
    ``[1, 2]``, ``[[255, 0, 0]]`` or ``{"threshold": 127}``; see
    :func:`pyunlearn.data._io.parse_foreground`).
    """

    def __init__(
        self,
        images: PathLike,
        coarse: PathLike,
        fine: PathLike | None = None,
        *,
        labels_csv: PathLike | None = None,
        artefacts_csv: PathLike | None = None,
        artefact_columns: Sequence[str] | None = None,
        foreground: int | Sequence | dict | None = None,
        size: int | tuple[int, int] | None = None,
        mask_suffixes: Sequence[str] = COARSE_FINE_SUFFIXES,
    ) -> None:
        self._foreground = parse_foreground(foreground)
        self._size = check_size(size)
        self._index = index_coarse_fine(
            images, coarse, fine, labels_csv=labels_csv, artefacts_csv=artefacts_csv,
            artefact_columns=artefact_columns, mask_suffixes=mask_suffixes,
            list_files=list_image_files, kind="image")

    def _read(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = self._index
        img_path, coarse_path, fine_path = idx.images[i], idx.coarse[i], idx.fine[i]
        image = read_image_array(img_path)
        shape = image.shape[:2]
        coarse = read_mask_array(coarse_path, self._foreground)
        if coarse.shape != shape:
            raise ValueError(f"coarse mask {coarse_path} is {coarse.shape} (H, W) but image "
                             f"{img_path} is {shape}")
        if fine_path is None:
            fine = np.zeros(shape, dtype=bool)
        else:
            fine = read_mask_array(fine_path, self._foreground)
            if fine.shape != shape:
                raise ValueError(f"fine mask {fine_path} is {fine.shape} (H, W) but image "
                                 f"{img_path} is {shape}")
            check_inside(fine, coarse, fine_path=fine_path, coarse_path=coarse_path)
        return (resize_image_array(image, self._size), resize_mask_array(coarse, self._size),
                resize_mask_array(fine, self._size))
