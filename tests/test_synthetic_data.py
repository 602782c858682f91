"""Tests of pyunlearn.data.SyntheticShortcuts: shapes, mask relations, the shortcut, reproducibility; the easy
generator (bit for bit the original one) and the hard one (skin tones, lesion types, six artefact kinds, the
public/private domain shift and its disjoint-support option)."""
from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyunlearn.data import ARTEFACT_KINDS, SyntheticShortcuts
from pyunlearn.data.synthetic import (HARD_ARTEFACT_KINDS, LESION_TYPES, PUBLIC_ARTEFACT_KINDS,
                                      domain_lesion_types, domain_skin_tones)
from pyunlearn.masks import coarsen

EASY = dict(difficulty="easy")
DIFFICULTIES = ("easy", "hard")
KINDS = {"easy": ARTEFACT_KINDS, "hard": HARD_ARTEFACT_KINDS}


@functools.lru_cache(maxsize=None)
def dataset(count: int = 24, image_size: int = 16, **kw) -> SyntheticShortcuts:
    return SyntheticShortcuts(count, image_size=image_size, **kw)


# ---------------------------------------------------------------------------------------------------------
# The original generator, frozen: difficulty="easy" must reproduce it bit for bit.
# ---------------------------------------------------------------------------------------------------------
def _easy_reference(count, *, image_size=32, artefact_kinds=("ruler", "ink", "bubble"), correlation=0.8,
                    dilation_radius=2, fine_fraction=0.1, seed=0) -> dict:
    colours = {"ruler": (0.15, 0.15, 0.17), "ink": (0.45, 0.15, 0.65), "bubble": (0.97, 0.97, 0.95)}

    def uniform(gen, lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    def artefact(gen, kind, xx, yy, theta, dist, cx, cy, radius, wobble, scale):
        u = uniform
        direction = u(gen, 0, 2 * math.pi)
        edge = radius * 1.1 + 1.0
        ex, ey = cx + edge * math.cos(direction), cy + edge * math.sin(direction)
        if kind == "ruler":
            length = scale * u(gen, 8.0, 12.0)
            along = (xx - ex) * math.cos(direction) + (yy - ey) * math.sin(direction)
            across = -(xx - ex) * math.sin(direction) + (yy - ey) * math.cos(direction)
            bar = (along >= 0) & (along <= length) & (across.abs() <= 1.0 * scale)
            ticks = (along >= 0) & (along <= length) & (across > 0) & (across <= 2.6 * scale) & (
                torch.remainder(along, 3.0 * scale) < 1.0)
            return bar | ticks
        if kind == "ink":
            span = u(gen, 0.5, 0.9) * math.pi
            delta = torch.remainder(theta - direction + math.pi, 2 * math.pi) - math.pi
            ring = (dist - radius * wobble - 2.0 * scale).abs() <= 1.0 * scale
            return ring & (delta.abs() <= span / 2)
        r_b = scale * u(gen, 3.0, 4.2)
        bx, by = cx + (edge + r_b) * math.cos(direction), cy + (edge + r_b) * math.sin(direction)
        d_b = torch.sqrt((yy - by) ** 2 + (xx - bx) ** 2)
        return (d_b <= r_b) & (d_b >= r_b - 1.3 * scale)

    def draw(gen):
        s = image_size
        u = uniform
        label = int(torch.rand((), generator=gen) < 0.5)
        p_artefact = 0.5 + (correlation / 2 if label else -correlation / 2)
        has_artefact = bool(torch.rand((), generator=gen) < p_artefact)
        yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32),
                                indexing="ij")
        tone = torch.tensor([0.86, 0.66, 0.56]) + 0.05 * (torch.rand(3, generator=gen) - 0.5)
        angle = u(gen, 0, 2 * math.pi)
        shade = 0.06 * ((xx * math.cos(angle) + yy * math.sin(angle)) / s - 0.5)
        image = tone[:, None, None] + shade[None] + 0.025 * torch.randn(3, s, s, generator=gen)
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
        flags = torch.zeros(len(artefact_kinds))
        if has_artefact:
            k = int(torch.randint(len(artefact_kinds), (), generator=gen))
            kind = artefact_kinds[k]
            for _ in range(16):
                artefact_map = artefact(gen, kind, xx, yy, theta, dist, cx, cy, radius, wobble, scale) & ~fine
                if artefact_map.any():
                    break
            if artefact_map.any():
                flags[k] = 1.0
                colour = torch.tensor(colours[kind])
                image = torch.where(artefact_map[None],
                                    colour[:, None, None] + 0.02 * torch.randn(3, s, s, generator=gen), image)
        image = image.clamp(0.0, 1.0)
        coarse = coarsen(fine | artefact_map, radius=dilation_radius)
        return image, fine, coarse, label, artefact_map, flags

    gen = torch.Generator().manual_seed(seed)
    samples = [draw(gen) for _ in range(count)]
    n_fine = round(fine_fraction * count)
    order = torch.randperm(count, generator=gen)
    has_fine = torch.zeros(count, dtype=torch.bool)
    has_fine[order[:n_fine]] = True
    return {"image": torch.stack([x[0] for x in samples]), "fine": torch.stack([x[1] for x in samples]),
            "coarse": torch.stack([x[2] for x in samples]),
            "label": torch.tensor([x[3] for x in samples], dtype=torch.int64),
            "artefact_map": torch.stack([x[4] for x in samples]), "artefacts": torch.stack([x[5] for x in samples]),
            "has_fine": has_fine}


