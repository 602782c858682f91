"""Segmentation unlearning data read from a ``torch.utils.data.Dataset`` a batch at a time.

:class:`StreamingSegmentationData` is the counterpart of :class:`SegmentationUnlearningData` for data sets
larger than memory: it holds only a few bytes per image (which images have a fine mask, retain or forget
pixels, and a digest of each item), and every operator reads its batches through a ``DataLoader``.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Iterator
from typing import Any, Optional

import torch

from ..checkpoint import data_identity
from .data import SegmentationUnlearningData

__all__ = ["StreamingSegmentationData"]

#: The keys every item must have (the loaders of :mod:`pyunlearn.data` give more; those are ignored).
ITEM_KEYS = ("image", "coarse", "fine", "has_fine")


def _describe(index: int, item: Any) -> str:
    name = item.get("id") if isinstance(item, dict) else None
    return f"item {index}" + (f" (id {name!r})" if name is not None else "")


def _item_tensors(index: int, item: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(image, coarse, fine, has_fine)`` of one item, checked; errors name the item."""
    where = _describe(index, item)
    if not isinstance(item, dict):
        raise TypeError(f"{where}: items must be dicts with keys {list(ITEM_KEYS)}, got {type(item).__name__}")
    missing = [k for k in ITEM_KEYS if k not in item]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; items need {list(ITEM_KEYS)} (fine may be all False "
                         "when has_fine is False)")
    image, coarse, fine = item["image"], item["coarse"], item["fine"]
    has_fine = torch.as_tensor(item["has_fine"])
    for name, t in (("image", image), ("coarse", coarse), ("fine", fine)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name!r} must be a torch.Tensor, got {type(t).__name__}")
    if image.dim() not in (3, 4) or not image.is_floating_point():
        raise ValueError(f"{where}: 'image' must be a float (C, H, W) or (C, D, H, W) tensor, got shape "
                         f"{tuple(image.shape)} {image.dtype}")
    if not bool(torch.isfinite(image).all()):
        raise ValueError(f"{where}: 'image' holds NaN or Inf values")
    spatial = tuple(image.shape[1:])
    for name, t in (("coarse", coarse), ("fine", fine)):
        if tuple(t.shape) != spatial:
            raise ValueError(f"{where}: {name!r} has shape {tuple(t.shape)}, the image {tuple(image.shape)} needs "
                             f"{spatial}")
    if has_fine.numel() != 1:
        raise ValueError(f"{where}: 'has_fine' must be one bool, got shape {tuple(has_fine.shape)}")
    return image, coarse, fine, has_fine.reshape(()).bool()


