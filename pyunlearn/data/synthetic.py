"""Synthetic dermoscopy-like images with a controllable shortcut.

Each image holds one lesion on skin. The diagnosis (label 1 = "malignant") makes the lesion larger
on average, so the image score "mean foreground probability" is genuinely predictive. With a
probability that depends on the label (``correlation``), an artefact is drawn touching the lesion.
The coarse annotation outlines the lesion *together with* the touching artefact and dilates it by
``dilation_radius`` (what a quick annotator draws), so a model trained on coarse masks learns
"artefact => lesion": a shortcut that inflates the score of artefact images.

``correlation`` = P(artefact | label 1) - P(artefact | label 0), centred on 1/2; 0 gives a balanced
test set where every (artefact, label) subgroup is equally likely.

Two generators (``difficulty``):

* ``"easy"``: the original benchmark, kept bit for bit: one uniform brown disc-like lesion on
  near-constant light skin, three artefact kinds of fixed colour (ruler, ink, bubble). A dozen fine
  masks teach a decoder everything, so it cannot tell retraining from the oracle.
* ``"hard"`` (default): a dermoscopy-like generator designed at 64 x 64 (every length scales with
  ``image_size / 64``): skin tones from very light to dark with blotches, shading, freckles and sensor
  noise; lesions of four types (``LESION_TYPES``) with irregular, sometimes lobed outlines, soft
  low-contrast borders, variegated colour, pigment network and globules, and a contrast that varies
  from faint to strong; six artefact kinds (``HARD_ARTEFACT_KINDS``) of varied appearance and
  placement: ruler marks, ink marks (arcs, dots, strokes), gel bubbles, dark corners (the vignette of
  the dermatoscope reaching the lesion), patches (stickers, plasters, colour-calibration squares) and
  hair strands crossing the lesion. Several artefacts look like pigment (dark hair, dark corners,
  brown patches, dark ink), so telling them from the lesion takes more than a dozen examples.

``domain`` selects the population (hard generator): ``"private"`` (light to medium skin, mostly nevi
and melanoma-like lesions, all six artefact kinds) or ``"public"`` (medium to dark skin, mostly
seborrheic-keratosis-like and pink lesions, and curated images whose only artefacts are gel bubbles,
``PUBLIC_ARTEFACT_KINDS``): the public encoder of the demo is trained on a shifted distribution, good
but not perfect for the private task, and has never been taught to ignore the private artefacts, so
the private fine masks are what teaches a decoder that (``artefact_kinds`` overrides the public mix;
with every kind in the public split, ``benchmarks/generator_check.py`` measured retraining on 10% fine
masks within 0.045 worst-group AUROC of the oracle, mean of 3 seeds at 32 px, too close to tell methods
apart). ``disjoint_support=True`` makes the two domains' skin-tone ranges and
lesion-type sets disjoint (no private-looking image can be drawn in the public domain).

What an image is made of is recorded per image: ``skin_tone`` (0 = very light .. 1 = dark) and
``lesion_type`` (index into ``LESION_TYPES``), for the hard generator (None for the easy one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..masks import coarsen

__all__ = ["SyntheticShortcuts", "ARTEFACT_KINDS", "EASY_ARTEFACT_KINDS", "HARD_ARTEFACT_KINDS",
           "PUBLIC_ARTEFACT_KINDS", "LESION_TYPES", "DOMAINS", "DIFFICULTIES", "domain_skin_tones",
           "domain_lesion_types"]

#: The easy generator's artefact kinds (also its default); kept for backward compatibility.
ARTEFACT_KINDS = ("ruler", "ink", "bubble")
EASY_ARTEFACT_KINDS = ARTEFACT_KINDS
#: The hard generator's artefact kinds (also its default in the private domain).
HARD_ARTEFACT_KINDS = ("ruler", "ink", "bubble", "dark_corner", "patch", "hair")
#: The hard generator's default artefact kinds in the public domain (curated images: gel bubbles only).
PUBLIC_ARTEFACT_KINDS = ("bubble",)
LESION_TYPES = ("nevus", "melanoma", "seborrheic", "pink")
DOMAINS = ("private", "public")
DIFFICULTIES = ("easy", "hard")
_KINDS = {"easy": EASY_ARTEFACT_KINDS, "hard": HARD_ARTEFACT_KINDS}
_ARTEFACT_COLOURS = {
    "ruler": (0.15, 0.15, 0.17),
    "ink": (0.45, 0.15, 0.65),
    "bubble": (0.97, 0.97, 0.95),
}

# ---------------------------------------------------------------------- hard generator: populations
#: Skin tone t in [0, 1] -> RGB, piecewise linear through these anchors (very light .. dark).
_SKIN_ANCHORS = ((0.96, 0.84, 0.76), (0.89, 0.70, 0.58), (0.72, 0.51, 0.37), (0.45, 0.30, 0.21))
#: (lowest, highest) skin tone of each (domain, disjoint_support).
_DOMAIN_TONES = {("private", False): (0.0, 0.6), ("public", False): (0.3, 1.0),
                 ("private", True): (0.0, 0.45), ("public", True): (0.55, 1.0)}
#: Probabilities over LESION_TYPES of each (domain, disjoint_support).
_DOMAIN_TYPES = {("private", False): (0.40, 0.30, 0.18, 0.12), ("public", False): (0.12, 0.08, 0.42, 0.38),
                 ("private", True): (0.55, 0.45, 0.0, 0.0), ("public", True): (0.0, 0.0, 0.55, 0.45)}
# Per lesion type: main and secondary pigment, contrast range, border softness range (px at 64),
# outline irregularity (largest harmonic amplitude), pigment network, globules.
_LESION_STYLE = {
    "nevus": dict(main=(0.46, 0.29, 0.19), second=(0.33, 0.20, 0.13), contrast=(0.6, 0.95), border=(0.5, 2.0),
                  irregular=0.07, network=0.5, globules=0.3),
    "melanoma": dict(main=(0.22, 0.13, 0.10), second=(0.34, 0.34, 0.42), contrast=(0.7, 1.0), border=(0.5, 2.5),
                     irregular=0.16, network=0.6, globules=0.6),
    "seborrheic": dict(main=(0.58, 0.44, 0.30), second=(0.45, 0.33, 0.22), contrast=(0.55, 0.9),
                       border=(1.0, 3.0), irregular=0.10, network=0.0, globules=0.2),
    "pink": dict(main=(0.80, 0.40, 0.42), second=(0.70, 0.32, 0.36), contrast=(0.6, 0.95), border=(1.2, 3.2),
                 irregular=0.10, network=0.0, globules=0.0),
}


def domain_skin_tones(domain: str = "private", disjoint_support: bool = False) -> tuple[float, float]:
    """The (lowest, highest) skin tone the hard generator draws in ``domain``."""
    return _DOMAIN_TONES[(domain, bool(disjoint_support))]


def domain_lesion_types(domain: str = "private", disjoint_support: bool = False) -> dict[str, float]:
    """The hard generator's lesion-type probabilities in ``domain``."""
    return dict(zip(LESION_TYPES, _DOMAIN_TYPES[(domain, bool(disjoint_support))]))


