"""Shared image / mask / CSV helpers for the folder-based data sets.

Everything here reads files with Pillow and the standard ``csv`` module and turns every decoding
problem into an error that names the offending file. Sizes are always ``(H, W)``.
"""
from __future__ import annotations

import csv
import dataclasses
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
    "JPEG_TOLERANCE",
    "ForegroundRule",
    "PairedImageMaskDataset",
    "Threshold",
    "binarise_mask",
    "binarise_values",
    "list_image_files",
    "load_image",
    "load_mask",
    "parse_foreground",
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


def _high_bit_depth(mode: str) -> bool:
    """Greyscale modes with more than 8 bits per pixel (16-bit / 32-bit integer, 32-bit float)."""
    return mode in ("I", "F") or mode.startswith("I;16")


def read_image_array(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file at its native size: uint8 ``(H, W, 3)`` RGB, or float32 ``(H, W, 3)``.

    8-bit images (greyscale, RGB, RGBA, palette, ...) are converted to uint8 RGB and later scaled
    by 255, as always. Greyscale images of a higher bit depth (16-bit and 32-bit integer, 32-bit
    float; Pillow modes ``I;16*``, ``I``, ``F``) are returned as float32 in [0, 1], scaled by the
    image's *own* min..max: 12-bit scanner data stored in 16 bits (values 0..4095 of 0..65535)
    would be almost black if divided by the dtype range, and per-image min–max is what medical
    users normally want. A constant image becomes all zeros (no division by zero); non-finite
    pixels raise ``ValueError``. The grey channel is repeated three times. EXIF orientation is
    *not* applied (masks are annotated in stored pixel order). Corrupt or truncated files raise
    ``ValueError`` naming ``path``.
    """
    path = Path(path)
    img = _open(path, "image")
    try:
        if _high_bit_depth(img.mode):
            arr = np.asarray(img).astype(np.float64)
        else:
            return np.array(img.convert("RGB"), dtype=np.uint8)
    except _PIL_ERRORS as exc:
        raise ValueError(f"cannot convert image file {path} to RGB: {exc}") from exc
    if arr.ndim != 2:
        raise ValueError(f"image file {path} decoded to shape {arr.shape}, expected (H, W)")
    grey = scale_min_max(arr, source=f"image file {path}")
    return np.repeat(grey[..., None], 3, axis=2)


def scale_min_max(arr: np.ndarray, *, source: str) -> np.ndarray:
    """float32 ``(arr - min) / (max - min)``; all zeros if ``arr`` is constant; ``ValueError``
    naming ``source`` on NaN / inf."""
    arr = np.asarray(arr, dtype=np.float64)
    if arr.size == 0:
        return arr.astype(np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        raise ValueError(f"{source} contains {int((~finite).sum())} non-finite value(s) (NaN/inf)")
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def resize_image_array(arr: np.ndarray, size: tuple[int, int] | None) -> torch.Tensor:
    """``(H, W, 3)`` uint8 (scaled by 255) or float32 in [0, 1] -> float32 ``(3, *size)`` in [0, 1].

    Bilinear (Pillow's, per channel for float input); a no-op at the same size.
    """
    if arr.dtype == np.uint8:
        if size is not None and arr.shape[:2] != size:
            img = Image.fromarray(arr).resize((size[1], size[0]), _RESAMPLING.BILINEAR)
            arr = np.array(img, dtype=np.uint8)
        out = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).to(torch.float32)
        return out.div_(255.0)
    arr = np.asarray(arr, dtype=np.float32)
    if size is not None and arr.shape[:2] != size:
        chans = [np.asarray(Image.fromarray(np.ascontiguousarray(arr[..., c]), mode="F")
                            .resize((size[1], size[0]), _RESAMPLING.BILINEAR), dtype=np.float32)
                 for c in range(arr.shape[2])]
        arr = np.stack(chans, axis=2)
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).clamp_(0.0, 1.0)


def load_image(path: str | os.PathLike, *, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read an image as float32 ``(3, H, W)`` in [0, 1]; resized bilinearly to ``size`` (H, W)."""
    return resize_image_array(read_image_array(path), check_size(size))


# ----------------------------------------------------------------------------------------------
# mask rules
# ----------------------------------------------------------------------------------------------
#: How far from 0 or 255 a pixel of a JPEG-compressed 0/255 mask may lie (inclusive) and still be
#: read automatically: 0..48 is background, 207..255 foreground.
JPEG_TOLERANCE: int = 48
_LOSSY_FORMATS = ("JPEG", "MPO")


@dataclasses.dataclass(frozen=True)
class Threshold:
    """Foreground = pixel value ``> value`` (strictly). In a TOML config: ``foreground = {threshold = 127}``.

    On a coloured (RGB) mask the brightest channel is compared, i.e. a pixel is foreground if any
    channel exceeds ``value``.
    """

    value: float

    def __post_init__(self) -> None:
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(f"foreground threshold must be a number, got {type(v).__name__} ({v!r})")
        if not math.isfinite(float(v)):
            raise ValueError(f"foreground threshold must be finite, got {v!r}")
        object.__setattr__(self, "value", float(v))


@dataclasses.dataclass(frozen=True)
class ForegroundRule:
    """A validated ``foreground`` option: see :func:`parse_foreground`."""

    kind: str  # "auto" | "values" | "colours" | "threshold"
    values: tuple = ()
    threshold: float | None = None

    def describe(self) -> str:
        if self.kind == "auto":
            return "foreground=None (automatic)"
        if self.kind == "threshold":
            return f"foreground={{threshold={self.threshold:g}}}"
        return f"foreground={[list(v) if isinstance(v, tuple) else v for v in self.values]}"


_FOREGROUND_HELP = ("foreground must be None (automatic), a non-negative int or a list of them (the "
                    "pixel values / palette indices that are foreground), a list of [R, G, B] colours, "
                    "or a threshold: {'threshold': t} / Threshold(t) (TOML: foreground = {threshold = t})")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def parse_foreground(spec: Any) -> ForegroundRule:
    """Validate a ``foreground`` option (also as read from TOML) into a :class:`ForegroundRule`.

    * ``None``: automatic, strict (see :func:`binarise_mask`).
    * an int ``m`` or a list of ints ``[1, 2]``: the pixel values (palette indices for palette
      PNGs) that are foreground; every other value is background.
    * a list of ``[R, G, B]`` triples ``[[255, 0, 0]]``: the colours that are foreground, for
      coloured masks (a pixel's RGB must match exactly; alpha is ignored).
    * ``{"threshold": t}`` or :class:`Threshold` ``(t)``: foreground = value ``> t``.

    Raises ``TypeError`` / ``ValueError`` saying what is wrong.
    """
    if isinstance(spec, ForegroundRule):
        return spec
    if spec is None:
        return ForegroundRule("auto")
    if isinstance(spec, Threshold):
        return ForegroundRule("threshold", threshold=spec.value)
    if isinstance(spec, dict):
        if set(spec) != {"threshold"}:
            raise ValueError(f"a foreground table must have exactly one key 'threshold', got keys "
                             f"{sorted(map(str, spec))}; {_FOREGROUND_HELP}")
        return ForegroundRule("threshold", threshold=Threshold(spec["threshold"]).value)
    if _is_int(spec):
        spec = [spec]
    if isinstance(spec, (str, bytes)) or not isinstance(spec, (list, tuple)):
        raise TypeError(f"{_FOREGROUND_HELP}; got {type(spec).__name__} ({spec!r})")
    if not spec:
        raise ValueError(f"foreground must not be an empty list; {_FOREGROUND_HELP}")
    if all(_is_int(v) for v in spec):
        values = tuple(int(v) for v in spec)
        if min(values) < 0:
            raise ValueError(f"foreground values must be >= 0, got {list(values)}")
        if len(set(values)) != len(values):
            raise ValueError(f"foreground values contain duplicates: {list(values)}")
        return ForegroundRule("values", values=values)
    if all(isinstance(v, (list, tuple)) for v in spec):
        colours = []
        for v in spec:
            if len(v) != 3 or not all(_is_int(c) and 0 <= c <= 255 for c in v):
                raise ValueError(f"foreground colours must be [R, G, B] triples of ints in 0..255, "
                                 f"got {list(v)!r}")
            colours.append(tuple(int(c) for c in v))
        if len(set(colours)) != len(colours):
            raise ValueError(f"foreground colours contain duplicates: {[list(c) for c in colours]}")
        return ForegroundRule("colours", values=tuple(colours))
    bad = next((v for v in spec if not _is_int(v) and not isinstance(v, (list, tuple))), None)
    if bad is None:
        raise TypeError(f"foreground values must all be ints or all be [R, G, B] triples, not a mix: "
                        f"{list(spec)!r}")
    hint = " (for a cut-off use {'threshold': t})" if isinstance(bad, float) else ""
    raise TypeError(f"foreground values must all be ints or all be [R, G, B] triples, got "
                    f"{type(bad).__name__} {bad!r}{hint}; {_FOREGROUND_HELP}")


def _format_values(u: np.ndarray, limit: int = 12) -> str:
    vals = [int(v) if float(v).is_integer() else float(v) for v in u[:limit].tolist()]
    text = str(vals)
    if len(u) > limit:
        text = text[:-1] + f", ... ({len(u)} distinct values, max {u[-1]:g})]"
    return text


def _ambiguous(source: str, what: str, hint: str = "") -> ValueError:
    return ValueError(f"{source} is ambiguous: {what}{hint}; pass foreground=[...] (the values that "
                      f"are foreground) or foreground={{threshold=...}}")


def _binarise_grey(arr: np.ndarray, rule: ForegroundRule, *, source: str, lossy: bool,
                   palette: bool) -> np.ndarray:
    """Single-channel (any dimensionality) ``arr`` -> bool by ``rule``."""
    if rule.kind == "values":
        return np.isin(arr, np.asarray(rule.values))
    if rule.kind == "threshold":
        return arr > rule.threshold
    if rule.kind == "colours":
        raise ValueError(f"{source} is single-channel but {rule.describe()} gives [R, G, B] colours; "
                         "give plain values (foreground=[1]) or a threshold instead")
    u = np.unique(arr)
    if len(u) == 0:
        return np.zeros(arr.shape, dtype=bool)
    if len(u) == 1 and u[0] >= 0:
        return np.full(arr.shape, bool(u[0] > 0))
    if len(u) == 2 and u[0] == 0 and u[1] > 0:
        return arr == u[1]
    integral = np.issubdtype(u.dtype, np.integer) or bool(np.all(u == np.round(u)))
    if lossy and integral and u[0] >= 0 and u[-1] <= 255:
        near0, near255 = u <= JPEG_TOLERANCE, u >= 255 - JPEG_TOLERANCE
        if np.all(near0 | near255) and near255.any():
            return arr > 127
    shown = f"values {_format_values(u)}"
    if not integral:
        hint = " (a soft / probability mask?)"
    elif palette and 255 in u:
        hint = " (255 is often a void / border label)"
    elif u[0] >= 0 and u[-1] < 256 and len(u) <= 32:
        hint = " (a label map, or stray pixels?)"
    else:
        hint = ""
    if lossy and integral:
        hint += (f" (JPEG noise is only accepted when every value is within {JPEG_TOLERANCE} of 0 or "
                 "255 and some value is near 255)")
    raise _ambiguous(source, shown, hint)


def binarise_mask(arr: np.ndarray, foreground: Any = None, *, source: str = "mask",
                  lossy: bool = False, palette: bool = False) -> np.ndarray:
    """A decoded mask ``(H, W)`` / ``(H, W, C)`` (C = 2: grey + alpha, 3: RGB, 4: RGBA) -> bool (H, W).

    ``foreground`` (see :func:`parse_foreground`) says which pixels are foreground. With the
    default ``None`` the rule is automatic but strict; a mask is read only if it is unambiguous:

    * a bool mask;
    * single-channel with distinct values exactly ``{0}``, ``{0, m}`` or ``{m}`` for one ``m > 0``
      (0/1, 0/2, 0/100, 0/255, 0/65535, 0.0/1.0, ...): foreground = ``m``;
    * a JPEG-compressed 0/255 mask (``lossy=True``): every value within :data:`JPEG_TOLERANCE`
      (48) of 0 or 255 and at least one near 255; foreground = ``> 127``.

    Anything else (label maps 0..3, a 0/1 mask with one stray 2, palette masks with a 255 void
    border, soft masks) raises ``ValueError`` naming ``source`` and the values found.

    Channels: an alpha channel is dropped if constant; if the colour is constant and the alpha
    varies, the mask is read from the alpha channel (automatically, in every mode); if both vary,
    the automatic rule refuses and explicit rules use the colour. RGB with R = G = B everywhere is
    greyscale (for ``lossy`` files: channels within 48 of each other, using their mean). Other RGB
    masks are coloured: the automatic rule and plain int values refuse them (the error lists the
    colours found); use ``foreground=[[R, G, B], ...]`` (exact colours) or a threshold (a pixel is
    foreground if any channel exceeds it). NaN / inf raise ``ValueError``.
    """
    rule = parse_foreground(foreground)
    arr = np.asarray(arr)
    if arr.dtype == np.bool_:
        if arr.ndim != 2:
            raise ValueError(f"{source}: a bool mask must be (H, W), got shape {arr.shape}")
        return arr.copy() if rule.kind == "auto" else _binarise_grey(arr.astype(np.uint8), rule,
                                                                     source=source, lossy=False,
                                                                     palette=False)
    if arr.dtype.kind not in "uif":
        raise TypeError(f"{source}: unsupported mask dtype {arr.dtype}")
    if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{source} contains {int((~np.isfinite(arr)).sum())} non-finite value(s) "
                         "(NaN/inf)")
    if arr.ndim == 2:
        return _binarise_grey(arr, rule, source=source, lossy=lossy, palette=palette)
    if arr.ndim != 3 or arr.shape[2] not in (2, 3, 4):
        raise ValueError(f"{source} decoded to shape {arr.shape}, expected (H, W) or (H, W, C) "
                         "with C in 2, 3, 4")
    if arr.shape[2] in (2, 4):
        colour, alpha = arr[..., :-1], arr[..., -1]
        flat = colour.reshape(-1, colour.shape[2])
        colour_const = bool((flat == flat[:1]).all()) if flat.size else True
        if alpha.size == 0 or alpha.min() == alpha.max():
            arr = colour
        elif colour_const:
            return _binarise_grey(alpha, rule, source=f"{source} (alpha channel)", lossy=lossy,
                                  palette=False)
        elif rule.kind == "auto":
            raise _ambiguous(source, "both its colour and its alpha (transparency) vary",
                             " (a coloured overlay?); save it as a single-channel mask, or give an "
                             "explicit rule, which then reads the colour and ignores the alpha")
        else:
            arr = colour
        if arr.shape[2] == 1:
            return _binarise_grey(arr[..., 0], rule, source=source, lossy=lossy, palette=palette)
    rgb = arr
    if rule.kind == "colours":
        wanted = np.asarray(rule.values, dtype=np.int64)
        return (rgb.astype(np.int64)[..., None, :] == wanted).all(-1).any(-1)
    spread = rgb.max(axis=2).astype(np.float64) - rgb.min(axis=2)
    if not spread.size or spread.max() == 0:
        return _binarise_grey(rgb[..., 0], rule, source=source, lossy=lossy, palette=False)
    if lossy and spread.max() <= JPEG_TOLERANCE:
        grey = np.round(rgb.astype(np.float64).mean(axis=2))
        return _binarise_grey(grey, rule, source=source, lossy=lossy, palette=False)
    if rule.kind == "threshold":
        return rgb.max(axis=2) > rule.threshold
    colours = np.unique(rgb.reshape(-1, 3), axis=0)
    shown = ", ".join(str(c) for c in colours[:8].tolist()) + (
        f", ... ({len(colours)} distinct colours)" if len(colours) > 8 else "")
    first = [int(c) for c in colours[-1]]
    if rule.kind == "values":
        raise ValueError(f"{source} is a coloured (RGB) mask, so plain values "
                         f"({rule.describe()}) do not apply; colours found: {shown}. Give the "
                         f"foreground colours, e.g. foreground=[{first}], or a threshold on the "
                         "brightest channel, e.g. foreground={threshold=127}")
    raise ValueError(f"{source} is ambiguous: a coloured (RGB) mask with colours {shown}; pass the "
                     f"foreground colours, e.g. foreground=[{first}], or foreground={{threshold=...}} "
                     "(a pixel is foreground if any channel exceeds it)")


def binarise_values(arr: np.ndarray, foreground: Any = None, *, source: str = "mask") -> np.ndarray:
    """A single-channel mask of any dimensionality (e.g. a 3-D volume) -> bool, by the rules of
    :func:`binarise_mask` for single-channel masks (no colours, no JPEG tolerance)."""
    rule = parse_foreground(foreground)
    arr = np.asarray(arr)
    if arr.dtype == np.bool_:
        return arr.copy() if rule.kind == "auto" else _binarise_grey(
            arr.astype(np.uint8), rule, source=source, lossy=False, palette=False)
    if arr.dtype.kind not in "uif":
        raise TypeError(f"{source}: unsupported mask dtype {arr.dtype}")
    if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{source} contains {int((~np.isfinite(arr)).sum())} non-finite value(s) "
                         "(NaN/inf)")
    return _binarise_grey(arr, rule, source=source, lossy=False, palette=False)


