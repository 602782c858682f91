"""Tests of pyunlearn.masks: coarse annotations and the forget/retain split of the pixels."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pyunlearn.masks import coarsen, forget_retain

odd = st.sampled_from([1, 3, 5, 7, 9, 11])


@st.composite
def masks(draw, *, min_side: int = 1) -> np.ndarray:
    """A random bool (H, W) mask with odd H, W."""
    h = draw(odd.filter(lambda n: n >= min_side))
    w = draw(odd.filter(lambda n: n >= min_side))
    return draw(arrays(np.bool_, (h, w)))


def distance2_to(mask: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance of every pixel to the nearest True pixel of ``mask`` (brute force)."""
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w]
    fy, fx = np.nonzero(mask)
    if fy.size == 0:
        return np.full((h, w), np.inf)
    d2 = (yy[..., None] - fy) ** 2 + (xx[..., None] - fx) ** 2
    return d2.min(axis=-1).astype(np.float64)


# ------------------------------------------------------------------ coarsen, dilate mode
@given(masks(), st.integers(0, 4))
def test_dilation_is_exact_euclidean_disk(fine_np, radius):
    fine = torch.from_numpy(fine_np)
    coarse = coarsen(fine, radius=radius)
    assert coarse.dtype == torch.bool and coarse.shape == fine.shape
    assert bool((coarse | ~fine).all()), "coarse must contain fine"
    d2 = distance2_to(fine_np)
    # Every coarse pixel lies within distance r of fine, and every pixel within distance r is coarse.
    np.testing.assert_array_equal(coarse.numpy(), d2 <= radius * radius)
    band = (coarse & ~fine).numpy()
    assert (d2[band] <= radius * radius).all()
    assert (d2[band] >= 1).all()


@given(masks())
def test_dilation_radius_zero_is_identity(fine_np):
    fine = torch.from_numpy(fine_np)
    out = coarsen(fine, radius=0)
    assert torch.equal(out, fine)
    assert out.data_ptr() != fine.data_ptr(), "radius 0 must return a new tensor, not alias the input"


def test_default_radius_is_three():
    fine = torch.zeros(11, 11, dtype=torch.bool)
    fine[5, 5] = True
    assert torch.equal(coarsen(fine), coarsen(fine, radius=3))
    assert not torch.equal(coarsen(fine), coarsen(fine, radius=2))


def test_dilation_of_single_pixel_is_disk():
    fine = torch.zeros(7, 9, dtype=torch.bool)
    fine[3, 4] = True
    coarse = coarsen(fine, radius=2)
    # The disk of radius 2 holds the 13 offsets with dy^2 + dx^2 <= 4.
    assert int(coarse.sum()) == 13
    assert bool(coarse[1, 4]) and bool(coarse[3, 2]) and bool(coarse[2, 3])
    assert not bool(coarse[1, 3]) and not bool(coarse[5, 5])


# ------------------------------------------------------------------ coarsen, bbox mode
@given(masks(), st.integers(0, 6))
def test_bbox_is_rectangle_containing_fine(fine_np, margin):
    assume(fine_np.any())  # empty masks: test_empty_stays_empty
    fine = torch.from_numpy(fine_np)
    box = coarsen(fine, radius=margin, mode="bbox").numpy()
    assert (box | ~fine_np).all(), "bbox must contain fine"
    rows, cols = box.any(axis=1), box.any(axis=0)
    np.testing.assert_array_equal(box, rows[:, None] & cols[None, :])  # a filled rectangle
    ys, xs = np.nonzero(fine_np)
    h, w = fine_np.shape
    expect_rows = np.zeros(h, bool)
    expect_rows[max(ys.min() - margin, 0):ys.max() + margin + 1] = True
    expect_cols = np.zeros(w, bool)
    expect_cols[max(xs.min() - margin, 0):xs.max() + margin + 1] = True
    np.testing.assert_array_equal(rows, expect_rows)
    np.testing.assert_array_equal(cols, expect_cols)


def test_bbox_default_margin_is_zero():
    fine = torch.zeros(5, 7, dtype=torch.bool)
    fine[1, 2] = fine[3, 4] = True
    box = coarsen(fine, mode="bbox")
    assert int(box.sum()) == 9 and bool(box[1:4, 2:5].all())


@pytest.mark.parametrize("mode", ["dilate", "bbox"])
@pytest.mark.parametrize("radius", [0, 1, 2])
@pytest.mark.parametrize("shape", [(1, 3), (5, 5), (3, 7), (2, 3, 9, 5)])
def test_empty_stays_empty(mode, radius, shape):
    out = coarsen(torch.zeros(shape, dtype=torch.bool), radius=radius, mode=mode)
    assert out.shape == shape and not bool(out.any())