def _digest(image, coarse, fine, has_fine) -> bytes:
    """SHA-256 of an item's contents (held in memory only; checkpoints store an HMAC of all of them)."""
    h = hashlib.sha256()
    for t in (image, coarse.bool(), fine.bool() & has_fine, has_fine):
        t = t.detach().cpu().contiguous()
        h.update(repr((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.numpy().tobytes())
    return h.digest()


class _Collate:
    """Items -> one :class:`SegmentationUnlearningData` batch, with the item digests (runs in loader workers)."""

    def __init__(self, coarse_background: bool):
        self.coarse_background = coarse_background

    def __call__(self, pairs: list[tuple[int, Any]]):
        indices, parts, digests = [], [], []
        for index, item in pairs:
            tensors = _item_tensors(index, item)
            indices.append(index)
            parts.append(tensors)
            digests.append(_digest(*tensors))
        shapes = {tuple(p[0].shape) for p in parts}
        if len(shapes) > 1:
            raise ValueError(f"items {indices} have images of different shapes {sorted(shapes)}; give the loader a "
                             "fixed size")
        images, coarse, fine, has_fine = (torch.stack(list(ts)) for ts in zip(*parts))
        try:
            batch = SegmentationUnlearningData.from_masks(images, coarse, fine, has_fine,
                                                          coarse_background=self.coarse_background)
        except ValueError as exc:
            bad = []
            for index, (image, c, f, hf) in zip(indices, parts):
                try:
                    SegmentationUnlearningData.from_masks(image[None], c[None], f[None], hf[None])
                except ValueError:
                    bad.append(index)
            raise ValueError(f"item {bad[0] if bad else indices[0]}: {exc}") from exc
        return torch.tensor(indices), batch, digests


class _Indexed(torch.utils.data.Dataset):
    """``dataset[i]`` as ``(i, item)``, so the collate function can name the item."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return index, self.dataset[index]


class StreamingSegmentationData:
    """Pixels as samples, read from ``dataset`` a batch at a time (memory bounded whatever its size).

    ``dataset[i]`` is a dict with ``"image"`` (float (C, H, W), or (C, D, H, W) for volumes), ``"coarse"`` and
    ``"fine"`` masks of the image's spatial shape (bool or 0/1; ``fine`` is read only when ``"has_fine"``), and
    ``"has_fine"`` (a bool); other keys (``label``, ``artefacts``, ``id``) are ignored, except that ``id`` names
    an item in errors. The loaders of :mod:`pyunlearn.data` give such items. The pixel sets are those of
    :meth:`SegmentationUnlearningData.from_masks` (``coarse_background`` as there), computed per batch.

    Construction reads every item once (``num_workers`` loader processes), checks it (shapes, binary masks,
    fine inside coarse, finite images; errors name the item) and keeps, per image, whether it has a fine mask,
    retain and forget pixels, and a SHA-256 of its contents. Every later read is checked against that digest,
    so a data set that changes between reads (random augmentation) is an error, not another data set.

    ``device``: where batches go. ``feature_cache`` (for a model with a frozen encoder, e.g.
    :class:`pyunlearn.models.EncoderDecoder` with a public encoder): ``"auto"`` keeps the encoder features in
    memory when they take at most ``feature_cache_bytes``, else computes them per batch; ``"memory"``,
    ``"disk"`` (a private temporary folder, deleted when the operator ends) or ``"none"`` force a choice.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, *, coarse_background: bool = True, num_workers: int = 0,
                 device: str | torch.device = "cpu", scan_batch_size: int = 32, feature_cache: str = "auto",
                 feature_cache_bytes: int = 1 << 30):
        from .segmentation import check_feature_cache  # the operators own the cache

        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"dataset must be a map-style torch Dataset (__getitem__ and __len__), got "
                            f"{type(dataset).__name__}")
        for name, value, low in (("num_workers", num_workers, 0), ("scan_batch_size", scan_batch_size, 1),
                                 ("feature_cache_bytes", feature_cache_bytes, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.feature_cache = check_feature_cache(feature_cache)
        self.feature_cache_bytes = feature_cache_bytes
        self.dataset = dataset
        self.num_workers = num_workers
        self.coarse_background = bool(coarse_background)
        self._device = torch.device(device)
        n = len(dataset)
        if n == 0:
            raise ValueError("the data set is empty")
        self._collate = _Collate(self.coarse_background)
        self.has_fine = torch.zeros(n, dtype=torch.bool)
        self._has_retain = torch.zeros(n, dtype=torch.bool)
        self._has_forget = torch.zeros(n, dtype=torch.bool)
        self._digests: list[Optional[bytes]] = [None] * n
        self._shape: Optional[tuple[int, ...]] = None
        chunks = [list(range(i, min(i + scan_batch_size, n))) for i in range(0, n, scan_batch_size)]
        for index, batch, digests in self._load(chunks, check=False):
            shape = tuple(batch.images.shape[1:])
            if self._shape is None:
                self._shape = shape
            elif shape != self._shape:
                raise ValueError(f"item {int(index[0])} has an image of shape {shape}, item 0 {self._shape}; give "
                                 "the loader a fixed size")
            self.has_fine[index] = batch.has_fine.cpu()
            self._has_retain[index] = batch.retain.flatten(1).any(dim=1).cpu()
            self._has_forget[index] = batch.forget.flatten(1).any(dim=1).cpu()
            for i, d in zip(index.tolist(), digests):
                self._digests[i] = d

    def _load(self, batches: list[list[int]], *, check: bool = True):
        loader = torch.utils.data.DataLoader(_Indexed(self.dataset), batch_sampler=batches,
                                             num_workers=self.num_workers, collate_fn=self._collate)
        for index, batch, digests in loader:
            if check:
                for i, d in zip(index.tolist(), digests):
                    if d != self._digests[i]:
                        raise ValueError(f"item {i} differs from when it was first read (a Dataset with random "
                                         "augmentation?); the certified operators need a fixed data set")
            yield index, batch, digests

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n={len(self)}, shape={self._shape}, has_fine={int(self.has_fine.sum())}, "
                f"dataset={type(self.dataset).__name__})")

    @property
    def image_shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` or ``(C, D, H, W)`` of every image."""
        return self._shape

    @property
    def spatial(self) -> tuple[int, ...]:
        return self._shape[1:]

    @property
    def device(self) -> torch.device:
        return self._device

    def image_indices(self, pixels: str = "retain") -> torch.Tensor:
        """Indices of the images with at least one ``"retain"`` / ``"forget"`` pixel, or of ``"all"`` images."""
        if pixels == "all":
            return torch.arange(len(self))
        return {"retain": self._has_retain, "forget": self._has_forget}[pixels].nonzero().flatten()

    def batches(self, indices: Iterable[torch.Tensor]) -> Iterator[SegmentationUnlearningData]:
        """The batches of images ``indices`` (1-D index tensors), in order, read through a ``DataLoader``."""
        lists = [[int(i) for i in index] for index in indices]
        if not lists:
            return
        for _, batch, _ in self._load(lists):
            yield _to(batch, self._device)

    def batch(self, index: torch.Tensor) -> SegmentationUnlearningData:
        """The images ``index`` as one in-memory :class:`SegmentationUnlearningData`."""
        return next(iter(self.batches([index])))

    def check_retain_only(self) -> None:
        """Nothing to check: the pixel sets are built here, by :meth:`SegmentationUnlearningData.from_masks`."""

    def identity(self, key: bytes) -> dict:
        """The number and shape of the images and a keyed digest of every item's contents (in order)."""
        digests = torch.frombuffer(bytearray(b"".join(self._digests)), dtype=torch.uint8)
        return {"images": [len(self), *self._shape], **data_identity({"item_digests": digests}, key)}


def _to(batch: SegmentationUnlearningData, device: torch.device) -> SegmentationUnlearningData:
    if batch.images.device == device:
        return batch
    return SegmentationUnlearningData(**{f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)})