@pytest.mark.parametrize("kw", [dict(), dict(seed=3, image_size=17, correlation=0.0),
                                dict(seed=5, image_size=40, artefact_kinds=("bubble", "ink"), correlation=-0.4,
                                     dilation_radius=1, fine_fraction=0.5),
                                dict(seed=68, image_size=16, correlation=1.0, artefact_kinds=("bubble",))])
def test_easy_generator_is_the_original_bit_for_bit(kw):
    count = 1 if kw.get("seed") == 68 else 12
    ref = _easy_reference(count, **kw)
    ds = SyntheticShortcuts(count, **kw, **EASY)
    got = ds.tensors()
    assert set(got) == set(ref)
    for key in ref:
        assert got[key].dtype == ref[key].dtype and torch.equal(got[key], ref[key]), key
    assert ds.skin_tone is None and ds.lesion_type is None
    # The easy generator has one population: domain is accepted and changes nothing.
    public = SyntheticShortcuts(count, domain="public", **kw, **EASY)
    assert all(torch.equal(public.tensors()[k], ref[k]) for k in ref)


# ---------------------------------------------------------------------------------------------------------
# Both generators
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_shapes_and_dtypes(difficulty):
    ds = dataset(23, 17, seed=3, difficulty=difficulty)
    kinds = KINDS[difficulty]
    n, s, a = 23, 17, len(kinds)
    t = ds.tensors()
    assert set(t) == {"image", "fine", "coarse", "label", "artefact_map", "artefacts", "has_fine"}
    expected = {"image": ((n, 3, s, s), torch.float32), "fine": ((n, s, s), torch.bool),
                "coarse": ((n, s, s), torch.bool), "label": ((n,), torch.int64),
                "artefact_map": ((n, s, s), torch.bool), "artefacts": ((n, a), torch.float32),
                "has_fine": ((n,), torch.bool)}
    for key, (shape, dtype) in expected.items():
        assert tuple(t[key].shape) == shape and t[key].dtype == dtype, key
    assert float(t["image"].min()) >= 0.0 and float(t["image"].max()) <= 1.0
    assert set(t["label"].tolist()) <= {0, 1}
    assert set(t["artefacts"].unique().tolist()) <= {0.0, 1.0}
    assert bool((t["artefacts"].sum(dim=1) <= 1).all()), "at most one artefact per image"
    assert len(ds) == n and ds.artefact_names == list(kinds)
    item = ds[4]
    assert set(item) == set(t)
    for key in t:
        assert torch.equal(item[key], t[key][4]), key
    assert torch.equal(ds.has_artefact, t["artefacts"].sum(dim=1) > 0)
    if difficulty == "hard":
        assert ds.skin_tone.shape == (n,) and ds.skin_tone.dtype == torch.float32
        assert ds.lesion_type.shape == (n,) and ds.lesion_type.dtype == torch.int64
        assert bool(((ds.lesion_type >= 0) & (ds.lesion_type < len(LESION_TYPES))).all())
        assert bool(((ds.skin_tone >= 0) & (ds.skin_tone <= 1)).all())


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
@pytest.mark.parametrize("kw", [dict(seed=0), dict(seed=1, correlation=0.0, dilation_radius=1),
                                dict(seed=2, correlation=-0.5, image_size=19, artefact_kinds=("ink", "bubble"))])
