"""Synthetic dermoscopy-like images with a controllable shortcut.

Each image holds one lesion on skin. The diagnosis (label 1 = "malignant") makes the lesion larger
on average, so the image score "mean foreground probability" is genuinely predictive. With a
probability that depends on the label (``correlation``), an artefact (ruler, ink mark, gel bubble)
is drawn touching the lesion. The coarse annotation outlines the lesion *together with* the touching
artefact and dilates it by ``dilation_radius`` (what a quick annotator draws), so a model trained on
coarse masks learns "artefact => lesion": a shortcut that inflates the score of artefact images.

``correlation`` = P(artefact | label 1) - P(artefact | label 0), centred on 1/2; 0 gives a balanced
test set where every (artefact, label) subgroup is equally likely.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..masks import coarsen

__all__ = ["SyntheticShortcuts", "ARTEFACT_KINDS"]

ARTEFACT_KINDS = ("ruler", "ink", "bubble")
_ARTEFACT_COLOURS = {
    "ruler": (0.15, 0.15, 0.17),
    "ink": (0.45, 0.15, 0.65),
    "bubble": (0.97, 0.97, 0.95),
}


@dataclass
class _Sample:
    image: torch.Tensor
    fine: torch.Tensor
    coarse: torch.Tensor
    label: int
    artefact_map: torch.Tensor
    artefacts: torch.Tensor


class SyntheticShortcuts(torch.utils.data.Dataset):
    """A reproducible synthetic segmentation data set with a pixel-level shortcut.

    Items are dicts: ``image`` (3, S, S) float32 in [0, 1]; ``fine``, ``coarse``, ``artefact_map``
    (S, S) bool; ``label`` int64 scalar; ``artefacts`` (A,) float32 image-level flags, one per kind;
    ``has_fine`` bool (the image belongs to the ``fine_fraction`` with a fine mask available).
    ``tensors()`` returns everything stacked.
    """

    def __init__(
        self,
        count: int = 512,
        *,
        image_size: int = 32,
        artefact_kinds: Sequence[str] = ARTEFACT_KINDS,
        correlation: float = 0.8,
        dilation_radius: int = 2,
        fine_fraction: float = 0.1,
        seed: int = 0,
    ):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive int, got {count!r}")
        if not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
        unknown = [k for k in artefact_kinds if k not in ARTEFACT_KINDS]
        if unknown or not artefact_kinds:
            raise ValueError(f"artefact_kinds must be a non-empty subset of {ARTEFACT_KINDS}, got {list(artefact_kinds)}")
        if not -1.0 <= correlation <= 1.0:
            raise ValueError(f"correlation must be in [-1, 1], got {correlation!r}")
        if isinstance(dilation_radius, bool) or not isinstance(dilation_radius, int) or dilation_radius < 0:
            raise ValueError(f"dilation_radius must be a non-negative int, got {dilation_radius!r}")
        if not 0.0 <= fine_fraction <= 1.0:
            raise ValueError(f"fine_fraction must be in [0, 1], got {fine_fraction!r}")
        self.count = count
        self.image_size = image_size
        self.artefact_kinds = tuple(artefact_kinds)
        self.correlation = float(correlation)
        self.dilation_radius = dilation_radius
        self.fine_fraction = float(fine_fraction)
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        samples = [self._draw(gen) for _ in range(count)]
        self.images = torch.stack([s.image for s in samples])
        self.fine = torch.stack([s.fine for s in samples])
        self.artefact_map = torch.stack([s.artefact_map for s in samples])
        self.coarse = torch.stack([s.coarse for s in samples])
        self.labels = torch.tensor([s.label for s in samples], dtype=torch.int64)
        self.artefacts = torch.stack([s.artefacts for s in samples])
        n_fine = round(self.fine_fraction * count)
        order = torch.randperm(count, generator=gen)
        self.has_fine = torch.zeros(count, dtype=torch.bool)
        self.has_fine[order[:n_fine]] = True

    # ------------------------------------------------------------------ drawing
    @staticmethod
    def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    def _artefact(self, gen, kind, xx, yy, theta, dist, cx, cy, radius, wobble, scale) -> torch.Tensor:
        """Pixel map of one artefact of ``kind`` touching the lesion from a random direction."""
        u = self._uniform
        direction = u(gen, 0, 2 * math.pi)
        edge = radius * 1.1 + 1.0  # just outside the lesion outline
        ex, ey = cx + edge * math.cos(direction), cy + edge * math.sin(direction)
        if kind == "ruler":  # a dark bar running outward from the lesion, with tick marks
            length = scale * u(gen, 8.0, 12.0)
            along = (xx - ex) * math.cos(direction) + (yy - ey) * math.sin(direction)
            across = -(xx - ex) * math.sin(direction) + (yy - ey) * math.cos(direction)
            bar = (along >= 0) & (along <= length) & (across.abs() <= 1.0 * scale)
            ticks = (along >= 0) & (along <= length) & (across > 0) & (across <= 2.6 * scale) & (
                torch.remainder(along, 3.0 * scale) < 1.0)
            return bar | ticks
        if kind == "ink":  # a marker arc hugging the lesion
            span = u(gen, 0.5, 0.9) * math.pi
            delta = torch.remainder(theta - direction + math.pi, 2 * math.pi) - math.pi
            ring = (dist - radius * wobble - 2.0 * scale).abs() <= 1.0 * scale
            return ring & (delta.abs() <= span / 2)
        # gel bubble: a bright ring touching the lesion
        r_b = scale * u(gen, 3.0, 4.2)
        bx, by = cx + (edge + r_b) * math.cos(direction), cy + (edge + r_b) * math.sin(direction)
        d_b = torch.sqrt((yy - by) ** 2 + (xx - bx) ** 2)
        return (d_b <= r_b) & (d_b >= r_b - 1.3 * scale)

    def _draw(self, gen: torch.Generator) -> _Sample:
        s = self.image_size
        u = self._uniform
        label = int(torch.rand((), generator=gen) < 0.5)
        p_artefact = 0.5 + (self.correlation / 2 if label else -self.correlation / 2)
        has_artefact = bool(torch.rand((), generator=gen) < p_artefact)

        yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32),
                                indexing="ij")
        # Skin: tone, smooth shading, pixel noise.
        tone = torch.tensor([0.86, 0.66, 0.56]) + 0.05 * (torch.rand(3, generator=gen) - 0.5)
        angle = u(gen, 0, 2 * math.pi)
        shade = 0.06 * ((xx * math.cos(angle) + yy * math.sin(angle)) / s - 0.5)
        image = tone[:, None, None] + shade[None] + 0.025 * torch.randn(3, s, s, generator=gen)

        # Lesion: an irregular blob whose size depends on the label.
        scale = s / 32.0
        radius = scale * (u(gen, 5.0, 8.0) if label else u(gen, 3.8, 6.6))
        cy, cx = u(gen, 0.38, 0.62) * s, u(gen, 0.38, 0.62) * s
        theta = torch.atan2(yy - cy, xx - cx)
        dist = torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        wobble = 1.0
        for harmonic in (2, 3, 5):
            wobble = wobble + u(gen, 0.0, 0.12) * torch.cos(harmonic * theta + u(gen, 0, 2 * math.pi))
        fine = dist <= radius * wobble
        lesion_colour = torch.tensor([0.42, 0.26, 0.19]) + 0.06 * (torch.rand(3, generator=gen) - 0.5)
        texture = 0.04 * torch.randn(3, s, s, generator=gen)
        image = torch.where(fine[None], lesion_colour[:, None, None] + texture, image)

        artefact_map = torch.zeros(s, s, dtype=torch.bool)
        flags = torch.zeros(len(self.artefact_kinds))
        if has_artefact:
            k = int(torch.randint(len(self.artefact_kinds), (), generator=gen))
            kind = self.artefact_kinds[k]
            # Redraw the direction until the artefact lands (at least partly) inside the image.
            for _ in range(16):
                artefact_map = self._artefact(gen, kind, xx, yy, theta, dist, cx, cy, radius, wobble, scale) & ~fine
                if artefact_map.any():
                    break
            if artefact_map.any():
                flags[k] = 1.0
                colour = torch.tensor(_ARTEFACT_COLOURS[kind])
                image = torch.where(artefact_map[None],
                                    colour[:, None, None] + 0.02 * torch.randn(3, s, s, generator=gen), image)
        image = image.clamp(0.0, 1.0)
        # The quick annotator outlines lesion and touching artefact together, then dilates.
        coarse = coarsen(fine | artefact_map, radius=self.dilation_radius)
        return _Sample(image, fine, coarse, label, artefact_map, flags)

    # ------------------------------------------------------------------ dataset protocol
    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        return {
            "image": self.images[index],
            "fine": self.fine[index],
            "coarse": self.coarse[index],
            "label": self.labels[index],
            "artefact_map": self.artefact_map[index],
            "artefacts": self.artefacts[index],
            "has_fine": self.has_fine[index],
        }

    @property
    def artefact_names(self) -> list[str]:
        return list(self.artefact_kinds)

    @property
    def has_artefact(self) -> torch.Tensor:
        """(N,) bool: the image shows any artefact."""
        return self.artefacts.sum(dim=1) > 0

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"image": self.images, "fine": self.fine, "coarse": self.coarse, "label": self.labels,
                "artefact_map": self.artefact_map, "artefacts": self.artefacts, "has_fine": self.has_fine}