def _skin_rgb(tone: float) -> torch.Tensor:
    anchors = torch.tensor(_SKIN_ANCHORS)
    pos = tone * (len(_SKIN_ANCHORS) - 1)
    i = min(int(pos), len(_SKIN_ANCHORS) - 2)
    w = pos - i
    return anchors[i] * (1 - w) + anchors[i + 1] * w


def _soft(sd: torch.Tensor, width: float) -> torch.Tensor:
    """Coverage of a shape from its signed distance (negative inside), edge softness ``width`` px."""
    return torch.sigmoid(-sd / max(width, 1e-3))


def _segments_distance(xx: torch.Tensor, yy: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Distance of every pixel to the polyline through ``pts`` (K, 2) of (x, y) points."""
    a, b = pts[:-1], pts[1:]
    ab = b - a
    px = xx[None] - a[:, 0, None, None]
    py = yy[None] - a[:, 1, None, None]
    length2 = (ab ** 2).sum(dim=1).clamp_min(1e-9)
    t = ((px * ab[:, 0, None, None] + py * ab[:, 1, None, None]) / length2[:, None, None]).clamp(0, 1)
    dx = px - t * ab[:, 0, None, None]
    dy = py - t * ab[:, 1, None, None]
    return torch.sqrt(dx ** 2 + dy ** 2).amin(dim=0)


@dataclass
class _Layer:
    """One painted layer of an artefact: ``shape`` coverage in [0, 1], painted with ``opacity`` (scalar
    or map) in ``colour`` (3,) or (3, S, S). ``mapped``: its covered pixels (shape >= 1/2) belong to
    the artefact map (a faint magnifying halo does not)."""
    shape: torch.Tensor
    colour: torch.Tensor
    opacity: object = 1.0
    mapped: bool = True


@dataclass
class _Sample:
    image: torch.Tensor
    fine: torch.Tensor
    coarse: torch.Tensor
    label: int
    artefact_map: torch.Tensor
    artefacts: torch.Tensor
    skin_tone: Optional[float] = None
    lesion_type: Optional[int] = None


class SyntheticShortcuts(torch.utils.data.Dataset):
    """A reproducible synthetic segmentation data set with a pixel-level shortcut.

    Items are dicts: ``image`` (3, S, S) float32 in [0, 1]; ``fine``, ``coarse``, ``artefact_map``
    (S, S) bool; ``label`` int64 scalar; ``artefacts`` (A,) float32 image-level flags, one per kind;
    ``has_fine`` bool (the image belongs to the ``fine_fraction`` with a fine mask available).
    ``tensors()`` returns everything stacked.

    ``difficulty``: ``"hard"`` (default, see the module docstring) or ``"easy"`` (the original
    generator, bit for bit). ``artefact_kinds`` defaults to every kind of the chosen generator
    (``HARD_ARTEFACT_KINDS`` or ``EASY_ARTEFACT_KINDS``), except in the hard generator's public domain:
    ``PUBLIC_ARTEFACT_KINDS``. ``domain`` (``"private"`` or ``"public"``) and
    ``disjoint_support`` choose the skin-tone and lesion-type distributions of the hard generator; the
    easy generator has one population (its public split is a separately seeded draw of it), so there
    ``domain`` changes nothing and ``disjoint_support=True`` is refused. Every image shows at most one
    artefact, and every artefact touches (or crosses) its lesion, so the coarse mask holds it.
    """

    def __init__(
        self,
        count: int = 512,
        *,
        image_size: int = 32,
        artefact_kinds: Optional[Sequence[str]] = None,
        correlation: float = 0.8,
        dilation_radius: int = 2,
        fine_fraction: float = 0.1,
        seed: int = 0,
        difficulty: str = "hard",
        domain: str = "private",
        disjoint_support: bool = False,
    ):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive int, got {count!r}")
        if not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
        if domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
        if not isinstance(disjoint_support, bool):
            raise ValueError(f"disjoint_support must be a bool, got {disjoint_support!r}")
        if disjoint_support and difficulty == "easy":
            raise ValueError("disjoint_support needs difficulty='hard': the easy generator has a single population")
        known = _KINDS[difficulty]
        if artefact_kinds is None:
            artefact_kinds = PUBLIC_ARTEFACT_KINDS if (difficulty, domain) == ("hard", "public") else known
        if isinstance(artefact_kinds, str):
            raise ValueError(f"artefact_kinds must be a sequence of kind names, got the string {artefact_kinds!r}")
        unknown = [k for k in artefact_kinds if k not in known]
        if unknown or not artefact_kinds:
            raise ValueError(f"artefact_kinds must be a non-empty subset of {known} (difficulty={difficulty!r}), "
                             f"got {list(artefact_kinds)}")
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
        self.difficulty = difficulty
        self.domain = domain
        self.disjoint_support = disjoint_support
        gen = torch.Generator().manual_seed(seed)
        draw = self._draw if difficulty == "easy" else self._draw_hard
        samples = [draw(gen) for _ in range(count)]
        self.images = torch.stack([s.image for s in samples])
        self.fine = torch.stack([s.fine for s in samples])
        self.artefact_map = torch.stack([s.artefact_map for s in samples])
        self.coarse = torch.stack([s.coarse for s in samples])
        self.labels = torch.tensor([s.label for s in samples], dtype=torch.int64)
        self.artefacts = torch.stack([s.artefacts for s in samples])
        if difficulty == "hard":
            #: (N,) float32 skin tone of each image (0 = very light .. 1 = dark); None for the easy generator.
            self.skin_tone: Optional[torch.Tensor] = torch.tensor([s.skin_tone for s in samples], dtype=torch.float32)
            #: (N,) int64 index into LESION_TYPES; None for the easy generator.
            self.lesion_type: Optional[torch.Tensor] = torch.tensor([s.lesion_type for s in samples],
                                                                    dtype=torch.int64)
        else:
            self.skin_tone = None
            self.lesion_type = None
        n_fine = round(self.fine_fraction * count)
        order = torch.randperm(count, generator=gen)
        self.has_fine = torch.zeros(count, dtype=torch.bool)
        self.has_fine[order[:n_fine]] = True

    # ------------------------------------------------------------------ drawing (easy, kept bit for bit)
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

    # ------------------------------------------------------------------ drawing (hard)
    @staticmethod
    def _smooth_noise(gen: torch.Generator, size: int, cells: int) -> torch.Tensor:
        """A smooth random field of about unit amplitude: a (cells x cells) normal grid, bicubic upsampled."""
        grid = torch.randn(1, 1, cells, cells, generator=gen)
        return F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)[0, 0]

    def _draw_hard(self, gen: torch.Generator) -> _Sample:
        s = self.image_size
        sc = s / 64.0  # every length below is in pixels of a 64 x 64 image

        def u(lo: float, hi: float) -> float:
            return lo + (hi - lo) * float(torch.rand((), generator=gen))

        label = int(torch.rand((), generator=gen) < 0.5)
        p_artefact = 0.5 + (self.correlation / 2 if label else -self.correlation / 2)
        has_artefact = bool(torch.rand((), generator=gen) < p_artefact)
        yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32),
                                indexing="ij")
        population = (self.domain, self.disjoint_support)

        # Skin: tone of the population, blotches and redness, shading, freckles.
        tone = u(*_DOMAIN_TONES[population])
        skin = _skin_rgb(tone) + 0.04 * (torch.rand(3, generator=gen) - 0.5)
        image = skin[:, None, None] * (1 + u(0.02, 0.06) * self._smooth_noise(gen, s, 4))[None]
        image = image + u(0.0, 0.04) * self._smooth_noise(gen, s, 6)[None] * torch.tensor([1.0, -0.4, -0.4])[:, None,
                                                                                                                None]
        angle = u(0, 2 * math.pi)
        image = image + u(0.0, 0.16) * ((xx * math.cos(angle) + yy * math.sin(angle)) / s - 0.5)[None]
        for _ in range(int(torch.randint(0, 9, (), generator=gen))):
            fx, fy, fr = u(0, s), u(0, s), max(0.6, sc * u(0.6, 1.6))
            a = _soft(torch.sqrt((xx - fx) ** 2 + (yy - fy) ** 2) - fr, 0.5) * u(0.15, 0.4)
            image = image * (1 - a)[None]

        # Lesion: type of the population, size by label, irregular (sometimes lobed) outline, soft border.
        lesion_type = int(torch.multinomial(torch.tensor(_DOMAIN_TYPES[population]), 1, generator=gen))
        style = _LESION_STYLE[LESION_TYPES[lesion_type]]
        radius = sc * (u(10.0, 16.0) if label else u(7.6, 13.2))
        cy, cx = u(0.32, 0.68) * s, u(0.32, 0.68) * s
        theta = torch.atan2(yy - cy, xx - cx)
        dist = torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        harmonics = [(h, u(0.0, style["irregular"]) * math.sqrt(2.0 / h), u(0, 2 * math.pi)) for h in range(2, 8)]

        def outline(angle):
            """Lesion radius in direction ``angle`` (a float or a tensor of angles)."""
            cos = torch.cos if isinstance(angle, torch.Tensor) else math.cos
            return radius * (1.0 + sum(amp * cos(h * angle + phase) for h, amp, phase in harmonics))

        sd = dist - outline(theta)
        if float(torch.rand((), generator=gen)) < 0.3:  # a satellite lobe
            la, ld, lr = u(0, 2 * math.pi), radius * u(0.45, 0.8), radius * u(0.3, 0.55)
            lx, ly = cx + ld * math.cos(la), cy + ld * math.sin(la)
            sd = torch.minimum(sd, torch.sqrt((xx - lx) ** 2 + (yy - ly) ** 2) - lr)
        fine = sd <= 0
        if not fine.any():  # a tiny image: keep at least the centre pixel
            fine[min(int(round(cy)), s - 1), min(int(round(cx)), s - 1)] = True
            sd = torch.where(fine, torch.zeros_like(sd), sd)
        cover = _soft(sd, max(0.3, sc * u(*style["border"])))

        main = torch.tensor(style["main"]) + 0.06 * (torch.rand(3, generator=gen) - 0.5)
        second = torch.tensor(style["second"]) + 0.06 * (torch.rand(3, generator=gen) - 0.5)
        mix = u(0.2, 1.0) * torch.sigmoid(2.5 * self._smooth_noise(gen, s, 5))
        colour = main[:, None, None] * (1 - mix)[None] + second[:, None, None] * mix[None]
        if float(torch.rand((), generator=gen)) < style["network"]:  # pigment network
            f = 2 * math.pi / max(1.5, sc * u(5.0, 9.0))
            a = u(0, math.pi)
            xr, yr = xx * math.cos(a) + yy * math.sin(a), -xx * math.sin(a) + yy * math.cos(a)
            net = torch.maximum(torch.cos(f * xr + 1.5 * self._smooth_noise(gen, s, 4)),
                                torch.cos(f * yr + 1.5 * self._smooth_noise(gen, s, 4)))
            colour = colour * (1 - u(0.2, 0.5) * ((net - 0.7) / 0.3).clamp(0, 1))[None]
        if float(torch.rand((), generator=gen)) < style["globules"]:  # dots and globules
            dots = torch.full((s, s), float("inf"))
            for _ in range(int(torch.randint(3, 10, (), generator=gen))):
                ga, gr = u(0, 2 * math.pi), math.sqrt(u(0, 1)) * 0.8
                gx, gy = cx + gr * outline(ga) * math.cos(ga), cy + gr * outline(ga) * math.sin(ga)
                dots = torch.minimum(dots, torch.sqrt((xx - gx) ** 2 + (yy - gy) ** 2) - max(0.6, sc * u(0.7, 1.6)))
            colour = colour * (1 - 0.45 * _soft(dots, 0.4))[None]
        colour = colour * (1 + u(0.02, 0.06) * torch.randn(3, s, s, generator=gen))
        fade = u(0.5, 1.0)  # pigment at the border relative to the centre: low = a faint border
        depth = (-sd / (0.45 * radius)).clamp(0, 1)
        density = cover * (fade + (1 - fade) * depth) * u(*style["contrast"])
        image = image * (1 - density)[None] + colour * density[None]

        # Artefact touching (or crossing) the lesion.
        artefact_map = torch.zeros(s, s, dtype=torch.bool)
        flags = torch.zeros(len(self.artefact_kinds))
        if has_artefact:
            k = int(torch.randint(len(self.artefact_kinds), (), generator=gen))
            kind = self.artefact_kinds[k]
            geometry = dict(xx=xx, yy=yy, cx=cx, cy=cy, radius=radius, outline=outline, theta=theta, dist=dist,
                            sc=sc, u=u)
            layers: list[_Layer] = []
            for _ in range(16):  # redraw until the artefact shows (at least partly) inside the image
                layers = getattr(self, f"_hard_{kind}")(gen, **geometry)
                covered = torch.zeros(s, s, dtype=torch.bool)
                for layer in layers:
                    if layer.mapped:
                        covered |= layer.shape >= 0.5
                artefact_map = covered & ~fine
                if artefact_map.any():
                    break
            if artefact_map.any():
                flags[k] = 1.0
                for layer in layers:
                    a = layer.shape * layer.opacity
                    c = layer.colour if layer.colour.dim() == 3 else layer.colour[:, None, None]
                    image = image * (1 - a)[None] + c * a[None]
        image = (image + u(0.01, 0.035) * torch.randn(3, s, s, generator=gen)).clamp(0.0, 1.0)
        coarse = coarsen(fine | artefact_map, radius=self.dilation_radius)
        return _Sample(image, fine, coarse, label, artefact_map, flags, skin_tone=tone, lesion_type=lesion_type)

    # Each artefact painter returns its layers; lengths are in pixels of a 64 x 64 image times ``sc``.
    @staticmethod
    def _hard_ruler(gen, *, xx, yy, cx, cy, outline, sc, u, **_) -> list[_Layer]:
        """Ruler marks: a dark scale bar (sometimes only its ticks) from the lesion edge, or along it."""
        phi = u(0, 2 * math.pi)
        e = outline(phi) + sc * u(0.0, 1.5)
        ex, ey = cx + e * math.cos(phi), cy + e * math.sin(phi)
        length, width = sc * u(14.0, 30.0), max(0.8, sc * u(0.8, 2.0))
        if float(torch.rand((), generator=gen)) < 0.35:  # along the lesion edge
            direction = phi + math.pi / 2
            back = length * u(0.2, 0.8)
            sx, sy = ex - back * math.cos(direction), ey - back * math.sin(direction)
        else:  # outward
            direction = phi + u(-0.5, 0.5)
            sx, sy = ex, ey
        dx, dy = math.cos(direction), math.sin(direction)
        along = (xx - sx) * dx + (yy - sy) * dy
        across = -(xx - sx) * dy + (yy - sy) * dx
        ends = torch.maximum(-along, along - length)
        spacing = max(1.5, sc * u(2.5, 5.0))
        tick_w, tick_len = max(0.7, 0.6 * width), max(1.0, sc * u(2.0, 5.0))
        side = across if float(torch.rand((), generator=gen)) < 0.5 else -across
        tick = torch.maximum((torch.remainder(along, spacing) - spacing / 2).abs() - tick_w / 2,
                             torch.maximum(side - width / 2 - tick_len, -side))
        tick = torch.maximum(tick, ends)
        if float(torch.rand((), generator=gen)) < 0.7:
            sd = torch.minimum(torch.maximum(across.abs() - width / 2, ends), tick)
        else:  # ticks only
            sd = tick
        grey = u(0.03, 0.3)
        colour = torch.tensor([grey, grey, grey + u(0.0, 0.08)])
        return [_Layer(_soft(sd, 0.4), colour, u(0.6, 1.0))]

    @staticmethod
    def _hard_ink(gen, *, xx, yy, cx, cy, outline, theta, dist, sc, u, **_) -> list[_Layer]:
        """Marker ink: an arc hugging the lesion, a few dots around it, or a stroke pointing at it."""
        inks = torch.tensor([[0.45, 0.15, 0.65], [0.15, 0.22, 0.70], [0.08, 0.08, 0.10], [0.10, 0.45, 0.28],
                             [0.35, 0.17, 0.20]])
        colour = inks[int(torch.randint(len(inks), (), generator=gen))] + 0.08 * (torch.rand(3, generator=gen) - 0.5)
        width = max(0.9, sc * u(1.0, 3.5))
        phi = u(0, 2 * math.pi)
        gap = sc * u(0.5, 4.0)
        style = float(torch.rand((), generator=gen))
        if style < 0.5:  # arc
            span = u(0.25, 1.0) * math.pi
            delta = torch.remainder(theta - phi + math.pi, 2 * math.pi) - math.pi
            ring = (dist - (outline(theta) + gap + width / 2)).abs() - width / 2
            sd = torch.maximum(ring, (delta.abs() - span / 2) * dist)
        elif style < 0.8:  # dots
            sd = torch.full_like(xx, float("inf"))
            angle = phi
            for _ in range(int(torch.randint(2, 6, (), generator=gen))):
                r_dot = max(0.8, sc * u(1.0, 2.5))
                d = outline(angle) + gap + r_dot
                px, py = cx + d * math.cos(angle), cy + d * math.sin(angle)
                sd = torch.minimum(sd, torch.sqrt((xx - px) ** 2 + (yy - py) ** 2) - r_dot)
                angle += u(0.3, 0.8)
        else:  # stroke
            d = outline(phi) + gap
            direction = phi + u(-0.4, 0.4)
            length = sc * u(8.0, 20.0)
            p0 = torch.tensor([[cx + d * math.cos(phi), cy + d * math.sin(phi)]])
            p1 = p0 + length * torch.tensor([[math.cos(direction), math.sin(direction)]])
            sd = _segments_distance(xx, yy, torch.cat([p0, p1])) - width / 2
        return [_Layer(_soft(sd, 0.5), colour, u(0.45, 0.95))]

    @staticmethod
    def _hard_bubble(gen, *, xx, yy, cx, cy, outline, sc, u, **_) -> list[_Layer]:
        """Gel bubbles (one or two): a faint magnifying disc with a bright rim and a highlight."""
        phi = u(0, 2 * math.pi)
        r_b = max(1.5, sc * u(3.5, 9.0))
        d = outline(phi) + r_b * u(0.4, 1.05)
        centres = [(cx + d * math.cos(phi), cy + d * math.sin(phi), r_b)]
        if float(torch.rand((), generator=gen)) < 0.35:
            r2, a2 = max(1.5, sc * u(2.5, 6.0)), u(0, 2 * math.pi)
            bx, by, _ = centres[0]
            step = r_b + r2 * u(0.8, 1.0)
            centres.append((bx + step * math.cos(a2), by + step * math.sin(a2), r2))
        layers = []
        white = torch.tensor([u(0.92, 1.0), u(0.94, 1.0), u(0.94, 1.0)])
        for bx, by, rb in centres:
            d_b = torch.sqrt((xx - bx) ** 2 + (yy - by) ** 2)
            rim_w = max(0.8, sc * u(0.8, 1.8))
            ha = u(-math.pi, -math.pi / 2)
            hx, hy, hr = bx + 0.5 * rb * math.cos(ha), by + 0.5 * rb * math.sin(ha), max(0.6, rb * u(0.15, 0.3))
            layers += [_Layer(_soft(d_b - rb, 0.5), white, u(0.06, 0.2)),
                       _Layer(_soft((d_b - (rb - rim_w / 2)).abs() - rim_w / 2, 0.4), white, u(0.45, 0.9)),
                       _Layer(_soft(torch.sqrt((xx - hx) ** 2 + (yy - hy) ** 2) - hr, 0.4), white, u(0.6, 0.95))]
        return layers

    @staticmethod
    def _hard_dark_corner(gen, *, xx, yy, cx, cy, outline, sc, u, **_) -> list[_Layer]:
        """The dark vignette of the dermatoscope, reaching from an image corner to the lesion edge."""
        s = xx.shape[-1]
        corners = [(0.0, 0.0), (s - 1.0, 0.0), (0.0, s - 1.0), (s - 1.0, s - 1.0)]
        if float(torch.rand((), generator=gen)) < 0.6:  # the nearest corner
            kx, ky = min(corners, key=lambda c: (c[0] - cx) ** 2 + (c[1] - cy) ** 2)
        else:
            kx, ky = corners[int(torch.randint(4, (), generator=gen))]
        phi = math.atan2(ky - cy, kx - cx) + u(-0.35, 0.35)
        e = outline(phi) + sc * u(0.0, 2.0)
        r_v = s * u(0.6, 1.3)  # the vignette circle, its boundary through the point e beyond the edge
        vx, vy = cx + (e - r_v) * math.cos(phi), cy + (e - r_v) * math.sin(phi)
        dv = torch.sqrt((xx - vx) ** 2 + (yy - vy) ** 2)
        outside = dv - r_v
        dang = torch.remainder(torch.atan2(yy - vy, xx - vx) - phi + math.pi, 2 * math.pi) - math.pi
        half = sc * u(7.0, 16.0)
        depth = max(2.0, sc * u(10.0, 40.0))
        sd = torch.maximum(torch.maximum(-outside, dang.abs() * r_v - half), outside - depth)
        ramp = (outside / depth).clamp(0, 1)
        grey = u(0.02, 0.12)
        return [_Layer(_soft(sd, max(0.5, sc * u(1.0, 3.5))), torch.tensor([grey, grey, grey * u(1.0, 1.4)]),
                       u(0.65, 0.95) * (0.55 + 0.45 * ramp))]

    @staticmethod
    def _hard_patch(gen, *, xx, yy, cx, cy, outline, sc, u, **_) -> list[_Layer]:
        """A patch touching the lesion: a sticker, plaster or colour-calibration square (rounded box)."""
        patches = torch.tensor([[0.87, 0.74, 0.58], [0.95, 0.95, 0.93], [0.80, 0.22, 0.20], [0.22, 0.60, 0.32],
                                [0.22, 0.32, 0.80], [0.92, 0.82, 0.25], [0.40, 0.28, 0.20], [0.50, 0.50, 0.52]])
        colour = patches[int(torch.randint(len(patches), (), generator=gen))] + 0.08 * (
            torch.rand(3, generator=gen) - 0.5)
        phi, rot = u(0, 2 * math.pi), u(0, math.pi)
        hw, hh = max(1.0, sc * u(2.5, 7.0)), max(1.0, sc * u(2.5, 7.0))
        extent = abs(hw * math.cos(phi - rot)) + abs(hh * math.sin(phi - rot))  # towards the lesion
        d = outline(phi) + extent * u(0.6, 1.0)
        px, py = cx + d * math.cos(phi), cy + d * math.sin(phi)
        qx = ((xx - px) * math.cos(rot) + (yy - py) * math.sin(rot)).abs()
        qy = (-(xx - px) * math.sin(rot) + (yy - py) * math.cos(rot)).abs()
        rc = min(hw, hh) * u(0.0, 0.5)
        ox, oy = qx - hw + rc, qy - hh + rc
        sd = torch.sqrt(ox.clamp_min(0) ** 2 + oy.clamp_min(0) ** 2) + torch.maximum(ox, oy).clamp_max(0) - rc
        texture = colour[:, None, None] * (1 + 0.03 * torch.randn(3, *xx.shape, generator=gen))
        return [_Layer(_soft(sd, 0.4), texture, u(0.75, 1.0))]

    @staticmethod
    def _hard_hair(gen, *, xx, yy, cx, cy, radius, sc, u, **_) -> list[_Layer]:
        """Hair: one to five dark, slightly curved strands crossing the lesion."""
        layers = []
        base = u(0.04, 0.25)
        t = torch.linspace(0, 1, 25)[:, None]
        for _ in range(int(torch.randint(1, 6, (), generator=gen))):
            psi, off = u(0, math.pi), radius * u(-0.7, 0.7)
            d = torch.tensor([math.cos(psi), math.sin(psi)])
            n = torch.tensor([-math.sin(psi), math.cos(psi)])
            q = torch.tensor([cx, cy]) + off * n
            half = radius * u(1.3, 2.4) + sc * u(2.0, 8.0)
            p0, p2, p1 = q - half * d, q + half * d, q + half * u(-0.35, 0.35) * n
            pts = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t ** 2 * p2
            width = max(0.8, sc * u(0.8, 1.6))
            grey = base * u(0.8, 1.2)
            colour = torch.tensor([grey, grey * 0.85, grey * 0.75])
            layers.append(_Layer(_soft(_segments_distance(xx, yy, pts) - width / 2, 0.35), colour, u(0.7, 1.0)))
        return layers

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