def test_mask_relations(kw, difficulty):
    ds = dataset(24, **kw, difficulty=difficulty)
    _check_masks(ds)


def _check_masks(ds: SyntheticShortcuts) -> None:
    fine, coarse, art = ds.fine, ds.coarse, ds.artefact_map
    assert bool(fine.flatten(1).any(dim=1).all()), "every image has a lesion"
    assert bool((coarse | ~fine).all()), "fine inside coarse"
    assert bool((coarse | ~art).all()), "artefact inside coarse"
    assert not bool((art & fine).any()), "artefact disjoint from the lesion"
    # The coarse mask is the annotator's dilation of lesion plus touching artefact.
    assert torch.equal(coarse, coarsen(fine | art, radius=ds.dilation_radius))
    if ds.dilation_radius > 0:
        assert bool((coarse & ~fine).flatten(1).any(dim=1).all()), "every image has forget pixels"
    assert torch.equal(ds.has_artefact, art.flatten(1).any(dim=1)), "flag <=> visible artefact"


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_artefact_flags_agree_with_map_on_default_sets(difficulty):
    for seed in (0, 1):
        ds = dataset(24, seed=seed, difficulty=difficulty)
        assert torch.equal(ds.has_artefact, ds.artefact_map.flatten(1).any(dim=1))


def test_artefact_flag_implies_visible_artefact():
    ds = SyntheticShortcuts(1, image_size=16, correlation=1.0, artefact_kinds=("bubble",), seed=68, **EASY)
    assert bool(ds.has_artefact[0])
    assert bool(ds.artefact_map[0].any())


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_deterministic_by_seed(difficulty):
    kw = dict(image_size=16, difficulty=difficulty)
    a = SyntheticShortcuts(9, seed=5, **kw)
    b = SyntheticShortcuts(9, seed=5, **kw)
    c = SyntheticShortcuts(9, seed=6, **kw)
    for key, value in a.tensors().items():
        assert torch.equal(value, b.tensors()[key]), key
    assert not torch.equal(a.images, c.images)
    # Drawing does not depend on the global RNG.
    state = torch.random.get_rng_state()
    torch.manual_seed(1234)
    d = SyntheticShortcuts(9, seed=5, **kw)
    assert torch.equal(a.images, d.images)
    torch.random.set_rng_state(state)


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_full_correlation(seed, difficulty):
    ds = dataset(40, correlation=1.0, seed=seed, difficulty=difficulty)
    label = ds.labels.bool()
    assert label.any() and (~label).any()
    assert bool(ds.has_artefact[label].all()), "every label-1 image has an artefact"
    assert not bool(ds.has_artefact[~label].any()), "no label-0 image has an artefact"
    assert not bool(ds.artefact_map[~label].any())
    anti = dataset(40, correlation=-1.0, seed=seed, difficulty=difficulty)
    assert torch.equal(anti.has_artefact, ~anti.labels.bool())


@settings(deadline=None)
@given(st.integers(1, 30), st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.77, 1.0]), st.sampled_from(DIFFICULTIES))
def test_fine_fraction_count(count, fraction, difficulty):
    ds = SyntheticShortcuts(count, image_size=16, fine_fraction=fraction, seed=count, difficulty=difficulty)
    assert int(ds.has_fine.sum()) == round(fraction * count)


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_only_requested_artefact_kinds(difficulty):
    ds = dataset(30, artefact_kinds=("ruler",), correlation=1.0, seed=4, difficulty=difficulty)
    assert ds.artefacts.shape == (30, 1) and ds.artefact_names == ["ruler"]
    assert torch.equal(ds.artefacts[:, 0].bool(), ds.labels.bool())


