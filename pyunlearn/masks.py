"""Coarse masks and the unlearning isomorphism: refining a coarse mask deletes pixels from the data.

With pixels as samples, the forget set of an image is ``coarse & ~fine`` (the dilation artefacts) and
the retain set is everything else.

Masks are ``(..., H, W)`` images by default; ``spatial_dims=3`` reads them as ``(..., D, H, W)`` volumes
(voxels as samples), dilated by a ball and boxed along all three axes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validation import check_binary_mask, check_same_shape

__all__ = ["coarsen", "dilate", "forget_retain"]

_AXES = {2: "(..., H, W)", 3: "(..., D, H, W)"}


def _check_spatial_dims(spatial_dims) -> int:
    if isinstance(spatial_dims, bool) or spatial_dims not in _AXES:
        raise ValueError(f"spatial_dims must be 2 (images) or 3 (volumes), got {spatial_dims!r}")
    return spatial_dims


def _as_bool(mask: torch.Tensor, name: str, spatial_dims: int = 2) -> torch.Tensor:
    check_binary_mask(mask, name)
    if mask.dim() < spatial_dims:
        raise ValueError(f"{name} must have at least {spatial_dims} dims {_AXES[spatial_dims]}, got shape "
                         f"{tuple(mask.shape)}")
    return mask.bool()


def _check_radius(radius) -> int:
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise ValueError(f"radius must be a non-negative int, got {radius!r}")
    return radius


def _dilate(mask: torch.Tensor, radius: int, spatial_dims: int = 2) -> torch.Tensor:
    """Binary dilation by a disk (ball for ``spatial_dims=3``) of ``radius`` pixels (Euclidean) over the last
    ``spatial_dims`` dims, shape-preserving."""
    if radius == 0:
        return mask.clone()
    offsets = torch.arange(-radius, radius + 1, device=mask.device)
    grids = torch.meshgrid(*([offsets] * spatial_dims), indexing="ij")
    ball = sum(g ** 2 for g in grids) <= radius**2
    kernel = ball.to(torch.float32)[None, None]
    flat = mask.reshape(-1, 1, *mask.shape[mask.dim() - spatial_dims:]).to(torch.float32)
    conv = F.conv2d if spatial_dims == 2 else F.conv3d
    hit = conv(flat, kernel, padding=radius) > 0.5
    return hit.reshape(mask.shape)


def _bbox(mask: torch.Tensor, margin: int, spatial_dims: int = 2) -> torch.Tensor:
    """Filled axis-aligned bounding box of each (H, W) mask (each (D, H, W) volume for ``spatial_dims=3``),
    grown by ``margin`` pixels along every axis."""
    spatial = tuple(mask.shape[mask.dim() - spatial_dims:])
    flat = mask.reshape(-1, *spatial)
    box = flat.flatten(1).any(dim=1).reshape(-1, *(1,) * spatial_dims)  # an empty mask stays empty
    for axis, size in enumerate(spatial):
        others = tuple(1 + d for d in range(spatial_dims) if d != axis)
        hit = flat.any(dim=others) if others else flat  # (M, size): the axis' occupied positions
        ar = torch.arange(size, device=mask.device)
        lo = torch.where(hit, ar, size + 1).amin(dim=1) - margin
        hi = torch.where(hit, ar, -1).amax(dim=1) + margin
        inside = (ar[None] >= lo[:, None]) & (ar[None] <= hi[:, None])  # (M, size)
        shape = [inside.shape[0]] + [1] * spatial_dims
        shape[1 + axis] = size
        box = box & inside.reshape(shape)
    return box.reshape(mask.shape)


def dilate(mask: torch.Tensor, radius: int = 3, *, spatial_dims: int = 2) -> torch.Tensor:
    """Binary dilation of ``mask`` ``(..., H, W)`` by a Euclidean disk of ``radius`` pixels, or of ``(..., D, H,
    W)`` volumes by a ball of ``radius`` voxels with ``spatial_dims=3``; shape-preserving, a bool tensor.
    ``coarsen(fine, radius=r)`` is ``dilate(fine, r)``."""
    spatial_dims = _check_spatial_dims(spatial_dims)
    return _dilate(_as_bool(mask, "mask", spatial_dims), _check_radius(radius), spatial_dims)


def coarsen(fine: torch.Tensor, *, radius: int | None = None, mode: str = "dilate",
            spatial_dims: int = 2) -> torch.Tensor:
    """Coarse annotation of a fine binary mask ``(..., H, W)`` (``(..., D, H, W)`` with ``spatial_dims=3``).

    ``mode="dilate"``: dilation by a disk (a ball in 3-D) of ``radius`` pixels (default 3).
    ``mode="bbox"``: the filled bounding box (box in 3-D), grown by ``radius`` pixels (default 0).
    Empty masks stay empty. The result always contains ``fine``.
    """
    spatial_dims = _check_spatial_dims(spatial_dims)
    fine = _as_bool(fine, "fine", spatial_dims)
    if mode not in ("dilate", "bbox"):
        raise ValueError(f"mode must be 'dilate' or 'bbox', got {mode!r}")
    if radius is None:
        radius = 3 if mode == "dilate" else 0
    radius = _check_radius(radius)
    return _dilate(fine, radius, spatial_dims) if mode == "dilate" else _bbox(fine, radius, spatial_dims)


def forget_retain(coarse: torch.Tensor, fine: torch.Tensor, *,
                  spatial_dims: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the pixels of coarse-labelled images into the forget set ``coarse & ~fine`` and the rest.

    Returns ``(forget, retain)``, bool masks with ``forget | retain`` everything and
    ``forget & retain`` nothing. Raises if ``fine`` is not inside ``coarse``. Elementwise, so any shape works;
    ``spatial_dims=3`` (volumes ``(..., D, H, W)``) only makes the error name the offending volume.
    """
    spatial_dims = _check_spatial_dims(spatial_dims)
    coarse = _as_bool(coarse, "coarse", spatial_dims)
    fine = _as_bool(fine, "fine", spatial_dims)
    check_same_shape(coarse, fine, "coarse", "fine")
    outside = fine & ~coarse
    if outside.any():
        unit = "image" if spatial_dims == 2 else "volume"
        where = outside.reshape(-1, *outside.shape[outside.dim() - spatial_dims:]).flatten(1).any(dim=1)
        where = where.nonzero().flatten()
        raise ValueError(
            f"fine mask is not inside the coarse mask: {int(outside.sum())} pixels in {where.numel()} "
            f"{unit}(s), first at flat {unit} index {int(where[0])}"
        )
    forget = coarse & ~fine
    return forget, ~forget
