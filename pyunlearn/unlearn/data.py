"""The retain and forget pixel sets of a segmentation data set with a fraction of fine masks."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from .._validation import check_binary_mask, check_same_device, check_same_shape, check_tensor
from ..checkpoint import data_identity

__all__ = ["SegmentationUnlearningData"]


@dataclass
class SegmentationUnlearningData:
    """Pixels as samples.

    Attributes (N images of H x W; for volumes every ``(H, W)`` below reads ``(D, H, W)``, voxels as samples):
        images: (N, C, H, W) float inputs (or (N, C, D, H, W) volumes).
        target: (N, H, W) int64 label of every retain pixel (fine label on fine-labelled images,
            background outside the coarse mask elsewhere).
        retain: (N, H, W) bool, the retain pixels D_r an operator may train on.
        forget: (N, H, W) bool, the known forget pixels D_f (coarse 1, fine 0, on fine-labelled images).
        coarse: (N, H, W) int64 coarse labels the original model was trained on.
        has_fine: (N,) bool, the image has a fine mask.
    """

    images: torch.Tensor
    target: torch.Tensor
    retain: torch.Tensor
    forget: torch.Tensor
    coarse: torch.Tensor
    has_fine: torch.Tensor

    @classmethod
    def from_masks(cls, images: torch.Tensor, coarse: torch.Tensor, fine: torch.Tensor, has_fine: torch.Tensor,
                   *, coarse_background: bool = True) -> "SegmentationUnlearningData":
        """Build the pixel sets from coarse masks, fine masks and which images have a fine mask.

        ``fine`` is only read on images with ``has_fine``. With ``coarse_background`` the pixels
        outside the coarse mask of coarse-only images (certainly background) join the retain set;
        the inside of a coarse mask without a fine one never does.

        Images are ``(N, C, H, W)`` with masks ``(N, H, W)``, or volumes ``(N, C, D, H, W)`` with masks
        ``(N, D, H, W)``.
        """
        for name, t in (("images", images), ("coarse", coarse), ("fine", fine), ("has_fine", has_fine)):
            check_tensor(t, name)
        if images.dim() not in (4, 5):
            raise ValueError(f"images must be (N, C, H, W) or (N, C, D, H, W), got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point, got {images.dtype}")
        check_same_device({"images": images, "coarse": coarse, "fine": fine, "has_fine": has_fine})
        n, spatial = images.shape[0], tuple(images.shape[2:])
        if tuple(coarse.shape) != (n, *spatial):
            dims = "(N, H, W)" if len(spatial) == 2 else "(N, D, H, W)"
            raise ValueError(f"coarse must be {dims} = {(n, *spatial)} to match images, got {tuple(coarse.shape)}")
        check_same_shape(coarse, fine, "coarse", "fine")
        if tuple(has_fine.shape) != (n,):
            raise ValueError(f"has_fine must be ({n},), got {tuple(has_fine.shape)}")
        check_binary_mask(has_fine, "has_fine")
        has_fine = has_fine.bool()
        coarse_b = coarse.bool() if coarse.dtype == torch.bool else (check_binary_mask(coarse, "coarse") or coarse.bool())
        fine_b = fine.bool() if fine.dtype == torch.bool else (check_binary_mask(fine, "fine") or fine.bool())
        fine_img = _per_image(has_fine, coarse_b)
        outside = fine_b & ~coarse_b & fine_img
        if outside.any():
            where = outside.flatten(1).any(dim=1).nonzero().flatten()
            raise ValueError(f"fine mask is not inside the coarse mask: {int(outside.sum())} pixels in {where.numel()} "
                             f"image(s) with has_fine, first at image index {int(where[0])}")
        forget = coarse_b & ~fine_b & fine_img
        retain = fine_img.expand_as(coarse_b).clone()
        if coarse_background:
            retain |= ~coarse_b
        target = torch.where(fine_img, fine_b, coarse_b).long()
        return cls(images=images, target=target, retain=retain, forget=forget, coarse=coarse_b.long(),
                   has_fine=has_fine)

    def __len__(self) -> int:
        return self.images.shape[0]

    def check_retain_only(self) -> None:
        """Refuse a retain set holding pixels a certified operator must not train on: a known forget
        pixel with a non-background label, or the inside of a coarse mask on an image without a fine one."""
        forget_labelled = self.retain & self.forget & (self.target != 0)
        if forget_labelled.any():
            raise ValueError(f"the retain set holds {int(forget_labelled.sum())} forget pixel(s) with a foreground "
                             "label; forget pixels may only be retained relabelled to background (0)")
        coarse_inside = self.retain & ~_per_image(self.has_fine, self.coarse) & self.coarse.bool()
        if coarse_inside.any():
            raise ValueError(f"the retain set holds {int(coarse_inside.sum())} pixel(s) inside the coarse mask of "
                             "images without a fine mask: their labels are unknown and may be shortcut pixels")

    @property
    def relabelled_target(self) -> torch.Tensor:
        """Coarse labels with the known forget pixels relabelled to background (fine labels where known)."""
        return torch.where(_per_image(self.has_fine, self.target), self.target, self.coarse)

    # ------------------------------------------------------------------ what the operators read
    @property
    def spatial(self) -> tuple[int, ...]:
        """``(H, W)`` or ``(D, H, W)``."""
        return tuple(self.target.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def image_indices(self, pixels: str = "retain") -> torch.Tensor:
        """Indices of the images with at least one ``"retain"`` / ``"forget"`` pixel, or of ``"all"`` images."""
        if pixels == "all":
            return torch.arange(len(self), device=self.device)
        mask = {"retain": self.retain, "forget": self.forget}[pixels]
        return mask.flatten(1).any(dim=1).nonzero().flatten()

    def batch(self, index: torch.Tensor) -> "SegmentationUnlearningData":
        """The images ``index`` (a 1-D index tensor) as a data set of their own."""
        return SegmentationUnlearningData(images=self.images[index], target=self.target[index],
                                          retain=self.retain[index], forget=self.forget[index],
                                          coarse=self.coarse[index], has_fine=self.has_fine[index])

    def batches(self, indices: Iterable[torch.Tensor]) -> Iterator["SegmentationUnlearningData"]:
        """:meth:`batch` of each index tensor in turn."""
        return (self.batch(index) for index in indices)

    def identity(self, key: bytes) -> dict:
        """Shapes and a keyed digest of every field (a checkpoint's data identity)."""
        return data_identity({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, key)


def _per_image(flags: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(N,)`` per-image flags shaped to broadcast against ``(N, *spatial)`` masks, 2-D or 3-D."""
    return flags.reshape(-1, *(1,) * (like.dim() - 1))