def _mask_pixels(img: Image.Image) -> np.ndarray:
    """A decoded mask image as an array without losing information: indices for palette images,
    native bit depth for 16/32-bit and float images, channels kept (alpha included)."""
    mode = img.mode
    if mode == "1":
        return np.asarray(img, dtype=bool)
    if mode in ("L", "P", "LA", "PA", "RGB", "RGBA") or _high_bit_depth(mode):
        return np.asarray(img)
    if mode in ("La", "RGBa"):
        return np.asarray(img.convert(mode.upper()))
    return np.asarray(img.convert("RGBA" if "A" in mode else "RGB"))


def read_mask_array(path: str | os.PathLike, foreground: Any = None) -> np.ndarray:
    """Decode a mask file to bool ``(H, W)`` at its native size by the ``foreground`` rule.

    Palette masks use their indices, 16-bit and float masks their native values, RGBA masks their
    alpha where it carries the mask; see :func:`binarise_mask` for the rules (JPEG files get the
    JPEG noise tolerance). Unreadable or ambiguous files raise ``ValueError`` naming ``path``.
    """
    path = Path(path)
    rule = parse_foreground(foreground)
    img = _open(path, "mask")
    try:
        arr = _mask_pixels(img)
    except _PIL_ERRORS as exc:
        raise ValueError(f"cannot read mask file {path}: {exc}") from exc
    return binarise_mask(arr, rule, source=f"mask {path}", lossy=img.format in _LOSSY_FORMATS,
                         palette=img.mode in ("P", "PA"))


