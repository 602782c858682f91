"""Triton backend of the hot-path ops (installed as ``pyunlearn._triton``).

Importing this package is cheap and does not import Triton; the kernels live in the submodules
``masked_cross_entropy`` and ``clip_noise_step`` (which do), and are re-exported lazily here. Every
launcher has exactly the signature of its reference in ``pyunlearn.ops.reference`` and computes the
same function.

The kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (the interpreter,
used by the tests on machines without a GPU).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

__all__ = [
    "add_noise_",
    "dpsgd_step_",
    "fingerprint",
    "gaussian_noise",
    "gradient_clipping_step_",
    "interpreting",
    "is_available",
    "masked_cross_entropy_fwd_bwd",
    "masked_cross_entropy_op",
    "model_clipping_step_",
    "per_sample_sq_norms",
    "unavailable_reason",
]

_LAZY = {
    "masked_cross_entropy_fwd_bwd": "masked_cross_entropy",
    "masked_cross_entropy_op": "masked_cross_entropy",
    "gradient_clipping_step_": "clip_noise_step",
    "model_clipping_step_": "clip_noise_step",
    "dpsgd_step_": "clip_noise_step",
    "add_noise_": "clip_noise_step",
    "fingerprint": "clip_noise_step",
    "gaussian_noise": "clip_noise_step",
    "per_sample_sq_norms": "per_sample_norms",
}


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET`` set and not 0)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "off", "no")


def unavailable_reason() -> str | None:
    """Why this backend cannot run here, or ``None`` when it can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if interpreting():
        return None
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device and TRITON_INTERPRET=1 is not set"
    return None


def is_available() -> bool:
    """Whether the Triton kernels can run here (Triton importable and CUDA or the interpreter)."""
    return unavailable_reason() is None


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def _check_launch_device(device: "Any", where: str) -> None:
    """Raise ``ValueError`` unless Triton can launch on ``device`` here (CUDA, or CPU when interpreting)."""
    if interpreting():
        if device.type != "cpu":
            raise ValueError(f"{where}: under TRITON_INTERPRET=1 the Triton backend runs on CPU tensors, "
                             f"got device {device}")
    elif device.type != "cuda":
        raise ValueError(f"{where}: the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU), "
                         f"got device {device}")
