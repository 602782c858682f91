"""NIfTI volumes (``*.nii.gz`` / ``*.nii``) with a coarse mask each and fine masks for a subset."""
from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ._io import binarise_values, parse_foreground, scale_min_max
from .folders import COARSE_FINE_SUFFIXES, CoarseFineDataset, index_coarse_fine

__all__ = ["NIFTI_EXTENSIONS", "NiftiFolder", "list_nifti_files"]

PathLike = str | os.PathLike
NIFTI_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii")


def _nibabel():
    try:
        import nibabel
    except ImportError as exc:  # pragma: no cover - exercised only without nibabel
        raise ImportError("NiftiFolder needs nibabel to read NIfTI files: pip install nibabel") from exc
    return nibabel


def list_nifti_files(folder: Path) -> dict[str, Path]:
    """Map stem -> path for the ``*.nii.gz`` / ``*.nii`` files of ``folder`` (non-recursive,
    case-insensitive, hidden files ignored); ``a.nii`` beside ``a.nii.gz`` is a ``ValueError``."""
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        lower = p.name.lower()
        ext = next((e for e in NIFTI_EXTENSIONS if lower.endswith(e)), None)
        if p.name.startswith(".") or ext is None or not p.is_file():
            continue
        stem = p.name[: -len(ext)]
        if stem in out:
            raise ValueError(f"two NIfTI files with the same name stem {stem!r} in {folder}: "
                             f"{out[stem].name} and {p.name}")
        out[stem] = p
    return out


def check_size3(size: Any) -> tuple[int, int, int] | None:
    """``None``, a positive int or a ``(D, H, W)`` triple of positive ints."""
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (size,) * 3
    if not isinstance(size, Sequence) or isinstance(size, str) or len(size) != 3:
        raise TypeError(f"size must be None, an int or a (D, H, W) triple of ints, got {size!r}")
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size):
        raise TypeError(f"size must contain ints, got {size!r}")
    if min(size) <= 0:
        raise ValueError(f"size must be positive, got {tuple(size)!r}")
    return tuple(int(v) for v in size)  # type: ignore[return-value]


def read_volume(path: Path, *, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(data, affine)`` of a NIfTI file; unreadable / truncated files raise ``ValueError`` naming it."""
    nib = _nibabel()
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error) as exc:
        raise ValueError(f"cannot read {what} file {path}: {type(exc).__name__}: {exc}") from exc
    return data, affine


def _squeeze_trailing(arr: np.ndarray) -> np.ndarray:
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return arr


class NiftiFolder(CoarseFineDataset):
    """3-D volumes with a coarse mask each and fine masks for a subset: the layout, options and
    errors of :class:`pyunlearn.data.CoarseFineFolder`, with ``*.nii.gz`` / ``*.nii`` files.

    Items (dicts, exactly these keys): ``image`` float32 (C, D, H, W) in [0, 1], ``coarse`` and
    ``fine`` bool (D, H, W) (``fine`` all False without a fine mask), ``has_fine`` bool scalar,
    ``label`` int64 scalar (-1 without labels CSV), ``artefacts`` float32 (A,), ``id`` str.

    * Axes: the three spatial axes are the file's voxel axes in stored order (no reorientation);
      a 4-D image's last axis is its channels (e.g. stacked MR sequences), else C = 1. Masks are
      3-D (trailing singleton axes are dropped).
    * Scaling: each channel by the volume's own min..max (CT / MR intensities have no fixed
      range); a constant channel becomes zeros; NaN / inf raise ``ValueError`` naming the file.
    * Masks: the ``foreground`` rule of :func:`pyunlearn.data._io.binarise_values` (default
      automatic and strict: ``{0, m}`` for one ``m``; label maps need ``foreground=[...]``).
    * Checks per item (``ValueError`` naming the files): readable (truncated .gz files too), mask
      shapes equal to the image's spatial shape, the same affine (``np.allclose``, atol 1e-3),
      fine inside coarse (with the count of voxels outside).
    * ``size`` (D, H, W) or an int resizes: trilinear image, nearest masks.

    nibabel is imported when a volume is read (``ImportError`` with ``pip install nibabel`` if it
    is missing); reading is lazy, one volume per item.
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
        size: int | tuple[int, int, int] | None = None,
        mask_suffixes: Sequence[str] = COARSE_FINE_SUFFIXES,
    ) -> None:
        _nibabel()
        self._foreground = parse_foreground(foreground)
        self._size = check_size3(size)
        self._index = index_coarse_fine(
            images, coarse, fine, labels_csv=labels_csv, artefacts_csv=artefacts_csv,
            artefact_columns=artefact_columns, mask_suffixes=mask_suffixes,
            list_files=list_nifti_files, kind="volume")

    def _mask(self, path: Path, what: str, shape: tuple[int, ...], affine: np.ndarray,
              image_path: Path) -> np.ndarray:
        data, aff = read_volume(path, what=what)
        data = _squeeze_trailing(data)
        if data.shape != shape:
            raise ValueError(f"{what} {path} has shape {data.shape} but volume {image_path} has "
                             f"spatial shape {shape}")
        if not np.allclose(aff, affine, rtol=1e-5, atol=1e-3):
            raise ValueError(f"{what} {path} and volume {image_path} have different affines (voxel "
                             f"-> world): {aff.round(4).tolist()} vs {affine.round(4).tolist()}; "
                             "resample the mask onto the image grid")
        return binarise_values(data, self._foreground, source=f"{what} {path}")

    def _read(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = self._index
        img_path, coarse_path, fine_path = idx.images[i], idx.coarse[i], idx.fine[i]
        data, affine = read_volume(img_path, what="volume")
        data = _squeeze_trailing(data) if data.ndim > 4 else data
        if data.ndim == 3:
            data = data[None]
        elif data.ndim == 4:
            data = np.moveaxis(data, -1, 0)
        else:
            raise ValueError(f"volume {img_path} has shape {data.shape}; expected 3-D (D, H, W) or "
                             "4-D with channels last")
        shape = data.shape[1:]
        image = np.stack([scale_min_max(c, source=f"volume {img_path}") for c in data])
        coarse = self._mask(coarse_path, "coarse mask", shape, affine, img_path)
        if fine_path is None:
            fine = np.zeros(shape, dtype=bool)
        else:
            fine = self._mask(fine_path, "fine mask", shape, affine, img_path)
            outside = int(np.count_nonzero(fine & ~coarse))
            if outside:
                raise ValueError(f"fine mask {fine_path} is not inside its coarse mask {coarse_path}: "
                                 f"{outside} of its {int(np.count_nonzero(fine))} foreground voxels "
                                 "are outside the coarse mask (a coarse mask must cover the fine one)")
        image_t = torch.from_numpy(np.ascontiguousarray(image))
        coarse_t, fine_t = torch.from_numpy(coarse), torch.from_numpy(fine)
        if self._size is not None and tuple(shape) != self._size:
            image_t = F.interpolate(image_t[None], size=self._size, mode="trilinear",
                                    align_corners=False)[0].clamp_(0.0, 1.0)
            coarse_t, fine_t = (F.interpolate(m[None, None].float(), size=self._size,
                                              mode="nearest")[0, 0] > 0.5 for m in (coarse_t, fine_t))
        return image_t.to(torch.float32), coarse_t, fine_t