@pytest.mark.parametrize("kwargs,match", [
    (dict(count=0), "count"), (dict(count=2.0), "count"), (dict(image_size=15), "image_size"),
    (dict(image_size=16.0), "image_size"), (dict(artefact_kinds=("ruler", "hair"), **EASY), "artefact_kinds"),
    (dict(artefact_kinds=("ruler", "mole")), "artefact_kinds"), (dict(artefact_kinds="ruler"), "artefact_kinds"),
    (dict(artefact_kinds=()), "artefact_kinds"), (dict(correlation=1.5), "correlation"),
    (dict(correlation=-1.01), "correlation"), (dict(fine_fraction=-0.1), "fine_fraction"),
    (dict(fine_fraction=1.1), "fine_fraction"), (dict(difficulty="medium"), "difficulty"),
    (dict(domain="shifted"), "domain"), (dict(disjoint_support=1), "disjoint_support"),
    (dict(disjoint_support=True, **EASY), "disjoint_support"),
])
def test_invalid_arguments(kwargs, match):
    kwargs = {"count": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        SyntheticShortcuts(**kwargs)


# ---------------------------------------------------------------------------------------------------------
# The hard generator
# ---------------------------------------------------------------------------------------------------------
def test_public_domain_default_artefacts_and_override():
    """The hard public domain shows only gel bubbles by default (the public encoder never learns to ignore
    the private artefacts); artefact_kinds overrides it; the private domain keeps all six kinds."""
    public = dataset(24, seed=1, domain="public", correlation=1.0)
    assert public.artefact_names == list(PUBLIC_ARTEFACT_KINDS) == ["bubble"]
    assert bool(public.has_artefact[public.labels.bool()].all())
    full = dataset(24, seed=1, domain="public", correlation=1.0, artefact_kinds=HARD_ARTEFACT_KINDS)
    assert full.artefact_names == list(HARD_ARTEFACT_KINDS)
    assert dataset(4, seed=1, domain="private").artefact_names == list(HARD_ARTEFACT_KINDS)
    _check_masks(public)
    _check_masks(full)


def test_hard_is_the_default_with_six_artefact_kinds():
    ds = dataset(4, seed=0)
    assert ds.difficulty == "hard" and ds.domain == "private" and not ds.disjoint_support
    assert ds.artefact_names == list(HARD_ARTEFACT_KINDS)
    assert set(HARD_ARTEFACT_KINDS) == {"ruler", "ink", "bubble", "dark_corner", "patch", "hair"}
    assert ds.image_size == 16 and SyntheticShortcuts(1).image_size == 32  # the pipeline passes its own


@pytest.mark.parametrize("correlation", [0.0, 0.5, 0.8, -0.6])
def test_artefact_label_correlation_matches(correlation):
    """P(artefact | label 1) - P(artefact | label 0) is ``correlation``, centred on 1/2."""
    ds = dataset(600, seed=11, correlation=correlation)
    label = ds.labels.bool()
    p1 = float(ds.has_artefact[label].float().mean())
    p0 = float(ds.has_artefact[~label].float().mean())
    n1, n0 = int(label.sum()), int((~label).sum())
    sd = math.sqrt(0.25 / n1 + 0.25 / n0)  # at most, binomial
    assert abs((p1 - p0) - correlation) < 4 * sd
    assert abs((p1 + p0) / 2 - 0.5) < 4 * sd
    assert abs(n1 / 600 - 0.5) < 4 * math.sqrt(0.25 / 600)


@pytest.mark.parametrize("image_size", [16, 64])
@pytest.mark.parametrize("kind", HARD_ARTEFACT_KINDS)
def test_every_artefact_kind_appears_alone(kind, image_size):
    count = 10 if image_size == 64 else 24
    ds = dataset(count, image_size, artefact_kinds=(kind,), correlation=1.0, seed=7)
    label = ds.labels.bool()
    assert bool(ds.has_artefact[label].all()), f"{kind}: every label-1 image shows it"
    assert not bool(ds.has_artefact[~label].any())
    assert bool(ds.artefact_map[label].flatten(1).any(dim=1).all())
    _check_masks(ds)


def test_every_artefact_kind_appears_in_a_mixed_set():
    ds = dataset(120, 32, correlation=1.0, seed=3)
    per_kind = ds.artefacts.sum(dim=0)
    assert bool((per_kind >= 4).all()), dict(zip(ds.artefact_names, per_kind.tolist()))
    _check_masks(ds)
    # Varied appearance: the mean colour of a kind's artefact pixels spreads over images.
    for k, kind in enumerate(ds.artefact_names):
        idx = ds.artefacts[:, k].bool().nonzero().flatten()
        means = torch.stack([ds.images[i][:, ds.artefact_map[i]].mean(dim=1) for i in idx])
        assert float(means.std(dim=0).max()) > 0.02, kind


def test_hard_generator_varies_lesions_and_skin():
    ds = dataset(200, 32, seed=2)
    assert set(ds.lesion_type.tolist()) == set(range(len(LESION_TYPES)))
    lo, hi = domain_skin_tones("private")
    assert float(ds.skin_tone.min()) >= lo and float(ds.skin_tone.max()) <= hi
    assert float(ds.skin_tone.max() - ds.skin_tone.min()) > 0.8 * (hi - lo)
    # Label 1 means larger lesions on average (the pooled score is predictive); sizes overlap.
    area = ds.fine.flatten(1).float().mean(dim=1)
    label = ds.labels.bool()
    assert float(area[label].mean()) > 1.3 * float(area[~label].mean())
    assert float(area[label].min()) < float(area[~label].max())


def _skin_brightness(ds: SyntheticShortcuts) -> torch.Tensor:
    """Mean intensity of each image's pixels outside the coarse mask (skin)."""
    outside = ~ds.coarse
    return (ds.images.mean(dim=1) * outside).flatten(1).sum(dim=1) / outside.flatten(1).sum(dim=1)


@pytest.mark.parametrize("disjoint", [False, True])
def test_public_private_shift_changes_skin_tone_statistics(disjoint):
    private = dataset(150, 32, seed=4, disjoint_support=disjoint)
    public = dataset(150, 32, seed=4, domain="public", disjoint_support=disjoint)
    assert float(public.skin_tone.mean()) > float(private.skin_tone.mean()) + 0.25
    # Visible in the images: public skin is darker.
    assert float(_skin_brightness(public).mean()) < float(_skin_brightness(private).mean()) - 0.08
    # Lesion types shift too.
    types_private = torch.bincount(private.lesion_type, minlength=len(LESION_TYPES)).float() / 150
    types_public = torch.bincount(public.lesion_type, minlength=len(LESION_TYPES)).float() / 150
    assert float((types_private - types_public).abs().sum()) > 0.5
    # Same shortcut mechanics in both domains.
    _check_masks(public)
    for name, probs in (("private", domain_lesion_types("private", disjoint)),
                        ("public", domain_lesion_types("public", disjoint))):
        assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-9), name


