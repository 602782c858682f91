"""Coarse masks and the unlearning isomorphism: refining a coarse mask deletes pixels from the data.

With pixels as samples, the forget set of an image is ``coarse & ~fine`` (the dilation artefacts) and
the retain set is everything else.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validation import check_binary_mask, check_same_shape

__all__ = ["coarsen", "forget_retain"]


def _as_bool(mask: torch.Tensor, name: str) -> torch.Tensor:
    check_binary_mask(mask, name)
    if mask.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dims (..., H, W), got shape {tuple(mask.shape)}")
    return mask.bool()


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation by a disk of ``radius`` pixels (Euclidean), shape-preserving."""
    if radius == 0:
        return mask.clone()
    offsets = torch.arange(-radius, radius + 1, device=mask.device)
    disk = (offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius**2
    kernel = disk.to(torch.float32)[None, None]
    flat = mask.reshape(-1, 1, *mask.shape[-2:]).to(torch.float32)
    hit = F.conv2d(flat, kernel, padding=radius) > 0.5
    return hit.reshape(mask.shape)


def _bbox(mask: torch.Tensor, margin: int) -> torch.Tensor:
    """Filled axis-aligned bounding box of each (H, W) mask, grown by ``margin`` pixels."""
    h, w = mask.shape[-2:]
    flat = mask.reshape(-1, h, w)
    rows = flat.any(dim=2)  # (M, H)
    cols = flat.any(dim=1)  # (M, W)
    ar_h = torch.arange(h, device=mask.device)
    ar_w = torch.arange(w, device=mask.device)
    big = max(h, w) + 1
    top = torch.where(rows, ar_h, big).amin(dim=1) - margin
    bottom = torch.where(rows, ar_h, -1).amax(dim=1) + margin
    left = torch.where(cols, ar_w, big).amin(dim=1) - margin
    right = torch.where(cols, ar_w, -1).amax(dim=1) + margin
    inside_r = (ar_h[None] >= top[:, None]) & (ar_h[None] <= bottom[:, None])
    inside_c = (ar_w[None] >= left[:, None]) & (ar_w[None] <= right[:, None])
    box = inside_r[:, :, None] & inside_c[:, None, :] & rows.any(dim=1)[:, None, None]
    return box.reshape(mask.shape)


def coarsen(fine: torch.Tensor, *, radius: int | None = None, mode: str = "dilate") -> torch.Tensor:
    """Coarse annotation of a fine binary mask ``(..., H, W)``.

    ``mode="dilate"``: dilation by a disk of ``radius`` pixels (default 3).
    ``mode="bbox"``: the filled bounding box, grown by ``radius`` pixels (default 0).
    Empty masks stay empty. The result always contains ``fine``.
    """
    fine = _as_bool(fine, "fine")
    if mode not in ("dilate", "bbox"):
        raise ValueError(f"mode must be 'dilate' or 'bbox', got {mode!r}")
    if radius is None:
        radius = 3 if mode == "dilate" else 0
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise ValueError(f"radius must be a non-negative int, got {radius!r}")
    return _dilate(fine, radius) if mode == "dilate" else _bbox(fine, radius)


def forget_retain(coarse: torch.Tensor, fine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the pixels of coarse-labelled images into the forget set ``coarse & ~fine`` and the rest.

    Returns ``(forget, retain)``, bool masks with ``forget | retain`` everything and
    ``forget & retain`` nothing. Raises if ``fine`` is not inside ``coarse``.
    """
    coarse = _as_bool(coarse, "coarse")
    fine = _as_bool(fine, "fine")
    check_same_shape(coarse, fine, "coarse", "fine")
    outside = fine & ~coarse
    if outside.any():
        where = outside.reshape(-1, *outside.shape[-2:]).flatten(1).any(dim=1).nonzero().flatten()
        raise ValueError(
            f"fine mask is not inside the coarse mask: {int(outside.sum())} pixels in {where.numel()} "
            f"image(s), first at flat image index {int(where[0])}"
        )
    forget = coarse & ~fine
    return forget, ~forget
