"""Tests of pyunlearn.metrics.segmentation: pooled scores, AUROC / subgroup AUROC, Dice, S_global."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from pyunlearn.metrics.segmentation import auroc, dice, pooled_scores, s_global, subgroup_auroc


# --------------------------------------------------------------------------------------------------
# Strategies and helpers
# --------------------------------------------------------------------------------------------------
@st.composite
def scored_labels(draw, tie_heavy: bool = True):
    n = draw(st.integers(2, 40))
    labels = draw(st.lists(st.booleans(), min_size=n, max_size=n).filter(lambda v: 0 < sum(v) < len(v)))
    if tie_heavy:
        scores = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    else:
        scores = draw(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=n, max_size=n))
    return np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)


def _entropy_mm(counter: Counter) -> float:
    """Miller–Madow entropy (nats) from a Counter of observations."""
    n = sum(counter.values())
    h = -sum(c / n * math.log(c / n) for c in counter.values() if c > 0)
    m = sum(1 for c in counter.values() if c > 0)
    return h + (m - 1) / (2 * n)


def _s_global_reference(z: np.ndarray, s: np.ndarray, y: np.ndarray, background: int = 0) -> float:
    """Naive S_global: per class, I = H_MM(S) + H_MM(Y) - H_MM(S, Y), clamped, times P(Z = k)."""
    z, s, y = z.ravel(), s.ravel().astype(int), y.ravel()
    best = 0.0
    for k in np.unique(z):
        if k == background:
            continue
        sel = z == k
        ss, yy = s[sel].tolist(), y[sel].tolist()
        mi = _entropy_mm(Counter(ss)) + _entropy_mm(Counter(yy)) - _entropy_mm(Counter(zip(ss, yy)))
        best = max(best, sel.mean() * max(mi, 0.0))
    return best


def _shortcut_maps(b: int, h: int, w: int, seed: int):
    """Z = lesion ∪ artefact, Y = lesion, S = artefact (disjoint), with per-image varying sizes."""
    rng = np.random.default_rng(seed)
    y = np.zeros((b, h, w), dtype=np.int64)
    s = np.zeros((b, h, w), dtype=bool)
    for i in range(b):
        r = int(rng.integers(2, h // 2 + 1))
        y[i, 1 : 1 + r, 1 : 1 + r] = 1
        if rng.random() < 0.7:
            a = int(rng.integers(1, h // 3 + 1))
            s[i, h - 1 - a : h - 1, w - 1 - a : w - 1] = True
    z = (y.astype(bool) | s).astype(np.int64)
    return torch.from_numpy(z), torch.from_numpy(s), torch.from_numpy(y)


# --------------------------------------------------------------------------------------------------
# AUROC
# --------------------------------------------------------------------------------------------------
@given(scored_labels(tie_heavy=True))
def test_auroc_matches_sklearn_with_ties(data):
    scores, labels = data
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@given(scored_labels(tie_heavy=False))
def test_auroc_matches_sklearn_continuous_and_torch_input(data):
    scores, labels = data
    ref = roc_auc_score(labels, scores)
    assert auroc(scores, labels) == pytest.approx(ref, abs=1e-12)
    assert auroc(torch.from_numpy(scores), torch.from_numpy(labels).long()) == pytest.approx(ref, abs=1e-12)


def test_auroc_simple_values():
    y = np.array([0, 0, 1, 1, 0])
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9, 0.3]), y) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.1, 0.2, 0.7]), y) == 0.0
    assert auroc(np.full(5, 0.3), y) == 0.5
    assert auroc([1.0, 0.0], [True, False]) == 1.0  # plain sequences, B = 2


@pytest.mark.parametrize(
    "scores, labels, match",
    [
        ([0.1, 0.2, 0.3], [1, 1, 1], "both classes"),
        ([0.1, 0.2, 0.3], [0, 0, 0], "both classes"),
        ([0.1, float("nan"), 0.3], [0, 1, 0], "NaN"),
        ([0.1, 0.2, 0.3], [0, 1], "shape"),
        ([0.1, 0.2, 0.3], [0, 2, 1], "binary"),
        ([[0.1, 0.2]], [[0, 1]], "1-D"),
    ],
)
def test_auroc_invalid(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        auroc(np.asarray(scores), np.asarray(labels))


# --------------------------------------------------------------------------------------------------
# Subgroup AUROC
# --------------------------------------------------------------------------------------------------
def _balanced_subgroups(n_per: int = 3):
    labels = np.repeat([1, 1, 0, 0], n_per)
    art = np.repeat([1, 0, 1, 0], n_per)
    return labels, art


def test_subgroup_auroc_shortcut_score():
    labels, art = _balanced_subgroups(3)
    out = subgroup_auroc(art.astype(float), labels, art)
    g = out["groups"]
    assert set(g) == {
        "pos_art_vs_neg_art", "pos_art_vs_neg_clean", "pos_clean_vs_neg_art", "pos_clean_vs_neg_clean"
    }
    assert g["pos_art_vs_neg_clean"] == 1.0
    assert g["pos_clean_vs_neg_art"] == 0.0
    assert g["pos_art_vs_neg_art"] == 0.5 and g["pos_clean_vs_neg_clean"] == 0.5
    assert out["worst_group_auroc"] == 0.0
    assert out["auroc"] == pytest.approx(roc_auc_score(labels, art))


def test_subgroup_auroc_perfect_score():
    labels, art = _balanced_subgroups(2)
    out = subgroup_auroc(torch.tensor(labels, dtype=torch.float32), torch.tensor(labels), torch.tensor(art))
    assert out["auroc"] == 1.0
    assert all(v == 1.0 for v in out["groups"].values())
    assert out["worst_group_auroc"] == 1.0


@given(st.data())
def test_subgroup_auroc_matches_subset_auroc(data):
    n = data.draw(st.integers(2, 30))
    labels = np.asarray(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    art = np.asarray(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    scores = np.asarray(data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)), dtype=float)
    groups_nonempty = any(
        (labels & (art == a)).any() and (~labels & (art == b)).any() for a in (0, 1) for b in (0, 1)
    )
    if not groups_nonempty:
        with pytest.raises(ValueError):
            subgroup_auroc(scores, labels, art)
        return
    out = subgroup_auroc(scores, labels, art)
    names = {(1, 1): "pos_art_vs_neg_art", (1, 0): "pos_art_vs_neg_clean",
             (0, 1): "pos_clean_vs_neg_art", (0, 0): "pos_clean_vs_neg_clean"}
    vals = []
    for (a, b), name in names.items():
        sel = (labels & (art == a)) | (~labels & (art == b))
        if (labels & (art == a)).any() and (~labels & (art == b)).any():
            ref = roc_auc_score(labels[sel], scores[sel])
            assert out["groups"][name] == pytest.approx(ref, abs=1e-12)
            vals.append(ref)
        else:
            assert out["groups"][name] is None
    assert out["worst_group_auroc"] == pytest.approx(min(vals), abs=1e-12)
    assert out["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_subgroup_auroc_missing_groups_are_none_and_skipped():
    # No clean negatives: the two "..._vs_neg_clean" groups are empty.
    labels = np.array([1, 1, 0, 0, 1])
    art = np.array([1, 0, 1, 1, 1])
    scores = np.array([0.9, 0.1, 0.5, 0.6, 0.95])
    out = subgroup_auroc(scores, labels, art)
    assert out["groups"]["pos_art_vs_neg_clean"] is None
    assert out["groups"]["pos_clean_vs_neg_clean"] is None
    assert out["groups"]["pos_clean_vs_neg_art"] == 0.0
    assert out["worst_group_auroc"] == 0.0


def test_subgroup_auroc_invalid():
    with pytest.raises(ValueError, match="no subgroup"):
        subgroup_auroc(np.array([0.1, 0.2]), np.array([1, 1]), np.array([0, 1]))
    with pytest.raises(ValueError, match="spurious shape"):
        subgroup_auroc(np.array([0.1, 0.2]), np.array([1, 0]), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="spurious must be binary"):
        subgroup_auroc(np.array([0.1, 0.2]), np.array([1, 0]), np.array([0, 3]))
    with pytest.raises(ValueError, match="NaN"):
        subgroup_auroc(np.array([0.1, np.nan]), np.array([1, 0]), np.array([0, 1]))


# --------------------------------------------------------------------------------------------------
# Pooled scores
# --------------------------------------------------------------------------------------------------
def test_pooled_scores_constant_maps_and_layouts():
    vals = torch.tensor([0.0, 0.25, 1.0])
    probs = vals[:, None, None].expand(3, 5, 7).clone()
    torch.testing.assert_close(pooled_scores(probs), vals)
    torch.testing.assert_close(pooled_scores(probs[:, None]), vals)
    # (B, K, H, W) class probabilities: foreground = 1 - P(background).
    k3 = torch.stack([1 - probs, probs / 2, probs / 2], dim=1)
    torch.testing.assert_close(pooled_scores(k3), vals)


def test_pooled_scores_with_mask_and_gradient():
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 5, 3, generator=g) < 0.5
    mask[:, 0, 0] = True
    out = pooled_scores(probs, mask=mask)
    ref = torch.stack([probs[i][mask[i]].mean() for i in range(2)])
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(pooled_scores(probs, mask=mask[:, None].long()), ref)
    # A constant value inside the mask and anything outside: the masked score is that constant.
    const = torch.where(mask, torch.tensor(0.4, dtype=torch.float64), torch.tensor(0.9, dtype=torch.float64))
    torch.testing.assert_close(pooled_scores(const, mask=mask), torch.full((2,), 0.4, dtype=torch.float64))
    out.sum().backward()
    assert probs.grad is not None and torch.isfinite(probs.grad).all()


def test_pooled_scores_invalid():
    p = torch.full((2, 4, 4), 0.5)
    with pytest.raises(ValueError, match="empty"):
        pooled_scores(p, mask=torch.zeros(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not match"):
        pooled_scores(p, mask=torch.ones(2, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="binary"):
        pooled_scores(p, mask=torch.full((2, 4, 4), 0.5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pooled_scores(p * 3)
    with pytest.raises(ValueError, match="NaN"):
        pooled_scores(torch.full((1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="shape"):
        pooled_scores(torch.full((4, 4), 0.5))
    with pytest.raises(TypeError, match="floating"):
        pooled_scores(torch.ones(1, 2, 2, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# Dice
# --------------------------------------------------------------------------------------------------
@st.composite
def mask_pair(draw):
    b, h, w = draw(st.integers(1, 4)), draw(st.integers(1, 7)), draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9]))
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, w, generator=g) < density, torch.rand(b, h, w, generator=g) < 0.4


@given(mask_pair())
def test_dice_identities(pair):
    p, t = pair
    assert dice(p, p) == pytest.approx(1.0, abs=1e-12)
    assert dice(p, t) == pytest.approx(dice(t, p), abs=0)
    assert 0.0 <= dice(p, t) <= 1.0
    total = int(p.sum() + t.sum())
    if total:
        exact = 2 * int((p & t).sum()) / total
        assert dice(p, t) == pytest.approx(exact, abs=1e-6)
    if t.any():  # disjoint masks, not both empty
        assert dice(p & ~t, t) == pytest.approx(0.0, abs=1e-6)
    per = dice(p, t, per_sample=True)
    assert per.shape == (p.shape[0],) and per.dtype == torch.float64
    for i in range(p.shape[0]):
        assert per[i].item() == pytest.approx(dice(p[i : i + 1], t[i : i + 1]), abs=1e-15)
    torch.testing.assert_close(dice(p.long(), t.float(), per_sample=True), per)


def test_dice_fixed_values():
    e = torch.zeros(1, 3, 3, dtype=torch.bool)
    assert dice(e, e) == 1.0
    a = torch.zeros(2, 3, 3, dtype=torch.bool)
    a[0, 0, :] = True
    b = torch.zeros(2, 3, 3, dtype=torch.bool)
    b[0, 0, :2] = True
    assert dice(a, b) == pytest.approx(2 * 2 / 5, abs=1e-7)
    torch.testing.assert_close(dice(a, b, per_sample=True), torch.tensor([0.8, 1.0], dtype=torch.float64))
    d = torch.zeros(1, 3, 3, dtype=torch.bool)
    d[0, 2, 2] = True
    assert dice(a[:1], d) == pytest.approx(0.0, abs=1e-7)
    assert dice(a.numpy(), b.numpy()) == dice(a, b)


def test_dice_invalid():
    m = torch.zeros(2, 3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="pred shape"):
        dice(m, torch.zeros(2, 3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="pred must be binary"):
        dice(m.float() + 0.5, m)
    with pytest.raises(ValueError, match="target must be binary"):
        dice(m, m.long() + 2)
    with pytest.raises(ValueError, match="eps"):
        dice(m, m, eps=0.0)
    with pytest.raises(ValueError, match="batch first"):
        dice(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------
# S_global
# --------------------------------------------------------------------------------------------------
def test_s_global_independent_is_near_zero():
    g = torch.Generator().manual_seed(11)
    b, h, w = 37, 13, 11
    y = (torch.rand(b, h, w, generator=g) < 0.3).long()
    s = torch.rand(b, h, w, generator=g) < 0.2
    z = (torch.rand(b, h, w, generator=g) < 0.6).long()  # independent of (S, Y): S ⟂ Y | Z
    est, (lo, hi) = s_global(z, s, y, n_boot=100, seed=1)
    assert 0.0 <= est < 1e-3
    assert 0.0 <= lo <= 1e-4 and hi < 2e-3


def test_s_global_exactly_zero_when_s_constant_within_prediction():
    g = torch.Generator().manual_seed(2)
    y = (torch.rand(5, 9, 9, generator=g) < 0.5).long()
    s = torch.zeros(5, 9, 9, dtype=torch.bool)
    s[:, :3] = True
    z = torch.zeros(5, 9, 9, dtype=torch.long)
    z[:, 3:] = 1  # within Z = 1 there are no artefacts; within Z = 0 (background) S and Y may depend
    assert s_global(z, s, y, n_boot=20) == (0.0, (0.0, 0.0))
    # All-background prediction: no non-background class, S_global = 0.
    assert s_global(torch.zeros_like(z), s, y, n_boot=5) == (0.0, (0.0, 0.0))


def test_s_global_shortcut_analytic_value():
    b, h, w = 7, 10, 10
    y = torch.zeros(b, h, w, dtype=torch.long)
    y[:, 1:5, 1:5] = 1  # 16 lesion pixels
    s = torch.zeros(b, h, w, dtype=torch.bool)
    s[:, 7:9, 6:10] = True  # 8 artefact pixels, outside the lesion
    z = (y.bool() | s).long()
    est, (lo, hi) = s_global(z, s, y, n_boot=50)
    n_k = b * 24
    p1 = 24 / 100
    h_y = -(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3)  # within Z = 1, S determines Y
    # All four occupied-cell counts: m_SY = m_S = m_Y = 2 -> I_MM = I_plugin + 1 / (2 n_k).
    assert est == pytest.approx(p1 * (h_y + 1 / (2 * n_k)), rel=1e-12)
    assert est == pytest.approx(_s_global_reference(z.numpy(), s.numpy(), y.numpy()), rel=1e-12)
    assert lo == pytest.approx(est) and hi == pytest.approx(est)  # identical images
    # A prediction equal to the fine label carries no spurious information.
    est_y, _ = s_global(y, s, y, n_boot=50)
    assert est_y == 0.0 and est > 0.1


def test_s_global_shortcut_vs_fine_prediction_heterogeneous():
    z, s, y = _shortcut_maps(23, 15, 13, seed=5)
    est, (lo, hi) = s_global(z, s, y, n_boot=200, seed=3)
    est_fine, (lo_f, hi_f) = s_global(y, s, y, n_boot=200, seed=3)
    assert est > 0.02 and est_fine == 0.0 and hi_f == 0.0
    assert lo > 0.0
    assert lo <= est <= hi  # interval contains the point estimate
    # Determinism for a fixed seed; a different seed changes the interval but not the estimate.
    assert s_global(z, s, y, n_boot=200, seed=3) == (est, (lo, hi))
    est2, ci2 = s_global(z, s, y, n_boot=200, seed=4)
    assert est2 == est and ci2 != (lo, hi)
    # Numpy inputs give the same answer.
    assert s_global(z.numpy(), s.numpy(), y.numpy(), n_boot=200, seed=3) == (est, (lo, hi))


def test_s_global_permutation_invariance():
    z, s, y = _shortcut_maps(17, 9, 11, seed=8)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(17))
    est, _ = s_global(z, s, y, n_boot=10)
    est_p, _ = s_global(z[perm], s[perm], y[perm], n_boot=10)
    assert est_p == pytest.approx(est, rel=1e-12, abs=1e-15)


def test_s_global_bootstrap_resamples_images():
    # With one resample, the interval collapses to the estimate on the drawn images (whole images,
    # drawn with numpy.random.default_rng(seed).integers(0, B, size=(n_boot, B))).
    z, s, y = _shortcut_maps(11, 8, 9, seed=1)
    _, (lo, hi) = s_global(z, s, y, n_boot=1, seed=7)
    idx = torch.from_numpy(np.random.default_rng(7).integers(0, 11, size=(1, 11))[0])
    ref, _ = s_global(z[idx], s[idx], y[idx], n_boot=1)
    assert lo == pytest.approx(ref, rel=1e-12) and hi == pytest.approx(ref, rel=1e-12)


@given(
    st.integers(1, 4), st.integers(1, 6), st.integers(1, 5), st.integers(2, 4), st.integers(2, 3),
    st.integers(0, 2**31 - 1), st.integers(0, 2),
)
def test_s_global_matches_naive_reference(b, h, w, kz, ky, seed, background):
    rng = np.random.default_rng(seed)
    z = rng.integers(0, kz, size=(b, h, w))
    y = rng.integers(0, ky, size=(b, h, w))
    # Make S depend on Y within part of the image so the estimate is often positive.
    s = np.where(rng.random((b, h, w)) < 0.5, y > 0, rng.random((b, h, w)) < 0.3)
    est, (lo, hi) = s_global(torch.from_numpy(z), torch.from_numpy(s), torch.from_numpy(y),
                             background=background, n_boot=5, seed=seed)
    assert est == pytest.approx(_s_global_reference(z, s, y, background), rel=1e-9, abs=1e-12)
    assert 0.0 <= lo <= hi


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(label=torch.zeros(2, 4, 5, dtype=torch.long)), ValueError, "label shape"),
        (dict(spurious=torch.zeros(2, 4, dtype=torch.bool)), ValueError, "spurious shape"),
        (dict(pred=torch.zeros(2, 4, 4)), TypeError, "pred must be an integer"),
        (dict(label=-torch.ones(2, 4, 4, dtype=torch.long)), ValueError, "non-negative"),
        (dict(spurious=torch.full((2, 4, 4), 2)), ValueError, "spurious must be binary"),
        (dict(n_boot=0), ValueError, "n_boot"),
        (dict(ci=1.0), ValueError, "ci"),
        (dict(background=0.5), TypeError, "background"),
        (dict(pred=torch.zeros(0, 4, 4, dtype=torch.long), spurious=torch.zeros(0, 4, 4, dtype=torch.bool),
              label=torch.zeros(0, 4, 4, dtype=torch.long)), ValueError, "no pixels"),
    ],
)
def test_s_global_invalid(kwargs, exc, match):
    args = dict(pred=torch.zeros(2, 4, 4, dtype=torch.long), spurious=torch.zeros(2, 4, 4, dtype=torch.bool),
                label=torch.zeros(2, 4, 4, dtype=torch.long))
    args.update(kwargs)
    pred, spurious, label = args.pop("pred"), args.pop("spurious"), args.pop("label")
    with pytest.raises(exc, match=match):
        s_global(pred, spurious, label, **args)
