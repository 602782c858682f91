"""Evaluation metrics (DESIGN.md "Metrics", "Pipeline" step 3).

* :func:`pooled_scores` — image score = average pixel foreground probability (average pooling).
* :func:`auroc`, :func:`subgroup_auroc` — Mann–Whitney AUROC overall and per spurious subgroup
  (artefact present / absent x label), worst-group AUROC.
* :func:`dice` — Dice overlap of binary masks (global over the batch, or per image).
* :func:`s_global` — global spurious mutual information of a pixel-wise prediction, with a
  Miller–Madow bias correction and an image-level bootstrap percentile interval.

Volumes: every per-pixel function takes ``(B, D, H, W)`` maps as it takes ``(B, H, W)`` ones (voxels are
pixels; an image is a volume); :func:`pooled_scores` needs ``spatial_dims=3`` for ``(B, D, H, W)``
probabilities (which would otherwise read as ``(B, K, H, W)``) and infers it from 5-D ones.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor

__all__ = ["pooled_scores", "auroc", "subgroup_auroc", "dice", "s_global"]

GROUP_NAMES = (
    "pos_art_vs_neg_art",
    "pos_art_vs_neg_clean",
    "pos_clean_vs_neg_art",
    "pos_clean_vs_neg_clean",
)


# --------------------------------------------------------------------------------------------------
# Input helpers
# --------------------------------------------------------------------------------------------------
def _to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)
    except Exception as exc:  # pragma: no cover - defensive
        raise TypeError(f"{name} must be a torch.Tensor, numpy array or sequence, got {type(x)!r}") from exc


def _to_tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x)!r}")


def _check_binary_np(x: np.ndarray, name: str) -> np.ndarray:
    """Return ``x`` as a bool array; raise if it holds values other than 0/1."""
    if x.dtype == np.bool_:
        return x
    if not (np.issubdtype(x.dtype, np.number)):
        raise TypeError(f"{name} must be numeric or bool, got dtype {x.dtype}")
    if x.size and not np.all((x == 0) | (x == 1)):
        bad = np.unique(x[(x != 0) & (x != 1)])[:5]
        raise ValueError(f"{name} must be binary (0/1 or bool); found values {bad.tolist()}")
    return x.astype(bool)


def _check_binary_t(x: Tensor, name: str) -> Tensor:
    """Return ``x`` as a bool tensor; raise if it holds values other than 0/1."""
    if x.dtype == torch.bool:
        return x
    if x.is_complex():
        raise TypeError(f"{name} must be real or bool, got dtype {x.dtype}")
    if x.numel() and not bool(((x == 0) | (x == 1)).all()):
        bad = torch.unique(x[(x != 0) & (x != 1)])[:5]
        raise ValueError(f"{name} must be binary (0/1 or bool); found values {bad.tolist()}")
    return x.bool()


# --------------------------------------------------------------------------------------------------
# Image scores
# --------------------------------------------------------------------------------------------------
def pooled_scores(probs: Tensor, *, mask: Optional[Tensor] = None, spatial_dims: Optional[int] = None) -> Tensor:
    """Image scores by average pixel pooling of foreground probabilities.

    probs: (B, H, W) or (B, 1, H, W) foreground probabilities, or (B, K, H, W) with K >= 2 class
    probabilities (foreground = 1 - probs[:, 0], i.e. "not background"). Volumes (``spatial_dims=3``):
    (B, D, H, W), (B, 1, D, H, W) or (B, K, D, H, W), the score averaging over every voxel.
    mask: optional (B, H, W) or (B, 1, H, W) binary mask ((B, D, H, W) or (B, 1, D, H, W) for volumes);
    the mean is then over the masked pixels only (every image needs at least one).
    spatial_dims: 2 (images) or 3 (volumes); ``None`` (default) is 3 for 5-D ``probs`` and 2 otherwise, so a
    4-D ``probs`` reads as (B, K, H, W) unless ``spatial_dims=3`` says it is (B, D, H, W).
    Returns a (B,) tensor of probs' dtype; differentiable.
    """
    if not isinstance(probs, Tensor):
        raise TypeError(f"probs must be a torch.Tensor, got {type(probs)!r}")
    if not probs.is_floating_point():
        raise TypeError(f"probs must be a floating tensor of probabilities, got dtype {probs.dtype}")
    if spatial_dims is None:
        spatial_dims = 3 if probs.ndim == 5 else 2
    if isinstance(spatial_dims, bool) or spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be None, 2 (images) or 3 (volumes), got {spatial_dims!r}")
    if probs.ndim == 1 + spatial_dims:
        fg = probs
    elif probs.ndim == 2 + spatial_dims:
        fg = probs[:, 0] if probs.shape[1] == 1 else 1.0 - probs[:, 0]
    elif spatial_dims == 2:
        raise ValueError(
            f"probs must have shape (B, H, W), (B, 1, H, W) or (B, K, H, W); got {tuple(probs.shape)} "
            "(volumes: (B, K, D, H, W), or spatial_dims=3)"
        )
    else:
        raise ValueError(
            f"probs must have shape (B, D, H, W), (B, 1, D, H, W) or (B, K, D, H, W) for spatial_dims=3; got "
            f"{tuple(probs.shape)}"
        )
    if probs.shape[0] == 0:
        raise ValueError("probs has an empty batch (B = 0)")
    with torch.no_grad():
        if bool(torch.isnan(probs).any()):
            raise ValueError("probs contains NaN")
        if bool(((probs < 0) | (probs > 1)).any()):
            raise ValueError(
                f"probs must lie in [0, 1] (got range [{float(probs.min())}, {float(probs.max())}]); "
                "pass probabilities (sigmoid/softmax), not logits"
            )
    if mask is None:
        return fg.flatten(1).mean(dim=1)
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask)!r}")
    if mask.ndim == 2 + spatial_dims:
        if mask.shape[1] != 1:
            dims = "H, W" if spatial_dims == 2 else "D, H, W"
            raise ValueError(f"mask must have shape (B, {dims}) or (B, 1, {dims}); got {tuple(mask.shape)}")
        mask = mask[:, 0]
    if mask.shape != fg.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the probability map shape {tuple(fg.shape)} "
            f"(from probs {tuple(probs.shape)})"
        )
    if mask.device != fg.device:
        raise ValueError(f"mask is on {mask.device} but probs is on {fg.device}")
    m = _check_binary_t(mask, "mask").flatten(1)
    count = m.sum(dim=1)
    empty = (count == 0).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"mask is empty for image(s) {empty[:10].tolist()}; cannot average over no pixels")
    fgf = fg.flatten(1)
    return (fgf * m.to(fgf.dtype)).sum(dim=1) / count.to(fgf.dtype)


# --------------------------------------------------------------------------------------------------
# AUROC
# --------------------------------------------------------------------------------------------------
def _scores_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = _to_numpy(scores, "scores")
    y = _to_numpy(labels, "labels")
    if s.shape != y.shape:
        raise ValueError(f"scores shape {s.shape} does not match labels shape {y.shape}")
    if s.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D (one entry per image); got shape {s.shape}")
    if not (np.issubdtype(s.dtype, np.number) or s.dtype == np.bool_):
        raise TypeError(f"scores must be numeric, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if np.isnan(s).any():
        raise ValueError(f"scores contains NaN at index/indices {np.flatnonzero(np.isnan(s))[:10].tolist()}")
    return s, _check_binary_np(y, "labels")


def _auroc_np(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann–Whitney U / (n_pos n_neg), ties counted 1/2 (via average ranks)."""
    n_pos, n_neg = pos.size, neg.size
    ranks = rankdata(np.concatenate([pos, neg]), method="average")
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve = P(score_pos > score_neg) + P(tie) / 2 (Mann–Whitney).

    scores, labels: 1-D numpy arrays, torch tensors or sequences of equal length; labels binary.
    Raises ValueError if either class is missing or scores contain NaN (±inf are ranked normally).
    """
    s, y = _scores_labels(scores, labels)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(
            f"AUROC needs both classes; labels has {n_pos} positive(s) and {y.size - n_pos} negative(s)"
        )
    return _auroc_np(s[y], s[~y])


def subgroup_auroc(scores: Any, labels: Any, spurious: Any) -> dict:
    """AUROC overall and between the spurious subgroups (artefact present/absent x label).

    Group ``pos_{a}_vs_neg_{b}`` is the AUROC of the positives with artefact status ``a`` against the
    negatives with artefact status ``b`` (``art`` = artefact present, ``clean`` = absent).
    ``pos_clean_vs_neg_art`` is where an artefact shortcut misleads (a shortcut model scores it ~0);
    ``pos_art_vs_neg_clean`` is where it helps. A group with no positives or no negatives is None.

    Returns ``{"auroc": float, "groups": {name: float | None}, "worst_group_auroc": float}``, the
    worst group being the minimum over the non-empty groups.
    """
    s, y = _scores_labels(scores, labels)
    a = _to_numpy(spurious, "spurious")
    if a.shape != s.shape:
        raise ValueError(f"spurious shape {a.shape} does not match scores/labels shape {s.shape}")
    a = _check_binary_np(a, "spurious")
    n_pos = int(y.sum())
    overall = None if n_pos == 0 or n_pos == y.size else _auroc_np(s[y], s[~y])
    groups: dict[str, Optional[float]] = {}
    for name, a_pos, a_neg in zip(GROUP_NAMES, (True, True, False, False), (True, False, True, False)):
        pos = s[y & (a == a_pos)]
        neg = s[~y & (a == a_neg)]
        groups[name] = _auroc_np(pos, neg) if pos.size and neg.size else None
    valid = [v for v in groups.values() if v is not None]
    if not valid:
        raise ValueError(
            "no subgroup pairing has both positives and negatives "
            f"({n_pos} positive(s), {y.size - n_pos} negative(s), {int(a.sum())} with artefact)"
        )
    assert overall is not None  # a non-empty group implies both classes are present
    return {"auroc": overall, "groups": groups, "worst_group_auroc": min(valid)}


# --------------------------------------------------------------------------------------------------
# Dice
# --------------------------------------------------------------------------------------------------
def dice(pred: Tensor, target: Tensor, *, eps: float = 1e-7, per_sample: bool = False) -> float | Tensor:
    """Dice overlap of binary masks, (2|P∩T| + eps) / (|P| + |T| + eps).

    pred, target: (B, H, W) (or any (B, ...) shape, equal, e.g. (B, D, H, W) volumes) bool or 0/1 masks,
    tensors or arrays.
    ``eps > 0`` makes two empty masks score exactly 1.0; otherwise the result differs from the exact
    ratio 2|P∩T| / (|P| + |T|) by less than eps / (|P| + |T|). Default: one global Dice over all
    pixels of the batch (a float). ``per_sample=True``: a (B,) float64 tensor, one Dice per image.
    """
    p = _to_tensor(pred, "pred")
    t = _to_tensor(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred shape {tuple(p.shape)} does not match target shape {tuple(t.shape)}")
    if p.ndim < 2:
        raise ValueError(f"pred/target must have shape (B, H, W) (batch first); got {tuple(p.shape)}")
    if p.device != t.device:
        raise ValueError(f"pred is on {p.device} but target is on {t.device}")
    if not (isinstance(eps, (int, float)) and eps > 0 and np.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    pb = _check_binary_t(p, "pred").flatten(1)
    tb = _check_binary_t(t, "target").flatten(1)
    inter = (pb & tb).sum(dim=1).to(torch.float64)
    total = (pb.sum(dim=1) + tb.sum(dim=1)).to(torch.float64)
    if per_sample:
        return (2.0 * inter + eps) / (total + eps)
    return float((2.0 * inter.sum() + eps) / (total.sum() + eps))


# --------------------------------------------------------------------------------------------------
# S_global
# --------------------------------------------------------------------------------------------------
def _xlogx(c: np.ndarray) -> np.ndarray:
    return np.where(c > 0, c * np.log(np.where(c > 0, c, 1.0)), 0.0)


def _s_global_from_tables(tab: np.ndarray, background: int) -> np.ndarray:
    """S_global for count tables ``tab`` of shape (R, Kz, 2, Ky) (counts of (Z, S, Y)); returns (R,).

    Per stratum Z = k with n_k pixels and counts c_sy (margins c_s, c_y):
        I_plugin = (Σ c_sy log c_sy − Σ c_s log c_s − Σ c_y log c_y + n_k log n_k) / n_k
        I_MM     = I_plugin − (m_sy − m_s − m_y + 1) / (2 n_k)        (clamped at 0)
    with m_* the number of occupied cells (see :func:`s_global`).
    """
    tab = tab.astype(np.float64, copy=False)
    n_k = tab.sum(axis=(2, 3))  # (R, Kz)
    total = n_k.sum(axis=1)  # (R,)
    c_s = tab.sum(axis=3)  # (R, Kz, 2)
    c_y = tab.sum(axis=2)  # (R, Kz, Ky)
    ent = (
        _xlogx(tab).sum(axis=(2, 3)) - _xlogx(c_s).sum(axis=2) - _xlogx(c_y).sum(axis=2) + _xlogx(n_k)
    )
    m_sy = (tab > 0).sum(axis=(2, 3))
    m_s = (c_s > 0).sum(axis=2)
    m_y = (c_y > 0).sum(axis=2)
    safe_n = np.where(n_k > 0, n_k, 1.0)
    mi = ent / safe_n - (m_sy - m_s - m_y + 1) / (2.0 * safe_n)
    mi = np.where(n_k > 0, np.maximum(mi, 0.0), 0.0)
    contrib = n_k / np.where(total > 0, total, 1.0)[:, None] * mi  # (R, Kz)
    keep = np.ones(tab.shape[1], dtype=bool)
    if 0 <= background < tab.shape[1]:
        keep[background] = False
    if not keep.any():
        return np.zeros(tab.shape[0])
    return contrib[:, keep].max(axis=1)


def _int_map(x: Any, name: str) -> np.ndarray:
    a = _to_numpy(x, name)
    if a.dtype == np.bool_:
        return a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must be an integer or bool tensor of class indices, got dtype {a.dtype}")
    if a.size and a.min() < 0:
        raise ValueError(f"{name} must hold non-negative class indices; found minimum {int(a.min())}")
    return a.astype(np.int64, copy=False)


def s_global(
    pred: Tensor,
    spurious: Tensor,
    label: Tensor,
    *,
    background: int = 0,
    n_boot: int = 200,
    seed: int = 0,
    ci: float = 0.95,
) -> tuple[float, tuple[float, float]]:
    """Global spurious mutual information of a pixel-wise prediction, in nats, with a bootstrap CI.

        S_global(Z) = max_{k != background} P(Z = k) · I(S; Y | Z = k)

    pred: (B, H, W) integer predicted class per pixel (Z; bool/0-1 for binary); spurious: (B, H, W)
    binary artefact map (S); label: (B, H, W) integer true (fine) pixel label (Y); volumes (B, D, H, W)
    likewise (voxels as pixels, the bootstrap resampling whole volumes). P(Z = k) is the
    fraction of all pixels predicted k; classes never predicted contribute 0 (so does an all-
    background prediction).

    Estimator: plug-in from the (Z, S, Y) count table, with the Miller–Madow correction applied to
    each entropy of I = H(S) + H(Y) − H(S, Y) inside each stratum Z = k. Miller–Madow adds
    (m − 1) / (2 n_k) to a plug-in entropy over m occupied cells, so

        I_MM = I_plugin − (m_SY − m_S − m_Y + 1) / (2 n_k),

    which is the familiar I_plugin − (|S| − 1)(|Y| − 1) / (2 n_k) when every cell is occupied;
    I_MM is clamped at 0. The correction assumes independent pixels (it under-corrects for spatially
    dependent pixels); the interval does not: it is the bootstrap percentile interval (level ``ci``)
    over ``n_boot`` resamples of whole IMAGES with replacement, drawn from
    ``numpy.random.default_rng(seed)``. A percentile interval of a biased statistic need not contain
    the point estimate (e.g. near 0 with few images). Returns ``(estimate, (lo, hi))``.
    """
    z = _int_map(pred, "pred")
    y = _int_map(label, "label")
    s_raw = _to_numpy(spurious, "spurious")
    for name, arr in (("spurious", s_raw), ("label", y)):
        if arr.shape != z.shape:
            raise ValueError(f"{name} shape {arr.shape} does not match pred shape {z.shape}")
    if z.ndim < 2:
        raise ValueError(f"pred/spurious/label must have shape (B, H, W) (batch first); got {z.shape}")
    if z.shape[0] == 0 or z.size == 0:
        raise ValueError(f"pred has no pixels (shape {z.shape})")
    s = _check_binary_np(s_raw, "spurious").astype(np.int64)
    if isinstance(background, bool) or not isinstance(background, (int, np.integer)):
        raise TypeError(f"background must be an int class index, got {background!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive int, got {n_boot!r}")
    if not (isinstance(ci, (int, float)) and 0.0 < ci < 1.0):
        raise ValueError(f"ci must be in (0, 1), got {ci!r}")

    b = z.shape[0]
    kz = int(z.max()) + 1
    ky = int(y.max()) + 1
    cells = kz * 2 * ky
    idx = (z.reshape(b, -1) * 2 + s.reshape(b, -1)) * ky + y.reshape(b, -1)
    idx = idx + (np.arange(b, dtype=np.int64) * cells)[:, None]
    per_image = np.bincount(idx.ravel(), minlength=b * cells).reshape(b, cells).astype(np.float64)

    point = float(_s_global_from_tables(per_image.sum(axis=0).reshape(1, kz, 2, ky), background)[0])

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, b, size=(int(n_boot), b))
    weights = np.bincount(
        (draws + (np.arange(int(n_boot)) * b)[:, None]).ravel(), minlength=int(n_boot) * b
    ).reshape(int(n_boot), b)
    boot_tabs = (weights.astype(np.float64) @ per_image).reshape(int(n_boot), kz, 2, ky)
    reps = _s_global_from_tables(boot_tabs, background)
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(reps, [alpha, 1.0 - alpha])
    return point, (float(lo), float(hi))