def test_disjoint_support():
    """With disjoint_support the domains share no skin tone and no lesion type; without, they overlap."""
    kw = dict(count=200, image_size=16, seed=9)
    private = dataset(**kw, disjoint_support=True)
    public = dataset(**kw, domain="public", disjoint_support=True)
    assert float(private.skin_tone.max()) < float(public.skin_tone.min())
    assert not set(private.lesion_type.tolist()) & set(public.lesion_type.tolist())
    p_lo, p_hi = domain_skin_tones("private", True)
    q_lo, q_hi = domain_skin_tones("public", True)
    assert p_hi < q_lo
    assert not {k for k, v in domain_lesion_types("private", True).items() if v} & \
        {k for k, v in domain_lesion_types("public", True).items() if v}
    overlap_private = dataset(**kw)
    overlap_public = dataset(**kw, domain="public")
    assert float(overlap_private.skin_tone.max()) > float(overlap_public.skin_tone.min())
    assert set(overlap_private.lesion_type.tolist()) & set(overlap_public.lesion_type.tolist())
    # The option changes only the populations: labels and artefacts are drawn the same way.
    assert abs(float(private.has_artefact.float().mean()) - float(public.has_artefact.float().mean())) < 0.15


def test_hard_does_not_depend_on_easy_draws():
    """The two generators are different streams: the hard one is not the easy one repainted."""
    easy = dataset(8, 16, seed=0, **EASY)
    hard = dataset(8, 16, seed=0)
    assert not torch.equal(easy.images, hard.images)
