"""Forgetting metrics for classifiers (DESIGN.md "Metrics": forget / retain / test accuracy, retrain gap,
membership inference).

* :func:`accuracy`, :func:`per_sample_losses`, :func:`predict_logits` — a classifier on ``(x, y)``.
* :func:`forgetting_accuracies` — forget / remain / test accuracy in one call.
* :func:`retrain_gap` — absolute gap of each metric to the retrain-from-scratch reference.
* :func:`membership_inference` — the loss-based attack: a logistic regression on per-sample losses
  telling forget samples from held-out samples of the same distribution; class-balanced,
  stratified-K-fold cross-validated; 0.5 is ideal. Also an out-of-fold per-example membership score.
* :func:`split` — any forget/remain split given as a boolean mask (a class, a device, a threshold
  on a measurement...).

Data are ``(x, y)`` tensor pairs or ``TensorDataset``s (see :func:`pyunlearn.models_classify.as_xy`).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models_classify import as_xy

__all__ = [
    "predict_logits",
    "accuracy",
    "per_sample_losses",
    "forgetting_accuracies",
    "evaluate_forgetting",
    "retrain_gap",
    "membership_inference",
    "split",
]


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor, *, batch_size: int = 1024) -> Tensor:
    """Logits ``(N, K)`` of ``model`` on ``x`` in eval mode, batched (the model's mode is restored)."""
    _check_batch_size(batch_size)
    was_training = model.training
    model.eval()
    try:
        outs = [model(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    finally:
        model.train(was_training)
    if not outs:
        return torch.empty(0, 0, device=x.device)
    return torch.cat(outs).float()


def accuracy(model: nn.Module, data, *, batch_size: int = 1024, name: str = "data") -> float:
    """Fraction of samples of ``data`` that ``model`` classifies correctly (``nan`` for an empty set)."""
    x, y = as_xy(data, name, model=model, allow_empty=True)
    if x.shape[0] == 0:
        return float("nan")
    pred = predict_logits(model, x, batch_size=batch_size).argmax(dim=1)
    return float((pred == y).float().mean())


def per_sample_losses(model: nn.Module, data, *, batch_size: int = 1024, name: str = "data") -> Tensor:
    """Cross-entropy of each sample, ``(N,)`` float32 on the model's device."""
    x, y = as_xy(data, name, model=model, allow_empty=True)
    if x.shape[0] == 0:
        return torch.empty(0, device=x.device)
    return F.cross_entropy(predict_logits(model, x, batch_size=batch_size), y, reduction="none")


def forgetting_accuracies(
    model: nn.Module, *, forget, remain, test=None, batch_size: int = 1024,
) -> dict[str, float]:
    """``{"forget_acc", "remain_acc", "test_acc"}`` (``test_acc`` is ``nan`` without ``test``)."""
    return {
        "forget_acc": accuracy(model, forget, batch_size=batch_size, name="forget"),
        "remain_acc": accuracy(model, remain, batch_size=batch_size, name="remain"),
        "test_acc": accuracy(model, test, batch_size=batch_size, name="test") if test is not None else float("nan"),
    }


def evaluate_forgetting(
    model: nn.Module,
    *,
    forget,
    remain,
    test=None,
    heldout=None,
    folds: int = 5,
    seed: int = 0,
    batch_size: int = 1024,
) -> dict[str, Any]:
    """Accuracies plus the membership-inference accuracy ``mia`` of forget vs ``heldout`` samples.

    ``heldout`` must be unseen samples from the forget distribution (test images of the forgotten
    class, of the deprecated device...); without it ``mia`` is ``nan``.
    """
    out: dict[str, Any] = forgetting_accuracies(model, forget=forget, remain=remain, test=test,
                                                batch_size=batch_size)
    out["mia"] = float("nan")
    if heldout is not None:
        attack = membership_inference(
            per_sample_losses(model, forget, batch_size=batch_size, name="forget"),
            per_sample_losses(model, heldout, batch_size=batch_size, name="heldout"),
            folds=folds, seed=seed,
        )
        out["mia"] = attack["accuracy"]
        out["mia_auc"] = attack["auc"]
    return out


def retrain_gap(
    metrics: Mapping[str, float],
    retrain_metrics: Mapping[str, float],
    *,
    keys: Optional[Iterable[str]] = None,
) -> dict[str, float]:
    """``|metrics[k] - retrain_metrics[k]|`` per key, and their ``"mean"`` (over finite gaps).

    ``keys`` defaults to the metrics both dicts share among forget/remain/test accuracy and ``mia``.
    """
    if keys is None:
        keys = [k for k in ("forget_acc", "remain_acc", "test_acc", "mia") if k in metrics and k in retrain_metrics]
    keys = list(keys)
    if not keys:
        raise ValueError("retrain_gap: no metric is shared by metrics and retrain_metrics")
    gaps: dict[str, float] = {}
    for k in keys:
        if k not in metrics or k not in retrain_metrics:
            raise KeyError(f"retrain_gap: metric {k!r} missing from "
                           f"{'metrics' if k not in metrics else 'retrain_metrics'}")
        gaps[k] = abs(float(metrics[k]) - float(retrain_metrics[k]))
    finite = [v for v in gaps.values() if np.isfinite(v)]
    gaps["mean"] = float(np.mean(finite)) if finite else float("nan")
    return gaps


def _losses_np(losses: Any, name: str) -> np.ndarray:
    if isinstance(losses, Tensor):
        arr = losses.detach().cpu().double().numpy()
    else:
        arr = np.asarray(losses, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one loss per sample), got shape {arr.shape}")
    if arr.size < 2:
        raise ValueError(f"{name} needs at least 2 samples for a cross-validated attack, got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite losses")
    return arr


def membership_inference(
    forget_losses: Any,
    heldout_losses: Any,
    *,
    folds: int = 5,
    seed: int = 0,
    feature: str = "loss",
) -> dict[str, Any]:
    """Loss-based membership-inference attack: how well can the losses tell forget from held-out samples?

    A logistic regression (standardised 1-D feature, ``class_weight="balanced"``) is fitted to tell
    ``forget_losses`` (label 1, "member") from ``heldout_losses`` (label 0: unseen samples from the
    same distribution) under stratified K-fold cross-validation (``folds``, capped by the smaller
    group's size, shuffled with ``seed``).

    Returns a dict with
      * ``accuracy`` — out-of-fold *balanced* accuracy (mean of the two recalls), so unequal group
        sizes do not bias it: 0.5 means the unlearned model treats forget samples like unseen ones
        (ideal); near 1 means the forget set is still recognisable (memorised, or over-forgotten);
      * ``auc`` — out-of-fold ROC AUC of the membership score (direction-sensitive; 0.5 ideal);
      * ``scores`` — ``(n_forget,)`` out-of-fold membership probability of each forget sample;
      * ``folds``, ``n_forget``, ``n_heldout``.

    ``feature="log_loss"`` uses ``log(loss)`` (clamped at 1e-12) instead of the raw loss.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if feature not in ("loss", "log_loss"):
        raise ValueError(f"feature must be 'loss' or 'log_loss', got {feature!r}")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an int >= 2, got {folds!r}")
    f = _losses_np(forget_losses, "forget_losses")
    h = _losses_np(heldout_losses, "heldout_losses")
    if f.min() < 0 or h.min() < 0:
        raise ValueError("losses must be >= 0 (per-sample cross-entropies)")
    feats = np.concatenate([f, h])
    if feature == "log_loss":
        feats = np.log(np.maximum(feats, 1e-12))
    feats = feats[:, None]
    labels = np.concatenate([np.ones(f.size, dtype=np.int64), np.zeros(h.size, dtype=np.int64)])
    k = min(folds, f.size, h.size)
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    proba = np.empty(labels.size)
    for train_idx, test_idx in cv.split(feats, labels):
        clf = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced"))
        clf.fit(feats[train_idx], labels[train_idx])
        proba[test_idx] = clf.predict_proba(feats[test_idx])[:, 1]
    pred = (proba >= 0.5).astype(np.int64)
    return {
        "accuracy": float(balanced_accuracy_score(labels, pred)),
        "auc": float(roc_auc_score(labels, proba)),
        "scores": proba[: f.size].copy(),
        "folds": k,
        "n_forget": int(f.size),
        "n_heldout": int(h.size),
    }


def split(data, forget_mask: Any, *, name: str = "data") -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Split ``data`` into ``(forget, remain)`` pairs by a boolean ``(N,)`` mask.

    The mask can come from anything: ``y == c`` (a class), ``device_id == 3`` (an acquisition device),
    ``measurement > t`` (an anatomical subgroup). ``forget_mask`` may be a tensor, numpy array or list.
    """
    x, y = as_xy(data, name, allow_empty=True)
    if isinstance(forget_mask, Tensor):
        mask = forget_mask.detach().to("cpu")
    else:
        mask = torch.as_tensor(np.asarray(forget_mask))
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or not bool(((mask == 0) | (mask == 1)).all()):
            raise TypeError(f"forget_mask must be boolean (or 0/1 integers), got dtype {mask.dtype}")
        mask = mask.bool()
    if tuple(mask.shape) != (x.shape[0],):
        raise ValueError(f"forget_mask must have shape ({x.shape[0]},) to match {name}, got {tuple(mask.shape)}")
    mask = mask.to(x.device)
    return (x[mask], y[mask]), (x[~mask], y[~mask])
