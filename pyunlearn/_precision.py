"""Floating-point facts about the kernels that the privacy accounting must respect.

Pure Python and numpy (no torch), so that :mod:`pyunlearn.certify` and the certified optimizers share
one definition without an import cycle.
"""
from __future__ import annotations

import numpy as np

__all__ = ["CLIP_SLACK", "FLOAT32_MAX", "float32_up"]

#: NOTE: the fused kernels clip in float32; measured clipped norms reach C (1 + 1.5e-7). The accounting
#: therefore uses every clip bound inflated by this factor.
CLIP_SLACK = 1.0 + 1e-6

#: The largest finite float32: the largest noise scale the float32 kernels can use.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def float32_up(x: float) -> float:
    """The smallest float32 value >= x: the noise scale the float32 kernels then use exactly.

    Values above :data:`FLOAT32_MAX` give ``inf`` (callers that need a finite scale check first).
    """
    if x > FLOAT32_MAX:
        return float("inf")
    y = np.float32(x)
    if float(y) < x:
        y = np.nextafter(y, np.float32(np.inf))
    return float(y)
