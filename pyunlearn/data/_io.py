"""Shared image / mask / CSV helpers for the folder-based data sets.

Everything here reads files with Pillow and the standard ``csv`` module and turns every decoding
problem into an error that names the offending file. Sizes are always ``(H, W)``.
"""
from __future__ import annotations

import csv
import math
import operator
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "ID_ALIASES",
    "IMAGE_EXTENSIONS",
    "PairedImageMaskDataset",
    "binarise_mask",
    "list_image_files",
    "load_image",
    "load_mask",
    "read_binary_table",
    "read_csv",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
ID_ALIASES: tuple[str, ...] = ("image", "image_id", "isic_id")
COARSE_MODES: tuple[str, ...] = ("dilate", "bbox")
_RESAMPLING = getattr(Image, "Resampling", Image)  # Pillow < 9.1 has no Image.Resampling

# Exceptions Pillow raises for unreadable / corrupt / truncated files.
_PIL_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
               EOFError)


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------
def as_path(value: Any, *, name: str) -> Path:
    """``value`` as a :class:`Path`; ``TypeError`` naming ``name`` if it is not path-like."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(value).__name__}")
    return Path(value)


def check_size(size: Any, *, name: str = "size") -> tuple[int, int] | None:
    """Normalise ``size`` (``None``, a positive int, or an ``(H, W)`` pair of positive ints)."""
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (size, size)
    if not isinstance(size, Sequence) or isinstance(size, str) or len(size) != 2:
        raise TypeError(f"{name} must be None, an int or an (H, W) pair of ints, got {size!r}")
    out = []
    for v in size:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must contain ints, got {size!r}")
        if v <= 0:
            raise ValueError(f"{name} must be positive, got {tuple(size)!r}")
        out.append(int(v))
    return out[0], out[1]


def check_coarse(radius: Any, mode: Any) -> tuple[int | None, str]:
    """Validate ``coarse_radius`` (None or int >= 0) and ``coarse_mode`` ("dilate" | "bbox")."""
    if mode not in COARSE_MODES:
        raise ValueError(f"coarse_mode must be one of {COARSE_MODES}, got {mode!r}")
    if radius is None:
        return None, mode
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)):
        raise TypeError(f"coarse_radius must be None or an int, got {type(radius).__name__}")
    if radius < 0:
        raise ValueError(f"coarse_radius must be >= 0, got {radius}")
    return int(radius), mode


def check_dir(path: Path, *, what: str) -> Path:
    """Raise ``FileNotFoundError`` / ``NotADirectoryError`` naming ``path`` unless it is a folder."""
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"{what} is not a directory: {path}")
    return path


def check_file(path: Path, *, what: str) -> Path:
    """Raise ``FileNotFoundError`` / ``IsADirectoryError`` naming ``path`` unless it is a file."""
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise IsADirectoryError(f"{what} is not a file: {path}")
    return path


def str_tuple(value: Any, *, name: str, allow_empty: bool = True) -> tuple[str, ...]:
    """A str or an iterable of str as a tuple of str (a bare str counts as one item)."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a str or a sequence of str, got {type(value).__name__}")
    out = tuple(value)
    for v in out:
        if not isinstance(v, str):
            raise TypeError(f"{name} must contain str, got {type(v).__name__} ({v!r})")
    if not out and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} contains duplicates: {out!r}")
    return out


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------
def list_image_files(folder: Path, *, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> dict[str, Path]:
    """Map stem -> path for the image files of ``folder`` (non-recursive).

    Files with other extensions (``ATTRIBUTION.txt``, ``LICENSE.txt``, ...) and hidden files
    (``.DS_Store``, macOS ``._*`` forks) are ignored. Extensions match case-insensitively. Two
    image files with the same stem (``a.png`` and ``a.jpg``) are ambiguous: ``ValueError``.
    """
    exts = {e.lower() for e in extensions}
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.suffix.lower() not in exts or not p.is_file():
            continue
        if p.stem in out:
            raise ValueError(f"two image files with the same name stem {p.stem!r} in {folder}: "
                             f"{out[p.stem].name} and {p.name}")
        out[p.stem] = p
    return out


def _open(path: Path, what: str) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()  # decode now so that truncation / corruption surfaces here
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    except _PIL_ERRORS as exc:
        raise ValueError(f"cannot read {what} file {path}: {type(exc).__name__}: {exc}") from exc
    return img


def read_image_array(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to uint8 ``(H, W, 3)`` RGB at its native size.

    Greyscale / RGBA / palette images are converted to RGB. EXIF orientation is *not* applied
    (segmentation masks are annotated in stored pixel order). Corrupt or truncated files raise
    ``ValueError`` naming ``path``.
    """
    path = Path(path)
    img = _open(path, "image")
    try:
        return np.array(img.convert("RGB"), dtype=np.uint8)
    except _PIL_ERRORS as exc:
        raise ValueError(f"cannot convert image file {path} to RGB: {exc}") from exc


def resize_image_array(arr: np.ndarray, size: tuple[int, int] | None) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> float32 ``(3, *size)`` in [0, 1] (bilinear; no-op at the same size)."""
    if size is not None and arr.shape[:2] != size:
        img = Image.fromarray(arr).resize((size[1], size[0]), _RESAMPLING.BILINEAR)
        arr = np.array(img, dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).to(torch.float32).div_(255.0)


def load_image(path: str | os.PathLike, *, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read an image as float32 ``(3, H, W)`` in [0, 1]; resized bilinearly to ``size`` (H, W)."""
    return resize_image_array(read_image_array(path), check_size(size))


def binarise_mask(arr: np.ndarray) -> np.ndarray:
    """Foreground = ``arr > 0.5`` if ``arr.max() <= 1`` (0/1 masks), else ``arr > 127.5``.

    The 127.5 threshold absorbs JPEG noise on 0/255 masks and also works for 16-bit masks.
    """
    if arr.dtype == np.bool_:
        return arr.copy()
    arr = arr.astype(np.float64, copy=False)
    if arr.size and not np.isfinite(arr).all():
        raise ValueError("mask contains non-finite values")
    thr = 0.5 if (arr.size == 0 or arr.max() <= 1) else 127.5
    return arr > thr


def read_mask_array(path: str | os.PathLike) -> np.ndarray:
    """Decode a mask file to bool ``(H, W)`` at its native size.

    Colour masks are converted to luminance first; palette masks use their indices. See
    :func:`binarise_mask` for the threshold. Unreadable files raise ``ValueError`` naming ``path``.
    """
    path = Path(path)
    img = _open(path, "mask")
    try:
        if img.mode not in ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "F"):
            img = img.convert("L")
        mask = binarise_mask(np.asarray(img))
    except _PIL_ERRORS as exc:
        raise ValueError(f"cannot read mask file {path}: {exc}") from exc
    if mask.ndim != 2:
        raise ValueError(f"mask file {path} decoded to shape {mask.shape}, expected (H, W)")
    return mask


def resize_mask_array(mask: np.ndarray, size: tuple[int, int] | None) -> torch.Tensor:
    """bool ``(H, W)`` -> bool ``size`` tensor (nearest neighbour; no-op at the same size)."""
    if size is not None and mask.shape != size:
        small = Image.fromarray(mask.astype(np.uint8) * 255)
        mask = np.asarray(small.resize((size[1], size[0]), _RESAMPLING.NEAREST)) > 127
    return torch.from_numpy(np.ascontiguousarray(mask))


def load_mask(path: str | os.PathLike, *, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read a binary mask as bool ``(H, W)``; resized (nearest) to ``size`` (H, W) if given."""
    return resize_mask_array(read_mask_array(path), check_size(size))


# ----------------------------------------------------------------------------------------------
# CSV
# ----------------------------------------------------------------------------------------------
def read_csv(path: Path, *, what: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Read a CSV with a header: ``(columns, [(line_number, row), ...])``.

    Header names and cells are stripped of whitespace; a UTF-8 BOM is tolerated. Empty lines are
    skipped. Errors (no header, duplicate columns, rows with too many / too few cells) name
    ``path`` and the line.
    """
    check_file(path, what=what)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header: list[str] | None = None
        rows: list[tuple[int, dict[str, str]]] = []
        try:
            for cells in reader:
                if not cells or all(not c.strip() for c in cells):
                    continue
                cells = [c.strip() for c in cells]
                if header is None:
                    header = cells
                    dup = sorted({c for c in header if header.count(c) > 1})
                    if dup:
                        raise ValueError(f"{what} {path} has duplicate columns {dup}")
                    continue
                if len(cells) != len(header):
                    raise ValueError(f"{what} {path}, line {reader.line_num}: {len(cells)} cells "
                                     f"but the header has {len(header)} columns")
                rows.append((reader.line_num, dict(zip(header, cells))))
        except csv.Error as exc:
            raise ValueError(f"cannot parse {what} {path}: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ValueError(f"{what} {path} is not UTF-8 text: {exc}") from exc
    if header is None:
        raise ValueError(f"{what} {path} is empty (no header row)")
    return header, rows


def find_id_column(columns: Sequence[str], *, path: Path, what: str,
                   aliases: Sequence[str] = ID_ALIASES) -> str:
    """The first column of ``columns`` named like one of ``aliases`` (case-insensitive)."""
    lower = {c.lower(): c for c in columns}
    for a in aliases:
        if a.lower() in lower:
            return lower[a.lower()]
    raise ValueError(f"{what} {path} has no image id column: expected one of {list(aliases)}, "
                     f"found columns {list(columns)}")


def normalise_id(value: str) -> str:
    """Strip a trailing image extension (``ISIC_0000000.jpg`` -> ``ISIC_0000000``)."""
    root, ext = os.path.splitext(value)
    return root if ext.lower() in IMAGE_EXTENSIONS else value


def parse_binary(value: str) -> int | None:
    """``0``/``1`` (also ``0.0``/``1.0``) -> int; anything else -> None."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    if f == 0.0:
        return 0
    if f == 1.0:
        return 1
    return None


def parse_int(value: str) -> int | None:
    """An integer cell (``3`` or ``3.0``) -> int; anything else -> None."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(f) or f != int(f):
        return None
    return int(f)


def read_binary_table(path: Path, *, what: str, columns: Sequence[str] | None,
                      exclude: Sequence[str] = ()) -> tuple[list[str], dict[str, list[int]]]:
    """Read an id column plus 0/1 flag ``columns`` (default: every column but the id and ``exclude``).

    Returns ``(column_names, {id: [flags]})``. Missing columns, non-0/1 cells and duplicate ids
    raise ``ValueError`` naming ``path`` (and the column / line / id).
    """
    header, rows = read_csv(path, what=what)
    id_col = find_id_column(header, path=path, what=what)
    if columns is None:
        skip = {id_col, *exclude}
        columns = [c for c in header if c not in skip]
    else:
        columns = list(columns)
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{what} {path} is missing column(s) {missing}; found columns {header}")
    table: dict[str, list[int]] = {}
    for line, row in rows:
        key = normalise_id(row[id_col])
        if not key:
            raise ValueError(f"{what} {path}, line {line}: empty image id in column {id_col!r}")
        if key in table:
            raise ValueError(f"{what} {path}, line {line}: duplicate image id {key!r}")
        flags = []
        for c in columns:
            v = parse_binary(row[c])
            if v is None:
                raise ValueError(f"{what} {path}, line {line} (id {key!r}): column {c!r} must be "
                                 f"0 or 1, got {row[c]!r}")
            flags.append(v)
        table[key] = flags
    return columns, table


def warn_dropped(dropped: Sequence[str], total: int, *, reason: str) -> None:
    """``warnings.warn`` how many of ``total`` ids were dropped (with the first few named)."""
    if not dropped:
        return
    shown = ", ".join(dropped[:5]) + (", ..." if len(dropped) > 5 else "")
    warnings.warn(f"dropped {len(dropped)} of {total} images {reason}: {shown}",
                  UserWarning, stacklevel=3)


def format_ids(ids: Sequence[str], limit: int = 5) -> str:
    return ", ".join(repr(i) for i in ids[:limit]) + (f", ... ({len(ids)} in all)"
                                                      if len(ids) > limit else "")


# ----------------------------------------------------------------------------------------------
# base data set
# ----------------------------------------------------------------------------------------------
class PairedImageMaskDataset(torch.utils.data.Dataset):
    """Image/mask pairs with an image-level label and artefact flags; subclasses fill the lists.

    Items are dicts: ``image`` float32 (3, H, W) in [0, 1], ``fine`` bool (H, W), ``coarse`` bool
    (H, W) (only when ``coarse_radius`` is set; computed at the output size by
    :func:`pyunlearn.masks.coarsen`), ``label`` int64 scalar, ``artefacts`` float32 (A,), ``id``.
    """

    _image_paths: list[Path]
    _mask_paths: list[Path]
    _ids: list[str]
    _labels: list[int]
    _artefacts: list[list[int]]
    _artefact_names: list[str]
    _size: tuple[int, int] | None
    _coarse_radius: int | None
    _coarse_mode: str

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[str]:
        """Image ids (file stems), in item order."""
        return list(self._ids)

    @property
    def artefact_names(self) -> list[str]:
        """Names of the entries of ``item["artefacts"]``."""
        return list(self._artefact_names)

    @property
    def labels(self) -> torch.Tensor:
        """int64 ``(N,)`` labels of all items, without reading any image."""
        return torch.tensor(self._labels, dtype=torch.int64)

    @property
    def artefacts(self) -> torch.Tensor:
        """float32 ``(N, A)`` artefact flags of all items, without reading any image."""
        return torch.tensor(self._artefacts, dtype=torch.float32).reshape(len(self), -1)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(f"index must be an int, got {type(index).__name__}") from None
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a data set of {n} items")
        i %= n
        img_path, mask_path = self._image_paths[i], self._mask_paths[i]
        image_arr = read_image_array(img_path)
        mask_arr = read_mask_array(mask_path)
        if mask_arr.shape != image_arr.shape[:2]:
            raise ValueError(f"mask {mask_path} is {mask_arr.shape} (H, W) but image {img_path} "
                             f"is {image_arr.shape[:2]}")
        image = resize_image_array(image_arr, self._size)
        fine = resize_mask_array(mask_arr, self._size)
        item: dict[str, Any] = {"image": image, "fine": fine}
        if self._coarse_radius is not None:
            from pyunlearn.masks import coarsen  # lazy: optional at import time

            item["coarse"] = coarsen(fine, radius=self._coarse_radius, mode=self._coarse_mode)
        item["label"] = torch.tensor(self._labels[i], dtype=torch.int64)
        item["artefacts"] = torch.tensor(self._artefacts[i], dtype=torch.float32).reshape(-1)
        item["id"] = self._ids[i]
        return item

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n={len(self)}, size={self._size}, "
                f"artefacts={self._artefact_names}, coarse_radius={self._coarse_radius})")