@pytest.mark.parametrize("shape,radius", [((1, 1), 2), ((5, 5), 4), ((5, 5), 10), ((3, 7), 6)])
def test_bbox_empty_stays_empty_for_large_margin(shape, radius):
    out = coarsen(torch.zeros(shape, dtype=torch.bool), radius=radius, mode="bbox")
    assert not bool(out.any())


@pytest.mark.parametrize("mode", ["dilate", "bbox"])
@given(data=st.data())
def test_batch_dims_match_per_image(mode, data):
    h = data.draw(odd)
    w = data.draw(odd)
    batch = data.draw(arrays(np.bool_, (2, 3, h, w)))
    radius = data.draw(st.integers(0, 2))
    fine = torch.from_numpy(batch)
    out = coarsen(fine, radius=radius, mode=mode)
    assert out.shape == fine.shape
    for i in range(2):
        for j in range(3):
            assert torch.equal(out[i, j], coarsen(fine[i, j], radius=radius, mode=mode))


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.float32, torch.float64])
def test_coarsen_accepts_01_numbers(dtype):
    fine_b = torch.zeros(5, 7, dtype=torch.bool)
    fine_b[2, 3] = True
    assert torch.equal(coarsen(fine_b.to(dtype), radius=1), coarsen(fine_b, radius=1))


def test_coarsen_errors():
    fine = torch.zeros(5, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="binary"):
        coarsen(torch.full((5, 5), 2))
    with pytest.raises(ValueError, match="binary"):
        coarsen(torch.full((5, 5), 0.5))
    with pytest.raises(ValueError, match=r"at least 2 dims.*\(5,\)"):
        coarsen(torch.zeros(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="torch.Tensor"):
        coarsen(np.zeros((5, 5), bool))
    for bad in (-1, 1.0, True, "2"):
        with pytest.raises(ValueError, match="radius"):
            coarsen(fine, radius=bad)
    with pytest.raises(ValueError, match="mode.*'circle'"):
        coarsen(fine, mode="circle")


# ------------------------------------------------------------------ forget_retain
@given(masks(), st.integers(0, 3), st.sampled_from(["dilate", "bbox"]))
def test_forget_retain_identities(fine_np, radius, mode):
    fine = torch.from_numpy(fine_np)
    coarse = coarsen(fine, radius=radius, mode=mode)
    forget, retain = forget_retain(coarse, fine)
    assert forget.dtype == torch.bool and retain.dtype == torch.bool
    assert forget.shape == retain.shape == fine.shape
    assert bool((forget | retain).all())
    assert not bool((forget & retain).any())
    assert torch.equal(forget, coarse & ~fine)
    assert bool((retain | ~fine).all()), "fine must lie inside retain"
    assert not bool((forget & fine).any())


@given(data=st.data())
def test_forget_retain_with_arbitrary_coarse_superset(data):
    h, w = data.draw(odd), data.draw(odd)
    fine_np = data.draw(arrays(np.bool_, (3, h, w)))
    extra = data.draw(arrays(np.bool_, (3, h, w)))
    fine = torch.from_numpy(fine_np)
    coarse = fine | torch.from_numpy(extra)
    forget, retain = forget_retain(coarse, fine)
    assert torch.equal(forget, coarse & ~fine)
    assert torch.equal(retain, ~forget)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float32, torch.float64])
def test_forget_retain_accepts_01_numbers(dtype):
    fine = torch.zeros(3, 5, dtype=torch.bool)
    fine[1, 2] = True
    coarse = coarsen(fine, radius=1)
    f_ref, r_ref = forget_retain(coarse, fine)
    forget, retain = forget_retain(coarse.to(dtype), fine.to(dtype))
    assert forget.dtype == torch.bool
    assert torch.equal(forget, f_ref) and torch.equal(retain, r_ref)


def test_forget_retain_errors():
    fine = torch.zeros(2, 5, 5, dtype=torch.bool)
    fine[1, 2, 2] = True
    coarse = torch.zeros_like(fine)
    with pytest.raises(ValueError, match="not inside the coarse mask") as info:
        forget_retain(coarse, fine)
    assert "1 pixels in 1 image(s)" in str(info.value) and "index 1" in str(info.value)
    half = coarse.float()
    half[0, 0, 0] = 0.5
    with pytest.raises(ValueError, match="coarse must be binary.*0.5"):
        forget_retain(half, fine)
    with pytest.raises(ValueError, match="fine must be binary"):
        forget_retain(coarsen(fine), fine.float() * 0.5)
    with pytest.raises(ValueError, match=r"\(2, 5, 5\).*\(2, 5, 3\)"):
        forget_retain(coarsen(fine), fine[..., :3])
    with pytest.raises(ValueError, match="at least 2 dims"):
        forget_retain(torch.ones(5, dtype=torch.bool), torch.ones(5, dtype=torch.bool))
