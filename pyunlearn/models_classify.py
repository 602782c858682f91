"""Small classifiers for the classification unlearning methods and the ``classify-demo`` job.

**Classifier contract** (what :mod:`pyunlearn.unlearn.psg` and :mod:`pyunlearn.unlearn.classification`
expect). A classifier is an :class:`torch.nn.Module` mapping inputs ``(B, ...)`` to logits ``(B, K)``
with ``K >= 2`` classes. :func:`pyunlearn.unlearn.compose` and the embedding plots additionally need

* ``model.features(x) -> (B, D)``: the feature extractor (everything before the classifier head);
* ``model.head``: an ``nn.Module`` mapping ``(B, D)`` to ``(B, K)``;

with ``model(x) == model.head(model.features(x))``. Both models below satisfy it.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsCNN", "LinearClassifier", "num_classes", "check_classifier_contract", "as_xy", "model_device"]


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 grey-level images (scikit-learn's digits), ``(B, 1, 8, 8) -> (B, K)``.

    Two conv blocks (3x3 convs, ReLU, 2x2 max-pool) and a fully connected layer form ``features``
    (``(B, feature_dim)``); ``head`` is a linear layer. No batch norm or dropout, so train and eval
    modes compute the same function.
    """

    def __init__(self, num_classes: int = 10, *, in_channels: int = 1, width: int = 16,
                 feature_dim: int = 64, image_size: int = 8) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 (two 2x2 poolings), got {image_size}")
        self.backbone = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (image_size // 4) ** 2, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class LinearClassifier(nn.Module):
    """A linear (multinomial logistic) classifier ``(B, ...) -> (B, K)``; ``features`` flattens."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(in_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def num_classes(model: nn.Module, example: torch.Tensor) -> int:
    """Number of output classes K: ``head.out_features`` if the head is linear, else one forward pass."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        return int(head.out_features)
    with torch.no_grad():
        out = model(example[:1])
    if out.dim() != 2:
        raise ValueError(f"a classifier must return logits of shape (B, K), got {tuple(out.shape)}")
    return int(out.shape[1])


def check_classifier_contract(model: nn.Module, name: str = "model") -> None:
    """Raise ``TypeError`` unless ``model`` has a callable ``features`` and an ``nn.Module`` ``head``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(getattr(model, "features", None)):
        raise TypeError(f"{name} must expose a callable `features(x)` (the feature extractor) "
                        f"to be composed; {type(model).__name__} has none")
    if not isinstance(getattr(model, "head", None), nn.Module):
        raise TypeError(f"{name} must expose `head`, an nn.Module mapping features to logits; "
                        f"{type(model).__name__}.head is {type(getattr(model, 'head', None)).__name__}")


# --------------------------------------------------------------------------------------------------
# Data contract: (x, y) pairs or a TensorDataset
# --------------------------------------------------------------------------------------------------
def model_device(model: nn.Module) -> torch.device | None:
    """Device of the model's first parameter or buffer (``None`` for a model with neither)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def as_xy(
    data,
    name: str,
    *,
    model: nn.Module | None = None,
    allow_empty: bool = False,
    check_labels: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate classification data and return it as an ``(x, y)`` pair of tensors.

    ``data`` is an ``(x, y)`` tuple/list of tensors or a ``torch.utils.data.TensorDataset`` whose first
    two tensors are ``x`` (floating point, ``(N, ...)``) and ``y`` (integer class indices, ``(N,)``).
    With ``model`` given, ``x``/``y`` must be on the model's device and (``check_labels``) every label
    in ``[0, K)`` for the model's K output classes. Errors name the argument ``name``.
    """
    from torch.utils.data import TensorDataset

    if isinstance(data, TensorDataset):
        if len(data.tensors) < 2:
            raise ValueError(f"{name}: a TensorDataset needs (x, y) tensors, got {len(data.tensors)} tensor(s)")
        x, y = data.tensors[0], data.tensors[1]
    elif isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ValueError(f"{name} must be an (x, y) pair, got a {type(data).__name__} of length {len(data)}")
        x, y = data
    else:
        raise TypeError(f"{name} must be an (x, y) pair of tensors or a TensorDataset, got {type(data).__name__}")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{name}: x and y must be torch.Tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{name}: x must have shape (N, ...), got a 0-d tensor")
    if not x.is_floating_point():
        raise TypeError(f"{name}: x must be floating point, got dtype {x.dtype}")
    if y.dim() != 1:
        raise ValueError(f"{name}: y must have shape (N,) (one class index per sample), got {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name}: y must hold integer class indices, got dtype {y.dtype}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: x has {x.shape[0]} samples but y has {y.shape[0]}")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (0 samples); it needs at least one sample")
    if x.device != y.device:
        raise ValueError(f"{name}: x is on {x.device} but y is on {y.device}")
    if model is not None:
        dev = model_device(model)
        if dev is not None and x.device != dev:
            raise ValueError(f"{name} is on {x.device} but the model is on {dev}; move one of them")
    if x.numel() and x.device.type != "meta" and not torch.isfinite(x).all():
        raise ValueError(f"{name}: x contains non-finite values")
    if model is not None:
        if check_labels and y.numel():
            k = num_classes(model, x)
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= k:
                raise ValueError(f"{name}: labels must be in [0, {k - 1}] for a model with {k} output classes, "
                                 f"found range [{lo}, {hi}]")
    return x, y.long()
