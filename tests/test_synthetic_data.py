"""Tests of pyunlearn.data.SyntheticShortcuts: shapes, mask relations, the shortcut, reproducibility."""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pyunlearn.data import ARTEFACT_KINDS, SyntheticShortcuts
from pyunlearn.masks import coarsen


@functools.lru_cache(maxsize=None)
def dataset(count: int = 24, image_size: int = 16, **kw) -> SyntheticShortcuts:
    return SyntheticShortcuts(count, image_size=image_size, **kw)


def test_shapes_and_dtypes():
    ds = dataset(23, 17, seed=3)
    n, s, a = 23, 17, len(ARTEFACT_KINDS)
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
    assert len(ds) == n and ds.artefact_names == list(ARTEFACT_KINDS)
    item = ds[4]
    assert set(item) == set(t)
    for key in t:
        assert torch.equal(item[key], t[key][4]), key
    assert torch.equal(ds.has_artefact, t["artefacts"].sum(dim=1) > 0)


@pytest.mark.parametrize("kw", [dict(seed=0), dict(seed=1, correlation=0.0, dilation_radius=1),
                                dict(seed=2, correlation=-0.5, image_size=19, artefact_kinds=("ink", "bubble"))])
def test_mask_relations(kw):
    ds = dataset(24, **kw)
    fine, coarse, art = ds.fine, ds.coarse, ds.artefact_map
    assert bool(fine.flatten(1).any(dim=1).all()), "every image has a lesion"
    assert bool((coarse | ~fine).all()), "fine inside coarse"
    assert bool((coarse | ~art).all()), "artefact inside coarse"
    assert not bool((art & fine).any()), "artefact disjoint from the lesion"
    # The coarse mask is the annotator's dilation of lesion plus touching artefact.
    assert torch.equal(coarse, coarsen(fine | art, radius=ds.dilation_radius))
    assert bool((coarse & ~fine).flatten(1).any(dim=1).all()), "every image has forget pixels"


def test_artefact_flags_agree_with_map_on_default_sets():
    for seed in (0, 1):
        ds = dataset(24, seed=seed)
        assert torch.equal(ds.has_artefact, ds.artefact_map.flatten(1).any(dim=1))


def test_artefact_flag_implies_visible_artefact():
    ds = SyntheticShortcuts(1, image_size=16, correlation=1.0, artefact_kinds=("bubble",), seed=68)
    assert bool(ds.has_artefact[0])
    assert bool(ds.artefact_map[0].any())


def test_deterministic_by_seed():
    a = SyntheticShortcuts(9, image_size=16, seed=5)
    b = SyntheticShortcuts(9, image_size=16, seed=5)
    c = SyntheticShortcuts(9, image_size=16, seed=6)
    for key, value in a.tensors().items():
        assert torch.equal(value, b.tensors()[key]), key
    assert not torch.equal(a.images, c.images)
    # Drawing does not depend on the global RNG.
    state = torch.random.get_rng_state()
    torch.manual_seed(1234)
    d = SyntheticShortcuts(9, image_size=16, seed=5)
    assert torch.equal(a.images, d.images)
    torch.random.set_rng_state(state)


@pytest.mark.parametrize("seed", [0, 1])
def test_full_correlation(seed):
    ds = dataset(40, correlation=1.0, seed=seed)
    label = ds.labels.bool()
    assert label.any() and (~label).any()
    assert bool(ds.has_artefact[label].all()), "every label-1 image has an artefact"
    assert not bool(ds.has_artefact[~label].any()), "no label-0 image has an artefact"
    assert not bool(ds.artefact_map[~label].any())
    anti = dataset(40, correlation=-1.0, seed=seed)
    assert torch.equal(anti.has_artefact, ~anti.labels.bool())


@given(st.integers(1, 30), st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.77, 1.0]))
def test_fine_fraction_count(count, fraction):
    ds = SyntheticShortcuts(count, image_size=16, fine_fraction=fraction, seed=count)
    assert int(ds.has_fine.sum()) == round(fraction * count)


def test_only_requested_artefact_kinds():
    ds = dataset(30, artefact_kinds=("ruler",), correlation=1.0, seed=4)
    assert ds.artefacts.shape == (30, 1) and ds.artefact_names == ["ruler"]
    assert torch.equal(ds.artefacts[:, 0].bool(), ds.labels.bool())


@pytest.mark.parametrize("kwargs,match", [
    (dict(count=0), "count"), (dict(count=2.0), "count"), (dict(image_size=15), "image_size"),
    (dict(image_size=16.0), "image_size"), (dict(artefact_kinds=("ruler", "hair")), "artefact_kinds"),
    (dict(artefact_kinds=()), "artefact_kinds"), (dict(correlation=1.5), "correlation"),
    (dict(correlation=-1.01), "correlation"), (dict(fine_fraction=-0.1), "fine_fraction"),
    (dict(fine_fraction=1.1), "fine_fraction"),
])
def test_invalid_arguments(kwargs, match):
    kwargs = {"count": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        SyntheticShortcuts(**kwargs)
