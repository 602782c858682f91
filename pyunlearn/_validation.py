"""Input checks shared by the public API: each error says what is wrong and where."""
from __future__ import annotations

import math

import torch


def check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_binary_mask(mask, name: str) -> None:
    """A bool tensor, or an integer/float tensor holding only 0 and 1."""
    check_tensor(mask, name)
    if mask.dtype == torch.bool:
        return
    if mask.is_complex():
        raise TypeError(f"{name} must be bool or real, got dtype {mask.dtype}")
    bad = (mask != 0) & (mask != 1)
    if bad.any():
        value = mask[bad].flatten()[0].item()
        raise ValueError(f"{name} must be binary (0/1 or bool): found value {value} in {int(bad.sum())} element(s)")


def check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def check_same_device(tensors: dict) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all inputs must be on the same device, got {listing}")


def check_finite_tensor(x: torch.Tensor, name: str) -> None:
    if x.is_floating_point() and not torch.isfinite(x).all():
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{name} contains non-finite values ({n_nan} NaN, {n_inf} Inf)")


def positive(value, name: str, *, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return v


def probability(value, name: str) -> float:
    v = positive(value, name)
    if not v < 1:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return v


def count(value, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value