def resize_mask_array(mask: np.ndarray, size: tuple[int, int] | None) -> torch.Tensor:
    """bool ``(H, W)`` -> bool ``size`` tensor (nearest neighbour; no-op at the same size)."""
    if size is not None and mask.shape != size:
        small = Image.fromarray(mask.astype(np.uint8) * 255)
        mask = np.asarray(small.resize((size[1], size[0]), _RESAMPLING.NEAREST)) > 127
    return torch.from_numpy(np.ascontiguousarray(mask))


def load_mask(path: str | os.PathLike, *, size: tuple[int, int] | None = None,
              foreground: Any = None) -> torch.Tensor:
    """Read a mask as bool ``(H, W)`` by the ``foreground`` rule (:func:`binarise_mask`); resized
    (nearest) to ``size`` (H, W) if given."""
    return resize_mask_array(read_mask_array(path, foreground), check_size(size))


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
    """Strip a trailing image or NIfTI extension (``ISIC_0000000.jpg`` -> ``ISIC_0000000``,
    ``case_01.nii.gz`` -> ``case_01``)."""
    for ext in (".nii.gz", ".nii"):
        if value.lower().endswith(ext) and len(value) > len(ext):
            return value[: -len(ext)]
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
# matching files across folders
# ----------------------------------------------------------------------------------------------
def match_masks(images: dict[str, Path], masks: dict[str, Path], suffixes: Sequence[str], *,
                folder: Path, what: str = "mask") -> tuple[dict[str, Path], list[str], list[Path]]:
    """Match ``<stem><suffix>`` mask files (``masks``: stem -> path) to ``images`` (stem -> path).

    Returns ``(pairs, missing, orphans)``: ``{image stem: mask path}``, the image stems without a
    mask, and the mask files no image claims. An image matching several masks, or a mask matched
    by several images, is a ``ValueError`` naming the files.
    """
    pairs: dict[str, Path] = {}
    missing: list[str] = []
    owner: dict[Path, str] = {}
    for stem in sorted(images):
        found = [masks[stem + s] for s in suffixes if stem + s in masks]
        if not found:
            missing.append(stem)
            continue
        if len(found) > 1:
            raise ValueError(f"image {images[stem]} matches several {what}s in {folder}: "
                             f"{sorted(p.name for p in found)}")
        if found[0] in owner:
            raise ValueError(f"{what} file {found[0]} matches two images, {owner[found[0]]!r} and "
                             f"{stem!r} (suffixes {list(suffixes)}); rename one of them")
        owner[found[0]] = stem
        pairs[stem] = found[0]
    orphans = [p for p in masks.values() if p not in owner]
    return pairs, missing, sorted(orphans)


def check_inside(fine: np.ndarray, coarse: np.ndarray, *, fine_path: Path, coarse_path: Path) -> None:
    """``ValueError`` naming both files and the pixel count unless every fine pixel is coarse."""
    outside = int(np.count_nonzero(fine & ~coarse))
    if outside:
        raise ValueError(f"fine mask {fine_path} is not inside its coarse mask {coarse_path}: "
                         f"{outside} of its {int(np.count_nonzero(fine))} foreground pixels are "
                         "outside the coarse mask (a coarse mask must cover the fine one)")


def check_index(index: Any, n: int) -> int:
    """``index`` as an int in ``[0, n)`` (negative indices count from the end)."""
    try:
        i = operator.index(index)
    except TypeError:
        raise TypeError(f"index must be an int, got {type(index).__name__}") from None
    if not -n <= i < n:
        raise IndexError(f"index {i} out of range for a data set of {n} items")
    return i % n


# ----------------------------------------------------------------------------------------------
# base data set
# ----------------------------------------------------------------------------------------------
class PairedImageMaskDataset(torch.utils.data.Dataset):
    """Image/mask pairs with an image-level label and artefact flags; subclasses fill the lists.

    Items are dicts: ``image`` float32 (3, H, W) in [0, 1], ``fine`` bool (H, W), ``coarse`` bool
    (H, W) (read from ``_coarse_paths`` when a subclass sets them, else only when
    ``coarse_radius`` is set: computed at the output size by :func:`pyunlearn.masks.coarsen`),
    ``has_fine`` bool scalar (always True here), ``label`` int64 scalar, ``artefacts`` float32
    (A,), ``id``. Masks are read by the ``_foreground`` rule (:func:`binarise_mask`).
    """

    _image_paths: list[Path]
    _mask_paths: list[Path]
    _coarse_paths: list[Path] | None = None
    _ids: list[str]
    _labels: list[int]
    _artefacts: list[list[int]]
    _artefact_names: list[str]
    _size: tuple[int, int] | None
    _coarse_radius: int | None
    _coarse_mode: str
    _foreground: ForegroundRule = ForegroundRule("auto")

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

    @property
    def has_fine(self) -> torch.Tensor:
        """bool ``(N,)``: every item has a fine mask here."""
        return torch.ones(len(self), dtype=torch.bool)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = check_index(index, len(self))
        img_path, mask_path = self._image_paths[i], self._mask_paths[i]
        image_arr = read_image_array(img_path)
        mask_arr = read_mask_array(mask_path, self._foreground)
        if mask_arr.shape != image_arr.shape[:2]:
            raise ValueError(f"mask {mask_path} is {mask_arr.shape} (H, W) but image {img_path} "
                             f"is {image_arr.shape[:2]}")
        coarse_arr = None
        if self._coarse_paths is not None:
            coarse_path = self._coarse_paths[i]
            coarse_arr = read_mask_array(coarse_path, self._foreground)
            if coarse_arr.shape != image_arr.shape[:2]:
                raise ValueError(f"coarse mask {coarse_path} is {coarse_arr.shape} (H, W) but image "
                                 f"{img_path} is {image_arr.shape[:2]}")
            check_inside(mask_arr, coarse_arr, fine_path=mask_path, coarse_path=coarse_path)
        image = resize_image_array(image_arr, self._size)
        fine = resize_mask_array(mask_arr, self._size)
        item: dict[str, Any] = {"image": image, "fine": fine}
        if coarse_arr is not None:
            item["coarse"] = resize_mask_array(coarse_arr, self._size)
        elif self._coarse_radius is not None:
            from pyunlearn.masks import coarsen  # lazy: optional at import time

            item["coarse"] = coarsen(fine, radius=self._coarse_radius, mode=self._coarse_mode)
        item["has_fine"] = torch.tensor(True)
        item["label"] = torch.tensor(self._labels[i], dtype=torch.int64)
        item["artefacts"] = torch.tensor(self._artefacts[i], dtype=torch.float32).reshape(-1)
        item["id"] = self._ids[i]
        return item

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n={len(self)}, size={self._size}, "
                f"artefacts={self._artefact_names}, coarse_radius={self._coarse_radius}, "
                f"{self._foreground.describe()})")
